//! The virtio-blk configuration: the device's limits, the virtio feature
//! bits that follow from them, and the config space bytes the frontend reads.

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Largest single data segment (with `seg_max`, it bounds a request).
pub const SIZE_MAX: u32 = 1 << 20;
/// Limits for DISCARD and WRITE_ZEROES: sectors per segment and segments per request.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / 512;
/// Segments per DISCARD / WRITE_ZEROES request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;

/// How queue workers issue reads, writes and flushes to the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AioEngine {
    /// One blocking `preadv2`/`pwritev2` at a time per queue.
    Sync,
    /// io_uring: many requests of a queue at the disk at once (falls back
    /// to `Sync` where io_uring is unavailable).
    IoUring {
        /// Run a request that arrives alone (nothing else available or in
        /// flight) synchronously: right for the page cache, where going
        /// through the ring only adds a hand-off (tmpfs reads are punted to
        /// io_uring's worker threads); wrong for O_DIRECT, where the worker
        /// would sit out the disk's latency unable to take new requests.
        inline_lone: bool,
        /// Run every request on a memory-backed image synchronously: right
        /// when the queue threads already keep every core busy, so the
        /// worker threads the ring hands tmpfs transfers to would only add
        /// context switches (see `UringEngine::set_inline_memory`).
        inline_memory: bool,
    },
}

/// Everything about the device that is fixed for the daemon's lifetime.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Disk size in bytes (a multiple of `logical_block_size`).
    pub size: u64,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// Maximum virtqueue size.
    pub queue_size: u16,
    /// Logical block size (512 or 4096).
    pub logical_block_size: u32,
    /// Physical block size reported in the topology (>= logical).
    pub physical_block_size: u32,
    /// Offer VIRTIO_BLK_F_RO and refuse writes.
    pub read_only: bool,
    /// GET_ID answer (at most 20 bytes are used).
    pub serial: String,
    /// Keep polling a queue this long after it last had work (0 = off).
    pub poll_us: u64,
    /// The I/O engine of the queue workers.
    pub aio: AioEngine,
    /// Worker threads serving the queues (clamped to 1..=num_queues): queue
    /// `q` is served by thread `q % threads`.
    pub threads: u16,
    /// Accept guest memory in files not sealed against shrinking: a
    /// frontend that then cuts its file kills the daemon with SIGBUS, so
    /// only for trusted frontends that cannot seal (libblkio, hugetlbfs
    /// files).
    pub allow_unsealed_memory: bool,
}

impl DeviceConfig {
    /// Maximum segments per request: two descriptors of a chain are header and status.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// Number of queue worker threads.
    pub fn num_threads(&self) -> usize {
        usize::from(self.threads.clamp(1, self.num_queues.max(1)))
    }

    /// The thread serving queue `queue`.
    pub fn thread_of(&self, queue: usize) -> usize {
        queue % self.num_threads()
    }

    /// The queue at position `pos` among those of thread `thread`.
    pub fn queue_of(&self, thread: usize, pos: usize) -> usize {
        thread + pos * self.num_threads()
    }

    /// Largest data length of one read or write: exactly what the config
    /// space advertises (`seg_max` segments of `size_max` bytes).
    pub fn max_request_bytes(&self) -> u64 {
        u64::from(self.seg_max()) * u64::from(SIZE_MAX)
    }

    /// The virtio features offered to the frontend.
    pub fn features(&self) -> u64 {
        let mut bits = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        bits
    }

    /// The config space structure for the current write-back mode.
    pub fn config_space(&self, writeback: bool) -> virtio_blk_config {
        let lbs_sectors = self.logical_block_size / 512;
        let physical_exp = (self.physical_block_size / self.logical_block_size).trailing_zeros();
        virtio_blk_config {
            capacity: (self.size / 512),
            size_max: SIZE_MAX,
            seg_max: self.seg_max(),
            blk_size: self.logical_block_size,
            physical_block_exp: physical_exp as u8,
            alignment_offset: 0,
            min_io_size: 1u16,
            opt_io_size: 0u32,
            wce: u8::from(writeback),
            num_queues: self.num_queues,
            max_discard_sectors: MAX_DISCARD_SECTORS,
            max_discard_seg: MAX_DISCARD_SEGMENTS,
            discard_sector_alignment: lbs_sectors,
            max_write_zeroes_sectors: MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: MAX_DISCARD_SEGMENTS,
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
    }

    /// Config space bytes `[offset, offset+size)` (empty if out of range).
    pub fn config_bytes(&self, writeback: bool, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config_space(writeback);
        // SAFETY: virtio_blk_config is a packed plain-old-data struct; every
        // byte is initialized (built from Default) and has no padding.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&cfg as *const virtio_blk_config).cast::<u8>(),
                std::mem::size_of::<virtio_blk_config>(),
            )
        };
        let start = offset as usize;
        match start.checked_add(size as usize) {
            Some(end) if end <= bytes.len() => bytes[start..end].to_vec(),
            _ => Vec::new(),
        }
    }

    /// The write cache mode a session starts in, and returns to on a
    /// device reset, for the features the driver `acked`: write-back only
    /// if it negotiated FLUSH. A driver that cannot flush must get
    /// write-through (virtio 1.x, 5.2.6.2), whatever the last session chose.
    pub fn default_writeback(acked: u64) -> bool {
        acked & (1 << VIRTIO_BLK_F_FLUSH) != 0
    }

    /// The write cache mode after the driver writes `wce` to the config
    /// space; None if it may not (CONFIG_WCE not negotiated). Write-back
    /// still needs FLUSH.
    pub fn writeback_from_wce(acked: u64, wce: u8) -> Option<bool> {
        (acked & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0)
            .then_some(wce != 0 && Self::default_writeback(acked))
    }

    /// Offset of the `wce` byte, the only field the driver may write.
    pub fn wce_offset() -> u32 {
        std::mem::offset_of!(virtio_blk_config, wce) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DeviceConfig {
        DeviceConfig {
            size: 1 << 30,
            num_queues: 2,
            queue_size: 256,
            logical_block_size: 4096,
            physical_block_size: 4096,
            read_only: false,
            serial: "s".into(),
            poll_us: 0,
            aio: AioEngine::Sync,
            threads: 1,
            allow_unsealed_memory: false,
        }
    }

    #[test]
    fn config_space_layout_matches_the_spec() {
        let c = cfg();
        let bytes = c.config_bytes(true, 0, 60);
        assert_eq!(bytes.len(), 60);
        assert_eq!(
            u64::from_le_bytes(bytes[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
            SIZE_MAX
        );
        assert_eq!(u32::from_le_bytes(bytes[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(bytes[20..24].try_into().unwrap()), 4096);
        assert_eq!(DeviceConfig::wce_offset(), 32);
        assert_eq!(bytes[32], 1);
        assert_eq!(u16::from_le_bytes(bytes[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(bytes[44..48].try_into().unwrap()), 8);
        assert!(c.config_bytes(true, 90, 100).is_empty());
    }

    #[test]
    fn the_write_cache_follows_the_negotiated_features() {
        let flush = 1u64 << VIRTIO_BLK_F_FLUSH;
        let config_wce = 1u64 << VIRTIO_BLK_F_CONFIG_WCE;
        assert!(DeviceConfig::default_writeback(cfg().features()));
        assert!(DeviceConfig::default_writeback(flush | config_wce));
        assert!(!DeviceConfig::default_writeback(config_wce));
        assert!(!DeviceConfig::default_writeback(0));
        assert_eq!(
            DeviceConfig::writeback_from_wce(flush | config_wce, 0),
            Some(false)
        );
        assert_eq!(
            DeviceConfig::writeback_from_wce(flush | config_wce, 1),
            Some(true)
        );
        assert_eq!(DeviceConfig::writeback_from_wce(config_wce, 1), Some(false));
        assert_eq!(DeviceConfig::writeback_from_wce(flush, 0), None);
    }

    #[test]
    fn read_only_offers_ro_and_no_discard() {
        let mut c = cfg();
        c.read_only = true;
        let f = c.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }
}
