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
