//! The NBD server's QMP commands with QEMU 7.2's names, arguments and error
//! texts: `nbd-server-start` / `nbd-server-stop`, `block-export-add` /
//! `block-export-del` / `query-block-exports` for `type: nbd`, the legacy
//! `nbd-server-add` / `nbd-server-remove`; `BLOCK_EXPORT_DELETED` comes
//! from the export registry.
//!
//! Nodes are found through [`NodeLookup`], so the block-node graph can
//! replace the single disk node without touching these commands.

use super::export::{ExportBitmap, ExportConfig, Exports};
use super::server::{Address, NbdServer};
use super::source::{DiskSource, ExportSource};
use crate::qmp::args::Args;
use crate::qmp::{Call, DirtyBitmaps, Dispatcher, QmpError};
use crate::unix_socket::SocketOptions;
use crate::Disk;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex, MutexGuard};

/// How the NBD commands find nodes and their bitmaps.
pub trait NodeLookup: Send + Sync {
    /// The data of node `node`, or `None` if there is no such node.
    fn source(&self, node: &str) -> Option<Arc<dyn ExportSource>>;
    /// The dirty bitmaps of node `node`, if it has any.
    fn bitmaps(&self, node: &str) -> Option<Arc<dyn DirtyBitmaps>>;
    /// Marks `node` as used by export `export` (so it cannot be deleted
    /// under the export) and returns what lets go of it again.
    fn hold(&self, _node: &str, _export: &str) -> Result<Option<NodeRelease>, QmpError> {
        Ok(None)
    }
}

/// Lets go of an exported node once its export is gone.
pub type NodeRelease = Box<dyn Fn() + Send + Sync>;

/// The daemon's one node today: the guest's disk under its node name.
pub struct DiskNode {
    /// The node name (`--node-name`).
    pub name: String,
    /// The disk.
    pub disk: Arc<Disk>,
    /// Its dirty bitmaps.
    pub bitmaps: Option<Arc<dyn DirtyBitmaps>>,
}

impl NodeLookup for DiskNode {
    fn source(&self, node: &str) -> Option<Arc<dyn ExportSource>> {
        (node == self.name).then(|| Arc::new(DiskSource::new(self.disk.clone())) as _)
    }

    fn bitmaps(&self, node: &str) -> Option<Arc<dyn DirtyBitmaps>> {
        (node == self.name).then(|| self.bitmaps.clone()).flatten()
    }
}

/// The NBD server state behind the commands.
pub struct NbdService {
    nodes: Arc<dyn NodeLookup>,
    exports: Arc<Exports>,
    server: Mutex<Option<NbdServer>>,
    /// Mode and group of a unix socket `nbd-server-start` makes: the
    /// daemon's `--socket-mode`/`--socket-group`.
    socket: Mutex<SocketOptions>,
}

fn not_running() -> QmpError {
    QmpError::generic("NBD server not running")
}

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// One `bitmaps` entry: a name on the exported node, or `{node, name}`.
enum BitmapRef {
    Local(String),
    Node(String, String),
}

/// What `block-export-add` (or `nbd-server-add`) asked for, parsed.
struct AddRequest {
    id: String,
    node: String,
    /// `nbd-server-add`'s lookup also accepts a device name (in errors).
    legacy: bool,
    writable: bool,
    writethrough: bool,
    name: Option<String>,
    description: Option<String>,
    bitmaps: Vec<BitmapRef>,
    allocation_depth: bool,
}

impl NbdService {
    fn server(&self) -> MutexGuard<'_, Option<NbdServer>> {
        self.server.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the mode and group of the unix sockets `nbd-server-start`
    /// makes from now on (default: 0600, the daemon's group).
    pub fn set_socket_options(&self, opts: SocketOptions) {
        *self.socket.lock().unwrap_or_else(|e| e.into_inner()) = opts;
    }

    /// Stops the server (at daemon exit), removing every export.
    pub fn shutdown(&self) {
        if let Some(s) = self.server().take() {
            s.stop();
        }
    }

    fn start(&self, args: &mut Args) -> Result<Value, QmpError> {
        let addr = Args::nested("addr", args.required("addr")?)?;
        let addr = parse_address(addr)?;
        let tls_creds = args.opt_str("tls-creds")?;
        let tls_authz = args.opt_str("tls-authz")?;
        let max = args.opt_u32("max-connections")?.unwrap_or(0);
        std::mem::take(args).finish()?;
        let mut server = self.server();
        if server.is_some() {
            return Err(QmpError::generic("NBD server already running"));
        }
        if let Some(id) = tls_creds {
            // vubd has no TLS credential objects, so none can be found.
            return Err(QmpError::generic(format!(
                "No TLS credentials with id '{id}'"
            )));
        }
        if tls_authz.is_some() {
            return Err(QmpError::generic(
                "'tls-authz' is only supported with 'tls-creds'",
            ));
        }
        let socket = *self.socket.lock().unwrap_or_else(|e| e.into_inner());
        *server = Some(
            NbdServer::start(&addr, self.exports.clone(), max, &socket)
                .map_err(QmpError::generic)?,
        );
        Ok(json!({}))
    }

    fn stop(&self, args: &mut Args) -> Result<Value, QmpError> {
        std::mem::take(args).finish()?;
        let server = self.server().take().ok_or_else(not_running)?;
        server.stop();
        Ok(json!({}))
    }

    fn add(&self, req: AddRequest) -> Result<Value, QmpError> {
        if !id_wellformed(&req.id) {
            return Err(QmpError::generic("Invalid block export id"));
        }
        if self.exports.id_in_use(&req.id) {
            return Err(QmpError::generic(format!(
                "Block export id '{}' is already in use",
                req.id
            )));
        }
        let source = self.nodes.source(&req.node).ok_or_else(|| {
            let device = if req.legacy { req.node.as_str() } else { "" };
            QmpError::generic(format!(
                "Cannot find device='{device}' nor node-name='{}'",
                req.node
            ))
        })?;
        // nbd-server-add quietly exports a read-only node read-only.
        let writable = req.writable && (source.writable() || !req.legacy);
        if writable && !source.writable() {
            return Err(QmpError::generic(
                "Cannot export read-only node as writable",
            ));
        }
        if self.server().is_none() {
            return Err(not_running());
        }
        let name = req.name.unwrap_or_else(|| req.node.clone());
        if name.len() > super::proto::MAX_STRING {
            return Err(QmpError::generic(format!("export name '{name}' too long")));
        }
        if let Some(d) = req.description.as_deref() {
            if d.len() > super::proto::MAX_STRING {
                return Err(QmpError::generic(format!("description '{d}' too long")));
            }
        }
        if self.exports.name_in_use(&name) {
            return Err(QmpError::generic(format!(
                "NBD server already has export named '{name}'"
            )));
        }
        let bitmaps = self.find_bitmaps(&req.node, &req.bitmaps, writable)?;
        for (i, b) in bitmaps.iter().enumerate() {
            if let Err(e) = b.engine.set_busy(&b.name, true) {
                for b in &bitmaps[..i] {
                    let _ = b.engine.set_busy(&b.name, false);
                }
                return Err(QmpError::generic(e.to_string()));
            }
        }
        let release = match self.nodes.hold(&req.node, &req.id) {
            Ok(r) => r,
            Err(e) => {
                for b in &bitmaps {
                    let _ = b.engine.set_busy(&b.name, false);
                }
                return Err(e);
            }
        };
        self.exports.add(ExportConfig {
            id: req.id,
            name,
            description: req.description,
            node: req.node,
            writable,
            writethrough: req.writethrough,
            allocation_depth: req.allocation_depth,
            source,
            bitmaps,
            release,
        });
        Ok(json!({}))
    }

    /// Resolves and checks the exported bitmaps as QEMU's
    /// `nbd_export_create` does (busy, inconsistent, enabled on a
    /// read-only export).
    fn find_bitmaps(
        &self,
        node: &str,
        refs: &[BitmapRef],
        writable: bool,
    ) -> Result<Vec<ExportBitmap>, QmpError> {
        let mut out = Vec::new();
        for r in refs {
            let (engine, name) = match r {
                BitmapRef::Local(name) => {
                    let engine = self
                        .nodes
                        .bitmaps(node)
                        .filter(|e| e.list().iter().any(|b| &b.name == name))
                        .ok_or_else(|| {
                            QmpError::generic(format!("Bitmap '{name}' is not found"))
                        })?;
                    (engine, name)
                }
                BitmapRef::Node(bnode, name) => {
                    if self.nodes.source(bnode).is_none() {
                        return Err(QmpError::generic(format!("Node '{bnode}' not found")));
                    }
                    let engine = self
                        .nodes
                        .bitmaps(bnode)
                        .filter(|e| e.list().iter().any(|b| &b.name == name))
                        .ok_or_else(|| {
                            QmpError::generic(format!("Dirty bitmap '{name}' not found"))
                        })?;
                    (engine, name)
                }
            };
            let info = engine
                .list()
                .into_iter()
                .find(|b| &b.name == name)
                .ok_or_else(|| QmpError::generic(format!("Dirty bitmap '{name}' not found")))?;
            if info.busy {
                return Err(QmpError::generic(format!(
                    "Bitmap '{name}' is currently in use by another operation and cannot be used"
                )));
            }
            if info.inconsistent {
                return Err(QmpError::generic(format!(
                    "Bitmap '{name}' is inconsistent and cannot be used"
                )));
            }
            if !writable && info.recording {
                return Err(QmpError::generic(format!(
                    "Enabled bitmap '{name}' incompatible with readonly export"
                )));
            }
            out.push(ExportBitmap {
                name: name.clone(),
                engine,
            });
        }
        Ok(out)
    }

    fn del(&self, id: &str, mode: Option<String>) -> Result<Value, QmpError> {
        let hard = mode.as_deref() == Some("hard");
        self.exports
            .remove(id, hard)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        Ok(json!({}))
    }

    fn query(&self) -> Value {
        let list: Vec<Value> = self
            .exports
            .all()
            .iter()
            .rev()
            .map(|e| {
                json!({
                    "node-name": e.config.node,
                    "shutting-down": e.shutting_down(),
                    "type": "nbd",
                    "id": e.config.id,
                })
            })
            .collect();
        Value::Array(list)
    }
}

fn parse_address(mut a: Args) -> Result<Address, QmpError> {
    let kind = a.req_enum("type", &["inet", "unix", "vsock", "fd"])?;
    let mut data = Args::nested(&a.path("data"), a.required("data")?)?;
    a.finish()?;
    let addr = match kind.as_str() {
        "unix" => {
            let path = data.req_str("path")?;
            data.opt_bool("abstract")?;
            data.opt_bool("tight")?;
            Address::Unix(path.into())
        }
        "inet" => {
            let host = data.req_str("host")?;
            let port = data.req_str("port")?;
            for b in ["numeric", "ipv4", "ipv6", "keep-alive", "mptcp"] {
                data.opt_bool(b)?;
            }
            data.opt_u32("to")?;
            Address::Inet { host, port }
        }
        "fd" => {
            return Err(QmpError::generic(
                "only QEMU supports file descriptor passing",
            ))
        }
        _ => {
            return Err(QmpError::generic(
                "vsock addresses are not supported by vubd",
            ))
        }
    };
    data.finish()?;
    Ok(addr)
}

fn parse_bitmaps(args: &mut Args, name: &str) -> Result<Vec<BitmapRef>, QmpError> {
    let mut out = Vec::new();
    for (path, v) in args.opt_list(name)?.unwrap_or_default() {
        out.push(match v {
            Value::String(s) => BitmapRef::Local(s),
            v @ Value::Object(_) => {
                let mut b = Args::nested(&path, v)?;
                let node = b.req_str("node")?;
                let name = b.req_str("name")?;
                b.finish()?;
                BitmapRef::Node(node, name)
            }
            _ => {
                return Err(QmpError::generic(format!(
                    "Invalid parameter type for '{path}', expected: BlockDirtyBitmapOrStr"
                )))
            }
        });
    }
    Ok(out)
}

fn parse_export_add(args: &mut Args) -> Result<AddRequest, QmpError> {
    let kind = args.req_enum("type", &["nbd", "vhost-user-blk", "fuse", "vduse-blk"])?;
    if kind != "nbd" {
        return Err(QmpError::generic(format!(
            "vubd exports nodes over NBD only (type '{kind}' is not supported)"
        )));
    }
    let id = args.req_str("id")?;
    args.opt_bool("fixed-iothread")?;
    if let Some(t) = args.opt_str("iothread")? {
        return Err(QmpError::generic(format!("iothread \"{t}\" not found")));
    }
    let node = args.req_str("node-name")?;
    let writable = args.opt_bool("writable")?.unwrap_or(false);
    let writethrough = args.opt_bool("writethrough")?.unwrap_or(false);
    let name = args.opt_str("name")?;
    let description = args.opt_str("description")?;
    let bitmaps = parse_bitmaps(args, "bitmaps")?;
    let allocation_depth = args.opt_bool("allocation-depth")?.unwrap_or(false);
    std::mem::take(args).finish()?;
    Ok(AddRequest {
        id,
        node,
        legacy: false,
        writable,
        writethrough,
        name,
        description,
        bitmaps,
        allocation_depth,
    })
}

fn parse_legacy_add(args: &mut Args) -> Result<AddRequest, QmpError> {
    let name = args.opt_str("name")?;
    let description = args.opt_str("description")?;
    let device = args.req_str("device")?;
    let writable = args.opt_bool("writable")?.unwrap_or(false);
    let bitmap = args.opt_str("bitmap")?;
    std::mem::take(args).finish()?;
    let name = name.unwrap_or_else(|| device.clone());
    Ok(AddRequest {
        id: name.clone(),
        node: device,
        legacy: true,
        writable,
        writethrough: false,
        name: Some(name),
        description,
        bitmaps: bitmap.map(BitmapRef::Local).into_iter().collect(),
        allocation_depth: false,
    })
}

/// Registers the NBD commands on `d`; the returned service must be shut
/// down at daemon exit.
pub fn register_nbd_commands(d: &Dispatcher, nodes: Arc<dyn NodeLookup>) -> Arc<NbdService> {
    let svc = Arc::new(NbdService {
        nodes,
        exports: Arc::new(Exports::new(d.events().clone())),
        server: Mutex::new(None),
        socket: Mutex::new(SocketOptions::default()),
    });
    let s = svc.clone();
    d.register("nbd-server-start", move |c: &mut Call<'_>| {
        s.start(&mut c.args)
    });
    let s = svc.clone();
    d.register("nbd-server-stop", move |c: &mut Call<'_>| {
        s.stop(&mut c.args)
    });
    let s = svc.clone();
    d.register("block-export-add", move |c: &mut Call<'_>| {
        let req = parse_export_add(&mut c.args)?;
        s.add(req)
    });
    let s = svc.clone();
    d.register("nbd-server-add", move |c: &mut Call<'_>| {
        let req = parse_legacy_add(&mut c.args)?;
        if s.server().is_none() {
            return Err(not_running());
        }
        s.add(req)
    });
    let s = svc.clone();
    d.register("block-export-del", move |c: &mut Call<'_>| {
        let id = c.args.req_str("id")?;
        let mode = c.args.opt_enum("mode", &["safe", "hard"])?;
        std::mem::take(&mut c.args).finish()?;
        s.del(&id, mode)
    });
    let s = svc.clone();
    d.register("nbd-server-remove", move |c: &mut Call<'_>| {
        let name = c.args.req_str("name")?;
        let mode = c.args.opt_enum("mode", &["safe", "hard"])?;
        std::mem::take(&mut c.args).finish()?;
        if s.server().is_none() {
            return Err(not_running());
        }
        s.del(&name, mode)
    });
    let s = svc.clone();
    d.register("query-block-exports", move |c: &mut Call<'_>| {
        std::mem::take(&mut c.args).finish()?;
        Ok(s.query())
    });
    svc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_ids_are_checked_as_qemu_does() {
        for ok in ["x0", "a-b.c_d", "Z"] {
            assert!(id_wellformed(ok), "{ok}");
        }
        for bad in ["", "0x", "a b", "-a", "é"] {
            assert!(!id_wellformed(bad), "{bad}");
        }
    }
}
