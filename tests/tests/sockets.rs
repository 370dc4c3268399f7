//! vubd's listening sockets (vhost-user, QMP, NBD over unix) and vubd as
//! an unprivileged user.
//!
//! Each socket appears at its path with exactly `--socket-mode` and
//! `--socket-group`, whatever the umask vubd was started with; what a
//! local user plants beside or at the path redirects, widens or blocks
//! nothing; a group's members can connect and other users cannot (checked
//! with real clients run by `setpriv` as other users); and vubd running as
//! `nobody` in a directory of its own serves a QEMU guest while the OS
//! keeps it from writing anywhere else. Needs root (for other users).

use anyhow::{bail, ensure, Context, Result};
use serde_json::json;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::client::Client;
use tests::daemon::{create_image, vubd_binary, Daemon, ScratchDir};
use tests::guest::Guest;
use tests::qmp_client::QmpClient;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(20);
/// `nobody` / `nogroup` on Debian.
const NOBODY: u32 = 65534;
/// A uid and gid no account uses, for the user outside the group.
const STRANGER: u32 = 65533;

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `(mode & 0o7777, gid)` of `path` itself (not of a symlink's target).
fn mode_gid(path: &Path) -> Result<(u32, u32)> {
    let m = std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok((m.permissions().mode() & 0o7777, m.gid()))
}

/// A scratch directory with an image, and where the sockets go.
struct Env {
    dir: ScratchDir,
    image: PathBuf,
    vhost: PathBuf,
    qmp: PathBuf,
    nbd: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Result<Env> {
        let dir = ScratchDir::new_in("/dev/shm", tag)?;
        let image = dir.join("disk.img");
        create_image(&image, 8 * MIB)?;
        Ok(Env {
            vhost: dir.join("vhost.sock"),
            qmp: dir.join("qmp.sock"),
            nbd: dir.join("nbd.sock"),
            image,
            dir,
        })
    }

    /// vubd on this image with QMP, started with `umask`, `extra` args.
    fn command(&self, umask: libc::mode_t, extra: &[&str]) -> Command {
        let mut cmd = Command::new(vubd_binary());
        cmd.arg("--socket").arg(&self.vhost);
        cmd.arg("--image").arg(&self.image);
        cmd.arg("--qmp").arg(&self.qmp);
        cmd.args(extra);
        // SAFETY: umask(2) is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(umask);
                Ok(())
            });
        }
        cmd
    }

    fn start(&self, umask: libc::mode_t, extra: &[&str]) -> Result<(Daemon, QmpClient)> {
        let d = Daemon::spawn(self.command(umask, extra), &self.vhost, "vubd")?;
        let mut q = QmpClient::connect(&self.qmp, T)?;
        q.ok(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": self.nbd}}}),
        )?;
        q.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "disk0"}),
        )?;
        Ok((d, q))
    }

    fn sockets(&self) -> [&Path; 3] {
        [&self.vhost, &self.qmp, &self.nbd]
    }

    /// Names in the directory other than the image and the sockets (a
    /// private directory left behind, say).
    fn strays(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.dir.path())? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if !["disk.img", "vhost.sock", "qmp.sock", "nbd.sock"].contains(&name.as_str())
                && !name.starts_with("disk.img.")
            {
                out.push(name);
            }
        }
        Ok(out)
    }
}

/// Whether a client running as `uid`/`gid` with supplementary `groups`
/// can connect to `path` (and, on the QMP socket, read the greeting).
/// Ok(false) only for "permission denied"; other failures are errors.
fn connects_as(uid: u32, gid: u32, groups: Option<u32>, path: &Path) -> Result<bool> {
    const CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit(0)
if sys.argv[1].endswith("qmp.sock"):
    assert b"QMP" in s.recv(4096)
print("CONNECTED")
"#;
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()]);
    match groups {
        Some(g) => cmd.args(["--groups", &g.to_string()]),
        None => cmd.arg("--clear-groups"),
    };
    let out = cmd
        .args(["/usr/bin/python3", "-c", CLIENT])
        .arg(path)
        .output()
        .context("cannot run setpriv")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.trim() {
        "CONNECTED" => Ok(true),
        "EACCES" => Ok(false),
        _ => bail!(
            "client as {uid}:{gid} on {}: {stdout} {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Whether nbdinfo running as `uid`/`gid` (+`groups`) reads the export's size.
fn nbdinfo_as(uid: u32, gid: u32, groups: Option<u32>, path: &Path) -> Result<bool> {
    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", &uid.to_string(), "--regid", &gid.to_string()]);
    match groups {
        Some(g) => cmd.args(["--groups", &g.to_string()]),
        None => cmd.arg("--clear-groups"),
    };
    let out = cmd
        .args(["nbdinfo", "--size"])
        .arg(format!("nbd+unix:///disk0?socket={}", path.display()))
        .output()
        .context("cannot run nbdinfo")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        ensure!(
            String::from_utf8_lossy(&out.stdout).trim() == (8 * MIB).to_string(),
            "nbdinfo read a wrong size"
        );
        return Ok(true);
    }
    ensure!(
        stderr.contains("Permission denied"),
        "nbdinfo failed otherwise: {stderr}"
    );
    Ok(false)
}

/// Every socket has exactly the requested mode and group with umask 000
/// (a socket the daemon does not restrict would be 0777) and with umask
/// 077 (one it does not widen would be 0600, no group access); the default
/// is 0600. No private directory is left behind.
#[test]
fn sockets_have_exactly_the_requested_mode_and_group_under_any_umask() -> Result<()> {
    if !is_root() {
        eprintln!("SKIPPED: needs root (to give sockets another group)");
        return Ok(());
    }
    for umask in [0o000, 0o077] {
        for (flags, want) in [
            (
                &["--socket-mode", "0660", "--socket-group", "nogroup"][..],
                (0o660, NOBODY),
            ),
            (
                &["--socket-mode", "0640", "--socket-group", "65534"][..],
                (0o640, NOBODY),
            ),
            (&[][..], (0o600, 0)),
        ] {
            let env = Env::new("sock-mode")?;
            let (_d, _q) = env.start(umask, flags)?;
            for s in env.sockets() {
                let got = mode_gid(s)?;
                ensure!(
                    got == want,
                    "umask {umask:03o} {flags:?}: {} has mode {:o} group {}, want {:o} group {}",
                    s.display(),
                    got.0,
                    got.1,
                    want.0,
                    want.1
                );
            }
            let strays = env.strays()?;
            ensure!(strays.is_empty(), "left behind: {strays:?}");
        }
    }
    Ok(())
}

/// With `--socket-mode 0660 --socket-group nogroup`, a user in the group
/// connects to each socket (and nbdinfo reads the export); the same user
/// without the group gets EACCES. With the default mode, the group grants
/// nothing.
#[test]
fn socket_group_admits_its_members_and_nobody_else() -> Result<()> {
    if !is_root() {
        eprintln!("SKIPPED: needs root (setpriv to other users)");
        return Ok(());
    }
    let env = Env::new("sock-group")?;
    let (_d, _q) = env.start(
        0o022,
        &["--socket-mode", "0660", "--socket-group", "nogroup"],
    )?;
    // The directory itself must let them through to the socket.
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755))?;
    for s in [&env.vhost, &env.qmp] {
        ensure!(
            connects_as(STRANGER, STRANGER, Some(NOBODY), s)?,
            "a member of the socket's group cannot connect to {}",
            s.display()
        );
        ensure!(
            !connects_as(STRANGER, STRANGER, None, s)?,
            "a user outside the group connected to {}",
            s.display()
        );
    }
    ensure!(
        nbdinfo_as(STRANGER, STRANGER, Some(NOBODY), &env.nbd)?,
        "a member of the group cannot read the NBD export"
    );
    ensure!(
        !nbdinfo_as(STRANGER, STRANGER, None, &env.nbd)?,
        "a user outside the group read the NBD export"
    );
    drop((_d, _q));

    let env = Env::new("sock-nogroup")?;
    let (_d, _q) = env.start(0o000, &[])?;
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o755))?;
    for s in env.sockets() {
        ensure!(
            !connects_as(NOBODY, NOBODY, Some(0), s)?,
            "0600 socket {} let another user in",
            s.display()
        );
    }
    Ok(())
}

/// Bad --socket-mode / --socket-group values are refused at the command
/// line, naming the problem.
#[test]
fn bad_socket_flags_are_refused() -> Result<()> {
    let env = Env::new("sock-flags")?;
    for (flags, says) in [
        (
            &["--socket-mode", "0666"][..],
            "lets every local user connect",
        ),
        (
            &["--socket-mode", "0602"][..],
            "lets every local user connect",
        ),
        (&["--socket-mode", "4660"][..], "only permission bits"),
        (
            &["--socket-mode", "0060"][..],
            "the owner needs read and write",
        ),
        (&["--socket-mode", "rw"][..], "not an octal mode"),
        (
            &["--socket-group", "no-such-group-here"][..],
            "no group named",
        ),
        (&["--socket-group", "4294967295"][..], "not a valid gid"),
    ] {
        let out = env
            .command(0o022, flags)
            .stdin(Stdio::null())
            .output()
            .context("run vubd")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains(says),
            "{flags:?}: status {}, stderr {stderr}",
            out.status
        );
        ensure!(!env.vhost.exists(), "{flags:?}: a socket was created");
    }
    Ok(())
}

/// What a local user with write access to the socket directory plants:
/// a symlink at the final path (to a stale socket or to a path elsewhere)
/// is refused and neither it nor its target changes; a directory at the
/// temporary name the QMP socket used to be bound under (`qmp.sock.tmp-PID`,
/// PID known before vubd runs: a shell execs it) does not stop vubd.
#[test]
fn planted_paths_do_not_redirect_widen_or_block() -> Result<()> {
    let env = Env::new("sock-plant")?;
    let victim = ScratchDir::new_in("/dev/shm", "sock-victim")?;

    // A stale socket elsewhere, 0600; the symlink at the final path points to it.
    let target = victim.join("their.sock");
    drop(std::os::unix::net::UnixListener::bind(&target)?);
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))?;
    let absent = victim.join("absent.sock");
    for (plant_at, points_to) in [
        (&env.vhost, &target),
        (&env.qmp, &target),
        (&env.qmp, &absent),
    ] {
        std::os::unix::fs::symlink(points_to, plant_at)?;
        let out = env.command(0o000, &[]).stdin(Stdio::null()).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains("exists and is not a socket"),
            "symlink at {}: status {}, stderr {stderr}",
            plant_at.display(),
            out.status
        );
        ensure!(
            std::fs::read_link(plant_at)? == *points_to,
            "the planted symlink was changed"
        );
        ensure!(
            mode_gid(&target)?.0 == 0o600,
            "the symlink's target was chmodded"
        );
        ensure!(
            !absent.exists(),
            "something was created through the symlink"
        );
        std::fs::remove_file(plant_at)?;
        let _ = std::fs::remove_file(&env.vhost);
    }

    // The old temporary name, as a non-empty directory vubd cannot remove.
    let go = env.dir.join("go");
    let cmd = env.command(0o000, &[]);
    let vubd = cmd.get_program().to_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(r#"while [ ! -e "$0" ]; do sleep 0.02; done; exec "$@""#)
        .arg(&go)
        .arg(vubd)
        .args(args);
    // SAFETY: as in Env::command.
    unsafe {
        sh.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let child = sh.stdin(Stdio::null()).spawn()?;
    let planted = env.dir.join(&format!("qmp.sock.tmp-{}", child.id()));
    std::fs::create_dir(&planted)?;
    std::fs::write(planted.join("keep"), b"x")?;
    std::fs::write(&go, b"")?;
    let mut d = Daemon::adopt(child, &env.vhost, "vubd");
    let start = Instant::now();
    while !env.qmp.exists() {
        if let Some(status) = d.try_wait()? {
            bail!("vubd exited ({status}): a planted directory blocked its QMP socket");
        }
        ensure!(start.elapsed() < T, "no QMP socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    QmpClient::connect(&env.qmp, T)?.ok("query-version", json!({}))?;
    ensure!(mode_gid(&env.qmp)?.0 == 0o600, "QMP socket mode changed");
    ensure!(
        planted.join("keep").exists(),
        "the planted directory was changed"
    );
    Ok(())
}

/// A socket path of the longest length bind(2) takes (107 bytes) works
/// for the vhost-user and QMP sockets with their mode: the temporary path
/// must not be longer than the final one, nor the vhost-user relay's path
/// in a private directory beside the socket.
#[test]
fn longest_socket_paths_work() -> Result<()> {
    let env = Env::new("sock-long")?;
    let pad = |tag: &str| -> PathBuf {
        let base = env.dir.path().display().to_string();
        let fill = 107 - base.len() - 1 - tag.len();
        env.dir.join(&format!("{tag}{}", "x".repeat(fill)))
    };
    let qmp = pad("q");
    // The vhost-user socket has a short name in a long directory: the
    // relay's private directory goes beside it.
    let deep = pad("d");
    let deep = deep.with_file_name(&deep.file_name().context("setup")?.to_string_lossy()[2..]);
    std::fs::create_dir(&deep)?;
    let vhost = deep.join("v");
    ensure!(vhost.as_os_str().len() == 107, "setup: path length");
    let mut cmd = Command::new(vubd_binary());
    cmd.arg("--socket")
        .arg(&vhost)
        .arg("--image")
        .arg(&env.image);
    cmd.arg("--qmp").arg(&qmp);
    // libblkio's memory is not sealed.
    cmd.arg("--allow-unsealed-memory");
    let _d = Daemon::spawn(cmd, &vhost, "vubd")?;
    QmpClient::connect(&qmp, T)?.ok("query-version", json!({}))?;
    for s in [&vhost, &qmp] {
        ensure!(mode_gid(s)?.0 == 0o600, "{} mode", s.display());
    }
    // A frontend's session goes through a relay socket in a private
    // directory beside the vhost-user socket, whose path is longer still.
    let mut client = Client::connect(&vhost, 1, false)?;
    client.write(0, &[0x5a; 4096])?;
    ensure!(client.read(0, 4096)? == vec![0x5a; 4096], "read back");
    let relays: Vec<_> = std::fs::read_dir(&deep)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".vubd-"))
        .map(|e| e.path())
        .collect();
    ensure!(relays.is_empty(), "relay directories left: {relays:?}");
    Ok(())
}

/// vubd as `nobody` (uid/gid 65534, no other groups), owning only its
/// image directory, serves a QEMU (root) guest through a 0660 socket of
/// group nogroup: the guest writes and reads back its disk and the image
/// file holds the data. The OS keeps that vubd from writing elsewhere: a
/// mirror onto a root-owned directory fails with EACCES, and none onto
/// /root is created.
#[test]
fn unprivileged_vubd_serves_a_guest() -> Result<()> {
    if !is_root() {
        eprintln!("SKIPPED: needs root (to run vubd as another user)");
        return Ok(());
    }
    let env = Env::new("sock-unpriv")?;
    let chown = |p: &Path| std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY));
    chown(env.dir.path())?;
    chown(&env.image)?;
    std::fs::set_permissions(env.dir.path(), std::fs::Permissions::from_mode(0o700))?;
    // A directory beside the image that vubd may read but not write.
    let root_only = env.dir.join("root-only");
    std::fs::create_dir(&root_only)?;
    std::fs::set_permissions(&root_only, std::fs::Permissions::from_mode(0o755))?;

    let mut cmd = Command::new("setpriv");
    cmd.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"]);
    cmd.arg(vubd_binary());
    cmd.arg("--socket")
        .arg(&env.vhost)
        .arg("--image")
        .arg(&env.image);
    cmd.arg("--qmp").arg(&env.qmp);
    cmd.args(["--socket-mode", "0660", "--socket-group", "nogroup"]);
    let mut d = Daemon::spawn(cmd, &env.vhost, "vubd")?;
    let uid = std::fs::read_to_string(format!("/proc/{}/status", d.pid()))?
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .map(str::to_owned)
        .unwrap_or_default();
    ensure!(
        uid.split_whitespace().skip(1).all(|u| u == "65534"),
        "vubd is not running as nobody: {uid}"
    );
    for s in [&env.vhost, &env.qmp] {
        let m = std::fs::symlink_metadata(s)?;
        ensure!(
            (m.uid(), m.gid(), m.permissions().mode() & 0o777) == (NOBODY, NOBODY, 0o660),
            "{}: owner {} group {} mode {:o}",
            s.display(),
            m.uid(),
            m.gid(),
            m.permissions().mode() & 0o777
        );
    }

    let mut q = QmpClient::connect(&env.qmp, T)?;
    let refused = q.err(
        "drive-mirror",
        json!({"device": "disk0", "target": root_only.join("x"), "sync": "full", "format": "raw", "job-id": "m"}),
    )?;
    ensure!(
        refused.desc.contains("Permission denied"),
        "mirror into a root-owned directory: {refused}"
    );
    ensure!(
        !root_only.join("x").exists(),
        "vubd created a file it may not"
    );
    let outside = Path::new("/root").join(format!("vubd-sock-test-{}", std::process::id()));
    q.err(
        "drive-mirror",
        json!({"device": "disk0", "target": outside, "sync": "full", "format": "raw", "job-id": "m"}),
    )?;
    ensure!(!outside.exists(), "vubd created {}", outside.display());

    let mut blob = vec![0u8; 2 * MIB as usize];
    tests::rng::Rng(7).fill(&mut blob);
    let script = r#"
dd if=/data/blob of=/dev/vda bs=1M seek=1 conv=fsync 2>/dev/null || fail "dd write"
dd if=/dev/vda bs=1M skip=1 count=2 iflag=direct 2>/dev/null | cmp -s - /data/blob || fail "read back differs"
result readback ok
"#;
    let out = Guest::new("unprivileged_vubd", &env.vhost, script)
        .file("data/blob", blob.clone())
        .timeout(Duration::from_secs(120))
        .run()?;
    out.ensure_clean()?;
    ensure!(out.get("readback")? == "ok", "guest did not read back");
    if let Some(status) = d.try_wait()? {
        bail!("vubd exited during the guest: {status}");
    }
    let image = std::fs::read(&env.image)?;
    ensure!(
        image[MIB as usize..3 * MIB as usize] == blob[..],
        "the image file does not hold what the guest wrote"
    );
    ensure!(
        image[..MIB as usize].iter().all(|&b| b == 0),
        "the guest's write landed elsewhere"
    );
    Ok(())
}
