//! The QEMU guest runner: boots a small Linux guest under TCG with a
//! vhost-user-blk disk, runs a shell script inside it and collects what the
//! script reports on the serial console.
//!
//! The guest is the Debian kernel plus a busybox initramfs built by
//! `ci/build-initramfs.sh` (fio, e2fsprogs, util-linux blkdiscard). The
//! script is not baked into that image: each run appends a second, tiny cpio
//! archive holding `/test.sh` (and any data files the test ships), because the
//! kernel unpacks concatenated initramfs archives in order. The image's
//! `/init` runs `/test.sh`, prints `VUBD-EXIT code=N` and powers off, so a
//! run ends when QEMU exits by itself; a time-out kills QEMU otherwise.
//!
//! Scripts report with marker lines, `VUBD-RESULT key=value` (the `result`
//! shell function of the prelude prints them), which the runner parses into a
//! map. The full serial log is written to `target/guest-logs/NAME.log` and
//! kept, so a failed test can be read afterwards.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::daemon::{workspace_root, ScratchDir};

/// Prefix of the marker lines a guest script prints to report a value.
pub const RESULT_MARKER: &str = "VUBD-RESULT ";
/// Prefix of the line `/init` prints with the script's exit code.
pub const EXIT_MARKER: &str = "VUBD-EXIT code=";

/// Shell functions prepended to every guest script.
///
/// `result KEY VALUE` reports a value; `fail MSG` reports why the script gave
/// up and exits 1 (the host sees both the message and the exit code).
/// Real tools are at their full paths: busybox sh would otherwise run its own
/// applets of the same name.
pub const PRELUDE: &str = r#"
result() { echo "VUBD-RESULT $1=$2"; }
fail() { echo "VUBD-RESULT fail=$*"; exit 1; }
FIO=/usr/bin/fio
MKFS_EXT4=/usr/sbin/mkfs.ext4
E2FSCK=/usr/sbin/e2fsck
BLKDISCARD=/usr/sbin/blkdiscard
"#;

/// Kernel and initramfs for the guest, as produced by `ci/build-initramfs.sh`.
#[derive(Debug, Clone)]
pub struct GuestImages {
    /// The kernel: the ELF `vmlinux` (PVH boot) or, as a fallback, a bzImage.
    pub kernel: PathBuf,
    /// The base initramfs (uncompressed newc cpio) without any test script.
    pub initramfs: PathBuf,
}

/// Where `ci/build-initramfs.sh` puts its outputs (`ci/out/`), overridable
/// with `VUBD_GUEST_DIR`.
pub fn guest_out_dir() -> PathBuf {
    match std::env::var_os("VUBD_GUEST_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("ci/out"),
    }
}

/// Builds the guest kernel and initramfs if needed (once per process; the
/// script itself skips the work when its outputs are newer than its inputs)
/// and returns their paths.
pub fn guest_images() -> Result<GuestImages> {
    static IMAGES: OnceLock<std::result::Result<GuestImages, String>> = OnceLock::new();
    IMAGES
        .get_or_init(|| build_images().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

fn build_images() -> Result<GuestImages> {
    let out = guest_out_dir();
    let script = workspace_root().join("ci/build-initramfs.sh");
    let output = Command::new("bash")
        .arg(&script)
        .arg(&out)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}): {}{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    log::info!("{}", String::from_utf8_lossy(&output.stdout).trim_end());
    let initramfs = out.join("initramfs.cpio");
    let kernel = [out.join("vmlinux"), out.join("bzImage")]
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| format!("no vmlinux or bzImage in {}", out.display()))?;
    if !initramfs.exists() {
        bail!("{} missing after the build", initramfs.display());
    }
    Ok(GuestImages { kernel, initramfs })
}

/// One vhost-user-blk disk attached to the guest.
#[derive(Debug, Clone)]
pub struct GuestDisk {
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// Queues the guest driver asks for (`num-queues=` of vhost-user-blk-pci).
    pub num_queues: u16,
    /// Let QEMU reconnect to a restarted backend (`reconnect=1` on the chardev).
    pub reconnect: bool,
}

impl GuestDisk {
    /// A disk on `socket` with one queue and no reconnection.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        GuestDisk {
            socket: socket.into(),
            num_queues: 1,
            reconnect: false,
        }
    }
}

/// A guest to boot: its disks, the script it runs and its limits.
#[derive(Debug, Clone)]
pub struct Guest {
    /// Name for the log file (`target/guest-logs/NAME.log`) and messages.
    pub name: String,
    /// vhost-user-blk disks, in order: the first is /dev/vda.
    pub disks: Vec<GuestDisk>,
    /// Shell script run by busybox `sh` as /test.sh, after [`PRELUDE`].
    pub script: String,
    /// Extra files placed in the guest's root file system (path, contents).
    pub files: Vec<(String, Vec<u8>)>,
    /// QEMU is killed after this long.
    pub timeout: Duration,
    /// Guest memory in MiB (also the size of the shared memfd backend).
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// If false (default) QEMU exits when the guest reboots (`-no-reboot`);
    /// if true a reboot restarts the guest, which runs /test.sh again.
    pub allow_reboot: bool,
    /// A QMP socket QEMU listens on (`-qmp unix:PATH,server=on,wait=off`),
    /// for a test that stops and resumes the VM.
    pub qmp: Option<PathBuf>,
}

impl Guest {
    /// A guest named `name` running `script` with a single disk on `socket`,
    /// 512 MiB, 2 CPUs and a 180 s time-out (TCG on a busy 2-core machine).
    pub fn new(name: &str, socket: impl Into<PathBuf>, script: &str) -> Self {
        Guest {
            name: name.to_string(),
            disks: vec![GuestDisk::new(socket)],
            script: script.to_string(),
            files: Vec::new(),
            timeout: Duration::from_secs(180),
            memory_mib: 512,
            cpus: 2,
            allow_reboot: false,
            qmp: None,
        }
    }

    /// Sets the number of queues of the first disk.
    pub fn num_queues(mut self, n: u16) -> Self {
        if let Some(d) = self.disks.first_mut() {
            d.num_queues = n;
        }
        self
    }

    /// Sets `reconnect=1` on the first disk's chardev.
    pub fn reconnect(mut self, on: bool) -> Self {
        if let Some(d) = self.disks.first_mut() {
            d.reconnect = on;
        }
        self
    }

    /// Adds a file to the guest's root file system.
    pub fn file(mut self, path: &str, contents: Vec<u8>) -> Self {
        self.files.push((path.to_string(), contents));
        self
    }

    /// Sets the time-out.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Lets the guest reboot instead of making QEMU exit.
    pub fn allow_reboot(mut self, on: bool) -> Self {
        self.allow_reboot = on;
        self
    }

    /// Makes QEMU listen for QMP on the unix socket `path`.
    pub fn qmp(mut self, path: impl Into<PathBuf>) -> Self {
        self.qmp = Some(path.into());
        self
    }

    /// The QEMU command line for this guest, given the images and the initrd
    /// (base initramfs with the script archive appended).
    fn qemu_command(&self, images: &GuestImages, initrd: &Path) -> Command {
        let qemu = std::env::var_os("QEMU").unwrap_or_else(|| "qemu-system-x86_64".into());
        let mut cmd = Command::new(qemu);
        let mem = self.memory_mib;
        cmd.args([
            "-accel",
            "tcg",
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
        ]);
        cmd.args(["-m", &format!("{mem}M"), "-smp", &self.cpus.to_string()]);
        cmd.args([
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-numa",
            "node,memdev=mem",
        ]);
        for (i, d) in self.disks.iter().enumerate() {
            let reconnect = if d.reconnect { ",reconnect=1" } else { "" };
            cmd.arg("-chardev").arg(format!(
                "socket,id=c{i},path={}{reconnect}",
                d.socket.display()
            ));
            cmd.arg("-device").arg(format!(
                "vhost-user-blk-pci,chardev=c{i},num-queues={}",
                d.num_queues
            ));
        }
        if !self.allow_reboot {
            cmd.arg("-no-reboot");
        }
        if let Some(qmp) = &self.qmp {
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        }
        cmd.arg("-kernel").arg(&images.kernel);
        cmd.arg("-initrd").arg(initrd);
        // panic=-1 + oops=panic: a guest crash (say, a driver choking on a
        // bad completion) reboots at once, which -no-reboot turns into an
        // exit, instead of waiting for the time-out. loglevel=4 keeps kernel
        // chatter from splitting the script's marker lines.
        cmd.args([
            "-append",
            "console=ttyS0 loglevel=4 panic=-1 oops=panic reboot=t",
        ]);
        cmd
    }

    /// Runs the guest ([`Guest::run`]) on a thread of its own, for a test
    /// that acts on the host meanwhile. A log left by an earlier run is
    /// removed first, so that [`wait_for_marker`] reads this run's only.
    pub fn spawn(self) -> Result<std::thread::JoinHandle<Result<GuestOutput>>> {
        match std::fs::remove_file(log_path(&self.name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        Ok(std::thread::spawn(move || self.run()))
    }

    /// Boots the guest, waits for it to power off (or the time-out), and
    /// returns what it reported. Errors: QEMU cannot start, exits abnormally
    /// without the exit marker, or runs past the time-out (it is killed).
    /// Guest runs in one process are serialized: TCG guests on a 2-core
    /// machine only slow each other down.
    pub fn run(&self) -> Result<GuestOutput> {
        static SERIAL: Mutex<()> = Mutex::new(());
        let images = guest_images()?;
        let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());

        let scratch = ScratchDir::new_in("/dev/shm", &format!("guest-{}", self.name))?;
        let initrd = scratch.join("initrd.cpio");
        {
            let mut out = File::create(&initrd)?;
            let mut base = File::open(&images.initramfs)
                .with_context(|| format!("open {}", images.initramfs.display()))?;
            std::io::copy(&mut base, &mut out)?;
            let mut files = self.files.clone();
            files.push((
                "test.sh".into(),
                format!("{PRELUDE}\n{}", self.script).into(),
            ));
            out.write_all(&newc_archive(&files)?)?;
        }

        let log_path = log_path(&self.name);
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let stderr_path = scratch.join("qemu.stderr");
        let mut cmd = self.qemu_command(&images, &initrd);
        // A test that fails while its guest runs on a thread of its own
        // (`spawn`) ends without waiting for it: QEMU must not outlive it.
        crate::bench::die_with_parent(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(File::create(&log_path)?)
            .stderr(File::create(&stderr_path)?);
        log::info!("guest {}: {:?}", self.name, cmd);

        let start = Instant::now();
        let mut child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
        let mut panicked = false;
        let mut last_scan = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            // A guest that may reboot would re-run its script after a panic
            // until the time-out; stop it at the first panic instead.
            if self.allow_reboot && last_scan.elapsed() > Duration::from_secs(1) {
                last_scan = Instant::now();
                let log = std::fs::read(&log_path).unwrap_or_default();
                panicked = String::from_utf8_lossy(&log).contains("Kernel panic");
            }
            if panicked || start.elapsed() > self.timeout {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let duration = start.elapsed();
        let log = String::from_utf8_lossy(&std::fs::read(&log_path)?).into_owned();
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let output = GuestOutput::parse(&self.name, log, log_path, duration);

        match status {
            None if panicked => bail!(
                "guest {} kernel panicked; serial log {} ends:\n{}",
                self.name,
                output.log_path.display(),
                output.tail(40)
            ),
            None => bail!(
                "guest {} timed out after {:?}; serial log {} ends:\n{}\nqemu stderr: {stderr}",
                self.name,
                self.timeout,
                output.log_path.display(),
                output.tail(30)
            ),
            Some(st) if !st.success() && output.exit_code.is_none() => bail!(
                "qemu for guest {} exited with {st}; stderr: {stderr}\nserial log {} ends:\n{}",
                self.name,
                output.log_path.display(),
                output.tail(30)
            ),
            Some(_) => {}
        }
        if !stderr.trim().is_empty() {
            log::warn!("guest {}: qemu stderr: {}", self.name, stderr.trim());
        }
        log::info!("guest {} finished in {duration:?}", self.name);
        Ok(output)
    }
}

/// Where the serial log of the guest `name` is kept.
pub fn log_path(name: &str) -> PathBuf {
    workspace_root().join(format!("target/guest-logs/{name}.log"))
}

/// Waits until the serial log of the guest `name` (being run by `guest`)
/// contains `marker`; fails if the guest ends first or after `timeout`, a
/// bound against hangs.
pub fn wait_for_marker(
    name: &str,
    marker: &str,
    timeout: Duration,
    guest: &std::thread::JoinHandle<Result<GuestOutput>>,
) -> Result<()> {
    let log = log_path(name);
    let t0 = Instant::now();
    loop {
        let text = std::fs::read(&log).unwrap_or_default();
        if String::from_utf8_lossy(&text).contains(marker) {
            return Ok(());
        }
        if guest.is_finished() {
            bail!("the guest ended before printing {marker:?}");
        }
        if t0.elapsed() > timeout {
            bail!("no {marker:?} in {} within {timeout:?}", log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a guest run reported.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// The guest's name.
    pub name: String,
    /// The script's exit code from the last `VUBD-EXIT` line (the last boot's,
    /// if the guest rebooted); None if the guest never got there.
    pub exit_code: Option<i32>,
    /// Every `VUBD-RESULT key=value`, the last value winning for a key.
    pub results: BTreeMap<String, String>,
    /// The whole serial log.
    pub log: String,
    /// Where the serial log was kept.
    pub log_path: PathBuf,
    /// Wall-clock time from QEMU's start to its exit.
    pub duration: Duration,
}

impl GuestOutput {
    /// Parses the marker lines out of a serial log.
    pub fn parse(name: &str, log: String, log_path: PathBuf, duration: Duration) -> Self {
        let mut results = BTreeMap::new();
        let mut exit_code = None;
        for line in log.lines() {
            let line = line.trim_end_matches('\r');
            // Markers may follow other output on the same line (e.g. a
            // command's output without a trailing newline), so search.
            if let Some(pos) = line.find(RESULT_MARKER) {
                let rest = &line[pos + RESULT_MARKER.len()..];
                if let Some((k, v)) = rest.split_once('=') {
                    results.insert(k.trim().to_string(), v.trim().to_string());
                }
            }
            if let Some(pos) = line.find(EXIT_MARKER) {
                let rest = line[pos + EXIT_MARKER.len()..].trim();
                exit_code = rest.parse::<i32>().ok();
            }
        }
        GuestOutput {
            name: name.to_string(),
            exit_code,
            results,
            log,
            log_path,
            duration,
        }
    }

    /// The last `n` lines of the serial log.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Fails unless the script exited 0; the error carries the script's
    /// `fail` message, the log path and the end of the log.
    pub fn ensure_success(&self) -> Result<()> {
        if self.exit_code != Some(0) {
            bail!(
                "guest {} script exited with {:?} (fail: {:?}); serial log {} ends:\n{}",
                self.name,
                self.exit_code,
                self.results.get("fail"),
                self.log_path.display(),
                self.tail(40)
            );
        }
        Ok(())
    }

    /// Kernel log lines that mean the disk or the guest went wrong even if
    /// the script carried on (a tool may ignore a failed request: mkfs.ext4
    /// shrugs off a failed discard). The console shows them at loglevel 4.
    pub fn kernel_errors(&self) -> Vec<&str> {
        const PATTERNS: [&str; 7] = [
            "I/O error",
            "Buffer I/O error",
            "EXT4-fs error",
            "Oops",
            "BUG:",
            "Kernel panic",
            "virtio_blk",
        ];
        self.log
            .lines()
            .filter(|l| !l.contains(RESULT_MARKER) && PATTERNS.iter().any(|p| l.contains(p)))
            .collect()
    }

    /// [`GuestOutput::ensure_success`], and no [`GuestOutput::kernel_errors`].
    pub fn ensure_clean(&self) -> Result<()> {
        self.ensure_success()?;
        let errors = self.kernel_errors();
        if !errors.is_empty() {
            bail!(
                "guest {} logged kernel errors (serial log {}):\n{}",
                self.name,
                self.log_path.display(),
                errors.join("\n")
            );
        }
        Ok(())
    }

    /// The value the script reported for `key`, or an error pointing at the log.
    pub fn get(&self, key: &str) -> Result<&str> {
        match self.results.get(key) {
            Some(v) => Ok(v),
            None => bail!(
                "guest {} did not report {key}; serial log {} ends:\n{}",
                self.name,
                self.log_path.display(),
                self.tail(40)
            ),
        }
    }

    /// The value reported for `key`, parsed.
    pub fn get_parsed<T>(&self, key: &str) -> Result<T>
    where
        T: std::str::FromStr,
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        let v = self.get(key)?;
        v.parse::<T>()
            .with_context(|| format!("guest {} reported {key}={v:?}", self.name))
    }
}

/// A newc (SVR4, "070701") cpio archive of `files`, with the parent
/// directories they need, as the kernel's initramfs unpacker reads it. Files
/// named `*.sh` are executable.
pub fn newc_archive(files: &[(String, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut dirs: Vec<String> = Vec::new();
    let mut ino = 0x5000u32;
    for (path, data) in files {
        let path = path.trim_start_matches('/');
        if path.is_empty() || path.split('/').any(|c| c.is_empty() || c == "..") {
            bail!("bad guest file path {path:?}");
        }
        let comps: Vec<&str> = path.split('/').collect();
        for i in 1..comps.len() {
            let dir = comps[..i].join("/");
            if !dirs.contains(&dir) {
                ino += 1;
                newc_entry(&mut out, ino, 0o040755, &dir, &[])?;
                dirs.push(dir);
            }
        }
        let mode = if path.ends_with(".sh") {
            0o100755
        } else {
            0o100644
        };
        ino += 1;
        newc_entry(&mut out, ino, mode, path, data)?;
    }
    newc_entry(&mut out, 0, 0, "TRAILER!!!", &[])?;
    Ok(out)
}

fn newc_entry(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) -> Result<()> {
    let size = u32::try_from(data.len()).context("guest file larger than 4 GiB")?;
    let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        size,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
    Ok(())
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_markers_and_exit_code() {
        let log = "Booting from ROM..\r\nsome output VUBD-RESULT a=1\r\n[ 1.0] kernel\nVUBD-RESULT b = x y\nVUBD-RESULT a=2\n\nVUBD-EXIT code=3\n";
        let out = GuestOutput::parse("t", log.into(), PathBuf::from("/x"), Duration::ZERO);
        assert_eq!(out.exit_code, Some(3));
        assert_eq!(out.results.get("a").map(String::as_str), Some("2"));
        assert_eq!(out.results.get("b").map(String::as_str), Some("x y"));
        assert!(out.ensure_success().is_err());
        assert!(out.kernel_errors().is_empty());
        let bad = "[ 3.0] I/O error, dev vda, sector 0 op 0x3:(DISCARD)\nVUBD-EXIT code=0\n";
        let out = GuestOutput::parse("t", bad.into(), PathBuf::from("/x"), Duration::ZERO);
        assert!(out.ensure_success().is_ok());
        assert_eq!(out.kernel_errors().len(), 1);
        assert!(out.ensure_clean().is_err());
    }

    #[test]
    fn newc_archive_layout() {
        let a = newc_archive(&[("d/x.sh".into(), b"abc".to_vec())]).unwrap();
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        // directory, file, trailer
        assert_eq!(a.windows(6).filter(|w| w == b"070701").count(), 3);
        let s = String::from_utf8_lossy(&a);
        assert!(s.contains("d/x.sh\0"));
        assert!(s.contains("TRAILER!!!\0"));
        assert!(newc_archive(&[("../x".into(), vec![])]).is_err());
    }
}
