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

pub use super::stream::Stream;
use std::io;
use std::net::TcpStream;
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
                let s = Stream::Tcp(s);
                s.detect_dead_peer();
                Ok(s)
            }
        }
    }
}
