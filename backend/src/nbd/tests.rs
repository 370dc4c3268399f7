//! Unit tests of the handshake and the transmission loop on in-memory
//! streams: an in-memory export source (a double: the interop tests use
//! the real disk) and the real dirty-bitmap engine.

use super::export::{ExportBitmap, ExportConfig, Exports};
use super::handshake::{negotiate, Context, Negotiated, MAX_OPTION};
use super::proto::*;
use super::server::{Address, NbdServer, Timeouts};
use super::source::{Allocation, ExportSource, SourceError};
use super::transmission::{serve, TimedRead};
use crate::dirty::{DirtyTracker, TrackerConfig};
use crate::qmp::{DirtyBitmaps, EventBus};
use crate::unix_socket::SocketOptions;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SIZE: u64 = 1 << 20;
const BLOCK: u64 = 4096;

/// Bytes in memory; a 4 KiB block is a hole until written.
struct MemSource {
    data: Mutex<(Vec<u8>, Vec<bool>)>,
    /// block_status calls (a READ must not make any: see `zero_runs`).
    status_calls: std::sync::atomic::AtomicUsize,
}

impl MemSource {
    fn new() -> MemSource {
        MemSource {
            data: Mutex::new((vec![0; SIZE as usize], vec![false; (SIZE / BLOCK) as usize])),
            status_calls: Default::default(),
        }
    }
}

impl ExportSource for MemSource {
    fn size(&self) -> u64 {
        SIZE
    }
    fn writable(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d.0[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn block_status(&self, offset: u64, _len: u64) -> Result<(Allocation, u64), SourceError> {
        self.status_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = self.data.lock().unwrap();
        let b = (offset / BLOCK) as usize;
        let alloc = d.1[b];
        let run = d.1[b..].iter().take_while(|&&a| a == alloc).count() as u64;
        let status = if alloc {
            Allocation::Data
        } else {
            Allocation::Hole
        };
        Ok((status, run * BLOCK - offset % BLOCK))
    }
    fn write(&self, offset: u64, data: &mut [u8], _fua: bool) -> Result<(), SourceError> {
        let mut d = self.data.lock().unwrap();
        d.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        for b in offset / BLOCK..(offset + data.len() as u64).div_ceil(BLOCK) {
            d.1[b as usize] = true;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), SourceError> {
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64) -> Result<(), SourceError> {
        Ok(())
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> Result<(), SourceError> {
        Ok(())
    }
}

fn exports(writable: bool) -> (Exports, Arc<DirtyTracker>) {
    let (e, t, _) = exports_with_source(writable);
    (e, t)
}

fn exports_with_source(writable: bool) -> (Exports, Arc<DirtyTracker>, Arc<MemSource>) {
    let tracker = Arc::new(DirtyTracker::open(TrackerConfig::new(SIZE)).unwrap());
    for name in ["b0", "b1"] {
        DirtyBitmaps::add(tracker.as_ref(), name, 65536, false, false).unwrap();
    }
    tracker.mark(65536 + 10, 100).unwrap();
    let e = Exports::new(EventBus::new());
    let source = Arc::new(MemSource::new());
    let mut block = vec![7u8; 8192];
    source.write(8192, &mut block, false).unwrap();
    let bitmaps = ["b0", "b1"]
        .iter()
        .map(|n| ExportBitmap {
            name: n.to_string(),
            engine: tracker.clone() as Arc<dyn DirtyBitmaps>,
        })
        .collect();
    e.add(ExportConfig {
        id: "x0".into(),
        name: "e".into(),
        description: None,
        node: "disk0".into(),
        writable,
        writethrough: false,
        allocation_depth: true,
        source: source.clone(),
        bitmaps,
        release: None,
    });
    (e, tracker, source)
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn meta_query(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (export.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Option replies in `out` after the 18-byte greeting: (option, type, payload).
fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    let mut rest = &out[18..];
    while rest.len() >= 20 {
        let len = be32(&rest[16..20]) as usize;
        v.push((
            be32(&rest[8..12]),
            be32(&rest[12..16]),
            rest[20..20 + len].to_vec(),
        ));
        rest = &rest[20 + len..];
    }
    v
}

fn run(e: &Exports, input: &[u8]) -> (Option<Negotiated>, Vec<u8>) {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let n = negotiate(input, &mut out, e, deadline, &|_| true).unwrap_or(None);
    (n, out)
}

fn names(replies: &[(u32, u32, Vec<u8>)]) -> Vec<String> {
    replies
        .iter()
        .filter(|r| r.1 == REP_META_CONTEXT)
        .map(|r| format!("{}={}", be32(&r.2[..4]), String::from_utf8_lossy(&r.2[4..])))
        .collect()
}

#[test]
fn prefix_queries_list_everything_under_them_and_select_nothing() {
    let (e, _t) = exports(true);
    let mut input = 3u32.to_be_bytes().to_vec();
    input.extend(option(OPT_STRUCTURED_REPLY, &[]));
    for q in ["qemu:", "qemu:dirty-bitmap:", "base:", "other:x"] {
        input.extend(option(OPT_LIST_META_CONTEXT, &meta_query("e", &[q])));
    }
    input.extend(option(OPT_LIST_META_CONTEXT, &meta_query("e", &[])));
    input.extend(option(
        OPT_SET_META_CONTEXT,
        &meta_query("e", &["qemu:", "qemu:dirty-bitmap:", "base:"]),
    ));
    let (n, out) = run(&e, &input);
    assert!(n.is_none(), "the client never sent GO");
    let r = replies(&out);
    let mut per_option = Vec::new();
    let mut cur = Vec::new();
    for x in &r {
        if x.1 == REP_ACK {
            per_option.push(names(&cur));
            cur.clear();
        } else {
            cur.push(x.clone());
        }
    }
    let all = [
        "0=qemu:allocation-depth",
        "0=qemu:dirty-bitmap:b0",
        "0=qemu:dirty-bitmap:b1",
    ];
    assert_eq!(per_option[1], all);
    assert_eq!(per_option[2], &all[1..]);
    assert_eq!(per_option[3], ["0=base:allocation"]);
    assert!(per_option[4].is_empty());
    assert_eq!(per_option[5][0], "0=base:allocation");
    assert_eq!(per_option[5][1..], all);
    assert!(
        per_option[6].is_empty(),
        "SET selected by prefix: {:?}",
        per_option[6]
    );
}

#[test]
fn go_enters_transmission_with_the_contexts_set_for_that_export() {
    let (e, _t) = exports(true);
    let mut input = 3u32.to_be_bytes().to_vec();
    // Before structured replies, meta contexts are refused.
    input.extend(option(
        OPT_SET_META_CONTEXT,
        &meta_query("e", &["base:allocation"]),
    ));
    input.extend(option(OPT_STRUCTURED_REPLY, &[]));
    input.extend(option(OPT_STRUCTURED_REPLY, &[]));
    input.extend(option(
        OPT_SET_META_CONTEXT,
        &meta_query("e", &["qemu:dirty-bitmap:b1", "base:allocation", "nope"]),
    ));
    input.extend(option(OPT_GO, &[0, 0, 0, 1, b'x', 0, 0]));
    input.extend(option(0x4242, &[]));
    input.extend(option(OPT_GO, &[0, 0, 0, 1, b'e', 0, 1, 0, 1]));
    let (n, out) = run(&e, &input);
    let n = n.expect("GO succeeded");
    assert!(n.structured);
    assert_eq!(n.contexts, [Context::BaseAllocation, Context::Bitmap(1)]);
    let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
    assert_eq!(
        kinds,
        [
            REP_ERR_INVALID,
            REP_ACK,
            REP_ERR_INVALID,
            REP_META_CONTEXT,
            REP_META_CONTEXT,
            REP_ACK,
            REP_ERR_UNKNOWN,
            REP_ERR_UNSUP,
            REP_INFO, // name
            REP_INFO, // block size
            REP_INFO, // export
            REP_ACK
        ]
    );
    let info = replies(&out);
    let export = &info[10].2;
    assert_eq!(be16(&export[..2]), INFO_EXPORT);
    assert_eq!(be64(&export[2..10]), SIZE);
    let flags = be16(&export[10..12]);
    assert_eq!(flags & TF_READ_ONLY, 0);
    assert_ne!(flags & TF_SEND_DF, 0);
    assert_eq!(&info[9].2[2..], &[0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0]);
}

/// In-memory requests have no time to run out.
impl TimedRead for &[u8] {
    fn set_deadline(&mut self, _: Option<Instant>) -> std::io::Result<()> {
        Ok(())
    }
}

const PAYLOAD: Duration = Duration::from_secs(60);

fn request(kind: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    Request {
        flags,
        kind,
        handle,
        offset,
        len,
    }
    .encode()
    .to_vec()
}

/// Structured chunks: (flags, type, handle, payload), grouped by handle
/// in handle order (replies of pipelined requests come in any order; the
/// chunks of one reply keep theirs).
fn chunks(mut rest: &[u8]) -> Vec<(u16, u16, u64, Vec<u8>)> {
    let mut v = Vec::new();
    while !rest.is_empty() {
        assert_eq!(be32(&rest[..4]), STRUCTURED_REPLY_MAGIC, "not a chunk");
        let len = be32(&rest[16..20]) as usize;
        v.push((
            be16(&rest[4..6]),
            be16(&rest[6..8]),
            be64(&rest[8..16]),
            rest[20..20 + len].to_vec(),
        ));
        rest = &rest[20 + len..];
    }
    v.sort_by_key(|c| c.2);
    v
}

/// Simple replies (handle, error, data) in handle order; `read_len`
/// gives the data length that follows a successful reply to a READ.
fn simple_replies(mut rest: &[u8], read_len: &[(u64, usize)]) -> Vec<(u64, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !rest.is_empty() {
        assert_eq!(be32(&rest[..4]), SIMPLE_REPLY_MAGIC, "not a simple reply");
        let (error, handle) = (be32(&rest[4..8]), be64(&rest[8..16]));
        let len = match read_len.iter().find(|(h, _)| *h == handle) {
            Some((_, n)) if error == 0 => *n,
            _ => 0,
        };
        v.push((handle, error, rest[16..16 + len].to_vec()));
        rest = &rest[16 + len..];
    }
    v.sort_by_key(|r| r.0);
    v
}

fn negotiated(e: &Exports, contexts: Vec<Context>) -> Negotiated {
    Negotiated {
        export: e.by_name("e").unwrap(),
        structured: true,
        contexts,
    }
}

#[test]
fn sparse_reads_and_block_status_chunks() {
    let (e, _t) = exports(false);
    let n = negotiated(&e, vec![Context::BaseAllocation, Context::Bitmap(0)]);
    let mut input = request(CMD_READ, 0, 1, 4096, 3 * 4096);
    input.extend(request(CMD_BLOCK_STATUS, 0, 2, 0, 256 << 10));
    input.extend(request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 3, 4096, 8192));
    input.extend(request(CMD_READ, CMD_FLAG_DF, 4, 0, 8192 + 16));
    input.extend(request(CMD_READ, 0, 5, SIZE - 4096, 8192));
    input.extend(request(CMD_DISC, 0, 6, 0, 0));
    let mut out = Vec::new();
    serve(&input[..], &mut out, &n, PAYLOAD).unwrap();
    let c = chunks(&out);
    // READ 4096+12288: hole, data (8192..16384), DONE on the last.
    assert_eq!((c[0].0, c[0].1, c[0].2), (0, REPLY_TYPE_OFFSET_HOLE, 1));
    assert_eq!(c[0].3, [0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 16, 0]);
    assert_eq!((c[1].0, c[1].1), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA));
    assert_eq!(be64(&c[1].3[..8]), 8192);
    assert!(c[1].3[8..].iter().all(|&b| b == 7) && c[1].3.len() == 8 + 8192);
    // BLOCK_STATUS: one chunk per context, DONE on the last.
    assert_eq!((c[2].0, c[2].1), (0, REPLY_TYPE_BLOCK_STATUS));
    assert_eq!(
        c[2].3,
        block_status_payload(0, &[(8192, 3), (8192, 0), ((256 << 10) - 16384, 3)])
    );
    assert_eq!(c[3].0, REPLY_FLAG_DONE);
    assert_eq!(
        c[3].3,
        block_status_payload(2, &[(65536, 0), (65536, STATE_DIRTY), (131072, 0)])
    );
    // REQ_ONE: a single extent per context.
    assert_eq!(c[4].3, block_status_payload(0, &[(4096, 3)]));
    assert_eq!(c[5].3, block_status_payload(2, &[(8192, 0)]));
    // DF: one data chunk.
    assert_eq!(
        (c[6].0, c[6].1, c[6].3.len()),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 8 + 8192 + 16)
    );
    // Past the end: an error chunk.
    assert_eq!(
        (c[7].0, c[7].1, c[7].2),
        (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 5)
    );
    assert_eq!(be32(&c[7].3[..4]), EINVAL);
    assert_eq!(c.len(), 8);
}

#[test]
fn writes_on_a_read_only_export_and_bad_flags_are_refused_in_step() {
    let (e, _t) = exports(false);
    let mut n = negotiated(&e, vec![]);
    n.structured = false;
    let mut input = request(CMD_WRITE, 0, 1, 0, 4);
    input.extend([1, 2, 3, 4]);
    input.extend(request(CMD_READ, CMD_FLAG_DF, 2, 0, 4));
    input.extend(request(CMD_BLOCK_STATUS, 0, 3, 0, 4096));
    input.extend(request(CMD_READ, 0, 4, 8192, 4));
    let mut out = Vec::new();
    serve(&input[..], &mut out, &n, PAYLOAD).unwrap();
    assert_eq!(
        simple_replies(&out, &[(4, 4)]),
        [
            (1, EPERM, vec![]),
            (2, EINVAL, vec![]), // DF without structured replies
            (3, EINVAL, vec![]), // no context negotiated
            (4, 0, vec![7, 7, 7, 7])
        ]
    );
}

/// Records whether GO's ACK was written before the client was attached.
struct AckProbe<'a> {
    attached: &'a std::cell::Cell<bool>,
    acked_unattached: bool,
}

impl std::io::Write for AckProbe<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf == option_reply(OPT_GO, REP_ACK, 0) && !self.attached.get() {
            self.acked_unattached = true;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Once a client has GO's ACK it may use the export, so a `safe`
/// block-export-del must see it from then on: the attach comes first.
#[test]
fn go_attaches_the_client_before_acknowledging() {
    let (e, _t) = exports(true);
    let mut input = 3u32.to_be_bytes().to_vec();
    input.extend(option(OPT_GO, &[0, 0, 0, 1, b'e', 0, 0]));
    let attached = std::cell::Cell::new(false);
    let mut probe = AckProbe {
        attached: &attached,
        acked_unattached: false,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let attach = |_: &Arc<super::export::Export>| {
        attached.set(true);
        true
    };
    let n = negotiate(&input[..], &mut probe, &e, deadline, &attach).unwrap();
    assert!(n.is_some() && attached.get());
    assert!(
        !probe.acked_unattached,
        "GO was acknowledged before the client was attached"
    );
}

/// A sparse READ finds its holes in the data: asking the source (lseek on
/// a file: on tmpfs a scan to the end of the data run) per READ made
/// nbdcopy of a written 1 GiB export cost 24 s of CPU.
#[test]
fn reads_do_not_ask_the_source_for_allocation() {
    let (e, _t, source) = exports_with_source(false);
    let n = negotiated(&e, vec![]);
    let mut input = request(CMD_READ, 0, 1, 0, 65536);
    input.extend(request(CMD_READ, 0, 2, 8192, 4096));
    let mut out = Vec::new();
    serve(&input[..], &mut out, &n, PAYLOAD).unwrap();
    assert_eq!(chunks(&out).len(), 4, "hole, data, hole; data");
    let calls = source
        .status_calls
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(calls, 0, "READ asked the source for allocation");
}

/// `safe` removal refuses an export with a client, `hard` disconnects the
/// client and the export goes (with its event) once the client has left.
#[test]
fn removal_waits_for_clients_and_emits_the_event_last() {
    use super::export::RemoveError;
    use super::server::Stream;
    let bus = EventBus::new();
    let (_sub, events) = bus.subscribe_channel(16);
    let e = Exports::new(bus);
    e.add(ExportConfig {
        id: "x0".into(),
        name: "e".into(),
        description: None,
        node: "disk0".into(),
        writable: false,
        writethrough: false,
        allocation_depth: false,
        source: Arc::new(MemSource::new()),
        bitmaps: Vec::new(),
        release: None,
    });
    let export = e.by_name("e").unwrap();
    let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    assert!(e.attach(&export, 7, Stream::Unix(ours)));
    assert_eq!(e.remove("x0", false), Err(RemoveError::InUse("x0".into())));
    assert_eq!(
        e.remove("nope", true),
        Err(RemoveError::NotFound("nope".into()))
    );
    e.remove("x0", true).unwrap();
    // The client's socket was shut down; the export waits for its thread.
    let mut b = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut theirs, &mut b).unwrap(), 0);
    assert!(e.by_name("e").is_none() && e.id_in_use("x0"));
    assert_eq!(
        e.remove("x0", true),
        Err(RemoveError::ShuttingDown("x0".into()))
    );
    assert!(events.try_recv().is_err(), "event before the client left");
    e.detach(7);
    let ev = events.try_recv().expect("BLOCK_EXPORT_DELETED");
    assert_eq!(ev.name, "BLOCK_EXPORT_DELETED");
    assert_eq!(ev.data, Some(serde_json::json!({"id": "x0"})));
    assert!(!e.id_in_use("x0"));
}

/// Client input in two parts, with `between` run once the first is used
/// up: the registry changes at an exact point of the negotiation.
struct Staged<F: FnMut()> {
    first: Vec<u8>,
    second: Vec<u8>,
    at: usize,
    between: Option<F>,
}

impl<F: FnMut()> Read for Staged<F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.at < self.first.len() {
            let n = (&self.first[self.at..]).read(buf)?;
            self.at += n;
            return Ok(n);
        }
        if let Some(mut f) = self.between.take() {
            f();
        }
        let n = (&self.second[self.at - self.first.len()..]).read(buf)?;
        self.at += n;
        Ok(n)
    }
}

/// Contexts are indices into the export's bitmaps: set for `e` (b0), then
/// `e` removed and re-added exporting b1 only; GO on the new `e` must not
/// carry id 2 over (it would report b1's bits as b0's). The NBD spec: a
/// negotiation for another export is void.
#[test]
fn contexts_set_for_a_replaced_export_are_void_at_go() {
    let (e, tracker) = exports(true);
    let mut first = 3u32.to_be_bytes().to_vec();
    first.extend(option(OPT_STRUCTURED_REPLY, &[]));
    first.extend(option(
        OPT_SET_META_CONTEXT,
        &meta_query("e", &["qemu:dirty-bitmap:b0"]),
    ));
    let second = option(OPT_GO, &[0, 0, 0, 1, b'e', 0, 0]);
    let replace = || {
        e.remove("x0", true).unwrap();
        e.add(ExportConfig {
            id: "x1".into(),
            name: "e".into(),
            description: None,
            node: "disk0".into(),
            writable: true,
            writethrough: false,
            allocation_depth: false,
            source: Arc::new(MemSource::new()),
            bitmaps: vec![ExportBitmap {
                name: "b1".into(),
                engine: tracker.clone() as Arc<dyn DirtyBitmaps>,
            }],
            release: None,
        });
    };
    let input = Staged {
        first,
        second,
        at: 0,
        between: Some(replace),
    };
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let n = negotiate(input, &mut out, &e, deadline, &|_| true)
        .unwrap()
        .expect("GO succeeded");
    assert_eq!(n.export.config.id, "x1");
    assert_eq!(n.contexts, [], "contexts of the removed export kept");
}

/// Refused WRITEs (read-only, past the end) have their payload skipped
/// and the connection goes on; writes past the end get ENOSPC as in QEMU
/// (the NBD spec's SHOULD), other requests past the end EINVAL.
#[test]
fn refused_writes_skip_their_payload_and_past_the_end_is_enospc() {
    let big = SIZE as u32;
    let (e, _t) = exports(false);
    let mut n = negotiated(&e, vec![]);
    n.structured = false;
    let mut input = request(CMD_WRITE, 0, 1, 0, big);
    input.extend(vec![9u8; big as usize]);
    input.extend(request(CMD_READ, 0, 2, 8192, 4));
    let mut out = Vec::new();
    serve(&input[..], &mut out, &n, PAYLOAD).unwrap();
    assert_eq!(
        simple_replies(&out, &[(2, 4)]),
        [(1, EPERM, vec![]), (2, 0, vec![7, 7, 7, 7])]
    );

    let (e, _t) = exports(true);
    let mut n = negotiated(&e, vec![]);
    n.structured = false;
    let mut input = request(CMD_WRITE, 0, 1, SIZE - 4096, big);
    input.extend(vec![9u8; big as usize]);
    input.extend(request(CMD_WRITE_ZEROES, 0, 2, SIZE, 1));
    input.extend(request(CMD_TRIM, 0, 3, SIZE, 1));
    input.extend(request(CMD_READ, 0, 4, SIZE - 4, 4));
    let mut out = Vec::new();
    serve(&input[..], &mut out, &n, PAYLOAD).unwrap();
    assert_eq!(
        simple_replies(&out, &[(4, 4)]),
        [
            (1, ENOSPC, vec![]),      // WRITE past the end
            (2, ENOSPC, vec![]),      // WRITE_ZEROES
            (3, EINVAL, vec![]),      // TRIM
            (4, 0, vec![0, 0, 0, 0])  // the refused write was not applied
        ]
    );
}

/// A server on a fresh unix socket path.
fn server(tag: &str, exports: &Arc<Exports>, timeouts: Timeouts) -> (NbdServer, PathBuf) {
    let path = std::env::temp_dir().join(format!("vubd-nbd-unit-{tag}-{}", std::process::id()));
    let s = NbdServer::start_with(
        &Address::Unix(path.clone()),
        exports.clone(),
        0,
        timeouts,
        &SocketOptions::default(),
    )
    .unwrap();
    (s, path)
}

/// Connects and sends the client flags; the greeting is read.
fn connect(path: &PathBuf) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

/// Connects and opens export `e` (simple replies).
fn go(path: &PathBuf) -> UnixStream {
    let mut s = connect(path);
    s.write_all(&option(OPT_GO, &[0, 0, 0, 1, b'e', 0, 0]))
        .unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let mut data = vec![0u8; be32(&h[16..20]) as usize];
        s.read_exact(&mut data).unwrap();
        match be32(&h[12..16]) {
            REP_ACK => return s,
            REP_INFO => {}
            k => panic!("GO failed: {k:#x}"),
        }
    }
}

/// True once the server has closed `s` (waits up to its read time-out).
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Waits (generously, against hangs only) for `f`.
fn wait_for(what: &str, f: impl Fn() -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A client trickling an option's bytes, each well within any per-read
/// time-out, is still dropped at the handshake's deadline: otherwise a
/// 64 KiB option at one byte per 9 s holds a connection for a week.
#[test]
fn the_handshake_deadline_covers_a_trickling_client() {
    let (e, _t) = exports(true);
    let e = Arc::new(e);
    let timeouts = Timeouts {
        handshake: Duration::from_secs(1),
        ..Timeouts::default()
    };
    let (srv, path) = server("trickle", &e, timeouts);
    let mut s = connect(&path);
    let mut head = IHAVEOPT.to_be_bytes().to_vec();
    head.extend(OPT_GO.to_be_bytes());
    head.extend(MAX_OPTION.to_be_bytes());
    s.write_all(&head).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // 300 bytes at one per ~100 ms: 30 s, far beyond the deadline.
    let dropped = (0..300).any(|_| s.write_all(&[0]).is_err() || closed(&mut s));
    assert!(
        dropped,
        "a trickling client outlived the handshake deadline"
    );
    wait_for("the connection to end", || srv.connections() == 0);
}

/// The deadline covers the handshake's replies too: a client sending
/// options but reading no reply is dropped at the deadline, not after each
/// blocked write's own time-out (a slow reader renews that one forever).
#[test]
fn the_handshake_deadline_covers_a_client_not_reading_replies() {
    let (e, _t) = exports(true);
    let e = Arc::new(e);
    let timeouts = Timeouts {
        handshake: Duration::from_secs(1),
        write: Duration::from_secs(600),
        ..Timeouts::default()
    };
    let (srv, path) = server("deaf", &e, timeouts);
    let mut s = connect(&path);
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    // Far more replies than the socket buffers hold, asked in one write.
    let lists: Vec<u8> = (0..20000).flat_map(|_| option(OPT_LIST, &[])).collect();
    // Fails once the server hangs up.
    let _ = s.write_all(&lists);
    wait_for("the connection to end", || srv.connections() == 0);
}

/// Once a WRITE header has come, its payload has a time limit: a client
/// stalling in it is dropped (it pinned a 32 MiB buffer), while another
/// client is served meanwhile.
#[test]
fn a_client_stalling_in_a_write_payload_is_dropped() {
    let (e, _t) = exports(true);
    let e = Arc::new(e);
    let timeouts = Timeouts {
        payload: Duration::from_secs(1),
        ..Timeouts::default()
    };
    let (srv, path) = server("stall", &e, timeouts);
    let mut staller = go(&path);
    staller
        .write_all(&request(CMD_WRITE, 0, 1, 0, 1 << 20))
        .unwrap();
    staller.write_all(&[1u8; 10]).unwrap();
    let mut other = go(&path);
    other.write_all(&request(CMD_READ, 0, 2, 8192, 4)).unwrap();
    let mut reply = [0u8; 20];
    other.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[..16], simple_reply(0, 2));
    assert_eq!(&reply[16..], [7, 7, 7, 7]);
    assert!(closed(&mut staller), "the stalled write was not dropped");
    drop(other);
    wait_for("the connections to end", || srv.connections() == 0);
}

/// Connection ids come from the registry, which outlives a server: a
/// client of an earlier server leaving must not detach a client of a
/// later one (it had the same id when each server counted from 0).
#[test]
fn connection_ids_are_not_reused_by_another_server() {
    use super::export::RemoveError;
    let (e, _t) = exports(true);
    let e = Arc::new(e);
    let (first, p1) = server("ids1", &e, Timeouts::default());
    let old = go(&p1);
    let (second, p2) = server("ids2", &e, Timeouts::default());
    let new = go(&p2);
    drop(old);
    wait_for("the old client to leave", || first.connections() == 0);
    assert_eq!(
        e.remove("x0", false),
        Err(RemoveError::InUse("x0".into())),
        "the remaining client was detached with the one that left"
    );
    drop(new);
    drop(second);
}

/// Test source: reads at offset 0 park until `out` holds a reply (or an
/// anti-hang limit passes); every other call goes to a [`MemSource`].
struct ParkingSource {
    inner: MemSource,
    out: Arc<Replies>,
}

/// What the server has written, shared with the test.
#[derive(Default)]
struct Replies {
    bytes: Mutex<Vec<u8>>,
    grew: std::sync::Condvar,
}

/// A writer into [`Replies`].
struct RepliesWriter(Arc<Replies>);

impl Write for RepliesWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.bytes.lock().unwrap().extend_from_slice(buf);
        self.0.grew.notify_all();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ExportSource for ParkingSource {
    fn size(&self) -> u64 {
        SIZE
    }
    fn writable(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        if offset == 0 {
            let end = Instant::now() + Duration::from_secs(20);
            let mut out = self.out.bytes.lock().unwrap();
            while out.is_empty() && Instant::now() < end {
                out = self
                    .out
                    .grew
                    .wait_timeout(out, Duration::from_secs(1))
                    .unwrap()
                    .0;
            }
        }
        self.inner.read(offset, buf)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<(Allocation, u64), SourceError> {
        self.inner.block_status(offset, len)
    }
    fn write(&self, offset: u64, data: &mut [u8], fua: bool) -> Result<(), SourceError> {
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> Result<(), SourceError> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), SourceError> {
        self.inner.write_zeroes(offset, len, unmap)
    }
}

/// Exports `source` as `e` (read-only, no bitmaps).
fn export_of(source: Arc<dyn ExportSource>) -> Exports {
    let e = Exports::new(EventBus::new());
    e.add(ExportConfig {
        id: "x0".into(),
        name: "e".into(),
        description: None,
        node: "disk0".into(),
        writable: false,
        writethrough: false,
        allocation_depth: false,
        source,
        bitmaps: Vec::new(),
        release: None,
    });
    e
}

/// Requests of one connection run concurrently: while a READ is parked
/// in the source, the next request on the same connection is answered;
/// DISC still waits for the parked one's reply.
#[test]
fn a_parked_read_does_not_hold_up_the_next_request() {
    let out = Arc::new(Replies::default());
    let source = ParkingSource {
        inner: MemSource::new(),
        out: out.clone(),
    };
    let mut data = vec![7u8; 4096];
    source.inner.write(8192, &mut data, false).unwrap();
    let e = export_of(Arc::new(source));
    let mut n = negotiated(&e, vec![]);
    n.structured = false;
    let mut input = request(CMD_READ, 0, 1, 0, 4);
    input.extend(request(CMD_READ, 0, 2, 8192, 4));
    input.extend(request(CMD_DISC, 0, 3, 0, 0));
    serve(&input[..], RepliesWriter(out.clone()), &n, PAYLOAD).unwrap();
    let out = out.bytes.lock().unwrap();
    assert_eq!(
        be64(&out[8..16]),
        2,
        "the second request waited for the parked one"
    );
    assert_eq!(
        simple_replies(&out, &[(1, 4), (2, 4)]),
        [(1, 0, vec![0; 4]), (2, 0, vec![7; 4])],
        "DISC did not wait for the request in flight"
    );
}

/// A large source of zeroes counting its reads.
struct ZeroSource {
    reads: std::sync::atomic::AtomicUsize,
}

impl ExportSource for ZeroSource {
    fn size(&self) -> u64 {
        1 << 40
    }
    fn writable(&self) -> bool {
        false
    }
    fn read(&self, _offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        buf.fill(0);
        Ok(())
    }
    fn block_status(&self, _offset: u64, len: u64) -> Result<(Allocation, u64), SourceError> {
        Ok((Allocation::Hole, len))
    }
    fn write(&self, _offset: u64, _data: &mut [u8], _fua: bool) -> Result<(), SourceError> {
        Err(SourceError::ReadOnly)
    }
    fn flush(&self) -> Result<(), SourceError> {
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64) -> Result<(), SourceError> {
        Err(SourceError::ReadOnly)
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> Result<(), SourceError> {
        Err(SourceError::ReadOnly)
    }
}

/// A client that takes no reply: every write fails, as the server's
/// writer does once its time-out has passed.
struct Deaf;

impl Write for Deaf {
    fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::TimedOut.into())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Requests as bytes, counting how many were taken.
struct Counted<'a> {
    data: &'a [u8],
    taken: usize,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.data.read(buf)?;
        self.taken += n;
        Ok(n)
    }
}

impl TimedRead for Counted<'_> {
    fn set_deadline(&mut self, _: Option<Instant>) -> std::io::Result<()> {
        Ok(())
    }
}

/// A client pipelining hundreds of 32 MiB READs and reading no reply
/// gets one READ run: the second would pass the per-connection byte cap,
/// so the reader waits, and the failed reply ends the connection. Without
/// the cap, every header would be taken and the workers would each hold
/// 32 MiB.
#[test]
fn a_client_not_reading_replies_gets_no_more_than_the_byte_cap() {
    let source = Arc::new(ZeroSource {
        reads: Default::default(),
    });
    let e = export_of(source.clone());
    let n = negotiated(&e, vec![]);
    let input: Vec<u8> = (0..200)
        .flat_map(|h| request(CMD_READ, 0, h, h << 25, MAX_PAYLOAD))
        .collect();
    let mut r = Counted {
        data: &input,
        taken: 0,
    };
    let served = serve(&mut r, Deaf, &n, PAYLOAD);
    assert!(
        served.is_err(),
        "the failed reply did not end the connection"
    );
    assert_eq!(
        source.reads.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "READs beyond the byte cap were run"
    );
    assert_eq!(r.taken, 2 * REQUEST_LEN, "requests read past the cap");
}
