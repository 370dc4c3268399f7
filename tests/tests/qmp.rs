//! vubd's QMP monitor (`--qmp PATH`), spoken to over a raw unix socket as
//! QEMU's clients speak it: the greeting, capabilities negotiation, every
//! command and every error path (with QEMU 7.2's classes and texts), `id`
//! echo, events reaching every negotiated client, many clients at once,
//! clients that misbehave. Where QEMU itself is the reference (bitmap
//! counts and hashes), the same requests go to qemu-storage-daemon in the
//! same run and the answers are compared. The last test runs the Python
//! suite that uses QEMU's own client library (`qemu.qmp`) and `qmp-shell`.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tests::client::Client;
use tests::daemon::{create_image, vubd_binary, workspace_root, Daemon, ScratchDir};
use tests::qmp_client::wait_for_socket;

const MIB: u64 = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(15);

/// A raw QMP connection.
struct Qmp {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects and returns the connection with the greeting.
    fn connect(path: &Path) -> Result<(Qmp, Value)> {
        let stream =
            UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut q = Qmp { stream, reader };
        let greeting = q.recv().context("greeting")?;
        Ok((q, greeting))
    }

    /// Connects and negotiates capabilities.
    fn negotiated(path: &Path) -> Result<Qmp> {
        let (mut q, _) = Qmp::connect(path)?;
        let r = q.cmd(json!({"execute": "qmp_capabilities"}))?;
        ensure!(r == json!({"return": {}}), "negotiation: {r}");
        Ok(q)
    }

    /// Reads one message (QEMU terminates each with CRLF).
    fn recv(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).context("read from QMP")?;
        ensure!(n > 0, "QMP connection closed");
        ensure!(
            line.ends_with("\r\n"),
            "message not CRLF-terminated: {line:?}"
        );
        serde_json::from_str(&line).with_context(|| format!("bad JSON from vubd: {line:?}"))
    }

    fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).context("write to QMP")
    }

    fn cmd_raw(&mut self, bytes: &[u8]) -> Result<Value> {
        self.send_raw(bytes)?;
        self.recv()
    }

    fn cmd(&mut self, msg: Value) -> Result<Value> {
        self.cmd_raw(msg.to_string().as_bytes())
    }

    /// Runs `execute` with `arguments` and returns its `return` value.
    fn ok(&mut self, execute: &str, arguments: Value) -> Result<Value> {
        let r = self.cmd(json!({"execute": execute, "arguments": arguments}))?;
        r.get("return")
            .cloned()
            .with_context(|| format!("{execute} {arguments}: expected success, got {r}"))
    }

    /// Runs `execute` and checks it fails with `class` and exactly `desc`.
    fn err(&mut self, execute: &str, arguments: Value, class: &str, desc: &str) -> Result<()> {
        let r = self.cmd(json!({"execute": execute, "arguments": arguments}))?;
        expect_error(&r, class, desc).with_context(|| format!("{execute} {arguments}"))
    }
}

fn expect_error(r: &Value, class: &str, desc: &str) -> Result<()> {
    ensure!(r.get("return").is_none(), "expected an error, got {r}");
    ensure!(r["error"]["class"] == class, "class: want {class}, got {r}");
    ensure!(r["error"]["desc"] == desc, "desc: want {desc:?}, got {r}");
    Ok(())
}

/// A vubd with a QMP socket, on a fresh image.
struct Vubd {
    daemon: Daemon,
    qmp: PathBuf,
    image: PathBuf,
    _dir: ScratchDir,
}

impl Vubd {
    fn start(size: u64, extra: &[&str]) -> Result<Vubd> {
        let dir = ScratchDir::new("qmp")?;
        let image = dir.join("disk.img");
        create_image(&image, size)?;
        let qmp = dir.join("qmp.sock");
        let qmp_arg = qmp.to_string_lossy().into_owned();
        let mut args = vec!["--qmp", &qmp_arg];
        args.extend_from_slice(extra);
        let daemon = Daemon::vubd(&dir.join("vhost.sock"), &image, &args)?;
        wait_for_socket(&qmp, TIMEOUT)?;
        Ok(Vubd {
            daemon,
            qmp,
            image,
            _dir: dir,
        })
    }

    fn alive(&mut self) -> Result<()> {
        if let Some(status) = self.daemon.try_wait()? {
            bail!("vubd exited: {status}");
        }
        Ok(())
    }
}

#[test]
fn greeting_negotiation_and_socket_mode() -> Result<()> {
    let mut v = Vubd::start(64 * MIB, &[])?;
    let mode = std::fs::metadata(&v.qmp)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "QMP socket mode {mode:o}");
    let (mut q, greeting) = Qmp::connect(&v.qmp)?;
    ensure!(greeting["QMP"]["capabilities"] == json!([]), "{greeting}");
    let version = &greeting["QMP"]["version"];
    ensure!(
        version["qemu"] == json!({"major": 7, "minor": 2, "micro": 0}),
        "{greeting}"
    );
    let package = version["package"].as_str().unwrap_or_default();
    ensure!(package.starts_with("vubd "), "package {package:?}");

    // Before negotiation every command is refused, as QEMU refuses it.
    for cmd in ["query-version", "query-block", "quit", "nope"] {
        let r = q.cmd(json!({"execute": cmd, "id": cmd}))?;
        expect_error(
            &r,
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        )?;
        ensure!(r["id"] == cmd, "id not echoed: {r}");
    }
    q.err(
        "qmp_capabilities",
        json!({"enable": ["oob"]}),
        "GenericError",
        "Capability oob not available",
    )?;
    q.err(
        "qmp_capabilities",
        json!({"enable": ["bogus"]}),
        "GenericError",
        "Parameter 'enable[0]' does not accept value 'bogus'",
    )?;
    q.err(
        "qmp_capabilities",
        json!({"enable": "oob"}),
        "GenericError",
        "Invalid parameter type for 'enable', expected: array",
    )?;
    let r = q.cmd(json!({"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": 1}))?;
    ensure!(r == json!({"return": {}, "id": 1}), "{r}");
    q.err(
        "qmp_capabilities",
        json!({}),
        "CommandNotFound",
        "Capabilities negotiation is already complete, command ignored",
    )?;
    let r = q.ok("query-version", json!({}))?;
    ensure!(r == *version, "query-version {r} != greeting {version}");
    v.alive()
}

#[test]
fn id_echo_and_envelope_errors_keep_the_connection() -> Result<()> {
    let mut v = Vubd::start(64 * MIB, &[])?;
    let mut q = Qmp::negotiated(&v.qmp)?;
    for id in [
        json!("s"),
        json!(7),
        json!(-1.5),
        json!(null),
        json!([1, {"a": true}]),
        json!({"x": [null]}),
    ] {
        let r = q.cmd(json!({"execute": "query-version", "id": id}))?;
        ensure!(r.get("id") == Some(&id), "id {id} not echoed: {r}");
        ensure!(r["return"]["qemu"]["major"] == 7, "{r}");
        let r = q.cmd(json!({"execute": "no-such-command", "id": id}))?;
        expect_error(
            &r,
            "CommandNotFound",
            "The command no-such-command has not been found",
        )?;
        ensure!(r.get("id") == Some(&id), "id {id} not echoed in error: {r}");
    }
    let generic = [
        (&b"[1,2]\n"[..], "QMP input must be a JSON object"),
        (b"\"str\"\n", "QMP input must be a JSON object"),
        (b"42\n", "QMP input must be a JSON object"),
        (
            br#"{"execute":1}"#,
            "QMP input member 'execute' must be a string",
        ),
        (
            br#"{"execute":"query-version","arguments":[]}"#,
            "QMP input member 'arguments' must be an object",
        ),
        (
            br#"{"execute":"query-version","arguments":null}"#,
            "QMP input member 'arguments' must be an object",
        ),
        (
            br#"{"exec-oob":"query-version"}"#,
            "QMP input member 'exec-oob' is unexpected",
        ),
        (
            br#"{"execute":"query-version","control":{}}"#,
            "QMP input member 'control' is unexpected",
        ),
        (br#"{"arguments":{}}"#, "QMP input lacks member 'execute'"),
        (
            br#"{"execute":"query-version","arguments":{"x":1}}"#,
            "Parameter 'x' is unexpected",
        ),
    ];
    for (raw, desc) in generic {
        let r = q.cmd_raw(raw)?;
        expect_error(&r, "GenericError", desc)
            .with_context(|| String::from_utf8_lossy(raw).into_owned())?;
        ensure!(
            q.ok("query-version", json!({}))?.is_object(),
            "connection broken after {raw:?}"
        );
    }
    // The id is echoed on envelope errors too, as QEMU does.
    let r = q.cmd_raw(br#"{"exec-oob":"query-version","id":3}"#)?;
    ensure!(r["id"] == 3, "{r}");
    // Malformed JSON: an error at once (even without a closing brace), then
    // the connection goes on.
    for raw in [
        &b"{bad json\n"[..],
        b"{\"execute\":\"query-version\",}\n",
        b"]\n",
        b"{\"a\":nul}\n",
        b"{\"a\":\"\xc3\x28\"}\n",
    ] {
        let r = q.cmd_raw(raw)?;
        ensure!(
            r["error"]["class"] == "GenericError"
                && r["error"]["desc"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("JSON parse error")),
            "{:?}: {r}",
            String::from_utf8_lossy(raw)
        );
        ensure!(
            q.ok("query-version", json!({}))?.is_object(),
            "connection broken after {raw:?}"
        );
    }
    // Several messages in one write; one message in many writes.
    q.send_raw(br#"{"execute":"query-version","id":1}{"execute":"query-version","id":2}"#)?;
    ensure!(
        q.recv()?["id"] == 1 && q.recv()?["id"] == 2,
        "pipelined replies out of order"
    );
    for piece in [
        &br#"{"exec"#[..],
        br#"ute": "query-"#,
        br#"version", "id""#,
        b": 9}",
    ] {
        q.send_raw(piece)?;
        std::thread::sleep(Duration::from_millis(30));
    }
    ensure!(q.recv()?["id"] == 9, "split message");
    // A huge message is refused without killing the connection.
    let huge = format!(
        r#"{{"execute":"query-version","id":"{}"}}"#,
        "x".repeat(3 << 20)
    );
    let r = q.cmd_raw(huge.as_bytes())?;
    ensure!(
        r["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.contains("size limit")),
        "huge message: {r}"
    );
    ensure!(
        q.ok("query-version", json!({}))?.is_object(),
        "after a huge message"
    );
    v.alive()
}

#[test]
fn query_commands_and_query_block() -> Result<()> {
    let size = 96 * MIB;
    let mut v = Vubd::start(size, &["--node-name", "sys-disk", "--readonly", "--direct"])?;
    let mut q = Qmp::negotiated(&v.qmp)?;
    let commands = q.ok("query-commands", json!({}))?;
    let names: Vec<&str> = commands
        .as_array()
        .context("query-commands")?
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for want in [
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "query-block",
        "quit",
        "block-dirty-bitmap-add",
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
        "block-dirty-bitmap-merge",
        "x-debug-block-dirty-bitmap-sha256",
    ] {
        ensure!(
            names.contains(&want),
            "query-commands lacks {want}: {names:?}"
        );
    }
    let blocks = q.ok("query-block", json!({}))?;
    let list = blocks.as_array().context("query-block is not a list")?;
    ensure!(list.len() == 1, "{blocks}");
    let b = &list[0];
    ensure!(b["device"] == "sys-disk" && b["type"] == "unknown", "{b}");
    ensure!(b["removable"] == false && b["locked"] == false, "{b}");
    let ins = &b["inserted"];
    let file = v.image.to_string_lossy().into_owned();
    ensure!(ins["node-name"] == "sys-disk", "{ins}");
    ensure!(
        ins["file"] == file.as_str() && ins["drv"] == "raw" && ins["ro"] == true,
        "{ins}"
    );
    ensure!(
        ins["cache"]["direct"] == true && ins["cache"]["no-flush"] == false,
        "{ins}"
    );
    ensure!(
        ins["backing_file_depth"] == 0 && ins["encrypted"] == false,
        "{ins}"
    );
    let img = &ins["image"];
    ensure!(
        img["filename"] == file.as_str() && img["format"] == "raw",
        "{img}"
    );
    ensure!(img["virtual-size"] == size, "{img}");
    let allocated = std::fs::metadata(&v.image)?.blocks() * 512;
    ensure!(
        img["actual-size"] == allocated,
        "actual-size {img} vs {allocated}"
    );
    ensure!(ins["dirty-bitmaps"].is_array(), "{ins}");
    q.err(
        "query-block",
        json!({"flat": true}),
        "GenericError",
        "Parameter 'flat' is unexpected",
    )?;
    let nodes = q.ok("query-named-block-nodes", json!({"flat": true}))?;
    ensure!(nodes[0]["node-name"] == "sys-disk", "{nodes}");
    v.alive()
}

/// Bitmap commands on a node: the state they leave (query-block) and every
/// refusal, worded as QEMU words it.
#[test]
fn dirty_bitmap_commands() -> Result<()> {
    let mut v = Vubd::start(64 * MIB, &[])?;
    let mut q = Qmp::negotiated(&v.qmp)?;
    let add = "block-dirty-bitmap-add";
    q.ok(add, json!({"node": "disk0", "name": "b1"}))?;
    q.ok(
        add,
        json!({"node": "disk0", "name": "small", "granularity": 512, "disabled": true}),
    )?;
    q.ok(add, json!({"node": "disk0", "name": "big", "granularity": 64 * MIB, "disabled": false, "persistent": false}))?;
    let e = "GenericError";
    q.err(
        add,
        json!({"node": "disk0", "name": "b1"}),
        e,
        "Bitmap already exists: b1",
    )?;
    q.err(
        add,
        json!({"node": "nod", "name": "x"}),
        e,
        "Cannot find device='nod' nor node-name='nod'",
    )?;
    q.err(
        add,
        json!({"node": "disk0"}),
        e,
        "Parameter 'name' is missing",
    )?;
    q.err(add, json!({}), e, "Parameter 'node' is missing")?;
    q.err(
        add,
        json!({"node": "disk0", "name": 5}),
        e,
        "Invalid parameter type for 'name', expected: string",
    )?;
    q.err(
        add,
        json!({"node": "disk0", "name": ""}),
        e,
        "Bitmap name cannot be empty",
    )?;
    for g in [0, 256, 1000, 65535] {
        q.err(
            add,
            json!({"node": "disk0", "name": "g", "granularity": g}),
            e,
            "Granularity must be power of 2 and at least 512",
        )?;
    }
    q.err(
        add,
        json!({"node": "disk0", "name": "g", "granularity": 128 * MIB}),
        e,
        "Granularity exceeds maximum (67108864 bytes)",
    )?;
    q.err(
        add,
        json!({"node": "disk0", "name": "g", "granularity": "64k"}),
        e,
        "Parameter 'granularity' expects uint64",
    )?;
    q.err(
        add,
        json!({"node": "disk0", "name": "g", "granularity": 65536.5}),
        e,
        "Parameter 'granularity' expects uint64",
    )?;
    q.err(
        add,
        json!({"node": "disk0", "name": "g", "granularity": -1}),
        e,
        "Parameter 'granularity' expects uint32_t",
    )?;
    q.err(
        add,
        json!({"node": "disk0", "name": "g", "persistent": "yes"}),
        e,
        "Invalid parameter type for 'persistent', expected: boolean",
    )?;
    q.err(
        add,
        json!({"node": "disk0", "name": "g", "disabled": 1}),
        e,
        "Invalid parameter type for 'disabled', expected: boolean",
    )?;
    q.err(
        add,
        json!({"node": "disk0", "name": "g", "speed": 1}),
        e,
        "Parameter 'speed' is unexpected",
    )?;
    let long = "n".repeat(1024);
    q.err(
        add,
        json!({"node": "disk0", "name": long}),
        e,
        &format!("Bitmap name too long: {long}"),
    )?;

    let bitmaps = |q: &mut Qmp| -> Result<Vec<Value>> {
        let b = q.ok("query-block", json!({}))?;
        Ok(b[0]["inserted"]["dirty-bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    };
    let list = bitmaps(&mut q)?;
    let names: Vec<&str> = list.iter().filter_map(|b| b["name"].as_str()).collect();
    ensure!(
        names == ["big", "small", "b1"],
        "newest first, as QEMU: {names:?}"
    );
    for b in &list {
        for key in [
            "name",
            "count",
            "granularity",
            "recording",
            "busy",
            "persistent",
            "inconsistent",
        ] {
            ensure!(b.get(key).is_some(), "bitmap lacks {key}: {b}");
        }
        ensure!(
            b["count"] == 0 && b["busy"] == false && b["inconsistent"] == false,
            "{b}"
        );
    }
    ensure!(
        list[1]["granularity"] == 512 && list[1]["recording"] == false,
        "{:?}",
        list[1]
    );
    ensure!(
        list[2]["granularity"] == 65536 && list[2]["recording"] == true,
        "{:?}",
        list[2]
    );
    ensure!(list[0]["granularity"] == 64 * MIB, "{:?}", list[0]);

    for cmd in [
        "block-dirty-bitmap-remove",
        "block-dirty-bitmap-clear",
        "block-dirty-bitmap-enable",
        "block-dirty-bitmap-disable",
        "x-debug-block-dirty-bitmap-sha256",
    ] {
        q.err(
            cmd,
            json!({"node": "disk0", "name": "zz"}),
            e,
            "Dirty bitmap 'zz' not found",
        )?;
        q.err(
            cmd,
            json!({"node": "zz", "name": "b1"}),
            e,
            "Node 'zz' not found",
        )?;
        q.err(
            cmd,
            json!({"node": "disk0"}),
            e,
            "Parameter 'name' is missing",
        )?;
        q.err(cmd, json!({"name": "b1"}), e, "Parameter 'node' is missing")?;
        q.err(
            cmd,
            json!({"node": "disk0", "name": ["b1"]}),
            e,
            "Invalid parameter type for 'name', expected: string",
        )?;
        q.err(
            cmd,
            json!({"node": "disk0", "name": "b1", "x": 0}),
            e,
            "Parameter 'x' is unexpected",
        )?;
    }
    q.ok(
        "block-dirty-bitmap-enable",
        json!({"node": "disk0", "name": "small"}),
    )?;
    q.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "disk0", "name": "b1"}),
    )?;
    let list = bitmaps(&mut q)?;
    ensure!(
        list[1]["recording"] == true && list[2]["recording"] == false,
        "{list:?}"
    );
    q.ok(
        "block-dirty-bitmap-clear",
        json!({"node": "disk0", "name": "b1"}),
    )?;
    let sha = q.ok(
        "x-debug-block-dirty-bitmap-sha256",
        json!({"node": "disk0", "name": "b1"}),
    )?;
    let hex = sha["sha256"].as_str().context("sha256 member")?;
    ensure!(
        hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_hexdigit()),
        "{sha}"
    );

    let merge = "block-dirty-bitmap-merge";
    q.ok(merge, json!({"node": "disk0", "target": "b1", "bitmaps": ["big", {"node": "disk0", "name": "small"}]}))?;
    q.err(
        merge,
        json!({"node": "disk0", "target": "b1", "bitmaps": ["zz"]}),
        e,
        "Dirty bitmap 'zz' not found",
    )?;
    q.err(
        merge,
        json!({"node": "disk0", "target": "zz", "bitmaps": ["b1"]}),
        e,
        "Dirty bitmap 'zz' not found",
    )?;
    q.err(
        merge,
        json!({"node": "nn", "target": "b1", "bitmaps": ["b1"]}),
        e,
        "Node 'nn' not found",
    )?;
    q.err(
        merge,
        json!({"node": "disk0", "target": "b1", "bitmaps": [{"node": "nn", "name": "big"}]}),
        e,
        "Node 'nn' not found",
    )?;
    q.err(
        merge,
        json!({"node": "disk0", "target": "b1", "bitmaps": [{"node": "disk0"}]}),
        e,
        "Parameter 'bitmaps[0].name' is missing",
    )?;
    q.err(
        merge,
        json!({"node": "disk0", "target": "b1", "bitmaps": [{"node": "disk0", "name": "big", "z": 1}]}),
        e,
        "Parameter 'bitmaps[0].z' is unexpected",
    )?;
    q.err(
        merge,
        json!({"node": "disk0", "target": "b1", "bitmaps": ["big", 5]}),
        e,
        "Invalid parameter type for 'bitmaps[1]', expected: BlockDirtyBitmapOrStr",
    )?;
    q.err(
        merge,
        json!({"node": "disk0", "target": "b1", "bitmaps": "big"}),
        e,
        "Invalid parameter type for 'bitmaps', expected: array",
    )?;
    q.err(
        merge,
        json!({"node": "disk0", "target": "b1"}),
        e,
        "Parameter 'bitmaps' is missing",
    )?;

    q.ok(
        "block-dirty-bitmap-remove",
        json!({"node": "disk0", "name": "b1"}),
    )?;
    let names: Vec<String> = bitmaps(&mut q)?
        .iter()
        .filter_map(|b| b["name"].as_str().map(String::from))
        .collect();
    ensure!(names == ["big", "small"], "{names:?}");
    v.alive()
}

/// The same bitmaps, the same writes, on vubd and on qemu-storage-daemon:
/// `count` and `x-debug-block-dirty-bitmap-sha256` must agree with QEMU's.
#[test]
fn bitmap_count_and_sha256_match_qemu() -> Result<()> {
    let size = 64 * MIB;
    let mut v = Vubd::start(size, &[])?;
    let dir = ScratchDir::new("qmp-qsd")?;
    let qsd_image = dir.join("qsd.img");
    create_image(&qsd_image, size)?;
    let qsd_qmp = dir.join("qsd-qmp.sock");
    let _qsd = Daemon::qsd_with_monitor(
        &dir.join("qsd-vhost.sock"),
        &qsd_qmp,
        &qsd_image,
        "discard=unmap",
        true,
    )?;
    let vhost_qsd = dir.join("qsd-vhost.sock");
    let vhost_vubd = v.daemon.socket().to_path_buf();
    let mut ours = Qmp::negotiated(&v.qmp)?;
    let mut theirs = Qmp::negotiated(&qsd_qmp)?;
    let grans = [512u64, 4096, 65536, MIB, 64 * MIB];
    for g in grans {
        let args = json!({"node": "disk0", "name": format!("g{g}"), "granularity": g});
        ours.ok("block-dirty-bitmap-add", args.clone())?;
        theirs.ok("block-dirty-bitmap-add", args)?;
    }
    // Writes spanning chunk boundaries, a discard, write-zeroes, the last block.
    let writes: [(u64, usize); 5] = [
        (0, 512),
        (65536 - 512, 4096),
        (3 * MIB + 1024, 200 * 1024),
        (40 * MIB, 4096),
        (size - 512, 512),
    ];
    for sock in [&vhost_vubd, &vhost_qsd] {
        let mut c = Client::connect(sock, 1, false)?;
        for (off, len) in writes {
            c.write(off, &vec![0xA5; len])?;
        }
        c.discard(20 * MIB, MIB)?;
        c.write_zeroes(30 * MIB + 4096, 8192, false)?;
        c.flush()?;
    }
    let hashes = |q: &mut Qmp| -> Result<Vec<(String, Value)>> {
        let mut out = Vec::new();
        for g in grans {
            let name = format!("g{g}");
            let sha = q.ok(
                "x-debug-block-dirty-bitmap-sha256",
                json!({"node": "disk0", "name": name}),
            )?;
            out.push((name, sha["sha256"].clone()));
        }
        Ok(out)
    };
    let counts = |q: &mut Qmp, blocks: &str| -> Result<Vec<(String, Value)>> {
        let b = q.ok(blocks, json!({}))?;
        let list = if blocks == "query-block" {
            b[0]["inserted"]["dirty-bitmaps"].clone()
        } else {
            b[0]["dirty-bitmaps"].clone()
        };
        let mut v: Vec<(String, Value)> = list
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_string(),
                    m["count"].clone(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    };
    let ours_counts = counts(&mut ours, "query-block")?;
    let theirs_counts = counts(&mut theirs, "query-named-block-nodes")?;
    ensure!(
        ours_counts == theirs_counts,
        "counts differ: vubd {ours_counts:?} qemu {theirs_counts:?}"
    );
    ensure!(
        ours_counts.iter().all(|(_, c)| c.as_u64().unwrap_or(0) > 0),
        "nothing marked: {ours_counts:?}"
    );
    let (a, b) = (hashes(&mut ours)?, hashes(&mut theirs)?);
    ensure!(a == b, "sha256 differ: vubd {a:?} qemu {b:?}");
    // Merge, clear and disable must keep agreeing.
    for q in [&mut ours, &mut theirs] {
        q.ok(
            "block-dirty-bitmap-clear",
            json!({"node": "disk0", "name": "g4096"}),
        )?;
        q.ok(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "m", "granularity": 4096, "disabled": true}),
        )?;
        q.ok("block-dirty-bitmap-merge", json!({"node": "disk0", "target": "m", "bitmaps": ["g512", {"node": "disk0", "name": "g65536"}]}))?;
    }
    for name in ["g4096", "m"] {
        let args = json!({"node": "disk0", "name": name});
        let (x, y) = (
            ours.ok("x-debug-block-dirty-bitmap-sha256", args.clone())?,
            theirs.ok("x-debug-block-dirty-bitmap-sha256", args)?,
        );
        ensure!(x == y, "{name}: vubd {x} qemu {y}");
    }
    v.alive()
}

#[test]
fn events_reach_every_negotiated_client_on_quit() -> Result<()> {
    let mut v = Vubd::start(64 * MIB, &[])?;
    let mut a = Qmp::negotiated(&v.qmp)?;
    let mut b = Qmp::negotiated(&v.qmp)?;
    let (mut waiting, _) = Qmp::connect(&v.qmp)?;
    let r = a.cmd(json!({"execute": "quit", "id": "bye"}))?;
    // QEMU sends SHUTDOWN before the reply to quit; accept either order.
    let (event, reply) = if r.get("event").is_some() {
        (r, a.recv()?)
    } else {
        (a.recv()?, r)
    };
    ensure!(reply == json!({"return": {}, "id": "bye"}), "{reply}");
    for e in [event, b.recv()?] {
        ensure!(e["event"] == "SHUTDOWN", "{e}");
        ensure!(
            e["data"] == json!({"guest": false, "reason": "host-qmp-quit"}),
            "{e}"
        );
        let ts = &e["timestamp"];
        ensure!(
            ts["seconds"].as_u64().is_some_and(|s| s > 1_600_000_000),
            "{e}"
        );
        ensure!(
            ts["microseconds"].as_u64().is_some_and(|u| u < 1_000_000),
            "{e}"
        );
    }
    // The client that never negotiated gets no event, only the close.
    let mut rest = String::new();
    let _ = waiting.reader.read_to_string(&mut rest);
    ensure!(rest.is_empty(), "un-negotiated client got {rest:?}");
    let status = v.daemon.wait_exit(TIMEOUT)?;
    ensure!(status.success(), "vubd after quit: {status}");
    ensure!(!v.qmp.exists(), "QMP socket left behind");
    Ok(())
}

#[test]
fn sigterm_sends_shutdown_event() -> Result<()> {
    let mut v = Vubd::start(64 * MIB, &[])?;
    let mut a = Qmp::negotiated(&v.qmp)?;
    v.daemon.signal(libc::SIGTERM)?;
    let e = a.recv()?;
    ensure!(
        e["event"] == "SHUTDOWN" && e["data"]["reason"] == "host-signal",
        "{e}"
    );
    let status = v.daemon.wait_exit(TIMEOUT)?;
    ensure!(status.success(), "{status}");
    Ok(())
}

#[test]
fn many_clients_and_clients_that_vanish() -> Result<()> {
    let mut v = Vubd::start(64 * MIB, &[])?;
    // Clients that leave mid-message, before or after negotiating.
    for i in 0..20 {
        let (mut q, _) = Qmp::connect(&v.qmp)?;
        if i % 2 == 0 {
            q.send_raw(br#"{"execute":"qmp_capabilities"}"#)?;
        }
        q.send_raw(br#"{"execute":"query-bl"#)?;
    }
    // Clients that connect and leave without a byte.
    for _ in 0..20 {
        drop(UnixStream::connect(&v.qmp)?);
    }
    let path = v.qmp.clone();
    let workers: Vec<_> = (0..24)
        .map(|i| {
            let path = path.clone();
            std::thread::spawn(move || -> Result<Qmp> {
                let mut q = Qmp::negotiated(&path)?;
                for j in 0..25 {
                    let r = q.cmd(json!({"execute": "query-block", "id": [i, j]}))?;
                    ensure!(r["id"] == json!([i, j]), "{r}");
                    ensure!(r["return"][0]["device"] == "disk0", "{r}");
                }
                Ok(q)
            })
        })
        .collect();
    let mut clients = Vec::new();
    for w in workers {
        clients.push(
            w.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
        );
    }
    // All 24 are still connected and negotiated: one quit reaches them all.
    let mut last = Qmp::negotiated(&v.qmp)?;
    last.send_raw(br#"{"execute":"quit"}"#)?;
    for q in clients.iter_mut() {
        let e = q.recv()?;
        ensure!(e["event"] == "SHUTDOWN", "{e}");
    }
    let status = v.daemon.wait_exit(TIMEOUT)?;
    ensure!(status.success(), "{status}");
    Ok(())
}

/// The Python suite (tests/python/test_qmp.py) drives vubd with QEMU's own
/// client library `qemu.qmp` and with `qmp-shell`. A missing package is a
/// failure, not a skip: CI installs it.
#[test]
fn qemu_qmp_python_client() -> Result<()> {
    let script = workspace_root().join("tests/python/test_qmp.py");
    let probe = Command::new("python3")
        .args(["-c", "import qemu.qmp"])
        .output()
        .context("python3 is required for the qemu.qmp test")?;
    ensure!(
        probe.status.success(),
        "PyPI package qemu.qmp is not installed (pip install qemu.qmp): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let out = Command::new("python3")
        .arg(&script)
        .arg("-v")
        .env("VUBD_BIN", vubd_binary())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "python qemu.qmp suite failed:\n{log}");
    // unittest prints "Ran N tests" and "OK"; make sure it really ran some.
    let ran = log
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")
                .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        })
        .unwrap_or(0);
    ensure!(ran >= 5, "python suite ran {ran} tests:\n{log}");
    Ok(())
}

/// A client that sends `quit` and hangs up without reading the reply still
/// stops the daemon (the command took effect; only its reply is lost).
#[test]
fn quit_from_a_client_that_hangs_up_at_once() -> Result<()> {
    let mut v = Vubd::start(64 * MIB, &[])?;
    let mut s = UnixStream::connect(&v.qmp)?;
    s.write_all(br#"{"execute":"qmp_capabilities"}{"execute":"quit"}"#)?;
    drop(s);
    let status = v.daemon.wait_exit(TIMEOUT)?;
    ensure!(status.success(), "{status}");
    Ok(())
}
