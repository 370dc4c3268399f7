//! One node of the graph: what a client named with `blockdev-add` (or the
//! disk's own node), with the image it opened. Immutable once made; who
//! uses it is the registry's business.

use crate::backup::CopyBeforeWrite;
use crate::disk::WriteHook;
use crate::image::Image;
use std::sync::Arc;

/// The block driver of a node (QAPI `BlockdevDriver`, the ones vubd has).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// A protocol node on a file or block device.
    File,
    /// The raw format over a `file` child.
    Raw,
    /// A copy-before-write filter over the disk's node (made by
    /// `blockdev-backup`, with a `target` besides its `file` child).
    CopyBeforeWrite,
    /// The point-in-time view of a copy-before-write filter.
    SnapshotAccess,
    /// A remote NBD export.
    Nbd,
    /// A mirror job's filter over the disk's node, for the job's life
    /// (`filter-node-name`, or an implicit `#blockNNN`): the guest's writes
    /// go through it, and it is the job's write hook.
    MirrorTop,
}

impl Driver {
    /// QEMU's name (`drv`, `image.format`).
    pub fn name(self) -> &'static str {
        match self {
            Driver::File => "file",
            Driver::Raw => "raw",
            Driver::CopyBeforeWrite => "copy-before-write",
            Driver::SnapshotAccess => "snapshot-access",
            Driver::Nbd => "nbd",
            Driver::MirrorTop => "mirror_top",
        }
    }
}

/// `aio` of a `file` node (QAPI `BlockdevAioOptions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aio {
    /// `threads` (QEMU's default).
    #[default]
    Threads,
    /// `native` (Linux AIO; needs `cache.direct`).
    Native,
    /// `io_uring`.
    IoUring,
}

/// The options a node was opened with, as queries report them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeOptions {
    /// `read-only` (or `auto-read-only` that fell back to it).
    pub read_only: bool,
    /// `cache.direct`: opened with O_DIRECT.
    pub direct: bool,
    /// `discard: unmap` (default `ignore`).
    pub discard_unmap: bool,
    /// `aio`. Jobs do their own I/O scheduling; kept for the record.
    pub aio: Aio,
}

/// A node.
pub struct Node {
    name: String,
    driver: Driver,
    image: Arc<dyn Image>,
    identity: Option<(u64, u64)>,
    options: NodeOptions,
    child: Option<String>,
    monitor_owned: bool,
    filter: Option<Arc<CopyBeforeWrite>>,
    write_hook: Option<Arc<dyn WriteHook>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("driver", &self.driver)
            .field("path", &self.image.path())
            .field("identity", &self.identity)
            .field("child", &self.child)
            .finish()
    }
}

impl Node {
    /// A node over an open image; `child` names its `file` child;
    /// `monitor_owned` is false for a child defined inline in its
    /// parent's `blockdev-add` (it goes with the parent).
    pub fn new(
        name: &str,
        driver: Driver,
        image: Arc<dyn Image>,
        options: NodeOptions,
        child: Option<String>,
        monitor_owned: bool,
    ) -> Node {
        let identity = image.identity();
        Node {
            name: name.to_string(),
            driver,
            image,
            identity,
            options,
            child,
            monitor_owned,
            filter: None,
            write_hook: None,
        }
    }

    /// The same node holding `filter`: a copy-before-write node, or a
    /// snapshot-access node reading through it.
    pub fn with_filter(mut self, filter: Arc<CopyBeforeWrite>) -> Node {
        self.filter = Some(filter);
        self
    }

    /// The same node as the filter whose work on guest writes is `hook`
    /// (a `mirror_top` node): whoever puts the node into the guest's path
    /// installs this hook, so the node and what the writes go through are
    /// one thing.
    pub fn with_write_hook(mut self, hook: Arc<dyn WriteHook>) -> Node {
        self.write_hook = Some(hook);
        self
    }

    /// The write hook the node stands for in the guest's path, if any.
    pub fn write_hook(&self) -> Option<&Arc<dyn WriteHook>> {
        self.write_hook.as_ref()
    }

    /// The copy-before-write filter of the node, if it has one.
    pub fn filter(&self) -> Option<&Arc<CopyBeforeWrite>> {
        self.filter.as_ref()
    }

    /// The node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver.
    pub fn driver(&self) -> Driver {
        self.driver
    }

    /// The open image (a `raw` node shares its child's).
    pub fn image(&self) -> &Arc<dyn Image> {
        &self.image
    }

    /// Device and inode of what the node opened (`Image::identity`),
    /// taken when it was opened.
    pub fn identity(&self) -> Option<(u64, u64)> {
        self.identity
    }

    /// The options it was opened with.
    pub fn options(&self) -> &NodeOptions {
        &self.options
    }

    /// Its `file` child, if any.
    pub fn child(&self) -> Option<&str> {
        self.child.as_deref()
    }

    /// False for a child that came inline with its parent.
    pub fn monitor_owned(&self) -> bool {
        self.monitor_owned
    }

    /// The same node under another image (the disk's node after a
    /// `drive-mirror` pivot: the name stays, the image is the target).
    pub fn with_image(&self, image: Arc<dyn Image>) -> Node {
        Node::new(
            &self.name,
            self.driver,
            image,
            self.options.clone(),
            None,
            self.monitor_owned,
        )
    }
}
