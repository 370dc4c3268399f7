//! Dirty-bitmap semantics against real QEMU 7.2: qemu-storage-daemon tracks
//! the same writes (driven by qemu-io over its NBD export) as a
//! [`DirtyTracker`] marked with the same ranges, and every bitmap's
//! `x-debug-block-dirty-bitmap-sha256` and `query-named-block-nodes` count
//! must agree: empty, after writes (spanning chunks, the partial last chunk,
//! write-zeroes, discard), after merges across granularities, after clear,
//! with a disabled bitmap, and completely full.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vubd_backend::dirty::{DirtyTracker, TrackerConfig};

const MIB: u64 = 1 << 20;
/// Not a multiple of any granularity above 512: the last chunk is partial.
const DISK: u64 = 24 * MIB + 512;
const BITMAPS: [(&str, u64); 6] = [
    ("g512", 512),
    ("g4k", 4096),
    ("g64k", 65536),
    ("g1m", MIB),
    ("g64m", 64 * MIB),
    ("off", 65536),
];

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Qsd {
    child: Child,
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Qmp> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > Duration::from_secs(20) => {
                    return Err(e).context("qemu-storage-daemon's QMP socket never came up")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = q.read()?;
        ensure!(greeting.get("QMP").is_some(), "no QMP greeting: {greeting}");
        q.ok("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value> {
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line)?;
            ensure!(n > 0, "QMP connection closed");
            let v: Value =
                serde_json::from_str(&line).with_context(|| format!("bad QMP line {line:?}"))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    fn cmd(&mut self, name: &str, args: Value) -> Result<Value> {
        let msg = json!({"execute": name, "arguments": args});
        writeln!(self.writer, "{msg}")?;
        self.read()
    }

    fn ok(&mut self, name: &str, args: Value) -> Result<Value> {
        let r = self.cmd(name, args.clone())?;
        match r.get("return") {
            Some(v) => Ok(v.clone()),
            None => bail!("{name} {args} failed: {r}"),
        }
    }

    fn sha256(&mut self, name: &str) -> Result<String> {
        let r = self.ok(
            "x-debug-block-dirty-bitmap-sha256",
            json!({"node": "f0", "name": name}),
        )?;
        Ok(r["sha256"].as_str().context("no sha256")?.to_string())
    }

    fn counts(&mut self) -> Result<Vec<(String, u64, bool)>> {
        let r = self.ok("query-named-block-nodes", json!({}))?;
        let node = r
            .as_array()
            .and_then(|a| a.iter().find(|n| n["node-name"] == "f0"))
            .context("node f0 not listed")?;
        let list = node["dirty-bitmaps"]
            .as_array()
            .context("no dirty-bitmaps")?;
        list.iter()
            .map(|b| {
                Ok((
                    b["name"].as_str().context("name")?.to_string(),
                    b["count"].as_u64().context("count")?,
                    b["recording"].as_bool().context("recording")?,
                ))
            })
            .collect()
    }
}

/// One guest-visible operation, applied to both sides.
enum Op {
    Write(u64, u64),
    Zero(u64, u64),
    Discard(u64, u64),
}

fn qemu_io(nbd: &Path, ops: &[Op]) -> Result<()> {
    let mut cmd = Command::new("qemu-io");
    cmd.arg("-f").arg("raw");
    for op in ops {
        let c = match op {
            Op::Write(o, l) => format!("write -P 0x5a {o} {l}"),
            Op::Zero(o, l) => format!("write -z {o} {l}"),
            Op::Discard(o, l) => format!("discard {o} {l}"),
        };
        cmd.arg("-c").arg(c);
    }
    cmd.arg(format!("nbd+unix:///f0?socket={}", nbd.display()));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("running qemu-io (package qemu-utils)")?;
    ensure!(
        out.status.success(),
        "qemu-io failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !stdout.contains("failed"),
        "qemu-io reported a failure:\n{stdout}"
    );
    Ok(())
}

fn compare(q: &mut Qmp, t: &DirtyTracker, stage: &str) -> Result<()> {
    let qemu_counts = q.counts()?;
    let ours = t.list();
    // QEMU lists newest first, and so do we.
    let qemu_names: Vec<&str> = qemu_counts.iter().map(|(n, _, _)| n.as_str()).collect();
    let our_names: Vec<&str> = ours.iter().map(|b| b.name.as_str()).collect();
    ensure!(
        qemu_names == our_names,
        "{stage}: order differs: qemu {qemu_names:?}, vubd {our_names:?}"
    );
    for ((name, count, recording), b) in qemu_counts.iter().zip(&ours) {
        ensure!(
            *count == b.count,
            "{stage}: bitmap {name}: qemu count {count}, vubd {}",
            b.count
        );
        ensure!(
            *recording == b.recording,
            "{stage}: bitmap {name}: recording differs"
        );
        let qh = q.sha256(name)?;
        let oh = t.sha256(name)?;
        ensure!(
            qh == oh,
            "{stage}: bitmap {name}: qemu sha256 {qh}, vubd {oh}"
        );
    }
    Ok(())
}

#[test]
fn bitmaps_match_qemu_storage_daemon() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("vubd-dirty-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let scratch = Scratch(dir);
    let image = scratch.0.join("disk.raw");
    std::fs::File::create(&image)?.set_len(DISK)?;
    let qmp_path = scratch.0.join("qmp.sock");
    let nbd_path = scratch.0.join("nbd.sock");
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f0,filename={},discard=unmap",
            image.display()
        ))
        .arg("--chardev")
        .arg(format!(
            "socket,id=m,path={},server=on,wait=off",
            qmp_path.display()
        ))
        .arg("--monitor")
        .arg("chardev=m")
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", nbd_path.display()))
        .arg("--export")
        .arg("type=nbd,id=e0,node-name=f0,writable=on")
        .stdin(Stdio::null())
        .spawn()
        .context("starting qemu-storage-daemon (package qemu-system-x86)")?;
    let _qsd = Qsd { child };
    let mut q = Qmp::connect(&qmp_path)?;
    let t = DirtyTracker::open(TrackerConfig::new(DISK))?;

    for (name, g) in BITMAPS {
        let disabled = name == "off";
        q.ok(
            "block-dirty-bitmap-add",
            json!({"node": "f0", "name": name, "granularity": g, "disabled": disabled}),
        )?;
        t.add(name, Some(g), false, disabled)?;
    }
    compare(&mut q, &t, "empty")?;

    // Known writes: aligned, spanning chunk boundaries at every granularity,
    // the partial last chunk, write-zeroes and discard.
    let mut ops = vec![
        Op::Write(0, 512),
        Op::Write(65536 - 512, 1024),
        Op::Write(MIB - 4096, 8192),
        Op::Write(3 * MIB + 512, 3 * 512),
        Op::Write(DISK - 512, 512),
        Op::Zero(5 * MIB, 128 * 1024),
        Op::Discard(9 * MIB, MIB),
    ];
    let mut x = 0x1234_5678_9abc_def0u64;
    for _ in 0..40 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (DISK / 512)) * 512;
        let len = ((x >> 32) % 64 + 1) * 512;
        ops.push(Op::Write(off, len.min(DISK - off)));
    }
    qemu_io(&nbd_path, &ops)?;
    for op in &ops {
        let (Op::Write(o, l) | Op::Zero(o, l) | Op::Discard(o, l)) = op;
        t.mark(*o, *l)?;
    }
    compare(&mut q, &t, "after writes")?;

    // Merges across granularities (coarse into fine, fine into coarse), into
    // a disabled bitmap, then clear and enable.
    for (target, sources) in [
        ("g512", vec!["g64m"]),
        ("g1m", vec!["g512", "g4k"]),
        ("off", vec!["g4k"]),
    ] {
        q.ok(
            "block-dirty-bitmap-merge",
            json!({"node": "f0", "target": target, "bitmaps": sources}),
        )?;
        t.merge(target, &sources)?;
    }
    compare(&mut q, &t, "after merges")?;
    q.ok(
        "block-dirty-bitmap-clear",
        json!({"node": "f0", "name": "g4k"}),
    )?;
    t.clear("g4k")?;
    q.ok(
        "block-dirty-bitmap-enable",
        json!({"node": "f0", "name": "off"}),
    )?;
    t.enable("off")?;
    q.ok(
        "block-dirty-bitmap-disable",
        json!({"node": "f0", "name": "g64k"}),
    )?;
    t.disable("g64k")?;
    let more = [
        Op::Write(7 * MIB + 100 * 512, 4096),
        Op::Write(20 * MIB, 64 * 1024),
    ];
    qemu_io(&nbd_path, &more)?;
    for op in &more {
        let (Op::Write(o, l) | Op::Zero(o, l) | Op::Discard(o, l)) = op;
        t.mark(*o, *l)?;
    }
    compare(&mut q, &t, "after clear, enable, disable")?;

    // Full: every chunk of every bitmap.
    qemu_io(&nbd_path, &[Op::Write(0, DISK)])?;
    t.mark(0, DISK)?;
    compare(&mut q, &t, "full")?;
    Ok(())
}
