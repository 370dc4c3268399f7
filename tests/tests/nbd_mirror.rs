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
        cancel_and_compare(&mut q, &src, &dest.image)?;
        compare(&dest.image, &report.model)?;
    }
    Ok(())
}

/// Cancels job "m" after READY and checks with qemu-img that the
/// destination equals the source.
fn cancel_and_compare(q: &mut QmpClient, src: &Path, dst: &Path) -> Result<()> {
    q.ok("block-job-cancel", json!({"device": "m"}))?;
    q.wait_event("BLOCK_JOB_COMPLETED", T, |d| d.get("error").is_none())?;
    let out = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "raw"])
        .arg(src)
        .arg(dst)
        .output()?;
    ensure!(
        out.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );
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

/// The daemon a write-blocking mirror runs in.
#[derive(Clone)]
enum Source {
    /// A vubd binary.
    Vubd(PathBuf),
    Qsd,
}

impl Source {
    fn name(&self) -> String {
        match self {
            Source::Vubd(bin) if *bin == tests::daemon::vubd_binary() => "vubd".into(),
            Source::Vubd(bin) => format!("vubd {}", bin.display()),
            Source::Qsd => "qsd 7.2".into(),
        }
    }

    /// Starts serving `image` over vhost-user at `dir/vhost.sock`, with QMP
    /// at `dir/qmp.sock`.
    fn start(&self, dir: &Path, image: &Path) -> Result<(Daemon, PathBuf, PathBuf)> {
        let (vhost, qmp) = (dir.join("vhost.sock"), dir.join("qmp.sock"));
        let daemon = match self {
            Source::Vubd(bin) => {
                let mut cmd = Command::new(bin);
                cmd.arg("--socket").arg(&vhost).arg("--image").arg(image);
                cmd.arg("--allow-unsealed-memory").arg("--qmp").arg(&qmp);
                let d = Daemon::spawn(cmd, &vhost, "vubd")?;
                tests::qmp_client::wait_for_socket(&qmp, T)?;
                d
            }
            Source::Qsd => Daemon::qsd_with_monitor(&vhost, &qmp, image, "aio=io_uring", true)?,
        };
        Ok((daemon, vhost, qmp))
    }
}

/// Mirrors disk0 onto node `target` in write-blocking mode and waits
/// for READY.
fn mirror_write_blocking(q: &mut QmpClient, target: &str) -> Result<()> {
    q.ok(
        "blockdev-mirror",
        json!({"device": "disk0", "target": target, "sync": "full", "job-id": "m",
               "copy-mode": "write-blocking"}),
    )?;
    q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
    Ok(())
}

/// A write-blocking mirror onto an NBD destination that stops answering
/// (SIGSTOP, its connection up): a guest write and a write-zeroes wait
/// for the destination, but the queue thread serving them does not. Reads on the same queue
/// complete meanwhile, the one of the waiting write's block included
/// (with its new data: it landed on the source). Once the destination
/// answers again the write completes and the destination ends equal to
/// the source. On a build whose write-through blocks the queue thread,
/// the first read hangs until the destination is resumed. qsd 7.2 as the
/// source passes the same checks.
fn stopped_destination(source: Source) -> Result<()> {
    let qsd_source = matches!(source, Source::Qsd);
    let tag = if qsd_source {
        "nbdm-stopped-qsd"
    } else {
        "nbdm-stopped"
    };
    let dir = ScratchDir::new_in("/dev/shm", tag)?;
    let (sdir, ddir) = (dir.join("src"), dir.join("dst"));
    std::fs::create_dir(&sdir)?;
    std::fs::create_dir(&ddir)?;
    let src = sdir.join("src.img");
    make_image(&src, SIZE, 2)?;
    let dest = vubd_dest(&ddir, Transport::Unix)?;
    let dest_daemon = &dest._vubd.as_ref().context("vubd destination")?.daemon;
    let (_source, vhost, qmp) = source.start(&sdir, &src)?;
    let mut q = QmpClient::connect(&qmp, T)?;
    let mut remote = json!({"driver": "nbd", "node-name": "remote", "server": dest.server,
                            "export": "e"});
    if !qsd_source {
        // No request time-out: the NBD client must not end the wait itself
        // (QEMU's client has none).
        remote["x-request-timeout"] = json!(0);
    }
    q.ok("blockdev-add", remote)?;
    mirror_write_blocking(&mut q, "remote")?;
    let mut client = tests::client::Client::connect(&vhost, 1, false)?;
    let mut queue = client.take_queue(0)?;
    queue.set_timeout(T);
    let readbuf = queue.alloc_buffer(4096)?;
    let mut data = queue.alloc_buffer(4096)?;
    data.as_mut_slice().fill(0xa5);

    dest_daemon.signal(libc::SIGSTOP)?;
    // kill() returns before every thread has stopped.
    wait_stopped(dest_daemon.pid())?;
    let resume = || dest_daemon.signal(libc::SIGCONT);
    let result = (|| -> Result<()> {
        const WRITE: u64 = 1;
        const ZEROES: u64 = 2;
        let at = 5 * MIB + 8192;
        queue.submit_write(at, &data, 0..4096, WRITE)?;
        queue.submit_write_zeroes(2 * MIB, 64 * 1024, false, ZEROES)?;
        let mut done = Vec::new();
        for i in 0..64u64 {
            let off = if i == 0 { at } else { (i * 997 * 4096) % SIZE };
            queue.submit_read(off, &readbuf, 0..4096, 100 + i)?;
            done.clear();
            queue
                .wait(1, &mut done)
                .context("a read hung behind the writes waiting for the stopped destination")?;
            ensure!(
                done.iter()
                    .all(|c| c.user_data != WRITE && c.user_data != ZEROES),
                "a write completed while the destination was stopped: {done:?}"
            );
            done[0].result(|| format!("read at {off}"))?;
            if i == 0 {
                ensure!(
                    readbuf.as_slice().iter().all(|&b| b == 0xa5),
                    "the source does not hold the waiting write's data"
                );
            }
        }
        ensure!(queue.in_flight() == 2, "the writes are not waiting");
        Ok(())
    })();
    resume()?;
    result?;
    let mut done = Vec::new();
    while queue.in_flight() > 0 {
        queue.wait(1, &mut done)?;
    }
    for c in &done {
        c.result(|| format!("write-blocking request {}", c.user_data))?;
    }
    cancel_and_compare(&mut q, &src, &dest.image)
}

/// Waits until every thread of process `pid` is stopped (state T).
fn wait_stopped(pid: u32) -> Result<()> {
    let t0 = std::time::Instant::now();
    loop {
        let mut running = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let stat = std::fs::read_to_string(task?.path().join("stat"))?;
            // The state follows the parenthesised command name.
            let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
            if state != Some('T') {
                running += 1;
            }
        }
        if running == 0 {
            return Ok(());
        }
        ensure!(
            t0.elapsed() < T,
            "{running} thread(s) of {pid} never stopped"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_stopped_destination_holds_only_the_writes_waiting_for_it() -> Result<()> {
    stopped_destination(Source::Vubd(tests::daemon::vubd_binary()))
}

#[test]
fn a_stopped_destination_holds_only_the_writes_waiting_for_it_on_qsd() -> Result<()> {
    stopped_destination(Source::Qsd)
}

// ---- figures ------------------------------------------------------------------

/// One measurement: 4 KiB random writes at QD16 while a write-blocking
/// mirror (READY) sends each of them to `target` (`file` on /dev/shm, or
/// `nbd`: a vubd export over a unix socket). Returns (IOPS, CPU seconds of
/// the source daemon per million writes); checks that the target ends
/// equal to what the client wrote.
fn write_blocking_run(source: &Source, target: &str, tag: &str) -> Result<(f64, f64)> {
    const WRITES: u64 = 20_000;
    let dir = ScratchDir::new_in("/dev/shm", tag)?;
    let (sdir, ddir) = (dir.join("src"), dir.join("dst"));
    std::fs::create_dir(&sdir)?;
    std::fs::create_dir(&ddir)?;
    let src = sdir.join("src.img");
    let model = make_image(&src, SIZE, 1)?;
    let (_source, vhost, qmp) = source.start(&sdir, &src)?;
    let mut q = QmpClient::connect(&qmp, T)?;
    let (_dest, dst) = match target {
        "file" => {
            let dst = sdir.join("dst.img");
            std::fs::File::create(&dst)?.set_len(SIZE)?;
            q.ok(
                "blockdev-add",
                json!({"driver": "file", "node-name": "t", "filename": dst}),
            )?;
            (None, dst)
        }
        _ => {
            let dest = vubd_dest(&ddir, Transport::Unix)?;
            q.ok(
                "blockdev-add",
                json!({"driver": "nbd", "node-name": "t", "server": dest.server, "export": "e"}),
            )?;
            let dst = dest.image.clone();
            (Some(dest), dst)
        }
    };
    mirror_write_blocking(&mut q, "t")?;
    let client = tests::client::Client::connect(&vhost, 1, false)?;
    let cfg = LoadConfig {
        span: SIZE,
        queue_depth: 16,
        zeroes_every: None,
        ..LoadConfig::default()
    };
    let load = WriteLoad::start(client, model, cfg)?;
    load.wait_requests(2_000, T)?;
    let pid = _source.pid();
    let cpu0 = tests::daemon::process_cpu_time(pid)?;
    let t0 = std::time::Instant::now();
    load.wait_requests(WRITES, T)?;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (tests::daemon::process_cpu_time(pid)? - cpu0).as_secs_f64();
    let report = load.stop().context("the client saw an error")?;
    q.ok("block-job-cancel", json!({"device": "m"}))?;
    q.wait_event("BLOCK_JOB_COMPLETED", T, |d| d.get("error").is_none())?;
    compare(&dst, &report.model)?;
    Ok((WRITES as f64 / secs, cpu / WRITES as f64 * 1e6))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Guest write IOPS under a write-blocking mirror, vubd against qsd 7.2
/// (and an older vubd build given as `VUBD_BASELINE`), alternating, 3
/// runs each; prints a table. Run:
/// `VUBD_BASELINE=OLD_VUBD cargo test --release -p tests --test nbd_mirror -- --ignored --nocapture write_blocking_figures`
#[test]
#[ignore = "benchmark: prints figures"]
fn write_blocking_figures() -> Result<()> {
    let mut sources = vec![Source::Vubd(tests::daemon::vubd_binary())];
    if let Ok(old) = std::env::var("VUBD_BASELINE") {
        sources.push(Source::Vubd(old.into()));
    }
    sources.push(Source::Qsd);
    println!("| target | source | IOPS (median of 3) | source CPU µs per write | IOPS / qsd's (median of paired runs) |");
    println!("| --- | --- | --- | --- | --- |");
    for target in ["file", "nbd"] {
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); sources.len()];
        for rep in 0..3 {
            for (i, s) in sources.iter().enumerate() {
                runs[i].push(write_blocking_run(s, target, &format!("wbfig-{rep}-{i}"))?);
            }
        }
        let qsd = &runs[sources.len() - 1];
        for (i, s) in sources.iter().enumerate() {
            let mut iops: Vec<f64> = runs[i].iter().map(|r| r.0).collect();
            let mut cpu: Vec<f64> = runs[i].iter().map(|r| r.1).collect();
            let mut ratio: Vec<f64> = runs[i].iter().zip(qsd).map(|(a, b)| a.0 / b.0).collect();
            println!(
                "| {target} | {} | {:.0} | {:.1} | {:.2} |",
                s.name(),
                median(&mut iops),
                median(&mut cpu),
                median(&mut ratio)
            );
        }
    }
    Ok(())
}
