//! QMP clients that attack the monitor on purpose: messages nested or sized
//! past QEMU's limits (checked against qemu-storage-daemon 7.2 with the same
//! client and checks), silent, stalled, trickling and non-reading clients
//! beside a well-behaved one, and hundreds of connections (threads and
//! descriptors counted in /proc before and after).

use anyhow::{ensure, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tests::daemon::{create_image, Daemon, ScratchDir};
use tests::qmp_client::wait_for_socket;
use tests::resources::{settled, threads_and_fds, wait_back_to};

const TIMEOUT: Duration = Duration::from_secs(30);
const AFTER: &[u8] = br#"{"execute":"query-version","id":"after"}"#;
const DEPTH_ERROR: &str =
    "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON nesting depth limit exceeded\"}}\r\n";

/// A raw QMP connection that reads replies as text: replies nested deeper
/// than a JSON library's default limit must still be readable.
struct Conn {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Conn {
    fn connect(path: &Path) -> Result<Conn> {
        let stream = UnixStream::connect(path).context("connect to QMP")?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Conn { stream, reader })
    }

    fn negotiated(path: &Path) -> Result<Conn> {
        let mut c = Conn::connect(path)?;
        let greeting = c.line()?.context("no greeting")?;
        ensure!(greeting.starts_with("{\"QMP\": "), "{greeting}");
        c.send(br#"{"execute":"qmp_capabilities"}"#)?;
        let r = c.line()?;
        ensure!(r.as_deref() == Some("{\"return\": {}}\r\n"), "{r:?}");
        Ok(c)
    }

    /// One message as sent, CRLF included; None at end of stream.
    fn line(&mut self) -> Result<Option<String>> {
        let mut raw = Vec::new();
        let n = self.reader.read_until(b'\n', &mut raw).context("read")?;
        Ok((n > 0).then(|| String::from_utf8_lossy(&raw).into_owned()))
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).context("write to QMP")
    }

    /// The messages received before the reply to [`AFTER`].
    fn until_after(&mut self) -> Result<Vec<String>> {
        let mut before = Vec::new();
        loop {
            let l = self.line()?.context("closed before the reply to 'after'")?;
            if l.ends_with("\"id\": \"after\"}\r\n") {
                return Ok(before);
            }
            before.push(l);
        }
    }
}

/// A query-version whose id nests `depth` levels, the command object
/// included (QEMU counts it too).
fn nested(depth: usize) -> (Vec<u8>, String) {
    let id = format!("{}{}", "[".repeat(depth - 1), "]".repeat(depth - 1));
    let msg = format!(r#"{{"execute":"query-version","id":{id}}}"#);
    (msg.into_bytes(), format!(", \"id\": {id}}}\r\n"))
}

fn check_nesting(path: &Path) -> Result<()> {
    let mut q = Conn::negotiated(path)?;
    // 129 and 200 are beyond serde_json's default limit; 1024 is QEMU's.
    for depth in [129, 200, 1024] {
        let (msg, id_tail) = nested(depth);
        q.send(&msg)?;
        let r = q.line()?.context("closed")?;
        ensure!(
            r.starts_with("{\"return\": {\"qemu\": ") && r.ends_with(&id_tail),
            "depth {depth}: {}",
            &r[..r.len().min(200)]
        );
    }
    let refused = [
        // One level too deep: refused, the next command is answered.
        nested(1025).0,
        // 100k open brackets, then QEMU's documented reset byte.
        [vec![b'['; 100_000], vec![0xFF]].concat(),
    ];
    for msg in refused {
        q.send(&msg)?;
        q.send(AFTER)?;
        let errors = q.until_after()?;
        ensure!(
            errors.first().map(String::as_str) == Some(DEPTH_ERROR),
            "{errors:?}"
        );
        ensure!(
            errors
                .iter()
                .all(|e| e
                    .starts_with("{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON ")),
            "{:?}",
            errors.iter().find(|e| !e.contains("JSON"))
        );
    }
    Ok(())
}

struct Vubd {
    daemon: Daemon,
    qmp: PathBuf,
    _dir: ScratchDir,
}

fn start_vubd(extra: &[&str]) -> Result<Vubd> {
    let dir = ScratchDir::new("qmp-hostile")?;
    let image = dir.join("disk.img");
    create_image(&image, 16 << 20)?;
    let qmp = dir.join("qmp.sock");
    let qmp_arg = qmp.to_string_lossy().into_owned();
    let mut args = vec!["--qmp", qmp_arg.as_str()];
    args.extend_from_slice(extra);
    let daemon = Daemon::vubd(&dir.join("vhost.sock"), &image, &args)?;
    wait_for_socket(&qmp, TIMEOUT)?;
    Ok(Vubd {
        daemon,
        qmp,
        _dir: dir,
    })
}

#[test]
fn nesting_limits_match_qemu() -> Result<()> {
    let v = start_vubd(&[])?;
    check_nesting(&v.qmp).context("vubd")?;
    let dir = ScratchDir::new("qmp-hostile-qsd")?;
    let image = dir.join("qsd.img");
    create_image(&image, 16 << 20)?;
    let qmp = dir.join("qsd-qmp.sock");
    let _qsd = Daemon::qsd_with_monitor(&dir.join("qsd-vhost.sock"), &qmp, &image, "", false)?;
    check_nesting(&qmp).context("qemu-storage-daemon")
}

#[test]
fn hundreds_of_connections_are_refused_beyond_the_limit_and_leak_nothing() -> Result<()> {
    const LIMIT: usize = 32;
    let v = start_vubd(&["--qmp-max-clients", "32"])?;
    let pid = v.daemon.pid();
    let base = settled(pid)?;
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..500 {
        let mut c = Conn::connect(&v.qmp)?;
        let first = c.line()?.context("no first line")?;
        if i < LIMIT {
            ensure!(first.starts_with("{\"QMP\": "), "client {i}: {first}");
        } else {
            ensure!(
                first
                    == "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Too many QMP clients\"}}\r\n",
                "client {i}: {first}"
            );
            ensure!(c.line()?.is_none(), "client {i} not closed");
            refused += 1;
        }
        held.push(c);
    }
    assert_eq!(refused, 500 - LIMIT);
    let (threads, fds) = threads_and_fds(pid)?;
    // Two threads per client; a few descriptors per client.
    ensure!(
        threads <= base.0 + 2 * LIMIT,
        "{threads} threads, {base:?} before"
    );
    ensure!(fds <= base.1 + 4 * LIMIT, "{fds} fds, {base:?} before");
    drop(held);
    wait_back_to(pid, base, TIMEOUT, "500 connections")?;
    let mut c = Conn::negotiated(&v.qmp)?;
    c.send(AFTER)?;
    ensure!(c.until_after()?.is_empty());
    drop(c);
    for i in 0..1000 {
        // The previous cycles' threads end asynchronously and may still
        // hold every slot for a moment: a refused connection is retried.
        let mut tries = 0;
        let mut c = loop {
            let mut c = Conn::connect(&v.qmp)?;
            if c.line()?.is_some_and(|g| g.starts_with("{\"QMP\"")) {
                break c;
            }
            tries += 1;
            ensure!(tries < 1000, "cycle {i}: no slot came back");
            std::thread::sleep(Duration::from_millis(5));
        };
        if i % 2 == 0 {
            c.send(br#"{"execute":"qmp_capabilities"}{"execute":"query-bl"#)?;
        }
    }
    wait_back_to(pid, base, TIMEOUT, "1000 connect/disconnect cycles")
}

#[test]
fn silent_stalled_trickling_and_deaf_clients_do_not_block_others() -> Result<()> {
    let v = start_vubd(&[])?;
    let _silent = UnixStream::connect(&v.qmp)?;
    let mut stalled = Conn::negotiated(&v.qmp)?;
    stalled.send(br#"{"execute":"query-ver"#)?;
    // Sends commands and never reads a reply: its queue and socket fill up.
    let mut deaf = Conn::negotiated(&v.qmp)?;
    deaf.stream
        .set_write_timeout(Some(Duration::from_secs(5)))?;
    let deaf_thread = std::thread::spawn(move || {
        let cmd = br#"{"execute":"query-block"}"#.repeat(100);
        for _ in 0..1000 {
            if deaf.send(&cmd).is_err() {
                break;
            }
        }
        deaf
    });
    // Sends its negotiation one byte at a time.
    let path = v.qmp.clone();
    let trickler = std::thread::spawn(move || -> Result<String> {
        let mut c = Conn::connect(&path)?;
        c.line()?;
        for b in br#"{"execute":"qmp_capabilities","id":1}"# {
            c.send(&[*b])?;
            std::thread::sleep(Duration::from_millis(200));
        }
        c.line()?.context("closed")
    });
    let mut good = Conn::negotiated(&v.qmp)?;
    for _ in 0..50 {
        good.send(AFTER)?;
        ensure!(good.until_after()?.is_empty());
    }
    let r = trickler.join().expect("trickler panicked")?;
    ensure!(r == "{\"return\": {}, \"id\": 1}\r\n", "{r}");
    stalled.send(b"sion\",\"id\":\"after\"}")?;
    ensure!(stalled.until_after()?.is_empty());
    drop(deaf_thread.join().expect("deaf client panicked"));
    good.send(AFTER)?;
    ensure!(good.until_after()?.is_empty());
    Ok(())
}
