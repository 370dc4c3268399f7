//! Adds GET_INFLIGHT_FD / SET_INFLIGHT_FD to the vhost-user session.
//!
//! vhost-user-backend 0.24 (the newest release) answers both with "not
//! supported" from a handler it does not export, so vubd sits between the
//! frontend and the library on the socket: it forwards every message as
//! is, with its descriptors, except the two inflight messages, which it
//! answers itself, and the GET_PROTOCOL_FEATURES reply, to which it adds
//! INFLIGHT_SHMFD. The library is reached over a socket in a private
//! directory (mode 0700) whose entry is removed once connected.

use super::region::Region;
use log::{debug, info, warn};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HEADER_LEN: usize = 12;
/// Larger than any message vubd's library accepts; a bigger one ends the session.
const MAX_PAYLOAD: usize = 64 << 10;
/// More descriptors than any vhost-user message carries.
const MAX_FDS: usize = 32;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_INFLIGHT_FD: u32 = 31;
const SET_INFLIGHT_FD: u32 = 32;
const VERSION_MASK: u32 = 0x3;
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// Bytes of the VhostUserInflight payload.
const INFLIGHT_LEN: usize = 24;

/// The session's inflight region, shared by the proxy (which installs it)
/// and the device (which tracks requests in it).
#[derive(Default)]
pub struct Slot(Mutex<Option<Arc<Region>>>);

impl Slot {
    /// The region the frontend set up, if any.
    pub fn get(&self) -> Option<Arc<Region>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, region: Option<Arc<Region>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = region;
    }
}

/// A listening socket the library can accept from, and our end of the
/// connection to it (already queued on the listener), made in a private
/// directory under `dir`: beside the vhost-user socket, where vubd may
/// create sockets once confined (Landlock), unlike $TMPDIR.
pub fn private_pair(dir: &Path) -> io::Result<(UnixListener, UnixStream)> {
    let mut template = dir
        .join(".vubd-XXXXXX")
        .into_os_string()
        .into_encoded_bytes();
    template.push(0);
    // SAFETY: a NUL-terminated, writable template, as mkdtemp requires.
    let dir = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
    if dir.is_null() {
        return Err(io::Error::last_os_error());
    }
    template.pop();
    let dir = PathBuf::from(std::ffi::OsString::from_vec(template));
    // Others may write beside the socket and swap a directory in under
    // this name: work through a descriptor of ours, by its /proc path,
    // which also fits in sun_path whatever the length of `dir`.
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(&dir);
    let result = opened.and_then(|d| {
        let st = d.metadata()?;
        // SAFETY: geteuid has no preconditions.
        if st.uid() != unsafe { libc::geteuid() } || st.mode() & 0o777 != 0o700 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} was replaced", dir.display()),
            ));
        }
        let addr = PathBuf::from(format!("/proc/self/fd/{}/s", d.as_raw_fd()));
        let pair = UnixListener::bind(&addr).and_then(|l| Ok((UnixStream::connect(&addr)?, l)));
        let _ = std::fs::remove_file(&addr);
        // Only ours: the name may lead elsewhere by now.
        if std::fs::symlink_metadata(&dir).is_ok_and(|m| m.ino() == st.ino() && m.dev() == st.dev())
        {
            let _ = std::fs::remove_dir(&dir);
        }
        pair
    });
    let (stream, listener) = result?;
    Ok((listener, stream))
}

/// Relays one session between `frontend` and `library` until either side
/// closes, offering INFLIGHT_SHMFD if `offer`; returns the two relay threads.
pub fn spawn(
    frontend: UnixStream,
    library: UnixStream,
    slot: Arc<Slot>,
    offer: bool,
) -> io::Result<[JoinHandle<()>; 2]> {
    let front_out = Arc::new(Mutex::new(frontend.try_clone()?));
    let (front_in, lib_in, lib_out) = (frontend, library.try_clone()?, library);
    let replies_out = front_out.clone();
    let up = std::thread::Builder::new()
        .name("vubd-vu-in".into())
        .spawn(move || {
            if let Err(e) = relay_requests(&front_in, &lib_out, &front_out, &slot) {
                debug!("frontend relay ended: {e}");
            }
            let _ = front_in.shutdown(std::net::Shutdown::Both);
            let _ = lib_out.shutdown(std::net::Shutdown::Both);
        })?;
    let down = std::thread::Builder::new()
        .name("vubd-vu-out".into())
        .spawn(move || {
            if let Err(e) = relay_replies(&lib_in, &replies_out, offer) {
                debug!("library relay ended: {e}");
            }
            let _ = lib_in.shutdown(std::net::Shutdown::Both);
            if let Ok(f) = replies_out.lock() {
                let _ = f.shutdown(std::net::Shutdown::Both);
            }
        })?;
    Ok([up, down])
}

/// One vhost-user message as read off a socket.
struct Message {
    request: u32,
    flags: u32,
    payload: Vec<u8>,
    fds: Vec<File>,
}

impl Message {
    fn read(sock: &UnixStream) -> io::Result<Message> {
        let mut header = [0u8; HEADER_LEN];
        let mut raw = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: HEADER_LEN,
        }];
        // SAFETY: the iovec points at `header`, writable for its length.
        let (got, nfds) = unsafe { sock.recv_with_fds(&mut iov, &mut raw) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let fds = raw[..nfds]
            .iter()
            // SAFETY: the kernel just installed these descriptors for us.
            .map(|&fd| unsafe { File::from_raw_fd(fd) })
            .collect();
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        (&*sock).read_exact(&mut header[got..])?;
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let size = word(8) as usize;
        if size > MAX_PAYLOAD {
            return Err(io::Error::other(format!("message of {size} bytes")));
        }
        let mut payload = vec![0u8; size];
        (&*sock).read_exact(&mut payload)?;
        Ok(Message {
            request: word(0),
            flags: word(4),
            payload,
            fds,
        })
    }

    fn write(&self, sock: &UnixStream) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(HEADER_LEN + self.payload.len());
        bytes.extend_from_slice(&self.request.to_le_bytes());
        bytes.extend_from_slice(&self.flags.to_le_bytes());
        bytes.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&self.payload);
        let fds: Vec<RawFd> = self.fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = sock
            .send_with_fds(&[&bytes[..]], &fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        (&*sock).write_all(&bytes[sent..])
    }

    fn reply(&self, payload: Vec<u8>, fds: Vec<File>) -> Message {
        Message {
            request: self.request,
            flags: VERSION | REPLY,
            payload,
            fds,
        }
    }
}

fn relay_requests(
    front: &UnixStream,
    lib: &UnixStream,
    front_out: &Mutex<UnixStream>,
    slot: &Slot,
) -> io::Result<()> {
    loop {
        let msg = Message::read(front)?;
        let reply = match msg.request {
            GET_INFLIGHT_FD | SET_INFLIGHT_FD if msg.flags & VERSION_MASK != VERSION => {
                return Err(io::Error::other("bad message version"));
            }
            GET_INFLIGHT_FD => Some(get_inflight_fd(&msg, slot)),
            SET_INFLIGHT_FD => {
                let ok = set_inflight_fd(&msg, slot);
                (msg.flags & NEED_REPLY != 0)
                    .then(|| msg.reply(u64::from(!ok).to_le_bytes().to_vec(), Vec::new()))
            }
            _ => {
                msg.write(lib)?;
                None
            }
        };
        if let Some(reply) = reply {
            let out = front_out.lock().unwrap_or_else(|p| p.into_inner());
            reply.write(&out)?;
        }
    }
}

fn relay_replies(lib: &UnixStream, front_out: &Mutex<UnixStream>, offer: bool) -> io::Result<()> {
    loop {
        let mut msg = Message::read(lib)?;
        if offer && msg.request == GET_PROTOCOL_FEATURES && msg.flags & REPLY != 0 {
            if let Ok(bytes) = <[u8; 8]>::try_from(&msg.payload[..]) {
                let features =
                    u64::from_le_bytes(bytes) | VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits();
                msg.payload = features.to_le_bytes().to_vec();
            }
        }
        let out = front_out.lock().unwrap_or_else(|p| p.into_inner());
        msg.write(&out)?;
    }
}

/// (mmap_size, mmap_offset, num_queues, queue_size) of a VhostUserInflight.
fn parse_inflight(payload: &[u8]) -> Option<(u64, u64, u16, u16)> {
    let p: &[u8; INFLIGHT_LEN] = payload.try_into().ok()?;
    let u64_at = |i: usize| u64::from_le_bytes(p[i..i + 8].try_into().unwrap_or([0; 8]));
    let u16_at = |i: usize| u16::from_le_bytes([p[i], p[i + 1]]);
    Some((u64_at(0), u64_at(8), u16_at(16), u16_at(18)))
}

fn inflight_payload(mmap_size: u64, num_queues: u16, queue_size: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(INFLIGHT_LEN);
    p.extend_from_slice(&mmap_size.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&num_queues.to_le_bytes());
    p.extend_from_slice(&queue_size.to_le_bytes());
    p.extend_from_slice(&[0; 4]);
    p
}

/// Allocates a fresh region; on failure answers with mmap_size 0, which
/// QEMU takes as "no inflight tracking".
fn get_inflight_fd(msg: &Message, slot: &Slot) -> Message {
    let Some((_, _, num_queues, queue_size)) = parse_inflight(&msg.payload) else {
        warn!("GET_INFLIGHT_FD with a {}-byte payload", msg.payload.len());
        return msg.reply(inflight_payload(0, 0, 0), Vec::new());
    };
    match Region::create(num_queues, queue_size) {
        Ok((region, file)) => {
            info!("inflight tracking: {num_queues} queues of {queue_size}");
            let size = region.len() as u64;
            slot.set(Some(Arc::new(region)));
            msg.reply(inflight_payload(size, num_queues, queue_size), vec![file])
        }
        Err(e) => {
            warn!("GET_INFLIGHT_FD: {e}");
            msg.reply(inflight_payload(0, num_queues, queue_size), Vec::new())
        }
    }
}

/// Maps the region the frontend kept; false (and no tracking) if unusable.
fn set_inflight_fd(msg: &Message, slot: &Slot) -> bool {
    let region = match (parse_inflight(&msg.payload), msg.fds.first()) {
        (Some((size, offset, queues, qsize)), Some(file)) if msg.fds.len() == 1 => {
            Region::open(file, offset, size, queues, qsize).map_err(|e| e.to_string())
        }
        _ => Err("SET_INFLIGHT_FD without one descriptor and a 24-byte payload".into()),
    };
    match region {
        Ok(region) => {
            debug!("inflight region of {} bytes set", region.len());
            slot.set(Some(Arc::new(region)));
            true
        }
        Err(e) => {
            warn!("inflight tracking off: {e}");
            slot.set(None);
            false
        }
    }
}
