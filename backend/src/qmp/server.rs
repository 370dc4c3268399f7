//! The QMP transport: a unix socket (mode 0600 unless configured) serving several clients at
//! once, one reader thread and one writer thread per client.
//!
//! Every message to a client (greeting, replies, events) goes through one
//! bounded queue drained by that client's writer thread, so replies and
//! events keep their order and nothing else in the daemon ever blocks on a
//! client's socket. The reader thread reads bytes, splits them into JSON
//! messages and runs each through the [`Dispatcher`]; a client that stops
//! reading eventually blocks only its own reader. A client whose event
//! queue overflows is disconnected (see `events.rs`). A client that sends
//! half a message and leaves costs nothing: the partial input is dropped
//! with its thread. Every complete command that arrived is executed even
//! if its client has hung up (a client cannot know which of its commands
//! ran; `quit` then close must still quit); only the replies are lost.

use super::dispatch::{Dispatcher, Session};
use super::events::{Delivery, Event, Sink, SubscriptionId};
use super::json::{to_wire, Splitter, DEFAULT_MAX_MESSAGE};
use crate::unix_socket::{self, SocketError, SocketOptions};
use serde_json::json;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum QmpServerError {
    /// Creating the socket failed (or its path is taken).
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The accept thread could not be started.
    #[error("cannot start the QMP accept thread: {0}")]
    Thread(std::io::Error),
}

/// Tunables of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Simultaneous clients; more are refused with an error line.
    pub max_clients: usize,
    /// Largest accepted message in bytes.
    pub max_message: usize,
    /// Messages queued to one client before its events overflow.
    pub queue_len: usize,
    /// How long a write to a client that does not read may block before
    /// the client is dropped.
    pub write_timeout: Duration,
    /// How long [`QmpServer::shutdown`] waits for clients to drain.
    pub drain_timeout: Duration,
    /// Mode and group of the socket.
    pub socket: SocketOptions,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_clients: 64,
            max_message: DEFAULT_MAX_MESSAGE,
            queue_len: 4096,
            write_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(2),
            socket: SocketOptions::default(),
        }
    }
}

/// Stack of a client's reader thread: parsing, dispatching, answering and
/// freeing a message recurse once per nesting level, up to
/// [`super::json::MAX_NESTING`]. Only the pages touched are ever committed.
const CLIENT_STACK: usize = 8 << 20;

enum Out {
    Text(String),
    Event(Arc<Event>),
}

struct Client {
    stream: UnixStream,
    thread: Option<JoinHandle<()>>,
    thread_id: Option<ThreadId>,
}

struct Shared {
    dispatcher: Arc<Dispatcher>,
    config: ServerConfig,
    closing: AtomicBool,
    clients: Mutex<HashMap<u64, Client>>,
    next_client: AtomicU64,
}

impl Shared {
    fn clients(&self) -> MutexGuard<'_, HashMap<u64, Client>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running QMP server; stops (draining its clients) on
/// [`QmpServer::shutdown`] or drop, and removes its socket file.
pub struct QmpServer {
    path: PathBuf,
    listener: Arc<UnixListener>,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpServer")
            .field("path", &self.path)
            .finish()
    }
}

impl QmpServer {
    /// Listens on `path` and serves `dispatcher` there until shut down.
    pub fn start(
        path: &Path,
        dispatcher: Arc<Dispatcher>,
        config: ServerConfig,
    ) -> Result<QmpServer, QmpServerError> {
        let listener = Arc::new(unix_socket::bind(path, &config.socket)?);
        let shared = Arc::new(Shared {
            dispatcher,
            config,
            closing: AtomicBool::new(false),
            clients: Mutex::new(HashMap::new()),
            next_client: AtomicU64::new(0),
        });
        let (l, s) = (listener.clone(), shared.clone());
        let accept_thread = std::thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || {
                crate::thread_kind::started(crate::thread_kind::ThreadKind::Qmp);
                accept_loop(&l, &s)
            })
            .map_err(QmpServerError::Thread)?;
        log::info!("QMP monitor listening on {}", path.display());
        Ok(QmpServer {
            path: path.to_path_buf(),
            listener,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The dispatcher this server serves.
    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.shared.dispatcher
    }

    /// Number of connected clients.
    pub fn clients(&self) -> usize {
        self.shared
            .clients()
            .values()
            .filter(|c| c.thread.as_ref().is_some_and(|t| !t.is_finished()))
            .count()
    }

    /// Stops accepting, lets every client finish the command it is running
    /// and receive what is queued for it (e.g. the SHUTDOWN event), then
    /// closes the connections and removes the socket file. Safe to call
    /// from a client's own thread (that thread is not waited for).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(accept) = self.accept_thread.take() else {
            return;
        };
        self.shared.closing.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on a descriptor we own (kept open by
        // self.listener); on Linux it wakes the blocked accept(2).
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let _ = accept.join();
        let me = std::thread::current().id();
        let mut clients: Vec<Client> = self.shared.clients().drain().map(|(_, c)| c).collect();
        // First ask politely: end of input, so each reader finishes its
        // command, its writer drains the queue, and both exit.
        for c in &clients {
            let _ = c.stream.shutdown(Shutdown::Read);
        }
        let deadline = Instant::now() + self.shared.config.drain_timeout;
        wait_clients(&mut clients, me, deadline);
        // Then force the stragglers (clients that do not read).
        for c in &clients {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        wait_clients(
            &mut clients,
            me,
            Instant::now() + Duration::from_millis(500),
        );
        if clients
            .iter()
            .any(|c| c.thread.is_some() && c.thread_id != Some(me))
        {
            log::warn!("QMP: some client threads did not exit; leaving them detached");
        }
        let _ = std::fs::remove_file(&self.path);
        log::info!("QMP monitor on {} closed", self.path.display());
    }
}

fn wait_clients(clients: &mut [Client], me: ThreadId, deadline: Instant) {
    loop {
        let mut pending = false;
        for c in clients.iter_mut() {
            if c.thread_id == Some(me) {
                continue;
            }
            if let Some(t) = c.thread.take() {
                if t.is_finished() {
                    let _ = t.join();
                } else {
                    c.thread = Some(t);
                    pending = true;
                }
            }
        }
        if !pending || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                if shared.closing.load(Ordering::SeqCst) {
                    return;
                }
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // EMFILE and friends: back off instead of spinning.
                log::warn!("QMP accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if shared.closing.load(Ordering::SeqCst) {
            return;
        }
        let mut clients = shared.clients();
        clients.retain(|_, c| c.thread.as_ref().is_some_and(|t| !t.is_finished()));
        if clients.len() >= shared.config.max_clients {
            drop(clients);
            log::warn!(
                "QMP: refusing a client, {} already connected",
                shared.config.max_clients
            );
            let msg = json!({"error": {"class": "GenericError", "desc": "Too many QMP clients"}});
            let mut s = stream;
            let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = s.write_all(to_wire(&msg).as_bytes());
            continue;
        }
        let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
        let keep = match stream.try_clone() {
            Ok(k) => k,
            Err(e) => {
                log::warn!("QMP: cannot serve a client: {e}");
                continue;
            }
        };
        let s = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("qmp-client-{id}"))
            .stack_size(CLIENT_STACK)
            .spawn(move || {
                crate::thread_kind::started(crate::thread_kind::ThreadKind::Qmp);
                serve_client(stream, &s);
                // Give back the descriptor and handle kept for shutdown now,
                // not at the next connection: a burst of clients that all
                // left must not keep their sockets open. (The accept thread
                // holds the map while spawning, so the entry is there.)
                s.clients().remove(&id);
            });
        match spawned {
            Ok(t) => {
                let thread_id = Some(t.thread().id());
                clients.insert(
                    id,
                    Client {
                        stream: keep,
                        thread: Some(t),
                        thread_id,
                    },
                );
            }
            Err(e) => log::warn!("QMP: cannot start a client thread: {e}"),
        }
    }
}

fn writer_loop(mut stream: UnixStream, rx: Receiver<Out>) {
    for out in rx {
        let bytes = match &out {
            Out::Text(s) => s.as_bytes(),
            Out::Event(e) => e.wire.as_bytes(),
        };
        if let Err(e) = stream.write_all(bytes) {
            log::debug!("QMP client write failed: {e}");
            // Unblock our reader too: this client is gone or stuck.
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    }
}

fn serve_client(stream: UnixStream, shared: &Shared) {
    log::debug!("QMP client connected");
    let d = &shared.dispatcher;
    let (tx, rx): (SyncSender<Out>, Receiver<Out>) = sync_channel(shared.config.queue_len);
    let writer = match stream.try_clone() {
        Ok(w) => {
            let _ = w.set_write_timeout(Some(shared.config.write_timeout));
            std::thread::Builder::new()
                .name("qmp-writer".into())
                .spawn(move || {
                    crate::thread_kind::started(crate::thread_kind::ThreadKind::Qmp);
                    writer_loop(w, rx)
                })
        }
        Err(e) => Err(e),
    };
    let writer = match writer {
        Ok(w) => w,
        Err(e) => {
            log::warn!("QMP: cannot start a client writer: {e}");
            return;
        }
    };
    let mut subscription = None;
    if tx.send(Out::Text(to_wire(&d.greeting()))).is_ok() {
        let mut session = Session::new();
        let mut splitter = Splitter::new(shared.config.max_message);
        let mut buf = vec![0u8; 64 * 1024];
        let mut frames = Vec::new();
        let mut reader = &stream;
        let mut writer_gone = false;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("QMP client read failed: {e}");
                    break;
                }
            };
            splitter.feed(&buf[..n], &mut frames);
            for frame in frames.drain(..) {
                let response = d.handle(&mut session, frame);
                let reply = Out::Text(to_wire(&response.message));
                if response.negotiated_now && subscription.is_none() {
                    subscription = Some(negotiated(d, &tx, &stream, reply));
                } else if tx.send(reply).is_err() && !writer_gone {
                    // The writer has stopped (the client hung up or stopped
                    // reading): keep executing what was fully received, as
                    // the client cannot tell which commands ran, but drop
                    // the replies.
                    log::debug!("QMP client gone; executing its remaining commands");
                    writer_gone = true;
                }
                for action in response.after_reply {
                    action();
                }
            }
        }
        if splitter.has_partial() {
            log::debug!("QMP client left in the middle of a message");
        }
    }
    if let Some(id) = subscription {
        d.events().unsubscribe(id);
    }
    // With both senders gone, the writer drains the queue and exits.
    drop(tx);
    let _ = writer.join();
    let _ = stream.shutdown(Shutdown::Both);
    log::debug!("QMP client disconnected");
}

/// Queues the reply to `qmp_capabilities` and subscribes the client to
/// events, atomically with respect to emitters so that events follow the
/// reply. If the queue is full (a client that sent many commands before
/// negotiating and reads nothing), the reply is queued with a blocking send
/// first; events emitted meanwhile are not owed to a client that has not
/// yet seen its negotiation complete.
fn negotiated(
    d: &Dispatcher,
    tx: &SyncSender<Out>,
    stream: &UnixStream,
    reply: Out,
) -> SubscriptionId {
    let mut pending = Some(reply);
    let subscribed = d.events().subscribe_after(event_sink(tx, stream), || {
        match pending.take().map(|r| tx.try_send(r)) {
            Some(Err(TrySendError::Full(r))) => {
                pending = Some(r);
                false
            }
            _ => true,
        }
    });
    if let Some(id) = subscribed {
        return id;
    }
    if let Some(r) = pending {
        let _ = tx.send(r);
    }
    d.events().subscribe(event_sink(tx, stream))
}

fn event_sink(tx: &SyncSender<Out>, stream: &UnixStream) -> Sink {
    let tx = tx.clone();
    let kill = stream.try_clone().ok();
    Box::new(
        move |event: &Arc<Event>| match tx.try_send(Out::Event(event.clone())) {
            Ok(()) => Delivery::Queued,
            Err(TrySendError::Full(_)) => {
                log::warn!("QMP client is not reading its events; disconnecting it");
                if let Some(k) = &kill {
                    let _ = k.shutdown(Shutdown::Both);
                }
                Delivery::Gone
            }
            Err(TrySendError::Disconnected(_)) => Delivery::Gone,
        },
    )
}
