//! Mirroring vubd's disk onto a remote NBD export (the live storage
//! migration of issue 12): vubd as the source with a libblkio client
//! writing the whole time, qemu-storage-daemon 7.2 or a second vubd as the
//! writable NBD destination, over unix sockets and TCP on 127.0.0.1. After
//! cancel-after-READY the destination holds exactly what the client had
//! written when it stopped; after a pivot the guest's later writes land on
//! the destination, through the NBD node.

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tests::bench_mirror::{make_image, LoadConfig, MirrorDaemon, WriteLoad};
use tests::daemon::{Daemon, ScratchDir};
use tests::qmp_client::QmpClient;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const T: Duration = Duration::from_secs(60);

/// A guest writing steadily but slower than a loaded 2-core machine copies
/// over loopback NBD (a faster writer keeps any mirror from converging,
/// QEMU's too).
fn load_cfg() -> LoadConfig {
    LoadConfig {
        span: SIZE,
        queue_depth: 1,
        pace: Some(Duration::from_millis(2)),
        ..LoadConfig::default()
    }
}

/// Where the destination listens.
#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Unix,
    Tcp,
}

/// A destination: the daemon, its image, and the export's address as a
/// `blockdev-add` `server` and as a `drive-mirror` URI.
struct Dest {
    _qsd: Option<Daemon>,
    _vubd: Option<MirrorDaemon>,
    image: PathBuf,
    server: Value,
    uri: String,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn address(dir: &Path, t: Transport) -> Result<(Value, Value, String)> {
    Ok(match t {
        Transport::Unix => {
            let p = dir.join("nbd.sock");
            let s = p.to_string_lossy().into_owned();
            (
                json!({"type": "unix", "path": s}),
                json!({"type": "unix", "data": {"path": s}}),
                format!("nbd+unix:///e?socket={s}"),
            )
        }
        Transport::Tcp => {
            let port = free_port()?.to_string();
            (
                json!({"type": "inet", "host": "127.0.0.1", "port": port}),
                json!({"type": "inet", "data": {"host": "127.0.0.1", "port": port}}),
                format!("nbd://127.0.0.1:{port}/e"),
            )
        }
    })
}

/// qemu-storage-daemon exporting an empty image as "e", writable.
fn qsd_dest(dir: &Path, t: Transport) -> Result<Dest> {
    let image = dir.join("dst.img");
    std::fs::File::create(&image)?.set_len(SIZE)?;
    let (server, _, uri) = address(dir, t)?;
    Ok(Dest {
        _qsd: Some(qsd_export(dir, &image, &server)?),
        _vubd: None,
        image,
        server,
        uri,
    })
}

/// Starts qemu-storage-daemon exporting `image` as "e" at `server` (the
/// image is kept: this also restarts a destination).
fn qsd_export(dir: &Path, image: &Path, server: &Value) -> Result<Daemon> {
    let addr = match server["type"].as_str() {
        Some("unix") => format!(
            "addr.type=unix,addr.path={}",
            server["path"].as_str().context("path")?
        ),
        _ => format!(
            "addr.type=inet,addr.host=127.0.0.1,addr.port={}",
            server["port"].as_str().context("port")?
        ),
    };
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=d,filename={}",
            image.display()
        ))
        .arg("--nbd-server")
        .arg(addr)
        .arg("--export")
        .arg("type=nbd,id=x,node-name=d,name=e,writable=on");
    Daemon::spawn(cmd, &dir.join("qsd.sock"), "qemu-storage-daemon")
}

/// A second vubd exporting its (empty) disk as "e", writable.
fn vubd_dest(dir: &Path, t: Transport) -> Result<Dest> {
    let image = dir.join("dst.img");
    std::fs::File::create(&image)?.set_len(SIZE)?;
    let (server, legacy, uri) = address(dir, t)?;
    let d = MirrorDaemon::start(dir, &image, &[])?;
    let mut q = d.qmp()?;
    q.ok("nbd-server-start", json!({ "addr": legacy }))?;
    q.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "x", "node-name": "disk0", "name": "e", "writable": true}),
    )?;
    Ok(Dest {
        _qsd: None,
        _vubd: Some(d),
        image,
        server,
        uri,
    })
}

/// How the source names the destination.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    /// `blockdev-add driver=nbd` + `blockdev-mirror`.
    Node,
    /// `drive-mirror` with the export's URI.
    Uri,
}

/// Mirrors a vubd source under load onto `dest`; after READY either
/// cancels (the destination is a point-in-time copy) or pivots (the guest
/// goes on writing to the destination through the NBD node).
fn mirror_onto(
    tag: &str,
    dest: fn(&Path, Transport) -> Result<Dest>,
    t: Transport,
    via: Via,
    pivot: bool,
) -> Result<()> {
    let dir = ScratchDir::new_in("/dev/shm", tag)?;
    let (sdir, ddir) = (dir.join("src"), dir.join("dst"));
    std::fs::create_dir(&sdir)?;
    std::fs::create_dir(&ddir)?;
    let src = sdir.join("src.img");
    // Half sparse: every other MiB holds data.
    let model = make_image(&src, SIZE, 2)?;
    let dest = dest(&ddir, t)?;
    let d = MirrorDaemon::start(&sdir, &src, &[])?;
    let mut q: QmpClient = d.qmp()?;
    let load = WriteLoad::start(d.client()?, model, load_cfg())?;
    load.wait_requests(100, T)?;
    match via {
        Via::Node => {
            q.ok(
                "blockdev-add",
                json!({"driver": "nbd", "node-name": "remote", "server": dest.server,
                       "export": "e", "reconnect-delay": 5}),
            )?;
            let nodes = q.ok("query-named-block-nodes", json!({}))?;
            let remote = nodes
                .as_array()
                .and_then(|a| a.iter().find(|n| n["node-name"] == "remote"))
                .context("no remote node")?;
            ensure!(
                remote["drv"] == "nbd" && remote["file"] == dest.uri.as_str(),
                "{remote}"
            );
            q.ok(
                "blockdev-mirror",
                json!({"device": "disk0", "target": "remote", "sync": "full", "job-id": "m"}),
            )?;
        }
        Via::Uri => {
            q.ok(
                "drive-mirror",
                json!({"device": "disk0", "target": dest.uri, "sync": "full", "mode": "existing",
                       "format": "raw", "job-id": "m"}),
            )?;
        }
    }
    q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
    load.wait_requests(100, T)?;
    if pivot {
        q.ok("job-complete", json!({"id": "m"}))?;
        q.wait_event("BLOCK_JOB_COMPLETED", T, |d| d.get("error").is_none())?;
        let blk = q.ok("query-block", json!({}))?;
        ensure!(
            blk[0]["inserted"]["file"] == dest.uri.as_str(),
            "not on the destination: {blk}"
        );
        // The guest now writes through the NBD node.
        load.wait_requests(100, T)?;
        let report = load.stop().context("the client saw an error")?;
        compare(&dest.image, &report.model)?;
    } else {
        let report = load.stop().context("the client saw an error")?;
        q.ok("block-job-cancel", json!({"device": "m"}))?;
        q.wait_event("BLOCK_JOB_COMPLETED", T, |d| d.get("error").is_none())?;
        compare(&dest.image, &report.model)?;
        let out = Command::new("qemu-img")
            .args(["compare", "-U", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&dest.image)
            .output()?;
        ensure!(
            out.status.success(),
            "qemu-img compare: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

/// Compares `path` with `expect` in 4 KiB blocks.
fn compare(path: &Path, expect: &[u8]) -> Result<()> {
    let got = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    ensure!(got.len() >= expect.len(), "{} is too short", path.display());
    let bad: Vec<usize> = (0..expect.len() / 4096)
        .filter(|&b| got[b * 4096..(b + 1) * 4096] != expect[b * 4096..(b + 1) * 4096])
        .collect();
    ensure!(
        bad.is_empty(),
        "{}: {} blocks differ from what the client wrote, first {:?}",
        path.display(),
        bad.len(),
        &bad[..bad.len().min(8)]
    );
    Ok(())
}

#[test]
fn blockdev_mirror_to_qsd_over_unix_cancel_after_ready() -> Result<()> {
    mirror_onto("nbdm-qsd-unix", qsd_dest, Transport::Unix, Via::Node, false)
}

#[test]
fn blockdev_mirror_to_qsd_over_tcp_then_pivot() -> Result<()> {
    mirror_onto("nbdm-qsd-tcp", qsd_dest, Transport::Tcp, Via::Node, true)
}

#[test]
fn drive_mirror_to_qsd_by_uri_cancel_after_ready() -> Result<()> {
    mirror_onto("nbdm-qsd-uri", qsd_dest, Transport::Tcp, Via::Uri, false)
}

#[test]
fn blockdev_mirror_to_vubd_export_cancel_after_ready() -> Result<()> {
    mirror_onto(
        "nbdm-vubd-unix",
        vubd_dest,
        Transport::Unix,
        Via::Node,
        false,
    )
}

#[test]
fn drive_mirror_to_vubd_export_by_uri_then_pivot() -> Result<()> {
    mirror_onto("nbdm-vubd-uri", vubd_dest, Transport::Unix, Via::Uri, true)
}

/// What happens to the destination while the mirror runs.
#[derive(Clone, Copy, PartialEq)]
enum Outage {
    /// Killed and restarted within `reconnect-delay`.
    Short,
    /// Down for longer; `on-target-error=report`.
    LongReport,
    /// Down for longer; `on-target-error=stop`, restarted, `job-resume`.
    LongStop,
}

/// Kills the qsd destination in the middle of the copy (the job is slowed
/// by `speed` so that it is), and checks what the job and the guest see.
fn destination_outage(tag: &str, outage: Outage) -> Result<()> {
    let dir = ScratchDir::new_in("/dev/shm", tag)?;
    let (sdir, ddir) = (dir.join("src"), dir.join("dst"));
    std::fs::create_dir(&sdir)?;
    std::fs::create_dir(&ddir)?;
    let src = sdir.join("src.img");
    let model = make_image(&src, SIZE, 1)?;
    let mut dest = qsd_dest(&ddir, Transport::Unix)?;
    let d = MirrorDaemon::start(&sdir, &src, &[])?;
    let mut q: QmpClient = d.qmp()?;
    let load = WriteLoad::start(d.client()?, model, load_cfg())?;
    let delay = if outage == Outage::Short { 30 } else { 1 };
    q.ok(
        "blockdev-add",
        json!({"driver": "nbd", "node-name": "remote", "server": dest.server,
               "export": "e", "reconnect-delay": delay}),
    )?;
    let policy = if outage == Outage::LongStop {
        "stop"
    } else {
        "report"
    };
    q.ok(
        "blockdev-mirror",
        json!({"device": "disk0", "target": "remote", "sync": "full", "job-id": "m",
               "speed": 4 * MIB, "on-target-error": policy}),
    )?;
    // Mid-copy: some bytes done, most not.
    let deadline = std::time::Instant::now() + T;
    loop {
        let job = q.ok("query-block-jobs", json!({}))?;
        if job[0]["offset"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the job copies nothing: {job}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut qsd = dest._qsd.take().context("qsd")?;
    qsd.kill();
    drop(qsd);
    q.ok("block-job-set-speed", json!({"device": "m", "speed": 0}))?;
    match outage {
        Outage::Short => {
            std::thread::sleep(Duration::from_millis(500));
            dest._qsd = Some(qsd_export(&ddir, &dest.image, &dest.server)?);
        }
        Outage::LongReport => {
            let ev = q.wait_event("BLOCK_JOB_COMPLETED", T, |_| true)?;
            ensure!(ev["data"]["error"].is_string(), "no error: {ev}");
            load.wait_requests(100, T)?;
            load.stop().context("the guest saw an error")?;
            return Ok(());
        }
        Outage::LongStop => {
            q.wait_event("BLOCK_JOB_ERROR", T, |d| d["action"] == "stop")?;
            q.wait_event("JOB_STATUS_CHANGE", T, |d| d["status"] == "paused")?;
            dest._qsd = Some(qsd_export(&ddir, &dest.image, &dest.server)?);
            // The outage has outlasted the delay: the client reconnects
            // in the background; resume once it has.
            std::thread::sleep(Duration::from_secs(2));
            q.ok("job-resume", json!({"id": "m"}))?;
        }
    }
    q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
    load.wait_requests(100, T)?;
    let report = load.stop().context("the guest saw an error")?;
    q.ok("block-job-cancel", json!({"device": "m"}))?;
    let ev = q.wait_event("BLOCK_JOB_COMPLETED", T, |_| true)?;
    ensure!(ev["data"].get("error").is_none(), "{ev}");
    compare(&dest.image, &report.model)
}

#[test]
fn destination_restarted_within_reconnect_delay_is_invisible() -> Result<()> {
    destination_outage("nbdm-short", Outage::Short)
}

#[test]
fn destination_down_longer_ends_the_job_with_report() -> Result<()> {
    destination_outage("nbdm-report", Outage::LongReport)
}

#[test]
fn destination_down_longer_pauses_the_job_with_stop_and_resumes() -> Result<()> {
    destination_outage("nbdm-stop", Outage::LongStop)
}
