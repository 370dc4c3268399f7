//! vubd's NBD client: a remote NBD export as an [`Image`](crate::Image)
//! node (QEMU's `blockdev-add driver=nbd`), so that a mirror can copy a
//! disk to another host and the disk can even be served from there.
//!
//! - [`handshake`]: connecting and the fixed newstyle negotiation
//!   (structured replies, `base:allocation`, `NBD_OPT_GO`);
//! - [`conn`]: the transmission phase: many requests in flight on one
//!   connection, a reader thread matching replies to waiters, bounded
//!   in-flight bytes, and QEMU's `reconnect-delay`;
//! - [`image`]: [`NbdImage`], the `Image` implementation.
//!
//! Everything a server sends is checked before it is used: a length
//! beyond what the request asked for, an unknown handle or a reply that
//! breaks the protocol ends the connection and fails the requests on it
//! with EIO; nothing a server sends makes the client allocate more than
//! the requests it has in flight.

pub mod conn;
pub mod handshake;
pub mod image;

pub use conn::{Client, ClientOptions};
pub use handshake::ExportInfo;
pub use image::NbdImage;

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

#[cfg(test)]
mod tests;

/// Where the NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddress {
    /// A unix socket.
    Unix(PathBuf),
    /// A TCP host and port (number or service name).
    Inet {
        /// Host name or address.
        host: String,
        /// Port.
        port: String,
    },
}

impl ServerAddress {
    /// The NBD URI QEMU shows for `export` on this server.
    pub fn uri(&self, export: &str) -> String {
        match self {
            ServerAddress::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            ServerAddress::Inet { host, port } => format!("nbd://{host}:{port}/{export}"),
        }
    }

    /// The address as QEMU names it in connection errors.
    pub fn display(&self) -> String {
        match self {
            ServerAddress::Unix(p) => p.display().to_string(),
            ServerAddress::Inet { host, port } => format!("{host}:{port}"),
        }
    }
}

/// Errors of connecting and negotiating.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected.
    #[error("Failed to connect to '{addr}': {cause}")]
    Connect {
        /// The address, as QEMU shows it.
        addr: String,
        /// The OS error.
        cause: io::Error,
    },
    /// The connection broke during the handshake.
    #[error("Failed to read initial magic: {0}")]
    Io(#[from] io::Error),
    /// The server does not speak the protocol as we need it.
    #[error("{0}")]
    Protocol(String),
    /// The server refused the export.
    #[error("Requested export not available")]
    NoExport,
}

/// One connection, on either kind of socket.
#[derive(Debug)]
pub enum Stream {
    /// Unix socket.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

impl Stream {
    /// Connects to `addr`.
    pub fn connect(addr: &ServerAddress) -> Result<Stream, ClientError> {
        let err = |cause| ClientError::Connect {
            addr: addr.display(),
            cause,
        };
        match addr {
            ServerAddress::Unix(p) => UnixStream::connect(p).map(Stream::Unix).map_err(err),
            ServerAddress::Inet { host, port } => {
                let port: u16 = port.parse().map_err(|_| {
                    err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "Service not available",
                    ))
                })?;
                let s = TcpStream::connect((host.as_str(), port)).map_err(err)?;
                // Requests are written header then payload; Nagle would
                // hold a small one back waiting for an ack.
                s.set_nodelay(true).map_err(err)?;
                Ok(Stream::Tcp(s))
            }
        }
    }

    /// A second handle on the same socket (the reader's).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Ends both directions, waking a reader blocked on the socket.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Asks TCP to acknowledge what arrived at once. A server that leaves
    /// Nagle on (qemu-storage-daemon 7.2) holds its next small reply until
    /// the last one is acknowledged, and a client waiting for replies
    /// sends nothing for the ack to ride on: without this, each such wait
    /// costs a delayed-ack time-out (40 ms).
    pub fn quickack(&self) {
        if let Stream::Tcp(s) = self {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt on a socket we own, with a valid int.
            unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(s),
                    libc::IPPROTO_TCP,
                    libc::TCP_QUICKACK,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }

    /// Time-out of each read (`None`: wait for ever).
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Time-out of each write (`None`: wait for ever).
    pub fn set_write_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
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
