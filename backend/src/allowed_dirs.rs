//! Where management commands may open or create files (`--allow-dir`).
//!
//! A QMP client names paths (`blockdev-add` filenames, `drive-mirror`
//! targets) that a root daemon would otherwise open, create or truncate
//! wherever they lead. Every such open goes through [`open`] or
//! [`create_or_open`]: the path must lie beneath an allowed directory, and
//! is resolved with `openat2(2)` relative to that directory's fd, opened at
//! start-up, with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` (no `..` out, no
//! absolute symlink, no symlink leading out) and `O_NOFOLLOW` on the last
//! component. Only regular files are accepted, except in a directory under
//! `/dev`, which holds devices by design: there block devices are accepted,
//! `..` is refused, and symlinks are followed (LVM's `/dev/vg0/lv ->
//! ../dm-3`; only root writes `/dev`).
//!
//! The policy is process-wide, set once by the daemon ([`set_policy`]);
//! unset (library tests), opens are unrestricted. The operator's own
//! `--image` is trusted and does not go through it.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

/// Why a path was not opened.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The policy refused the path; the text names the rule.
    #[error("{0}")]
    Refused(String),
    /// The open itself failed.
    #[error("{0}")]
    Os(#[from] io::Error),
}

impl AccessError {
    /// The errno of an OS failure (EACCES for a refusal).
    pub fn errno(&self) -> i32 {
        match self {
            AccessError::Refused(_) => libc::EACCES,
            AccessError::Os(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

struct AllowedDir {
    /// As given on the command line, made absolute.
    given: PathBuf,
    /// With symlinks resolved.
    real: PathBuf,
    fd: OwnedFd,
    /// Under /dev: holds block devices by design.
    devices: bool,
}

/// The directories management commands may open files beneath.
pub struct Policy {
    dirs: Vec<AllowedDir>,
}

impl Policy {
    /// Opens each directory (`O_PATH`) now, so that later renames of
    /// their parents do not move the boundary.
    pub fn new(dirs: &[PathBuf]) -> io::Result<Policy> {
        let mut out = Vec::new();
        for d in dirs {
            let given = std::path::absolute(d)?;
            let real = d
                .canonicalize()
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", d.display())))?;
            let c = cstr(&real)?;
            // SAFETY: a valid C string; the fd returned is ours.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(e.kind(), format!("{}: {e}", d.display())));
            }
            // SAFETY: fd was just opened and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // /dev/shm and /dev/mqueue are user-writable tmpfs, not devices.
            let devices = real.starts_with("/dev")
                && !real.starts_with("/dev/shm")
                && !real.starts_with("/dev/mqueue");
            out.push(AllowedDir {
                given,
                real,
                fd,
                devices,
            });
        }
        Ok(Policy { dirs: out })
    }

    /// The allowed directories, symlinks resolved (for Landlock rules).
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|d| d.real.as_path())
    }

    fn open(&self, path: &Path, flags: i32, mode: u32) -> Result<File, AccessError> {
        let outside = || {
            AccessError::Refused(format!(
                "'{}' is outside the allowed directories (--allow-dir)",
                path.display()
            ))
        };
        let abs = std::path::absolute(path)?;
        let (dir, rest) = self
            .dirs
            .iter()
            .find_map(|d| {
                let rest = abs
                    .strip_prefix(&d.real)
                    .or_else(|_| abs.strip_prefix(&d.given))
                    .ok()?;
                Some((d, rest))
            })
            .ok_or_else(outside)?;
        // The directory itself: opening it fails as any directory does.
        let rest = if rest.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rest
        };
        let (flags, resolve) = if dir.devices {
            if rest.components().any(|c| c == Component::ParentDir) {
                return Err(outside());
            }
            // Nothing is created among device nodes.
            (
                flags & !(libc::O_CREAT | libc::O_EXCL),
                libc::RESOLVE_NO_MAGICLINKS,
            )
        } else {
            (
                flags | libc::O_NOFOLLOW,
                libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
            )
        };
        // O_NONBLOCK: opening a fifo for writing must not hang until the
        // type check below refuses it.
        let not_regular = || {
            AccessError::Refused(format!(
                "'{}' is not a regular file (only an --allow-dir under /dev holds block devices)",
                path.display()
            ))
        };
        let file = match openat2(
            dir.fd.as_raw_fd(),
            rest,
            flags | libc::O_NONBLOCK | libc::O_NOCTTY,
            mode,
            resolve,
        ) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => return Err(outside()),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(AccessError::Refused(format!(
                    "'{}' is a symbolic link (refused beneath --allow-dir)",
                    path.display()
                )))
            }
            // A fifo without a reader, opened for writing, or a socket.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Err(not_regular()),
            Err(e) => return Err(e.into()),
        };
        let ft = file.metadata()?.file_type();
        if dir.devices && !ft.is_block_device() {
            return Err(AccessError::Refused(format!(
                "'{}' is not a block device (an --allow-dir under /dev holds block devices only)",
                path.display()
            )));
        }
        if !dir.devices && !ft.is_file() {
            return Err(not_regular());
        }
        // SAFETY: fcntl on an fd we own.
        let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0
            || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) } < 0
        {
            return Err(io::Error::last_os_error().into());
        }
        Ok(file)
    }
}

static POLICY: OnceLock<Policy> = OnceLock::new();

/// Sets the process-wide policy (once, at start-up); false if one was set.
pub fn set_policy(p: Policy) -> bool {
    POLICY.set(p).is_ok()
}

/// The process-wide policy, if one was set.
pub fn policy() -> Option<&'static Policy> {
    POLICY.get()
}

/// Opens an existing file a management command named, with `flags`
/// (`O_RDONLY`/`O_RDWR`/`O_WRONLY` and extras such as `O_DIRECT`).
pub fn open(path: &Path, flags: i32) -> Result<File, AccessError> {
    match POLICY.get() {
        Some(p) => p.open(path, flags | libc::O_CLOEXEC, 0),
        None => Ok(openat2(
            libc::AT_FDCWD,
            path,
            flags | libc::O_CLOEXEC,
            0,
            0,
        )?),
    }
}

/// Creates `path` for writing (`O_EXCL`, mode 0644 as QEMU creates
/// images), or opens it if it exists (without following a symlink there).
/// The bool is true if it was created.
pub fn create_or_open(path: &Path) -> Result<(File, bool), AccessError> {
    let create = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
    let made = match POLICY.get() {
        Some(p) => p.open(path, create, 0o644),
        // Not `?`: EEXIST is handled below.
        None => openat2(libc::AT_FDCWD, path, create, 0o644, 0).map_err(AccessError::from),
    };
    match made {
        Ok(f) => Ok((f, true)),
        Err(AccessError::Os(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
            Ok((open(path, libc::O_WRONLY)?, false))
        }
        Err(e) => Err(e),
    }
}

/// Creates a sidecar file (bitmaps, mirror state, pivot marker) at
/// `path`, read-write, replacing whatever name is there without following
/// it: unlink (which removes a symlink, not its target), then `O_EXCL |
/// O_NOFOLLOW`. A local user who plants a symlink at the name cannot turn
/// the daemon's write into one through it; if they win a race to re-plant
/// it, the create fails.
pub fn create_sidecar(path: &Path) -> io::Result<File> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Opens an existing sidecar (read-write if `write`) without following a
/// symlink at its name.
pub fn open_sidecar(path: &Path, write: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn openat2(dirfd: i32, path: &Path, flags: i32, mode: u32, resolve: u64) -> io::Result<File> {
    let c = cstr(path)?;
    // SAFETY: open_how is plain data; zeroed is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        u64::from(mode)
    } else {
        0
    };
    how.resolve = resolve;
    loop {
        // SAFETY: valid C string and open_how for the call's duration.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a new fd nobody else owns.
            return Ok(unsafe { File::from_raw_fd(fd as i32) });
        }
        let e = io::Error::last_os_error();
        // openat2 returns EAGAIN when a concurrent rename raced a
        // RESOLVE_BENEATH walk.
        if !matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vubd-allow-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn policy(dir: &Path) -> Policy {
        Policy::new(&[dir.to_path_buf()]).unwrap()
    }

    fn refused(r: Result<File, AccessError>) -> String {
        match r {
            Err(AccessError::Refused(m)) => m,
            Err(e) => panic!("failed, not refused: {e}"),
            Ok(_) => panic!("opened"),
        }
    }

    #[test]
    fn inside_opens_and_outside_is_refused() {
        let root = scratch("inside");
        let dir = root.join("allowed");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("a"), b"x").unwrap();
        std::fs::write(root.join("victim"), b"v").unwrap();
        let p = policy(&dir);
        p.open(&dir.join("a"), libc::O_RDWR, 0).unwrap();
        let m = refused(p.open(&root.join("victim"), libc::O_RDWR, 0));
        assert!(m.contains("outside the allowed directories"), "{m}");
        refused(p.open(&dir.join("../victim"), libc::O_RDWR, 0));
        std::os::unix::fs::symlink(root.join("victim"), dir.join("abs")).unwrap();
        std::os::unix::fs::symlink("../victim", dir.join("rel")).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        std::os::unix::fs::symlink("..", dir.join("sub/up")).unwrap();
        std::os::unix::fs::symlink("a", dir.join("last")).unwrap();
        refused(p.open(&dir.join("abs"), libc::O_RDWR, 0));
        refused(p.open(&dir.join("rel"), libc::O_RDWR, 0));
        refused(p.open(&dir.join("sub/up/../victim"), libc::O_RDWR, 0));
        let m = refused(p.open(&dir.join("last"), libc::O_RDWR, 0));
        assert!(m.contains("symbolic link"), "{m}");
        // A symlinked directory that stays inside is fine.
        p.open(&dir.join("sub/up/a"), libc::O_RDWR, 0).unwrap();
        assert_eq!(std::fs::read(root.join("victim")).unwrap(), b"v");
    }

    #[test]
    fn fifos_and_devices_are_refused_without_hanging() {
        let dir = scratch("fifo");
        let fifo = dir.join("fifo");
        let c = cstr(&fifo).unwrap();
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let p = policy(&dir);
        let m = refused(p.open(&fifo, libc::O_WRONLY, 0));
        assert!(m.contains("not a regular file"), "{m}");
        std::os::unix::fs::symlink("/dev/null", dir.join("null")).unwrap();
        refused(p.open(&dir.join("null"), libc::O_WRONLY, 0));
    }

    /// A local user plants symlinks to a victim at every sidecar name and
    /// temporary name; the daemon's writes replace the links, never
    /// write through them, and opening a link fails.
    #[test]
    fn sidecar_writes_do_not_follow_planted_symlinks() {
        use crate::dirty::{FileStore, MetaStore};
        use crate::mirror::pivot_marker;
        use crate::mirror::state_file::{boot_id, StateFile, StateHeader};
        use std::os::unix::fs::symlink;
        let dir = scratch("sidecar");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"the victim's bytes").unwrap();
        let link = |name: &str| symlink(&victim, dir.join(name)).unwrap();
        let is_file = |name: &str| {
            std::fs::symlink_metadata(dir.join(name))
                .unwrap()
                .file_type()
                .is_file()
        };

        // A bitmap sidecar: opening through the link fails; a replace
        // (PATH.tmp, then rename) replaces both links.
        link("bm");
        let store = FileStore::new(dir.join("bm"));
        assert!(store.write_at(0, b"x").is_err());
        link("bm.tmp");
        store.replace(b"bitmaps").unwrap();
        store.write_at(0, b"B").unwrap();
        assert!(is_file("bm"));
        assert_eq!(std::fs::read(dir.join("bm")).unwrap(), b"Bitmaps");

        // The mirror state file.
        link("st");
        assert!(StateFile::open(&dir.join("st")).is_err());
        let header = StateHeader {
            disk_size: 1 << 20,
            granularity: 65536,
            target: dir.join("t"),
            boot_id: boot_id(),
        };
        StateFile::create(&dir.join("st"), header).unwrap();
        assert!(is_file("st"));

        // The pivot marker and its temporary name.
        let img = dir.join("img");
        let marker = pivot_marker::marker_path(&img);
        symlink(&victim, &marker).unwrap();
        assert!(pivot_marker::read(&img).is_err());
        let mut tmp = marker.clone().into_os_string();
        tmp.push(".tmp");
        symlink(&victim, &tmp).unwrap();
        pivot_marker::stage(&img, &dir.join("new"), None)
            .unwrap()
            .commit()
            .unwrap();
        assert!(pivot_marker::read(&img).unwrap().is_some());

        assert_eq!(std::fs::read(&victim).unwrap(), b"the victim's bytes");
    }
}
