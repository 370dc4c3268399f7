//! vubd's NBD server driven by stock clients (nbdinfo, nbdcopy, qemu-img,
//! qemu-nbd, qemu-io) over unix and TCP sockets, each check run against
//! qemu-storage-daemon 7.2 as well, on an identical image with a bitmap
//! made by the same QMP commands and the same guest-like writes: the
//! outputs must be equal. Then hostile clients on raw sockets, each
//! followed by a normal client that must still succeed.

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tests::client::Client;
use tests::daemon::{create_image, Daemon, ScratchDir};
use tests::qmp_client::QmpClient;
use tests::resources::{settled, threads_and_fds, wait_back_to};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(30);

/// A daemon (vubd or qemu-storage-daemon) with its QMP monitor, serving
/// `disk0` over vhost-user (for guest-like writes) and NBD.
struct Peer {
    daemon: Daemon,
    qmp: QmpClient,
    vhost: PathBuf,
    nbd: PathBuf,
    image: PathBuf,
    name: &'static str,
}

impl Peer {
    fn start(dir: &ScratchDir, qsd: bool, image_setup: &[&str]) -> Result<Peer> {
        let tag = if qsd { "qsd" } else { "vubd" };
        let image = dir.join(&format!("{tag}.img"));
        create_image(&image, SIZE)?;
        Peer::start_on(dir, qsd, image, image_setup, false)
    }

    /// As `start`, on an existing image, optionally read-only.
    fn start_on(
        dir: &ScratchDir,
        qsd: bool,
        image: PathBuf,
        image_setup: &[&str],
        readonly: bool,
    ) -> Result<Peer> {
        let tag = if qsd { "qsd" } else { "vubd" };
        if !image_setup.is_empty() {
            let mut c = Command::new("qemu-io");
            c.args(["-f", "raw"]);
            for cmd in image_setup {
                c.args(["-c", cmd]);
            }
            let out = c.arg(&image).output()?;
            ensure!(out.status.success(), "qemu-io setup failed: {out:?}");
        }
        let vhost = dir.join(&format!("{tag}-vhost.sock"));
        let qmp = dir.join(&format!("{tag}-qmp.sock"));
        let daemon = if qsd {
            let opts = format!(
                "discard=unmap,read-only={}",
                if readonly { "on" } else { "off" }
            );
            Daemon::qsd_with_monitor(&vhost, &qmp, &image, &opts, !readonly)?
        } else {
            let q = qmp.to_string_lossy().into_owned();
            let mut args = vec!["--qmp", &q];
            if readonly {
                args.push("--readonly");
            }
            Daemon::vubd(&vhost, &image, &args)?
        };
        let qmp = QmpClient::connect(&qmp, TIMEOUT)?;
        Ok(Peer {
            daemon,
            qmp,
            vhost,
            nbd: dir.join(&format!("{tag}-nbd.sock")),
            image,
            name: tag,
        })
    }

    fn start_unix_server(&mut self, extra: Value) -> Result<()> {
        let mut args = json!({"addr": {"type": "unix", "data": {"path": self.nbd}}});
        if let (Some(a), Some(e)) = (args.as_object_mut(), extra.as_object()) {
            a.extend(e.clone());
        }
        self.qmp.ok("nbd-server-start", args)?;
        Ok(())
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd.display())
    }
}

/// Runs a command, requires success, returns stdout with the peer's
/// socket path replaced by `SOCK` (so outputs of both peers compare).
fn run(peer: &Peer, program: &str, args: &[&str]) -> Result<String> {
    let out = tests::nbd_tools::run(program, args).with_context(|| peer.name)?;
    Ok(out.replace(&peer.nbd.display().to_string(), "SOCK"))
}

/// Guest-like writes through libblkio, then writes through NBD (qemu-io).
fn guest_and_nbd_writes(p: &Peer) -> Result<()> {
    let mut c = Client::connect(&p.vhost, 1, false)?;
    for (off, len, byte) in [
        (0u64, 512usize, 0x11u8),
        (65536 - 512, 4096, 0x22),
        (3 * MIB + 1024, 200 * 1024, 0x33),
        (40 * MIB, 4096, 0x44),
    ] {
        c.write(off, &vec![byte; len])?;
    }
    c.flush()?;
    drop(c);
    let uri = p.uri("backup");
    run(
        p,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 50M 8k",
            "-c",
            "write -z 52M 64k",
            "-c",
            "discard 54M 64k",
            "-c",
            "flush",
            &uri,
        ],
    )?;
    Ok(())
}

/// The stock clients' view of an export, normalised across peers.
fn observe(p: &Peer, dir: &ScratchDir) -> Result<Vec<(String, String)>> {
    let uri = p.uri("backup");
    let mut seen = Vec::new();
    let list = run(p, "nbdinfo", &["--list", &p.uri("")])?;
    // vubd does not offer NBD_FLAG_SEND_FAST_ZERO (see docs/nbd.md).
    let list: String = list
        .lines()
        .filter(|l| !l.contains("can_fast_zero"))
        .map(|l| format!("{l}\n"))
        .collect();
    seen.push(("nbdinfo --list".into(), list));
    seen.push(("nbdinfo --map".into(), run(p, "nbdinfo", &["--map", &uri])?));
    seen.push((
        "nbdinfo --map=qemu:dirty-bitmap:b0".into(),
        run(p, "nbdinfo", &["--map=qemu:dirty-bitmap:b0", &uri])?,
    ));
    seen.push((
        "qemu-img map".into(),
        run(p, "qemu-img", &["map", "--output=json", "-f", "raw", &uri])?,
    ));
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=backup,x-dirty-bitmap=qemu:dirty-bitmap:b0",
        p.nbd.display()
    );
    seen.push((
        "qemu-img map x-dirty-bitmap".into(),
        run(
            p,
            "qemu-img",
            &["map", "--output=json", "--image-opts", &opts],
        )?,
    ));
    let nbd_list = run(p, "qemu-nbd", &["--list", "-k", &p.nbd.to_string_lossy()])?;
    let nbd_list: String = nbd_list
        .lines()
        .map(|l| match l.trim_start().strip_prefix("flags:") {
            // The hex differs by the fast-zero bit; the named flags are compared.
            Some(f) => format!(
                "flags:{}\n",
                f.trim_start()
                    .replace(" fast-zero", "")
                    .split_once(' ')
                    .map_or("", |x| x.1)
            ),
            None => format!("{l}\n"),
        })
        .collect();
    seen.push(("qemu-nbd --list".into(), nbd_list));
    // Bytes: nbdcopy and qemu-img convert must reproduce the image file.
    let image = std::fs::read(&p.image)?;
    let copy = dir.join(&format!("{}-copy.raw", p.name));
    run(p, "nbdcopy", &[&uri, &copy.to_string_lossy()])?;
    ensure!(
        std::fs::read(&copy)? == image,
        "{}: nbdcopy output differs from the image",
        p.name
    );
    let conv = dir.join(&format!("{}-conv.raw", p.name));
    run(
        p,
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &uri,
            &conv.to_string_lossy(),
        ],
    )?;
    ensure!(
        std::fs::read(&conv)? == image,
        "{}: qemu-img convert output differs",
        p.name
    );
    run(
        p,
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &uri,
            &p.image.to_string_lossy(),
        ],
    )?;
    seen.push(("sha of the image".into(), format!("{:x}", crc(&image))));
    Ok(seen)
}

/// A cheap content fingerprint (the bytes are compared in full above).
fn crc(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The pull-backup read path with stock tools, against vubd and qsd.
#[test]
fn stock_clients_see_the_same_export_as_on_qemu() -> Result<()> {
    let dir = ScratchDir::new("nbd-stock")?;
    let setup = [
        "write -P 0xa5 0 1M",
        "write -P 1 10M 64k",
        "write -P 2 63M 1M",
    ];
    let mut results = Vec::new();
    for qsd in [false, true] {
        let mut p = Peer::start(&dir, qsd, &setup)?;
        p.qmp.ok(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b0"}),
        )?;
        p.start_unix_server(json!({}))?;
        p.qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "x0", "node-name": "disk0", "name": "backup",
                   "description": "pull backup", "writable": true,
                   "bitmaps": [{"node": "disk0", "name": "b0"}]}),
        )?;
        p.qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "x1", "node-name": "disk0", "name": "depth",
                   "allocation-depth": true}),
        )?;
        guest_and_nbd_writes(&p)?;
        let seen = observe(&p, &dir)?;
        let depth = run(
            &p,
            "nbdinfo",
            &["--map=qemu:allocation-depth", &p.uri("depth")],
        )?;
        results.push((seen, depth));
    }
    let (ours, theirs) = (&results[0], &results[1]);
    for ((what, a), (_, b)) in ours.0.iter().zip(&theirs.0) {
        assert_eq!(
            a, b,
            "{what}: vubd (left) and qemu-storage-daemon (right) differ"
        );
    }
    assert_eq!(ours.1, theirs.1, "qemu:allocation-depth differs");
    // The map must show the writes (a check that can fail on its own).
    let bitmap_map = &ours.0[2].1;
    assert!(
        bitmap_map.contains("52428800"),
        "NBD write not in b0: {bitmap_map}"
    );
    assert!(
        bitmap_map.contains("41943040       65536    1  dirty"),
        "{bitmap_map}"
    );
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The same export over TCP: nbdinfo and nbdcopy on both peers.
#[test]
fn inet_export_serves_stock_clients() -> Result<()> {
    let dir = ScratchDir::new("nbd-inet")?;
    let mut maps = Vec::new();
    for qsd in [false, true] {
        let mut p = Peer::start(&dir, qsd, &["write -P 0x77 5M 3M"])?;
        let port = free_port()?.to_string();
        p.qmp.ok(
            "nbd-server-start",
            json!({"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": port}}}),
        )?;
        p.qmp.ok("nbd-server-add", json!({"device": "disk0"}))?;
        let uri = format!("nbd://127.0.0.1:{port}/disk0");
        maps.push(run(&p, "nbdinfo", &["--map", &uri])?);
        let copy = dir.join(&format!("{}-inet.raw", p.name));
        run(&p, "nbdcopy", &[&uri, &copy.to_string_lossy()])?;
        ensure!(
            std::fs::read(&copy)? == std::fs::read(&p.image)?,
            "{}: copy differs",
            p.name
        );
        p.qmp.ok("nbd-server-stop", json!({}))?;
    }
    assert_eq!(maps[0], maps[1]);
    Ok(())
}

/// A raw NBD client for the hostile tests.
struct Raw(UnixStream);

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

impl Raw {
    fn connect(path: &Path) -> Result<Raw> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut r = Raw(s);
        let mut greeting = [0u8; 18];
        r.0.read_exact(&mut greeting)?;
        ensure!(&greeting[..8] == b"NBDMAGIC", "bad greeting");
        r.0.write_all(&3u32.to_be_bytes())?;
        Ok(r)
    }

    fn option(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m)?;
        Ok(())
    }

    /// Reads one option reply: (type, payload).
    fn reply(&mut self) -> Result<(u32, Vec<u8>)> {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h)?;
        let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data)?;
        Ok((kind, data))
    }

    /// NBD_OPT_GO on `name` (no structured replies): simple replies follow.
    fn go(path: &Path, name: &str) -> Result<Raw> {
        let mut r = Raw::connect(path)?;
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        r.option(7, &d)?;
        loop {
            let (kind, _) = r.reply()?;
            if kind == 1 {
                return Ok(r);
            }
            ensure!(kind == 3, "GO failed: reply {kind:#x}");
        }
    }

    fn request(&mut self, kind: u16, handle: u64, offset: u64, len: u32) -> Result<()> {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.0.write_all(&m)?;
        Ok(())
    }

    /// Reads a simple reply: (error, handle).
    fn simple_reply(&mut self) -> Result<(u32, u64)> {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h)?;
        ensure!(
            h[..4] == [0x67, 0x44, 0x66, 0x98],
            "not a simple reply: {h:?}"
        );
        let err = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let mut handle = [0u8; 8];
        handle.copy_from_slice(&h[8..]);
        Ok((err, u64::from_be_bytes(handle)))
    }

    /// True once the server has closed the connection.
    /// A server that closes with our bytes unread makes the kernel reset
    /// the connection: the first read then fails instead of returning 0.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.0.read(&mut b) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// A normal client still works and the daemon still answers QMP.
fn still_serving(p: &mut Peer) -> Result<()> {
    run(p, "nbdinfo", &["--map", &p.uri("disk0")])?;
    p.qmp.ok("query-block-exports", json!({}))?;
    Ok(())
}

fn vubd_with_export(dir: &ScratchDir, server_args: Value) -> Result<Peer> {
    let mut p = Peer::start(dir, false, &["write -P 3 0 1M"])?;
    p.start_unix_server(server_args)?;
    p.qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "x0", "node-name": "disk0"}),
    )?;
    Ok(p)
}

/// The same hostile clients against vubd and qemu-storage-daemon 7.2: the
/// same replies and disconnects.
#[test]
fn garbage_and_lying_lengths_get_errors_or_a_disconnect() -> Result<()> {
    let dir = ScratchDir::new("nbd-hostile")?;
    for qsd in [false, true] {
        let mut p = Peer::start(&dir, qsd, &["write -P 3 0 1M"])?;
        p.start_unix_server(json!({}))?;
        p.qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "x0", "node-name": "disk0"}),
        )?;
        hostile_clients(&mut p).with_context(|| p.name)?;
    }
    Ok(())
}

fn hostile_clients(p: &mut Peer) -> Result<()> {
    eprintln!("hostile NBD clients against {}", p.name);

    // Not the option magic.
    let mut r = Raw::connect(&p.nbd)?;
    r.0.write_all(b"GET / HTTP/1.1\r\n")?;
    assert!(r.closed(), "garbage magic: still connected");
    still_serving(p)?;

    // Unknown client flags.
    let mut s = UnixStream::connect(&p.nbd)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    s.write_all(&0xffff_fffcu32.to_be_bytes())?;
    assert!(Raw(s).closed(), "bad client flags: still connected");

    // An option announcing 4 GiB: closed. vubd first says why
    // (NBD_REP_ERR_TOO_BIG); qemu-storage-daemon 7.2 just closes.
    let mut r = Raw::connect(&p.nbd)?;
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&7u32.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    r.0.write_all(&m)?;
    if p.name == "vubd" {
        let (kind, _) = r.reply()?;
        assert_eq!(kind, 0x8000_0009, "oversized option: reply {kind:#x}");
    }
    assert!(r.closed(), "oversized option: still connected");
    still_serving(p)?;

    // GO whose name length runs past the option: an error, the session goes on.
    let mut r = Raw::connect(&p.nbd)?;
    r.option(7, &[0, 0, 0, 200, b'd'])?;
    assert_eq!(r.reply()?.0, 0x8000_0003);
    r.option(7, &[0, 0, 0, 5, b'd', b'i', b's', b'k', b'0', 0, 0])?;
    assert_eq!(r.reply()?.0, 3, "GO after a bad option");

    // Transmission: reads past the end, a huge length, a bad command.
    let mut r = Raw::go(&p.nbd, "disk0")?;
    r.request(0, 1, SIZE - 512, 4096)?;
    assert_eq!(r.simple_reply()?, (22, 1), "read past the end");
    r.request(0, 2, 0, u32::MAX)?;
    assert_eq!(r.simple_reply()?, (22, 2), "4 GiB read");
    r.request(0, 3, u64::MAX - 100, 512)?;
    assert_eq!(r.simple_reply()?, (22, 3), "offset overflow");
    r.request(99, 4, 0, 512)?;
    assert_eq!(r.simple_reply()?, (22, 4), "unknown command");
    r.request(1, 5, 0, 512)?;
    r.0.write_all(&[0u8; 512])?;
    // EPERM, as the NBD spec asks; qemu-storage-daemon 7.2 sends every
    // request error as EINVAL (see the next test).
    let eperm = if p.name == "vubd" { 1 } else { 22 };
    assert_eq!(r.simple_reply()?, (eperm, 5), "write on a read-only export");
    r.request(0, 6, 0, 4096)?;
    assert_eq!(r.simple_reply()?, (0, 6));
    let mut data = vec![0u8; 4096];
    r.0.read_exact(&mut data)?;
    assert!(data.iter().all(|&b| b == 3), "read returned wrong data");
    // A write announcing 64 MiB of payload: refused, connection closed.
    r.request(1, 7, 0, 64 << 20)?;
    assert_eq!(r.simple_reply()?, (22, 7));
    assert!(r.closed(), "oversized write: still connected");
    // Garbage instead of a request: vubd closes, as nothing after it can
    // be trusted to be framed right; qemu-storage-daemon 7.2 answers EINVAL
    // (to the handle read from the garbage) and reads on.
    let mut r = Raw::go(&p.nbd, "disk0")?;
    r.0.write_all(&[0xffu8; 28])?;
    if p.name == "vubd" {
        assert!(r.closed(), "garbage request: still connected");
    } else {
        assert_eq!(r.simple_reply()?, (22, u64::MAX), "garbage request");
    }
    still_serving(p)?;
    Ok(())
}

/// Writes past the end get ENOSPC (the NBD spec's SHOULD), WRITE with
/// its payload read and dropped, other requests EINVAL; the connection
/// goes on. qemu-storage-daemon 7.2 differs in the errno only: its
/// `nbd_co_receive_request` picks ENOSPC, but `nbd_trip` sends every
/// request error as EINVAL. Checked here so that a change on either side
/// shows.
#[test]
fn writes_past_the_end_get_enospc_where_qemu_sends_einval() -> Result<()> {
    let dir = ScratchDir::new("nbd-enospc")?;
    let mut seen = Vec::new();
    for qsd in [false, true] {
        let mut p = Peer::start(&dir, qsd, &["write -P 3 0 1M"])?;
        p.start_unix_server(json!({}))?;
        p.qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "x0", "node-name": "disk0", "writable": true}),
        )?;
        let mut r = Raw::go(&p.nbd, "disk0")?;
        let mut got = Vec::new();
        r.request(1, 1, SIZE - 4096, MIB as u32)?;
        r.0.write_all(&vec![9u8; MIB as usize])?;
        got.push(r.simple_reply()?);
        r.request(6, 2, SIZE, 4096)?;
        got.push(r.simple_reply()?);
        r.request(4, 3, SIZE - 512, 4096)?;
        got.push(r.simple_reply()?);
        r.request(0, 4, 0, 4096)?;
        got.push(r.simple_reply()?);
        let mut data = vec![0u8; 4096];
        r.0.read_exact(&mut data)?;
        ensure!(
            data.iter().all(|&b| b == 3),
            "{}: read returned wrong data",
            p.name
        );
        seen.push(got);
    }
    assert_eq!(seen[0], [(28, 1), (28, 2), (22, 3), (0, 4)], "vubd");
    assert_eq!(
        seen[1],
        [(22, 1), (22, 2), (22, 3), (0, 4)],
        "qemu-storage-daemon"
    );
    Ok(())
}

#[test]
fn connection_cap_and_a_client_that_stops_reading_block_no_one() -> Result<()> {
    let dir = ScratchDir::new("nbd-cap")?;
    let mut p = vubd_with_export(&dir, json!({"max-connections": 3}))?;
    // A client that asks for 8 x 32 MiB and never reads a byte of it.
    let mut stuck = Raw::go(&p.nbd, "disk0")?;
    for h in 0..8 {
        stuck.request(0, h, 0, 32 << 20)?;
    }
    let idle = Raw::go(&p.nbd, "disk0")?;
    // Two connections are taken; the third slot still serves.
    still_serving(&mut p)?;
    let third = Raw::go(&p.nbd, "disk0")?;
    // Over the cap: the server closes the connection at once.
    let over = UnixStream::connect(&p.nbd)?;
    over.set_read_timeout(Some(TIMEOUT))?;
    let mut b = [0u8; 18];
    let n = (&over).read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "a connection over max-connections got a greeting");
    drop(third);
    // Slots are given back when clients leave (asynchronously: retry).
    let mut ok = false;
    for _ in 0..100 {
        if run(&p, "nbdinfo", &["--size", &p.uri("disk0")]).is_ok() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "no slot came back after a client left");
    // Many connections at once: beyond the cap they are closed, the daemon lives.
    let many: Vec<UnixStream> = (0..200)
        .filter_map(|_| UnixStream::connect(&p.nbd).ok())
        .collect();
    drop(many);
    drop(idle);
    drop(stuck);
    let mut ok = false;
    for _ in 0..100 {
        if still_serving(&mut p).is_ok() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        ok,
        "the daemon stopped serving after a flood of connections"
    );
    Ok(())
}

#[test]
fn hundreds_of_connections_and_a_thousand_cycles_leak_nothing() -> Result<()> {
    const CAP: usize = 16;
    let dir = ScratchDir::new("nbd-many")?;
    let mut p = vubd_with_export(&dir, json!({"max-connections": CAP}))?;
    let pid = p.daemon.pid();
    let base = settled(pid)?;
    let mut held = Vec::new();
    for i in 0..300 {
        let mut s = UnixStream::connect(&p.nbd)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut g = [0u8; 18];
        if i < CAP {
            s.read_exact(&mut g)
                .with_context(|| format!("greeting of client {i}"))?;
        } else {
            let n = s.read(&mut g).unwrap_or(0);
            ensure!(n == 0, "client {i} over max-connections got {n} bytes");
        }
        held.push(s);
    }
    let (threads, fds) = threads_and_fds(pid)?;
    // One thread and a few descriptors per connection in its handshake.
    ensure!(
        threads <= base.0 + CAP,
        "{threads} threads, {base:?} before"
    );
    ensure!(fds <= base.1 + 4 * CAP, "{fds} fds, {base:?} before");
    drop(held);
    wait_back_to(pid, base, TIMEOUT, "300 connections")?;
    still_serving(&mut p)?;
    for i in 0..1000u32 {
        // The previous cycles' threads end asynchronously and may still
        // hold every slot for a moment: a refused connection is retried.
        let mut tries = 0;
        let mut s = loop {
            let mut s = UnixStream::connect(&p.nbd)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            let mut g = [0u8; 18];
            if s.read_exact(&mut g).is_ok() {
                break s;
            }
            tries += 1;
            ensure!(tries < 1000, "cycle {i}: no slot came back");
            std::thread::sleep(Duration::from_millis(5));
        };
        if i % 2 == 0 {
            // Garbage client flags: the server closes.
            let _ = s.write_all(&0xffff_fffcu32.to_be_bytes());
        }
    }
    wait_back_to(pid, base, TIMEOUT, "1000 connect/disconnect cycles")?;
    still_serving(&mut p)
}

/// A read-only disk: `block-export-add writable` is refused, the legacy
/// `nbd-server-add writable` quietly exports it read-only; as in QEMU.
#[test]
fn read_only_node_exports_match_qemu() -> Result<()> {
    let dir = ScratchDir::new("nbd-ro")?;
    let mut seen = Vec::new();
    for qsd in [false, true] {
        let image = dir.join(&format!("{}.img", if qsd { "qsd" } else { "vubd" }));
        create_image(&image, SIZE)?;
        let mut p = Peer::start_on(&dir, qsd, image, &[], true)?;
        p.start_unix_server(json!({}))?;
        let e = p.qmp.err(
            "block-export-add",
            json!({"type": "nbd", "id": "x0", "node-name": "disk0", "writable": true}),
        )?;
        p.qmp.ok(
            "nbd-server-add",
            json!({"device": "disk0", "writable": true}),
        )?;
        let info = run(&p, "nbdinfo", &[&p.uri("disk0")])?;
        let ro = info
            .lines()
            .find(|l| l.contains("is_read_only"))
            .unwrap_or("")
            .to_string();
        seen.push(format!("{}: {} / {ro}", e.class, e.desc));
    }
    assert_eq!(
        seen[0], seen[1],
        "vubd (left) vs qemu-storage-daemon (right)"
    );
    assert!(seen[0].contains("is_read_only: true"), "{}", seen[0]);
    Ok(())
}

/// SIGTERM with a client in transmission: the export goes, vubd exits 0.
#[test]
fn sigterm_with_a_client_attached_exits_cleanly() -> Result<()> {
    let dir = ScratchDir::new("nbd-term")?;
    let mut p = vubd_with_export(&dir, json!({}))?;
    let mut r = Raw::go(&p.nbd, "disk0")?;
    p.daemon.signal(libc::SIGTERM)?;
    let status = p.daemon.wait_exit(TIMEOUT)?;
    assert!(status.success(), "vubd exited with {status}");
    assert!(r.closed(), "the client was not disconnected");
    assert!(!p.nbd.exists(), "the NBD socket was left behind");
    Ok(())
}

#[test]
fn a_silent_client_is_dropped_after_the_handshake_timeout() -> Result<()> {
    let dir = ScratchDir::new("nbd-silent")?;
    let p = vubd_with_export(&dir, json!({}))?;
    let s = UnixStream::connect(&p.nbd)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut g = [0u8; 18];
    (&s).read_exact(&mut g)?;
    // Nothing more is sent: the server must hang up by itself.
    let mut b = [0u8; 1];
    let n = (&s).read(&mut b).unwrap_or(1);
    assert_eq!(n, 0, "a silent client was not dropped");
    Ok(())
}

/// QMP export management: the same commands, replies and events as qsd.
#[test]
fn export_commands_match_qemu() -> Result<()> {
    let dir = ScratchDir::new("nbd-qmp")?;
    let mut transcripts = Vec::new();
    for qsd in [false, true] {
        let mut p = Peer::start(&dir, qsd, &[])?;
        let mut t: Vec<String> = Vec::new();
        let mut step = |p: &mut Peer, cmd: &str, args: Value| -> Result<()> {
            let r = p.qmp.execute(cmd, args.clone())?;
            let r = match r {
                // qsd also lists its vhost-user-blk export (vubd's device is no export).
                Ok(Value::Array(list)) => format!(
                    "ok {:?}",
                    list.iter()
                        .filter(|e| e["type"] == "nbd")
                        .collect::<Vec<_>>()
                ),
                Ok(v) => format!("ok {v}"),
                Err(e) => format!("error {}: {}", e.class, e.desc),
            };
            let events: Vec<String> = p
                .qmp
                .take_events()?
                .iter()
                .map(|e| format!("{} {}", e["event"], e["data"]))
                .collect();
            t.push(format!("{cmd} {args} -> {r} {events:?}"));
            Ok(())
        };
        let x0 = json!({"type": "nbd", "id": "x0", "node-name": "disk0"});
        let addr = json!({"type": "unix", "data": {"path": p.nbd.clone()}});
        step(&mut p, "block-export-add", x0.clone())?;
        step(&mut p, "nbd-server-stop", json!({}))?;
        step(
            &mut p,
            "nbd-server-start",
            json!({"addr": addr, "tls-creds": "t"}),
        )?;
        step(
            &mut p,
            "nbd-server-start",
            json!({"addr": addr, "max-connections": -1}),
        )?;
        p.start_unix_server(json!({}))?;
        step(&mut p, "nbd-server-start", json!({"addr": addr}))?;
        step(
            &mut p,
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b0"}),
        )?;
        for args in [
            json!({"type": "nbd", "id": "x0", "node-name": "nope"}),
            json!({"type": "nbd", "id": "", "node-name": "disk0"}),
            json!({"type": "nbd", "id": "a b", "node-name": "disk0"}),
            json!({"type": "nbd", "id": "x0", "node-name": "disk0", "bitmaps": ["zz"]}),
            json!({"type": "nbd", "id": "x0", "node-name": "disk0", "bitmaps": [{"node": "nope", "name": "b0"}]}),
            json!({"type": "nbd", "id": "x0", "node-name": "disk0", "bitmaps": [{"node": "disk0", "name": "zz"}]}),
            json!({"type": "nbd", "id": "x0", "node-name": "disk0", "bitmaps": ["b0"]}),
            json!({"type": "nbd", "id": "x0", "node-name": "disk0", "bitmaps": ["b0"], "writable": true}),
            json!({"type": "nbd", "id": "x0", "node-name": "disk0", "name": "other"}),
            json!({"type": "nbd", "id": "x1", "node-name": "disk0"}),
            json!({"type": "nbd", "id": "x2", "node-name": "disk0", "name": "e2", "description": "d"}),
        ] {
            step(&mut p, "block-export-add", args)?;
        }
        step(
            &mut p,
            "block-dirty-bitmap-clear",
            json!({"node": "disk0", "name": "b0"}),
        )?;
        step(
            &mut p,
            "nbd-server-add",
            json!({"device": "disk0", "name": "legacy"}),
        )?;
        step(&mut p, "nbd-server-add", json!({"device": "nope"}))?;
        step(&mut p, "query-block-exports", json!({}))?;
        // A client in transmission keeps x0 in use.
        let held = Raw::go(&p.nbd, "disk0")?;
        step(&mut p, "block-export-del", json!({"id": "x0"}))?;
        step(&mut p, "block-export-del", json!({"id": "nope"}))?;
        // The event comes once the client is gone: before or after the
        // reply (QEMU's comes first, vubd's client thread may take longer).
        let r = p
            .qmp
            .execute("block-export-del", json!({"id": "x0", "mode": "hard"}))?;
        ensure!(r.is_ok(), "{}: hard delete: {r:?}", p.name);
        p.qmp
            .wait_event("BLOCK_EXPORT_DELETED", TIMEOUT, |d| d["id"] == "x0")?;
        drop(held);
        step(
            &mut p,
            "block-dirty-bitmap-clear",
            json!({"node": "disk0", "name": "b0"}),
        )?;
        step(&mut p, "nbd-server-remove", json!({"name": "legacy"}))?;
        step(&mut p, "nbd-server-remove", json!({"name": "zz"}))?;
        step(&mut p, "nbd-server-stop", json!({}))?;
        step(&mut p, "query-block-exports", json!({}))?;
        transcripts.push(t.join("\n").replace(&p.nbd.display().to_string(), "SOCK"));
    }
    assert_eq!(
        transcripts[0], transcripts[1],
        "vubd (left) vs qemu-storage-daemon (right)"
    );
    Ok(())
}

/// Writes `size` bytes of data to `path`, leaving every other `hole` bytes
/// unwritten (a hole) when `hole` is non-zero.
fn bench_image(path: &Path, size: u64, hole: u64) -> Result<()> {
    create_image(path, size)?;
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    let block = vec![0x5au8; 4 << 20];
    let mut off = 0u64;
    while off < size {
        let data = hole == 0 || (off / hole).is_multiple_of(2);
        if data {
            use std::io::Seek;
            f.seek(std::io::SeekFrom::Start(off))?;
            f.write_all(&block)?;
        }
        off += block.len() as u64;
    }
    Ok(())
}

/// A unix-socket proxy in front of a daemon's NBD socket, counting the
/// bytes the daemon sends to its clients (replies, data included).
struct CountingProxy {
    path: PathBuf,
    sent: Arc<AtomicU64>,
}

/// Counts what passes through to `w`.
struct Counting<W> {
    w: W,
    n: Arc<AtomicU64>,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(buf)?;
        self.n.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

impl CountingProxy {
    /// Listens on `path`, forwarding every connection to `upstream`.
    fn start(path: PathBuf, upstream: PathBuf) -> Result<CountingProxy> {
        let listener = std::os::unix::net::UnixListener::bind(&path)?;
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = UnixStream::connect(&upstream) else {
                    continue;
                };
                let (Ok(mut c_in), Ok(mut s_out)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                    let _ = s_out.shutdown(std::net::Shutdown::Write);
                });
                let n = counter.clone();
                std::thread::spawn(move || {
                    let mut s_in = server;
                    let mut out = Counting { w: client, n };
                    let _ = std::io::copy(&mut s_in, &mut out);
                    let _ = out.w.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Ok(CountingProxy { path, sent })
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.path.display())
    }
}

/// Holes are not transferred as data: `nbdcopy` of a half sparse export
/// (32 MiB of data in 4 MiB runs, 32 MiB of holes) receives little more
/// than the data, counted by a proxy between it and the daemon. vubd and
/// qemu-storage-daemon alike. (nbdcopy skips what `base:allocation` calls
/// a hole; a READ over zeroes gets hole chunks: both are taken out to see
/// this fail.)
#[test]
fn nbdcopy_of_a_sparse_export_receives_only_the_data() -> Result<()> {
    let dir = ScratchDir::new("nbd-sparse")?;
    let mut seen = Vec::new();
    for qsd in [false, true] {
        let tag = if qsd { "qsd" } else { "vubd" };
        let image = dir.join(&format!("{tag}.img"));
        bench_image(&image, SIZE, 4 * MIB)?;
        let mut p = Peer::start_on(&dir, qsd, image, &[], false)?;
        p.start_unix_server(json!({}))?;
        p.qmp.ok(
            "block-export-add",
            json!({"type": "nbd", "id": "x0", "node-name": "disk0"}),
        )?;
        let proxy = CountingProxy::start(dir.join(&format!("{tag}-proxy.sock")), p.nbd.clone())?;
        let out = Command::new("nbdcopy")
            .args([&proxy.uri("disk0"), "null:"])
            .output()?;
        ensure!(out.status.success(), "{tag}: nbdcopy failed: {out:?}");
        seen.push((tag, proxy.sent.load(Ordering::Relaxed)));
    }
    for (tag, sent) in seen {
        println!("{tag}: {sent} bytes sent for {} bytes of data", SIZE / 2);
        ensure!(
            (SIZE / 2..SIZE / 2 + MIB).contains(&sent),
            "{tag} sent {sent} bytes for {} bytes of data in a {SIZE}-byte export",
            SIZE / 2
        );
    }
    Ok(())
}

/// `nbdcopy` of a 1 GiB export on /dev/shm to `null:`, vubd and
/// qemu-storage-daemon alternated in one run, with the daemon's CPU time.
/// Prints figures, asserts nothing: `cargo test --release -p tests --test
/// nbd -- --ignored --nocapture nbdcopy_figures`.
#[test]
#[ignore]
fn nbdcopy_figures() -> Result<()> {
    let size = 1u64 << 30;
    let reps = 5;
    println!("image          daemon   median s   MiB/s   daemon CPU s (median)");
    for (label, hole) in [("fully written", 0u64), ("half sparse", 4u64 << 20)] {
        let dir = ScratchDir::new_in("/dev/shm", "nbd-bench")?;
        let mut peers = Vec::new();
        for qsd in [false, true] {
            let image = dir.join(&format!("{}.img", if qsd { "qsd" } else { "vubd" }));
            bench_image(&image, size, hole)?;
            let mut p = Peer::start_on(&dir, qsd, image, &[], false)?;
            p.start_unix_server(json!({}))?;
            p.qmp.ok(
                "block-export-add",
                json!({"type": "nbd", "id": "x0", "node-name": "disk0"}),
            )?;
            peers.push((p, Vec::new(), Vec::new()));
        }
        for _ in 0..reps {
            for (p, times, cpus) in peers.iter_mut() {
                let cpu0 = p.daemon.cpu_time()?;
                let t0 = std::time::Instant::now();
                run(p, "nbdcopy", &[&p.uri("disk0"), "null:"])?;
                times.push(t0.elapsed().as_secs_f64());
                cpus.push((p.daemon.cpu_time()? - cpu0).as_secs_f64());
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let mut figures = Vec::new();
        for (p, times, cpus) in peers.iter_mut() {
            let (t, c) = (median(times), median(cpus));
            println!(
                "{label:14} {:8} {t:9.3} {:7.0} {c:10.3}",
                p.name,
                1024.0 / t
            );
            figures.push(t);
        }
        println!("{label:14} vubd/qsd speed: {:.2}x", figures[1] / figures[0]);
    }
    Ok(())
}
