//! The vhost-user socket: binding it safely, serving one frontend after
//! another on it, and stopping cleanly on SIGTERM/SIGINT.

use crate::config_space::DeviceConfig;
use crate::device::BlockDevice;
use crate::inflight::proxy;
use log::{debug, info, warn};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vubd_backend::unix_socket::{self, SocketError, SocketOptions};
use vubd_backend::Disk;

/// Why the socket could not be set up or served.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket could not be created.
    #[error(transparent)]
    Socket(#[from] SocketError),
    /// The vhost-user library failed to set up a session.
    #[error("vhost-user: {0}")]
    Vhost(String),
}

/// Creates the listening socket at `path` with `opts`' mode and group,
/// replacing a stale socket file but never a live one.
pub fn bind_socket(path: &Path, opts: &SocketOptions) -> Result<UnixListener, ServerError> {
    Ok(unix_socket::bind(path, opts)?)
}

/// Serves frontends on a socket, one session after another.
pub struct Server {
    listener: UnixListener,
    disk: Arc<Disk>,
    cfg: DeviceConfig,
    stopping: Arc<AtomicBool>,
    current: Arc<Mutex<Option<Arc<BlockDevice>>>>,
    offer_inflight: bool,
    /// Where the vhost-user relay's private sockets are made: the
    /// directory of the listening socket.
    relay_dir: PathBuf,
}

/// Lets another thread stop the server cleanly.
#[derive(Clone)]
pub struct StopHandle {
    stopping: Arc<AtomicBool>,
    current: Arc<Mutex<Option<Arc<BlockDevice>>>>,
}

impl StopHandle {
    /// Stops taking requests and waits for those in flight to complete. The
    /// caller then flushes and exits; the frontend sees no half-done request.
    pub fn stop_and_drain(&self) {
        self.stopping.store(true, Ordering::Release);
        let device = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(device) = device {
            device.quiesce();
        }
    }
}

impl Server {
    /// A server for `disk` on `listener`, already bound at `socket`.
    pub fn new(
        socket: &Path,
        listener: UnixListener,
        disk: Arc<Disk>,
        cfg: DeviceConfig,
    ) -> Server {
        let relay_dir = match socket.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        Server {
            relay_dir,
            listener,
            disk,
            cfg,
            stopping: Arc::new(AtomicBool::new(false)),
            current: Arc::new(Mutex::new(None)),
            offer_inflight: true,
        }
    }

    /// Whether to offer in-flight tracking (INFLIGHT_SHMFD; on by default).
    pub fn offer_inflight(&mut self, on: bool) {
        self.offer_inflight = on;
    }

    /// A handle to stop the server from a signal thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            stopping: self.stopping.clone(),
            current: self.current.clone(),
        }
    }

    /// Accepts and serves frontends until the server is stopped. A session
    /// ending (guest shutdown, VMM crash) is normal: the next one is accepted.
    pub fn run(&mut self) -> Result<(), ServerError> {
        while !self.stopping.load(Ordering::Acquire) {
            let slot = Arc::new(proxy::Slot::default());
            let device = Arc::new(
                BlockDevice::new(self.disk.clone(), self.cfg.clone(), self.stopping.clone())
                    .with_inflight(slot.clone()),
            );
            let memory = GuestMemoryAtomic::new(GuestMemoryMmap::new());
            let mut daemon = VhostUserDaemon::new("vubd-vhost".into(), device.clone(), memory)
                .map_err(|e| ServerError::Vhost(e.to_string()))?;
            let frontend = match self.listener.accept() {
                Ok((frontend, _)) => frontend,
                Err(e) => {
                    warn!("accepting a frontend failed: {e}");
                    continue;
                }
            };
            // The library serves our end of a private socket; the relay
            // between it and the frontend adds inflight tracking.
            let relays = match proxy::private_pair(&self.relay_dir).and_then(|(inner, ours)| {
                let relays = proxy::spawn(frontend, ours, slot, self.offer_inflight)?;
                Ok((inner, relays))
            }) {
                Ok((inner, relays)) => {
                    if let Err(e) = daemon.start(&mut Listener::from(inner)) {
                        warn!("starting a session failed: {e}");
                    }
                    relays
                }
                Err(e) => {
                    warn!("cannot relay the frontend's session: {e}");
                    continue;
                }
            };
            info!("frontend connected");
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(device);
            match daemon.wait() {
                Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage,
                )) => info!("frontend disconnected"),
                Err(e) => warn!("frontend session ended with an error: {e}"),
            }
            *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
            // Dropping the daemon stops and joins this session's queue threads.
            drop(daemon);
            for relay in relays {
                let _ = relay.join();
            }
            debug!("session cleaned up");
        }
        Ok(())
    }
}
