//! vubd's vhost-user-blk device: turns virtio-blk requests found in the
//! guest's shared memory into calls on the backend's `Disk`, fills the
//! config space, negotiates features, and runs one worker thread per queue.

pub mod config_space;
pub mod device;
pub mod management;
pub mod request;
pub mod server;

pub use config_space::DeviceConfig;
pub use device::BlockDevice;
