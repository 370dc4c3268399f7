//! vubd's vhost-user-blk device: turns virtio-blk requests found in the
//! guest's shared memory into calls on the backend's `Disk`, fills the
//! config space, negotiates features, and runs the queues on worker
//! threads (one per queue unless told otherwise).

pub mod config_space;
pub mod device;
pub mod inflight;
pub mod landlock;
pub mod management;
pub mod request;
pub mod seccomp;
pub mod server;

pub use config_space::DeviceConfig;
pub use device::BlockDevice;
