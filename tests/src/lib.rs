//! vubd's test harness: starts daemons (vubd and the reference
//! qemu-storage-daemon), drives them with real frontends (libblkio, QEMU
//! guests, a deliberately hostile vhost-user frontend) and measures them.

pub mod bench;
pub mod bench_mirror;
pub mod client;
pub mod daemon;
pub mod fleece;
pub mod guest;
pub mod nbd_tools;
pub mod netns;
pub mod qmp_client;
pub mod raw_frontend;
pub mod resources;
pub mod rng;
