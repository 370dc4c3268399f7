//! vubd's command line and start-up environment: bad options, bad images
//! and bad socket paths are refused with a clear error and a non-zero exit
//! (never a daemon that starts anyway, never a hang); good ones start, with
//! the socket at mode 0600; a stale socket is replaced, a live one is not.

use anyhow::{bail, ensure, Context, Result};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tests::client::{Client, ConnectOptions};
use tests::daemon::{create_image, vubd_binary, Daemon, ScratchDir};

const MIB: u64 = 1 << 20;

/// How long a refused start may take before we call it a hang.
const EXIT_DEADLINE: Duration = Duration::from_secs(10);

/// What a vubd run that should fail did.
struct Outcome {
    /// None: still running at the deadline (killed).
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

/// Runs vubd with `args`, waits up to EXIT_DEADLINE, kills it if it is
/// still running, and collects its output.
fn run_vubd(args: &[&str]) -> Result<Outcome> {
    let mut child = Command::new(vubd_binary())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {}", vubd_binary().display()))?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > EXIT_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut stdout)?;
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr)?;
    }
    Ok(Outcome {
        status,
        stdout,
        stderr,
    })
}

/// Asserts that vubd refused to start: non-zero exit in time, and one clear
/// error line on stderr that mentions every word of `mentions`
/// (case-insensitive).
fn assert_refused(what: &str, args: &[&str], mentions: &[&str]) -> Result<String> {
    let out = run_vubd(args)?;
    let Some(status) = out.status else {
        bail!(
            "{what}: vubd was still running after {EXIT_DEADLINE:?} (args {args:?}); stderr: {}",
            out.stderr
        );
    };
    ensure!(
        !status.success(),
        "{what}: vubd exited successfully (args {args:?})"
    );
    ensure!(
        status.code().is_some(),
        "{what}: vubd died from a signal ({status}); stderr: {}",
        out.stderr
    );
    // One error line; clap may continue it with indented lines (the list
    // of missing arguments) and add its "Usage:" / "For more information"
    // hints, which are tolerated. Anything else (backtraces, panics, log
    // lines) is not.
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .collect();
    let heads = lines.iter().filter(|l| !l.starts_with(' ')).count();
    ensure!(
        heads == 1 && lines.first().is_some_and(|l| !l.starts_with(' ')),
        "{what}: expected one error line, got {heads} (args {args:?}):\n{}",
        out.stderr
    );
    let line = lines.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ");
    ensure!(
        !line.contains("panicked"),
        "{what}: vubd panicked instead of reporting an error: {line}"
    );
    // An error chain printed twice ("...: ENOENT: ENOENT") reads as noise.
    let parts: Vec<&str> = line.split(": ").collect();
    ensure!(
        !parts.windows(2).any(|w| w[0] == w[1]),
        "{what}: the error repeats itself: {line}"
    );
    let lower = line.to_lowercase();
    for m in mentions {
        ensure!(
            lower.contains(&m.to_lowercase()),
            "{what}: error line does not mention {m:?}: {line}"
        );
    }
    eprintln!("{what}: {line}");
    Ok(line)
}

/// A scratch directory with an 8 MiB image and a socket path in it.
struct Env {
    dir: ScratchDir,
}

impl Env {
    fn new(tag: &str) -> Result<Env> {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = ScratchDir::new(tag)?;
        create_image(&dir.join("disk.img"), 8 * MIB)?;
        Ok(Env { dir })
    }

    fn image(&self) -> String {
        self.dir.join("disk.img").display().to_string()
    }

    fn socket(&self) -> String {
        self.dir.join("vhost.sock").display().to_string()
    }

    /// Arguments for a valid start plus `extra`.
    fn args<'a>(&'a self, image: &'a str, socket: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        // libblkio's memfds cannot be sealed (see `Daemon::vubd`).
        let mut v = vec![
            "--socket",
            socket,
            "--image",
            image,
            "--allow-unsealed-memory",
        ];
        v.extend_from_slice(extra);
        v
    }
}

/// Connects one client and checks the capacity, proving the daemon serves.
fn check_serves(socket: &Path, capacity: u64) -> Result<()> {
    let c = Client::connect_with(
        socket,
        &ConnectOptions {
            timeout: Duration::from_secs(15),
            ..ConnectOptions::default()
        },
    )?;
    ensure!(
        c.capacity() == capacity,
        "capacity {} != {capacity}",
        c.capacity()
    );
    Ok(())
}

#[test]
fn help_works() -> Result<()> {
    let out = run_vubd(&["--help"])?;
    let status = out.status.context("vubd --help did not exit")?;
    ensure!(
        status.success(),
        "vubd --help exited with {status}: {}",
        out.stderr
    );
    for opt in [
        "--socket",
        "--image",
        "--queues",
        "--queue-size",
        "--readonly",
        "--direct",
        "--serial",
        "--logical-block-size",
        "--poll-us",
    ] {
        ensure!(
            out.stdout.contains(opt),
            "--help does not document {opt}:\n{}",
            out.stdout
        );
    }
    Ok(())
}

#[test]
fn missing_required_options() -> Result<()> {
    let env = Env::new("cli-req")?;
    let (img, sock) = (env.image(), env.socket());
    assert_refused("no options", &[], &[])?;
    assert_refused("no --image", &["--socket", &sock], &["image"])?;
    assert_refused("no --socket", &["--image", &img], &["socket"])?;
    assert_refused(
        "unknown option",
        &env.args(&img, &sock, &["--frobnicate"]),
        &["frobnicate"],
    )?;
    ensure!(
        !Path::new(&sock).exists(),
        "a refused start left a socket behind"
    );
    Ok(())
}

#[test]
fn missing_image_is_refused() -> Result<()> {
    let env = Env::new("cli-noimg")?;
    let sock = env.socket();
    let missing = env.dir.join("no-such.img").display().to_string();
    assert_refused(
        "missing image",
        &env.args(&missing, &sock, &[]),
        &["no-such.img"],
    )?;
    ensure!(
        !Path::new(&sock).exists(),
        "a refused start left a socket behind"
    );
    // A directory is not an image either.
    let dir = env.dir.path().display().to_string();
    assert_refused("image is a directory", &env.args(&dir, &sock, &[]), &[])?;
    Ok(())
}

#[test]
fn image_size_must_be_a_multiple_of_the_block_size() -> Result<()> {
    let env = Env::new("cli-size")?;
    let sock = env.socket();
    let odd = env.dir.join("odd.img");
    create_image(&odd, MIB + 100)?;
    let odd_s = odd.display().to_string();
    assert_refused("size 1 MiB + 100", &env.args(&odd_s, &sock, &[]), &[])?;

    let half = env.dir.join("half.img");
    create_image(&half, MIB + 512)?;
    let half_s = half.display().to_string();
    assert_refused(
        "size 1 MiB + 512 with 4096-byte blocks",
        &env.args(&half_s, &sock, &["--logical-block-size", "4096"]),
        &[],
    )?;

    // Positive control: the same 1 MiB + 512 image is fine with 512-byte blocks.
    let _d = Daemon::vubd(Path::new(&sock), &half, &[])?;
    check_serves(Path::new(&sock), MIB + 512)
}

#[test]
fn bad_queue_counts_are_refused() -> Result<()> {
    let env = Env::new("cli-queues")?;
    let (img, sock) = (env.image(), env.socket());
    for bad in ["0", "65536", "1000000", "-1", "two", ""] {
        assert_refused(
            &format!("--queues {bad:?}"),
            &env.args(&img, &sock, &[&format!("--queues={bad}")]),
            &["queues"],
        )?;
    }
    // Positive control.
    let _d = Daemon::vubd(Path::new(&sock), Path::new(&img), &["--queues", "4"])?;
    let c = Client::connect(Path::new(&sock), 4, false)?;
    ensure!(
        c.info().max_queues == 4,
        "--queues 4 gives {} queues",
        c.info().max_queues
    );
    Ok(())
}

#[test]
fn bad_thread_counts_are_refused() -> Result<()> {
    let env = Env::new("cli-threads")?;
    let (img, sock) = (env.image(), env.socket());
    for bad in ["0", "65", "-1", "many"] {
        assert_refused(
            &format!("--threads {bad:?}"),
            &env.args(&img, &sock, &["--queues", "4", &format!("--threads={bad}")]),
            &["threads"],
        )?;
    }
    assert_refused(
        "more threads than queues",
        &env.args(&img, &sock, &["--queues", "2", "--threads", "3"]),
        &["--threads 3", "--queues 2"],
    )?;
    // Positive control: two queues on one thread.
    let _d = Daemon::vubd(
        Path::new(&sock),
        Path::new(&img),
        &["--queues", "2", "--threads", "1"],
    )?;
    let c = Client::connect(Path::new(&sock), 2, false)?;
    ensure!(
        c.info().max_queues == 2,
        "--queues 2 gives {} queues",
        c.info().max_queues
    );
    Ok(())
}

#[test]
fn bad_queue_sizes_are_refused() -> Result<()> {
    let env = Env::new("cli-qsize")?;
    let (img, sock) = (env.image(), env.socket());
    for bad in ["0", "100", "1000", "2048", "65536", "-256", "big"] {
        assert_refused(
            &format!("--queue-size {bad:?}"),
            &env.args(&img, &sock, &[&format!("--queue-size={bad}")]),
            &["queue-size"],
        )?;
    }
    // Positive control: the largest allowed size.
    let _d = Daemon::vubd(Path::new(&sock), Path::new(&img), &["--queue-size", "1024"])?;
    check_serves(Path::new(&sock), 8 * MIB)
}

#[test]
fn bad_logical_block_sizes_are_refused() -> Result<()> {
    let env = Env::new("cli-lbs")?;
    let (img, sock) = (env.image(), env.socket());
    for bad in ["0", "256", "1000", "1024", "2048", "8192", "x"] {
        assert_refused(
            &format!("--logical-block-size {bad:?}"),
            &env.args(&img, &sock, &[&format!("--logical-block-size={bad}")]),
            &["logical-block-size"],
        )?;
    }
    let _d = Daemon::vubd(
        Path::new(&sock),
        Path::new(&img),
        &["--logical-block-size", "4096"],
    )?;
    check_serves(Path::new(&sock), 8 * MIB)
}

#[test]
fn unusable_socket_path_is_refused() -> Result<()> {
    let env = Env::new("cli-sockdir")?;
    let img = env.image();
    let sock = env.dir.join("missing-dir/vhost.sock").display().to_string();
    assert_refused(
        "socket in a missing directory",
        &env.args(&img, &sock, &[]),
        &["missing-dir"],
    )?;
    // A path longer than sun_path (108 bytes) cannot be bound.
    let long = env
        .dir
        .join(&format!("{}.sock", "x".repeat(120)))
        .display()
        .to_string();
    assert_refused("socket path too long", &env.args(&img, &long, &[]), &[])?;
    Ok(())
}

#[test]
fn live_socket_is_not_stolen() -> Result<()> {
    let env = Env::new("cli-live")?;
    let (img, sock) = (env.image(), env.socket());
    // Another process (here: this one) listens on the socket.
    let listener = UnixListener::bind(&sock)?;
    assert_refused(
        "socket held by a listener",
        &env.args(&img, &sock, &[]),
        &[],
    )?;
    let meta = std::fs::symlink_metadata(&sock).context("the live socket was removed")?;
    ensure!(meta.file_type().is_socket(), "the live socket was replaced");
    // Still ours: a connection reaches our listener.
    let _probe = std::os::unix::net::UnixStream::connect(&sock)
        .context("the holder's socket no longer accepts")?;
    listener.set_nonblocking(true)?;
    ensure!(
        listener.accept().is_ok(),
        "our listener did not get the connection"
    );
    drop(listener);
    std::fs::remove_file(&sock)?;

    // A second vubd on the socket of a running one is refused too (with an
    // image of its own: the first one's is locked), and the first keeps
    // serving.
    let _first = Daemon::vubd(Path::new(&sock), Path::new(&img), &[])?;
    let other = env.dir.join("other.img");
    create_image(&other, 8 * MIB)?;
    let other = other.display().to_string();
    let out = assert_refused(
        "socket held by another vubd",
        &env.args(&other, &sock, &[]),
        &[],
    )?;
    ensure!(!out.contains("lock"), "refused for its image: {out}");
    check_serves(Path::new(&sock), 8 * MIB)
}

#[test]
fn stale_socket_is_replaced() -> Result<()> {
    let env = Env::new("cli-stale")?;
    let (img, sock) = (env.image(), env.socket());
    // A socket file whose listener is gone (a crashed daemon's leftover).
    drop(UnixListener::bind(&sock)?);
    ensure!(
        Path::new(&sock).exists(),
        "setup: stale socket file missing"
    );
    // Not Daemon::vubd: it removes the socket file before starting.
    let mut cmd = Command::new(vubd_binary());
    cmd.args(env.args(&img, &sock, &[]));
    let mut child = cmd.stdin(Stdio::null()).spawn()?;
    let served = (|| -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("vubd exited ({status}) instead of replacing the stale socket");
            }
            if std::os::unix::net::UnixStream::connect(&sock).is_ok() {
                break;
            }
            ensure!(
                start.elapsed() < EXIT_DEADLINE,
                "vubd did not listen on the stale path"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        check_serves(Path::new(&sock), 8 * MIB)
    })();
    let _ = child.kill();
    let _ = child.wait();
    served
}

#[test]
fn non_socket_file_at_socket_path_is_kept() -> Result<()> {
    let env = Env::new("cli-regfile")?;
    let (img, sock) = (env.image(), env.socket());
    std::fs::write(&sock, b"precious")?;
    assert_refused(
        "regular file at the socket path",
        &env.args(&img, &sock, &[]),
        &[],
    )?;
    ensure!(
        std::fs::read(&sock).ok().as_deref() == Some(&b"precious"[..]),
        "vubd removed or changed a regular file at the socket path"
    );
    Ok(())
}

#[test]
fn socket_mode_is_0600() -> Result<()> {
    let env = Env::new("cli-mode")?;
    let (img, sock) = (env.image(), env.socket());
    // With umask 0 a socket that vubd does not restrict would be 0777.
    let mut cmd = Command::new(vubd_binary());
    cmd.args(env.args(&img, &sock, &[]));
    // SAFETY: umask(2) is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let _d = Daemon::spawn(cmd, Path::new(&sock), "vubd")?;
    let meta = std::fs::symlink_metadata(&sock)?;
    ensure!(meta.file_type().is_socket(), "{sock} is not a socket");
    let mode = meta.permissions().mode() & 0o7777;
    ensure!(mode == 0o600, "socket mode is {mode:o}, want 600");
    Ok(())
}

/// With --direct on a disk of 4096-byte logical blocks (a 4Kn loop
/// device), a smaller --logical-block-size would let the guest issue
/// requests O_DIRECT refuses: vubd says so at start; 4096 serves.
#[test]
fn direct_on_a_4kn_disk_needs_its_block_size() -> Result<()> {
    let env = Env::new("cli-4kn")?;
    let backing = env.dir.join("backing.img");
    create_image(&backing, 4 * MIB)?;
    let out = Command::new("losetup")
        .args(["--sector-size", "4096", "-f", "--show"])
        .arg(&backing)
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => {
            eprintln!("SKIPPED: cannot set up a loop device (needs root and losetup)");
            return Ok(());
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let sock = env.socket();
    assert_refused(
        "--direct on a 4Kn disk with 512-byte blocks",
        &env.args(&dev, &sock, &["--direct"]),
        &["--logical-block-size 4096"],
    )?;
    let daemon = Daemon::vubd(
        Path::new(&sock),
        Path::new(&dev),
        &["--direct", "--logical-block-size", "4096"],
    )?;
    check_serves(daemon.socket(), 4 * MIB)
}
