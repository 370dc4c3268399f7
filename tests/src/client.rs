//! A small, safe-to-use vhost-user-blk frontend built on libblkio (crate
//! `blkio` 0.5, driver `virtio-blk-vhost-user`): the client every frontend
//! test and the benchmark drive vubd and qemu-storage-daemon with.
//!
//! Why a wrapper at all:
//! - libblkio never notices a backend that died or hangs: requests simply
//!   never complete. Every wait here has a deadline and turns into
//!   [`ClientError::Timeout`]; after a time-out the queue is marked broken,
//!   because the device may still write into its buffers later.
//! - The vhost-user driver can only use memory it has shared with the backend
//!   (`alloc_mem_region` + `map_mem_region`); [`Buffer`] owns such a region
//!   and unmaps it when the last user (including in-flight requests) is gone.
//! - A [`Queue`] must not outlive the connection (its rings live in memory
//!   owned by the driver), so every queue keeps the connection alive.
//! - blkio reports per-request errors as a negative errno in the completion;
//!   they surface here as [`ClientError::Request`].
//!
//! Two ways to do I/O on a queue: synchronous helpers (`read`, `write`,
//! `flush`, `discard`, `write_zeroes`; each copies through a per-queue bounce
//! buffer and waits with the time-out), and an asynchronous interface
//! (`submit_*` with a caller-chosen `user_data`, then [`Queue::wait`]) for
//! queue-depth-N loads.

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

/// The libblkio driver name for vhost-user-blk.
pub const DRIVER: &str = "virtio-blk-vhost-user";

/// Default deadline for connecting, mapping memory and each request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A libblkio call (connect, property, start, memory mapping) failed.
    #[error("{op}: {message} (errno {errno})")]
    Blkio {
        /// What we were doing.
        op: String,
        /// libblkio's message.
        message: String,
        /// The errno libblkio reported.
        errno: i32,
    },
    /// A request completed with an error (blkio's negative errno).
    #[error("{what} failed: {}", errno_name(*.errno))]
    Request {
        /// Which request, e.g. "write 4096@0".
        what: String,
        /// Positive errno (EIO for VIRTIO_BLK_S_IOERR, ENOTSUP for UNSUPP,
        /// EBADF for a write on a read-only connection, EINVAL for bad args).
        errno: i32,
    },
    /// Nothing happened within the deadline: the backend is dead or stuck.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long we waited.
        after: Duration,
    },
    /// A queue that timed out before is not usable any more.
    #[error("queue {0} is unusable after an earlier time-out")]
    Broken(usize),
    /// The caller asked for something impossible (bad range, busy queue...).
    #[error("invalid use: {0}")]
    Invalid(String),
}

impl ClientError {
    /// The positive errno of a failed request, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ClientError::Request { errno, .. } | ClientError::Blkio { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// True for a time-out (the backend never answered).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout { .. } | ClientError::Broken(_))
    }

    fn blkio(op: impl Into<String>, e: blkio::Error) -> Self {
        ClientError::Blkio {
            op: op.into(),
            message: e.message().to_string(),
            errno: e.errno().raw_os_error(),
        }
    }
}

fn errno_name(errno: i32) -> String {
    format!(
        "{} (errno {errno})",
        std::io::Error::from_raw_os_error(errno)
    )
}

/// Result type of the client.
pub type Result<T> = std::result::Result<T, ClientError>;

/// Connection parameters beyond socket, queues and read-only.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Number of virtqueues to use (at most what the device offers).
    pub num_queues: usize,
    /// Open the device read-only (required for a device with VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Virtqueue size (power of two); `None` keeps libblkio's default (256).
    pub queue_size: Option<u32>,
    /// Deadline for connecting, mapping memory and every request.
    pub timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            num_queues: 1,
            read_only: false,
            queue_size: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// What the device reported at connect time (libblkio properties).
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// Disk size in bytes.
    pub capacity: u64,
    /// Smallest I/O unit (the device's logical block size).
    pub request_alignment: u64,
    /// Largest request in bytes (size_max * seg_max); 0 = no limit stated.
    pub max_transfer: u64,
    /// Largest single segment (size_max); 0 = no limit stated.
    pub max_segment_len: u64,
    /// Most data segments per request (seg_max).
    pub max_segments: u64,
    /// Largest discard in bytes (0 = discard not offered).
    pub max_discard_len: u64,
    /// Largest write-zeroes in bytes (0 = write zeroes not offered).
    pub max_write_zeroes_len: u64,
    /// Discard alignment in bytes.
    pub discard_alignment: u64,
    /// Optimal I/O alignment (physical block size).
    pub optimal_io_alignment: u64,
    /// Optimal I/O size (0 = not stated).
    pub optimal_io_size: u64,
    /// Queues the device offers.
    pub max_queues: usize,
    /// Queues this connection uses.
    pub num_queues: usize,
    /// Virtqueue size in use.
    pub queue_size: u32,
    /// Memory slots the backend accepts.
    pub max_mem_regions: u64,
    /// The device has a volatile write cache (flush needed for durability).
    pub flush_needed: bool,
    /// The connection is read-only.
    pub read_only: bool,
}

/// The connection state shared by the client, its queues and its buffers.
struct Shared {
    blkio: Mutex<Blkio>,
    timeout: Duration,
}

impl Shared {
    /// Locks the connection, giving up at the deadline (a thread stuck in a
    /// vhost-user message to a hung backend holds the lock forever).
    fn lock(&self, what: &str) -> Result<MutexGuard<'_, Blkio>> {
        let start = Instant::now();
        loop {
            match self.blkio.try_lock() {
                Ok(guard) => return Ok(guard),
                // A panic elsewhere does not make the connection state invalid.
                Err(TryLockError::Poisoned(p)) => return Ok(p.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
            if start.elapsed() > self.timeout {
                return Err(ClientError::Timeout {
                    what: format!("the connection lock ({what})"),
                    after: self.timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Runs `f` on a helper thread and waits for it up to `timeout`. On time-out
/// the thread is left behind (blocked on a backend that does not answer); it
/// ends when the backend's socket closes.
fn with_deadline<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("blkio-call".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| ClientError::Invalid(format!("cannot spawn a thread: {e}")))?;
    match rx.recv_timeout(timeout) {
        Ok(v) => Ok(v),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(ClientError::Timeout {
            what: what.to_string(),
            after: timeout,
        }),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(ClientError::Invalid(format!(
            "{what}: helper thread panicked"
        ))),
    }
}

/// A connected vhost-user-blk frontend.
pub struct Client {
    // Queues first: they must be dropped before the connection.
    queues: Vec<Option<Queue>>,
    info: DeviceInfo,
    shared: Arc<Shared>,
}

impl Client {
    /// Connects to the vhost-user-blk socket with `num_queues` queues.
    pub fn connect(socket: &Path, num_queues: usize, read_only: bool) -> Result<Client> {
        Self::connect_with(
            socket,
            &ConnectOptions {
                num_queues,
                read_only,
                ..ConnectOptions::default()
            },
        )
    }

    /// Connects with explicit options.
    pub fn connect_with(socket: &Path, opts: &ConnectOptions) -> Result<Client> {
        let path = socket
            .to_str()
            .ok_or_else(|| ClientError::Invalid(format!("non-UTF-8 path {}", socket.display())))?
            .to_string();
        if opts.num_queues == 0 {
            return Err(ClientError::Invalid("num_queues must be at least 1".into()));
        }
        let o = opts.clone();
        let what = format!("connect to {path}");
        let (blkio, queues, info) =
            with_deadline(&what, opts.timeout, move || start_device(&path, &o))??;
        let shared = Arc::new(Shared {
            blkio: Mutex::new(blkio),
            timeout: opts.timeout,
        });
        let queues = queues
            .into_iter()
            .enumerate()
            .map(|(index, q)| Some(Queue::new(index, q, &info, Arc::clone(&shared))))
            .collect();
        log::debug!("connected to {}: {info:?}", socket.display());
        Ok(Client {
            queues,
            info,
            shared,
        })
    }

    /// Device properties read at connect time.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.info.capacity
    }

    /// Re-reads the capacity from the device's config space (e.g. after a resize).
    pub fn read_capacity(&self) -> Result<u64> {
        let shared = Arc::clone(&self.shared);
        with_deadline("read capacity", self.shared.timeout, move || {
            let blkio = shared.lock("capacity")?;
            blkio
                .get_u64("capacity")
                .map_err(|e| ClientError::blkio("get capacity", e))
        })?
    }

    /// Number of queues of this connection.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Borrows queue `index` (it must not have been taken).
    pub fn queue(&mut self, index: usize) -> Result<&mut Queue> {
        self.queues
            .get_mut(index)
            .and_then(Option::as_mut)
            .ok_or_else(|| ClientError::Invalid(format!("queue {index} missing or taken")))
    }

    /// Takes queue `index` out of the client, e.g. to move it to a thread.
    /// The queue keeps the connection open until it is dropped too.
    pub fn take_queue(&mut self, index: usize) -> Result<Queue> {
        self.queues
            .get_mut(index)
            .and_then(Option::take)
            .ok_or_else(|| ClientError::Invalid(format!("queue {index} missing or taken")))
    }

    /// Takes all remaining queues, in index order.
    pub fn take_queues(&mut self) -> Vec<Queue> {
        self.queues.iter_mut().filter_map(Option::take).collect()
    }

    /// Allocates `len` bytes (rounded up to the page size) of memory shared
    /// with the backend.
    pub fn alloc_buffer(&self, len: usize) -> Result<Buffer> {
        Buffer::alloc(&self.shared, len)
    }

    /// Reads `len` bytes at `offset` on queue 0.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.queue(0)?.read(offset, len)
    }

    /// Writes `data` at `offset` on queue 0.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.queue(0)?.write(offset, data)
    }

    /// Flushes the device's write cache (queue 0).
    pub fn flush(&mut self) -> Result<()> {
        self.queue(0)?.flush()
    }

    /// Discards `len` bytes at `offset` (queue 0).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.queue(0)?.discard(offset, len)
    }

    /// Writes zeroes over `len` bytes at `offset`; `unmap` allows the device
    /// to deallocate (queue 0).
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.queue(0)?.write_zeroes(offset, len, unmap)
    }
}

/// Creates, connects, configures and starts the libblkio instance; runs on
/// a helper thread under a deadline.
fn start_device(path: &str, o: &ConnectOptions) -> Result<(Blkio, Vec<Blkioq>, DeviceInfo)> {
    let err = |op: &str| {
        let op = op.to_string();
        move |e| ClientError::blkio(op, e)
    };
    let mut b = Blkio::new(DRIVER).map_err(err("blkio_new"))?;
    b.set_str("path", path).map_err(err("set path"))?;
    b.set_bool("read-only", o.read_only)
        .map_err(err("set read-only"))?;
    b.connect().map_err(err(&format!("connect to {path}")))?;
    let max_queues = b.get_i32("max-queues").map_err(err("get max-queues"))?;
    if o.num_queues > max_queues.max(0) as usize {
        return Err(ClientError::Invalid(format!(
            "{} queues asked, the device offers {max_queues}",
            o.num_queues
        )));
    }
    let num_queues =
        i32::try_from(o.num_queues).map_err(|_| ClientError::Invalid("too many queues".into()))?;
    b.set_i32("num-queues", num_queues)
        .map_err(err("set num-queues"))?;
    if let Some(size) = o.queue_size {
        let size =
            i32::try_from(size).map_err(|_| ClientError::Invalid(format!("queue size {size}")))?;
        b.set_i32("queue-size", size)
            .map_err(err("set queue-size"))?;
    }
    let i = |b: &Blkio, name: &str| -> Result<u64> {
        let v = b.get_i32(name).map_err(err(&format!("get {name}")))?;
        Ok(v.max(0) as u64)
    };
    let u = |b: &Blkio, name: &str| -> Result<u64> {
        b.get_u64(name).map_err(err(&format!("get {name}")))
    };
    let info = DeviceInfo {
        capacity: u(&b, "capacity")?,
        request_alignment: i(&b, "request-alignment")?,
        max_transfer: i(&b, "max-transfer")?,
        max_segment_len: i(&b, "max-segment-len")?,
        max_segments: i(&b, "max-segments")?,
        max_discard_len: u(&b, "max-discard-len")?,
        max_write_zeroes_len: u(&b, "max-write-zeroes-len")?,
        discard_alignment: i(&b, "discard-alignment")?,
        optimal_io_alignment: i(&b, "optimal-io-alignment")?,
        optimal_io_size: i(&b, "optimal-io-size")?,
        max_queues: max_queues.max(0) as usize,
        num_queues: o.num_queues,
        queue_size: i(&b, "queue-size")? as u32,
        max_mem_regions: u(&b, "max-mem-regions")?,
        flush_needed: b
            .get_bool("flush-needed")
            .map_err(err("get flush-needed"))?,
        read_only: o.read_only,
    };
    let outcome = b.start().map_err(err("start"))?;
    Ok((b, outcome.queues, info))
}

/// Memory shared with the backend: a memfd region mapped into the device's
/// address space. Requests read from and write into it directly.
pub struct Buffer {
    region: Arc<Region>,
}

/// The mapped region behind a [`Buffer`]; unmapped and freed when the last
/// reference (the buffer or an in-flight request) goes.
struct Region {
    mem: MemoryRegion,
    shared: Arc<Shared>,
}

impl Drop for Region {
    fn drop(&mut self) {
        // Unmapping sends REM_MEM_REGION and waits for the ack; a hung
        // backend must not hang the caller, so do it under a deadline.
        let shared = Arc::clone(&self.shared);
        let mem = self.mem;
        let timeout = self.shared.timeout;
        let done = with_deadline("unmap buffer", timeout, move || {
            if let Ok(mut b) = shared.lock("unmap") {
                b.unmap_mem_region(&mem);
                b.free_mem_region(&mem);
            }
        });
        if let Err(e) = done {
            log::warn!("leaking a buffer: {e}");
        }
    }
}

impl Buffer {
    fn alloc(shared: &Arc<Shared>, len: usize) -> Result<Buffer> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = len.max(1).div_ceil(page) * page;
        let s = Arc::clone(shared);
        let mem = with_deadline("map buffer", shared.timeout, move || {
            let mut b = s.lock("map")?;
            let mem = b
                .alloc_mem_region(len)
                .map_err(|e| ClientError::blkio(format!("alloc_mem_region({len})"), e))?;
            if let Err(e) = b.map_mem_region(&mem) {
                b.free_mem_region(&mem);
                return Err(ClientError::blkio(format!("map_mem_region({len})"), e));
            }
            Ok(mem)
        })??;
        Ok(Buffer {
            region: Arc::new(Region {
                mem,
                shared: Arc::clone(shared),
            }),
        })
    }

    /// Size in bytes (a multiple of the page size).
    pub fn len(&self) -> usize {
        self.region.mem.len
    }

    /// Always false: buffers have at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The contents. Do not rely on them while a request using the buffer is
    /// in flight: the backend writes into this memory concurrently.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the region is a live shared mapping of `len` bytes that
        // stays mapped as long as `self.region` exists.
        unsafe { std::slice::from_raw_parts(self.region.mem.addr as *const u8, self.len()) }
    }

    /// The contents, writable. Same caveat as [`Buffer::as_slice`].
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above; `&mut self` is the only handle that hands out
        // references (in-flight requests only hold the Arc to keep it mapped).
        unsafe { std::slice::from_raw_parts_mut(self.region.mem.addr as *mut u8, self.len()) }
    }

    fn ptr(&self, range: &Range<usize>) -> Result<*mut u8> {
        if range.start > range.end || range.end > self.len() {
            return Err(ClientError::Invalid(format!(
                "range {range:?} outside a buffer of {} bytes",
                self.len()
            )));
        }
        Ok((self.region.mem.addr + range.start) as *mut u8)
    }
}

/// One finished request.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    /// The `user_data` given at submission.
    pub user_data: u64,
    /// 0, or a negative errno.
    pub ret: i32,
}

impl Done {
    /// Ok, or the request's error described with `what`.
    pub fn result(&self, what: impl FnOnce() -> String) -> Result<()> {
        if self.ret == 0 {
            Ok(())
        } else {
            Err(ClientError::Request {
                what: what(),
                errno: -self.ret,
            })
        }
    }
}

/// The iovec array of a request split into segments; libblkio keeps the raw
/// pointer while a request waits in its backlog, so it lives in the slot.
struct Iovecs {
    _keep: Box<[libc::iovec]>,
}

// SAFETY: the pointers refer to the buffer region held by the same slot;
// the array is only read by libblkio on the thread that owns the queue.
unsafe impl Send for Iovecs {}

/// Book-keeping of one in-flight request.
struct Slot {
    user_data: u64,
    _region: Option<Arc<Region>>,
    _iov: Option<Iovecs>,
}

/// The data direction of a buffer request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dir {
    Read,
    Write,
}

/// One virtqueue of a connection, usable from one thread at a time.
pub struct Queue {
    // Declared first: dropped before the connection it points into.
    q: Blkioq,
    index: usize,
    timeout: Duration,
    max_segment_len: usize,
    max_descriptors: usize,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
    broken: bool,
    completions: Vec<MaybeUninit<blkio::Completion>>,
    bounce: Option<Buffer>,
    shared: Arc<Shared>,
}

impl Queue {
    fn new(index: usize, q: Blkioq, info: &DeviceInfo, shared: Arc<Shared>) -> Queue {
        // Every request also needs a header and a status descriptor.
        let max_descriptors = (info.queue_size as usize).saturating_sub(2).max(1);
        Queue {
            q,
            index,
            timeout: shared.timeout,
            max_segment_len: info.max_segment_len as usize,
            max_descriptors,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            broken: false,
            completions: Vec::new(),
            bounce: None,
            shared,
        }
    }

    /// This queue's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Requests submitted and not yet returned by [`Queue::wait`].
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Changes the deadline of waits on this queue.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Allocates memory shared with the backend (see [`Client::alloc_buffer`]).
    pub fn alloc_buffer(&self, len: usize) -> Result<Buffer> {
        Buffer::alloc(&self.shared, len)
    }

    fn check_usable(&self) -> Result<()> {
        if self.broken {
            Err(ClientError::Broken(self.index))
        } else {
            Ok(())
        }
    }

    fn add_slot(&mut self, slot: Slot) -> usize {
        self.in_flight += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        }
    }

    fn submit_buf(
        &mut self,
        dir: Dir,
        offset: u64,
        buf: &Buffer,
        range: Range<usize>,
        user_data: u64,
        flags: ReqFlags,
    ) -> Result<()> {
        self.check_usable()?;
        let ptr = buf.ptr(&range)?;
        let len = range.len();
        let seg = self.max_segment_len;
        if seg == 0 || len <= seg {
            // One segment: no iovec array to keep.
            let id = self.add_slot(Slot {
                user_data,
                _region: Some(Arc::clone(&buf.region)),
                _iov: None,
            });
            match dir {
                Dir::Read => self.q.read(offset, ptr, len, id, flags),
                Dir::Write => self.q.write(offset, ptr, len, id, flags),
            }
            return Ok(());
        }
        // Split into segments of at most size_max bytes (the device's limit
        // per descriptor); libblkio puts one descriptor per iovec.
        let iov: Box<[libc::iovec]> = (0..len)
            .step_by(seg)
            .map(|start| libc::iovec {
                // SAFETY: start < len and ptr..ptr+len lies in the buffer.
                iov_base: unsafe { ptr.add(start) }.cast(),
                iov_len: seg.min(len - start),
            })
            .collect();
        if iov.len() > self.max_descriptors {
            return Err(ClientError::Invalid(format!(
                "{len} bytes need {} segments, the queue holds {}",
                iov.len(),
                self.max_descriptors
            )));
        }
        let iov_ptr = iov.as_ptr();
        let iovcnt = iov.len() as u32;
        let id = self.add_slot(Slot {
            user_data,
            _region: Some(Arc::clone(&buf.region)),
            _iov: Some(Iovecs { _keep: iov }),
        });
        match dir {
            Dir::Read => self.q.readv(offset, iov_ptr, iovcnt, id, flags),
            Dir::Write => self.q.writev(offset, iov_ptr, iovcnt, id, flags),
        }
        Ok(())
    }

    /// Submits a read of `buf[range]` from disk offset `offset`. The request
    /// keeps the buffer mapped until it completes.
    pub fn submit_read(
        &mut self,
        offset: u64,
        buf: &Buffer,
        range: Range<usize>,
        user_data: u64,
    ) -> Result<()> {
        self.submit_buf(Dir::Read, offset, buf, range, user_data, ReqFlags::empty())
    }

    /// Submits a write of `buf[range]` to disk offset `offset`.
    pub fn submit_write(
        &mut self,
        offset: u64,
        buf: &Buffer,
        range: Range<usize>,
        user_data: u64,
    ) -> Result<()> {
        self.submit_buf(Dir::Write, offset, buf, range, user_data, ReqFlags::empty())
    }

    /// Submits a write with FUA (libblkio emulates it with a flush afterwards).
    pub fn submit_write_fua(
        &mut self,
        offset: u64,
        buf: &Buffer,
        range: Range<usize>,
        user_data: u64,
    ) -> Result<()> {
        self.submit_buf(Dir::Write, offset, buf, range, user_data, ReqFlags::FUA)
    }

    /// Submits a flush.
    pub fn submit_flush(&mut self, user_data: u64) -> Result<()> {
        self.check_usable()?;
        let id = self.add_slot(Slot {
            user_data,
            _region: None,
            _iov: None,
        });
        self.q.flush(id, ReqFlags::empty());
        Ok(())
    }

    /// Submits a discard of `len` bytes at `offset`.
    pub fn submit_discard(&mut self, offset: u64, len: u64, user_data: u64) -> Result<()> {
        self.check_usable()?;
        let id = self.add_slot(Slot {
            user_data,
            _region: None,
            _iov: None,
        });
        self.q.discard(offset, len, id, ReqFlags::empty());
        Ok(())
    }

    /// Submits a write-zeroes of `len` bytes at `offset`; `unmap` sets
    /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP (libblkio: no NO_UNMAP flag).
    pub fn submit_write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        unmap: bool,
        user_data: u64,
    ) -> Result<()> {
        self.check_usable()?;
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        let id = self.add_slot(Slot {
            user_data,
            _region: None,
            _iov: None,
        });
        self.q.write_zeroes(offset, len, id, flags);
        Ok(())
    }

    /// Waits until at least `min` requests completed (0 = only collect what
    /// is ready), appends them to `out` and returns how many. Fails with
    /// [`ClientError::Timeout`] if the deadline passes first; the queue is
    /// then unusable.
    pub fn wait(&mut self, min: usize, out: &mut Vec<Done>) -> Result<usize> {
        self.check_usable()?;
        if min > self.in_flight {
            return Err(ClientError::Invalid(format!(
                "waiting for {min} completions with {} in flight",
                self.in_flight
            )));
        }
        if self.in_flight == 0 {
            return Ok(0);
        }
        let want = self.in_flight;
        if self.completions.len() < want {
            self.completions.resize_with(want, MaybeUninit::uninit);
        }
        let mut remaining = self.timeout;
        let n = match self.q.do_io(
            &mut self.completions[..want],
            min,
            Some(&mut remaining),
            None,
        ) {
            Ok(n) => n,
            Err(e) if e.errno() == blkio::Errno::TIME => {
                self.broken = true;
                return Err(ClientError::Timeout {
                    what: format!(
                        "{min} of {} requests on queue {}",
                        self.in_flight, self.index
                    ),
                    after: self.timeout,
                });
            }
            Err(e) => {
                self.broken = true;
                return Err(ClientError::blkio(
                    format!("do_io on queue {}", self.index),
                    e,
                ));
            }
        };
        for c in &self.completions[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_ref() };
            let slot = self
                .slots
                .get_mut(c.user_data)
                .and_then(Option::take)
                .ok_or_else(|| {
                    ClientError::Invalid(format!("completion for unknown request {}", c.user_data))
                })?;
            self.free.push(c.user_data);
            self.in_flight -= 1;
            out.push(Done {
                user_data: slot.user_data,
                ret: c.ret,
            });
        }
        Ok(n)
    }

    /// Waits for the single request in flight and checks its result.
    fn wait_one(&mut self, what: impl FnOnce() -> String) -> Result<()> {
        let mut out = Vec::with_capacity(1);
        match self.wait(1, &mut out) {
            Ok(_) => {}
            Err(ClientError::Timeout { after, .. }) => {
                return Err(ClientError::Timeout {
                    what: what(),
                    after,
                })
            }
            Err(e) => return Err(e),
        }
        match out.first() {
            Some(done) => done.result(what),
            None => Err(ClientError::Invalid("no completion returned".into())),
        }
    }

    fn check_idle(&self) -> Result<()> {
        self.check_usable()?;
        if self.in_flight != 0 {
            return Err(ClientError::Invalid(format!(
                "synchronous request on queue {} with {} asynchronous ones in flight",
                self.index, self.in_flight
            )));
        }
        Ok(())
    }

    /// Takes the bounce buffer, (re)allocating it if smaller than `len`.
    fn take_bounce(&mut self, len: usize) -> Result<Buffer> {
        match self.bounce.take() {
            Some(b) if b.len() >= len => Ok(b),
            _ => Buffer::alloc(&self.shared, len.max(1 << 20)),
        }
    }

    /// Reads `len` bytes at `offset`.
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut data = vec![0u8; len];
        self.read_into(offset, &mut data)?;
        Ok(data)
    }

    /// Reads `data.len()` bytes at `offset` into `data`.
    pub fn read_into(&mut self, offset: u64, data: &mut [u8]) -> Result<()> {
        self.check_idle()?;
        let bounce = self.take_bounce(data.len())?;
        let r = self
            .submit_read(offset, &bounce, 0..data.len(), 0)
            .and_then(|_| self.wait_one(|| format!("read {}@{offset}", data.len())));
        if r.is_ok() {
            data.copy_from_slice(&bounce.as_slice()[..data.len()]);
        }
        self.bounce = Some(bounce);
        r
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_flags(offset, data, false)
    }

    /// Writes `data` at `offset` with FUA.
    pub fn write_fua(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.write_flags(offset, data, true)
    }

    fn write_flags(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_idle()?;
        let mut bounce = self.take_bounce(data.len())?;
        bounce.as_mut_slice()[..data.len()].copy_from_slice(data);
        let flags = if fua {
            ReqFlags::FUA
        } else {
            ReqFlags::empty()
        };
        let r = self
            .submit_buf(Dir::Write, offset, &bounce, 0..data.len(), 0, flags)
            .and_then(|_| self.wait_one(|| format!("write {}@{offset}", data.len())));
        self.bounce = Some(bounce);
        r
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self) -> Result<()> {
        self.check_idle()?;
        self.submit_flush(0)?;
        self.wait_one(|| "flush".to_string())
    }

    /// Discards `len` bytes at `offset`.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_idle()?;
        self.submit_discard(offset, len, 0)?;
        self.wait_one(|| format!("discard {len}@{offset}"))
    }

    /// Writes zeroes over `len` bytes at `offset` (`unmap`: may deallocate).
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_idle()?;
        self.submit_write_zeroes(offset, len, unmap, 0)?;
        self.wait_one(|| format!("write-zeroes {len}@{offset} unmap={unmap}"))
    }
}
