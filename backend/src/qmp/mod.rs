//! vubd's management plane: a QMP-compatible monitor on a unix socket.
//!
//! QMP is QEMU's JSON protocol; speaking it exactly (greeting, capabilities
//! negotiation, `execute`/`arguments`/`id`, `return`/`error`, timestamped
//! events, QEMU's error classes and texts) lets existing QMP clients,
//! libraries (PyPI `qemu.qmp`, `qmp-shell`) and scripts drive vubd
//! unchanged. The pieces, from the wire inwards:
//!
//! - [`server`]: the unix socket (mode 0600), a reader and a writer thread
//!   per client, one ordered queue per client for replies and events.
//! - [`json`]: splitting the byte stream into JSON messages; QEMU's output
//!   formatting.
//! - [`dispatch`]: the transport-independent command layer: registry,
//!   negotiation, envelope checks, `id` echo.
//! - [`args`]: argument reading with QEMU's error wording.
//! - [`commands`]: the standard commands, bound to a [`ManagementContext`].
//! - [`transaction`]: `transaction`, its action trait and phases.
//! - [`events`]: the [`EventBus`] any part of the daemon emits events on.
//!
//! Typical wiring in the daemon:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use vubd_backend::qmp::*;
//! # fn demo(ctx: Arc<dyn ManagementContext>) -> Result<(), QmpServerError> {
//! let events = EventBus::new();
//! let dispatcher = standard_dispatcher(ctx, events.clone());
//! let server = QmpServer::start("/run/vubd/qmp.sock".as_ref(), dispatcher, ServerConfig::default())?;
//! // ... on SIGTERM: events.emit("SHUTDOWN", serde_json::json!({"guest": false, "reason": "host-signal"}));
//! server.shutdown();
//! # Ok(()) }
//! ```

pub mod args;
pub mod commands;
pub mod context;
pub mod dirty_adapter;
pub mod dispatch;
pub mod error;
pub mod events;
pub mod json;
pub mod server;
pub mod transaction;

pub use args::Args;
pub use context::{
    BitmapInfo, BitmapOpError, BitmapTransaction, DirtyBitmaps, DiskInfo, ManagementContext,
};
pub use dispatch::{Call, Dispatcher, Response, Session, VersionInfo};
pub use error::{ErrorClass, QmpError};
pub use events::{Event, EventBus};
pub use server::{QmpServer, QmpServerError, ServerConfig};

use std::sync::Arc;

/// A dispatcher with the protocol commands and every standard command
/// bound to `ctx`, reporting QEMU 7.2 / `vubd VERSION`. More commands
/// (block jobs) can be added with [`Dispatcher::register`].
pub fn standard_dispatcher(ctx: Arc<dyn ManagementContext>, events: EventBus) -> Arc<Dispatcher> {
    let d = Dispatcher::new(events, VersionInfo::default());
    commands::register_standard(&d, ctx);
    d
}

#[cfg(test)]
mod tests;
