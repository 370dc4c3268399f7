//! Where management commands may open or create files (`--allow-dir`).
//!
//! A QMP client names paths; a root daemon must not let it reach files
//! outside the directories the operator allowed. Each path is resolved by
//! the kernel beneath an `O_PATH` descriptor of an allowed directory taken
//! at start-up (`openat2` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`),
//! so `..`, absolute symlinks and symlinks leading out all fail, and the
//! last component is never a symlink (`O_NOFOLLOW`). Only regular files are
//! opened, and block devices beneath an allowed directory under `/dev`
//! (a volume group's directory holds devices by design).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

/// Why a path was refused or failed to open.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The path does not resolve beneath any allowed directory.
    #[error("'{0}' is outside the allowed directories (--allow-dir)")]
    Outside(PathBuf),
    /// The path names something other than a regular file (or a block
    /// device beneath an allowed directory under /dev).
    #[error("'{0}' is not a regular file (block devices only beneath an --allow-dir under /dev)")]
    NotRegular(PathBuf),
    /// The path resolved beneath an allowed directory but the open failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// One allowed directory: its canonical path and the descriptor every
/// lookup starts from.
#[derive(Debug)]
struct AllowedDir {
    path: PathBuf,
    fd: OwnedFd,
    devices: bool,
}

/// The directories management commands may open or create files in.
#[derive(Debug)]
pub struct AllowedDirs {
    dirs: Vec<AllowedDir>,
}

/// How a file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// An existing file, read-only.
    Read,
    /// An existing file, read-write.
    Write,
    /// A new file (`O_EXCL`); with `or_existing`, an existing file is
    /// opened read-write instead.
    Create {
        /// Open the file if it already exists.
        or_existing: bool,
    },
}

static INSTALLED: OnceLock<AllowedDirs> = OnceLock::new();

impl AllowedDirs {
    /// Opens each directory (`O_PATH`); they stay the roots of every lookup.
    pub fn new(dirs: &[PathBuf]) -> io::Result<AllowedDirs> {
        let dirs = dirs
            .iter()
            .map(|d| {
                let path = std::fs::canonicalize(d)?;
                let c = CString::new(path.as_os_str().as_bytes())
                    .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
                // SAFETY: a valid C string; the returned fd is checked.
                let fd = unsafe {
                    libc::open(
                        c.as_ptr(),
                        libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                    )
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: fd is a fresh descriptor we own.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                let devices = path.starts_with("/dev");
                Ok(AllowedDir { path, fd, devices })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(AllowedDirs { dirs })
    }

    /// The process-wide policy, installed once at start-up; `None` in a
    /// library use that installed none (nothing is restricted then).
    pub fn installed() -> Option<&'static AllowedDirs> {
        INSTALLED.get()
    }

    /// Installs the process-wide policy; false if one was installed already.
    pub fn install(self) -> bool {
        INSTALLED.set(self).is_ok()
    }

    /// The allowed directories (canonical paths).
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|d| d.path.as_path())
    }

    /// Opens `path` beneath an allowed directory; `extra` are further open
    /// flags (e.g. `O_DIRECT`). Nothing is created outside, and a refused
    /// path is not touched.
    pub fn open(&self, path: &Path, access: Access, extra: i32) -> Result<File, PolicyError> {
        let outside = || PolicyError::Outside(path.to_path_buf());
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()?.join(path)
        };
        let (dir, rest) = self
            .dirs
            .iter()
            .find_map(|d| abs.strip_prefix(&d.path).ok().map(|r| (d, r)))
            .ok_or_else(outside)?;
        if rest.components().any(|c| c == Component::ParentDir) {
            return Err(outside());
        }
        // The directory itself fails as QEMU's open does (EISDIR).
        let rest = if rest.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rest
        };
        let rw = match access {
            Access::Read => libc::O_RDONLY,
            _ => libc::O_RDWR,
        };
        // O_NONBLOCK: opening a fifo must not wait for a peer before its
        // type is checked.
        let base = rw | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | extra;
        let file = match access {
            Access::Create { or_existing } => {
                match openat2(dir, rest, base | libc::O_CREAT | libc::O_EXCL) {
                    Err(e) if or_existing && e.raw_os_error() == Some(libc::EEXIST) => {
                        openat2(dir, rest, base)
                    }
                    other => other,
                }
            }
            _ => openat2(dir, rest, base),
        }
        .map_err(|e| match e.raw_os_error() {
            // EXDEV: resolution left the directory; ELOOP: a symlink as
            // the last component (or a magic link).
            Some(libc::EXDEV) | Some(libc::ELOOP) => outside(),
            _ => PolicyError::Io(e),
        })?;
        let ft = file.metadata()?.file_type();
        if !(ft.is_file() || (dir.devices && ft.is_block_device())) {
            return Err(PolicyError::NotRegular(path.to_path_buf()));
        }
        // SAFETY: fcntl on a descriptor we own.
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

/// Opens `path` under the installed policy; with none installed (a
/// library use), with the same flags but anywhere.
pub fn open(path: &Path, access: Access, extra: i32) -> Result<File, PolicyError> {
    if let Some(p) = AllowedDirs::installed() {
        return p.open(path, access, extra);
    }
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true).write(access != Access::Read);
    oo.custom_flags(extra | libc::O_NOFOLLOW);
    match access {
        Access::Create { or_existing: true } => oo.create(true),
        Access::Create { or_existing: false } => oo.create_new(true),
        _ => &mut oo,
    };
    Ok(oo.open(path)?)
}

/// `openat2(dir, rest, flags)` resolving beneath `dir`.
fn openat2(dir: &AllowedDir, rest: &Path, flags: i32) -> io::Result<File> {
    let c = CString::new(rest.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain data; all-zero is its default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.mode = if flags & libc::O_CREAT != 0 { 0o600 } else { 0 };
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid fd, C string and open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.fd.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A scratch directory removed on drop.
    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn setup() -> (Scratch, PathBuf, PathBuf, AllowedDirs) {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t =
            Scratch(std::env::temp_dir().join(format!("vubd-allow-{}-{n}", std::process::id())));
        let allowed = t.0.join("img");
        let out = t.0.join("victim");
        std::fs::create_dir_all(&t.0).unwrap();
        std::fs::create_dir(&allowed).unwrap();
        std::fs::write(&out, b"victim").unwrap();
        let p = AllowedDirs::new(std::slice::from_ref(&allowed)).unwrap();
        (t, allowed, out, p)
    }

    fn refused(p: &AllowedDirs, path: &Path) {
        let e = p
            .open(path, Access::Create { or_existing: true }, 0)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("outside the allowed directories (--allow-dir)")
                || matches!(e, PolicyError::NotRegular(_)),
            "{path:?}: {e}"
        );
    }

    #[test]
    fn hostile_paths_are_refused_and_nothing_is_touched() {
        let (_t, dir, victim, p) = setup();
        symlink(&victim, dir.join("abs")).unwrap();
        symlink("../victim", dir.join("rel")).unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        symlink("/etc", dir.join("etc")).unwrap();
        let fifo = CString::new(dir.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C string.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let before = std::fs::metadata(&victim).unwrap();
        for bad in [
            victim.clone(),
            PathBuf::from("/etc/vubd-allow-test"),
            dir.join("../victim"),
            dir.join("sub/../../victim"),
            dir.join("abs"),
            dir.join("rel"),
            dir.join("etc/vubd-allow-test"),
            dir.join("fifo"),
            PathBuf::from("/dev/null"),
        ] {
            refused(&p, &bad);
        }
        let after = std::fs::metadata(&victim).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"victim");
        assert_eq!(before.len(), after.len());
        assert_eq!(before.modified().unwrap(), after.modified().unwrap());
        assert!(!Path::new("/etc/vubd-allow-test").exists());
    }

    #[test]
    fn files_beneath_open_and_create_exclusively() {
        let (_t, dir, _victim, p) = setup();
        std::fs::create_dir(dir.join("sub")).unwrap();
        symlink("sub", dir.join("inner")).unwrap();
        let f = p
            .open(
                &dir.join("inner/new"),
                Access::Create { or_existing: false },
                0,
            )
            .unwrap();
        assert!(f.metadata().unwrap().is_file());
        assert!(dir.join("sub/new").is_file());
        let e = p
            .open(
                &dir.join("sub/new"),
                Access::Create { or_existing: false },
                0,
            )
            .unwrap_err();
        assert!(matches!(e, PolicyError::Io(ref io) if io.raw_os_error() == Some(libc::EEXIST)));
        p.open(&dir.join("sub/new"), Access::Write, 0).unwrap();
        p.open(&dir.join("sub/new"), Access::Read, 0).unwrap();
    }
}
