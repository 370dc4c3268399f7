//! The graph's nodes as NBD export sources: the disk's node exports the
//! guest's disk (writes go through its hooks), any other node exports its
//! image read-only (a `snapshot-access` node: the point-in-time view).

use super::registry::{Graph, User};
use crate::image::Image;
use crate::iobuf::IoBuf;
use crate::nbd::{Allocation, DiskNode, ExportSource, NodeLookup, NodeRelease, SourceError};
use crate::qmp::{DirtyBitmaps, QmpError};
use std::sync::Arc;

/// Finds export sources in the graph.
pub struct GraphNodes {
    /// The disk's node (also found by the disk's device name).
    pub disk: DiskNode,
    /// The graph.
    pub graph: Arc<Graph>,
}

impl GraphNodes {
    fn is_disk(&self, node: &str) -> bool {
        node == self.disk.name
            || node == self.graph.device()
            || self.graph.disk_node().is_some_and(|d| d.name() == node)
    }
}

impl NodeLookup for GraphNodes {
    fn source(&self, node: &str) -> Option<Arc<dyn ExportSource>> {
        if self.is_disk(node) {
            return self.disk.source(&self.disk.name);
        }
        let n = self.graph.lookup(node)?;
        Some(Arc::new(ImageSource(n.image().clone())))
    }

    fn bitmaps(&self, node: &str) -> Option<Arc<dyn DirtyBitmaps>> {
        if self.is_disk(node) {
            return self.disk.bitmaps(&self.disk.name);
        }
        None
    }

    fn hold(&self, node: &str, export: &str) -> Result<Option<NodeRelease>, QmpError> {
        let name = match self.graph.disk_node() {
            Some(d) if self.is_disk(node) => d.name().to_string(),
            _ => node.to_string(),
        };
        let user = User::Export(export.to_string());
        self.graph
            .claim(&name, user.clone())
            .map_err(|e| QmpError::generic(e.to_string()))?;
        let graph = self.graph.clone();
        Ok(Some(Box::new(move || graph.release(&name, &user))))
    }
}

/// A node's image, exported read-only.
struct ImageSource(Arc<dyn Image>);

fn io(e: crate::image::ImageError) -> SourceError {
    // A snapshot range outside the snapshot (EACCES): QEMU's server sends
    // EINVAL for errnos NBD lacks.
    if crate::mirror::image_errno(&e) == libc::EACCES {
        return SourceError::OutOfRange;
    }
    SourceError::Io(e.to_string())
}

impl ExportSource for ImageSource {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn writable(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.0
            .read_at(&[IoBuf::from_slice(buf)], offset)
            .map_err(io)
    }

    fn block_status(&self, offset: u64, _len: u64) -> Result<(Allocation, u64), SourceError> {
        let (data, n) = self.0.allocation(offset).map_err(io)?;
        let status = if data {
            Allocation::Data
        } else {
            Allocation::Hole
        };
        Ok((status, n.max(1)))
    }

    fn write(&self, _offset: u64, _data: &mut [u8], _fua: bool) -> Result<(), SourceError> {
        Err(SourceError::ReadOnly)
    }

    fn flush(&self) -> Result<(), SourceError> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        // A discard on a snapshot-access node drops clusters from it.
        self.0.discard(offset, len).map_err(io)
    }

    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> Result<(), SourceError> {
        Err(SourceError::ReadOnly)
    }
}
