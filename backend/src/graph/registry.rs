//! [`Graph`]: the nodes of one daemon by name, newest last, with who uses
//! each. Adding checks names (QEMU's rules, duplicates); removing refuses
//! a node in use with QEMU 7.2's words. Only management commands and jobs
//! come here, one lock, never on a guest request.

use super::node::{Driver, Node};
use super::validate_node_name;
use crate::image::Image;
use std::sync::{Arc, Mutex, MutexGuard};

/// Who holds a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum User {
    /// The guest's disk (its active image).
    Disk,
    /// A block job (by job id), e.g. a mirror writing to it.
    Job(String),
    /// A node that has it as its `file` child (by node name).
    Parent(String),
    /// A block export (by export id), e.g. over NBD.
    Export(String),
    /// A backup job (by job id) using it as its target or filter: QEMU
    /// blocks such a node with an op blocker rather than a user.
    BackupJob(String),
    /// A mirror job (by job id) on its source node: QEMU's op blocker
    /// there, so `blockdev-del` names the job.
    MirrorJob(String),
}

/// A refusal, worded as QEMU 7.2 words it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    /// Characters outside QEMU's rules.
    #[error("Invalid node-name: '{0}'")]
    InvalidName(String),
    /// More than 31 bytes.
    #[error("Node name too long")]
    NameTooLong,
    /// The name is taken.
    #[error("Duplicate nodes with node-name='{0}'")]
    Duplicate(String),
    /// The name is the disk's device name (`--node-name`), which keeps
    /// naming the guest's disk after a pivot.
    #[error("node-name={0} is conflicting with a device id")]
    DeviceId(String),
    /// `blockdev-del` of a name that is no node.
    #[error("Failed to find node with node-name='{0}'")]
    NotFound(String),
    /// `blockdev-del` of a node the disk or a job uses.
    #[error("Node {0} is in use")]
    InUse(String),
    /// `blockdev-del` of a node that is another node's child.
    #[error("Block device {0} is in use")]
    ChildInUse(String),
    /// `blockdev-del` of a child that came inline with its parent.
    #[error("Node {0} is not owned by the monitor")]
    NotOwned(String),
    /// `blockdev-del` of a backup job's target or filter.
    #[error("Node '{0}' is busy: block device is in use by block job: backup")]
    BackupBusy(String),
    /// `blockdev-del` of a mirror job's source node.
    #[error("Node '{0}' is busy: block device is in use by block job: mirror")]
    MirrorBusy(String),
    /// More than [`MAX_NODES`] nodes (each holds an open file).
    #[error("Too many block nodes (at most {MAX_NODES})")]
    TooMany,
}

/// Most nodes one daemon holds: a client adding nodes without end would
/// otherwise use up the process's file descriptors (QEMU has no limit).
pub const MAX_NODES: usize = 256;

struct Entry {
    node: Arc<Node>,
    users: Vec<User>,
}

struct Inner {
    entries: Vec<Entry>,
    /// Name of the node the disk uses.
    disk: String,
    /// Counter for the names of inline children (`#blockNNN`, as QEMU).
    auto: u64,
}

/// The nodes of one daemon.
pub struct Graph {
    device: String,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("Graph")
            .field("device", &self.device)
            .field("disk", &g.disk)
            .field(
                "nodes",
                &g.entries.iter().map(|e| e.node.name()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Graph {
    /// A graph holding the disk's node, used by the disk. Its name is also
    /// the disk's device name: commands that take a device (bitmaps,
    /// jobs) keep meaning the guest's disk by it after a pivot.
    pub fn new(disk_node: Node) -> Graph {
        let name = disk_node.name().to_string();
        Graph {
            device: name.clone(),
            inner: Mutex::new(Inner {
                entries: vec![Entry {
                    node: Arc::new(disk_node),
                    users: vec![User::Disk],
                }],
                disk: name,
                auto: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The disk's device name.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// A fresh name for an inline child (QEMU's `#blockNNN`: a name no
    /// client can give, since `#` is not allowed).
    pub fn auto_name(&self) -> String {
        let mut g = self.lock();
        g.auto += 1;
        format!("#block{:03}", g.auto)
    }

    /// Checks that `name` may be given to a new node.
    pub fn check_new_name(&self, name: &str) -> Result<(), GraphError> {
        validate_node_name(name)?;
        self.check_free(&self.lock(), name)
    }

    fn check_free(&self, g: &Inner, name: &str) -> Result<(), GraphError> {
        if g.entries.iter().any(|e| e.node.name() == name) {
            return Err(GraphError::Duplicate(name.to_string()));
        }
        if name == self.device {
            return Err(GraphError::DeviceId(name.to_string()));
        }
        Ok(())
    }

    /// Adds `node` (and first its inline `child`, which it then uses);
    /// a child given by name becomes used by `node`.
    pub fn add(&self, node: Node, child: Option<Arc<Node>>) -> Result<Arc<Node>, GraphError> {
        let mut g = self.lock();
        if g.entries.len() + 1 + usize::from(child.is_some()) > MAX_NODES {
            return Err(GraphError::TooMany);
        }
        // Every check before any change: a refused add leaves nothing.
        if let Some(c) = &child {
            self.check_free(&g, c.name())?;
            if c.name() == node.name() {
                return Err(GraphError::Duplicate(node.name().to_string()));
            }
        }
        self.check_free(&g, node.name())?;
        if let Some(name) = node.child() {
            let inline = child.as_ref().is_some_and(|c| c.name() == name);
            if !inline && !g.entries.iter().any(|e| e.node.name() == name) {
                return Err(GraphError::NotFound(name.to_string()));
            }
        }
        if let Some(c) = child {
            g.entries.push(Entry {
                node: c,
                users: Vec::new(),
            });
        }
        if let Some(name) = node.child() {
            let parent = User::Parent(node.name().to_string());
            if let Some(e) = g.entries.iter_mut().find(|e| e.node.name() == name) {
                e.users.push(parent);
            }
        }
        let node = Arc::new(node);
        g.entries.push(Entry {
            node: node.clone(),
            users: Vec::new(),
        });
        Ok(node)
    }

    /// The node called `name`.
    pub fn lookup(&self, name: &str) -> Option<Arc<Node>> {
        self.lock()
            .entries
            .iter()
            .find(|e| e.node.name() == name)
            .map(|e| e.node.clone())
    }

    /// The node the disk uses now (always there: a node in use cannot
    /// be removed).
    pub fn disk_node(&self) -> Option<Arc<Node>> {
        let g = self.lock();
        g.entries
            .iter()
            .find(|e| e.node.name() == g.disk)
            .map(|e| e.node.clone())
    }

    /// Every node, newest first (QEMU's order), with its users.
    pub fn nodes(&self) -> Vec<(Arc<Node>, Vec<User>)> {
        self.lock()
            .entries
            .iter()
            .rev()
            .map(|e| (e.node.clone(), e.users.clone()))
            .collect()
    }

    /// `blockdev-del`: removes a monitor-owned node nobody uses, and its
    /// inline child with it (a child given by name is released).
    pub fn remove(&self, name: &str) -> Result<Arc<Node>, GraphError> {
        let mut g = self.lock();
        let Some(i) = g.entries.iter().position(|e| e.node.name() == name) else {
            return Err(GraphError::NotFound(name.to_string()));
        };
        let e = &g.entries[i];
        // The guest writes through a filter over the disk's node (a
        // copy-before-write node, a mirror's `mirror_top`): in QEMU the
        // device moved onto the filter, and the node is in use only as its
        // child.
        let filtered = e.users.iter().any(|u| match u {
            User::Parent(p) => g.entries.iter().any(|x| {
                x.node.name() == p
                    && matches!(x.node.driver(), Driver::CopyBeforeWrite | Driver::MirrorTop)
            }),
            _ => false,
        });
        // QEMU's order: users holding a BlockBackend on the node, op
        // blockers, ownership, other references.
        if e.users.iter().any(|u| match u {
            User::Disk => !filtered,
            User::Job(_) | User::Export(_) => true,
            _ => false,
        }) {
            return Err(GraphError::InUse(name.to_string()));
        }
        if e.users.iter().any(|u| matches!(u, User::BackupJob(_))) {
            return Err(GraphError::BackupBusy(name.to_string()));
        }
        if e.users.iter().any(|u| matches!(u, User::MirrorJob(_))) {
            return Err(GraphError::MirrorBusy(name.to_string()));
        }
        if !e.node.monitor_owned() {
            return Err(GraphError::NotOwned(name.to_string()));
        }
        if !e.users.is_empty() {
            return Err(GraphError::ChildInUse(name.to_string()));
        }
        let node = g.entries.remove(i).node;
        if let Some(c) = node.child() {
            let parent = User::Parent(name.to_string());
            if let Some(ci) = g.entries.iter().position(|e| e.node.name() == c) {
                let child = &mut g.entries[ci];
                child.users.retain(|u| *u != parent);
                if !child.node.monitor_owned() {
                    g.entries.remove(ci);
                }
            }
        }
        Ok(node)
    }

    /// Removes a node whatever uses it (a job dropping the filter it
    /// inserted), releasing its child; its parents' links to it dangle
    /// and are ignored when they go.
    pub fn drop_node(&self, name: &str) {
        let mut g = self.lock();
        let Some(i) = g.entries.iter().position(|e| e.node.name() == name) else {
            return;
        };
        let node = g.entries.remove(i).node;
        if let Some(c) = node.child() {
            let parent = User::Parent(name.to_string());
            if let Some(e) = g.entries.iter_mut().find(|e| e.node.name() == c) {
                if let Some(j) = e.users.iter().position(|u| *u == parent) {
                    e.users.remove(j);
                }
            }
        }
    }

    /// Records that `user` holds the node called `name`.
    pub fn claim(&self, name: &str, user: User) -> Result<Arc<Node>, GraphError> {
        let mut g = self.lock();
        match g.entries.iter_mut().find(|e| e.node.name() == name) {
            Some(e) => {
                e.users.push(user);
                Ok(e.node.clone())
            }
            None => Err(GraphError::NotFound(name.to_string())),
        }
    }

    /// Drops one hold of `user` on the node called `name` (if still there).
    pub fn release(&self, name: &str, user: &User) {
        let mut g = self.lock();
        if let Some(e) = g.entries.iter_mut().find(|e| e.node.name() == name) {
            if let Some(i) = e.users.iter().position(|u| u == user) {
                e.users.remove(i);
            }
        }
    }

    /// The disk now uses the node called `name` (a `blockdev-mirror`
    /// pivot: the target takes the source's place; the source node stays,
    /// unused, until `blockdev-del`, as in QEMU).
    pub fn switch_disk(&self, name: &str) -> Result<(), GraphError> {
        let mut g = self.lock();
        let Some(to) = g.entries.iter().position(|e| e.node.name() == name) else {
            return Err(GraphError::NotFound(name.to_string()));
        };
        let from = g.disk.clone();
        if let Some(e) = g.entries.iter_mut().find(|e| e.node.name() == from) {
            if let Some(i) = e.users.iter().position(|u| *u == User::Disk) {
                e.users.remove(i);
            }
        }
        g.entries[to].users.push(User::Disk);
        g.disk = name.to_string();
        Ok(())
    }

    /// The disk's node now has `image` (a `drive-mirror` pivot onto a
    /// path: vubd keeps the node's name).
    pub fn replace_disk_image(&self, image: Arc<dyn Image>) {
        let mut g = self.lock();
        let disk = g.disk.clone();
        let Some(e) = g.entries.iter_mut().find(|e| e.node.name() == disk) else {
            return;
        };
        let new = Arc::new(e.node.with_image(image));
        let old = std::mem::replace(&mut e.node, new);
        // The new image is no child's: the old child is free again.
        if let Some(c) = old.child() {
            let parent = User::Parent(disk);
            if let Some(ce) = g.entries.iter_mut().find(|e| e.node.name() == c) {
                ce.users.retain(|u| *u != parent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Driver, NodeOptions};
    use crate::image::ImageError;
    use crate::iobuf::IoBuf;
    use std::path::{Path, PathBuf};

    /// An image that is only a name: the registry never does I/O.
    struct Named(PathBuf);

    impl Image for Named {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn path(&self) -> &Path {
            &self.0
        }
        fn read_at(&self, _: &[IoBuf], _: u64) -> Result<(), ImageError> {
            Ok(())
        }
        fn write_at(&self, _: &[IoBuf], _: u64, _: bool) -> Result<(), ImageError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), ImageError> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> Result<(), ImageError> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), ImageError> {
            Ok(())
        }
        fn allocated_bytes(&self) -> u64 {
            0
        }
    }

    fn node(name: &str, driver: Driver, child: Option<&str>, owned: bool) -> Node {
        let image: Arc<dyn Image> = Arc::new(Named(PathBuf::from(format!("/{name}"))));
        Node::new(
            name,
            driver,
            image,
            NodeOptions::default(),
            child.map(str::to_string),
            owned,
        )
    }

    fn names(g: &Graph) -> Vec<String> {
        g.nodes()
            .iter()
            .map(|(n, _)| n.name().to_string())
            .collect()
    }

    #[test]
    fn add_lookup_and_refusals() {
        let g = Graph::new(node("disk0", Driver::Raw, None, true));
        g.add(node("f1", Driver::File, None, true), None).unwrap();
        assert_eq!(
            g.add(node("f1", Driver::File, None, true), None)
                .unwrap_err(),
            GraphError::Duplicate("f1".into())
        );
        assert_eq!(
            g.check_new_name("disk0"),
            Err(GraphError::Duplicate("disk0".into()))
        );
        assert_eq!(
            g.check_new_name("1x"),
            Err(GraphError::InvalidName("1x".into()))
        );
        assert_eq!(g.lookup("f1").unwrap().name(), "f1");
        assert!(g.lookup("f2").is_none());
        // A raw node and its inline child may not share a name.
        let child = Arc::new(node("r8", Driver::File, None, true));
        assert_eq!(
            g.add(node("r8", Driver::Raw, Some("r8"), true), Some(child))
                .unwrap_err(),
            GraphError::Duplicate("r8".into())
        );
        assert!(g.lookup("r8").is_none(), "a refused add left a node");
        // Newest first.
        assert_eq!(names(&g), ["f1", "disk0"]);
        assert_eq!(
            g.remove("disk0").unwrap_err().to_string(),
            "Node disk0 is in use"
        );
        assert_eq!(
            g.remove("nope").unwrap_err().to_string(),
            "Failed to find node with node-name='nope'"
        );
        g.remove("f1").unwrap();
        assert_eq!(names(&g), ["disk0"]);
    }

    #[test]
    fn children_are_held_by_their_parent() {
        let g = Graph::new(node("disk0", Driver::Raw, None, true));
        g.add(node("f1", Driver::File, None, true), None).unwrap();
        g.add(node("r1", Driver::Raw, Some("f1"), true), None)
            .unwrap();
        assert_eq!(
            g.remove("f1").unwrap_err().to_string(),
            "Block device f1 is in use"
        );
        // An inline child goes with its parent and cannot go alone.
        let inline = Arc::new(node("#block001", Driver::File, None, false));
        g.add(
            node("r2", Driver::Raw, Some("#block001"), true),
            Some(inline),
        )
        .unwrap();
        assert_eq!(names(&g), ["r2", "#block001", "r1", "f1", "disk0"]);
        assert_eq!(
            g.remove("#block001").unwrap_err().to_string(),
            "Node #block001 is not owned by the monitor"
        );
        g.remove("r2").unwrap();
        g.remove("r1").unwrap();
        assert_eq!(names(&g), ["f1", "disk0"]);
        g.remove("f1").unwrap();
    }

    #[test]
    fn the_number_of_nodes_is_bounded() {
        let g = Graph::new(node("disk0", Driver::Raw, None, true));
        for i in 1..MAX_NODES {
            g.add(node(&format!("n{i}"), Driver::File, None, true), None)
                .unwrap();
        }
        assert_eq!(
            g.add(node("last", Driver::File, None, true), None)
                .unwrap_err(),
            GraphError::TooMany
        );
        g.remove("n1").unwrap();
        g.add(node("last", Driver::File, None, true), None).unwrap();
    }

    #[test]
    fn a_job_holds_its_node_until_released() {
        let g = Graph::new(node("disk0", Driver::Raw, None, true));
        g.add(node("t", Driver::File, None, true), None).unwrap();
        let job = User::Job("m".into());
        g.claim("t", job.clone()).unwrap();
        assert_eq!(g.remove("t").unwrap_err().to_string(), "Node t is in use");
        g.release("t", &job);
        let export = User::Export("x0".into());
        g.claim("t", export.clone()).unwrap();
        assert_eq!(g.remove("t").unwrap_err().to_string(), "Node t is in use");
        g.release("t", &export);
        g.remove("t").unwrap();
        assert_eq!(
            g.claim("t", job).unwrap_err(),
            GraphError::NotFound("t".into())
        );
    }

    #[test]
    fn a_mirror_filter_holds_the_disk_and_the_job_blocks_its_source() {
        let g = Graph::new(node("disk0", Driver::Raw, None, true));
        g.add(node("mt0", Driver::MirrorTop, Some("disk0"), true), None)
            .unwrap();
        g.claim("mt0", User::Disk).unwrap();
        let job = User::MirrorJob("m".into());
        g.claim("disk0", job.clone()).unwrap();
        assert_eq!(
            g.remove("mt0").unwrap_err().to_string(),
            "Node mt0 is in use"
        );
        // The disk's writes go through the filter: the job's blocker speaks.
        assert_eq!(
            g.remove("disk0").unwrap_err().to_string(),
            "Node 'disk0' is busy: block device is in use by block job: mirror"
        );
        // The job's end.
        g.drop_node("mt0");
        g.release("disk0", &job);
        assert_eq!(names(&g), ["disk0"]);
        assert_eq!(
            g.remove("disk0").unwrap_err().to_string(),
            "Node disk0 is in use"
        );
    }

    #[test]
    fn a_pivot_moves_the_disk_between_nodes() {
        let g = Graph::new(node("disk0", Driver::Raw, None, true));
        g.add(node("t", Driver::File, None, true), None).unwrap();
        g.switch_disk("t").unwrap();
        assert_eq!(g.disk_node().unwrap().name(), "t");
        assert_eq!(g.remove("t").unwrap_err().to_string(), "Node t is in use");
        // The source stays, unused, as in QEMU; the device name stays taken.
        assert_eq!(g.device(), "disk0");
        g.remove("disk0").unwrap();
        assert_eq!(
            g.check_new_name("disk0").unwrap_err().to_string(),
            "node-name=disk0 is conflicting with a device id"
        );
        // A pivot onto a path keeps the node's name, with the new image.
        let image: Arc<dyn Image> = Arc::new(Named(PathBuf::from("/new")));
        g.replace_disk_image(image);
        let d = g.disk_node().unwrap();
        assert_eq!((d.name(), d.image().path()), ("t", Path::new("/new")));
    }
}
