//! Unit tests of the client against vubd's own NBD server (on an
//! in-memory export source, a test double) and against scripted hostile
//! servers that run the real server handshake and then misbehave.

use super::conn::{Client, ClientOptions, Reply};
use super::{NbdImage, ServerAddress};
use crate::image::Image;
use crate::iobuf::IoBuf;
use crate::nbd::export::{ExportConfig, Exports};
use crate::nbd::handshake::negotiate;
use crate::nbd::proto::*;
use crate::nbd::server::{Address, NbdServer};
use crate::nbd::source::{Allocation, ExportSource, SourceError};
use crate::qmp::EventBus;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SIZE: u64 = 40 << 20;
const BLOCK: u64 = 4096;

/// Bytes in memory; a block is a hole until written with non-zero data.
struct Mem {
    data: Mutex<Vec<u8>>,
    /// Payload bytes written (WRITE only), to see what went as data.
    written: std::sync::atomic::AtomicU64,
}

impl Mem {
    fn new() -> Mem {
        Mem {
            data: Mutex::new(vec![0; SIZE as usize]),
            written: Default::default(),
        }
    }
    fn block_zero(d: &[u8], b: u64) -> bool {
        d[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize]
            .iter()
            .all(|&x| x == 0)
    }
}

impl ExportSource for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    fn writable(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn block_status(&self, offset: u64, _len: u64) -> Result<(Allocation, u64), SourceError> {
        let d = self.data.lock().unwrap();
        let first = offset / BLOCK;
        let zero = Mem::block_zero(&d, first);
        let run = (first..SIZE / BLOCK)
            .take_while(|&b| Mem::block_zero(&d, b) == zero)
            .count() as u64;
        let a = if zero {
            Allocation::Hole
        } else {
            Allocation::Data
        };
        Ok((a, run * BLOCK - offset % BLOCK))
    }
    fn write(&self, offset: u64, data: &mut [u8], _fua: bool) -> Result<(), SourceError> {
        self.written
            .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), SourceError> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), SourceError> {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

fn sock(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vubd-nbdc-{tag}-{}", std::process::id()))
}

/// vubd's server exporting `mem` as "e" on a unix socket.
fn serve(path: &Path, mem: &Arc<Mem>) -> NbdServer {
    let exports = Arc::new(Exports::new(EventBus::new()));
    exports.add(ExportConfig {
        id: "x".into(),
        name: "e".into(),
        description: None,
        node: "n".into(),
        writable: true,
        writethrough: false,
        allocation_depth: false,
        source: mem.clone(),
        bitmaps: Vec::new(),
        release: None,
    });
    NbdServer::start(
        &Address::Unix(path.to_path_buf()),
        exports,
        0,
        &crate::unix_socket::SocketOptions::default(),
    )
    .unwrap()
}

fn opts(path: &Path, delay: u64) -> ClientOptions {
    ClientOptions {
        addr: ServerAddress::Unix(path.to_path_buf()),
        export: "e".into(),
        reconnect_delay: Duration::from_secs(delay),
        request_timeout: None,
    }
}

#[test]
fn image_round_trip_on_vubd_server() {
    let path = sock("rt");
    let mem = Arc::new(Mem::new());
    let _srv = serve(&path, &mem);
    let img = NbdImage::connect(opts(&path, 0)).unwrap();
    assert_eq!(img.size(), SIZE);
    assert!(img.client().info().structured);
    assert!(img.client().info().base_allocation.is_some());
    assert_eq!(
        img.path().to_str().unwrap(),
        format!("nbd+unix:///e?socket={}", path.display())
    );
    // Two buffers, one write across them; read back into three.
    let mut a = vec![1u8; 5000];
    let mut b = vec![2u8; 3192];
    img.write_at(
        &[IoBuf::from_slice(&mut a), IoBuf::from_slice(&mut b)],
        4096,
        true,
    )
    .unwrap();
    let (mut x, mut y, mut z) = (vec![0u8; 100], vec![0u8; 8000], vec![9u8; 92]);
    img.read_at(
        &[
            IoBuf::from_slice(&mut x),
            IoBuf::from_slice(&mut y),
            IoBuf::from_slice(&mut z),
        ],
        4096,
    )
    .unwrap();
    let all: Vec<u8> = [x, y, z].concat();
    assert_eq!(&all[..5000], &[1u8; 5000][..]);
    assert_eq!(&all[5000..], &[2u8; 3192][..]);
    assert_eq!(img.allocation(0).unwrap(), (false, 4096));
    assert_eq!(img.allocation(4096).unwrap(), (true, 8192));
    assert_eq!(img.allocation(12288).unwrap(), (false, SIZE - 12288));
    img.write_zeroes(4096, 4096, true).unwrap();
    img.discard(8192, 4096).unwrap();
    img.flush().unwrap();
    assert_eq!(img.allocation(0).unwrap(), (false, SIZE));
    assert!(mem.data.lock().unwrap().iter().all(|&b| b == 0));
    // Out of range: refused locally, the connection stays usable.
    let mut c = vec![0u8; 4096];
    assert!(img.read_at(&[IoBuf::from_slice(&mut c)], SIZE).is_err());
    img.read_at(&[IoBuf::from_slice(&mut c)], 0).unwrap();
}

#[test]
fn large_transfer_splits_and_many_threads_share_the_connection() {
    let path = sock("par");
    let mem = Arc::new(Mem::new());
    let _srv = serve(&path, &mem);
    let img = Arc::new(NbdImage::connect(opts(&path, 0)).unwrap());
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                let mut buf = vec![t + 1; (SIZE / 8) as usize];
                let off = u64::from(t) * SIZE / 8;
                img.write_at(&[IoBuf::from_slice(&mut buf)], off, false)
                    .unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // One read of the whole disk: several pieces of max_block in flight.
    let mut all = vec![0u8; SIZE as usize];
    assert!(u64::from(img.client().info().max_block) < SIZE);
    img.read_at(&[IoBuf::from_slice(&mut all)], 0).unwrap();
    for (i, chunk) in all.chunks((SIZE / 8) as usize).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8 + 1), "chunk {i}");
    }
}

/// A server that runs vubd's handshake on each connection and then lets
/// `script` answer (connection number, stream).
fn hostile(path: &PathBuf, script: impl Fn(usize, UnixStream) + Send + 'static) {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let exports = Exports::new(EventBus::new());
        exports.add(ExportConfig {
            id: "x".into(),
            name: "e".into(),
            description: None,
            node: "n".into(),
            writable: true,
            writethrough: false,
            allocation_depth: false,
            source: Arc::new(Mem::new()),
            bitmaps: Vec::new(),
            release: None,
        });
        for (i, s) in l.incoming().enumerate() {
            let Ok(s) = s else { return };
            let deadline = Instant::now() + Duration::from_secs(60);
            let r = s.try_clone().unwrap();
            if negotiate(&r, &s, &exports, deadline, &|_| true)
                .ok()
                .flatten()
                .is_none()
            {
                continue;
            }
            script(i, s);
        }
    });
}

/// Reads one request header from the client.
fn read_request(s: &mut UnixStream) -> Request {
    let mut h = [0u8; REQUEST_LEN];
    s.read_exact(&mut h).unwrap();
    Request::parse(&h).unwrap()
}

fn hostile_reply(tag: &str, reply: fn(&Request) -> Vec<u8>) -> Result<Reply, u32> {
    let path = sock(tag);
    hostile(&path, move |_, mut s| {
        let req = read_request(&mut s);
        let _ = s.write_all(&reply(&req));
        // Keep the connection open: the client must not wait for more.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let c = Client::connect(opts(&path, 0)).unwrap();
    c.call(CMD_READ, 0, 0, 4096, None)
}

#[test]
fn garbage_from_the_server_fails_the_request_with_eio() {
    // Not a reply magic at all.
    assert_eq!(hostile_reply("garbage", |_| vec![0xab; 64]), Err(EIO));
    // A reply to a handle never sent.
    assert_eq!(
        hostile_reply("handle", |r| simple_reply(0, r.handle + 1).to_vec()),
        Err(EIO)
    );
    // A data chunk claiming 4 GiB: refused before anything is allocated.
    assert_eq!(
        hostile_reply("huge", |r| {
            chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, r.handle, u32::MAX).to_vec()
        }),
        Err(EIO)
    );
    // Data outside the range that was asked for.
    assert_eq!(
        hostile_reply("outside", |r| {
            let mut v =
                chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, r.handle, 8 + 16).to_vec();
            v.extend_from_slice(&(r.offset + 4090).to_be_bytes());
            v.extend_from_slice(&[1; 16]);
            v
        }),
        Err(EIO)
    );
    // A block status extent for a READ.
    assert_eq!(
        hostile_reply("bs", |r| {
            let p = block_status_payload(0, &[(4096, 0)]);
            let mut v = chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                r.handle,
                p.len() as u32,
            )
            .to_vec();
            v.extend(p);
            v
        }),
        Err(EIO)
    );
    // The server's own error is passed on.
    assert_eq!(
        hostile_reply("err", |r| {
            let p = error_payload(ENOSPC, "full");
            let mut v =
                chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, r.handle, p.len() as u32).to_vec();
            v.extend(p);
            v
        }),
        Err(ENOSPC)
    );
}

#[test]
fn request_in_flight_when_the_link_drops_is_resent_after_reconnect() {
    let path = sock("resend");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    hostile(&path, move |i, mut s| {
        let req = read_request(&mut s);
        if i == 0 {
            return; // The request was in flight: dropped unanswered.
        }
        let mut data = vec![0u8; req.len as usize];
        s.read_exact(&mut data).unwrap();
        seen2.lock().unwrap().push((i, req.handle, data[0]));
        s.write_all(&simple_reply(0, req.handle)).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    // Connection 0 takes the write and hangs up without a reply.
    let c = Client::connect(opts(&path, 30)).unwrap();
    assert_eq!(
        c.call(CMD_WRITE, 0, 0, 512, Some(vec![7; 512])),
        Ok(Reply::Done)
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].2, 7);
    assert_eq!(seen[0].0, 1);
}

#[test]
fn no_reconnect_delay_fails_at_once_and_for_good() {
    let path = sock("nodelay");
    hostile(&path, |_, _| {});
    let c = Client::connect(opts(&path, 0)).unwrap();
    // The server hung up after the handshake: with no delay, EIO.
    let r = c.call(CMD_READ, 0, 0, 512, None);
    assert_eq!(r, Err(EIO));
    assert_eq!(c.call(CMD_READ, 0, 0, 512, None), Err(EIO));
}

#[test]
fn server_restarted_within_the_delay_is_invisible_longer_outage_fails() {
    let path = sock("restart");
    let mem = Arc::new(Mem::new());
    let srv = serve(&path, &mem);
    let img = NbdImage::connect(opts(&path, 2)).unwrap();
    let mut buf = vec![5u8; 4096];
    img.write_at(&[IoBuf::from_slice(&mut buf)], 0, false)
        .unwrap();
    srv.stop();
    let mem2 = mem.clone();
    let path2 = path.clone();
    let restart = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        serve(&path2, &mem2)
    });
    // Issued while the server is down: waits for it and succeeds.
    let mut r = vec![0u8; 4096];
    img.read_at(&[IoBuf::from_slice(&mut r)], 0).unwrap();
    assert_eq!(r, buf);
    let srv = restart.join().unwrap();
    srv.stop();
    // Now down for good: requests fail after the delay, and new ones at once.
    assert!(img.read_at(&[IoBuf::from_slice(&mut r)], 0).is_err());
    assert!(img.flush().is_err());
}

/// Runs `f` on a thread and waits (bounded) for its result: a client that
/// hangs fails the test instead of hanging it.
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the client hung")
}

fn with_timeout(path: &Path, delay: u64, timeout_ms: u64) -> ClientOptions {
    ClientOptions {
        request_timeout: Some(Duration::from_millis(timeout_ms)),
        ..opts(path, delay)
    }
}

#[test]
fn a_server_that_stops_answering_is_left_and_the_request_resent() {
    let path = sock("hung");
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let conns2 = conns.clone();
    hostile(&path, move |i, mut s| {
        conns2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let req = read_request(&mut s);
        if i == 0 {
            // Hung with the connection up: reads on, never answers.
            std::thread::spawn(move || {
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            });
            return;
        }
        s.write_all(&simple_reply(0, req.handle)).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let c = Client::connect(with_timeout(&path, 30, 200)).unwrap();
    let r = within(move || c.call(CMD_FLUSH, 0, 0, 0, None));
    assert_eq!(r, Ok(Reply::Done));
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[test]
fn a_hung_server_with_no_reconnect_delay_fails_the_request() {
    let path = sock("hung0");
    hostile(&path, |_, mut s| {
        let _ = read_request(&mut s);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let c = Client::connect(with_timeout(&path, 0, 200)).unwrap();
    assert_eq!(within(move || c.call(CMD_FLUSH, 0, 0, 0, None)), Err(EIO));
}

#[test]
fn a_slow_server_that_keeps_sending_is_not_cut() {
    let path = sock("trickle");
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let conns2 = conns.clone();
    hostile(&path, move |_, mut s| {
        conns2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let req = read_request(&mut s);
        // 4 KiB of data in 16 pieces, 100 ms apart: 1.6 s in all, eight
        // times the time-out, but never 200 ms without a byte.
        let mut v = chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            req.handle,
            8 + 4096,
        )
        .to_vec();
        v.extend_from_slice(&req.offset.to_be_bytes());
        v.extend_from_slice(&[9; 4096]);
        for piece in v.chunks(v.len().div_ceil(16)) {
            std::thread::sleep(Duration::from_millis(100));
            s.write_all(piece).unwrap();
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let c = Client::connect(with_timeout(&path, 30, 200)).unwrap();
    let r = within(move || c.call(CMD_READ, 0, 0, 4096, None));
    assert_eq!(r, Ok(Reply::Data(vec![9; 4096])));
    assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
}
