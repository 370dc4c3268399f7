//! The block-node graph, first step: every image the daemon holds open is
//! a named node (the disk's own node, and the nodes a client adds with
//! `blockdev-add`), known by the identity of what it opened, with links
//! to its `file` child and a record of who uses it (the disk, a job, a
//! parent node). Management commands name nodes as QEMU does
//! (`blockdev-mirror target=NODE`); the guest's requests never look here:
//! the disk holds its image directly.
//!
//! - [`node`]: a node (driver, image, identity, options, child);
//! - [`registry`]: the nodes of one daemon, with QEMU's refusals;
//! - [`qmp`]: `blockdev-add`, `blockdev-del`, `query-named-block-nodes`;
//! - [`cbw`]: copy-before-write filters a client adds over the disk;
//! - [`export`]: the nodes as NBD export sources;
//! - [`nbd`]: nodes on remote NBD exports (`driver=nbd`).
//!
//! A mirror job's filter node (`mirror_top`) is made and removed by the job
//! itself: `crate::mirror::top`.

pub mod cbw;
pub mod export;
pub mod nbd;
pub mod node;
pub mod qmp;
pub mod registry;

pub use node::{Aio, Driver, Node, NodeOptions};
pub use registry::{Graph, GraphError, User, MAX_NODES};

/// Longest node name QEMU accepts (its `node_name` buffer is 32 bytes).
pub const MAX_NODE_NAME: usize = 31;

/// Checks a node name by QEMU 7.2's rules (`id_wellformed` and the length
/// limit of `bdrv_assign_node_name`), with its messages.
pub fn validate_node_name(name: &str) -> Result<(), GraphError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
        return Err(GraphError::InvalidName(name.to_string()));
    }
    if name.len() > MAX_NODE_NAME {
        return Err(GraphError::NameTooLong);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_qemu() {
        for ok in ["a", "disk0", "x-y.z_1", "A9", &"a".repeat(31)] {
            assert_eq!(validate_node_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "1abc", "_x", "-x", ".x", "a b", "a#", "a/b", "é", "a\u{e9}",
        ] {
            assert_eq!(
                validate_node_name(bad).map_err(|e| e.to_string()),
                Err(format!("Invalid node-name: '{bad}'")),
                "{bad}"
            );
        }
        assert_eq!(
            validate_node_name(&"a".repeat(32)).map_err(|e| e.to_string()),
            Err("Node name too long".to_string())
        );
        // QEMU checks the characters before the length.
        assert_eq!(
            validate_node_name(&format!("1{}", "a".repeat(40))),
            Err(GraphError::InvalidName(format!("1{}", "a".repeat(40))))
        );
    }
}
