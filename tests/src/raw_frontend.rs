//! A small, deliberately low-level vhost-user-blk frontend for hostile
//! tests. Unlike libblkio (which only ever sends well-formed requests), it
//! lets a test write any descriptor it likes into a split virtqueue laid out
//! by hand in guest memory it owns: descriptors pointing outside memory,
//! loops, wrong shapes, corrupted ring indexes. The vhost-user control plane
//! goes through the `vhost` crate's `Frontend`; the data plane (rings,
//! requests) is plain memory writes into a memfd shared with the backend.
//!
//! Typical use:
//! ```ignore
//! let mut fe = RawFrontend::connect(socket, Options::default())?;
//! let hdr = fe.place_header(VIRTIO_BLK_T_IN, 0)?;
//! let buf = fe.place_buffer(512, BUFFER_SENTINEL)?;
//! let st = fe.place_status()?;
//! let head = fe.submit_chain(0, &[Desc::r(hdr, 16), Desc::w(buf, 512), Desc::w(st, 1)])?;
//! let used = fe.wait_head(0, head, deadline)?;
//! ```

pub mod blk;
pub mod memory;

use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use blk::*;
pub use memory::{
    GuestMemory, MemRegion, BEYOND_GPA, HOLE_GPA, REGION0_GPA, REGION0_SIZE, REGION1_GPA,
    REGION1_SIZE,
};

/// What a status byte holds before the device writes it: none of OK,
/// IOERR, UNSUPP, so "never written" is told apart from every answer.
pub const STATUS_SENTINEL: u8 = 0xAA;
/// What device-writable buffers hold before a request: tells "the device
/// wrote here" from "it did not".
pub const BUFFER_SENTINEL: u8 = 0xA5;
/// Descriptor flag: chained to `next` (set automatically by `submit_chain`).
pub const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// Descriptor flag: device-writable.
pub const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
/// How long helpers that expect an answer wait for it. Generous: the
/// machines running the tests are shared and slow.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Rings of queue `q` live at RINGS_GPA + q * RING_STRIDE (never at guest
/// address 0: virtio-queue treats an avail ring at 0 as "not configured").
const RINGS_GPA: u64 = 0x10000;
const RING_STRIDE: u64 = 0x10000;
const AVAIL_OFFSET: u64 = 0x4000;
const USED_OFFSET: u64 = 0x8000;
const MAX_QUEUE_SIZE: u16 = 1024;
const MAX_QUEUES: u16 = 8;
/// Requests and buffers are carved from here to the end of region 0.
const ARENA_START: u64 = 0x10_0000;

/// One descriptor of a chain given to `submit_chain`: `next` and the NEXT
/// flag are filled in by the frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// VRING_DESC_F_* flags (WRITE, INDIRECT; NEXT is added as needed).
    pub flags: u16,
}

impl Desc {
    /// A driver-readable (device reads) buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            flags: 0,
        }
    }

    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            flags: F_WRITE,
        }
    }
}

/// A descriptor exactly as written to a table, `next` included: for chains
/// a well-behaved driver would never build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawDesc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// VRING_DESC_F_* flags, written as given.
    pub flags: u16,
    /// Index of the next descriptor, written as given.
    pub next: u16,
}

impl RawDesc {
    /// The 16 little-endian bytes of `struct vring_desc`.
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// How guest memory is handed to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemMode {
    /// One ADD_MEM_REG message per region (needs CONFIGURE_MEM_SLOTS);
    /// what libblkio does.
    AddRegion,
    /// One SET_MEM_TABLE message with all regions; what QEMU does.
    SetMemTable,
}

/// Connection options.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Number of queues to set up (must not exceed the device's).
    pub num_queues: u16,
    /// Entries per queue (power of two, at most 1024).
    pub queue_size: u16,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX if offered.
    pub event_idx: bool,
    /// Negotiate VIRTIO_RING_F_INDIRECT_DESC if offered.
    pub indirect: bool,
    /// How to send the memory map; `None` = ADD_MEM_REG when the backend
    /// offers CONFIGURE_MEM_SLOTS, else SET_MEM_TABLE.
    pub mem_mode: Option<MemMode>,
    /// Feature bits not to negotiate even if offered (a driver without
    /// FLUSH, say).
    pub withhold: u64,
    /// Offer guest memory in a memfd not sealed against shrinking (QEMU
    /// seals its memfds by default; libblkio cannot seal its own).
    pub unsealed_memory: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            num_queues: 1,
            queue_size: 256,
            event_idx: true,
            indirect: true,
            mem_mode: None,
            withhold: 0,
            unsealed_memory: false,
        }
    }
}

/// One entry of the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    /// Head descriptor index the device returned.
    pub id: u32,
    /// Bytes the device says it wrote into device-writable buffers.
    pub len: u32,
}

/// What became of a submitted chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The head came back in the used ring; `status` is the byte at the
    /// request's status address (if it had one), read after completion.
    Used {
        /// The used element's length.
        len: u32,
        /// The status byte (STATUS_SENTINEL if the device did not write it).
        status: Option<u8>,
    },
    /// The head did not come back before the deadline.
    NotUsed,
}

impl Outcome {
    /// The status byte, if the chain came back and had a status address.
    pub fn status(&self) -> Option<u8> {
        match self {
            Outcome::Used { status, .. } => *status,
            Outcome::NotUsed => None,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Used {
                len,
                status: Some(s),
            } => write!(f, "used (len {len}), status {s:#04x} ({})", status_name(*s)),
            Outcome::Used { len, status: None } => write!(f, "used (len {len}), no status byte"),
            Outcome::NotUsed => write!(f, "not returned to the used ring"),
        }
    }
}

/// A submitted block request: where its pieces are, to check them later.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// Queue it was submitted on.
    pub queue: usize,
    /// Head descriptor index.
    pub head: u16,
    /// Address of the status byte, if the chain has one.
    pub status_gpa: Option<u64>,
    /// Address of the data buffer (device-writable for reads), if any.
    pub data_gpa: Option<u64>,
    /// Length of the data buffer.
    pub data_len: u64,
}

/// One split virtqueue as the driver side sees it.
struct Vq {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
    /// Our avail->idx (free running).
    next_avail: u16,
    /// How far we have consumed used->idx (free running).
    last_used: u16,
    /// Next descriptor slot to hand out (cyclic).
    next_slot: u16,
    /// Used entries seen and not yet claimed, by head id.
    completed: HashMap<u32, u32>,
}

/// The hostile test frontend: a vhost-user connection plus guest memory
/// and hand-made virtqueues.
pub struct RawFrontend {
    fe: Frontend,
    mem: GuestMemory,
    device_features: u64,
    acked_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    queues: Vec<Vq>,
    arena_next: u64,
}

impl RawFrontend {
    /// Connects to the backend at `socket`, negotiates features, hands it
    /// guest memory and starts `opts.num_queues` queues.
    pub fn connect(socket: &Path, opts: Options) -> Result<Self> {
        ensure!(
            opts.queue_size.is_power_of_two() && opts.queue_size <= MAX_QUEUE_SIZE,
            "queue size {} must be a power of two <= {MAX_QUEUE_SIZE}",
            opts.queue_size
        );
        ensure!(
            (1..=MAX_QUEUES).contains(&opts.num_queues),
            "1..={MAX_QUEUES} queues supported"
        );
        let mem = GuestMemory::new(!opts.unsealed_memory)?;
        let mut fe = Frontend::connect(socket, u64::from(opts.num_queues))
            .with_context(|| format!("connect to {}", socket.display()))?;
        fe.set_owner().context("SET_OWNER")?;
        let device_features = fe.get_features().context("GET_FEATURES")?;
        let pf = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        ensure!(
            device_features & pf != 0,
            "backend does not offer VHOST_USER_F_PROTOCOL_FEATURES ({device_features:#x})"
        );
        let offered = fe
            .get_protocol_features()
            .context("GET_PROTOCOL_FEATURES")?;
        let wanted = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        let protocol_features = offered & wanted;
        fe.set_protocol_features(protocol_features)
            .context("SET_PROTOCOL_FEATURES")?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every later message asks for an acknowledgement, so a message
            // the backend refuses shows up as an error right here.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let n = fe.get_queue_num().context("GET_QUEUE_NUM")?;
            ensure!(
                n >= u64::from(opts.num_queues),
                "backend has {n} queues, {} wanted",
                opts.num_queues
            );
        }
        let mut accept: u64 = 1 << VIRTIO_F_VERSION_1
            | pf
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_RO;
        if opts.event_idx {
            accept |= 1 << VIRTIO_RING_F_EVENT_IDX;
        }
        if opts.indirect {
            accept |= 1 << VIRTIO_RING_F_INDIRECT_DESC;
        }
        let acked_features = device_features & accept & !opts.withhold;
        fe.set_features(acked_features).context("SET_FEATURES")?;

        let mode = opts.mem_mode.unwrap_or(
            if protocol_features.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
                MemMode::AddRegion
            } else {
                MemMode::SetMemTable
            },
        );
        let infos = mem.region_infos();
        match mode {
            MemMode::AddRegion => {
                let slots = fe.get_max_mem_slots().context("GET_MAX_MEM_SLOTS")?;
                ensure!(
                    slots >= infos.len() as u64,
                    "backend has {slots} memory slots"
                );
                for info in &infos {
                    fe.add_mem_region(info).context("ADD_MEM_REG")?;
                }
            }
            MemMode::SetMemTable => {
                fe.set_mem_table(&infos).context("SET_MEM_TABLE")?;
            }
        }

        let mut this = RawFrontend {
            fe,
            mem,
            device_features,
            acked_features,
            protocol_features,
            queues: Vec::new(),
            arena_next: ARENA_START,
        };
        for q in 0..opts.num_queues {
            this.start_queue(usize::from(q), opts.queue_size)?;
        }
        Ok(this)
    }

    fn start_queue(&mut self, q: usize, size: u16) -> Result<()> {
        let base = RINGS_GPA + q as u64 * RING_STRIDE;
        self.mem.fill(base, RING_STRIDE, 0)?;
        let vq = Vq {
            size,
            desc: base,
            avail: base + AVAIL_OFFSET,
            used: base + USED_OFFSET,
            kick: EventFd::new(EFD_NONBLOCK).context("eventfd")?,
            call: EventFd::new(EFD_NONBLOCK).context("eventfd")?,
            next_avail: 0,
            last_used: 0,
            next_slot: 0,
            completed: HashMap::new(),
        };
        let config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: self.mem.host_addr(vq.desc)?,
            used_ring_addr: self.mem.host_addr(vq.used)?,
            avail_ring_addr: self.mem.host_addr(vq.avail)?,
            log_addr: None,
        };
        self.fe.set_vring_num(q, size).context("SET_VRING_NUM")?;
        self.fe.set_vring_base(q, 0).context("SET_VRING_BASE")?;
        self.fe
            .set_vring_addr(q, &config)
            .context("SET_VRING_ADDR")?;
        self.fe
            .set_vring_call(q, &vq.call)
            .context("SET_VRING_CALL")?;
        self.fe
            .set_vring_kick(q, &vq.kick)
            .context("SET_VRING_KICK")?;
        self.fe
            .set_vring_enable(q, true)
            .context("SET_VRING_ENABLE")?;
        self.queues.push(vq);
        Ok(())
    }

    /// Shuts the vhost-user socket down (the backend sees the frontend
    /// leave); the object is useless afterwards and only good for drop.
    pub fn disconnect(&self) {
        // SAFETY: shutdown(2) on a socket descriptor the Frontend owns.
        unsafe { libc::shutdown(self.fe.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// The guest memory shared with the backend.
    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// The raw vhost-user connection, for tests that send messages by hand.
    pub fn vhost(&mut self) -> &mut Frontend {
        &mut self.fe
    }

    /// Features the device offered.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// Features negotiated (offered and accepted).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether virtio feature bit `bit` was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        self.acked_features & (1u64 << bit) != 0
    }

    /// Protocol features negotiated.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// Entries in queue `q`.
    pub fn queue_size(&self, q: usize) -> Result<u16> {
        Ok(self.vq(q)?.size)
    }

    fn vq(&self, q: usize) -> Result<&Vq> {
        self.queues.get(q).with_context(|| format!("no queue {q}"))
    }

    fn vq_mut(&mut self, q: usize) -> Result<&mut Vq> {
        self.queues
            .get_mut(q)
            .with_context(|| format!("no queue {q}"))
    }

    /// Reads the device config space (GET_CONFIG).
    pub fn config(&mut self) -> Result<BlkConfig> {
        let buf = vec![0u8; CONFIG_LEN as usize];
        let (_, payload) = self
            .fe
            .get_config(0, CONFIG_LEN, VhostUserConfigFlags::empty(), &buf)
            .context("GET_CONFIG")?;
        BlkConfig::parse(&payload)
    }

    /// Writes the `wce` byte of the config space (SET_CONFIG), as a driver
    /// switching the write cache does.
    pub fn set_wce(&mut self, on: bool) -> Result<()> {
        self.fe
            .set_config(32, VhostUserConfigFlags::WRITABLE, &[u8::from(on)])
            .context("SET_CONFIG wce")
    }

    // ---- guest memory arena -------------------------------------------

    /// Carves `len` bytes (64-byte aligned) out of region 0. Wraps around
    /// when the arena is exhausted: tests run requests one after another,
    /// so old buffers are long done by then.
    pub fn alloc(&mut self, len: u64) -> Result<u64> {
        let len = len.max(1);
        ensure!(
            len <= REGION0_SIZE - ARENA_START,
            "allocation of {len} bytes too large"
        );
        let mut start = self.arena_next.next_multiple_of(64);
        if start + len > REGION0_GPA + REGION0_SIZE {
            start = ARENA_START;
        }
        self.arena_next = start + len;
        Ok(start)
    }

    /// Allocates a buffer of `len` bytes filled with `fill`.
    pub fn place_buffer(&mut self, len: u64, fill: u8) -> Result<u64> {
        let gpa = self.alloc(len)?;
        self.mem.fill(gpa, len, fill)?;
        Ok(gpa)
    }

    /// Allocates a buffer holding `data`.
    pub fn place_data(&mut self, data: &[u8]) -> Result<u64> {
        let gpa = self.alloc(data.len() as u64)?;
        self.mem.write(gpa, data)?;
        Ok(gpa)
    }

    /// Allocates and writes a request header.
    pub fn place_header(&mut self, type_: u32, sector: u64) -> Result<u64> {
        self.place_data(&OutHdr::new(type_, sector).bytes())
    }

    /// Allocates a status byte, preset to STATUS_SENTINEL.
    pub fn place_status(&mut self) -> Result<u64> {
        self.place_buffer(1, STATUS_SENTINEL)
    }

    // ---- descriptors and the avail ring -------------------------------

    /// Hands out `n` consecutive (cyclic) descriptor slots of queue `q`.
    pub fn alloc_slots(&mut self, q: usize, n: usize) -> Result<Vec<u16>> {
        let vq = self.vq_mut(q)?;
        ensure!(
            n >= 1 && n <= usize::from(vq.size),
            "chain of {n} descriptors does not fit a queue of {}",
            vq.size
        );
        let slots = (0..n as u16)
            .map(|i| (vq.next_slot.wrapping_add(i)) % vq.size)
            .collect();
        vq.next_slot = (vq.next_slot.wrapping_add(n as u16)) % vq.size;
        Ok(slots)
    }

    /// Writes descriptor `idx` of queue `q`'s table exactly as given.
    pub fn write_desc(&mut self, q: usize, idx: u16, d: RawDesc) -> Result<()> {
        let vq = self.vq(q)?;
        ensure!(idx < vq.size, "descriptor index {idx} outside the table");
        let gpa = vq.desc + 16 * u64::from(idx);
        self.mem.write(gpa, &d.bytes())
    }

    /// Writes an indirect descriptor table (entries exactly as given) into
    /// the arena and returns its address.
    pub fn write_table(&mut self, table: &[RawDesc]) -> Result<u64> {
        let bytes: Vec<u8> = table.iter().flat_map(|d| d.bytes()).collect();
        let gpa = self.alloc(bytes.len() as u64)?;
        self.mem.write(gpa, &bytes)?;
        Ok(gpa)
    }

    /// Links `descs` into a table (entry i's next = i + 1, NEXT on all but
    /// the last): the layout of both direct chains and indirect tables.
    pub fn link(descs: &[Desc], indexes: &[u16]) -> Vec<RawDesc> {
        descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let last = i + 1 == descs.len();
                RawDesc {
                    addr: d.addr,
                    len: d.len,
                    flags: if last { d.flags } else { d.flags | F_NEXT },
                    next: if last { 0 } else { indexes[i + 1] },
                }
            })
            .collect()
    }

    /// Puts `head` in the avail ring of queue `q`, publishes it (avail->idx
    /// += 1) and kicks the backend.
    pub fn publish(&mut self, q: usize, head: u16) -> Result<()> {
        let (slot, idx) = {
            let vq = self.vq_mut(q)?;
            let slot = vq.avail + 4 + 2 * u64::from(vq.next_avail % vq.size);
            vq.next_avail = vq.next_avail.wrapping_add(1);
            // A head about to be reused must not be matched with an old
            // completion of the same index.
            vq.completed.remove(&u32::from(head));
            (slot, vq.next_avail)
        };
        let avail = self.vq(q)?.avail;
        self.mem.store_u16(slot, head)?;
        self.mem.store_u16(avail + 2, idx)?;
        self.kick(q)
    }

    /// Overwrites avail->idx of queue `q` (to corrupt the ring on purpose)
    /// and kicks. Our own notion of the index follows it.
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) -> Result<()> {
        let avail = {
            let vq = self.vq_mut(q)?;
            vq.next_avail = idx;
            vq.avail
        };
        self.mem.store_u16(avail + 2, idx)?;
        self.kick(q)
    }

    /// Our avail->idx for queue `q`.
    pub fn avail_idx(&self, q: usize) -> Result<u16> {
        Ok(self.vq(q)?.next_avail)
    }

    /// Writes avail ring entry `pos` (modulo the queue size) without
    /// publishing it.
    pub fn write_avail_entry(&mut self, q: usize, pos: u16, head: u16) -> Result<()> {
        let vq = self.vq(q)?;
        let slot = vq.avail + 4 + 2 * u64::from(pos % vq.size);
        self.mem.store_u16(slot, head)
    }

    /// Signals the kick eventfd of queue `q`.
    pub fn kick(&mut self, q: usize) -> Result<()> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.vq(q)?.kick.write(1).context("kick eventfd")?;
        Ok(())
    }

    /// Writes `descs` as a chain into fresh slots of queue `q`, publishes
    /// its head and kicks. Returns the head index.
    pub fn submit_chain(&mut self, q: usize, descs: &[Desc]) -> Result<u16> {
        let slots = self.alloc_slots(q, descs.len())?;
        for (idx, d) in slots.iter().zip(Self::link(descs, &slots)) {
            self.write_desc(q, *idx, d)?;
        }
        self.publish(q, slots[0])?;
        Ok(slots[0])
    }

    /// Writes `descs` as an indirect table and submits a single ring
    /// descriptor pointing at it. Returns the head index.
    pub fn submit_indirect(&mut self, q: usize, descs: &[Desc]) -> Result<u16> {
        ensure!(!descs.is_empty(), "empty indirect table");
        let indexes: Vec<u16> = (0..descs.len())
            .map(|i| u16::try_from(i).context("indirect table too long"))
            .collect::<Result<_>>()?;
        let table = self.write_table(&Self::link(descs, &indexes))?;
        let len = u32::try_from(descs.len() * 16).context("indirect table too long")?;
        self.submit_raw(
            q,
            RawDesc {
                addr: table,
                len,
                flags: F_INDIRECT,
                next: 0,
            },
        )
    }

    /// Submits one ring descriptor written exactly as given (for instance
    /// an INDIRECT one pointing at a hand-made table). Returns its index.
    pub fn submit_raw(&mut self, q: usize, d: RawDesc) -> Result<u16> {
        let slot = self.alloc_slots(q, 1)?[0];
        self.write_desc(q, slot, d)?;
        self.publish(q, slot)?;
        Ok(slot)
    }

    // ---- the used ring ------------------------------------------------

    /// Consumes the used entries the device added since last time.
    pub fn poll_used(&mut self, q: usize) -> Result<Vec<UsedElem>> {
        let (used, avail, size, event_idx) = {
            let vq = self.vq(q)?;
            (
                vq.used,
                vq.avail,
                vq.size,
                self.has_feature(VIRTIO_RING_F_EVENT_IDX),
            )
        };
        let idx = self.mem.load_u16(used + 2)?;
        let mut out = Vec::new();
        let mut last = self.vq(q)?.last_used;
        while last != idx {
            let e = used + 4 + 8 * u64::from(last % size);
            out.push(UsedElem {
                id: self.mem.read_u32(e)?,
                len: self.mem.read_u32(e + 4)?,
            });
            last = last.wrapping_add(1);
        }
        if event_idx {
            // used_event: ask for a notification on the very next entry.
            self.mem.store_u16(avail + 4 + 2 * u64::from(size), last)?;
        }
        let vq = self.vq_mut(q)?;
        vq.last_used = last;
        for e in &out {
            vq.completed.insert(e.id, e.len);
        }
        Ok(out)
    }

    /// The device's used->idx of queue `q`.
    pub fn used_idx(&self, q: usize) -> Result<u16> {
        self.mem.load_u16(self.vq(q)?.used + 2)
    }

    fn wait_call(&self, q: usize, timeout: Duration) -> Result<()> {
        let vq = self.vq(q)?;
        let mut pfd = libc::pollfd {
            fd: vq.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, 20) as libc::c_int;
        // SAFETY: one valid pollfd, count 1.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        // Clear the eventfd; EAGAIN (nothing signalled) is fine.
        let _ = vq.call.read();
        Ok(())
    }

    /// Waits until at least one new used entry appears on queue `q` or the
    /// deadline passes; returns the new entries (empty on time-out).
    pub fn wait_used(&mut self, q: usize, deadline: Instant) -> Result<Vec<UsedElem>> {
        loop {
            let got = self.poll_used(q)?;
            let now = Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            self.wait_call(q, deadline - now)?;
        }
    }

    /// Waits for head `head` to come back on queue `q`; returns its used
    /// length, or None if it did not come back before the deadline.
    pub fn wait_head(&mut self, q: usize, head: u16, deadline: Instant) -> Result<Option<u32>> {
        loop {
            self.poll_used(q)?;
            if let Some(len) = self.vq_mut(q)?.completed.remove(&u32::from(head)) {
                return Ok(Some(len));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.wait_call(q, deadline - now)?;
        }
    }

    /// The device's avail_event (`used->ring[size]`, EVENT_IDX only): the
    /// avail index at which it wants the next kick, i.e. how far it has
    /// consumed the avail ring when it last re-armed notifications.
    pub fn avail_event(&self, q: usize) -> Result<u16> {
        let vq = self.vq(q)?;
        self.mem.load_u16(vq.used + 4 + 8 * u64::from(vq.size))
    }

    /// Waits until `head` comes back (returns its length) or, with
    /// EVENT_IDX, until the device has consumed every published entry of
    /// the avail ring (returns None). Used before reusing the descriptor
    /// slots of a chain the device may drop without returning it.
    pub fn wait_head_or_consumed(
        &mut self,
        q: usize,
        head: u16,
        deadline: Instant,
    ) -> Result<Option<u32>> {
        let event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX);
        loop {
            self.poll_used(q)?;
            if let Some(len) = self.vq_mut(q)?.completed.remove(&u32::from(head)) {
                return Ok(Some(len));
            }
            if event_idx && self.avail_event(q)? == self.vq(q)?.next_avail {
                return Ok(None);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.wait_call(q, deadline - now)?;
        }
    }

    /// Whether `head` came back (without waiting); consumes the entry.
    pub fn take_used(&mut self, q: usize, head: u16) -> Result<Option<u32>> {
        self.poll_used(q)?;
        Ok(self.vq_mut(q)?.completed.remove(&u32::from(head)))
    }

    /// Used entries seen on queue `q` whose id is not a head we are
    /// waiting for (e.g. out-of-range ids a broken device returned).
    pub fn unclaimed_used(&self, q: usize) -> Result<Vec<UsedElem>> {
        Ok(self
            .vq(q)?
            .completed
            .iter()
            .map(|(&id, &len)| UsedElem { id, len })
            .collect())
    }

    // ---- block requests -------------------------------------------------

    /// Submits a well-formed request on queue `q`: header, then `out` as
    /// one driver-readable buffer (if non-empty), then an `in_len`-byte
    /// device-writable buffer preset to BUFFER_SENTINEL (if non-zero), then
    /// a 1-byte status preset to STATUS_SENTINEL.
    pub fn submit_request(
        &mut self,
        q: usize,
        type_: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> Result<Request> {
        let hdr = self.place_header(type_, sector)?;
        let mut descs = vec![Desc::r(hdr, OUTHDR_SIZE)];
        let mut data = None;
        let mut data_len = 0;
        if !out.is_empty() {
            let gpa = self.place_data(out)?;
            descs.push(Desc::r(gpa, u32::try_from(out.len())?));
            data = Some(gpa);
            data_len = out.len() as u64;
        }
        if in_len > 0 {
            let gpa = self.place_buffer(u64::from(in_len), BUFFER_SENTINEL)?;
            descs.push(Desc::w(gpa, in_len));
            data = Some(gpa);
            data_len = u64::from(in_len);
        }
        let status = self.place_status()?;
        descs.push(Desc::w(status, 1));
        let head = self.submit_chain(q, &descs)?;
        Ok(Request {
            queue: q,
            head,
            status_gpa: Some(status),
            data_gpa: data,
            data_len,
        })
    }

    /// Submits a read of `len` bytes at `sector`.
    pub fn submit_read(&mut self, q: usize, sector: u64, len: u32) -> Result<Request> {
        self.submit_request(q, VIRTIO_BLK_T_IN, sector, &[], len)
    }

    /// Submits a write of `data` at `sector`.
    pub fn submit_write(&mut self, q: usize, sector: u64, data: &[u8]) -> Result<Request> {
        self.submit_request(q, VIRTIO_BLK_T_OUT, sector, data, 0)
    }

    /// Waits up to `timeout` for `req` and reports what became of it.
    pub fn outcome(&mut self, req: &Request, timeout: Duration) -> Result<Outcome> {
        let deadline = Instant::now() + timeout;
        match self.wait_head(req.queue, req.head, deadline)? {
            Some(len) => {
                let status = match req.status_gpa {
                    Some(gpa) => Some(self.mem.read_u8(gpa)?),
                    None => None,
                };
                Ok(Outcome::Used { len, status })
            }
            None => Ok(Outcome::NotUsed),
        }
    }

    /// The request's data buffer as it is now.
    pub fn data(&self, req: &Request) -> Result<Vec<u8>> {
        let gpa = req.data_gpa.context("request has no data buffer")?;
        self.mem.read(gpa, req.data_len)
    }

    /// Waits for `req` and fails unless it completed with VIRTIO_BLK_S_OK.
    pub fn expect_ok(&mut self, req: &Request) -> Result<()> {
        let o = self.outcome(req, DEFAULT_TIMEOUT)?;
        if o.status() != Some(VIRTIO_BLK_S_OK as u8) {
            bail!("request (head {}) expected OK, got: {o}", req.head);
        }
        Ok(())
    }

    /// Reads `len` bytes at `sector` on queue 0 and expects success.
    pub fn read(&mut self, sector: u64, len: u32) -> Result<Vec<u8>> {
        let req = self.submit_read(0, sector, len)?;
        self.expect_ok(&req)
            .with_context(|| format!("read {len} bytes at sector {sector}"))?;
        self.data(&req)
    }

    /// Writes `data` at `sector` on queue 0 and expects success.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<()> {
        let req = self.submit_write(0, sector, data)?;
        self.expect_ok(&req)
            .with_context(|| format!("write {} bytes at sector {sector}", data.len()))
    }

    /// Flushes on queue 0 and expects success.
    pub fn flush(&mut self) -> Result<()> {
        let req = self.submit_request(0, VIRTIO_BLK_T_FLUSH, 0, &[], 0)?;
        self.expect_ok(&req).context("flush")
    }

    /// Sends GET_ID with a `len`-byte buffer on queue 0; returns the
    /// outcome and the buffer afterwards.
    pub fn get_id(&mut self, len: u32) -> Result<(Outcome, Vec<u8>)> {
        let req = self.submit_request(0, VIRTIO_BLK_T_GET_ID, 0, &[], len)?;
        let o = self.outcome(&req, DEFAULT_TIMEOUT)?;
        Ok((o, self.data(&req)?))
    }
}
