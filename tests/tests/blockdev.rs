//! The block-node graph's QMP commands (`blockdev-add`, `blockdev-del`,
//! `query-named-block-nodes`, `blockdev-mirror` onto a node), run as the
//! same scripts against vubd and qemu-storage-daemon 7.2 with the same
//! client: replies, error classes and texts, and the resulting node lists
//! must agree. A mirror onto a `blockdev-add`ed node, completed while a
//! libblkio client writes, must leave the node's file equal to what the
//! client wrote, on both daemons.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tests::bench_mirror::{make_image, LoadConfig, MirrorDaemon, WriteLoad};
use tests::client::Client;
use tests::daemon::{create_image, wait_files_closed, Daemon, ScratchDir};
use tests::qmp_client::QmpClient;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);

/// A daemon under test: its QMP connection, vhost-user socket and the
/// directory its files are in (replaced by `DIR` in compared texts).
struct Peer {
    name: &'static str,
    q: QmpClient,
    socket: PathBuf,
    dir: PathBuf,
}

/// Both daemons, each on its own `disk.img` of `size` (from `make_image`)
/// in its own directory; the models of the two disks are equal.
struct Pair {
    _dirs: Vec<ScratchDir>,
    _daemons: (Daemon, MirrorDaemon),
    peers: Vec<Peer>,
    model: Vec<u8>,
}

fn start_pair(tag: &str, size: u64) -> Result<Pair> {
    let qdir = ScratchDir::new_in("/dev/shm", &format!("{tag}-qsd"))?;
    let vdir = ScratchDir::new_in("/dev/shm", &format!("{tag}-vubd"))?;
    let model = make_image(&qdir.join("disk.img"), size, 2)?;
    std::fs::copy(qdir.join("disk.img"), vdir.join("disk.img"))?;
    let (qsd_qmp, qsd_vhost) = (qdir.join("qmp.sock"), qdir.join("vhost.sock"));
    let qsd = Daemon::qsd_with_monitor(&qsd_vhost, &qsd_qmp, &qdir.join("disk.img"), "", true)?;
    let vubd = MirrorDaemon::start(vdir.path(), &vdir.join("disk.img"), &[])?;
    let peers = vec![
        Peer {
            name: "qemu-storage-daemon",
            q: QmpClient::connect(&qsd_qmp, T)?,
            socket: qsd_vhost,
            dir: qdir.path().canonicalize()?,
        },
        Peer {
            name: "vubd",
            q: vubd.qmp()?,
            socket: vubd.socket.clone(),
            dir: vdir.path().canonicalize()?,
        },
    ];
    Ok(Pair {
        _dirs: vec![qdir, vdir],
        _daemons: (qsd, vubd),
        peers,
        model,
    })
}

impl Peer {
    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// Runs a command; `ok` or `CLASS: desc`, with the directory as `DIR`.
    fn run(&mut self, name: &str, args: Value) -> Result<String> {
        let dir = self.dir.to_string_lossy().into_owned();
        Ok(match self.q.execute(name, args)? {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{}: {}", e.class, e.desc.replace(&dir, "DIR")),
        })
    }

    /// `query-named-block-nodes`, by node name, paths as `DIR/...`; inline
    /// children get names of the daemon's choosing (`#blockNNN`): only
    /// their number is kept, as `#inline`.
    fn nodes(&mut self, flat: bool) -> Result<BTreeMap<String, Value>> {
        let list = self
            .q
            .ok("query-named-block-nodes", json!({"flat": flat}))?;
        let dir = self.dir.to_string_lossy().into_owned();
        let text = list.to_string().replace(&dir, "DIR");
        let list: Value = serde_json::from_str(&text)?;
        let mut out = BTreeMap::new();
        let mut inline = 0;
        for n in list.as_array().context("not a list")? {
            let mut name = n["node-name"].as_str().context("no node-name")?.to_string();
            if name.starts_with('#') {
                inline += 1;
                name = format!("#inline{inline}");
            }
            out.insert(name, n.clone());
        }
        Ok(out)
    }
}

/// Waits until process `pid` has no file under `dir` open but `keep`
/// (a node's file is closed when `blockdev-del` removes it). The
/// directory itself stays open in vubd (its `--allow-dir` handle).
fn wait_only_open(pid: u32, dir: &Path, keep: &[&str]) -> Result<()> {
    wait_files_closed(pid, T, |f| {
        f.starts_with(dir)
            && f != dir
            && !f
                .file_name()
                .is_some_and(|n| keep.contains(&n.to_string_lossy().as_ref()))
    })
}

/// Runs `script` on both peers and fails on the first difference.
fn same_on_both(
    pair: &mut Pair,
    what: &str,
    script: impl Fn(&mut Peer) -> Result<Vec<String>>,
) -> Result<Vec<String>> {
    let mut outs = Vec::new();
    for p in &mut pair.peers {
        outs.push(script(p).with_context(|| format!("{what} on {}", p.name))?);
    }
    if outs[0] != outs[1] {
        let lines: Vec<String> = outs[0]
            .iter()
            .zip(&outs[1])
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("  qsd:  {a}\n  vubd: {b}"))
            .collect();
        bail!(
            "{what}: vubd differs from qemu-storage-daemon\n{}\n(lengths {} / {})",
            lines.join("\n"),
            outs[0].len(),
            outs[1].len()
        );
    }
    Ok(outs.swap_remove(0))
}

/// The members of a node's `BlockDeviceInfo` vubd claims to match.
const FIELDS: &[&str] = &[
    "node-name",
    "drv",
    "file",
    "ro",
    "backing_file_depth",
    "encrypted",
    "detect_zeroes",
    "bps",
    "bps_rd",
    "bps_wr",
    "iops",
    "iops_rd",
    "iops_wr",
    "write_threshold",
    "cache",
];
const IMAGE_FIELDS: &[&str] = &[
    "filename",
    "format",
    "virtual-size",
    "actual-size",
    "dirty-flag",
];

/// One line per node and field, for every node but the disk's (qsd's
/// disk is a `file` node, vubd's a `raw` one); inline children by number.
fn describe(nodes: &BTreeMap<String, Value>, disk: &str) -> Vec<String> {
    let mut out = vec![format!("nodes: {:?}", nodes.keys().collect::<Vec<_>>())];
    for (name, n) in nodes.iter().filter(|(k, _)| *k != disk) {
        for f in FIELDS {
            let v = match (*f, &n[*f]) {
                ("node-name", _) if name.starts_with('#') => json!("#inline"),
                // Members in QEMU's order are not part of the contract.
                (_, Value::Object(m)) => json!(m.iter().collect::<BTreeMap<_, _>>()),
                (_, v) => v.clone(),
            };
            out.push(format!("{name}.{f} = {v}"));
        }
        for f in IMAGE_FIELDS {
            out.push(format!("{name}.image.{f} = {}", n["image"][*f]));
        }
    }
    out
}

#[test]
fn blockdev_add_del_and_query_match_qemu() -> Result<()> {
    let mut pair = start_pair("blockdev-cmds", 16 * MIB)?;
    for p in &pair.peers {
        create_image(&p.dir.join("a.img"), 16 * MIB)?;
        create_image(&p.dir.join("b.img"), 8 * MIB)?;
        std::fs::write(p.dir.join("small.img"), vec![7u8; 8192])?;
    }
    same_on_both(&mut pair, "blockdev-add / blockdev-del", |p| {
        let a = p.path("a.img");
        let b = p.path("b.img");
        let file =
            |name: &str, f: &str| json!({"driver": "file", "node-name": name, "filename": f});
        let mut out = Vec::new();
        // Node names as QEMU checks them, before the file is opened.
        for name in [
            "1abc",
            "",
            "_x",
            "-x",
            "a b",
            "a#",
            "a/b",
            &"n".repeat(32),
            "disk0",
        ] {
            out.push(p.run("blockdev-add", file(name, &p.path("missing.img")))?);
        }
        for args in [
            json!({"driver": "file", "filename": a}),
            json!({"driver": "file", "node-name": "nf", "filename": p.path("missing.img")}),
            json!({"driver": "file", "node-name": "nd", "filename": p.dir}),
            json!({"driver": "file", "node-name": "f9", "filename": a, "bogus": 1}),
            json!({"driver": "file", "node-name": "f9", "filename": a, "cache": {"bogus": true}}),
            json!({"driver": "file", "node-name": "f9", "filename": a, "discard": "x"}),
            json!({"driver": "file", "node-name": "f9", "filename": a, "aio": "x"}),
            json!({"driver": "file", "node-name": "f9", "filename": a, "aio": "native"}),
            json!({"driver": "file", "node-name": "f9"}),
            json!({"driver": "nosuch", "node-name": "f9", "filename": a}),
            json!({"node-name": "f9", "filename": a}),
            json!({"driver": "raw", "node-name": "r9"}),
            json!({"driver": "raw", "node-name": "r9", "file": 5}),
            json!({"driver": "raw", "node-name": "r9", "file": "nosuch"}),
            json!({"driver": "raw", "node-name": "r9", "file": {"driver": "file", "filename": p.path("missing.img")}}),
            json!({"driver": "raw", "node-name": "r8", "file": {"driver": "file", "node-name": "r8", "filename": a}}),
            // And what works.
            json!({"driver": "file", "node-name": &"n".repeat(31), "filename": a}),
            json!({"driver": "file", "node-name": "f1", "filename": a, "aio": "threads",
                   "cache": {"direct": false}, "discard": "unmap", "read-only": false,
                   "auto-read-only": false, "locking": "auto"}),
            json!({"driver": "file", "node-name": "f2", "filename": b, "aio": "io_uring", "read-only": true}),
            json!({"driver": "file", "node-name": "f3", "filename": a, "aio": "native", "cache": {"direct": true}}),
            json!({"driver": "file", "node-name": "f1", "filename": b}),
            json!({"driver": "raw", "node-name": "r1", "file": "f1"}),
            json!({"driver": "raw", "node-name": "r2", "file": {"driver": "file", "node-name": "c2", "filename": b}}),
            json!({"driver": "raw", "node-name": "r3", "file": {"driver": "file", "filename": p.path("small.img")}}),
            // (raw over raw works too, but QEMU names its file `json:{...}`.)
        ] {
            let shown = args.to_string().replace(&*p.dir.to_string_lossy(), "DIR");
            out.push(format!("add {shown}: {}", p.run("blockdev-add", args)?));
        }
        let listed = p.nodes(true)?;
        out.extend(describe(&listed, "disk0"));
        ensure!(p.nodes(false)? == listed, "flat and nested views differ");
        for name in [
            "nosuch",
            "disk0",
            "f1",
            "r1",
            "c2",
            "r1",
            "f1",
            "r2",
            "c2",
            "r3",
            "f2",
            "f3",
            &"n".repeat(31),
        ] {
            out.push(format!(
                "del {name}: {}",
                p.run("blockdev-del", json!({"node-name": name}))?
            ));
        }
        out.extend(describe(&p.nodes(true)?, "disk0"));
        Ok(out)
    })?;
    let vubd = &pair._daemons.1;
    wait_only_open(
        vubd.daemon.pid(),
        &pair.peers[1].dir,
        &["disk.img", "vhost.sock", "qmp.sock"],
    )
    .context("vubd keeps a deleted node's file open")?;
    Ok(())
}

/// `blockdev-add` a target node, `blockdev-mirror` onto it while the
/// client writes, `job-complete`: the same replies and node lists on both
/// daemons, and the node's file holds what the client wrote.
#[test]
fn blockdev_mirror_onto_a_node_matches_qemu_and_keeps_every_write() -> Result<()> {
    let size = 32 * MIB;
    let mut pair = start_pair("blockdev-mirror", size)?;
    for p in &pair.peers {
        create_image(&p.dir.join("t.img"), size)?;
    }
    let model = pair.model.clone();
    let mut loads = Vec::new();
    for p in &pair.peers {
        let cfg = LoadConfig {
            span: size,
            queue_depth: 4,
            pace: Some(Duration::from_micros(50)),
            ..LoadConfig::default()
        };
        let client = Client::connect(&p.socket, 1, false)
            .with_context(|| format!("libblkio client of {}", p.name))?;
        let load = WriteLoad::start(client, model.clone(), cfg)?;
        load.wait_requests(100, T)?;
        loads.push(load);
    }
    same_on_both(&mut pair, "blockdev-mirror", |p| {
        let mut out = Vec::new();
        let t = p.path("t.img");
        out.push(p.run(
            "blockdev-add",
            json!({"driver": "file", "node-name": "t0", "filename": t}),
        )?);
        let m = |target: &str| json!({"device": "disk0", "target": target, "sync": "full", "job-id": "m"});
        out.push(p.run(
            "blockdev-add",
            json!({"driver": "file", "node-name": "tro", "filename": t, "read-only": true}),
        )?);
        // (QEMU creates the job before it refuses a read-only node; vubd
        // refuses first, so only the replies are compared.)
        for target in ["nosuch", "disk0", "tro"] {
            out.push(format!(
                "mirror to {target}: {}",
                p.run("blockdev-mirror", m(target))?
            ));
        }
        out.push(p.run("blockdev-del", json!({"node-name": "tro"}))?);
        // The vubd-only `format` / `mode` are gone.
        for extra in [json!({"format": "raw"}), json!({"mode": "existing"})] {
            let mut args = m("t0");
            for (k, v) in extra.as_object().into_iter().flatten() {
                args[k] = v.clone();
            }
            out.push(p.run("blockdev-mirror", args)?);
        }
        out.push(p.run("blockdev-mirror", m("t0"))?);
        p.q.wait_event("BLOCK_JOB_READY", T, |_| true)?;
        out.push(format!(
            "del t0 while mirroring: {}",
            p.run("blockdev-del", json!({"node-name": "t0"}))?
        ));
        out.push(p.run("job-complete", json!({"id": "m"}))?);
        p.q.wait_event("JOB_STATUS_CHANGE", T, |d| d["status"] == "null")?;
        // The target took the source's place: the source node is free.
        let nodes = p.nodes(true)?;
        out.push(format!(
            "nodes after the pivot: {:?}",
            nodes.keys().collect::<Vec<_>>()
        ));
        out.push(format!(
            "t0 file: {:?}",
            nodes.get("t0").map(|n| &n["file"])
        ));
        out.push(format!(
            "del t0 after the pivot: {}",
            p.run("blockdev-del", json!({"node-name": "t0"}))?
        ));
        out.push(format!(
            "del disk0 after the pivot: {}",
            p.run("blockdev-del", json!({"node-name": "disk0"}))?
        ));
        out.push(format!(
            "nodes: {:?}",
            p.nodes(true)?.keys().collect::<Vec<_>>()
        ));
        Ok(out)
    })?;
    // The old image closes with its node.
    let vubd = &pair._daemons.1;
    wait_only_open(
        vubd.daemon.pid(),
        &pair.peers[1].dir,
        &["t.img", "vhost.sock", "qmp.sock"],
    )
    .context("vubd keeps the deleted source node's file open")?;
    for (p, load) in pair.peers.iter().zip(loads) {
        load.wait_requests(200, T)?;
        let report = load
            .stop()
            .with_context(|| format!("the client of {} saw an error", p.name))?;
        let got = std::fs::read(p.dir.join("t.img"))?;
        let bad = (0..size as usize / 4096)
            .filter(|&b| got[b * 4096..(b + 1) * 4096] != report.model[b * 4096..(b + 1) * 4096])
            .count();
        ensure!(
            bad == 0,
            "{}: {bad} blocks of the target differ from what the client wrote",
            p.name
        );
    }
    Ok(())
}

/// The fields of a mirror's filter node both daemons must report alike
/// (the disk's own node differs: `file` on qsd, `raw` on vubd).
fn filter_fields(nodes: &BTreeMap<String, Value>, name: &str) -> Vec<String> {
    let Some(n) = nodes.get(name) else {
        return vec![format!("{name}: absent")];
    };
    let mut out: Vec<String> = ["node-name", "drv", "file", "ro", "backing_file_depth"]
        .iter()
        .map(|f| match *f {
            "node-name" if name.starts_with('#') => format!("{name}.{f} = #inline"),
            _ => format!("{name}.{f} = {}", n[*f]),
        })
        .collect();
    for f in ["format", "filename", "virtual-size"] {
        out.push(format!("{name}.image.{f} = {}", n["image"][f]));
    }
    let backing = &n["image"]["backing-image"];
    out.push(format!(
        "{name}.image.backing-image = {}",
        json!([backing["filename"], backing["virtual-size"]])
    ));
    out
}

/// vubd's `query-block` shows the device inserted on `node`: QEMU 7.2
/// (qemu-system-x86_64 with a `virtio-blk-pci` device; qsd has no device
/// and answers `[]`) shows a filter named by `filter-node-name`, nested
/// over the disk's node, and skips an implicit one.
fn inserted_on(p: &mut Peer, node: &str) -> Result<()> {
    if p.name != "vubd" {
        return Ok(());
    }
    let q = p.q.ok("query-block", json!({}))?;
    let ins = &q[0]["inserted"];
    ensure!(ins["node-name"] == node, "query-block: {q}");
    if node == "mt0" {
        ensure!(
            ins["drv"] == "mirror_top"
                && ins["backing_file_depth"] == 1
                && ins["image"]["backing-image"]["virtual-size"] == ins["image"]["virtual-size"],
            "query-block: {q}"
        );
    } else {
        ensure!(ins["drv"] == "raw", "query-block: {q}");
    }
    Ok(())
}

/// An NBD server whose writes all fail (nbdkit's error filter), as a
/// mirror target that fails the job.
struct FailingTarget(std::process::Child);

impl FailingTarget {
    fn start(socket: &Path, size: u64) -> Result<FailingTarget> {
        let child = std::process::Command::new("nbdkit")
            .args(["-f", "-U"])
            .arg(socket)
            .args(["--filter=error", "memory", &size.to_string()])
            .args(["error-pwrite=EIO", "error-pwrite-rate=1"])
            .spawn()
            .context("cannot run nbdkit")?;
        let deadline = std::time::Instant::now() + T;
        while !socket.exists() {
            ensure!(
                std::time::Instant::now() < deadline,
                "nbdkit did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(FailingTarget(child))
    }
}

impl Drop for FailingTarget {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The mirror's filter node (`mirror_top`) in the graph, as QEMU 7.2 has
/// it: listed (implicit name without `filter-node-name`, the given one
/// with it, `flat` and nested), refused by `blockdev-del`, a name clash
/// refused before the job exists, the source blocked by the job, and the
/// node gone once the job ends by cancel, by complete (the target is then
/// the disk's node) or by an error.
#[test]
fn the_mirror_filter_node_is_in_the_graph_as_in_qemu() -> Result<()> {
    let size = 16 * MIB;
    let mut pair = start_pair("mirror-top", size)?;
    for p in &pair.peers {
        create_image(&p.dir.join("t.img"), size)?;
    }
    let mut nbdkits = Vec::new();
    for p in &pair.peers {
        nbdkits.push(FailingTarget::start(&p.dir.join("bad.sock"), size)?);
    }
    let out = same_on_both(&mut pair, "mirror_top", |p| {
        let mut out = Vec::new();
        out.push(p.run(
            "blockdev-add",
            json!({"driver": "file", "node-name": "t0", "filename": p.path("t.img")}),
        )?);
        // Slow enough that the job is still copying while it is looked at.
        let m = |id: &str, filter: Option<&str>| {
            let mut a = json!({"job-id": id, "device": "disk0", "target": "t0",
                               "sync": "full", "speed": 1});
            if let Some(f) = filter {
                a["filter-node-name"] = json!(f);
            }
            a
        };
        let names = |p: &mut Peer, flat| -> Result<String> {
            Ok(format!("{:?}", p.nodes(flat)?.keys().collect::<Vec<_>>()))
        };
        // Name clashes and bad names: refused, and no job was made.
        for bad in ["t0", "disk0", "1x", &"n".repeat(32)] {
            out.push(format!(
                "filter {bad}: {}",
                p.run("blockdev-mirror", m("m0", Some(bad)))?
            ));
        }
        let jobs = p.q.ok("query-jobs", json!({}))?;
        ensure!(
            jobs == json!([]),
            "a refused filter name left a job: {jobs}"
        );
        out.push(format!("nodes: {}", names(p, true)?));
        // drive-mirror has no filter-node-name in QEMU 7.2.
        out.push(p.run(
            "drive-mirror",
            json!({"device": "disk0", "target": p.path("t.img"), "sync": "full",
                   "mode": "existing", "filter-node-name": "mt0"}),
        )?);

        // Without filter-node-name: an implicit node.
        out.push(p.run("blockdev-mirror", m("m1", None))?);
        for flat in [true, false] {
            let nodes = p.nodes(flat)?;
            out.push(format!("implicit, flat {flat}: {}", names(p, flat)?));
            out.extend(filter_fields(&nodes, "#inline1"));
        }
        out.push(format!(
            "del disk0: {}",
            p.run("blockdev-del", json!({"node-name": "disk0"}))?
        ));
        inserted_on(p, "disk0")?;
        out.push(p.run("block-job-cancel", json!({"device": "m1"}))?);
        p.q.wait_event("JOB_STATUS_CHANGE", T, |d| {
            d["id"] == "m1" && d["status"] == "null"
        })?;
        out.push(format!("after cancel: {}", names(p, true)?));

        // With filter-node-name.
        out.push(p.run("blockdev-mirror", m("m2", Some("mt0")))?);
        for flat in [true, false] {
            let nodes = p.nodes(flat)?;
            out.push(format!("named, flat {flat}: {}", names(p, flat)?));
            out.extend(filter_fields(&nodes, "mt0"));
        }
        inserted_on(p, "mt0")?;
        for node in ["mt0", "disk0", "t0"] {
            out.push(format!(
                "del {node}: {}",
                p.run("blockdev-del", json!({"node-name": node}))?
            ));
        }
        out.push(format!(
            "second mirror: {}",
            p.run("blockdev-mirror", m("m9", Some("mt9")))?
        ));
        out.push(p.run("block-job-set-speed", json!({"device": "m2", "speed": 0}))?);
        p.q.wait_event("BLOCK_JOB_READY", T, |d| d["device"] == "m2")?;
        out.push(format!("ready: {}", names(p, true)?));
        out.push(p.run("job-complete", json!({"id": "m2"}))?);
        p.q.wait_event("JOB_STATUS_CHANGE", T, |d| {
            d["id"] == "m2" && d["status"] == "null"
        })?;
        // After the pivot the filter is gone and the target is the disk's
        // node: in use, while the old source is free.
        out.push(format!("after complete: {}", names(p, true)?));
        out.push(format!(
            "del t0 after the pivot: {}",
            p.run("blockdev-del", json!({"node-name": "t0"}))?
        ));
        // The filter's name is free again.
        out.push(p.run(
            "blockdev-add",
            json!({"driver": "file", "node-name": "mt0", "filename": p.path("t.img"),
                   "read-only": true}),
        )?);
        out.push(p.run("blockdev-del", json!({"node-name": "mt0"}))?);
        out.push(p.run(
            "blockdev-add",
            json!({"driver": "nbd", "node-name": "bad0",
                   "server": {"type": "unix", "path": p.path("bad.sock")}}),
        )?);
        // A job that fails on its target: the filter goes with it.
        let mut a = json!({"job-id": "m3", "device": "t0", "target": "bad0",
                           "sync": "full", "filter-node-name": "mt3"});
        if p.name == "vubd" {
            // vubd's device keeps its name across a pivot.
            a["device"] = json!("disk0");
        }
        out.push(p.run("blockdev-mirror", a)?);
        let done =
            p.q.wait_event("BLOCK_JOB_COMPLETED", T, |d| d["device"] == "m3")?;
        out.push(format!("m3 failed: {}", done["data"]["error"].is_string()));
        p.q.wait_event("JOB_STATUS_CHANGE", T, |d| {
            d["id"] == "m3" && d["status"] == "null"
        })?;
        out.push(format!("after the error: {}", names(p, true)?));
        out.push(p.run("blockdev-del", json!({"node-name": "bad0"}))?);
        out.push(p.run("blockdev-del", json!({"node-name": "disk0"}))?);
        Ok(out)
    })?;
    for line in &out {
        eprintln!("{line}");
    }
    drop(nbdkits);
    Ok(())
}
