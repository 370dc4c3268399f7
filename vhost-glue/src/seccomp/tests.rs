//! The filters with the real kernel: a child process confines itself and
//! makes an allowed, then a forbidden call.

use super::*;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

/// Runs this test binary again as a child that runs `case` (see
/// `child_case`) and returns its status and stderr.
fn run_child(case: &str) -> (std::process::ExitStatus, String) {
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args([
            "--exact",
            "seccomp::tests::child_case",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("VUBD_SECCOMP_CASE", case)
        .output()
        .expect("run child");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Not a test of its own: the child's side of the tests below.
#[test]
fn child_case() {
    let Ok(case) = std::env::var("VUBD_SECCOMP_CASE") else {
        return;
    };
    let mode = if case.ends_with("-log") {
        Mode::Log
    } else if case.ends_with("-kill") {
        Mode::Kill
    } else {
        Mode::Trap
    };
    install(mode).expect("install");
    enter(Kind::Queue);
    // Allowed: a queue thread reads and writes open files.
    let mut fds = [0; 2];
    // SAFETY: plain calls on our own descriptors.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), 0), 0);
        assert_eq!(libc::write(fds[1], b"x".as_ptr().cast(), 1), 1);
    }
    let existing = c"/proc/self/stat";
    // SAFETY: a valid path; the descriptor is closed again.
    unsafe {
        let fd = libc::openat(
            libc::AT_FDCWD,
            existing.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        assert!(fd >= 0);
        libc::close(fd);
    }
    eprintln!("allowed calls passed");
    if case == "create" {
        let path = c"/tmp/vubd-seccomp-must-not-exist";
        // SAFETY: forbidden for queue threads; with the filter it never returns.
        let fd = unsafe {
            libc::openat(
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::O_RDWR | libc::O_CREAT | libc::O_CLOEXEC,
                0o600,
            )
        };
        eprintln!("create returned {fd}");
    }
    // SAFETY: forbidden for queue threads; with the filter it never returns.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) };
    eprintln!("netlink socket returned {fd}");
    if case.starts_with("exec") {
        let _ = Command::new("/bin/true").status();
        eprintln!("exec returned");
    }
}

#[test]
fn queue_filter_kills_a_forbidden_socket_with_a_message() {
    let (status, stderr) = run_child("socket");
    assert!(stderr.contains("allowed calls passed"), "{stderr}");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}: {stderr}");
    assert!(
        stderr.contains(&format!(
            "(filter: queue) made forbidden system call {}",
            libc::SYS_socket
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("netlink socket returned"), "{stderr}");
}

#[test]
fn kill_mode_kills_without_a_handler() {
    let (status, stderr) = run_child("socket-kill");
    assert!(stderr.contains("allowed calls passed"), "{stderr}");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}: {stderr}");
    assert!(!stderr.contains("forbidden system call"), "{stderr}");
    assert!(!stderr.contains("netlink socket returned"), "{stderr}");
}

#[test]
fn queue_filter_kills_a_file_creation() {
    let (status, stderr) = run_child("create");
    assert!(stderr.contains("allowed calls passed"), "{stderr}");
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}: {stderr}");
    assert!(
        stderr.contains(&format!("made forbidden system call {}", libc::SYS_openat)),
        "{stderr}"
    );
    assert!(!stderr.contains("create returned"), "{stderr}");
}

#[test]
fn queue_filter_in_log_mode_lets_calls_pass() {
    let (status, stderr) = run_child("exec-log");
    assert!(status.success(), "{status:?}: {stderr}");
    assert!(stderr.contains("netlink socket returned"), "{stderr}");
    assert!(stderr.contains("exec returned"), "{stderr}");
}

#[test]
fn every_kind_allows_what_its_children_need() {
    for kind in KINDS {
        let parent = kind.rules().into_map();
        for child in kind.children() {
            for call in child.rules().into_map().keys() {
                assert!(
                    parent.contains_key(call),
                    "{kind:?} lacks {call} of {child:?}"
                );
            }
        }
    }
}

#[test]
fn queue_threads_cannot_exec_trace_or_create() {
    let queue = Kind::Queue.rules().into_map();
    for call in [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_socket,
    ] {
        assert!(!queue.contains_key(&call), "{call}");
    }
    // Opening is conditional (existing files, no O_CREAT).
    assert!(queue.get(&libc::SYS_openat).is_some_and(|r| !r.is_empty()));
}
