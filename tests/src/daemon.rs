//! Starting and stopping the daemons under test: `vubd` itself and
//! qemu-storage-daemon (qsd), the reference vhost-user-blk backend.

use anyhow::{bail, Context, Result};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of the `vubd` binary built by this workspace (release if present and
/// newer, else debug), overridable with `VUBD_BIN`.
pub fn vubd_binary() -> PathBuf {
    if let Ok(path) = std::env::var("VUBD_BIN") {
        return PathBuf::from(path);
    }
    let target = workspace_root().join("target");
    let candidates = [target.join("release/vubd"), target.join("debug/vubd")];
    let newest = candidates
        .iter()
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p.clone())))
        .max_by_key(|(mtime, _)| *mtime);
    newest
        .map(|(_, p)| p)
        .unwrap_or_else(|| candidates[0].clone())
}

/// The repository root (parent of the `tests` crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A fresh scratch directory under `base` (e.g. /tmp or /dev/shm), removed on drop.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates a unique directory under `base`, named after `tag`.
    pub fn new_in(base: impl AsRef<Path>, tag: &str) -> Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = base
            .as_ref()
            .join(format!("vubd-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(ScratchDir { path })
    }

    /// Creates a unique directory under /tmp.
    pub fn new(tag: &str) -> Result<Self> {
        Self::new_in(std::env::temp_dir(), tag)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Creates (or truncates) a sparse image file of `size` bytes.
pub fn create_image(path: &Path, size: u64) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    file.set_len(size)?;
    Ok(())
}

/// A running daemon process serving a vhost-user socket; killed on drop.
pub struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
    name: &'static str,
}

impl Daemon {
    /// Starts `vubd --socket SOCKET --image IMAGE --allow-unsealed-memory
    /// EXTRA...` and waits until its socket accepts connections. The flag is
    /// there for the tests' libblkio clients: libblkio creates its memfds
    /// without MFD_ALLOW_SEALING, so they can never be sealed.
    pub fn vubd(socket: &Path, image: &Path, extra: &[&str]) -> Result<Daemon> {
        Self::vubd_in(None, socket, image, extra)
    }

    /// Starts `vubd --socket SOCKET --image IMAGE EXTRA...`: by default it
    /// serves only memory sealed against shrinking (QEMU's memfds, the
    /// hostile frontend's).
    pub fn vubd_sealed_only(socket: &Path, image: &Path, extra: &[&str]) -> Result<Daemon> {
        let mut cmd = Command::new(vubd_binary());
        cmd.arg("--socket").arg(socket).arg("--image").arg(image);
        cmd.args(extra);
        Self::spawn(cmd, socket, "vubd")
    }

    /// As [`Daemon::vubd`] (unsealed memory allowed), inside network
    /// namespace `netns` if given.
    pub fn vubd_in(
        netns: Option<&str>,
        socket: &Path,
        image: &Path,
        extra: &[&str],
    ) -> Result<Daemon> {
        let mut cmd = Command::new(vubd_binary());
        cmd.arg("--socket").arg(socket).arg("--image").arg(image);
        cmd.arg("--allow-unsealed-memory").args(extra);
        Self::spawn_in(netns, cmd, socket, "vubd")
    }

    /// Starts qemu-storage-daemon exporting IMAGE over vhost-user-blk at SOCKET
    /// with `num_queues` queues; `direct` selects O_DIRECT (cache.direct=on).
    pub fn qsd(socket: &Path, image: &Path, num_queues: u16, direct: bool) -> Result<Daemon> {
        let mut cmd = Command::new("qemu-storage-daemon");
        let direct = if direct { "on" } else { "off" };
        cmd.arg("--blockdev").arg(format!(
            "driver=file,node-name=f0,filename={},cache.direct={direct},aio=io_uring,discard=unmap",
            image.display()
        ));
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={num_queues}",
            socket.display()
        ));
        Self::spawn(cmd, socket, "qemu-storage-daemon")
    }

    /// Starts qemu-storage-daemon 7.2 as the reference peer of the QMP and
    /// NBD tests: IMAGE as the `file` node `disk0` (`file_opts`, e.g.
    /// `discard=unmap`, appended to its options), exported over
    /// vhost-user-blk at `vhost` (writable or not), and a QMP monitor at
    /// `qmp`. Returns once both sockets accept connections.
    pub fn qsd_with_monitor(
        vhost: &Path,
        qmp: &Path,
        image: &Path,
        file_opts: &str,
        writable: bool,
    ) -> Result<Daemon> {
        Self::qsd_with_monitor_in(None, vhost, qmp, image, file_opts, writable)
    }

    /// As [`Daemon::qsd_with_monitor`], inside network namespace `netns`
    /// if given.
    pub fn qsd_with_monitor_in(
        netns: Option<&str>,
        vhost: &Path,
        qmp: &Path,
        image: &Path,
        file_opts: &str,
        writable: bool,
    ) -> Result<Daemon> {
        let mut node = format!("driver=file,node-name=disk0,filename={}", image.display());
        if !file_opts.is_empty() {
            node = format!("{node},{file_opts}");
        }
        let writable = if writable { "on" } else { "off" };
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(node)
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=disk0,addr.type=unix,addr.path={},writable={writable}",
                vhost.display()
            ))
            .arg("--chardev")
            .arg(format!("socket,id=m,path={},server=on,wait=off", qmp.display()))
            .arg("--monitor")
            .arg("chardev=m");
        let daemon = Self::spawn_in(netns, cmd, vhost, "qemu-storage-daemon")?;
        crate::qmp_client::wait_for_socket(qmp, Duration::from_secs(30))?;
        Ok(daemon)
    }

    /// Starts any command that will listen on `socket`, and waits for it.
    ///
    /// qemu-storage-daemon is told to write a pid file and is ready when it
    /// has: it writes the file after creating its exports and monitors. It is
    /// not probed with a connection, because its socket servers take one
    /// client at a time and may close the next one if it arrives before they
    /// have noticed the probe leave.
    pub fn spawn(cmd: Command, socket: &Path, name: &'static str) -> Result<Daemon> {
        Self::spawn_in(None, cmd, socket, name)
    }

    /// As [`Daemon::spawn`], inside network namespace `netns` if given
    /// (`ip netns exec` execs the command, so the pid is the daemon's).
    /// Unix sockets are files and work across namespaces.
    pub fn spawn_in(
        netns: Option<&str>,
        mut cmd: Command,
        socket: &Path,
        name: &'static str,
    ) -> Result<Daemon> {
        let _ = std::fs::remove_file(socket);
        let pid_file = (cmd.get_program() == "qemu-storage-daemon").then(|| {
            let path = socket.with_extension("pid");
            let _ = std::fs::remove_file(&path);
            cmd.arg("--pidfile").arg(&path);
            path
        });
        if let Some(ns) = netns {
            let mut wrapped = Command::new("ip");
            wrapped
                .args(["netns", "exec", ns])
                .arg(cmd.get_program())
                .args(cmd.get_args());
            cmd = wrapped;
        }
        cmd.stdin(Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        let mut daemon = Daemon {
            child: Some(child),
            socket: socket.to_path_buf(),
            name,
        };
        daemon.wait_ready(pid_file.as_deref(), Duration::from_secs(20))?;
        Ok(daemon)
    }

    /// Takes charge of a daemon started by the caller (say through a
    /// wrapper that execs it): killed on drop; readiness is the caller's.
    pub fn adopt(child: Child, socket: &Path, name: &'static str) -> Daemon {
        Daemon {
            child: Some(child),
            socket: socket.to_path_buf(),
            name,
        }
    }

    /// Waits until `pid_file` exists, or without one until the socket
    /// accepts a connection.
    fn wait_ready(&mut self, pid_file: Option<&Path>, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait()? {
                bail!("{} exited before listening: {status}", self.name);
            }
            let ready = match pid_file {
                Some(pid_file) => pid_file.exists(),
                // vubd takes a client that connects and leaves in its stride.
                None => self.socket.exists() && UnixStream::connect(&self.socket).is_ok(),
            };
            if ready {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} did not listen on {} in time",
                    self.name,
                    self.socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Returns the exit status if the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => bail!("{} already reaped", self.name),
        }
    }

    /// Sends `signal` (e.g. libc::SIGTERM) to the daemon.
    pub fn signal(&self, signal: i32) -> Result<()> {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        if rc != 0 {
            bail!(
                "kill({}, {signal}): {}",
                self.pid(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Waits up to `timeout` for the daemon to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if start.elapsed() > timeout {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the daemon with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// CPU time (user + system) the daemon process has used so far, from /proc.
    pub fn cpu_time(&self) -> Result<Duration> {
        process_cpu_time(self.pid())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The files process `pid` holds open (the targets of `/proc/PID/fd`).
pub fn open_files(pid: u32) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        // An fd closed while we look has no link left to read.
        if let Ok(target) = std::fs::read_link(entry?.path()) {
            files.push(target);
        }
    }
    Ok(files)
}

/// Waits until process `pid` holds no open file that `watched` selects
/// (a daemon closes a file when its last user lets go, e.g. a queue
/// thread going idle); gives up after `timeout`, a bound against hangs.
pub fn wait_files_closed(
    pid: u32,
    timeout: Duration,
    watched: impl Fn(&Path) -> bool,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let open: Vec<PathBuf> = open_files(pid)?
            .into_iter()
            .filter(|f| watched(f))
            .collect();
        if open.is_empty() {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("still open after {timeout:?}: {open:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// CPU time (utime + stime) of process `pid`, all threads, from /proc/PID/stat.
pub fn process_cpu_time(pid: u32) -> Result<Duration> {
    let (user, system) = process_cpu_times(pid)?;
    Ok(user + system)
}

/// User and system CPU time of process `pid`, all threads, from /proc/PID/stat.
pub fn process_cpu_times(pid: u32) -> Result<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces; fields resume after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, utime field 14, stime field 15 (1-based in proc(5)).
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let to_duration = |t: u64| Duration::from_nanos(t * 1_000_000_000 / ticks);
    Ok((to_duration(utime), to_duration(stime)))
}
