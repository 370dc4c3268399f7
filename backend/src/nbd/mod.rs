//! vubd's NBD server: exports of the disk (and later of any node) to
//! stock NBD clients (`nbdinfo`, `nbdcopy`, `qemu-img`, QEMU's NBD client),
//! with structured replies and the metadata contexts `base:allocation`,
//! `qemu:allocation-depth` and `qemu:dirty-bitmap:NAME` that pull-mode
//! incremental backup reads. Our own implementation of the protocol:
//!
//! - [`proto`]: wire constants, header encoders and parsers;
//! - [`handshake`]: the fixed newstyle option negotiation;
//! - [`transmission`]: the request loop of one connection;
//! - [`server`]: sockets, threads, connection limits and time-outs;
//! - [`stream`]: one connection on a unix or TCP socket (server and client);
//! - [`client`]: the NBD client, an image node over a remote export;
//! - [`export`]: the exports, their clients and their removal;
//! - [`source`]: [`ExportSource`], what an export reads and writes;
//! - [`qmp`]: the QMP commands (`nbd-server-start`, `block-export-add`, ...).

pub mod client;
pub mod export;
pub mod handshake;
pub mod proto;
pub mod qmp;
pub mod server;
pub mod source;
pub mod stream;
pub mod transmission;

pub use qmp::{register_nbd_commands, DiskNode, NbdService, NodeLookup, NodeRelease};
pub use source::{Allocation, DiskSource, ExportSource, SourceError};

#[cfg(test)]
mod tests;
