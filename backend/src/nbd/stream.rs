//! One NBD connection on either kind of socket, for the server and the
//! client alike.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Idle time before TCP starts probing a silent peer.
const KEEPALIVE_IDLE_SECS: libc::c_int = 15;
/// Time between probes.
const KEEPALIVE_INTERVAL_SECS: libc::c_int = 5;
/// Unanswered probes after which the connection is dropped.
const KEEPALIVE_PROBES: libc::c_int = 4;
/// Longest data may stay unacknowledged before the connection is dropped.
const USER_TIMEOUT_MS: libc::c_int =
    (KEEPALIVE_IDLE_SECS + KEEPALIVE_INTERVAL_SECS * KEEPALIVE_PROBES) * 1000;

/// A connection on a unix or a TCP socket.
#[derive(Debug)]
pub enum Stream {
    /// A unix socket connection.
    Unix(UnixStream),
    /// A TCP connection.
    Tcp(TcpStream),
}

impl Stream {
    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }

    /// A second handle on the same socket (a reader's beside a writer's).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Ends the connection in both directions, waking a thread blocked on it.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Sets an integer socket option; a failure only costs speed.
    fn set_int_option(&self, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
        // SAFETY: setsockopt on a socket we own, with a c_int option value
        // of the size given.
        unsafe {
            libc::setsockopt(
                self.fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }

    /// Asks for a send buffer of `bytes` (the kernel caps it at
    /// `net.core.wmem_max`); a failure leaves the default.
    pub fn set_send_buffer(&self, bytes: usize) {
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        self.set_int_option(libc::SOL_SOCKET, libc::SO_SNDBUF, v);
    }

    /// Asks TCP to acknowledge what arrived at once. A server that leaves
    /// Nagle on (qemu-storage-daemon 7.2) holds its next small reply until
    /// the last one is acknowledged, and a client waiting for replies
    /// sends nothing for the ack to ride on: without this, each such wait
    /// costs a delayed-ack time-out (40 ms).
    pub fn quickack(&self) {
        if let Stream::Tcp(_) = self {
            self.set_int_option(libc::IPPROTO_TCP, libc::TCP_QUICKACK, 1);
        }
    }

    /// Makes the kernel drop a TCP connection whose peer vanished (a host
    /// gone, a network partition: no FIN or RST ever arrives) within about
    /// half a minute, idle or not: keepalive probes after
    /// [`KEEPALIVE_IDLE_SECS`], and data unacknowledged for
    /// [`USER_TIMEOUT_MS`]. Without it a server's idle connection thread
    /// waits for ever, holding a `max-connections` slot a reconnecting
    /// migration source needs, and a client notices only when TCP's
    /// retransmissions give up (15 minutes by default). A unix socket is
    /// left as it is; a failure leaves the kernel's defaults.
    pub fn detect_dead_peer(&self) {
        if let Stream::Tcp(_) = self {
            self.set_int_option(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
            self.set_int_option(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_SECS);
            self.set_int_option(
                libc::IPPROTO_TCP,
                libc::TCP_KEEPINTVL,
                KEEPALIVE_INTERVAL_SECS,
            );
            self.set_int_option(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_PROBES);
            self.set_int_option(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, USER_TIMEOUT_MS);
        }
    }

    /// Time-out of each read (`None`: wait for ever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Time-out of each write (`None`: wait for ever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
