//! Listening unix sockets that exist only with their final mode and group.
//!
//! Every listening socket vubd makes (vhost-user, QMP, NBD over unix) is
//! created here. The socket is bound inside a fresh private directory
//! (mode 0700, made with `mkdirat`, which fails rather than reuse an
//! existing name) next to its final path, given its mode and group there
//! and only then renamed into place. So there is no `umask` change (other
//! threads may be creating files), no moment at which the final path
//! carries a wider mode or the wrong group, and nothing a local user who
//! can write the directory plants (a file, a symlink, a directory under a
//! guessed temporary name) is followed, widened or replaced.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Default mode of vubd's sockets: the daemon's user only.
pub const DEFAULT_MODE: u32 = 0o600;

/// Name of the socket inside its private directory: short, so that the
/// temporary path fits `sun_path` whenever the final one nearly does.
const INNER: &CStr = c"s";

/// Longest path `bind(2)` takes (`sun_path` less its terminating NUL).
const SUN_PATH_MAX: usize = 107;

/// Mode and group every listening socket of the daemon gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOptions {
    /// Permission bits (see [`parse_mode`] for what is allowed).
    pub mode: u32,
    /// Group to give the socket; `None` keeps the daemon's.
    pub group: Option<libc::gid_t>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            mode: DEFAULT_MODE,
            group: None,
        }
    }
}

/// Why a socket could not be created.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process is listening on the path.
    #[error("{0} is in use by a running process (is another vubd serving it?)")]
    InUse(PathBuf),
    /// The path exists and is not a socket: never replaced.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// The path does not fit in `sun_path`: clients could not connect.
    #[error("cannot listen on {0}: a socket path has at most 107 bytes")]
    TooLong(PathBuf),
    /// A step of creating the socket failed.
    #[error("cannot listen on {path}: {what}: {cause}")]
    Io {
        /// The final socket path.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        cause: io::Error,
    },
}

/// Parses `--socket-mode`: octal permission bits, owner read and write
/// included, nothing for "other" (a socket any local user may connect to
/// hands them the disk or the monitor; use `--socket-group` instead).
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let mode = u32::from_str_radix(digits, 8)
        .map_err(|_| format!("'{s}' is not an octal mode such as 0660"))?;
    if mode & !0o777 != 0 {
        return Err(format!(
            "{mode:o}: only permission bits (at most 0777) are allowed"
        ));
    }
    if mode & 0o007 != 0 {
        return Err(format!(
            "{mode:04o} lets every local user connect; give the VMM a group with --socket-group and use 0660"
        ));
    }
    if mode & 0o600 != 0o600 {
        return Err(format!(
            "{mode:04o}: the owner needs read and write (0600) so that a restart can tell a live socket from a stale one"
        ));
    }
    Ok(mode)
}

/// Parses `--socket-group`: a group name from the group database, or a
/// numeric gid.
pub fn parse_group(s: &str) -> Result<libc::gid_t, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse::<libc::gid_t>()
            .ok()
            .filter(|&g| g != libc::gid_t::MAX)
            .ok_or_else(|| format!("'{s}' is not a valid gid"));
    }
    let name = CString::new(s).map_err(|_| format!("'{s}' is not a valid group name"))?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: all-zero bytes are a valid `struct group` (null pointers).
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buf` outlives it and
        // its length is passed; nothing from `grp` is used but `gr_gid`.
        let rc = unsafe {
            libc::getgrnam_r(
                name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            0 if found.is_null() => return Err(format!("no group named '{s}'")),
            0 => return Ok(grp.gr_gid),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            e => {
                return Err(format!(
                    "cannot look up group '{s}': {}",
                    io::Error::from_raw_os_error(e)
                ))
            }
        }
    }
}

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_dir(at: libc::c_int, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; the result is checked.
    let fd = unsafe {
        libc::openat(
            at,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | flags,
        )
    };
    check(fd)?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn stat_at(dir: &OwnedFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: all-zero bytes are a valid `struct stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated and `st` is writable.
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// A name nobody can count on in advance (the directory is made with
/// `mkdirat`, so a guessed name only costs a retry).
fn temp_name(base: &OsStr, attempt: u32) -> io::Result<CString> {
    let mut rnd = [0u8; 8];
    // SAFETY: `rnd` is writable for its length.
    let got = unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), rnd.len(), libc::GRND_NONBLOCK) };
    let r = if got == rnd.len() as isize {
        u64::from_ne_bytes(rnd)
    } else {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        (u64::from(std::process::id()) << 32) ^ u64::from(nanos) ^ u64::from(attempt)
    };
    let mut name = b".".to_vec();
    name.extend_from_slice(&base.as_bytes()[..base.len().min(32)]);
    name.extend_from_slice(format!(".{r:016x}").as_bytes());
    cstr(&name)
}

/// The private directory a socket is bound in; removed on drop.
struct PrivateDir<'a> {
    parent: &'a OwnedFd,
    name: CString,
    fd: OwnedFd,
}

impl<'a> PrivateDir<'a> {
    fn create(parent: &'a OwnedFd, base: &OsStr) -> io::Result<PrivateDir<'a>> {
        let mut attempt = 0;
        let name = loop {
            let name = temp_name(base, attempt)?;
            // SAFETY: `name` is NUL-terminated.
            match check(unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o700) }) {
                Ok(()) => break name,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
                Err(e) => return Err(e),
            }
        };
        let fd = match open_dir(parent.as_raw_fd(), &name, libc::O_NOFOLLOW) {
            Ok(fd) => fd,
            Err(e) => {
                // SAFETY: a NUL-terminated name relative to a descriptor we own.
                unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) };
                return Err(e);
            }
        };
        let dir = PrivateDir { parent, name, fd };
        // A directory someone swapped in under our name is not ours:
        // only this process's user could have made one owned by it.
        let st = stat_at(&dir.fd, c".")?;
        // SAFETY: geteuid cannot fail.
        if st.st_uid != unsafe { libc::geteuid() } || st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the private directory was replaced",
            ));
        }
        // The umask may have taken owner bits away; only the owner may
        // enter, whatever the umask left.
        // SAFETY: fchmod on a descriptor we own.
        check(unsafe { libc::fchmod(dir.fd.as_raw_fd(), 0o700) })?;
        Ok(dir)
    }
}

impl Drop for PrivateDir<'_> {
    fn drop(&mut self) {
        // SAFETY: NUL-terminated names, descriptors we own. Failures leave
        // at most an empty directory or a dead socket behind.
        unsafe {
            libc::unlinkat(self.fd.as_raw_fd(), INNER.as_ptr(), 0);
            libc::unlinkat(
                self.parent.as_raw_fd(),
                self.name.as_ptr(),
                libc::AT_REMOVEDIR,
            );
        }
    }
}

/// What is at the final path now.
enum Existing {
    Nothing,
    StaleSocket,
}

fn existing(parent: &OwnedFd, name: &CStr, path: &Path) -> Result<Existing, SocketError> {
    let st = match stat_at(parent, name) {
        Ok(st) => st,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(cause) => {
            return Err(SocketError::Io {
                path: path.to_path_buf(),
                what: "cannot inspect the existing path",
                cause,
            })
        }
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(SocketError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::InUse(path.to_path_buf())),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(Existing::StaleSocket),
        Err(cause) => Err(SocketError::Io {
            path: path.to_path_buf(),
            what: "cannot tell whether the existing socket is in use",
            cause,
        }),
    }
}

/// Creates a listening socket at `path` with exactly `opts`' mode and
/// group from the moment it appears there. A stale socket at `path` is
/// replaced; a live one, or anything that is not a socket, is refused.
pub fn bind(path: &Path, opts: &SocketOptions) -> Result<UnixListener, SocketError> {
    let fail = |what, cause| SocketError::Io {
        path: path.to_path_buf(),
        what,
        cause,
    };
    if path.as_os_str().len() > SUN_PATH_MAX {
        return Err(SocketError::TooLong(path.to_path_buf()));
    }
    let base = path
        .file_name()
        .ok_or_else(|| fail("no file name", io::ErrorKind::InvalidInput.into()))?;
    let parent_path = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = cstr(base.as_bytes()).map_err(|e| fail("bad file name", e))?;
    let parent_c = cstr(parent_path.as_os_str().as_bytes()).map_err(|e| fail("bad path", e))?;
    // The directory is opened once: every later step is relative to it.
    // It may be reached through symlinks (/var/run): the administrator
    // chose it; only what is inside it is untrusted.
    let parent =
        open_dir(libc::AT_FDCWD, &parent_c, 0).map_err(|e| fail("cannot open its directory", e))?;
    let stale = existing(&parent, &name, path)?;
    let dir = PrivateDir::create(&parent, base)
        .map_err(|e| fail("cannot create a private directory beside it", e))?;

    // Bind by a path through the directory's name when it fits, else
    // through the descriptor (long paths): either way the socket lands in
    // a directory only we can enter, whatever mode the umask gives it.
    let mut direct = parent_path.as_os_str().as_bytes().to_vec();
    direct.push(b'/');
    direct.extend_from_slice(dir.name.to_bytes());
    direct.push(b'/');
    direct.extend_from_slice(INNER.to_bytes());
    let bind_path = if direct.len() <= SUN_PATH_MAX {
        PathBuf::from(OsStr::from_bytes(&direct))
    } else {
        PathBuf::from(format!(
            "/proc/self/fd/{}/{}",
            dir.fd.as_raw_fd(),
            INNER.to_string_lossy()
        ))
    };
    let listener = UnixListener::bind(&bind_path).map_err(|e| fail("bind", e))?;
    // The socket must be in our directory (not in one swapped in under
    // its name before the bind): nobody else can put one there.
    let st = stat_at(&dir.fd, INNER).map_err(|e| fail("the bound socket is missing", e))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(fail(
            "the bound socket is missing",
            io::ErrorKind::NotFound.into(),
        ));
    }
    if let Some(gid) = opts.group {
        // SAFETY: NUL-terminated name in a directory we own; no symlink
        // can be there, and AT_SYMLINK_NOFOLLOW makes sure.
        check(unsafe {
            libc::fchownat(
                dir.fd.as_raw_fd(),
                INNER.as_ptr(),
                libc::uid_t::MAX,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map_err(|e| {
            fail(
                "cannot give the socket its group (vubd must be root or in the group)",
                e,
            )
        })?;
    }
    // SAFETY: as above; fchmodat cannot refuse to follow, but nothing in
    // our directory is a symlink.
    check(unsafe { libc::fchmodat(dir.fd.as_raw_fd(), INNER.as_ptr(), opts.mode, 0) })
        .map_err(|e| fail("cannot set the socket's mode", e))?;

    if let Existing::StaleSocket = stale {
        log::info!("removing stale socket {}", path.display());
        // SAFETY: NUL-terminated name relative to a descriptor we own.
        check(unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), 0) })
            .or_else(|e| match e.kind() {
                io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
            .map_err(|e| fail("cannot remove the stale socket", e))?;
    }
    // NOREPLACE: whatever appeared at the path since it was checked (a
    // racing daemon's socket, a planted file) stays, and we fail.
    // SAFETY: NUL-terminated names relative to descriptors we own.
    check(unsafe {
        libc::renameat2(
            dir.fd.as_raw_fd(),
            INNER.as_ptr(),
            parent.as_raw_fd(),
            name.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    })
    .map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => fail("something appeared at the path meanwhile", e),
        _ => fail("cannot move the socket into place", e),
    })?;
    drop(dir);
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0o640"), Ok(0o640));
        for bad in [
            "0666", "0601", "0604", "1660", "0060", "", "8", "-600", "0x600",
        ] {
            assert!(parse_mode(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn groups() {
        assert_eq!(parse_group("root"), Ok(0));
        assert_eq!(parse_group("0"), Ok(0));
        assert_eq!(parse_group("65534"), Ok(65534));
        for bad in [
            "",
            "no-such-group-here",
            "4294967295",
            "99999999999",
            "a\0b",
        ] {
            assert!(parse_group(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// A socket whose listener is gone is replaced, a live one is not; a
    /// bound socket gets its mode.
    #[test]
    fn stale_and_live() {
        let dir = std::env::temp_dir().join(format!("vubd-unix-socket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        drop(UnixListener::bind(&path).unwrap());
        let opts = SocketOptions {
            mode: 0o640,
            group: None,
        };
        let live = bind(&path, &opts).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        assert!(matches!(bind(&path, &opts), Err(SocketError::InUse(_))));
        drop(live);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
