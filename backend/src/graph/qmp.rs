//! `blockdev-add` (drivers `file`, `raw`, `snapshot-access` and, with
//! [`Filters`], `copy-before-write`), `blockdev-del` and
//! `query-named-block-nodes`, with QEMU 7.2's arguments (read in schema
//! order, so the first error is the one QEMU reports), checks and texts.
//! What vubd cannot do (other drivers, `raw` with `offset`/`size`,
//! `cache.no-flush`, `force-share`, `detect-zeroes`) is refused by name.

use super::cbw::{self, Filters};
use super::node::{Aio, Driver, Node, NodeOptions};
use super::registry::{Graph, GraphError, User};
use crate::backup::SnapshotAccess;
use crate::image::{Image, ImageError, RawImage, RawImageOptions};
use crate::mirror::{image_errno, strerror};
use crate::qmp::{commands, Args, Call, Dispatcher, ManagementContext, QmpError};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

/// QEMU 7.2's `BlockdevDriver` values: a driver vubd lacks is refused
/// clearly, a word QEMU does not know gets QEMU's enum error.
const QEMU_DRIVERS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "io_uring",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "nvme-io_uring",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "virtio-blk-vfio-pci",
    "virtio-blk-vhost-user",
    "virtio-blk-vhost-vdpa",
    "vmdk",
    "vpc",
    "vvfat",
];

fn err(e: GraphError) -> QmpError {
    QmpError::generic(e.to_string())
}

/// The members every driver has (QAPI `BlockdevOptions`' base).
struct Common {
    driver: String,
    node_name: Option<String>,
    discard_unmap: bool,
    direct: bool,
    read_only: bool,
    auto_read_only: bool,
}

fn parse_common(args: &mut Args) -> Result<Common, QmpError> {
    let driver = args.req_enum("driver", QEMU_DRIVERS)?;
    let node_name = args.opt_str("node-name")?;
    let discard = args.opt_enum("discard", &["ignore", "unmap"])?;
    let mut direct = false;
    if let Some(v) = args.take("cache") {
        let mut cache = Args::nested(&args.path("cache"), v)?;
        direct = cache.opt_bool("direct")?.unwrap_or(false);
        let no_flush = cache.opt_bool("no-flush")?.unwrap_or(false);
        cache.finish()?;
        if no_flush {
            return Err(QmpError::generic("vubd does not support cache.no-flush"));
        }
    }
    let read_only = args.opt_bool("read-only")?.unwrap_or(false);
    let auto_read_only = args.opt_bool("auto-read-only")?.unwrap_or(false);
    if args.opt_bool("force-share")?.unwrap_or(false) {
        return Err(QmpError::generic("vubd does not support force-share"));
    }
    let dz = args.opt_enum("detect-zeroes", &["off", "on", "unmap"])?;
    if dz.is_some_and(|d| d != "off") {
        return Err(QmpError::generic("vubd does not support detect-zeroes"));
    }
    if !["file", "raw", "snapshot-access", "copy-before-write", "nbd"].contains(&driver.as_str()) {
        return Err(QmpError::generic(format!(
            "vubd supports the block drivers 'file', 'raw', 'nbd', 'copy-before-write' and 'snapshot-access' only, not '{driver}'"
        )));
    }
    Ok(Common {
        driver,
        node_name,
        discard_unmap: discard.as_deref() == Some("unmap"),
        direct,
        read_only,
        auto_read_only,
    })
}

/// A `file` node to open.
struct FileSpec {
    filename: PathBuf,
    aio: Aio,
}

fn parse_file(args: &mut Args) -> Result<FileSpec, QmpError> {
    let filename = args.req_str("filename")?;
    if args.take("pr-manager").is_some() {
        return Err(QmpError::generic("vubd does not support pr-manager"));
    }
    let _locking = args.opt_enum("locking", &["off", "on", "auto"])?;
    let aio = match args
        .opt_enum("aio", &["threads", "native", "io_uring"])?
        .as_deref()
    {
        Some("native") => Aio::Native,
        Some("io_uring") => Aio::IoUring,
        _ => Aio::Threads,
    };
    let _batch = args.opt_i64("aio-max-batch")?;
    let _drop_cache = args.opt_bool("drop-cache")?;
    Ok(FileSpec {
        filename: PathBuf::from(filename),
        aio,
    })
}

/// What `raw`'s `file` names: a node, or a `file` node defined inline.
enum ChildRef {
    Name(String),
    Inline(Common, FileSpec),
}

/// The driver-specific members of a `blockdev-add`.
enum Variant {
    File(FileSpec),
    Raw(ChildRef),
    /// Over the copy-before-write node of this name.
    SnapshotAccess(String),
    /// A copy-before-write filter over the disk's node.
    Cbw(cbw::CbwSpec),
    /// A remote NBD export.
    Nbd(super::nbd::NbdSpec),
}

fn parse_raw(args: &mut Args) -> Result<ChildRef, QmpError> {
    let path = args.path("file");
    let child = match args.required("file")? {
        Value::String(s) => ChildRef::Name(s),
        v @ Value::Object(_) => {
            let mut inner = Args::nested(&path, v)?;
            let common = parse_common(&mut inner)?;
            if common.driver != "file" {
                return Err(QmpError::generic(format!(
                    "vubd's raw driver takes a child of driver 'file' only, not '{}'",
                    common.driver
                )));
            }
            let spec = parse_file(&mut inner)?;
            inner.finish()?;
            ChildRef::Inline(common, spec)
        }
        _ => {
            return Err(QmpError::generic(format!(
                "Invalid parameter type for '{path}', expected: BlockdevRef"
            )))
        }
    };
    let offset = args.opt_u64("offset")?;
    let size = args.opt_u64("size")?;
    if offset.is_some() || size.is_some() {
        return Err(QmpError::generic(
            "vubd's raw driver does not support 'offset' and 'size'",
        ));
    }
    Ok(child)
}

/// Opens a `file` node (QEMU's checks after the name's).
fn open_file(
    name: &str,
    c: &Common,
    spec: &FileSpec,
    monitor_owned: bool,
) -> Result<Node, QmpError> {
    if spec.aio == Aio::Native && !c.direct {
        return Err(QmpError::generic(
            "aio=native was specified, but it requires cache.direct=on, which was not specified.",
        ));
    }
    let open = |read_only| {
        RawImage::open_allowed(
            &spec.filename,
            RawImageOptions {
                read_only,
                direct: c.direct,
            },
        )
    };
    let mut read_only = c.read_only;
    let image = match open(read_only) {
        Err(e)
            if !read_only
                && c.auto_read_only
                && matches!(image_errno(&e), libc::EACCES | libc::EROFS | libc::EPERM) =>
        {
            read_only = true;
            open(true)
        }
        other => other,
    }
    .map_err(|e| match e {
        ImageError::Refused(m) => QmpError::generic(m),
        e => QmpError::generic(format!(
            "Could not open '{}': {}",
            spec.filename.display(),
            strerror(image_errno(&e))
        )),
    })?;
    let options = NodeOptions {
        read_only,
        direct: c.direct,
        discard_unmap: c.discard_unmap,
        aio: spec.aio,
    };
    Ok(Node::new(
        name,
        Driver::File,
        Arc::new(image),
        options,
        None,
        monitor_owned,
    ))
}

fn blockdev_add(
    graph: &Graph,
    filters: Option<&Filters>,
    args: &mut Args,
) -> Result<Value, QmpError> {
    let mut args = std::mem::take(args);
    let common = parse_common(&mut args)?;
    let variant = match common.driver.as_str() {
        "file" => Variant::File(parse_file(&mut args)?),
        "raw" => Variant::Raw(parse_raw(&mut args)?),
        "copy-before-write" => Variant::Cbw(cbw::parse(&mut args)?),
        "nbd" => Variant::Nbd(super::nbd::parse(&mut args)?),
        _ => {
            let path = args.path("file");
            match args.required("file")? {
                Value::String(s) => Variant::SnapshotAccess(s),
                _ => {
                    return Err(QmpError::generic(format!(
                    "vubd's snapshot-access takes the name of a copy-before-write node as '{path}'"
                )))
                }
            }
        }
    };
    args.finish()?;
    let Some(name) = common.node_name.clone() else {
        return Err(QmpError::generic(
            "'node-name' must be specified for the root node",
        ));
    };
    graph.check_new_name(&name).map_err(err)?;
    // Refused before a file is opened, not after.
    if graph.nodes().len() >= super::MAX_NODES {
        return Err(err(GraphError::TooMany));
    }
    match variant {
        Variant::Cbw(spec) => {
            let Some(filters) = filters else {
                return Err(QmpError::generic(
                    "vubd adds copy-before-write filters only over a guest's disk",
                ));
            };
            filters.add(graph, &name, spec)?;
        }
        Variant::SnapshotAccess(c) => {
            let child = graph.lookup(&c).ok_or_else(|| {
                QmpError::generic(format!("Cannot find device='{c}' nor node-name='{c}'"))
            })?;
            let filter = match (child.driver(), child.filter()) {
                (Driver::CopyBeforeWrite, Some(f)) => f.clone(),
                _ => {
                    return Err(QmpError::generic(format!(
                        "Node '{c}' is not a copy-before-write filter"
                    )))
                }
            };
            let image: Arc<dyn Image> = Arc::new(SnapshotAccess::new(filter.clone()));
            let options = NodeOptions {
                read_only: true,
                ..NodeOptions::default()
            };
            let node = Node::new(&name, Driver::SnapshotAccess, image, options, Some(c), true)
                .with_filter(filter);
            graph.add(node, None).map_err(err)?;
        }
        Variant::Nbd(spec) => {
            graph
                .add(super::nbd::open(&name, &spec, common.read_only)?, None)
                .map_err(err)?;
        }
        Variant::File(spec) => {
            graph
                .add(open_file(&name, &common, &spec, true)?, None)
                .map_err(err)?;
        }
        Variant::Raw(child) => {
            let (child_node, inline) = match child {
                ChildRef::Name(c) => match graph.lookup(&c) {
                    Some(n) => (n, None),
                    None => {
                        return Err(QmpError::generic(format!(
                            "Cannot find device='{c}' nor node-name='{c}'"
                        )))
                    }
                },
                ChildRef::Inline(cc, spec) => {
                    let cname = match &cc.node_name {
                        Some(n) => {
                            graph.check_new_name(n).map_err(err)?;
                            n.clone()
                        }
                        None => graph.auto_name(),
                    };
                    let n = Arc::new(open_file(&cname, &cc, &spec, false)?);
                    (n.clone(), Some(n))
                }
            };
            let co = child_node.options();
            let options = NodeOptions {
                read_only: common.read_only || co.read_only,
                direct: co.direct,
                discard_unmap: common.discard_unmap,
                aio: co.aio,
            };
            let node = Node::new(
                &name,
                Driver::Raw,
                child_node.image().clone(),
                options,
                Some(child_node.name().to_string()),
                true,
            );
            graph.add(node, inline).map_err(err)?;
        }
    }
    Ok(json!({}))
}

/// QEMU's `BlockDeviceInfo` of a node that is not the disk's.
fn node_info(node: &Node) -> Value {
    let image = node.image();
    commands::node_device_info(&commands::NodeDescription {
        node_name: node.name(),
        driver: node.driver().name(),
        file: image.path(),
        size: image.size(),
        // QEMU does not know what an NBD export has allocated.
        allocated: (node.driver() != Driver::Nbd).then(|| image.allocated_bytes()),
        read_only: node.options().read_only,
        writeback: true,
        direct: node.options().direct,
    })
}

/// The disk's node as `query-block` describes the disk (its bitmaps, the
/// guest's write cache), under the node's own name and driver.
fn disk_node_info(node: &Node, ctx: &dyn ManagementContext) -> Value {
    let mut info = commands::block_device_info(ctx);
    if let Value::Object(m) = &mut info {
        let drv = node.driver().name();
        m.insert("node-name".into(), json!(node.name()));
        m.insert("drv".into(), json!(drv));
        if let Some(Value::Object(img)) = m.get_mut("image") {
            img.insert("format".into(), json!(drv));
        }
    }
    info
}

/// A mirror's `mirror_top` node as QEMU 7.2 shows it: its child is a
/// backing child, so the nested view (`flat: false`, and `query-block`)
/// has the child's image as `backing-image` and a depth of 1.
fn mirror_top_info(node: &Node, child: Option<&Value>) -> Value {
    let mut info = node_info(node);
    if let (Some(child), Value::Object(m)) = (child, &mut info) {
        m.insert("backing_file_depth".into(), json!(1));
        if let Some(Value::Object(img)) = m.get_mut("image") {
            img.insert("backing-image".into(), child["image"].clone());
        }
    }
    info
}

/// `query-named-block-nodes`: every node, newest first. The disk's node
/// is described as `query-block` describes the disk; `flat: false` nests
/// a mirror filter's child image as QEMU does.
pub fn named_block_nodes(graph: &Graph, ctx: &dyn ManagementContext, flat: bool) -> Value {
    let disk = graph.disk_node();
    let disk_info = disk.as_ref().map(|d| disk_node_info(d, ctx));
    let list: Vec<Value> = graph
        .nodes()
        .into_iter()
        .map(|(node, _)| match (&disk, &disk_info) {
            (Some(d), Some(info)) if Arc::ptr_eq(d, &node) => info.clone(),
            _ if node.driver() == Driver::MirrorTop => {
                mirror_top_info(&node, disk_info.as_ref().filter(|_| !flat))
            }
            _ => node_info(&node),
        })
        .collect();
    Value::Array(list)
}

/// `query-block`: the guest's disk. While a mirror filter named by
/// `filter-node-name` is over the disk's node, that filter is what the
/// device is inserted on (QEMU 7.2 shows it; an implicit filter is
/// skipped, so the disk's node shows).
pub fn query_block(graph: &Graph, ctx: &dyn ManagementContext) -> Value {
    let mut info = commands::block_info(ctx);
    let top = graph
        .nodes()
        .into_iter()
        .find(|(n, users)| {
            n.driver() == Driver::MirrorTop
                && !n.name().starts_with('#')
                && users.contains(&User::Disk)
        })
        .map(|(n, _)| n);
    if let (Some(top), Some(disk)) = (top, graph.disk_node()) {
        let child = disk_node_info(&disk, ctx);
        info["inserted"] = mirror_top_info(&top, Some(&child));
    }
    json!([info])
}

/// Registers `blockdev-add`, `blockdev-del`, `query-named-block-nodes`
/// and `query-block` (replacing the one-node versions of the standard
/// set).
pub fn register_graph_commands(d: &Dispatcher, graph: Arc<Graph>, ctx: Arc<dyn ManagementContext>) {
    register_node_commands(d, graph.clone());
    let (g, c) = (graph.clone(), ctx.clone());
    d.register("query-named-block-nodes", move |call: &mut Call<'_>| {
        let mut args = std::mem::take(&mut call.args);
        let flat = args.opt_bool("flat")?.unwrap_or(false);
        args.finish()?;
        Ok(named_block_nodes(&g, c.as_ref(), flat))
    });
    d.register("query-block", move |call: &mut Call<'_>| {
        std::mem::take(&mut call.args).finish()?;
        Ok(query_block(&graph, ctx.as_ref()))
    });
}

/// Registers `blockdev-add` and `blockdev-del` only.
pub fn register_node_commands(d: &Dispatcher, graph: Arc<Graph>) {
    register_del_add(d, graph, None);
}

/// Registers `blockdev-add` and `blockdev-del` that also add and remove
/// copy-before-write filters in the guest's path (replacing the ones of
/// [`register_graph_commands`]).
pub fn register_filter_commands(d: &Dispatcher, graph: Arc<Graph>, filters: Filters) {
    register_del_add(d, graph, Some(Arc::new(filters)));
}

fn register_del_add(d: &Dispatcher, graph: Arc<Graph>, filters: Option<Arc<Filters>>) {
    let (g, f) = (graph.clone(), filters.clone());
    d.register("blockdev-add", move |call: &mut Call<'_>| {
        blockdev_add(&g, f.as_deref(), &mut call.args)
    });
    d.register("blockdev-del", move |call: &mut Call<'_>| {
        let mut args = std::mem::take(&mut call.args);
        let name = args.req_str("node-name")?;
        args.finish()?;
        let node = graph.remove(&name).map_err(err)?;
        if let Some(f) = &filters {
            f.removed(&graph, &node);
        }
        Ok(json!({}))
    });
}

/// The graph of a daemon whose disk's node is `name` (the disk's current
/// image, opened with `direct`).
pub fn graph_for_disk(disk: &crate::Disk, name: &str, direct: bool) -> Graph {
    let image: Arc<dyn Image> = disk.image();
    let options = NodeOptions {
        read_only: disk.read_only(),
        direct,
        ..NodeOptions::default()
    };
    Graph::new(Node::new(name, Driver::Raw, image, options, None, true))
}
