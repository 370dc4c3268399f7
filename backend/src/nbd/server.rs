//! The NBD server's sockets: a listener (unix or TCP) with an accept
//! thread, one thread per connection (with at most
//! [`super::transmission::MAX_WORKERS`] more running its requests), a cap
//! on simultaneous connections,
//! and time-outs where a client could otherwise hold a thread forever
//! (the whole handshake, a WRITE's payload once its header has come, and
//! every reply write: a client that stops reading is dropped instead of
//! being waited for).

use super::export::Exports;
use super::handshake::negotiate;
pub use super::stream::Stream;
use super::transmission::{serve, TimedRead};
use crate::unix_socket::SocketOptions;
use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Connections allowed when `max-connections` is 0 (QEMU: unlimited). A
/// bound keeps the worst case (one maximal request buffered per
/// connection) finite.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 128;
/// Time a client has for the whole handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a WRITE's payload (at most 32 MiB) has to arrive after its header.
pub const PAYLOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a reply write may block before the client is dropped.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `stop` waits for the connections' threads to end.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Socket buffer sizes: reads and writes of a whole request per call.
const IO_BUFFER: usize = 256 << 10;
/// The kernel's send buffer per connection: a few 256 KiB READ replies
/// (nbdcopy's size) fit without the writer blocking midway.
const SEND_BUFFER: usize = 1 << 20;

/// How long a client may take where it holds a thread and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// The whole handshake, from accept to the end of `NBD_OPT_GO`.
    pub handshake: Duration,
    /// A WRITE's payload, from its header on.
    pub payload: Duration,
    /// One blocked reply write (a client not reading).
    pub write: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: HANDSHAKE_TIMEOUT,
            payload: PAYLOAD_TIMEOUT,
            write: WRITE_TIMEOUT,
        }
    }
}

/// Where the server listens (QEMU's `SocketAddress`, unix and inet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A unix socket path (created with the daemon's socket mode and group,
    /// 0600 by default; a stale socket is replaced, a live one refused).
    Unix(PathBuf),
    /// A TCP host and port.
    Inet {
        /// Host name or address.
        host: String,
        /// Port number or service name.
        port: String,
    },
}

/// A deadline for a run of reads or writes together (a per-call
/// time-out alone lets a client trickle one byte at a time), kept as the
/// socket time-out: the time left before each call, at most `cap`.
struct Deadline {
    at: Option<Instant>,
    /// The time-out without a deadline (`None`: wait forever).
    cap: Option<Duration>,
    /// The socket's time-out is the deadline's, not `cap`.
    armed: bool,
}

impl Deadline {
    /// Sets the socket time-out with `set` before a call, or fails if the
    /// deadline has passed. No system call while no deadline is set.
    fn arm(&mut self, set: impl FnOnce(Option<Duration>) -> io::Result<()>) -> io::Result<()> {
        match self.at {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "time limit reached",
                    ));
                }
                set(Some(self.cap.map_or(left, |c| c.min(left))))?;
                self.armed = true;
            }
            None if self.armed => {
                set(self.cap)?;
                self.armed = false;
            }
            None => {}
        }
        Ok(())
    }
}

/// The read side of a connection.
struct Reader {
    stream: Stream,
    deadline: Deadline,
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let s = &self.stream;
        self.deadline.arm(|t| s.set_read_timeout(t))?;
        self.stream.read(buf)
    }
}

/// The write side of a connection.
struct Writer {
    stream: Stream,
    deadline: Deadline,
}

impl Writer {
    /// A failed write ends the connection in both directions: the reader,
    /// possibly waiting for a request that never comes, must stop too.
    fn check<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if r.as_ref()
            .is_err_and(|e| e.kind() != io::ErrorKind::Interrupted)
        {
            self.stream.shutdown();
        }
        r
    }
}

impl Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let s = &self.stream;
        self.deadline.arm(|t| s.set_write_timeout(t))?;
        let r = self.stream.write(buf);
        self.check(r)
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let s = &self.stream;
        self.deadline.arm(|t| s.set_write_timeout(t))?;
        let r = self.stream.write_vectored(bufs);
        self.check(r)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl TimedRead for BufReader<Reader> {
    fn set_deadline(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        self.get_mut().deadline.at = deadline;
        Ok(())
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                let _ = s.set_nodelay(true);
                let s = Stream::Tcp(s);
                s.detect_dead_peer();
                s
            }
        })
    }

    fn raw_fd(&self) -> i32 {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

struct Shared {
    exports: Arc<Exports>,
    /// Every open connection (handshake or transmission), by id.
    conns: Mutex<HashMap<u64, Stream>>,
    closing: AtomicBool,
    max_connections: usize,
    timeouts: Timeouts,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Stream>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running NBD server.
pub struct NbdServer {
    shared: Arc<Shared>,
    listener: Arc<Listener>,
    accept: Option<JoinHandle<()>>,
    unix_path: Option<PathBuf>,
}

impl NbdServer {
    /// Listens on `addr` and serves `exports`; at most `max_connections`
    /// clients at once (0: [`DEFAULT_MAX_CONNECTIONS`]). A unix socket
    /// gets `socket`'s mode and group. The error is worded for QMP.
    pub fn start(
        addr: &Address,
        exports: Arc<Exports>,
        max_connections: u32,
        socket: &SocketOptions,
    ) -> Result<NbdServer, String> {
        NbdServer::start_with(addr, exports, max_connections, Timeouts::default(), socket)
    }

    /// As [`NbdServer::start`], with other time-outs.
    pub fn start_with(
        addr: &Address,
        exports: Arc<Exports>,
        max_connections: u32,
        timeouts: Timeouts,
        socket: &SocketOptions,
    ) -> Result<NbdServer, String> {
        let (listener, unix_path) = match addr {
            Address::Unix(path) => {
                let l = crate::unix_socket::bind(path, socket)
                    .map_err(|e| format!("Failed to bind socket to {}: {e}", path.display()))?;
                (Listener::Unix(l), Some(path.clone()))
            }
            Address::Inet { host, port } => {
                let addrs = (
                    host.as_str(),
                    port.parse::<u16>()
                        .map_err(|_| format!("Invalid port '{port}'"))?,
                )
                    .to_socket_addrs()
                    .map_err(|e| format!("address resolution failed for {host}:{port}: {e}"))?;
                let l = TcpListener::bind(addrs.collect::<Vec<_>>().as_slice())
                    .map_err(|e| format!("Failed to bind socket: {e}"))?;
                (Listener::Tcp(l), None)
            }
        };
        let max = match max_connections {
            0 => DEFAULT_MAX_CONNECTIONS,
            n => n.min(DEFAULT_MAX_CONNECTIONS),
        };
        let shared = Arc::new(Shared {
            exports,
            conns: Mutex::new(HashMap::new()),
            closing: AtomicBool::new(false),
            max_connections: max as usize,
            timeouts,
        });
        let listener = Arc::new(listener);
        let (s, l) = (shared.clone(), listener.clone());
        let accept = std::thread::Builder::new()
            .name("vubd-nbd-accept".into())
            .spawn(move || {
                crate::thread_kind::started(crate::thread_kind::ThreadKind::Nbd);
                accept_loop(&l, &s)
            })
            .map_err(|e| format!("cannot start the NBD server: {e}"))?;
        Ok(NbdServer {
            shared,
            listener,
            accept: Some(accept),
            unix_path,
        })
    }

    /// The exports this server serves.
    pub fn exports(&self) -> &Arc<Exports> {
        &self.shared.exports
    }

    /// Open connections (for tests and diagnostics).
    pub fn connections(&self) -> usize {
        self.shared.conns().len()
    }

    /// Stops listening, removes every export (disconnecting its clients)
    /// and closes the connections still in their handshake.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.closing.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on a descriptor the listener keeps open; it
        // wakes the blocked accept(2).
        unsafe { libc::shutdown(self.listener.raw_fd(), libc::SHUT_RDWR) };
        let _ = accept.join();
        self.shared.exports.remove_all();
        for s in self.shared.conns().values() {
            s.shutdown();
        }
        // A request already running (a write into the disk) finishes first,
        // so that the daemon's final flush comes after it.
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !self.shared.conns().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.halt();
    }
}

fn accept_loop(listener: &Listener, shared: &Arc<Shared>) {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if shared.closing.load(Ordering::SeqCst) {
                    return;
                }
                if e.kind() != io::ErrorKind::Interrupted {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("NBD accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        if shared.closing.load(Ordering::SeqCst) {
            return;
        }
        let id = shared.exports.connection_id();
        {
            let mut conns = shared.conns();
            if conns.len() >= shared.max_connections {
                log::info!(
                    "NBD: connection limit ({}) reached; refusing a client",
                    shared.max_connections
                );
                continue;
            }
            match stream.try_clone() {
                Ok(s) => conns.insert(id, s),
                Err(_) => continue,
            };
        }
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("vubd-nbd-client".into())
            .spawn(move || {
                crate::thread_kind::started(crate::thread_kind::ThreadKind::Nbd);
                if let Err(e) = client(&s, id, stream) {
                    log::info!("NBD client {id}: {e}");
                }
                s.conns().remove(&id);
            });
        if spawned.is_err() {
            shared.conns().remove(&id);
        }
    }
}

fn client(shared: &Shared, id: u64, stream: Stream) -> io::Result<()> {
    let t = shared.timeouts;
    stream.set_send_buffer(SEND_BUFFER);
    stream.set_write_timeout(Some(t.write))?;
    // The handshake's deadline covers its reads and its replies' writes.
    let deadline = Instant::now() + t.handshake;
    let reader = Reader {
        stream: stream.try_clone()?,
        deadline: Deadline {
            at: Some(deadline),
            cap: None,
            armed: false,
        },
    };
    let writer = Writer {
        stream: stream.try_clone()?,
        deadline: Deadline {
            at: Some(deadline),
            cap: Some(t.write),
            armed: false,
        },
    };
    let mut r = BufReader::with_capacity(IO_BUFFER, reader);
    let mut w = BufWriter::with_capacity(IO_BUFFER, writer);
    let exports = &shared.exports;
    let attach = |e: &Arc<super::export::Export>| match stream.try_clone() {
        Ok(s) => exports.attach(e, id, s),
        Err(_) => false,
    };
    let result = negotiate(&mut r, &mut w, exports, deadline, &attach).and_then(|n| match n {
        // An idle client in transmission is legitimate; only writes and
        // payloads time out.
        Some(n) => {
            // Replies are written whole by vectored writes, unbuffered.
            w.flush()?;
            w.get_mut().deadline.at = None;
            r.set_deadline(None)
                .and_then(|()| serve(&mut r, w.get_mut(), &n, t.payload))
        }
        None => Ok(()),
    });
    // Whichever way it ended, even mid-handshake after attaching.
    exports.detach(id);
    result
}
