//! Image fleecing with a graph the client builds itself: `blockdev-add
//! driver=copy-before-write` (QEMU 7.2), run on vubd and on
//! qemu-storage-daemon 7.2 with the same QMP client, libblkio writer and
//! checks.
//!
//! On qsd the guest's export moves from `disk0` onto the filter (QEMU's
//! `qom-set` of the drive); on vubd the filter goes into the guest's path
//! as it is added. Then `snapshot-access` over the filter is exported over
//! NBD: without `bitmap`, `nbdcopy` of it equals the image at the instant
//! the filter went in while a writer writes; with `bitmap`, the clusters
//! under the bitmap's bits equal that image, reads of the others fail
//! (EINVAL over NBD), and the target holds exactly the copies QEMU makes.
//! Argument errors, `blockdev-del` refusals in every order, and the node
//! query must match; the few places where QEMU 7.2 accepts what vubd
//! refuses are asserted per daemon.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use tests::client::Client;
use tests::daemon::ScratchDir;
use tests::fleece::{Peer, Writer, BLOCK, SIZE, TIMEOUT};

const MIB: u64 = 1 << 20;
const CLUSTER: u64 = 65536;
/// The bitmap's granularity: coarser than the filter's 64 KiB clusters,
/// so that each dirty bit stands for 16 clusters.
const BITMAP_GRANULARITY: u64 = MIB;

/// cbw_node's own steps on a fleecing peer.
trait CbwPeer {
    fn small(&self) -> PathBuf;
    fn masked_reply(&mut self, cmd: &str, args: Value) -> Result<Value>;
    fn export_on(&mut self, id: &str, node: &str) -> Result<()>;
    fn refused_by_vubd_only(&mut self, args: Value, vubd_says: &str) -> Result<()>;
}

impl CbwPeer for Peer {
    /// A second, smaller target file.
    fn small(&self) -> PathBuf {
        self.scratch("small.raw")
    }

    /// The reply as a comparable value, with the peer's paths masked (the
    /// second target and the mirror target too).
    fn masked_reply(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let (small, mirror) = (self.small(), self.tmp.with_extension("m"));
        self.reply_masked(cmd, args, &[(&small, "SMALL"), (&mirror, "TMP1")])
    }

    /// Exports `node` as the guest's vhost-user device (qsd only; moving
    /// it onto the filter is QEMU's `qom-set` of the guest's drive).
    fn export_on(&mut self, id: &str, node: &str) -> Result<()> {
        let _ = std::fs::remove_file(&self.vhost);
        self.qmp.ok(
            "block-export-add",
            json!({"type": "vhost-user-blk", "id": id, "node-name": node, "writable": true,
                   "addr": {"type": "unix", "path": self.vhost}}),
        )?;
        Ok(())
    }

    /// `blockdev-add` of a copy-before-write node where QEMU 7.2 accepts
    /// and vubd refuses with `vubd_says`; leaves no node behind.
    fn refused_by_vubd_only(&mut self, args: Value, vubd_says: &str) -> Result<()> {
        let r = self.masked_reply("blockdev-add", args)?;
        if self.qsd {
            ensure!(r == json!({"return": {}}), "qsd: {r}");
            self.qmp.ok("blockdev-del", json!({"node-name": "cx"}))?;
        } else {
            ensure!(r["error"]["desc"] == vubd_says, "vubd: {r}");
        }
        Ok(())
    }
}

/// Writes `(offset, len, byte)` through the guest's device, then flushes.
fn write_by_hand(vhost: &Path, writes: &[(u64, u64, u8)]) -> Result<()> {
    let mut c = Client::connect(vhost, 1, false)?;
    for &(off, len, byte) in writes {
        c.write(off, &vec![byte; len as usize])?;
    }
    Ok(c.flush()?)
}

/// Runs a stock tool; Ok(stdout) or Err(stderr).
fn tool(program: &str, args: &[&str]) -> Result<std::result::Result<String, String>> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(match out.status.success() {
        true => Ok(text(&out.stdout)),
        false => Err(text(&out.stderr)),
    })
}

/// `qemu-img dd` of clusters `[first, first + n)` of the export into
/// `out`: Ok, or the error kind (the errno's text QEMU prints).
fn read_clusters(
    p: &Peer,
    first: u64,
    n: u64,
    out: &Path,
) -> Result<std::result::Result<(), String>> {
    let _ = std::fs::remove_file(out);
    let r = tool(
        "qemu-img",
        &[
            "dd",
            "-f",
            "raw",
            "-O",
            "raw",
            &format!("bs={CLUSTER}"),
            &format!("skip={first}"),
            // qemu-img 7.2 counts `count` from the start of the input.
            &format!("count={}", first + n),
            &format!("if={}", p.uri("snap")),
            &format!("of={}", out.display()),
        ],
    )?;
    Ok(r.map(|_| ()).map_err(|e| {
        [
            "Invalid argument",
            "Permission denied",
            "Input/output error",
        ]
        .into_iter()
        .find(|k| e.contains(k))
        .unwrap_or("other")
        .to_string()
    }))
}

fn cbw_args(extra: Value) -> Value {
    let mut a = json!({"driver": "copy-before-write", "node-name": "cbw0",
                       "file": "disk0", "target": "tmp0"});
    if let (Some(m), Some(e)) = (a.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    a
}

/// The fields of a node both daemons report alike (vubd's filter and
/// snapshot nodes say `ro: true`, documented; qsd lists the filter's
/// internal bitmaps).
fn node_fields(nodes: &Value, name: &str) -> Value {
    let n = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == name))
        .cloned()
        .unwrap_or(Value::Null);
    json!([n["drv"], n["image"]["format"], n["image"]["virtual-size"]])
}

/// The flow on one peer; returns what must equal the other peer's.
fn flow(p: &mut Peer, with_bitmap: bool) -> Result<Vec<Value>> {
    let mut seen = Vec::new();
    std::fs::File::create(&p.tmp)?.set_len(SIZE)?;
    std::fs::File::create(p.small())?.set_len(SIZE / 2)?;
    let mirror_target = p.tmp.with_extension("m");
    std::fs::File::create(&mirror_target)?.set_len(SIZE)?;
    for (node, path) in [
        ("tmp0", p.tmp.clone()),
        ("small0", p.small().clone()),
        ("tmp1", mirror_target),
    ] {
        seen.push(p.masked_reply(
            "blockdev-add",
            json!({"driver": "file", "node-name": node, "filename": path}),
        )?);
    }
    // The bitmap's bits: 1 MiB chunks 1, 5 and 40 (the last in the hole).
    let dirty_chunks = [1u64, 5, 40];
    seen.push(p.masked_reply(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "b1m", "granularity": BITMAP_GRANULARITY}),
    )?);
    let marks: Vec<(u64, u64, u8)> = dirty_chunks
        .iter()
        .map(|c| (c * MIB + 3 * CLUSTER, BLOCK, 0x41))
        .collect();
    write_by_hand(&p.vhost, &marks)?;

    // Argument errors, in QEMU's order, each leaving nothing behind.
    for args in [
        json!({"driver": "copy-before-write", "node-name": "cbw0", "file": "disk0"}),
        json!({"driver": "copy-before-write", "node-name": "cbw0", "target": "tmp0"}),
        json!({"driver": "copy-before-write", "node-name": "cbw0"}),
        cbw_args(json!({"file": "nope"})),
        cbw_args(json!({"target": "nope"})),
        cbw_args(json!({"node-name": "1x"})),
        cbw_args(json!({"node-name": "disk0"})),
        cbw_args(json!({"bitmap": "b1m"})),
        cbw_args(json!({"bitmap": {"node": "disk0"}})),
        cbw_args(json!({"bitmap": {"node": "nonode", "name": "b1m"}})),
        cbw_args(json!({"bitmap": {"node": "disk0", "name": "nob"}})),
        cbw_args(json!({"bitmap": {"node": "tmp0", "name": "b1m"}})),
        cbw_args(json!({"bitmap": {"node": "disk0", "name": "b1m", "x": 1}})),
        cbw_args(json!({"on-cbw-error": "x"})),
        cbw_args(json!({"cbw-timeout": -1})),
        cbw_args(json!({"cbw-timeout": 1u64 << 33})),
        cbw_args(json!({"cbw-timeout": "x"})),
        cbw_args(json!({"bogus": 1})),
    ] {
        seen.push(p.masked_reply("blockdev-add", args)?);
    }
    // QEMU 7.2 takes these; vubd refuses them (docs/backup.md).
    let cx = |extra: Value| {
        let mut a = cbw_args(extra);
        a["node-name"] = json!("cx");
        a
    };
    p.refused_by_vubd_only(
        cx(json!({"target": "small0"})),
        "Source and target image have different sizes",
    )?;
    p.refused_by_vubd_only(
        cx(json!({"file": "tmp0", "target": "small0"})),
        "vubd puts a copy-before-write filter over the guest's disk only, not over node 'tmp0'",
    )?;
    p.refused_by_vubd_only(
        cx(json!({"target": "disk0"})),
        "Node 'disk0' cannot be a copy-before-write target",
    )?;

    // The filter goes in: the snapshot is the image now.
    let extra = match with_bitmap {
        true => json!({"bitmap": {"node": "disk0", "name": "b1m"},
                       "on-cbw-error": "break-snapshot", "cbw-timeout": 30}),
        false => json!({"on-cbw-error": "break-guest-write", "cbw-timeout": 0}),
    };
    let instant = std::fs::read(&p.image)?;
    if p.qsd {
        p.qmp.ok("block-export-del", json!({"id": "e0"}))?;
        p.qmp
            .wait_event("BLOCK_EXPORT_DELETED", TIMEOUT, |d| d["id"] == "e0")?;
    }
    seen.push(p.masked_reply("blockdev-add", cbw_args(extra))?);
    if p.qsd {
        p.export_on("e1", "cbw0")?;
    }
    seen.push(p.masked_reply(
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "acc0", "file": "cbw0"}),
    )?);
    seen.push(p.masked_reply(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": p.nbd}}}),
    )?);
    seen.push(p.masked_reply(
        "block-export-add",
        json!({"type": "nbd", "id": "x0", "node-name": "acc0", "name": "snap"}),
    )?);
    // A mirror would swap the image under the filter.
    seen.push(p.masked_reply(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "disk0", "target": "tmp1", "sync": "full"}),
    )?);
    let nodes = p.qmp.ok("query-named-block-nodes", json!({"flat": true}))?;
    seen.push(node_fields(&nodes, "cbw0"));
    seen.push(node_fields(&nodes, "acc0"));

    let out = p.tmp.with_extension("out");
    if with_bitmap {
        // Writes inside and outside the bitmap's chunks, by hand: the
        // copies the filter makes are the same on both daemons.
        let writes: Vec<(u64, u64, u8)> = vec![
            (0, BLOCK, 0x61),
            (MIB + CLUSTER, 2 * CLUSTER, 0x62),
            (2 * MIB, BLOCK, 0x63),
            (5 * MIB + 15 * CLUSTER + 512, 1024, 0x64),
            (40 * MIB, MIB, 0x65),
            (48 * MIB, BLOCK, 0x66),
        ];
        write_by_hand(&p.vhost, &writes)?;
        for &c in &dirty_chunks {
            let n = BITMAP_GRANULARITY / CLUSTER;
            let first = c * n;
            let r = read_clusters(p, first, n, &out)?;
            ensure!(r.is_ok(), "{}: chunk {c}: {r:?}", p.name);
            let got = std::fs::read(&out)?;
            let at = (first * CLUSTER) as usize;
            let want = &instant[at..at + BITMAP_GRANULARITY as usize];
            if let Some(i) = (0..want.len()).find(|&i| got.get(i) != Some(&want[i])) {
                bail!(
                    "{}: chunk {c} of the snapshot differs from the image at the instant at byte {}",
                    p.name,
                    at + i
                );
            }
        }
        // Clusters outside the bitmap: each read's outcome.
        for first in [0, 2 * MIB / CLUSTER, 6 * MIB / CLUSTER, 48 * MIB / CLUSTER] {
            seen.push(json!([first, read_clusters(p, first, 1, &out)?]));
        }
        // A read across the edge of a chunk.
        seen.push(json!(read_clusters(p, 2 * MIB / CLUSTER - 1, 2, &out)?));
        seen.push(json!(tool(
            "nbdcopy",
            &[&p.uri("snap"), &out.to_string_lossy()]
        )?
        .is_ok()));
        // The target holds exactly the clusters QEMU copies.
        ensure!(
            std::fs::read(&p.tmp)? == expected_target(&instant, &dirty_chunks, &writes),
            "{}: the target is not the copies of the written clusters inside the bitmap",
            p.name
        );
    } else {
        let w = Writer::start(&p.vhost, 7)?;
        w.wait_writes(50)?;
        let r = tool("nbdcopy", &[&p.uri("snap"), &out.to_string_lossy()])?;
        ensure!(r.is_ok(), "{}: nbdcopy: {r:?}", p.name);
        w.wait_writes(20)?;
        w.stop()?;
        ensure!(
            std::fs::read(&out)? == instant,
            "{}: the snapshot differs from the image at the instant the filter went in",
            p.name
        );
    }

    // blockdev-del while the guest writes through the filter.
    for node in ["disk0", "tmp0", "cbw0", "acc0"] {
        if node == "cbw0" && p.qsd {
            // vubd's blockdev-del of the filter takes the guest off it
            // first (QEMU refuses it while the guest's export is on it).
            p.qmp.ok("block-export-del", json!({"id": "e1"}))?;
            p.qmp
                .wait_event("BLOCK_EXPORT_DELETED", TIMEOUT, |d| d["id"] == "e1")?;
        }
        seen.push(p.masked_reply("blockdev-del", json!({"node-name": node}))?);
    }
    seen.push(p.masked_reply("block-export-del", json!({"id": "x0"}))?);
    p.qmp
        .wait_event("BLOCK_EXPORT_DELETED", TIMEOUT, |d| d["id"] == "x0")?;
    seen.push(p.masked_reply("nbd-server-stop", json!({}))?);
    let target_before = std::fs::read(&p.tmp)?;
    for node in ["tmp0", "acc0", "cbw0", "cbw0", "tmp0", "small0", "tmp1"] {
        seen.push(p.masked_reply("blockdev-del", json!({"node-name": node}))?);
    }
    if p.qsd {
        p.export_on("e2", "disk0")?;
    }
    // Out of the guest's path: a write copies nothing any more.
    write_by_hand(&p.vhost, &[(10 * MIB, BLOCK, 0x77)])?;
    ensure!(
        std::fs::read(&p.tmp)? == target_before,
        "{}: a write after blockdev-del of the filter still copied",
        p.name
    );
    let nodes = p.qmp.ok("query-named-block-nodes", json!({"flat": true}))?;
    let names: Vec<Value> = nodes
        .as_array()
        .map(|a| a.iter().map(|n| n["node-name"].clone()).collect())
        .unwrap_or_default();
    seen.push(json!(names));
    Ok(seen)
}

/// The target after `writes` with the filter over a bitmap of the 1 MiB
/// `chunks`: each written 64 KiB cluster inside them holds the image at
/// the instant, everything else is zero.
fn expected_target(instant: &[u8], chunks: &[u64], writes: &[(u64, u64, u8)]) -> Vec<u8> {
    let mut t = vec![0u8; instant.len()];
    for &(off, len, _) in writes {
        for c in off / CLUSTER..(off + len).div_ceil(CLUSTER) {
            if chunks.contains(&(c * CLUSTER / BITMAP_GRANULARITY)) {
                let r = (c * CLUSTER) as usize..((c + 1) * CLUSTER) as usize;
                t[r.clone()].copy_from_slice(&instant[r]);
            }
        }
    }
    t
}

fn compare(with_bitmap: bool, tag: &str) -> Result<()> {
    let dir = ScratchDir::new(tag)?;
    let mut results = Vec::new();
    for qsd in [false, true] {
        let mut p = Peer::start(&dir, qsd, "")?;
        let seen = flow(&mut p, with_bitmap).with_context(|| p.name)?;
        results.push(seen);
    }
    let (ours, theirs) = (&results[0], &results[1]);
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        ensure!(a == b, "step {i}: vubd {a} vs qsd {b}");
    }
    ensure!(ours.len() == theirs.len(), "step count");
    Ok(())
}

/// Without `bitmap`: the whole snapshot is the image at the instant the
/// filter went in, under a writer.
#[test]
fn cbw_node_snapshot_matches_qemu() -> Result<()> {
    compare(false, "cbw-node")
}

/// With a 1 MiB-granularity `bitmap`: only its chunks are copied and
/// readable, as on QEMU.
#[test]
fn cbw_node_with_bitmap_matches_qemu() -> Result<()> {
    compare(true, "cbw-node-bitmap")
}
