//! virtio-blk request parsing and execution over arbitrary descriptor
//! chains and guest memory, against a real raw image on tmpfs.
//!
//! Guest memory is two 64 KiB regions with a hole between them (so that
//! buffers can straddle a gap); a split queue of 16 entries sits at 0.
//! Input layout:
//! - byte 0: bits 0-3 the head descriptor index, bit 4 a 4 KiB logical
//!   block size, bit 5 a read-only device;
//! - 256 bytes: the descriptor table (16 raw descriptors: addr, len,
//!   flags, next, little endian; flags may say NEXT, WRITE, INDIRECT);
//! - the rest: guest memory contents from 0x1000 on (headers, data,
//!   indirect tables), spilling over into the second region.
//!
//! Checks: every chain ends in a completion (no panic, no access outside
//! guest memory, which would fault); a status, if any, is a virtio-blk one.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use vhost_glue::config_space::{AioEngine, DeviceConfig};
use vhost_glue::request::{GuestMemoryMmap, RequestParser};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Address, Bytes, GuestAddress};
use vubd_backend::Disk;
use vubd_fuzz::DISK_SIZE;

const QUEUE_SIZE: u16 = 16;
const REGION: usize = 0x1_0000;
const SECOND: u64 = 0x2_0000;
const DATA: u64 = 0x1000;
const TABLE: usize = 16 * QUEUE_SIZE as usize;

fn disk() -> &'static Arc<Disk> {
    static D: OnceLock<Arc<Disk>> = OnceLock::new();
    D.get_or_init(|| vubd_fuzz::disk("virtio"))
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 1 + TABLE {
        return;
    }
    let (flags, table, contents) = (input[0], &input[1..1 + TABLE], &input[1 + TABLE..]);
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), REGION), (GuestAddress(SECOND), REGION)])
            .expect("guest memory");
    let queue = MockSplitQueue::new(&mem, QUEUE_SIZE);
    let (first, second) = contents.split_at(contents.len().min(REGION - DATA as usize));
    mem.write_slice(first, GuestAddress(DATA))
        .expect("region 1");
    mem.write_slice(&second[..second.len().min(REGION)], GuestAddress(SECOND))
        .expect("region 2");
    mem.write_slice(table, queue.desc_table_addr())
        .expect("table");
    let head = u16::from(flags & 0xf);
    let avail = queue.avail_addr();
    mem.write_obj(1u16.to_le(), avail.unchecked_add(2))
        .expect("avail idx");
    mem.write_obj(head.to_le(), avail.unchecked_add(4))
        .expect("avail ring");
    let mut q: Queue = queue.create_queue().expect("queue");
    let Some(chain) = q.iter(&mem).expect("avail ring").next() else {
        return;
    };
    let lbs = if flags & 0x10 != 0 { 4096 } else { 512 };
    let cfg = DeviceConfig {
        size: DISK_SIZE,
        num_queues: 1,
        queue_size: QUEUE_SIZE,
        logical_block_size: lbs,
        physical_block_size: 4096,
        read_only: flags & 0x20 != 0,
        serial: "fuzz-serial".into(),
        poll_us: 0,
        aio: AioEngine::Sync,
        threads: 1,
        allow_unsealed_memory: false,
    };
    let done = RequestParser::default().process(chain, &mem, disk(), &cfg);
    if let Some(status) = done.status {
        assert!(status <= 2, "status byte {status}");
    }
});
