//! Pull-mode backup by image fleecing, the flow of issue 10 with QEMU
//! 7.2's commands, run on vubd and on qemu-storage-daemon 7.2 with the same
//! QMP client, the same libblkio writer and the same checks:
//!
//! `blockdev-add file tmp0` → `transaction [bitmap-disable b0, bitmap-add
//! b1, blockdev-backup sync=none filter-node-name=cbw0]` → `blockdev-add
//! snapshot-access acc0` → `nbd-server-start` → `block-export-add acc0
//! bitmaps [disk0/b0]` → while a libblkio client keeps writing: `nbdcopy`
//! equals the image as it was at the transaction, byte for byte, and
//! `nbdinfo --map=qemu:dirty-bitmap:b0` covers every block written between
//! the two checkpoints → teardown. The replies to the commands (and their
//! refusals) and the job's events and query fields must be the same.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::client::Client;
use tests::daemon::{Daemon, ScratchDir};
use tests::fleece::{Peer, Writer, BLOCK, SIZE, TIMEOUT};
use tests::nbd_tools::{apply_dirty_extents, dirty_extents, map, run};
use tests::qmp_client::{event_label, QmpClient};

const MIB: u64 = 1 << 20;
const GRANULARITY: u64 = 65536;

/// The job events up to its `null`; QEMU's drained sections pause and
/// resume a running job, which is no part of the contract, so `paused`
/// and the `running` after it are left out.
fn job_events_until_null(q: &mut QmpClient) -> Result<Vec<Value>> {
    let deadline = Instant::now() + TIMEOUT;
    let mut events: Vec<Value> = Vec::new();
    loop {
        for e in q.take_events()? {
            let n = e["event"].as_str().unwrap_or("");
            if !(n.starts_with("BLOCK_JOB") || n == "JOB_STATUS_CHANGE") {
                continue;
            }
            let label = event_label(&e);
            let last = events.last().map(event_label);
            if label == "paused" || (label == "running" && last.as_deref() == Some("running")) {
                continue;
            }
            events.push(e);
        }
        if events.iter().any(|e| event_label(e) == "null") {
            return Ok(events);
        }
        ensure!(Instant::now() < deadline, "no null event: {events:?}");
    }
}

/// The events as labels, with each block job event's data.
fn describe(events: &[Value]) -> Value {
    json!(events
        .iter()
        .map(|e| match e["event"].as_str() {
            Some(n) if n.starts_with("BLOCK_JOB") => json!([n, e["data"]]),
            _ => json!(event_label(e)),
        })
        .collect::<Vec<_>>())
}

fn backup_args(extra: Value) -> Value {
    let mut a = json!({"job-id": "fl0", "device": "disk0", "target": "tmp0",
                       "sync": "none", "filter-node-name": "cbw0"});
    if let (Some(m), Some(e)) = (a.as_object_mut(), extra.as_object()) {
        m.extend(e.clone());
    }
    a
}

/// `block-export-del`, `blockdev-del acc0`, `block-job-cancel`,
/// `blockdev-del tmp0`, with the replies and the job's events.
fn teardown(p: &mut Peer, seen: &mut Vec<Value>) -> Result<()> {
    seen.push(p.reply("block-export-del", json!({"id": "x0"}))?);
    p.qmp
        .wait_event("BLOCK_EXPORT_DELETED", TIMEOUT, |d| d["id"] == "x0")?;
    seen.push(p.reply("blockdev-del", json!({"node-name": "acc0"}))?);
    p.qmp.take_events()?;
    seen.push(p.reply("block-job-cancel", json!({"device": "fl0"}))?);
    let mut events = job_events_until_null(&mut p.qmp)?;
    for e in &mut events {
        // The bytes copied depend on the writer's pace.
        if let Some(d) = e["data"].as_object_mut() {
            if let Some(o) = d.remove("offset") {
                ensure!(o.as_u64() <= Some(SIZE), "{}: offset {o}", p.name);
            }
        }
    }
    seen.push(describe(&events));
    seen.push(p.reply("blockdev-del", json!({"node-name": "tmp0"}))?);
    Ok(())
}

/// Requires the file at `path` to equal `want`.
fn same(p: &Peer, path: &Path, want: &[u8], what: &str) -> Result<()> {
    let got = std::fs::read(path)?;
    ensure!(got.len() == want.len(), "{}: {what}: size", p.name);
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        bail!(
            "{}: {what} differs from the image at the transaction at byte {i}",
            p.name
        );
    }
    Ok(())
}

/// The full backup: b0 starts at the snapshot's instant; the export is
/// copied with `nbdcopy` while the writer writes. Returns the blocks
/// written after the instant.
fn full_backup(p: &mut Peer, seen: &mut Vec<Value>, full: &Path) -> Result<BTreeSet<u64>> {
    let persistent = p.name == "vubd";
    let instant = std::fs::read(&p.image)?;
    std::fs::File::create(&p.tmp)?.set_len(SIZE)?;
    seen.push(p.reply(
        "blockdev-add",
        json!({"driver": "file", "node-name": "tmp0", "filename": p.tmp}),
    )?);
    seen.push(p.reply(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk0", "name": "b0", "persistent": persistent}},
            {"type": "blockdev-backup", "data": backup_args(json!({}))}]}),
    )?);
    let w = Writer::start(&p.vhost, 3)?;
    seen.push(p.reply(
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "acc0", "file": "cbw0"}),
    )?);
    seen.push(p.reply(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": p.nbd}}}),
    )?);
    seen.push(p.reply(
        "block-export-add",
        json!({"type": "nbd", "id": "x0", "node-name": "acc0", "name": "backup"}),
    )?);
    w.wait_writes(20)?;
    run("nbdcopy", &[&p.uri("backup"), &full.to_string_lossy()])?;
    w.wait_writes(20)?;
    same(p, full, &instant, "the full backup")?;
    let written = w.stop()?;
    teardown(p, seen)?;
    Ok(written)
}

/// The flow on one peer, full then incremental; returns what
/// must equal the other peer's (replies, job fields, events).
fn flow(p: &mut Peer) -> Result<Vec<Value>> {
    let mut seen = Vec::new();
    let full = p.tmp.with_extension("full");
    // Writes between the checkpoints: during the full backup, then some
    // by hand, then a writer up to the next checkpoint.
    let mut between = full_backup(p, &mut seen, &full)?;
    {
        let mut c = Client::connect(&p.vhost, 1, false)?;
        for (off, len) in [(0, 512), (GRANULARITY - 512, 4096), (40 * MIB, 4096)] {
            c.write(off, &vec![0x5a; len as usize])?;
            between.extend(off / BLOCK..(off + len).div_ceil(BLOCK));
        }
        c.flush()?;
    }
    std::fs::File::create(&p.tmp)?.set_len(SIZE)?;
    seen.push(p.reply(
        "blockdev-add",
        json!({"driver": "file", "node-name": "tmp0", "filename": p.tmp}),
    )?);
    let backup = backup_args;
    // Refusals, each leaving nothing behind.
    for extra in [
        json!({"compress": true}),
        json!({"target": "disk0"}),
        json!({"target": "nope"}),
        json!({"device": "nope"}),
        json!({"filter-node-name": "disk0"}),
        json!({"filter-node-name": "1x"}),
        json!({"job-id": "fl 0"}),
        json!({"speed": -1}),
        json!({"bitmap-mode": "never"}),
        json!({"bitmap": "zz"}),
        json!({"bitmap": "b0", "bitmap-mode": "on-success"}),
    ] {
        seen.push(p.reply("blockdev-backup", backup(extra))?);
    }
    seen.push(p.reply(
        "transaction",
        json!({"actions": [{"type": "blockdev-backup", "data": backup(json!({}))},
                           {"type": "abort", "data": {}}]}),
    )?);
    seen.push(p.reply("query-block-jobs", json!({}))?);
    p.qmp.take_events()?;

    // The checkpoint: the writer pauses so that the image at the
    // transaction is known exactly, and resumes right after it.
    let w = Writer::start(&p.vhost, 7)?;
    w.wait_writes(50)?;
    between.extend(w.stop()?);
    let instant = std::fs::read(&p.image)?;
    // b1 is persistent on vubd; QEMU cannot store bitmaps in a raw file.
    let persistent = p.name == "vubd";
    seen.push(p.reply(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk0", "name": "b0"}},
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk0", "name": "b1", "persistent": persistent}},
            {"type": "blockdev-backup", "data": backup(json!({}))}]}),
    )?);
    let w = Writer::start(&p.vhost, 11)?;
    seen.push(p.reply(
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "acc0", "file": "cbw0"}),
    )?);
    seen.push(p.reply(
        "block-export-add",
        json!({"type": "nbd", "id": "x0", "node-name": "acc0", "name": "backup",
               "bitmaps": [{"node": "disk0", "name": "b0"}]}),
    )?);
    // The target and the filter belong to the job.
    seen.push(p.reply("blockdev-del", json!({"node-name": "tmp0"}))?);
    seen.push(p.reply("blockdev-del", json!({"node-name": "cbw0"}))?);
    // The export holds its node; the disk is busy with the backup: a
    // mirror's pivot would swap the image under the filter.
    seen.push(p.reply("blockdev-del", json!({"node-name": "acc0"}))?);
    let mirror_target = p.tmp.with_extension("mt");
    std::fs::File::create(&mirror_target)?.set_len(SIZE)?;
    seen.push(p.reply(
        "blockdev-add",
        json!({"driver": "file", "node-name": "mt0", "filename": mirror_target}),
    )?);
    seen.push(p.reply(
        "blockdev-mirror",
        json!({"job-id": "m0", "device": "disk0", "target": "mt0", "sync": "full"}),
    )?);
    seen.push(p.reply("blockdev-del", json!({"node-name": "mt0"}))?);
    // The copy, while the writer keeps writing.
    w.wait_writes(20)?;
    let mut jobs = p.qmp.ok("query-block-jobs", json!({}))?;
    if let Some(j) = jobs.get_mut(0).and_then(Value::as_object_mut) {
        // Whether the job's coroutine/thread is on a CPU right now.
        j.remove("busy");
        // Bytes copied before writes so far: a job of the writer's pace.
        let offset = j.remove("offset").and_then(|o| o.as_u64()).unwrap_or(0);
        ensure!(
            offset >= GRANULARITY && offset % GRANULARITY == 0,
            "{}: offset {offset} after the writer's first writes",
            p.name
        );
    }
    seen.push(jobs);
    let before = w.writes();
    let out = p.tmp.with_extension("copy");
    let started = Instant::now();
    run("nbdcopy", &[&p.uri("backup"), &out.to_string_lossy()])?;
    let took = started.elapsed();
    let during = w.writes() - before;
    w.wait_writes(20)?;
    same(p, &out, &instant, "the export")?;
    ensure!(
        std::fs::read(&p.image)? != instant,
        "{}: the guest's writes did not reach the disk",
        p.name
    );
    // Every block written between the checkpoints is dirty in b0.
    let dirty = dirty_extents(&p.uri("backup"), "b0")?;
    for b in &between {
        let (s, e) = (b * BLOCK, (b + 1) * BLOCK);
        ensure!(
            dirty.iter().any(|&(a, z)| a <= s && e <= z),
            "{}: block {b} written between the checkpoints is not in b0",
            p.name
        );
    }
    // What base:allocation calls zero reads as zeroes at the instant.
    for (off, len, ty) in map(&p.uri("backup"), "base:allocation")? {
        if ty & 2 == 2 {
            let r = off as usize..(off + len) as usize;
            ensure!(
                instant[r].iter().all(|&x| x == 0),
                "{}: {off}+{len} reported zero",
                p.name
            );
        }
    }
    // The incremental backup, as docs/backup.md has it: the dirty
    // extents of b0 copied from the export into the full backup.
    apply_dirty_extents(&p.nbd, "backup", "b0", &full).context(p.name)?;
    same(p, &full, &instant, "the full backup plus the increment")?;
    let written_after = w.stop()?;
    eprintln!(
        "{}: nbdcopy of the export took {took:?}; {during} guest 4k writes (QD1) completed meanwhile \
         ({:.0}/s); {} blocks written after the checkpoint",
        p.name,
        during as f64 / took.as_secs_f64(),
        written_after.len()
    );

    teardown(p, &mut seen)?;
    seen.push(p.reply("query-block-jobs", json!({}))?);
    let nodes = p.qmp.ok("query-named-block-nodes", json!({"flat": true}))?;
    let names: Vec<Value> = nodes
        .as_array()
        .map(|a| a.iter().map(|n| n["node-name"].clone()).collect())
        .unwrap_or_default();
    seen.push(json!(names));
    Ok(seen)
}

#[test]
fn fleecing_flow_matches_qemu() -> Result<()> {
    let dir = ScratchDir::new("backup")?;
    let mut results = Vec::new();
    for qsd in [false, true] {
        let mut p = Peer::start(&dir, qsd, "discard=unmap")?;
        let seen = flow(&mut p).with_context(|| p.name)?;
        results.push((p.name, seen));
    }
    let (ours, theirs) = (&results[0], &results[1]);
    for (i, (a, b)) in ours.1.iter().zip(&theirs.1).enumerate() {
        ensure!(a == b, "step {i}: vubd {a} vs qsd {b}");
    }
    ensure!(ours.1.len() == theirs.1.len(), "step count");
    Ok(())
}

/// Each job's events, in order, by job id (two jobs' events interleave
/// differently from run to run).
fn events_by_job(events: &[Value]) -> Value {
    let mut by: std::collections::BTreeMap<String, Vec<Value>> = Default::default();
    for e in events {
        let id = e["data"]["id"].as_str().or(e["data"]["device"].as_str());
        by.entry(id.unwrap_or_default().to_string())
            .or_default()
            .push(e.clone());
    }
    json!(by
        .into_iter()
        .map(|(id, ev)| (id, describe(&ev)))
        .collect::<serde_json::Map<_, _>>())
}

/// The job events until every job in `ids` reached `null`.
fn events_until_all_null(q: &mut QmpClient, ids: &[&str]) -> Result<Vec<Value>> {
    let deadline = Instant::now() + TIMEOUT;
    let mut events: Vec<Value> = Vec::new();
    let null = |e: &Value, id: &str| event_label(e) == "null" && e["data"]["id"] == id;
    while !ids.iter().all(|id| events.iter().any(|e| null(e, id))) {
        ensure!(Instant::now() < deadline, "not all jobs ended: {events:?}");
        for e in q.take_events()? {
            let n = e["event"].as_str().unwrap_or("");
            // Drained sections pause and resume running jobs (see above).
            let label = event_label(&e);
            if (n.starts_with("BLOCK_JOB") || n == "JOB_STATUS_CHANGE") && label != "paused" {
                events.push(e);
            }
        }
    }
    // After the pauses left out, "running" repeats: keep each job's first.
    let mut last: std::collections::HashMap<String, String> = Default::default();
    events.retain(|e| {
        let id = e["data"]["id"].as_str().unwrap_or_default().to_string();
        let label = event_label(e);
        let keep = !(label == "running" && last.get(&id).map(String::as_str) == Some("running"));
        if e["event"] == "JOB_STATUS_CHANGE" {
            last.insert(id, label);
        }
        keep
    });
    Ok(events)
}

/// The job statuses `query-jobs` lists, by id.
fn job_statuses(p: &mut Peer) -> Result<Value> {
    let jobs = p.qmp.ok("query-jobs", json!({}))?;
    let mut out = serde_json::Map::new();
    for j in jobs.as_array().cloned().unwrap_or_default() {
        let id = j["id"].as_str().unwrap_or_default().to_string();
        out.insert(id, j["status"].clone());
    }
    Ok(Value::Object(out))
}

/// Waits until job `id` has status `status`.
fn wait_status(p: &mut Peer, id: &str, status: &str) -> Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    while job_statuses(p)?[id] != status {
        ensure!(
            Instant::now() < deadline,
            "{}: {id} never became {status}",
            p.name
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

/// `completion-mode: grouped` on one peer: two backups of the disk in one
/// transaction; the quick one waits for the slow one (1 byte/s until its
/// speed is lifted), then both complete; cancelling the slow one cancels
/// the waiting one too; bitmap actions refuse the mode.
fn grouped_flow(p: &mut Peer) -> Result<Vec<Value>> {
    let mut seen = Vec::new();
    for t in ["t0", "t1"] {
        let path = p.scratch(t);
        std::fs::File::create(&path)?.set_len(SIZE)?;
        p.qmp.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": t, "filename": path}),
        )?;
    }
    let backup = |id: &str, target: &str, speed: u64| {
        json!({"type": "blockdev-backup",
               "data": {"job-id": id, "device": "disk0", "target": target,
                        "sync": "full", "speed": speed}})
    };
    let grouped =
        |actions: Value| json!({"actions": actions, "properties": {"completion-mode": "grouped"}});
    seen.push(p.reply(
        "transaction",
        grouped(json!([backup("g0", "t0", 0),
                       {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": "g"}}])),
    )?);
    for end in ["set-speed", "cancel"] {
        p.qmp.take_events()?;
        seen.push(p.reply(
            "transaction",
            grouped(json!([backup("g0", "t0", 0), backup("g1", "t1", 1)])),
        )?);
        wait_status(p, "g0", "waiting")?;
        seen.push(job_statuses(p)?);
        seen.push(match end {
            "set-speed" => p.reply("block-job-set-speed", json!({"device": "g1", "speed": 0}))?,
            _ => p.reply("block-job-cancel", json!({"device": "g1"}))?,
        });
        let mut events = events_until_all_null(&mut p.qmp, &["g0", "g1"])?;
        for e in &mut events {
            // How far the slow job got before its end is the daemon's pace.
            if e["data"]["device"] == "g1" && end == "cancel" {
                if let Some(d) = e["data"].as_object_mut() {
                    d.remove("offset");
                }
            }
        }
        seen.push(events_by_job(&events));
    }
    let image = std::fs::read(&p.image)?;
    same(p, &p.scratch("t0"), &image, "the grouped backup")?;
    Ok(seen)
}

#[test]
fn grouped_backups_match_qemu() -> Result<()> {
    let dir = ScratchDir::new("grouped")?;
    let mut results = Vec::new();
    for qsd in [false, true] {
        let mut p = Peer::start(&dir, qsd, "discard=unmap")?;
        results.push(grouped_flow(&mut p).with_context(|| p.name)?);
    }
    for (i, (a, b)) in results[0].iter().zip(&results[1]).enumerate() {
        ensure!(a == b, "step {i}: vubd {a} vs qsd {b}");
    }
    ensure!(results[0].len() == results[1].len(), "step count");
    Ok(())
}

/// A push backup (`sync: full`) while the writer writes: the target is
/// the image as it was when the command returned, byte for byte, and the
/// job's events and final progress are QEMU's.
#[test]
fn push_backup_matches_qemu() -> Result<()> {
    let dir = ScratchDir::new("push")?;
    let mut results = Vec::new();
    for qsd in [false, true] {
        let mut p = Peer::start(&dir, qsd, "discard=unmap")?;
        let instant = std::fs::read(&p.image)?;
        std::fs::File::create(&p.tmp)?.set_len(SIZE)?;
        p.qmp.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": "tmp0", "filename": p.tmp}),
        )?;
        p.qmp.take_events()?;
        p.qmp.ok(
            "blockdev-backup",
            json!({"job-id": "push0", "device": "disk0", "target": "tmp0", "sync": "full"}),
        )?;
        // Paused, so that the guest's writes certainly meet the copy.
        p.qmp.ok("block-job-pause", json!({"device": "push0"}))?;
        let w = Writer::start(&p.vhost, 5)?;
        w.wait_writes(50)?;
        p.qmp.ok("block-job-resume", json!({"device": "push0"}))?;
        let events = job_events_until_null(&mut p.qmp)?;
        w.stop()?;
        same(&p, &p.tmp, &instant, "the push backup")?;
        let mut seen = vec![describe(&events)];
        seen.push(p.reply("blockdev-del", json!({"node-name": "tmp0"}))?);
        results.push(seen);
    }
    ensure!(
        results[0] == results[1],
        "vubd {:?} vs qsd {:?}",
        results[0],
        results[1]
    );
    Ok(())
}

/// `sync: incremental` (and QEMU's refusals of bitmap arguments) on vubd
/// and qsd: blocks written before the start are the copy set; a writer
/// writes during the job (slowed, so the writes meet the copy). The
/// replies, the job's events (`len` is the copy set's size) must be
/// QEMU's; on each peer the target holds the copy set's clusters as at
/// the start and zeroes elsewhere, and the bitmap is then exactly the
/// clusters written during the job.
#[test]
fn incremental_backup_matches_qemu() -> Result<()> {
    let dir = ScratchDir::new("incr")?;
    let mut results = Vec::new();
    for qsd in [false, true] {
        let mut p = Peer::start(&dir, qsd, "discard=unmap")?;
        let persistent = !qsd;
        std::fs::File::create(&p.tmp)?.set_len(SIZE)?;
        let mut seen = Vec::new();
        seen.push(p.reply(
            "blockdev-add",
            json!({"driver": "file", "node-name": "tmp0", "filename": p.tmp}),
        )?);
        seen.push(p.reply(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b0", "persistent": persistent}),
        )?);
        let mut c = Client::connect(&p.vhost, 1, false)?;
        let set: Vec<u64> = vec![1, 2, 17, 300, 700];
        for &cl in &set {
            c.write(cl * GRANULARITY + 4096, &[0x5a; 4096])?;
        }
        c.flush()?;
        drop(c);
        let instant = std::fs::read(&p.image)?;
        let base = json!({"job-id": "i0", "device": "disk0", "target": "tmp0"});
        let with = |extra: Value| {
            let mut a = base.clone();
            if let (Some(m), Some(e)) = (a.as_object_mut(), extra.as_object()) {
                m.extend(e.clone());
            }
            a
        };
        for bad in [
            json!({"sync": "incremental"}),
            json!({"sync": "bitmap", "bitmap": "nope", "bitmap-mode": "always"}),
            json!({"sync": "bitmap", "bitmap": "b0"}),
            json!({"sync": "incremental", "bitmap": "b0", "bitmap-mode": "always"}),
            json!({"sync": "full", "bitmap": "b0", "bitmap-mode": "never"}),
            json!({"sync": "none", "bitmap": "b0", "bitmap-mode": "always"}),
            json!({"sync": "full", "bitmap-mode": "always"}),
        ] {
            seen.push(p.reply("blockdev-backup", with(bad))?);
        }
        p.qmp.take_events()?;
        seen.push(p.reply(
            "blockdev-backup",
            with(json!({"sync": "incremental", "bitmap": "b0", "speed": 1})),
        )?);
        // Slowed after its first piece, so that the writes meet the copy.
        let w = Writer::start(&p.vhost, 9)?;
        w.wait_writes(50)?;
        p.qmp
            .ok("block-job-set-speed", json!({"device": "i0", "speed": 0}))?;
        let events = job_events_until_null(&mut p.qmp)?;
        let written = w.stop()?;
        seen.push(describe(&events));
        let target = std::fs::read(&p.tmp)?;
        for cl in 0..SIZE / GRANULARITY {
            let r = (cl * GRANULARITY) as usize..((cl + 1) * GRANULARITY) as usize;
            if set.contains(&cl) {
                ensure!(
                    target[r.clone()] == instant[r],
                    "{}: cluster {cl} is not the start's",
                    p.name
                );
            } else {
                ensure!(
                    target[r].iter().all(|&b| b == 0),
                    "{}: cluster {cl} copied",
                    p.name
                );
            }
        }
        let clusters: BTreeSet<u64> = written.iter().map(|b| b * BLOCK / GRANULARITY).collect();
        let nodes = p.qmp.ok("query-named-block-nodes", json!({}))?;
        let count = nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node-name"] == "disk0"))
            .and_then(|n| n["dirty-bitmaps"].as_array().cloned())
            .and_then(|b| b.iter().find(|b| b["name"] == "b0").cloned())
            .context("b0")?;
        ensure!(
            count["count"].as_u64() == Some(clusters.len() as u64 * GRANULARITY)
                && count["busy"] == false
                && count["recording"] == true,
            "{}: b0 {count} after the job, {} clusters written during it",
            p.name,
            clusters.len()
        );
        seen.push(p.reply("blockdev-del", json!({"node-name": "tmp0"}))?);
        results.push(seen);
    }
    ensure!(
        results[0] == results[1],
        "vubd {:?} vs qsd {:?}",
        results[0],
        results[1]
    );
    Ok(())
}

/// Set when a figures run is interrupted (never here); `bench::measure`
/// takes one.
static STOP: AtomicBool = AtomicBool::new(false);

/// One measurement of `cbw_write_figures`: a fresh daemon on `image`, a
/// fleecing set-up (filter cbw0 to a new sparse tmp0, acc0 exported), and
/// 4 KiB random writes at `qd` for the window while `nbdcopy` reads the
/// export to `null:` over and over. Returns the writes' figures and the
/// number of full reads that finished.
fn fleecing_write_load(
    dir: &ScratchDir,
    image: &Path,
    qsd: bool,
    qd: usize,
    window: tests::bench::Window,
) -> Result<(tests::bench::Measurement, u32)> {
    let name = if qsd { "qsd" } else { "vubd" };
    let vhost = dir.join(&format!("{name}-vhost.sock"));
    let qmp_path = dir.join(&format!("{name}-qmp.sock"));
    let nbd = dir.join(&format!("{name}-nbd.sock"));
    let tmp = dir.join("tmp.raw");
    let _ = std::fs::remove_file(&tmp);
    std::fs::File::create(&tmp)?.set_len(std::fs::metadata(image)?.len())?;
    let mut daemon = if qsd {
        Daemon::qsd_with_monitor(&vhost, &qmp_path, image, "aio=io_uring", true)?
    } else {
        let q = qmp_path.to_string_lossy().into_owned();
        Daemon::vubd(&vhost, image, &["--qmp", &q])?
    };
    let mut qmp = QmpClient::connect(&qmp_path, TIMEOUT)?;
    qmp.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "tmp0", "filename": tmp}),
    )?;
    qmp.ok(
        "transaction",
        json!({"actions": [{"type": "blockdev-backup", "data": backup_args(json!({}))}]}),
    )?;
    qmp.ok(
        "blockdev-add",
        json!({"driver": "snapshot-access", "node-name": "acc0", "file": "cbw0"}),
    )?;
    qmp.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": nbd}}}),
    )?;
    qmp.ok(
        "block-export-add",
        json!({"type": "nbd", "id": "x0", "node-name": "acc0", "name": "backup"}),
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, uri) = (
            stop.clone(),
            format!("nbd+unix:///backup?socket={}", nbd.display()),
        );
        std::thread::spawn(move || -> Result<u32> {
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                run("nbdcopy", &[&uri, "null:"])?;
                reads += 1;
            }
            Ok(reads)
        })
    };
    let w = tests::bench::Workload {
        name: "randwrite-4k",
        pattern: tests::bench::Pattern::RandWrite,
        block_size: BLOCK as usize,
        queue_depth: qd,
    };
    let m = tests::bench::measure(&vhost, &w, 1, window, daemon.pid(), &STOP);
    stop.store(true, Ordering::Relaxed);
    let reads = match reader.join() {
        Ok(r) => r?,
        Err(_) => bail!("the nbdcopy loop panicked"),
    };
    daemon.kill();
    Ok((m?, reads))
}

/// Guest 4 KiB random-write IOPS (libblkio, QD1 and QD16, one queue) while
/// a copy-before-write filter is in the path and `nbdcopy` reads the
/// fleecing export to `null:` over and over, vubd and qemu-storage-daemon
/// (aio=io_uring) alternated in one run on the same 1 GiB fully written
/// image in /dev/shm, a fresh daemon and target per measurement. CPU per
/// I/O is the daemon's whole CPU time over the window (the export's reads
/// included) divided by the guest writes. Prints figures, asserts nothing:
/// `VUBD_BIN=... cargo test --release -p tests --test backup -- --ignored
/// --nocapture cbw_write_figures`.
#[test]
#[ignore]
fn cbw_write_figures() -> Result<()> {
    let reps = 3;
    let dir = ScratchDir::new_in("/dev/shm", "cbw-bench")?;
    let image = dir.join("disk.img");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&image)?;
        let mut block = vec![0u8; 4 << 20];
        for i in 0..256u32 {
            block.fill((i % 251) as u8 + 1);
            f.write_all(&block)?;
        }
    }
    let window = tests::bench::Window {
        warmup: Duration::from_millis(500),
        duration: Duration::from_secs(3),
        request_timeout: TIMEOUT,
    };
    println!(
        "qd  daemon  median IOPS  median CPU us/IO  full reads/window  (each of {reps} runs: IOPS)"
    );
    for qd in [1usize, 16] {
        let mut runs: [Vec<(f64, f64, u32)>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..reps {
            for qsd in [false, true] {
                let (m, reads) = fleecing_write_load(&dir, &image, qsd, qd, window)?;
                let cpu_us = m.daemon_cpu.as_secs_f64() * 1e6 / m.ios.max(1) as f64;
                runs[usize::from(qsd)].push((m.iops(), cpu_us, reads));
            }
        }
        let mut medians = Vec::new();
        for (i, name) in ["vubd", "qsd"].iter().enumerate() {
            let r = &runs[i];
            let med = |f: &dyn Fn(&(f64, f64, u32)) -> f64| {
                let mut v: Vec<f64> = r.iter().map(f).collect();
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            };
            let (iops, cpu, reads) = (med(&|x| x.0), med(&|x| x.1), med(&|x| f64::from(x.2)));
            let each: Vec<String> = r.iter().map(|x| format!("{:.0}", x.0)).collect();
            println!(
                "{qd:<3} {name:6} {iops:12.0} {cpu:16.1} {reads:18.0}  ({})",
                each.join(", ")
            );
            medians.push((iops, cpu));
        }
        println!(
            "{qd:<3} vubd/qsd IOPS {:.2}x, qsd/vubd CPU per I/O {:.2}x",
            medians[0].0 / medians[1].0,
            medians[1].1 / medians[0].1
        );
    }
    Ok(())
}
