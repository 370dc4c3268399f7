//! Image locks compatible with QEMU's `file` driver (`locking=on`).
//!
//! QEMU marks the permissions a user of an image holds, and those it does
//! not let others hold, with shared OFD byte-range locks on the image: one
//! byte at 100 + *i* for each permission *i* taken, one byte at 200 + *i*
//! for each permission *i* not shared. Before it uses an image it tests,
//! for each permission it wants, that nobody locks "not shared" for it,
//! and for each permission it does not share, that nobody locks "taken".
//! Taking the same bytes here makes QEMU, `qemu-img` and a second vubd see
//! vubd as what it is, a guest's disk: "Failed to get "write" lock", and
//! `qemu-img -U` (force-share) still reads. The locks belong to the open
//! file description: they go when the image is closed, or the process dies.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// QEMU's block permissions (`BLK_PERM_*`, QEMU 7.2), as lock byte offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms(u8);

impl Perms {
    /// Nothing.
    pub const NONE: Perms = Perms(0);
    /// `BLK_PERM_CONSISTENT_READ`.
    pub const CONSISTENT_READ: Perms = Perms(1 << 0);
    /// `BLK_PERM_WRITE`.
    pub const WRITE: Perms = Perms(1 << 1);
    /// `BLK_PERM_WRITE_UNCHANGED`.
    pub const WRITE_UNCHANGED: Perms = Perms(1 << 2);
    /// `BLK_PERM_RESIZE`.
    pub const RESIZE: Perms = Perms(1 << 3);
    /// Every permission.
    pub const ALL: Perms = Perms(0xf);
    /// The names QEMU prints, by bit.
    const NAMES: [&'static str; 4] = ["consistent read", "write", "write unchanged", "resize"];

    /// Both sets.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    fn has(self, bit: usize) -> bool {
        self.0 & (1 << bit) != 0
    }
}

/// What a guest's disk holds, as QEMU's virtio-blk device takes it
/// (`share-rw=off`): it reads (and writes, unless read-only), and lets
/// others read and write unchanged data only.
pub fn guest_disk_perms(read_only: bool) -> (Perms, Perms) {
    let take = if read_only {
        Perms::CONSISTENT_READ
    } else {
        Perms::CONSISTENT_READ.union(Perms::WRITE)
    };
    (take, Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED))
}

/// QEMU's first lock byte of "permission taken".
const PERM_BASE: i64 = 100;
/// QEMU's first lock byte of "permission not shared".
const SHARED_BASE: i64 = 200;

/// Why an image could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another user holds a permission we want, or wants one we hold
    /// (QEMU's words).
    #[error("Failed to get {}\"{name}\" lock", if *.shared { "shared " } else { "" })]
    Conflict {
        /// The permission.
        name: &'static str,
        /// The conflict is with a permission we do not share.
        shared: bool,
    },
    /// The lock calls failed.
    #[error("cannot lock: {0}")]
    Io(#[from] io::Error),
}

fn fcntl_lock(file: &File, cmd: libc::c_int, lock: &mut libc::flock) -> io::Result<()> {
    // SAFETY: `lock` is a valid flock for the duration of the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), cmd, lock as *mut libc::flock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn flock_at(kind: libc::c_int, offset: i64) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value (l_pid must be
    // 0 for OFD locks).
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind as libc::c_short;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l.l_start = offset;
    l.l_len = 1;
    l
}

/// Whether another open file description holds a lock on byte `offset`.
fn held_elsewhere(file: &File, offset: i64) -> io::Result<bool> {
    let mut l = flock_at(libc::F_WRLCK, offset);
    fcntl_lock(file, libc::F_OFD_GETLK, &mut l)?;
    Ok(l.l_type != libc::F_UNLCK as libc::c_short)
}

/// Takes `take` and refuses to share what `share` leaves out, on `file`,
/// as QEMU does: the bytes are locked first, then the other users'
/// bytes are tested, so of two users racing at least one sees the other.
/// On a conflict the bytes taken are released again.
pub fn lock_image(file: &File, take: Perms, share: Perms) -> Result<(), LockError> {
    let unshared = Perms(Perms::ALL.0 & !share.0);
    let result = (|| {
        for bit in 0..Perms::NAMES.len() {
            if take.has(bit) {
                fcntl_lock(
                    file,
                    libc::F_OFD_SETLK,
                    &mut flock_at(libc::F_RDLCK, PERM_BASE + bit as i64),
                )?;
            }
            if unshared.has(bit) {
                fcntl_lock(
                    file,
                    libc::F_OFD_SETLK,
                    &mut flock_at(libc::F_RDLCK, SHARED_BASE + bit as i64),
                )?;
            }
        }
        for (bit, name) in Perms::NAMES.iter().enumerate() {
            if take.has(bit) && held_elsewhere(file, SHARED_BASE + bit as i64)? {
                return Err(LockError::Conflict {
                    name,
                    shared: false,
                });
            }
        }
        for (bit, name) in Perms::NAMES.iter().enumerate() {
            if unshared.has(bit) && held_elsewhere(file, PERM_BASE + bit as i64)? {
                return Err(LockError::Conflict { name, shared: true });
            }
        }
        Ok(())
    })();
    if result.is_err() {
        unlock_image(file);
    }
    result
}

/// Releases every lock byte [`lock_image`] takes on `file`.
pub fn unlock_image(file: &File) {
    let mut l = flock_at(libc::F_UNLCK, PERM_BASE);
    l.l_len = SHARED_BASE - PERM_BASE + Perms::NAMES.len() as i64;
    // Unlocking cannot conflict; a failure leaves the bytes until close.
    let _ = fcntl_lock(file, libc::F_OFD_SETLK, &mut l);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_file(tag: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("vubd-lock-{tag}-{}", std::process::id()));
        File::create(&p).unwrap().set_len(1 << 20).unwrap();
        p
    }

    #[test]
    fn a_second_writer_is_refused_and_a_reader_that_shares_writes_is_not() {
        let p = scratch_file("two");
        let (take, share) = guest_disk_perms(false);
        let a = File::options().read(true).write(true).open(&p).unwrap();
        lock_image(&a, take, share).unwrap();
        let b = File::options().read(true).write(true).open(&p).unwrap();
        assert_eq!(
            lock_image(&b, take, share).unwrap_err().to_string(),
            "Failed to get \"write\" lock"
        );
        // A reader that does not share write (qemu-img without -U).
        let c = File::open(&p).unwrap();
        assert_eq!(
            lock_image(
                &c,
                Perms::CONSISTENT_READ,
                Perms(Perms::ALL.0 & !Perms::WRITE.0)
            )
            .unwrap_err()
            .to_string(),
            "Failed to get shared \"write\" lock"
        );
        // Force-share: takes nothing, shares everything.
        lock_image(&c, Perms::NONE, Perms::ALL).unwrap();
        // The refused ones left no bytes behind: once `a` is closed, a
        // writer gets the image.
        drop(a);
        lock_image(&b, take, share).unwrap();
        std::fs::remove_file(&p).unwrap();
    }
}
