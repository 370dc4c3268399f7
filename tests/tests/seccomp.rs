//! `--seccomp`: each mode is accepted and the daemon serves guest I/O
//! under it, with every thread confined (by default too) or, with `none`,
//! none; an unknown mode is refused. The filters themselves meet the kernel in
//! vhost-glue's `seccomp::tests` (a forbidden call kills with a message).

use anyhow::{ensure, Result};
use std::process::Command;
use tests::client::Client;
use tests::daemon::{create_image, vubd_binary, Daemon, ScratchDir};

const MIB: u64 = 1 << 20;

/// Serves a 16 MiB image with `extra` flags and checks a write, a flush
/// and a read come back right, and that the daemon is still running.
fn serves_with(tag: &str, extra: &[&str]) -> Result<()> {
    let dir = ScratchDir::new(tag)?;
    let (socket, image) = (dir.join("vubd.sock"), dir.join("disk.img"));
    create_image(&image, 16 * MIB)?;
    let mut d = Daemon::vubd(&socket, &image, extra)?;
    let mut c = Client::connect(&socket, 1, false)?;
    let data = vec![0x5a; 64 * 1024];
    c.write(4096, &data)?;
    c.flush()?;
    ensure!(c.read(4096, data.len())? == data, "read back differs");
    c.discard(0, MIB)?;
    let modes = filter_modes(d.pid())?;
    drop(c);
    ensure!(
        d.try_wait()?.is_none(),
        "vubd exited under --seccomp {extra:?}"
    );
    let want = if extra.contains(&"none") { 0 } else { 2 };
    ensure!(
        modes.iter().all(|(_, m)| *m == want),
        "--seccomp {extra:?}: threads' seccomp modes {modes:?}, want {want} (2 = filter)"
    );
    Ok(())
}

/// Each thread's name and seccomp mode (0 none, 2 filter) from /proc.
fn filter_modes(pid: u32) -> Result<Vec<(String, u32)>> {
    let mut modes = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        let mode = field("Seccomp:").and_then(|v| v.parse().ok());
        let Some(mode) = mode else {
            anyhow::bail!("no Seccomp field in {status}");
        };
        modes.push((field("Name:").unwrap_or_default(), mode));
    }
    ensure!(modes.len() >= 3, "only threads {modes:?}");
    Ok(modes)
}

#[test]
fn default_mode_serves_io() -> Result<()> {
    serves_with("seccomp-default", &[])
}

#[test]
fn sync_engine_serves_io_confined() -> Result<()> {
    serves_with("seccomp-sync", &["--aio", "sync", "--queues", "2"])
}

#[test]
fn every_mode_is_accepted() -> Result<()> {
    for mode in ["trap", "kill", "log", "none"] {
        serves_with(&format!("seccomp-{mode}"), &["--seccomp", mode])?;
    }
    Ok(())
}

#[test]
fn unknown_mode_is_refused() -> Result<()> {
    let out = Command::new(vubd_binary())
        .args(["--socket", "/nonexistent/s", "--image", "/nonexistent/i"])
        .args(["--seccomp", "lenient"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "accepted --seccomp lenient");
    ensure!(stderr.contains("kill, trap, log, none"), "{stderr}");
    Ok(())
}
