//! The transmission phase: callers on any thread submit requests on one
//! connection and wait for their own reply, so that many requests are in
//! flight at once; one reader thread per client reads the replies and
//! hands each to its waiter by handle.
//!
//! In-flight data is bounded ([`MAX_INFLIGHT_BYTES`], [`MAX_REQUESTS`]):
//! a caller waits for room before its request goes out, and the reply
//! buffers are allocated per request, so a server cannot make the client
//! allocate beyond that.
//!
//! Reconnection follows QEMU: with a `reconnect-delay` of 0 a broken
//! connection fails the requests on it and every later one. Otherwise the
//! reader thread reconnects; the requests that were in flight are sent
//! again on the new connection, new ones wait for it, and when the link
//! has been down for the delay all of them fail with EIO, and new ones fail
//! at once until it is back. A reply that breaks the protocol fails the
//! requests in flight (they are not resent to a server that garbles them).
//!
//! A server that stops answering with the connection up (a hung or
//! stopped process, a storage stall behind it) would otherwise hold every
//! request, and a guest write waiting for one in a write-blocking mirror,
//! for ever: with a `request_timeout`, a connection on which requests wait
//! and nothing has moved either way for that long counts as broken, and
//! the rules above take over (resend after reconnecting, or fail at
//! `reconnect-delay`). Progress, not a request's age, is what counts, so a
//! slow link that keeps delivering replies is never cut.

use super::handshake::{negotiate, ExportInfo};
use super::{ClientError, ServerAddress, Stream};
use crate::nbd::proto::*;
use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most payload bytes in flight on one connection.
pub const MAX_INFLIGHT_BYTES: u64 = 64 << 20;
/// Most requests in flight on one connection.
pub const MAX_REQUESTS: usize = 256;
/// Longest BLOCK_STATUS or ERROR chunk payload accepted.
const MAX_META_CHUNK: u32 = 64 << 10;
/// Longest wait between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long the handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How to connect.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The server.
    pub addr: ServerAddress,
    /// The export name.
    pub export: String,
    /// How long requests wait for a lost connection to come back.
    pub reconnect_delay: Duration,
    /// How long requests may wait with nothing received or sent before the
    /// connection counts as broken (`None`: for ever, as QEMU 7.2).
    pub request_timeout: Option<Duration>,
}

/// What a request ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Done (no data).
    Done,
    /// The data a READ read.
    Data(Vec<u8>),
    /// The first extent of a BLOCK_STATUS: (length, flags).
    Status(u32, u32),
}

/// The waiter's side of one request.
#[derive(Default)]
struct Slot {
    result: Mutex<Option<Result<Reply, u32>>>,
    cond: Condvar,
}

impl Slot {
    fn set(&self, r: Result<Reply, u32>) {
        *lock(&self.result) = Some(r);
        self.cond.notify_all();
    }
}

/// A request waiting for its reply.
struct Pending {
    req: Request,
    /// A WRITE's data, kept to resend it after a reconnect.
    payload: Option<Arc<Vec<u8>>>,
    /// A READ's data as the chunks fill it.
    data: Vec<u8>,
    status: Option<(u32, u32)>,
    error: Option<u32>,
    cost: u64,
    slot: Arc<Slot>,
}

impl Pending {
    fn reset(&mut self) {
        self.data.iter_mut().for_each(|b| *b = 0);
        self.status = None;
        self.error = None;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    /// Down since then; requests wait for it until the delay has passed.
    Down(Instant),
    /// Down for longer than the delay: requests fail at once.
    Expired,
    /// For good (no reconnection, or the client is closed).
    Quit,
}

struct State {
    link: Link,
    next_handle: u64,
    pending: HashMap<u64, Pending>,
    inflight: u64,
}

struct Shared {
    opts: ClientOptions,
    info: ExportInfo,
    state: Mutex<State>,
    /// Signalled when room frees up or the link changes.
    cond: Condvar,
    /// The writing half of the current connection (`None` while down).
    writer: Mutex<Option<Stream>>,
    closing: std::sync::atomic::AtomicBool,
    wire_bytes: AtomicU64,
    /// Milliseconds after `born` of the last byte received or sent.
    progress_ms: AtomicU64,
    born: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Connects and negotiates, with a time-out on the handshake (the request
/// time-out if shorter: a server that hangs in transmission likely hangs
/// in the handshake of the reconnection too).
fn open(opts: &ClientOptions) -> Result<(Stream, ExportInfo), ClientError> {
    let mut s = Stream::connect(&opts.addr)?;
    let limit = opts
        .request_timeout
        .map_or(HANDSHAKE_TIMEOUT, |t| t.min(HANDSHAKE_TIMEOUT));
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    let info = negotiate(&mut s, &opts.export)?;
    s.set_read_timeout(watchdog_tick(opts))?;
    s.set_write_timeout(None)?;
    Ok((s, info))
}

/// How often the reader wakes to check for progress (`None`: no time-out,
/// it blocks).
fn watchdog_tick(opts: &ClientOptions) -> Option<Duration> {
    opts.request_timeout
        .map(|t| (t / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)))
}

/// The reader's socket, with the request time-out: a read that waits
/// returns `TimedOut` once requests have waited with no progress for the
/// time-out, and goes on waiting otherwise (an idle connection, or one
/// that moves slowly).
struct Watchdog<'a> {
    stream: &'a mut Stream,
    shared: &'a Shared,
}

impl Read for Watchdog<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Ok(n) => {
                    self.shared.note_progress();
                    return Ok(n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if let Some(stalled) = self.shared.stalled() {
                        log::warn!(
                            "NBD client: no progress from {} for {stalled:?} with requests waiting: reconnecting",
                            self.shared.opts.addr.display()
                        );
                        return Err(io::ErrorKind::TimedOut.into());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A connection to one export, shared by every thread that does I/O on it.
pub struct Client {
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

/// How the reader's connection ended.
enum Broken {
    /// The transport failed: in-flight requests are resent.
    Transport,
    /// The server broke the protocol: in-flight requests fail.
    Protocol(String),
}

impl Client {
    /// Connects to the export (the first connection must succeed).
    pub fn connect(opts: ClientOptions) -> Result<Client, ClientError> {
        let (stream, info) = open(&opts)?;
        let reader = stream.try_clone()?;
        let shared = Arc::new(Shared {
            opts,
            info,
            state: Mutex::new(State {
                link: Link::Up,
                next_handle: 1,
                pending: HashMap::new(),
                inflight: 0,
            }),
            cond: Condvar::new(),
            writer: Mutex::new(Some(stream)),
            closing: Default::default(),
            wire_bytes: AtomicU64::new(0),
            progress_ms: AtomicU64::new(0),
            born: Instant::now(),
        });
        let s2 = shared.clone();
        let handle = std::thread::Builder::new()
            .name("nbd-client".into())
            .spawn(move || s2.run(reader))?;
        Ok(Client {
            shared,
            reader: Mutex::new(Some(handle)),
        })
    }

    /// What the server told about the export at the first connection.
    pub fn info(&self) -> &ExportInfo {
        &self.shared.info
    }

    /// Bytes sent on the wire in transmission (headers and payloads).
    pub fn wire_bytes(&self) -> u64 {
        self.shared.wire_bytes.load(Ordering::Relaxed)
    }

    /// Sends a request and waits for its reply; `Err` is an errno.
    pub fn call(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<Vec<u8>>,
    ) -> Result<Reply, u32> {
        self.submit(kind, flags, offset, len, payload)?.wait()
    }

    /// Sends a request; the reply is waited for with [`Ticket::wait`].
    pub fn submit(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<Vec<u8>>,
    ) -> Result<Ticket, u32> {
        let sh = &self.shared;
        let cost = match kind {
            CMD_READ | CMD_WRITE => u64::from(len),
            _ => 0,
        };
        let data = if kind == CMD_READ {
            vec![0u8; len as usize]
        } else {
            Vec::new()
        };
        let slot = Arc::new(Slot::default());
        let payload = payload.map(Arc::new);
        // Room first (without the writer lock, which a sender holds while
        // the socket is full), then the writer lock, then the state again.
        {
            let mut st = lock(&sh.state);
            loop {
                match st.link {
                    Link::Quit | Link::Expired => return Err(EIO),
                    Link::Down(since) if since.elapsed() >= sh.opts.reconnect_delay => {
                        return Err(EIO)
                    }
                    _ => {}
                }
                let room = st.pending.len() < MAX_REQUESTS
                    && (st.inflight + cost <= MAX_INFLIGHT_BYTES || st.pending.is_empty());
                if room {
                    st.inflight += cost;
                    break;
                }
                st = sh
                    .cond
                    .wait_timeout(st, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        let mut w = lock(&sh.writer);
        let mut st = lock(&sh.state);
        if matches!(st.link, Link::Quit | Link::Expired) {
            st.inflight -= cost;
            sh.cond.notify_all();
            return Err(EIO);
        }
        let handle = st.next_handle;
        st.next_handle += 1;
        let req = Request {
            flags,
            kind,
            handle,
            offset,
            len,
        };
        st.pending.insert(
            handle,
            Pending {
                req,
                payload: payload.clone(),
                data,
                status: None,
                error: None,
                cost,
                slot: slot.clone(),
            },
        );
        drop(st);
        // While the link is down the request stays pending: the reader
        // sends it on the next connection (or fails it at the deadline).
        if let Some(stream) = w.as_mut() {
            if sh.send(stream, &req, payload.as_deref()).is_err() {
                // The reader sees the shut-down socket and reconnects.
                stream.shutdown();
            }
        }
        Ok(Ticket { slot })
    }

    /// Ends the connection: in-flight requests fail, later ones too.
    pub fn close(&self) {
        let sh = &self.shared;
        sh.closing.store(true, Ordering::SeqCst);
        if let Some(s) = lock(&sh.writer).as_mut() {
            let disc = Request {
                flags: 0,
                kind: CMD_DISC,
                handle: 0,
                offset: 0,
                len: 0,
            };
            let _ = s.write_all(&disc.encode());
            s.shutdown();
        }
        sh.fail_all(Link::Quit);
        if let Some(h) = lock(&self.reader).take() {
            let _ = h.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

/// A submitted request.
pub struct Ticket {
    slot: Arc<Slot>,
}

impl Ticket {
    /// Waits for the reply; `Err` is an errno.
    pub fn wait(self) -> Result<Reply, u32> {
        let mut r = lock(&self.slot.result);
        loop {
            if let Some(r) = r.take() {
                return r;
            }
            r = self.slot.cond.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Shared {
    /// Writes one request (header and payload) in one go.
    fn send(&self, s: &mut Stream, req: &Request, payload: Option<&Vec<u8>>) -> io::Result<()> {
        let head = req.encode();
        let body: &[u8] = payload.map_or(&[], |p| p.as_slice());
        let mut slices = [IoSlice::new(&head), IoSlice::new(body)];
        let mut slices: &mut [IoSlice] = &mut slices;
        while !slices.is_empty() {
            let n = s.write_vectored(slices)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.wire_bytes.fetch_add(n as u64, Ordering::Relaxed);
            self.note_progress();
            IoSlice::advance_slices(&mut slices, n);
        }
        Ok(())
    }

    /// Records that bytes moved on the connection.
    fn note_progress(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.progress_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// How long requests have waited with nothing moving, if that is past
    /// the request time-out.
    fn stalled(&self) -> Option<Duration> {
        let limit = self.opts.request_timeout?;
        if lock(&self.state).pending.is_empty() {
            return None;
        }
        let last = Duration::from_millis(self.progress_ms.load(Ordering::Relaxed));
        let stalled = self.born.elapsed().saturating_sub(last);
        (stalled >= limit).then_some(stalled)
    }

    /// Fails every pending request with EIO and sets the link state.
    fn fail_all(&self, link: Link) {
        let mut st = lock(&self.state);
        if st.link != Link::Quit {
            st.link = link;
        }
        for (_, p) in st.pending.drain() {
            p.slot.set(Err(EIO));
        }
        st.inflight = 0;
        self.cond.notify_all();
    }

    /// The reader thread: reads replies; reconnects when the link breaks.
    fn run(self: Arc<Self>, mut reader: Stream) {
        loop {
            let broken = self.read_replies(&mut reader);
            // First through the reader's own handle: a sender blocked on a
            // full socket holds the writer's lock until the socket ends.
            reader.shutdown();
            if let Some(w) = lock(&self.writer).take() {
                w.shutdown();
            }
            if self.closing.load(Ordering::SeqCst) {
                return;
            }
            match &broken {
                Broken::Protocol(msg) => {
                    log::warn!("NBD client: {msg}: disconnecting");
                    self.fail_all(Link::Down(Instant::now()));
                }
                Broken::Transport => {
                    log::warn!(
                        "NBD client: connection to {} lost",
                        self.opts.addr.display()
                    );
                    let mut st = lock(&self.state);
                    st.link = Link::Down(Instant::now());
                }
            }
            if self.opts.reconnect_delay.is_zero() {
                self.fail_all(Link::Quit);
                return;
            }
            match self.reconnect() {
                Some(r) => reader = r,
                None => return,
            }
        }
    }

    /// Tries to connect again until it works or the client closes; fails
    /// the waiting requests once the delay has passed.
    fn reconnect(&self) -> Option<Stream> {
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.closing.load(Ordering::SeqCst) {
                return None;
            }
            match open(&self.opts) {
                Ok((s, info)) if info.size == self.info.size && info.flags == self.info.flags => {
                    let reader = match s.try_clone() {
                        Ok(r) => r,
                        Err(_) => continue,
                    };
                    let mut w = lock(&self.writer);
                    let mut st = lock(&self.state);
                    st.link = Link::Up;
                    self.cond.notify_all();
                    *w = Some(s);
                    let mut resend: Vec<_> = st.pending.values_mut().collect();
                    resend.sort_by_key(|p| p.req.handle);
                    let stream = w.as_mut()?;
                    for p in resend {
                        p.reset();
                        if self.send(stream, &p.req, p.payload.as_deref()).is_err() {
                            stream.shutdown();
                            break;
                        }
                    }
                    log::info!("NBD client: reconnected to {}", self.opts.addr.display());
                    return Some(reader);
                }
                Ok(_) => log::warn!("NBD client: the export changed; not reconnecting to it"),
                Err(e) => log::debug!("NBD client: reconnect: {e}"),
            }
            let mut st = lock(&self.state);
            let expired = match st.link {
                Link::Down(since) => since.elapsed() >= self.opts.reconnect_delay,
                _ => false,
            };
            if expired {
                st.link = Link::Expired;
                for (_, p) in st.pending.drain() {
                    p.slot.set(Err(EIO));
                }
                st.inflight = 0;
                self.cond.notify_all();
            }
            drop(st);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Reads replies until the connection breaks.
    fn read_replies(&self, r: &mut Stream) -> Broken {
        let mut r = Watchdog {
            stream: r,
            shared: self,
        };
        loop {
            match self.read_one(&mut r) {
                Ok(()) => {}
                Err(ReadErr::Io(e)) => {
                    log::debug!("NBD client: read: {e}");
                    return Broken::Transport;
                }
                Err(ReadErr::Protocol(m)) => return Broken::Protocol(m),
            }
        }
    }

    /// The request a reply is for: (kind, offset, length).
    fn request_of(&self, handle: u64) -> Result<(u16, u64, u32), ReadErr> {
        let st = lock(&self.state);
        let p = st
            .pending
            .get(&handle)
            .ok_or_else(|| ReadErr::Protocol(format!("reply to unknown handle {handle:#x}")))?;
        Ok((p.req.kind, p.req.offset, p.req.len))
    }

    /// Ends a request with what it collected (or `result`).
    fn complete(&self, handle: u64, result: Option<u32>) {
        let mut st = lock(&self.state);
        if let Some(mut p) = st.pending.remove(&handle) {
            st.inflight -= p.cost;
            self.cond.notify_all();
            drop(st);
            let r = match result.or(p.error) {
                Some(e) => Err(if e == 0 { EIO } else { e }),
                None => match (p.req.kind, p.status) {
                    (CMD_READ, _) => Ok(Reply::Data(std::mem::take(&mut p.data))),
                    (CMD_BLOCK_STATUS, Some((len, flags))) => Ok(Reply::Status(len, flags)),
                    // A block status reply without the extent we asked for.
                    (CMD_BLOCK_STATUS, None) => Err(EIO),
                    _ => Ok(Reply::Done),
                },
            };
            p.slot.set(r);
        }
    }

    fn read_one(&self, r: &mut Watchdog<'_>) -> Result<(), ReadErr> {
        let mut magic = [0u8; 4];
        r.read_exact(&mut magic)?;
        // Quick ack is reset by the kernel; renewed for every reply.
        r.stream.quickack();
        match be32(&magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                r.read_exact(&mut h)?;
                let (error, handle) = (be32(&h[0..4]), be64(&h[4..12]));
                let (kind, _, len) = self.request_of(handle)?;
                if kind == CMD_BLOCK_STATUS && error == 0 {
                    return Err(ReadErr::Protocol("simple reply to block status".into()));
                }
                if kind == CMD_READ && error == 0 {
                    if self.info.structured {
                        return Err(ReadErr::Protocol(
                            "simple reply to a structured read".into(),
                        ));
                    }
                    let mut buf = vec![0u8; len as usize];
                    r.read_exact(&mut buf)?;
                    self.with(handle, |p| p.data = buf);
                }
                self.complete(handle, (error != 0).then_some(error));
                Ok(())
            }
            STRUCTURED_REPLY_MAGIC if self.info.structured => self.read_chunk(r),
            m => Err(ReadErr::Protocol(format!("bad reply magic {m:#x}"))),
        }
    }

    fn with(&self, handle: u64, f: impl FnOnce(&mut Pending)) {
        if let Some(p) = lock(&self.state).pending.get_mut(&handle) {
            f(p);
        }
    }

    fn read_chunk(&self, r: &mut Watchdog<'_>) -> Result<(), ReadErr> {
        let mut h = [0u8; 16];
        r.read_exact(&mut h)?;
        let (flags, ty, handle, len) = (
            be16(&h[0..2]),
            be16(&h[2..4]),
            be64(&h[4..12]),
            be32(&h[12..16]),
        );
        let (kind, req_off, req_len) = self.request_of(handle)?;
        let bad = |m: &str| ReadErr::Protocol(format!("{m} (chunk type {ty}, length {len})"));
        let within = |off: u64, n: u64| {
            off >= req_off
                && off
                    .checked_add(n)
                    .is_some_and(|e| e <= req_off + u64::from(req_len))
        };
        match ty {
            REPLY_TYPE_NONE => {
                if len != 0 || flags & REPLY_FLAG_DONE == 0 {
                    return Err(bad("malformed none chunk"));
                }
            }
            REPLY_TYPE_OFFSET_DATA => {
                if kind != CMD_READ || len < 8 || len - 8 > req_len {
                    return Err(bad("unexpected data chunk"));
                }
                let mut off = [0u8; 8];
                r.read_exact(&mut off)?;
                let off = be64(&off);
                let n = len - 8;
                if n == 0 || !within(off, u64::from(n)) {
                    return Err(bad("data chunk outside the request"));
                }
                let mut buf = vec![0u8; n as usize];
                r.read_exact(&mut buf)?;
                let at = (off - req_off) as usize;
                self.with(handle, |p| p.data[at..at + buf.len()].copy_from_slice(&buf));
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if kind != CMD_READ || len != 12 {
                    return Err(bad("unexpected hole chunk"));
                }
                let mut b = [0u8; 12];
                r.read_exact(&mut b)?;
                let (off, n) = (be64(&b[0..8]), be32(&b[8..12]));
                if n == 0 || !within(off, u64::from(n)) {
                    return Err(bad("hole chunk outside the request"));
                }
                let at = (off - req_off) as usize;
                self.with(handle, |p| p.data[at..at + n as usize].fill(0));
            }
            REPLY_TYPE_BLOCK_STATUS => {
                if kind != CMD_BLOCK_STATUS
                    || !(12..=MAX_META_CHUNK).contains(&len)
                    || (len - 4) % 8 != 0
                {
                    return Err(bad("unexpected block status chunk"));
                }
                let mut b = vec![0u8; len as usize];
                r.read_exact(&mut b)?;
                if Some(be32(&b[0..4])) != self.info.base_allocation {
                    return Err(bad("block status of a context we did not select"));
                }
                let (elen, eflags) = (be32(&b[4..8]), be32(&b[8..12]));
                if elen == 0 {
                    return Err(bad("empty extent"));
                }
                self.with(handle, |p| p.status = Some((elen.min(req_len), eflags)));
            }
            t if t & (1 << 15) != 0 => {
                if !(6..=MAX_META_CHUNK).contains(&len) {
                    return Err(bad("malformed error chunk"));
                }
                let mut b = vec![0u8; len as usize];
                r.read_exact(&mut b)?;
                let error = be32(&b[0..4]);
                let mlen = usize::from(be16(&b[4..6]));
                if 6 + mlen > b.len() {
                    return Err(bad("error message beyond the chunk"));
                }
                if error == 0 {
                    return Err(bad("error chunk without an error"));
                }
                log::debug!(
                    "NBD client: server error {error}: {}",
                    String::from_utf8_lossy(&b[6..6 + mlen])
                );
                self.with(handle, |p| p.error = Some(error));
            }
            _ => return Err(bad("unknown chunk type")),
        }
        if flags & REPLY_FLAG_DONE != 0 {
            self.complete(handle, None);
        }
        Ok(())
    }
}

/// Why reading a reply stopped.
enum ReadErr {
    Io(io::Error),
    Protocol(String),
}

impl From<io::Error> for ReadErr {
    fn from(e: io::Error) -> ReadErr {
        ReadErr::Io(e)
    }
}
