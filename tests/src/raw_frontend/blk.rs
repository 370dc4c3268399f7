//! virtio-blk wire formats the test frontend writes and reads by hand: the
//! request header, discard/write-zeroes segments, and the config space. Kept
//! as explicit byte layouts (not the bindgen structs) so tests can also
//! produce *wrong* sizes on purpose.

use anyhow::{ensure, Result};
pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// virtio-blk's fixed sector size (all `sector` fields count these).
pub const SECTOR_SIZE: u64 = 512;
/// Size of `struct virtio_blk_outhdr`.
pub const OUTHDR_SIZE: u32 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes`.
pub const SEGMENT_SIZE: u32 = 16;
/// Length of the GET_ID answer (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: u32 = 20;
/// How many config-space bytes we read: everything up to and including
/// `write_zeroes_may_unmap` and its padding (offset 60).
pub const CONFIG_LEN: u32 = 60;

/// `struct virtio_blk_outhdr`: request type, I/O priority, start sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutHdr {
    /// VIRTIO_BLK_T_*.
    pub type_: u32,
    /// I/O priority (ignored by most devices).
    pub ioprio: u32,
    /// First 512-byte sector.
    pub sector: u64,
}

impl OutHdr {
    /// A header of `type_` at `sector`.
    pub fn new(type_: u32, sector: u64) -> Self {
        OutHdr {
            type_,
            ioprio: 0,
            sector,
        }
    }

    /// The 16 little-endian bytes of the header.
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.type_.to_le_bytes());
        b[4..8].copy_from_slice(&self.ioprio.to_le_bytes());
        b[8..16].copy_from_slice(&self.sector.to_le_bytes());
        b
    }
}

/// `struct virtio_blk_discard_write_zeroes`: one range of a discard or
/// write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Bit 0: unmap (write-zeroes only); the rest are reserved.
    pub flags: u32,
}

impl Segment {
    /// A segment without flags.
    pub fn new(sector: u64, num_sectors: u32) -> Self {
        Segment {
            sector,
            num_sectors,
            flags: 0,
        }
    }

    /// The 16 little-endian bytes of the segment.
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }

    /// The concatenated bytes of several segments (a request payload).
    pub fn payload(segments: &[Segment]) -> Vec<u8> {
        segments.iter().flat_map(|s| s.bytes()).collect()
    }
}

/// The fields of `struct virtio_blk_config` the tests check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Largest single data segment in bytes (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: u32,
    /// Most data segments per request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Logical block size (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// log2(physical block / logical block) (VIRTIO_BLK_F_TOPOLOGY).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block (VIRTIO_BLK_F_TOPOLOGY).
    pub alignment_offset: u8,
    /// Suggested minimum I/O size in blocks (VIRTIO_BLK_F_TOPOLOGY).
    pub min_io_size: u16,
    /// Optimal I/O size in blocks (VIRTIO_BLK_F_TOPOLOGY).
    pub opt_io_size: u32,
    /// Write cache mode (VIRTIO_BLK_F_CONFIG_WCE).
    pub wce: u8,
    /// Number of request queues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
    /// Largest discard in sectors (VIRTIO_BLK_F_DISCARD).
    pub max_discard_sectors: u32,
    /// Most segments per discard request.
    pub max_discard_seg: u32,
    /// Discard alignment in sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes in sectors (VIRTIO_BLK_F_WRITE_ZEROES).
    pub max_write_zeroes_sectors: u32,
    /// Most segments per write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes with the unmap flag may deallocate.
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// Decodes the little-endian config space (at least CONFIG_LEN bytes).
    pub fn parse(b: &[u8]) -> Result<Self> {
        ensure!(
            b.len() >= CONFIG_LEN as usize,
            "config space too short: {} bytes",
            b.len()
        );
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        Ok(BlkConfig {
            capacity: u64_at(0),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            physical_block_exp: b[24],
            alignment_offset: b[25],
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            wce: b[32],
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56],
        })
    }
}

/// A readable name for a status byte, for assertion messages.
pub fn status_name(s: u8) -> &'static str {
    match u32::from(s) {
        VIRTIO_BLK_S_OK => "OK",
        VIRTIO_BLK_S_IOERR => "IOERR",
        VIRTIO_BLK_S_UNSUPP => "UNSUPP",
        _ if s == super::STATUS_SENTINEL => "untouched",
        _ => "invalid",
    }
}
