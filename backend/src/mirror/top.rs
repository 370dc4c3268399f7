//! [`MirrorTop`]: the mirror job's filter node (QEMU's `mirror_top`) and
//! its place in the guest's path, for the job's life.
//!
//! QEMU 7.2 inserts a `mirror_top` node above the source while a mirror
//! runs, named by `blockdev-mirror`'s `filter-node-name` or else
//! implicitly (`#blockNNN`), listed by `query-named-block-nodes`, refused
//! by `blockdev-del` ("Node NAME is in use"), and removed when the job
//! ends. vubd does the same, and the node *is* the job's write path: it
//! holds the job's [`WriteHook`], and that hook enters and leaves the
//! disk's hook list only through this type, together with the node's
//! entry in the graph. So what the graph shows is what the guest's writes
//! go through. The job also blocks its source node (QEMU's op blocker:
//! "Node 'disk0' is busy: block device is in use by block job: mirror").

use crate::disk::{Disk, WriteHook};
use crate::graph::{Driver, Graph, GraphError, Node, NodeOptions, User};
use std::sync::{Arc, Mutex};

/// Where the node is registered (none for a disk without a graph).
struct Registered {
    graph: Arc<Graph>,
    source: String,
    job: User,
}

/// A mirror job's filter node, from its insertion to the job's end.
pub struct MirrorTop {
    node: Arc<Node>,
    hook: Arc<dyn WriteHook>,
    disk: Arc<Disk>,
    /// Taken by [`MirrorTop::leave`]: the node leaves once.
    registered: Mutex<Option<Registered>>,
    in_path: Mutex<bool>,
}

impl std::fmt::Debug for MirrorTop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorTop")
            .field("node", &self.node.name())
            .finish()
    }
}

impl MirrorTop {
    /// Checks `name` as QEMU checks `filter-node-name` (its rules, then
    /// duplicates), before the job is set up.
    pub fn check_name(graph: Option<&Arc<Graph>>, name: &str) -> Result<(), GraphError> {
        match graph {
            Some(g) => g.check_new_name(name),
            None => crate::graph::validate_node_name(name),
        }
    }

    /// Adds the filter node over the disk's node of `graph` (named `name`,
    /// or implicitly), standing for `hook`, used by the guest's disk and
    /// blocking the source for job `job_id`. Not yet in the guest's path:
    /// see [`MirrorTop::enter`].
    pub fn add(
        graph: Option<&Arc<Graph>>,
        name: Option<&str>,
        disk: Arc<Disk>,
        hook: Arc<dyn WriteHook>,
        job_id: &str,
    ) -> Result<MirrorTop, GraphError> {
        let source = graph.and_then(|g| g.disk_node());
        let name = match (name, graph) {
            (Some(n), _) => n.to_string(),
            (None, Some(g)) => g.auto_name(),
            (None, None) => "#mirror_top".to_string(),
        };
        let node = Node::new(
            &name,
            Driver::MirrorTop,
            disk.image(),
            NodeOptions {
                read_only: disk.read_only(),
                ..NodeOptions::default()
            },
            source.as_ref().map(|s| s.name().to_string()),
            true,
        )
        .with_write_hook(hook.clone());
        let registered = match (graph, source) {
            (Some(g), Some(source)) => {
                let node = g.add(node, None)?;
                let job = User::MirrorJob(job_id.to_string());
                // The guest's disk now sits on the filter (QEMU moves its
                // BlockBackend there); the source is blocked by the job.
                let _ = g.claim(node.name(), User::Disk);
                let _ = g.claim(source.name(), job.clone());
                return Ok(MirrorTop {
                    node,
                    hook,
                    disk,
                    registered: Mutex::new(Some(Registered {
                        graph: g.clone(),
                        source: source.name().to_string(),
                        job,
                    })),
                    in_path: Mutex::new(false),
                });
            }
            _ => None,
        };
        Ok(MirrorTop {
            node: Arc::new(node),
            hook,
            disk,
            registered: Mutex::new(registered),
            in_path: Mutex::new(false),
        })
    }

    /// The node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The write hook the node stands for.
    pub fn hook(&self) -> &Arc<dyn WriteHook> {
        &self.hook
    }

    /// Puts the node's hook into the guest's path.
    pub fn enter(&self) {
        let mut in_path = self.in_path.lock().unwrap_or_else(|p| p.into_inner());
        if !*in_path {
            self.disk.add_hook(self.hook.clone());
            *in_path = true;
        }
    }

    /// Takes the hook out of the guest's path and the node out of the
    /// graph, and unblocks the source (the job's end: pivot, cancel,
    /// error). Once; later calls do nothing.
    pub fn leave(&self) {
        let mut in_path = self.in_path.lock().unwrap_or_else(|p| p.into_inner());
        if *in_path {
            self.disk.remove_hook(&self.hook);
            *in_path = false;
        }
        drop(in_path);
        let taken = self
            .registered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(r) = taken {
            r.graph.drop_node(self.node.name());
            r.graph.release(&r.source, &r.job);
        }
    }
}
