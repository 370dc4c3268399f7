//! vubd's block layer: disk images, the guest-visible [`Disk`] with its
//! write hooks (dirty tracking), and later block jobs and management
//! commands. Nothing in this crate knows about vhost or virtio: the
//! `vhost-glue` crate turns virtio requests into calls on [`Disk`].

pub mod allowed_dirs;
pub mod backup;
pub mod bits;
pub mod dirty;
pub mod disk;
pub mod gate;
pub mod graph;
pub mod image;
pub mod iobuf;
pub mod jobs;
pub mod lock;
pub mod mirror;
pub mod nbd;
pub mod qmp;
pub mod thread_kind;
pub mod unix_socket;

pub use disk::{Disk, DiskError, WriteHook, WriteOp};
pub use gate::IoGate;
pub use image::{Image, ImageError, RawImage, RawImageOptions};
pub use iobuf::IoBuf;
