//! The exports of the NBD server: what each one serves, which clients use
//! it, and its removal (QEMU's `safe` and `hard` modes, with
//! `BLOCK_EXPORT_DELETED` once the last client has gone).

use super::server::Stream;
use super::source::ExportSource;
use crate::qmp::{DirtyBitmaps, EventBus};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// A dirty bitmap an export offers as `qemu:dirty-bitmap:NAME`.
pub struct ExportBitmap {
    /// The bitmap's name.
    pub name: String,
    /// The engine holding it (the bitmap is marked busy while exported).
    pub engine: Arc<dyn DirtyBitmaps>,
}

/// What `block-export-add` asked for.
pub struct ExportConfig {
    /// The export id (`id`).
    pub id: String,
    /// The NBD export name.
    pub name: String,
    /// Free text shown by `nbdinfo --list`.
    pub description: Option<String>,
    /// The exported node.
    pub node: String,
    /// Clients may write.
    pub writable: bool,
    /// Every write is durable before it completes.
    pub writethrough: bool,
    /// Offer `qemu:allocation-depth`.
    pub allocation_depth: bool,
    /// The data.
    pub source: Arc<dyn ExportSource>,
    /// The exported bitmaps, already marked busy.
    pub bitmaps: Vec<ExportBitmap>,
    /// Lets go of the exported node when the export is gone.
    pub release: Option<super::qmp::NodeRelease>,
}

/// One export.
pub struct Export {
    /// What it serves.
    pub config: ExportConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Clients in transmission on this export, by connection id.
    clients: HashMap<u64, Stream>,
    shutting_down: bool,
}

impl Export {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True while a hard removal waits for its clients to go.
    pub fn shutting_down(&self) -> bool {
        self.state().shutting_down
    }
}

/// Why an export could not be removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoveError {
    /// No export with that id (or name).
    #[error("Export '{0}' is not found")]
    NotFound(String),
    /// `safe` removal of an export clients still use.
    #[error("export '{0}' still in use")]
    InUse(String),
    /// A removal is already waiting for the export's clients to go.
    #[error("Export '{0}' is already shutting down")]
    ShuttingDown(String),
}

/// The server's exports, in the order they were added.
pub struct Exports {
    list: Mutex<Vec<Arc<Export>>>,
    events: EventBus,
    /// Connection ids: they live as long as the exports, not one server
    /// run, since a client of a stopped server may still detach later.
    next_conn: AtomicU64,
}

impl Exports {
    /// An empty registry emitting `BLOCK_EXPORT_DELETED` on `events`.
    pub fn new(events: EventBus) -> Exports {
        Exports {
            list: Mutex::new(Vec::new()),
            events,
            next_conn: AtomicU64::new(0),
        }
    }

    fn list(&self) -> MutexGuard<'_, Vec<Arc<Export>>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection id never handed out before by this registry.
    pub fn connection_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Every export, oldest first.
    pub fn all(&self) -> Vec<Arc<Export>> {
        self.list().clone()
    }

    /// The export clients can open under `name` (not one being removed).
    pub fn by_name(&self, name: &str) -> Option<Arc<Export>> {
        self.list()
            .iter()
            .find(|e| e.config.name == name && !e.shutting_down())
            .cloned()
    }

    /// True if an export (even one being removed) has this id.
    pub fn id_in_use(&self, id: &str) -> bool {
        self.list().iter().any(|e| e.config.id == id)
    }

    /// True if a live export has this name.
    pub fn name_in_use(&self, name: &str) -> bool {
        self.by_name(name).is_some()
    }

    /// Adds an export (the caller checked id and name).
    pub fn add(&self, config: ExportConfig) {
        self.list().push(Arc::new(Export {
            config,
            state: Mutex::new(State::default()),
        }));
    }

    /// Registers a client entering transmission on `export`; false if the
    /// export is being removed meanwhile.
    pub fn attach(&self, export: &Export, conn: u64, stream: Stream) -> bool {
        let mut st = export.state();
        if st.shutting_down {
            return false;
        }
        st.clients.insert(conn, stream);
        true
    }

    /// Connection `conn` has closed: it leaves the export it used (if
    /// any), which completes a removal waiting for it.
    pub fn detach(&self, conn: u64) {
        for export in self.all() {
            let done = {
                let mut st = export.state();
                st.clients.remove(&conn).is_some() && st.shutting_down && st.clients.is_empty()
            };
            if done {
                self.finish(&export);
            }
        }
    }

    /// Removes the export with id `id` (`hard`: disconnecting its clients).
    pub fn remove(&self, id: &str, hard: bool) -> Result<(), RemoveError> {
        let export = self
            .list()
            .iter()
            .find(|e| e.config.id == id)
            .cloned()
            .ok_or_else(|| RemoveError::NotFound(id.to_string()))?;
        self.shut_down(&export, hard)
    }

    /// Removes every export, disconnecting their clients.
    pub fn remove_all(&self) {
        for export in self.all() {
            let _ = self.shut_down(&export, true);
        }
    }

    fn shut_down(&self, export: &Arc<Export>, hard: bool) -> Result<(), RemoveError> {
        let done = {
            let mut st = export.state();
            if st.shutting_down {
                return Err(RemoveError::ShuttingDown(export.config.id.clone()));
            }
            if !hard && !st.clients.is_empty() {
                return Err(RemoveError::InUse(export.config.id.clone()));
            }
            st.shutting_down = true;
            for s in st.clients.values() {
                s.shutdown();
            }
            st.clients.is_empty()
        };
        if done {
            self.finish(export);
        }
        Ok(())
    }

    fn finish(&self, export: &Arc<Export>) {
        self.list().retain(|e| !Arc::ptr_eq(e, export));
        for b in &export.config.bitmaps {
            if let Err(e) = b.engine.set_busy(&b.name, false) {
                log::warn!("NBD: cannot release bitmap {}: {e}", b.name);
            }
        }
        if let Some(release) = &export.config.release {
            release();
        }
        self.events
            .emit("BLOCK_EXPORT_DELETED", json!({"id": export.config.id}));
    }
}
