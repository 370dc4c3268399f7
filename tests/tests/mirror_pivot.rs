//! After a pivot, against the real daemon (vubd with `--qmp`, a libblkio
//! client, a raw QMP client): the daemon knows the disk by the image it
//! uses now, not by its `--image`. A mirror onto that image (by any name)
//! is refused and the guest's data stays; a mirror back onto the old image
//! is allowed, keeps its state beside the image in use, and resumes after a
//! restart with `--image NEW`. A restart on the old image is refused unless
//! `--allow-stale-image` says otherwise.

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tests::bench_mirror::{make_image, pattern, MirrorDaemon};
use tests::client::Client;
use tests::daemon::{vubd_binary, ScratchDir};
use tests::qmp_client::QmpClient;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);

fn image_file(q: &mut QmpClient) -> Result<PathBuf> {
    let v = q.ok("query-block", json!({}))?;
    Ok(PathBuf::from(
        v[0]["inserted"]["file"].as_str().context("no file")?,
    ))
}

fn status_is(s: &'static str) -> impl Fn(&Value) -> bool {
    move |d| d["status"] == s
}

/// `drive-mirror` (default mode: the target is created) to `target`,
/// READY, `job-complete`, and the disk is on `target`.
fn pivot(q: &mut QmpClient, target: &Path, id: &str) -> Result<()> {
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": target, "sync": "full", "job-id": id}),
    )?;
    q.wait_event("BLOCK_JOB_READY", T, |d| d["device"] == id)?;
    q.ok("job-complete", json!({"id": id}))?;
    q.wait_event("JOB_STATUS_CHANGE", T, |d| {
        d["id"] == id && d["status"] == "null"
    })?;
    ensure!(
        image_file(q)? == target.canonicalize()?,
        "the disk did not switch to {}",
        target.display()
    );
    Ok(())
}

/// Everything the guest reads, compared with `model`.
fn guest_reads(client: &mut Client, model: &[u8]) -> Result<()> {
    for off in (0..model.len()).step_by(MIB as usize) {
        let got = client.read(off as u64, MIB as usize)?;
        ensure!(
            got == model[off..off + MIB as usize],
            "the guest reads other data in the MiB at {off}"
        );
    }
    Ok(())
}

fn write(client: &mut Client, model: &mut [u8], off: u64, data: &[u8]) -> Result<()> {
    client.write(off, data)?;
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
    Ok(())
}

#[test]
fn a_second_mirror_after_a_pivot_goes_by_the_image_in_use() -> Result<()> {
    let dir = ScratchDir::new_in("/dev/shm", "mirror-second")?;
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    let mut model = make_image(&a, 32 * MIB, 2)?;
    let mut d = MirrorDaemon::start(dir.path(), &a, &[])?;
    let mut q = d.qmp()?;
    let mut client = d.client()?;
    pivot(&mut q, &b, "m1")?;
    write(&mut client, &mut model, 5 * MIB, &pattern(5, 1, 65536))?;

    // Onto the live image, by its name or a hard link: refused (before the
    // fix the first one created B anew and the guest read zeroes).
    std::fs::hard_link(&b, dir.join("b-link.img"))?;
    for target in [b.clone(), dir.join("b-link.img")] {
        let e = q.err(
            "drive-mirror",
            json!({"device": "disk0", "target": target, "sync": "full", "job-id": "x"}),
        )?;
        ensure!(e.desc == "Can't mirror node into itself", "{e}");
    }
    guest_reads(&mut client, &model)?;

    // Back onto A: allowed; its state lies beside B, the image in use.
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": a, "sync": "full", "job-id": "m2", "speed": 8 * MIB}),
    )?;
    ensure!(
        dir.join("b.img.vubd-mirror").exists() && !dir.join("a.img.vubd-mirror").exists(),
        "the second mirror's state is not beside the image in use"
    );
    std::thread::sleep(Duration::from_millis(600));
    // Pausing records the progress (a checkpoint); then kill -9, and a
    // restart with `--image B` (the daemon's command line after the
    // pivot): the interrupted mirror is found and resumes from there.
    q.ok("job-pause", json!({"id": "m2"}))?;
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("paused"))?;
    let v = q.ok("query-block-jobs", json!({}))?;
    let copied = v[0]["offset"].as_u64().context("no offset")?;
    d.daemon.kill();
    drop((q, client));
    let d = MirrorDaemon::start(dir.path(), &b, &[])?;
    let mut q = d.qmp()?;
    let mut client = d.client()?;
    write(&mut client, &mut model, 9 * MIB, &pattern(9, 1, 4096))?;
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": a, "sync": "full", "job-id": "m2", "x-resume": true}),
    )?;
    let ready = q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
    let len = ready["data"]["len"].as_u64().context("no len")?;
    ensure!(
        len <= 32 * MIB - copied + MIB,
        "the resumed mirror copied {len} bytes; {copied} were done before the kill"
    );
    q.ok("job-complete", json!({"id": "m2"}))?;
    q.wait_event("JOB_STATUS_CHANGE", T, status_is("null"))?;
    ensure!(image_file(&mut q)? == a.canonicalize()?, "no pivot onto A");
    guest_reads(&mut client, &model)?;
    ensure!(
        std::fs::read(&a)? == model,
        "A differs from what the guest wrote"
    );
    Ok(())
}

/// Runs vubd until it exits (killed after 10 s); its status (None if it
/// kept running) and stderr.
fn run_vubd(args: &[&OsStr]) -> Result<(Option<ExitStatus>, String)> {
    let mut child = Command::new(vubd_binary())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr)?;
    }
    Ok((status, stderr))
}

#[test]
fn a_restart_on_the_image_a_pivot_left_is_refused_unless_allowed() -> Result<()> {
    let dir = ScratchDir::new_in("/dev/shm", "mirror-stale")?;
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    let model = make_image(&a, 16 * MIB, 1)?;
    let mut d = MirrorDaemon::start(dir.path(), &a, &[])?;
    let mut q = d.qmp()?;
    let mut client = d.client()?;
    pivot(&mut q, &b, "m")?;
    let data = pattern(3, 3, 4096);
    client.write(3 * MIB, &data)?;
    ensure!(
        dir.join("a.img.vubd-pivoted").exists(),
        "no marker beside the old image"
    );
    q.ok("quit", json!({}))?;
    drop((q, client));
    d.daemon.wait_exit(Duration::from_secs(10))?;

    let socket = dir.join("vhost.sock");
    let args = [
        OsStr::new("--socket"),
        socket.as_os_str(),
        OsStr::new("--image"),
        a.as_os_str(),
    ];
    let (status, stderr) = run_vubd(&args)?;
    ensure!(
        status.is_some_and(|s| !s.success()),
        "vubd started on the image a pivot left ({status:?}): {stderr}"
    );
    let b_path = b.canonicalize()?;
    ensure!(
        stderr.contains(&*b_path.to_string_lossy()) && stderr.contains("--allow-stale-image"),
        "the refusal does not name the new image and the override: {stderr}"
    );
    eprintln!("refused: {}", stderr.trim());

    // Told otherwise: serves A as it was at the pivot; the marker goes.
    let d = MirrorDaemon::start(dir.path(), &a, &["--allow-stale-image"])?;
    ensure!(
        !dir.join("a.img.vubd-pivoted").exists(),
        "the marker stayed after --allow-stale-image"
    );
    let mut client = d.client()?;
    ensure!(
        client.read(3 * MIB, 4096)? == model[3 * MIB as usize..3 * MIB as usize + 4096],
        "A is not the disk as it was at the pivot"
    );
    drop((client, d));
    // ... and the next start needs no override.
    let d = MirrorDaemon::start(dir.path(), &a, &[])?;
    drop(d);
    Ok(())
}
