//! Image locks as QEMU takes them: while vubd serves an image, QEMU,
//! qemu-img, qemu-io and a second vubd see it exactly as they see an image
//! a QEMU guest's virtio-blk disk uses, and vubd refuses an image a QEMU
//! holds.
//!
//! Each case puts a holder on an image, a real QEMU (`-S`: the device is
//! realized and its locks taken, no guest runs) or vubd, then runs the
//! same probes (stock tools, a second QEMU, a second vubd) and compares
//! what each probe printed and whether it succeeded, holder by holder.

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tests::bench_mirror::MirrorDaemon;
use tests::daemon::{create_image, vubd_binary, Daemon, ScratchDir};

const MIB: u64 = 1 << 20;
/// Anti-hang bound for one probe or holder start.
const DEADLINE: Duration = Duration::from_secs(60);

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A QEMU whose virtio-blk device holds `image` (never runs the guest).
fn qemu_holder(image: &Path, read_only: bool) -> Result<Child> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35", "-S", "-nodefaults", "-display", "none"])
        .args(["-qmp", "stdio", "-drive"])
        .arg(format!(
            "file={},if=none,id=d0,format=raw,readonly={}",
            image.display(),
            if read_only { "on" } else { "off" }
        ))
        .args(["-device", "virtio-blk-pci,drive=d0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start qemu-system-x86_64")?;
    // The QMP greeting comes once the devices are realized (locks taken).
    let mut out = child.stdout.take().context("qemu stdout")?;
    let mut byte = [0u8; 1];
    let start = Instant::now();
    loop {
        match out.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => {}
            _ => {
                let mut err = String::new();
                let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                let _ = child.kill();
                let _ = child.wait();
                bail!("QEMU holder did not start: {err}");
            }
        }
        ensure!(start.elapsed() < DEADLINE, "QEMU holder start hangs");
    }
    child.stdout = Some(out);
    Ok(child)
}

/// What a probe did: whether it succeeded, and its stderr with the image
/// path replaced by `IMG` and scratch paths by `DIR`.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    ok: bool,
    stderr: String,
}

/// Runs `cmd`: done when it exits, or (ok, killed) once its stderr says
/// `ready` (a daemon serves until killed).
fn probe(mut cmd: Command, ready: Option<&str>, image: &Path, dir: &Path) -> Result<Outcome> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let mut err = child.stderr.take().context("stderr")?;
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = text.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut t) = sink.lock() {
                t.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    let start = Instant::now();
    let ok = loop {
        if let Some(status) = child.try_wait()? {
            break status.success();
        }
        let seen = text.lock().map(|t| t.clone()).unwrap_or_default();
        if ready.is_some_and(|r| seen.contains(r)) {
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} hangs; stderr: {seen}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = reader.join();
    let seen = text.lock().map(|t| t.clone()).unwrap_or_default();
    Ok(Outcome {
        ok,
        stderr: normalize(&seen, image, dir),
    })
}

fn normalize(text: &str, image: &Path, dir: &Path) -> String {
    text.replace(&*image.to_string_lossy(), "IMG")
        .replace(&*dir.to_string_lossy(), "DIR")
        .lines()
        .filter(|l| !l.starts_with("vubd: serving"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The probes, by name, against `image` (scratch files go in `dir`).
fn probes(image: &Path, dir: &Path) -> Vec<(&'static str, Command, Option<&'static str>)> {
    let img = image.display().to_string();
    let out = dir.join("copy.raw").display().to_string();
    let cmd = |prog: &str, args: &[&str]| {
        let mut c = Command::new(prog);
        c.args(args);
        c
    };
    let vubd = |extra: &[&str]| {
        let mut c = Command::new(vubd_binary());
        c.args(["--socket", &dir.join("probe.sock").display().to_string()])
            .args(["--image", &img])
            .args(extra)
            .env_remove("RUST_LOG");
        c
    };
    vec![
        ("qemu-img info", cmd("qemu-img", &["info", &img]), None),
        (
            "qemu-img convert",
            cmd(
                "qemu-img",
                &["convert", "-f", "raw", "-O", "raw", &img, &out],
            ),
            None,
        ),
        (
            "qemu-img convert -U",
            cmd(
                "qemu-img",
                &["convert", "-U", "-f", "raw", "-O", "raw", &img, &out],
            ),
            None,
        ),
        (
            "qemu-io read",
            cmd("qemu-io", &["-f", "raw", "-r", "-c", "read 0 4k", &img]),
            None,
        ),
        (
            "qemu-io write",
            cmd("qemu-io", &["-f", "raw", "-c", "write 0 4k", &img]),
            None,
        ),
        (
            "a second QEMU",
            {
                // -daemonize: the command returns once the device is
                // realized (locks taken) or refused; the started one is
                // killed by its pid file below.
                let mut c = cmd(
                    "qemu-system-x86_64",
                    &["-machine", "q35", "-S", "-nodefaults", "-display", "none"],
                );
                c.arg("-drive")
                    .arg(format!("file={img},if=none,id=d0,format=raw"))
                    .args(["-device", "virtio-blk-pci,drive=d0", "-daemonize"])
                    .arg("-pidfile")
                    .arg(dir.join("qemu2.pid"));
                c
            },
            None,
        ),
        ("a second vubd", vubd(&[]), Some("vubd: serving")),
        (
            "a second vubd --readonly",
            vubd(&["--readonly"]),
            Some("vubd: serving"),
        ),
    ]
}

/// Runs every probe against `image` while `hold` holds it.
fn run_probes(image: &Path, dir: &Path) -> Result<Vec<(&'static str, Outcome)>> {
    let outcomes = probes(image, dir)
        .into_iter()
        .map(|(name, cmd, ready)| Ok((name, probe(cmd, ready, image, dir)?)))
        .collect();
    // A second QEMU that was let in runs daemonized: stop it.
    if let Ok(pid) = std::fs::read_to_string(dir.join("qemu2.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: kill(2) on the pid QEMU wrote; no memory involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(dir.join("qemu2.pid"));
    }
    outcomes
}

fn compare(read_only: bool) -> Result<()> {
    if !have("qemu-system-x86_64") || !have("qemu-img") || !have("qemu-io") {
        eprintln!("SKIPPED: qemu-system-x86_64, qemu-img or qemu-io missing");
        return Ok(());
    }
    let dir = ScratchDir::new(if read_only { "lock-ro" } else { "lock-rw" })?;
    let image = dir.join("disk.img");
    create_image(&image, 16 * MIB)?;

    let mut qemu = qemu_holder(&image, read_only)?;
    let with_qemu = run_probes(&image, dir.path());
    let _ = qemu.kill();
    let _ = qemu.wait();
    let with_qemu = with_qemu?;

    let extra: &[&str] = if read_only { &["--readonly"] } else { &[] };
    let mut vubd = Daemon::vubd(&dir.join("vhost.sock"), &image, extra)?;
    let with_vubd = run_probes(&image, dir.path());
    vubd.kill();
    let with_vubd = with_vubd?;

    let mut differences = Vec::new();
    for ((name, q), (_, v)) in with_qemu.iter().zip(&with_vubd) {
        eprintln!("{name}: QEMU holder {q:?}; vubd holder {v:?}");
        if q != v {
            differences.push(format!(
                "{name}:\n  QEMU holder: {q:?}\n  vubd holder: {v:?}"
            ));
        }
    }
    ensure!(differences.is_empty(), "{}", differences.join("\n"));
    // The comparison is not vacuous: a writer is refused with QEMU's text,
    // and force-share still reads.
    let find = |n: &str| &with_vubd.iter().find(|(name, _)| *name == n).expect(n).1;
    ensure!(!find("qemu-io write").ok && find("qemu-io write").stderr.contains("\"write\" lock"));
    ensure!(find("qemu-img convert -U").ok);
    // vubd refuses an image a QEMU holds (and one vubd holds).
    ensure!(!find("a second vubd").ok);
    Ok(())
}

#[test]
fn a_served_image_is_locked_as_a_qemu_guest_disk_is() -> Result<()> {
    compare(false)
}

#[test]
fn a_read_only_served_image_is_locked_as_a_qemu_read_only_disk_is() -> Result<()> {
    compare(true)
}

/// A mirror target is locked from the moment the job opens it: nobody else
/// may write it, and a second mirror or daemon cannot take it.
#[test]
fn a_mirror_target_is_locked() -> Result<()> {
    if !have("qemu-io") {
        eprintln!("SKIPPED: qemu-io missing");
        return Ok(());
    }
    let dir = ScratchDir::new("lock-mirror")?;
    let (src, tgt): (PathBuf, PathBuf) = (dir.join("src.img"), dir.join("tgt.img"));
    create_image(&src, 16 * MIB)?;
    create_image(&tgt, 16 * MIB)?;
    let d = MirrorDaemon::start(dir.path(), &src, &[])?;
    let mut q = d.qmp()?;
    let write_target = || {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw", "-c", "write 0 4k"]).arg(&tgt);
        probe(c, None, &tgt, dir.path())
    };
    ensure!(write_target()?.ok, "setup: the target is not writable");
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt, "sync": "full", "mode": "existing",
               "job-id": "m", "auto-dismiss": false}),
    )?;
    let w = write_target()?;
    ensure!(
        !w.ok && w.stderr.contains("Failed to get \"write\" lock"),
        "a writer got the mirror's target: {w:?}"
    );
    // A job that ends without a pivot lets go of its target, as QEMU's
    // does (the job stays concluded, not dismissed).
    q.ok("job-cancel", json!({"id": "m"}))?;
    q.wait_event("JOB_STATUS_CHANGE", DEADLINE, |d| {
        d["status"] == "concluded"
    })?;
    let w = write_target()?;
    ensure!(w.ok, "the cancelled mirror still locks its target: {w:?}");
    Ok(())
}

/// A backup target (a `file` node the job writes through its
/// copy-before-write filter) is locked while the job or the filter holds
/// it, and free again after: nobody else may write the point-in-time
/// image meanwhile. (qemu-storage-daemon 7.2 takes no lock on a backup
/// target; this is a deliberate difference.)
#[test]
fn a_backup_target_is_locked_while_in_use() -> Result<()> {
    if !have("qemu-io") {
        eprintln!("SKIPPED: qemu-io missing");
        return Ok(());
    }
    let dir = ScratchDir::new("lock-backup")?;
    let (src, tgt): (PathBuf, PathBuf) = (dir.join("src.img"), dir.join("tgt.img"));
    create_image(&src, 16 * MIB)?;
    create_image(&tgt, 16 * MIB)?;
    let d = MirrorDaemon::start(dir.path(), &src, &[])?;
    let mut q = d.qmp()?;
    let write_target = || {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw", "-c", "write 0 4k"]).arg(&tgt);
        probe(c, None, &tgt, dir.path())
    };
    let locked = |what: &str, w: Outcome| {
        ensure!(
            !w.ok && w.stderr.contains("Failed to get \"write\" lock"),
            "a writer got the target of {what}: {w:?}"
        );
        Ok(())
    };
    q.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "t0", "filename": tgt}),
    )?;
    ensure!(write_target()?.ok, "an unused node is locked");
    q.ok(
        "blockdev-backup",
        json!({"job-id": "b", "device": "disk0", "target": "t0", "sync": "none"}),
    )?;
    locked("a backup job", write_target()?)?;
    q.ok("block-job-cancel", json!({"device": "b"}))?;
    q.wait_event("JOB_STATUS_CHANGE", DEADLINE, |d| d["status"] == "null")?;
    ensure!(
        write_target()?.ok,
        "the ended backup still locks its target"
    );
    q.ok(
        "blockdev-add",
        json!({"driver": "copy-before-write", "node-name": "c0", "file": "disk0", "target": "t0"}),
    )?;
    locked("a copy-before-write node", write_target()?)?;
    q.ok("blockdev-del", json!({"node-name": "c0"}))?;
    ensure!(
        write_target()?.ok,
        "the removed filter still locks its target"
    );
    Ok(())
}
