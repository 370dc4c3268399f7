//! Tests of the command layer and of the socket server, against an
//! in-process context with an in-memory bitmap double (the real engine is
//! tested with the daemon in tests/tests/qmp.rs).

use super::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
struct MemBitmaps {
    // Newest last; list() reverses.
    maps: Mutex<Vec<(BitmapInfo, Vec<u64>)>>,
}

impl MemBitmaps {
    fn with<R>(
        &self,
        name: &str,
        f: impl FnOnce(&mut (BitmapInfo, Vec<u64>)) -> R,
    ) -> Result<R, BitmapOpError> {
        let mut maps = self.maps.lock().unwrap();
        let e = maps
            .iter_mut()
            .find(|(i, _)| i.name == name)
            .ok_or_else(|| BitmapOpError::NotFound(name.into()))?;
        if e.0.busy {
            return Err(BitmapOpError::Busy(name.into()));
        }
        Ok(f(e))
    }

    /// Marks chunk `chunk` dirty, as a guest write would.
    fn mark(&self, name: &str, chunk: u64) {
        self.with(name, |(i, bits)| {
            if !bits.contains(&chunk) {
                bits.push(chunk);
                i.count += i.granularity;
            }
        })
        .unwrap();
    }
}

impl DirtyBitmaps for MemBitmaps {
    fn add(
        &self,
        name: &str,
        granularity: u64,
        persistent: bool,
        disabled: bool,
    ) -> Result<(), BitmapOpError> {
        let mut maps = self.maps.lock().unwrap();
        if maps.iter().any(|(i, _)| i.name == name) {
            return Err(BitmapOpError::AlreadyExists(name.into()));
        }
        maps.push((
            BitmapInfo {
                name: name.into(),
                granularity,
                count: 0,
                recording: !disabled,
                busy: false,
                persistent,
                inconsistent: false,
            },
            Vec::new(),
        ));
        Ok(())
    }
    fn remove(&self, name: &str) -> Result<(), BitmapOpError> {
        self.with(name, |_| ())?;
        self.maps.lock().unwrap().retain(|(i, _)| i.name != name);
        Ok(())
    }
    fn clear(&self, name: &str) -> Result<(), BitmapOpError> {
        self.with(name, |(i, bits)| {
            bits.clear();
            i.count = 0;
        })
    }
    fn enable(&self, name: &str) -> Result<(), BitmapOpError> {
        self.with(name, |(i, _)| i.recording = true)
    }
    fn disable(&self, name: &str) -> Result<(), BitmapOpError> {
        self.with(name, |(i, _)| i.recording = false)
    }
    fn merge(&self, target: &str, sources: &[String]) -> Result<(), BitmapOpError> {
        let mut all = Vec::new();
        for s in sources {
            all.extend(self.with(s, |(_, bits)| bits.clone())?);
        }
        self.with(target, |(i, bits)| {
            for c in all {
                if !bits.contains(&c) {
                    bits.push(c);
                    i.count += i.granularity;
                }
            }
        })
    }
    fn sha256(&self, name: &str) -> Result<String, BitmapOpError> {
        // A stand-in digest: distinct per set of dirty chunks.
        self.with(name, |(_, bits)| {
            let mut b = bits.clone();
            b.sort_unstable();
            format!(
                "{:064x}",
                b.iter()
                    .fold(17u64, |h, c| h.wrapping_mul(31).wrapping_add(*c + 1))
            )
        })
    }
    fn list(&self) -> Vec<BitmapInfo> {
        self.maps
            .lock()
            .unwrap()
            .iter()
            .rev()
            .map(|(i, _)| i.clone())
            .collect()
    }
}

struct TestCtx {
    image: PathBuf,
    bitmaps: Arc<MemBitmaps>,
    quits: AtomicUsize,
}

impl ManagementContext for TestCtx {
    fn node_name(&self) -> String {
        "disk0".into()
    }
    fn disk_info(&self) -> DiskInfo {
        DiskInfo {
            image: self.image.clone(),
            size: 64 << 20,
            read_only: false,
            direct: true,
            writeback: true,
        }
    }
    fn bitmaps(&self) -> Option<Arc<dyn DirtyBitmaps>> {
        Some(self.bitmaps.clone())
    }
    fn quit(&self) {
        self.quits.fetch_add(1, Ordering::SeqCst);
    }
}

struct Fixture {
    dir: PathBuf,
    ctx: Arc<TestCtx>,
    dispatcher: Arc<Dispatcher>,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("vubd-qmp-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(64 << 20).unwrap();
        let ctx = Arc::new(TestCtx {
            image,
            bitmaps: Arc::new(MemBitmaps::default()),
            quits: AtomicUsize::new(0),
        });
        let dispatcher = standard_dispatcher(ctx.clone(), EventBus::new());
        Fixture {
            dir,
            ctx,
            dispatcher,
        }
    }

    fn exec(&self, name: &str, args: Value) -> Result<Value, String> {
        let Value::Object(m) = args else {
            panic!("args")
        };
        self.dispatcher.execute(name, m).map_err(|e| e.desc)
    }

    fn server(&self, config: ServerConfig) -> QmpServer {
        QmpServer::start(&self.dir.join("qmp.sock"), self.dispatcher.clone(), config).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn bitmap_commands_and_errors() {
    let fx = Fixture::new("cmds");
    let ok = json!({});
    assert_eq!(
        fx.exec(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b1"})
        ),
        Ok(ok.clone())
    );
    let cases = [
        (
            json!({"node": "disk0", "name": "b1"}),
            "Bitmap already exists: b1",
        ),
        (
            json!({"node": "nod", "name": "b2"}),
            "Cannot find device='nod' nor node-name='nod'",
        ),
        (json!({"node": "disk0"}), "Parameter 'name' is missing"),
        (json!({"name": "x"}), "Parameter 'node' is missing"),
        (
            json!({"node": "disk0", "name": 5}),
            "Invalid parameter type for 'name', expected: string",
        ),
        (
            json!({"node": "disk0", "name": "b2", "granularity": 1000}),
            "Granularity must be power of 2 and at least 512",
        ),
        (
            json!({"node": "disk0", "name": "b2", "granularity": 256}),
            "Granularity must be power of 2 and at least 512",
        ),
        (
            json!({"node": "disk0", "name": "b2", "granularity": 134217728}),
            "Granularity exceeds maximum (67108864 bytes)",
        ),
        (
            json!({"node": "disk0", "name": "b2", "granularity": "x"}),
            "Parameter 'granularity' expects uint64",
        ),
        (
            json!({"node": "disk0", "name": "b2", "granularity": -1}),
            "Parameter 'granularity' expects uint32_t",
        ),
        (
            json!({"node": "disk0", "name": "b2", "persistent": "yes"}),
            "Invalid parameter type for 'persistent', expected: boolean",
        ),
        (
            json!({"node": "disk0", "name": "b2", "extra": 1}),
            "Parameter 'extra' is unexpected",
        ),
        (
            json!({"node": "disk0", "name": ""}),
            "Bitmap name cannot be empty",
        ),
    ];
    for (args, want) in cases {
        assert_eq!(
            fx.exec("block-dirty-bitmap-add", args.clone()),
            Err(want.to_string()),
            "{args}"
        );
    }
    let long = "x".repeat(1024);
    assert_eq!(
        fx.exec(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": long})
        ),
        Err(format!("Bitmap name too long: {long}"))
    );
    for g in [512u64, 65536, 67108864] {
        let name = format!("g{g}");
        let args = json!({"node": "disk0", "name": name, "granularity": g, "persistent": true, "disabled": true});
        assert_eq!(fx.exec("block-dirty-bitmap-add", args), Ok(ok.clone()));
    }
    let blocks = fx.exec("query-block", json!({})).unwrap();
    let maps = blocks[0]["inserted"]["dirty-bitmaps"]
        .as_array()
        .unwrap()
        .clone();
    let names: Vec<&str> = maps.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["g67108864", "g65536", "g512", "b1"], "newest first");
    assert_eq!(
        maps[3],
        json!({"name": "b1", "count": 0, "granularity": 65536, "recording": true, "busy": false, "persistent": false, "inconsistent": false})
    );
    assert_eq!(maps[2]["recording"], false);
    assert_eq!(maps[2]["persistent"], true);

    fx.ctx.bitmaps.mark("g512", 3);
    fx.ctx.bitmaps.mark("g512", 9);
    let merge = |args: Value| fx.exec("block-dirty-bitmap-merge", args);
    assert_eq!(
        merge(
            json!({"node": "disk0", "target": "b1", "bitmaps": ["g512", {"node": "disk0", "name": "g512"}]})
        ),
        Ok(ok.clone())
    );
    let count = |name: &str| {
        let b = fx.exec("query-block", json!({})).unwrap();
        let maps = b[0]["inserted"]["dirty-bitmaps"]
            .as_array()
            .unwrap()
            .clone();
        maps.iter()
            .find(|m| m["name"] == name)
            .map(|m| m["count"].as_u64().unwrap())
    };
    assert_eq!(count("b1"), Some(2 * 65536));
    let sha = |name: &str| {
        fx.exec(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "disk0", "name": name}),
        )
    };
    assert_eq!(sha("b1").unwrap()["sha256"], sha("g512").unwrap()["sha256"]);
    for (args, want) in [
        (
            json!({"node": "disk0", "target": "b1", "bitmaps": ["zz"]}),
            "Dirty bitmap 'zz' not found",
        ),
        (
            json!({"node": "disk0", "target": "zz", "bitmaps": [{"node": "nonode", "name": "b1"}]}),
            "Dirty bitmap 'zz' not found",
        ),
        (
            json!({"node": "disk0", "target": "b1", "bitmaps": [{"node": "nonode", "name": "b3"}]}),
            "Node 'nonode' not found",
        ),
        (
            json!({"node": "x", "target": "b1", "bitmaps": []}),
            "Node 'x' not found",
        ),
        (
            json!({"node": "disk0", "target": "b1", "bitmaps": [{"node": "disk0"}]}),
            "Parameter 'bitmaps[0].name' is missing",
        ),
        (
            json!({"node": "disk0", "target": "b1", "bitmaps": [{"node": "disk0", "name": "b", "x": 1}]}),
            "Parameter 'bitmaps[0].x' is unexpected",
        ),
        (
            json!({"node": "disk0", "target": "b1", "bitmaps": ["g512", 5]}),
            "Invalid parameter type for 'bitmaps[1]', expected: BlockDirtyBitmapOrStr",
        ),
        (
            json!({"node": "disk0", "target": "b1", "bitmaps": "b3"}),
            "Invalid parameter type for 'bitmaps', expected: array",
        ),
    ] {
        assert_eq!(merge(args.clone()), Err(want.to_string()), "{args}");
    }
    assert_eq!(
        merge(json!({"node": "disk0", "target": "b1", "bitmaps": []})),
        Ok(ok.clone())
    );

    for cmd in [
        "block-dirty-bitmap-disable",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-clear",
        "x-debug-block-dirty-bitmap-sha256",
        "block-dirty-bitmap-remove",
    ] {
        assert_eq!(
            fx.exec(cmd, json!({"node": "disk0", "name": "zz"})),
            Err("Dirty bitmap 'zz' not found".into()),
            "{cmd}"
        );
        assert_eq!(
            fx.exec(cmd, json!({"node": "zz", "name": "b1"})),
            Err("Node 'zz' not found".into()),
            "{cmd}"
        );
        assert_eq!(
            fx.exec(cmd, json!({"node": "disk0"})),
            Err("Parameter 'name' is missing".into()),
            "{cmd}"
        );
    }
    assert_eq!(
        fx.exec(
            "block-dirty-bitmap-disable",
            json!({"node": "disk0", "name": "b1"})
        ),
        Ok(ok.clone())
    );
    assert_eq!(count("b1"), Some(2 * 65536));
    let rec = |name: &str| {
        let b = fx.exec("query-block", json!({})).unwrap();
        b[0]["inserted"]["dirty-bitmaps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .map(|m| m["recording"].clone())
    };
    assert_eq!(rec("b1"), Some(json!(false)));
    assert_eq!(
        fx.exec(
            "block-dirty-bitmap-enable",
            json!({"node": "disk0", "name": "b1"})
        ),
        Ok(ok.clone())
    );
    assert_eq!(rec("b1"), Some(json!(true)));
    assert_eq!(
        fx.exec(
            "block-dirty-bitmap-clear",
            json!({"node": "disk0", "name": "b1"})
        ),
        Ok(ok.clone())
    );
    assert_eq!(count("b1"), Some(0));
    assert_ne!(sha("b1").unwrap()["sha256"], sha("g512").unwrap()["sha256"]);
    assert_eq!(
        fx.exec(
            "block-dirty-bitmap-remove",
            json!({"node": "disk0", "name": "b1"})
        ),
        Ok(ok.clone())
    );
    assert_eq!(count("b1"), None);

    // A refusal from the engine is passed through in its QEMU wording.
    fx.ctx.bitmaps.maps.lock().unwrap()[0].0.busy = true;
    assert_eq!(
        fx.exec(
            "block-dirty-bitmap-clear",
            json!({"node": "disk0", "name": "g512"})
        ),
        Err("Bitmap 'g512' is currently in use by another operation and cannot be used".into())
    );
}

#[test]
fn query_block_shape() {
    let fx = Fixture::new("qb");
    let b = fx.exec("query-block", json!({})).unwrap();
    let image = fx.ctx.image.to_string_lossy().to_string();
    let mut inserted = b[0]["inserted"].clone();
    assert!(inserted["image"]["actual-size"].is_u64());
    inserted["image"]
        .as_object_mut()
        .unwrap()
        .remove("actual-size");
    assert_eq!(b[0]["device"], "disk0");
    assert_eq!(b[0]["type"], "unknown");
    assert_eq!(
        inserted,
        json!({
            "file": image, "node-name": "disk0", "ro": false, "drv": "raw", "backing_file_depth": 0,
            "encrypted": false, "detect_zeroes": "off", "bps": 0, "bps_rd": 0, "bps_wr": 0,
            "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "image": {"filename": image, "format": "raw", "dirty-flag": false, "virtual-size": 64 << 20},
            "cache": {"writeback": true, "direct": true, "no-flush": false},
            "write_threshold": 0, "dirty-bitmaps": []
        })
    );
    let nodes = fx
        .exec("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    assert_eq!(nodes[0]["node-name"], "disk0");
    assert_eq!(
        fx.exec("query-block", json!({"x": 1})),
        Err("Parameter 'x' is unexpected".into())
    );
}

/// A raw client that reads QMP lines with a timeout.
struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &std::path::Path) -> Client {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        Client { stream, reader }
    }
    fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(
            line.ends_with("\r\n"),
            "QEMU ends messages with CRLF: {line:?}"
        );
        serde_json::from_str(&line).unwrap()
    }
    fn send(&mut self, raw: &str) {
        self.stream.write_all(raw.as_bytes()).unwrap();
    }
    fn cmd(&mut self, raw: &str) -> Value {
        self.send(raw);
        self.recv()
    }
    fn negotiated(path: &std::path::Path) -> Client {
        let mut c = Client::connect(path);
        assert!(c.recv()["QMP"].is_object());
        assert_eq!(
            c.cmd(r#"{"execute":"qmp_capabilities"}"#),
            json!({"return": {}})
        );
        c
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn server_protocol_over_the_socket() {
    let fx = Fixture::new("srv");
    let server = fx.server(ServerConfig::default());
    let path = server.path().to_path_buf();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let mut c = Client::connect(&path);
    let greeting = c.recv();
    assert_eq!(greeting["QMP"]["capabilities"], json!([]));
    assert_eq!(
        greeting["QMP"]["version"]["qemu"],
        json!({"major": 7, "minor": 2, "micro": 0})
    );
    assert!(greeting["QMP"]["version"]["package"]
        .as_str()
        .unwrap()
        .starts_with("vubd "));
    let r = c.cmd(r#"{"execute":"query-block","id":1}"#);
    assert_eq!(
        r["error"]["desc"],
        "Expecting capabilities negotiation with 'qmp_capabilities'"
    );
    assert_eq!(r["id"], 1);
    // Two messages in one write, then one split across writes.
    c.send(r#"{"execute":"qmp_capabilities","id":"a"}{"execute":"query-version","id":[1.5,null]}"#);
    assert_eq!(c.recv(), json!({"return": {}, "id": "a"}));
    assert_eq!(c.recv()["id"], json!([1.5, null]));
    c.send(r#"{"execute":"query-"#);
    std::thread::sleep(Duration::from_millis(20));
    c.send("version\"}\n");
    assert_eq!(c.recv()["return"]["qemu"]["minor"], 2);
    // Garbage, then the connection still works.
    assert!(c
        .cmd("{bad json\n")
        .to_string()
        .contains("JSON parse error"));
    assert_eq!(
        c.cmd("[1,2]\n")["error"]["desc"],
        "QMP input must be a JSON object"
    );
    let huge = format!(
        "{{\"execute\":\"query-version\",\"id\":\"{}\"}}",
        "x".repeat(2 << 20)
    );
    let r = c.cmd(&huge);
    assert!(
        r["error"]["desc"].as_str().unwrap().contains("size limit"),
        "{r}"
    );
    assert_eq!(c.cmd(r#"{"execute":"query-version","id":7}"#)["id"], 7);
    drop(c);
    wait_for("client to go", || server.clients() == 0);
    server.shutdown();
    assert!(!path.exists(), "socket removed on shutdown");
}

#[test]
fn events_reach_every_negotiated_client_and_quit() {
    let fx = Fixture::new("ev");
    let server = fx.server(ServerConfig::default());
    let path = server.path().to_path_buf();
    let mut a = Client::negotiated(&path);
    let mut b = Client::negotiated(&path);
    let mut pending = Client::connect(&path);
    pending.recv();
    wait_for("subscriptions", || {
        fx.dispatcher.events().subscribers() == 2
    });
    fx.dispatcher
        .events()
        .emit("BLOCK_JOB_READY", json!({"device": "j"}));
    for c in [&mut a, &mut b] {
        let e = c.recv();
        assert_eq!(e["event"], "BLOCK_JOB_READY");
        assert_eq!(e["data"]["device"], "j");
        assert!(e["timestamp"]["microseconds"].is_u64());
    }
    // The client still negotiating got no event: its next line is its reply.
    assert_eq!(
        pending.cmd(r#"{"execute":"qmp_capabilities","id":3}"#),
        json!({"return": {}, "id": 3})
    );
    a.send(r#"{"execute":"quit","id":"q"}"#);
    let first = a.recv();
    assert_eq!(first["event"], "SHUTDOWN");
    assert_eq!(
        first["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(a.recv(), json!({"return": {}, "id": "q"}));
    assert_eq!(b.recv()["event"], "SHUTDOWN");
    assert_eq!(pending.recv()["event"], "SHUTDOWN");
    wait_for("quit hook", || fx.ctx.quits.load(Ordering::SeqCst) == 1);
    // Shutdown with connected idle clients returns promptly and they see EOF.
    let t = Instant::now();
    server.shutdown();
    assert!(t.elapsed() < Duration::from_secs(2));
    let mut rest = String::new();
    assert_eq!(b.reader.read_to_string(&mut rest).unwrap(), 0);
}

#[test]
fn vanishing_and_many_clients() {
    let fx = Fixture::new("many");
    let server = fx.server(ServerConfig {
        max_clients: 40,
        ..ServerConfig::default()
    });
    let path = server.path().to_path_buf();
    for _ in 0..20 {
        let mut c = Client::connect(&path);
        c.recv();
        c.send(r#"{"execute":"qmp_capabilities"}{"execute":"query-bl"#);
    }
    let threads: Vec<_> = (0..30)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut c = Client::negotiated(&path);
                for j in 0..20 {
                    let r = c.cmd(&format!(r#"{{"execute":"query-block","id":[{i},{j}]}}"#));
                    assert_eq!(r["id"], json!([i, j]));
                    assert_eq!(r["return"][0]["device"], "disk0");
                }
                c
            })
        })
        .collect();
    let clients: Vec<Client> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(server.clients(), 30);
    // Over the limit: an error line, then the connection closes.
    let extra: Vec<Client> = (0..10).map(|_| Client::negotiated(&path)).collect();
    let mut refused = Client::connect(&path);
    assert_eq!(refused.recv()["error"]["desc"], "Too many QMP clients");
    drop(clients);
    drop(extra);
    wait_for("all clients to go", || server.clients() == 0);
    let mut c = Client::negotiated(&path);
    assert!(c.cmd(r#"{"execute":"query-version"}"#)["return"].is_object());
}

#[test]
fn client_that_does_not_read_is_dropped_not_waited_for() {
    let fx = Fixture::new("slow");
    let server = fx.server(ServerConfig {
        queue_len: 8,
        ..ServerConfig::default()
    });
    let path = server.path().to_path_buf();
    let mut lazy = Client::negotiated(&path);
    let mut good = Client::negotiated(&path);
    wait_for("subscriptions", || {
        fx.dispatcher.events().subscribers() == 2
    });
    let data = json!({"pad": "y".repeat(4096)});
    let t = Instant::now();
    for _ in 0..2000 {
        fx.dispatcher.events().emit("TEST", data.clone());
        // Keep the good client drained so it never overflows.
        assert_eq!(good.recv()["event"], "TEST");
    }
    assert!(t.elapsed() < Duration::from_secs(20));
    wait_for("lazy client to be dropped", || {
        fx.dispatcher.events().subscribers() == 1
    });
    // The lazy client gets what was written, then EOF.
    let mut sink = Vec::new();
    let _ = lazy.reader.read_to_end(&mut sink);
    wait_for("lazy client thread", || server.clients() == 1);
}
