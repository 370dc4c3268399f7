//! Unit tests of request parsing and validation on in-memory virtqueues.

use super::*;
use crate::config_space::AioEngine;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vubd_backend::{RawImage, RawImageOptions};

const DISK_SIZE: u64 = 1 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const MEM_SIZE: usize = 0x100_0000;

struct Fixture {
    mem: GuestMemoryMmap,
    disk: Disk,
    cfg: DeviceConfig,
    path: std::path::PathBuf,
}

impl Fixture {
    fn new(read_only: bool, lbs: u32) -> Fixture {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vubd-req-{}-{n}.img", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(DISK_SIZE).unwrap();
        let image = RawImage::open(
            &path,
            RawImageOptions {
                read_only,
                direct: false,
            },
        )
        .unwrap();
        Fixture {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
            disk: Disk::new(Box::new(image), read_only),
            cfg: DeviceConfig {
                size: DISK_SIZE,
                num_queues: 1,
                queue_size: 16,
                logical_block_size: lbs,
                physical_block_size: 4096,
                read_only,
                serial: "serial-123".into(),
                poll_us: 0,
                aio: AioEngine::Sync,
                threads: 1,
                allow_unsealed_memory: false,
            },
            path,
        }
    }

    fn header(&self, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Runs one chain built from (addr, len, writable) triples.
    fn run(&self, descs: &[(u64, u32, bool)]) -> Completion {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(addr, len, w)| {
                let flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
            })
            .collect();
        let queue = MockSplitQueue::new(&self.mem, 16);
        let chain = queue.build_desc_chain(&raw).unwrap();
        RequestParser::default().process(chain, &self.mem, &self.disk, &self.cfg)
    }

    fn status_byte(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn file(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

const OK: Option<u8> = Some(VIRTIO_BLK_S_OK as u8);
const IOERR: Option<u8> = Some(VIRTIO_BLK_S_IOERR as u8);
const UNSUPP: Option<u8> = Some(VIRTIO_BLK_S_UNSUPP as u8);

fn std_write(f: &Fixture, sector: u64, len: u32) -> Completion {
    f.header(VIRTIO_BLK_T_OUT, sector);
    f.run(&[(HDR, 16, false), (DATA, len, false), (STATUS, 1, true)])
}

#[test]
fn write_then_read_round_trips_through_guest_memory() {
    let f = Fixture::new(false, 512);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    f.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    let done = std_write(&f, 8, 8192);
    assert_eq!(done.status, OK);
    assert_eq!(done.used_len, 1);
    assert_eq!(f.status_byte(), VIRTIO_BLK_S_OK as u8);
    assert_eq!(&f.file()[4096..4096 + 8192], &pattern[..]);

    f.mem.write_slice(&[0u8; 8192], GuestAddress(DATA)).unwrap();
    f.header(VIRTIO_BLK_T_IN, 8);
    // Data split over two descriptors, one of them straddling nothing special.
    let done = f.run(&[
        (HDR, 16, false),
        (DATA, 4096, true),
        (DATA + 4096, 4096, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(done.status, OK);
    assert_eq!(done.used_len, 8193);
    let mut back = vec![0u8; 8192];
    f.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
}

#[test]
fn any_layout_header_and_status_sharing_descriptors() {
    let f = Fixture::new(false, 512);
    // Header and data in one readable descriptor, status alone.
    let mut buf = vec![0u8; 16 + 512];
    buf[0..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
    buf[8..16].copy_from_slice(&3u64.to_le_bytes());
    buf[16..].fill(0x5a);
    f.mem.write_slice(&buf, GuestAddress(HDR)).unwrap();
    let done = f.run(&[
        (HDR, 8, false),
        (HDR + 8, 16 + 512 - 8, false),
        (STATUS, 1, true),
    ]);
    assert_eq!(done.status, OK);
    assert!(f.file()[3 * 512..4 * 512].iter().all(|&b| b == 0x5a));

    // A read whose data and status share one writable descriptor.
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    hdr[8..16].copy_from_slice(&3u64.to_le_bytes());
    f.mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
    let done = f.run(&[(HDR, 16, false), (DATA, 513, true)]);
    assert_eq!(done.status, OK);
    assert_eq!(done.used_len, 513);
    let mut back = vec![0u8; 513];
    f.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back[..512].iter().all(|&b| b == 0x5a));
    assert_eq!(back[512], VIRTIO_BLK_S_OK as u8);
}

#[test]
fn range_and_alignment_violations_are_ioerr_and_touch_nothing() {
    let f = Fixture::new(false, 512);
    f.mem
        .write_slice(&[0xeeu8; 8192], GuestAddress(DATA))
        .unwrap();
    let last_sector = DISK_SIZE / 512;
    assert_eq!(
        std_write(&f, last_sector, 512).status,
        IOERR,
        "starts past the end"
    );
    assert_eq!(
        std_write(&f, last_sector - 1, 1024).status,
        IOERR,
        "runs past the end"
    );
    assert_eq!(
        std_write(&f, u64::MAX / 256, 512).status,
        IOERR,
        "offset overflows"
    );
    assert_eq!(std_write(&f, 0, 100).status, IOERR, "not a sector multiple");
    assert_eq!(f.file().len() as u64, DISK_SIZE);
    assert!(f.file().iter().all(|&b| b == 0), "nothing was written");

    let f4k = Fixture::new(false, 4096);
    f4k.mem
        .write_slice(&[0xeeu8; 8192], GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        std_write(&f4k, 1, 4096).status,
        IOERR,
        "sector not 4k-aligned"
    );
    assert_eq!(
        std_write(&f4k, 8, 512).status,
        IOERR,
        "length not 4k multiple"
    );
    assert_eq!(std_write(&f4k, 8, 4096).status, OK);
}

#[test]
fn oversized_requests_are_refused() {
    let mut f = Fixture::new(false, 512);
    // Pretend the disk is large so only the per-request limit can refuse it;
    // a small queue keeps the advertised limit (seg_max * size_max) small.
    f.cfg.size = 64 << 20;
    f.cfg.queue_size = 4;
    let max = f.cfg.max_request_bytes();
    assert_eq!(max, 2 * u64::from(crate::config_space::SIZE_MAX));
    let big = 0x40_0000u64;
    f.header(VIRTIO_BLK_T_IN, 0);
    let done = f.run(&[
        (HDR, 16, false),
        (big, max as u32, true),
        (big + max, 512, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(done.status, IOERR);
    // Exactly the limit is fine as far as validation goes (the real disk is
    // smaller, so the backend's own range check then refuses it).
    f.header(VIRTIO_BLK_T_IN, 0);
    let done = f.run(&[(HDR, 16, false), (big, max as u32, true), (STATUS, 1, true)]);
    assert_eq!(done.status, IOERR);
    f.cfg.size = DISK_SIZE;
    f.header(VIRTIO_BLK_T_IN, 0);
    let done = f.run(&[
        (HDR, 16, false),
        (big, DISK_SIZE as u32, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(done.status, OK, "the whole disk in one request");
}

#[test]
fn wrong_shapes() {
    let f = Fixture::new(false, 512);
    f.mem.write_slice(&[1u8; 512], GuestAddress(DATA)).unwrap();

    f.header(VIRTIO_BLK_T_OUT, 0);
    // No writable descriptor at all: nowhere to put a status.
    let done = f.run(&[(HDR, 16, false), (DATA, 512, false)]);
    assert_eq!(
        done,
        Completion {
            status: None,
            used_len: 0
        }
    );

    // Status descriptor of length zero.
    f.header(VIRTIO_BLK_T_OUT, 0);
    let done = f.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 0, true)]);
    assert_eq!(done.status, None);

    // Header short.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(f.run(&[(HDR, 8, false), (STATUS, 1, true)]).status, IOERR);

    // Header in a writable descriptor.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(f.run(&[(HDR, 16, true), (STATUS, 1, true)]).status, IOERR);

    // Readable descriptor after a writable one.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA + 4096, 512, false),
            (STATUS, 1, true)
        ])
        .status,
        IOERR
    );

    // Write data in a device-writable descriptor.
    f.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)])
            .status,
        IOERR
    );

    // Read data in a driver-readable descriptor.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)])
            .status,
        IOERR
    );

    // Flush carrying data.
    f.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)])
            .status,
        IOERR
    );
    f.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(f.run(&[(HDR, 16, false), (STATUS, 1, true)]).status, OK);

    assert!(
        f.file().iter().all(|&b| b == 0),
        "no malformed write landed"
    );
}

#[test]
fn descriptors_outside_guest_memory() {
    let f = Fixture::new(false, 512);
    let outside = MEM_SIZE as u64 + 0x1000;
    f.header(VIRTIO_BLK_T_IN, 0);
    // Data outside memory, status fine: IOERR.
    assert_eq!(
        f.run(&[(HDR, 16, false), (outside, 512, true), (STATUS, 1, true)])
            .status,
        IOERR
    );
    // Data straddling the end of memory.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[
            (HDR, 16, false),
            (MEM_SIZE as u64 - 256, 512, true),
            (STATUS, 1, true)
        ])
        .status,
        IOERR
    );
    // Status outside memory: dropped, nothing written anywhere.
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 512, true), (outside, 1, true)])
            .status,
        None
    );
    // Header outside memory.
    assert_eq!(
        f.run(&[(outside, 16, false), (STATUS, 1, true)]).status,
        IOERR
    );
    // Address overflow.
    assert_eq!(
        f.run(&[
            (HDR, 16, false),
            (u64::MAX - 10, 512, true),
            (STATUS, 1, true)
        ])
        .status,
        IOERR
    );
}

#[test]
fn looping_chain_is_dropped() {
    let f = Fixture::new(false, 512);
    f.header(VIRTIO_BLK_T_IN, 0);
    let queue = MockSplitQueue::new(&f.mem, 16);
    let next = VRING_DESC_F_NEXT as u16;
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(
            DATA,
            512,
            next | VRING_DESC_F_WRITE as u16,
            2,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            STATUS,
            1,
            next | VRING_DESC_F_WRITE as u16,
            1,
        )),
    ];
    let chain = queue.build_multiple_desc_chains(&descs).unwrap();
    let done = RequestParser::default().process(chain, &f.mem, &f.disk, &f.cfg);
    assert_eq!(
        done,
        Completion {
            status: None,
            used_len: 0
        }
    );

    // next index past the table.
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(SplitDescriptor::new(
            STATUS,
            1,
            next | VRING_DESC_F_WRITE as u16,
            999,
        )),
    ];
    let queue = MockSplitQueue::new(&f.mem, 16);
    let chain = queue.build_multiple_desc_chains(&descs).unwrap();
    let done = RequestParser::default().process(chain, &f.mem, &f.disk, &f.cfg);
    assert_eq!(done.status, None);
}

#[test]
fn read_only_disk_refuses_writes() {
    let f = Fixture::new(true, 512);
    assert_eq!(std_write(&f, 0, 512).status, IOERR);
    let seg = segment(0, 8, 0);
    f.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    f.header(VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)])
            .status,
        IOERR
    );
    f.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)])
            .status,
        OK
    );
}

#[test]
fn unknown_and_unsupported_types() {
    let f = Fixture::new(false, 512);
    for t in [2u32, 3, 14, 15, 16, 99, u32::MAX] {
        f.header(t, 0);
        assert_eq!(
            f.run(&[(HDR, 16, false), (STATUS, 1, true)]).status,
            UNSUPP,
            "type {t}"
        );
    }
}

#[test]
fn get_id_returns_serial_and_truncates_to_buffer() {
    let f = Fixture::new(false, 512);
    f.header(VIRTIO_BLK_T_GET_ID, 0);
    f.mem
        .write_slice(&[0xffu8; 20], GuestAddress(DATA))
        .unwrap();
    let done = f.run(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    assert_eq!(done.status, OK);
    assert_eq!(done.used_len, 21);
    let mut id = [0u8; 20];
    f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..10], b"serial-123");
    assert!(id[10..].iter().all(|&b| b == 0));

    f.mem
        .write_slice(&[0xffu8; 20], GuestAddress(DATA))
        .unwrap();
    f.header(VIRTIO_BLK_T_GET_ID, 0);
    let done = f.run(&[(HDR, 16, false), (DATA, 6, true), (STATUS, 1, true)]);
    assert_eq!(done.status, OK);
    f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..6], b"serial");
    assert_eq!(id[6], 0xff, "nothing written past the buffer");
}

fn segment(sector: u64, num: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn discard_and_write_zeroes_segments() {
    let f = Fixture::new(false, 512);
    f.mem
        .write_slice(&[9u8; 8192], GuestAddress(DATA + 0x1000))
        .unwrap();
    f.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        f.run(&[
            (HDR, 16, false),
            (DATA + 0x1000, 8192, false),
            (STATUS, 1, true)
        ])
        .status,
        OK
    );

    let run_segs = |t: u32, segs: &[[u8; 16]]| {
        let bytes: Vec<u8> = segs.iter().flatten().copied().collect();
        f.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        f.header(t, 0);
        f.run(&[
            (HDR, 16, false),
            (DATA, bytes.len() as u32, false),
            (STATUS, 1, true),
        ])
        .status
    };
    // Two good segments: zero the first 1 KiB and sectors 4..6.
    assert_eq!(
        run_segs(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[segment(0, 2, 0), segment(4, 2, 1)]
        ),
        OK
    );
    let file = f.file();
    assert!(file[..1024].iter().all(|&b| b == 0));
    assert!(file[1024..2048].iter().all(|&b| b == 9));
    assert!(file[2048..3072].iter().all(|&b| b == 0));
    assert_eq!(run_segs(VIRTIO_BLK_T_DISCARD, &[segment(8, 8, 0)]), OK);
    assert!(f.file()[4096..8192].iter().all(|&b| b == 0));

    // Bad segments: nothing changes.
    let before = f.file();
    assert_eq!(
        run_segs(VIRTIO_BLK_T_DISCARD, &[segment(0, 8, 1)]),
        UNSUPP,
        "discard with unmap"
    );
    assert_eq!(
        run_segs(VIRTIO_BLK_T_WRITE_ZEROES, &[segment(0, 8, 2)]),
        UNSUPP,
        "reserved flag"
    );
    assert_eq!(
        run_segs(VIRTIO_BLK_T_DISCARD, &[segment(0, 0, 0)]),
        IOERR,
        "zero sectors"
    );
    assert_eq!(
        run_segs(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[segment(0, 2, 0), segment(DISK_SIZE / 512, 1, 0)]
        ),
        IOERR,
        "second segment out of range"
    );
    let many = vec![segment(0, 1, 0); MAX_DISCARD_SEGMENTS as usize + 1];
    assert_eq!(
        run_segs(VIRTIO_BLK_T_DISCARD, &many),
        IOERR,
        "too many segments"
    );
    f.mem
        .write_slice(&segment(0, 1, 0), GuestAddress(DATA))
        .unwrap();
    f.header(VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        f.run(&[(HDR, 16, false), (DATA, 15, false), (STATUS, 1, true)])
            .status,
        IOERR,
        "partial segment"
    );
    assert_eq!(f.file(), before);
}

#[test]
fn indirect_chain_is_served() {
    let f = Fixture::new(false, 512);
    f.header(VIRTIO_BLK_T_GET_ID, 0);
    // Indirect table at 0x38_0000 with three descriptors.
    let table = 0x38_0000u64;
    let next = VRING_DESC_F_NEXT as u16;
    let w = VRING_DESC_F_WRITE as u16;
    let entries = [
        SplitDescriptor::new(HDR, 16, next, 1),
        SplitDescriptor::new(DATA, 20, next | w, 2),
        SplitDescriptor::new(STATUS, 1, w, 0),
    ];
    for (i, d) in entries.iter().enumerate() {
        f.mem
            .write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let head = RawDescriptor::from(SplitDescriptor::new(
        table,
        48,
        virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
        0,
    ));
    let queue = MockSplitQueue::new(&f.mem, 16);
    let chain = queue.build_multiple_desc_chains(&[head]).unwrap();
    let done = RequestParser::default().process(chain, &f.mem, &f.disk, &f.cfg);
    assert_eq!(done.status, OK);
    assert_eq!(done.used_len, 21);

    // A table whose length is not a multiple of 16 is refused (dropped: no status reachable).
    let bad = RawDescriptor::from(SplitDescriptor::new(
        table,
        40,
        virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
        0,
    ));
    let queue = MockSplitQueue::new(&f.mem, 16);
    let chain = queue.build_multiple_desc_chains(&[bad]).unwrap();
    let done = RequestParser::default().process(chain, &f.mem, &f.disk, &f.cfg);
    assert_eq!(done.status, None);
}

#[test]
fn more_segments_than_seg_max_are_refused() {
    let mut f = Fixture::new(false, 512);
    // seg_max = queue size - 2 = 2 data segments besides header and status.
    f.cfg.queue_size = 4;
    assert_eq!(f.cfg.seg_max(), 2);
    f.mem
        .write_slice(&[0x77u8; 1536], GuestAddress(DATA))
        .unwrap();
    f.header(VIRTIO_BLK_T_OUT, 2);
    let three = [
        (HDR, 16, false),
        (DATA, 512, false),
        (DATA + 512, 512, false),
        (DATA + 1024, 512, false),
        (STATUS, 1, true),
    ];
    assert_eq!(f.run(&three).status, IOERR);
    assert!(
        f.file().iter().all(|&b| b == 0),
        "a refused write touched the disk"
    );
    f.header(VIRTIO_BLK_T_OUT, 2);
    let done = f.run(&[
        (HDR, 16, false),
        (DATA, 512, false),
        (DATA + 512, 1024, false),
        (STATUS, 1, true),
    ]);
    assert_eq!(done.status, OK);
    assert!(f.file()[1024..2560].iter().all(|&b| b == 0x77));
}

/// Past the first violation of a chain nothing more is mapped or collected:
/// the rest is only followed to its end, for the status byte (IOERR).
#[test]
fn descriptor_walk_stops_collecting_at_the_first_violation() {
    let f = Fixture::new(false, 512);
    f.header(VIRTIO_BLK_T_IN, 0);
    // A readable descriptor after a writable one (the violation), then a
    // dozen more, then the status.
    let mut descs = vec![(HDR, 16, false), (DATA, 512, true)];
    descs.extend((1..=12).map(|i| (DATA + i * 512, 512, false)));
    descs.push((STATUS, 1, true));
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .map(|&(addr, len, w)| {
            let flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
        })
        .collect();
    let queue = MockSplitQueue::new(&f.mem, 16);
    let chain = queue.build_desc_chain(&raw).unwrap();
    let mut parser = RequestParser::default();
    let done = parser.process(chain, &f.mem, &f.disk, &f.cfg);
    assert_eq!(done.status, IOERR);
    assert_eq!(f.status_byte(), VIRTIO_BLK_S_IOERR as u8);
    let collected = parser.readable.len() + parser.writable.len();
    assert!(
        collected <= 3,
        "{collected} buffers collected: the walk went on mapping past the violation"
    );
}
