//! `--landlock`: both modes serve guest I/O, the default one logs the
//! Landlock ABI the kernel enforces, an unknown mode is refused. The
//! ruleset itself meets the kernel in vhost-glue's `landlock::tests`
//! (files beside the image writable, others out of reach even for root).

use anyhow::{ensure, Context, Result};
use std::process::{Command, Stdio};
use tests::client::Client;
use tests::daemon::{create_image, vubd_binary, Daemon, ScratchDir};

const MIB: u64 = 1 << 20;

/// Serves an image with `extra` flags through a write, a flush and a read
/// (the session's relay socket is made beside --socket); returns stderr.
fn serves_with(tag: &str, extra: &[&str]) -> Result<String> {
    let dir = ScratchDir::new(tag)?;
    let (socket, image, log) = (
        dir.join("vubd.sock"),
        dir.join("disk.img"),
        dir.join("stderr"),
    );
    create_image(&image, 16 * MIB)?;
    let mut cmd = Command::new(vubd_binary());
    cmd.arg("--socket").arg(&socket).arg("--image").arg(&image);
    cmd.arg("--allow-unsealed-memory").args(extra);
    cmd.env("RUST_LOG", "info");
    cmd.stderr(Stdio::from(std::fs::File::create(&log)?));
    let mut d = Daemon::spawn(cmd, &socket, "vubd")?;
    let mut c = Client::connect(&socket, 1, false)?;
    let data = vec![0x5a; 64 * 1024];
    c.write(4096, &data)?;
    c.flush()?;
    ensure!(c.read(4096, data.len())? == data, "read back differs");
    drop(c);
    ensure!(d.try_wait()?.is_none(), "vubd exited under {extra:?}");
    std::fs::read_to_string(&log).context("vubd's stderr")
}

/// Whether this kernel runs the Landlock LSM: it tells its ABI version.
fn kernel_has_landlock() -> bool {
    const VERSION: libc::c_long = 1; // LANDLOCK_CREATE_RULESET_VERSION
                                     // SAFETY: with this flag the call only returns a number.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            VERSION,
        )
    };
    abi > 0
}

#[test]
fn default_mode_confines_and_serves_io() -> Result<()> {
    let log = serves_with("landlock-default", &[])?;
    if !kernel_has_landlock() {
        eprintln!("SKIPPED: no Landlock in this kernel");
        return Ok(());
    }
    ensure!(log.contains("Landlock V"), "no enforced ABI logged:\n{log}");
    ensure!(!log.contains("NotEnforced"), "not enforced:\n{log}");
    Ok(())
}

#[test]
fn none_serves_io_unconfined() -> Result<()> {
    let log = serves_with("landlock-none", &["--landlock", "none"])?;
    ensure!(!log.contains("Landlock"), "confined under none:\n{log}");
    Ok(())
}

#[test]
fn unknown_mode_is_refused() -> Result<()> {
    let out = Command::new(vubd_binary())
        .args(["--socket", "/nonexistent/s", "--image", "/nonexistent/i"])
        .args(["--landlock", "lenient"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "accepted --landlock lenient");
    ensure!(stderr.contains("enforce, none"), "{stderr}");
    Ok(())
}
