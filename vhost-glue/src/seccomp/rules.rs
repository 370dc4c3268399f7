//! The allow-lists: what each kind of thread calls, and why.

use super::Kind;
use libc::*;
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use std::collections::BTreeMap;

/// Allowed calls: unconditionally (`None`) or when one of the rules holds.
#[derive(Default)]
pub(super) struct Rules(BTreeMap<i64, Option<Vec<SeccompRule>>>);

impl Rules {
    pub(super) fn new() -> Self {
        Self::default()
    }

    fn allow(&mut self, calls: &[c_long]) {
        for call in calls {
            self.0.insert(*call, None);
        }
    }

    /// Allows `call` when argument `arg` is one of `values`.
    fn allow_arg(&mut self, call: c_long, arg: u8, values: &[u64]) {
        let entry = self.0.entry(call).or_insert_with(|| Some(Vec::new()));
        if let Some(rules) = entry {
            for v in values {
                // Constant, valid arguments: these cannot fail.
                if let Ok(c) =
                    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *v)
                {
                    if let Ok(r) = SeccompRule::new(vec![c]) {
                        rules.push(r);
                    }
                }
            }
        }
    }

    pub(super) fn into_map(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0
            .into_iter()
            .map(|(call, rules)| (call, rules.unwrap_or_default()))
            .collect()
    }
}

/// Adds the calls threads of `kind` make themselves.
pub(super) fn add_own(kind: Kind, r: &mut Rules) {
    common(r);
    match kind {
        Kind::Main => main(r),
        Kind::Queue => queue(r),
        Kind::Qmp => qmp(r),
        Kind::Job => job(r),
        Kind::BitmapWriter => files(r),
        Kind::Nbd => nbd(r),
    }
}

/// Every Rust thread: memory, locks, time, its own start and exit, and the
/// SIGSYS handler's message and death (prctl names the thread in it).
fn common(r: &mut Rules) {
    r.allow(&[
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_close,
        SYS_futex,
        SYS_mmap,
        SYS_munmap,
        SYS_mprotect,
        SYS_madvise,
        SYS_mremap,
        SYS_brk,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
        SYS_exit,
        SYS_exit_group,
        SYS_getpid,
        SYS_gettid,
        SYS_getuid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getegid,
        SYS_tgkill,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_getrandom,
        SYS_prctl,
        SYS_set_robust_list,
        SYS_rseq,
        // A wait interrupted by a stop signal (SIGSTOP/SIGCONT) resumes.
        SYS_restart_syscall,
        // Waiting on eventfds and sockets with timeouts.
        SYS_poll,
        SYS_ppoll,
        SYS_epoll_wait,
        SYS_epoll_pwait,
        SYS_epoll_ctl,
        SYS_fstat,
        SYS_newfstatat,
        SYS_statx,
        SYS_fcntl,
    ]);
    // A thread adds its own kind's filter on top of the one it inherited
    // (more filters only ever narrow what is allowed).
    r.allow_arg(SYS_seccomp, 0, &[SECCOMP_SET_MODE_FILTER as u64]);
    // ioctl: non-blocking sockets and close-on-exec (std), terminal checks
    // of the logger, block-device geometry; nothing else.
    r.allow_arg(
        SYS_ioctl,
        1,
        &[
            FIONBIO,
            FIOCLEX,
            TCGETS,
            0x1268,      // BLKSSZGET
            0x127b,      // BLKPBSZGET
            0x8008_1272, // BLKGETSIZE64
        ],
    );
}

/// Reading and writing images (also done inline by queue threads).
fn disk_io(r: &mut Rules) {
    r.allow(&[
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_preadv2,
        SYS_pwritev2,
        SYS_lseek,
        SYS_fsync,
        SYS_fdatasync,
        // DISCARD and WRITE_ZEROES (punch hole, zero range).
        SYS_fallocate,
        SYS_fstatfs,
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
        SYS_eventfd2,
        // Starting threads (copy-before-write copiers, job copiers).
        SYS_clone,
        SYS_clone3,
    ]);
}

/// Reopening existing files, never creating or truncating one: the
/// bitmap sidecar the first write after a bitmap's creation marks, the
/// CPU count std reads from /proc and /sys.
fn reopen(r: &mut Rules) {
    r.allow_arg(
        SYS_openat,
        2,
        &[(O_RDONLY | O_CLOEXEC) as u64, (O_RDWR | O_CLOEXEC) as u64],
    );
}

/// Traffic on sockets opened elsewhere: the NBD client's connection that
/// a job copies onto, or that serves the guest after a pivot onto an NBD
/// node (its reader thread, started by QMP, connects and reconnects).
fn socket_io(r: &mut Rules) {
    r.allow(&[
        SYS_sendto,
        SYS_sendmsg,
        SYS_recvfrom,
        SYS_recvmsg,
        SYS_shutdown,
        SYS_getsockopt,
    ]);
}

/// Queue workers: guest I/O on open files and NBD connections; no new
/// socket, no new file.
fn queue(r: &mut Rules) {
    disk_io(r);
    reopen(r);
    socket_io(r);
    // The mirror's dirty-chunk notifications and the gate's wake-ups.
    r.allow(&[SYS_pipe2, SYS_msync]);
}

/// Opening, creating and replacing files: sidecars, targets, markers.
fn files(r: &mut Rules) {
    disk_io(r);
    r.allow(&[
        SYS_openat,
        SYS_openat2,
        SYS_unlink,
        SYS_unlinkat,
        SYS_rename,
        SYS_renameat,
        SYS_renameat2,
        SYS_linkat,
        SYS_ftruncate,
        SYS_getdents64,
        SYS_readlink,
        SYS_readlinkat,
        SYS_getcwd,
        SYS_dup,
        SYS_dup3,
        SYS_flock,
        SYS_msync,
        SYS_pipe2,
        SYS_fchmod,
        // Private directories: a socket's before it is renamed into
        // place, the vhost-user relay's.
        SYS_mkdir,
        SYS_mkdirat,
        SYS_rmdir,
    ]);
}

/// Block jobs: copy between open images, create and replace files.
fn job(r: &mut Rules) {
    files(r);
    socket_io(r);
}

/// Sockets of the given families only: no netlink, no packet sockets.
fn sockets(r: &mut Rules) {
    r.allow_arg(
        SYS_socket,
        0,
        &[AF_UNIX as u64, AF_INET as u64, AF_INET6 as u64],
    );
    r.allow(&[
        SYS_bind,
        SYS_listen,
        SYS_accept,
        SYS_accept4,
        SYS_connect,
        SYS_setsockopt,
        SYS_getsockopt,
        SYS_getsockname,
        SYS_getpeername,
        SYS_sendmsg,
        SYS_recvmsg,
        SYS_sendto,
        SYS_recvfrom,
        SYS_shutdown,
        SYS_chmod,
        SYS_fchmodat,
        SYS_fchown,
        SYS_fchownat,
    ]);
}

/// QMP: commands open files, start jobs and servers.
fn qmp(r: &mut Rules) {
    files(r);
    sockets(r);
    r.allow(&[SYS_epoll_create1]);
}

/// NBD server: sockets and reads of open images.
fn nbd(r: &mut Rules) {
    disk_io(r);
    reopen(r);
    sockets(r);
}

/// The vhost-user handler: frontend messages with descriptors, guest
/// memory maps, eventfds, the socket of the next frontend; the shutdown
/// thread's final flush, bitmap write-out and socket removal.
fn main(r: &mut Rules) {
    files(r);
    sockets(r);
    r.allow(&[SYS_epoll_create1, SYS_rt_sigaction, SYS_memfd_create]);
}
