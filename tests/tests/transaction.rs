//! QMP `transaction` over dirty bitmaps, against QEMU: the same scripts go
//! to vubd and to qemu-storage-daemon 7.2 with the same client and the
//! same guest writes (libblkio), and the replies (return, or error class
//! and text) and the resulting bitmaps (`count`, `recording`, `busy`,
//! SHA-256 of the bits) must be the same. Then what QEMU cannot show on a
//! raw image: persistent bitmaps, where a transaction that fails leaves no
//! trace, also after kill -9, and one that succeeds is complete after it.

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tests::client::Client;
use tests::daemon::{create_image, Daemon, ScratchDir};
use tests::qmp_client::{wait_for_socket, QmpClient};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const TIMEOUT: Duration = Duration::from_secs(15);

fn start_vubd(dir: &ScratchDir, image: &Path, tag: &str) -> Result<(Daemon, PathBuf, PathBuf)> {
    let qmp = dir.join(&format!("{tag}-qmp.sock"));
    let vhost = dir.join(&format!("{tag}-vhost.sock"));
    let _ = std::fs::remove_file(&qmp);
    let qmp_arg = qmp.to_string_lossy().into_owned();
    let d = Daemon::vubd(&vhost, image, &["--qmp", &qmp_arg])?;
    wait_for_socket(&qmp, TIMEOUT)?;
    Ok((d, qmp, vhost))
}

fn act(kind: &str, data: Value) -> Value {
    json!({"type": kind, "data": data})
}

fn b(name: &str) -> Value {
    json!({"node": "disk0", "name": name})
}

fn txn(actions: Vec<Value>) -> Value {
    json!({ "actions": actions })
}

/// The reply as a comparable value: the return value, or class + text.
fn reply(q: &mut QmpClient, cmd: &str, args: &Value) -> Result<Value> {
    Ok(match q.execute(cmd, args.clone())? {
        Ok(v) => json!({ "return": v }),
        Err(e) => json!({"error": {"class": e.class, "desc": e.desc}}),
    })
}

/// Every bitmap of disk0, newest first, with the SHA-256 of its bits.
fn bitmaps(q: &mut QmpClient, vubd: bool) -> Result<Vec<Value>> {
    let list = if vubd {
        q.ok("query-block", json!({}))?[0]["inserted"]["dirty-bitmaps"].clone()
    } else {
        q.ok("query-named-block-nodes", json!({}))?[0]["dirty-bitmaps"].clone()
    };
    let mut out = Vec::new();
    for m in list.as_array().cloned().unwrap_or_default() {
        let name = m["name"].as_str().unwrap_or_default().to_string();
        let sha = q.ok("x-debug-block-dirty-bitmap-sha256", b(&name))?["sha256"].clone();
        out.push(json!({
            "name": name, "count": m["count"], "granularity": m["granularity"],
            "recording": m["recording"], "busy": m["busy"],
            "persistent": m["persistent"], "sha256": sha,
        }));
    }
    Ok(out)
}

/// Writes through libblkio, one set per checkpoint of the script.
fn guest_writes(sock: &Path, set: u64) -> Result<()> {
    let mut c = Client::connect(sock, 1, false)?;
    for (i, off) in [0, 3 * MIB + 1024, 17 * MIB, SIZE - 4096]
        .into_iter()
        .enumerate()
    {
        let off = (off + set * 5 * MIB + i as u64 * 65536) % (SIZE - 8192);
        c.write(off, &vec![0x5a; 4096])?;
    }
    Ok(c.flush()?)
}

/// The scripts (verified by hand against qemu-storage-daemon 7.2 first):
/// every action type, failures at the last action (each must roll back
/// the earlier ones), QEMU's argument errors, and successful transactions
/// between guest writes.
///
/// Left out on purpose: a failing `enable` as the failing action (QEMU
/// 7.2's abort then *disables* the bitmap, as its prepare recorded
/// nothing; vubd leaves it as it was) and a merge of an empty source
/// list (qemu-storage-daemon 7.2 aborts on an assertion).
fn script() -> Vec<(&'static str, Value)> {
    let add = "block-dirty-bitmap-add";
    let rm = "block-dirty-bitmap-remove";
    let clear = "block-dirty-bitmap-clear";
    let en = "block-dirty-bitmap-enable";
    let dis = "block-dirty-bitmap-disable";
    let merge = "block-dirty-bitmap-merge";
    let t = "transaction";
    let g = |n: &str, g: u64| json!({"node": "disk0", "name": n, "granularity": g});
    let grouped =
        |a: Vec<Value>| json!({"actions": a, "properties": {"completion-mode": "grouped"}});
    vec![
        (add, b("b0")),
        (
            add,
            json!({"node": "disk0", "name": "b4", "disabled": true, "granularity": 4096}),
        ),
        ("writes", json!(1)),
        // Failures: nothing of the earlier actions may stay.
        (t, txn(vec![act(add, b("b1")), act(add, b("b1"))])),
        (
            t,
            txn(vec![
                act(add, b("b1")),
                act(dis, b("b0")),
                act(clear, b("b4")),
                act("abort", json!({})),
            ]),
        ),
        (
            t,
            txn(vec![
                act(clear, b("b0")),
                act(
                    merge,
                    json!({"node": "disk0", "target": "b4", "bitmaps": ["b0"]}),
                ),
                act(rm, b("b0")),
                act(clear, b("b0")),
            ]),
        ),
        (t, txn(vec![act(rm, b("b0")), act(add, b("b0"))])),
        (t, txn(vec![act(rm, b("b4")), act(rm, b("b4"))])),
        (
            t,
            txn(vec![
                act(rm, b("b4")),
                act(
                    merge,
                    json!({"node": "disk0", "target": "b0", "bitmaps": ["b4"]}),
                ),
            ]),
        ),
        (
            t,
            txn(vec![act(add, b("b5")), act(rm, b("b5")), act(add, b("b5"))]),
        ),
        (
            t,
            txn(vec![
                act(add, b("b6")),
                act(rm, b("b6")),
                act("abort", json!({})),
            ]),
        ),
        (
            t,
            txn(vec![
                act(dis, b("b0")),
                act(add, json!({"node": "zz", "name": "b2"})),
            ]),
        ),
        (
            t,
            txn(vec![
                act(dis, b("b0")),
                act(rm, json!({"node": "zz", "name": "b2"})),
            ]),
        ),
        (t, txn(vec![act(dis, b("b0")), act(rm, b("zz"))])),
        (
            t,
            txn(vec![
                act(dis, b("b0")),
                act(
                    merge,
                    json!({"node": "disk0", "target": "b0", "bitmaps": ["zz"]}),
                ),
            ]),
        ),
        (
            t,
            txn(vec![
                act(dis, b("b0")),
                act(
                    merge,
                    json!({"node": "disk0", "target": "b0", "bitmaps": [{"node": "zz", "name": "b4"}]}),
                ),
            ]),
        ),
        (t, txn(vec![act(dis, b("b0")), act(add, b(""))])),
        (t, txn(vec![act(dis, b("b0")), act(add, g("g", 100))])),
        (t, grouped(vec![act(add, b("b1"))])),
        (t, grouped(vec![act(dis, b("b0"))])),
        (t, grouped(vec![act("abort", json!({}))])),
        // Argument errors: reported before anything runs.
        (
            t,
            json!({"actions": [act(add, b("b1"))], "properties": {"completion-mode": "bogus"}}),
        ),
        (
            t,
            json!({"actions": [act(add, b("b1"))], "properties": {"completion-mode": "individual", "x": 1}}),
        ),
        (t, json!({"actions": [act(add, b("b1"))], "properties": 3})),
        (t, json!({"actions": [act(add, b("b1"))], "x": 1})),
        (t, json!({"actions": [{"type": "nope", "data": {}}]})),
        (t, json!({"actions": [{"type": "abort"}]})),
        (t, json!({"actions": [{"type": "abort", "data": {"x": 1}}]})),
        (t, json!({"actions": [{"type": "abort", "data": 3}]})),
        (t, json!({"actions": [{"data": {}}]})),
        (t, json!({"actions": [{"type": 3, "data": {}}]})),
        (
            t,
            json!({"actions": [act(add, b("b1")), {"type": add, "data": b("b9"), "extra": 1}]}),
        ),
        (
            t,
            json!({"actions": [act(add, json!({"node": "disk0", "name": "b9", "bogus": 1}))]}),
        ),
        (t, json!({"actions": [act(add, json!({"node": "disk0"}))]})),
        (t, json!({"actions": "x"})),
        (t, json!({"actions": ["x"]})),
        (t, json!({})),
        (t, json!({"actions": []})),
        // Successes, with guest writes between them.
        (t, txn(vec![act(add, b("b1")), act(rm, b("b1"))])),
        (t, txn(vec![act(dis, b("b0")), act(add, b("b1"))])),
        ("writes", json!(2)),
        (
            t,
            txn(vec![
                act(add, g("b2", 512)),
                act(clear, b("b2")),
                act(dis, b("b2")),
                act(en, b("b2")),
                act(
                    merge,
                    json!({"node": "disk0", "target": "b2", "bitmaps": ["b0", {"node": "disk0", "name": "b1"}]}),
                ),
            ]),
        ),
        (
            t,
            txn(vec![
                act(clear, b("b0")),
                act(
                    merge,
                    json!({"node": "disk0", "target": "b0", "bitmaps": ["b1", "b4"]}),
                ),
                act(en, b("b0")),
                act(dis, b("b1")),
            ]),
        ),
        (t, txn(vec![act(clear, b("b4"))])),
        ("writes", json!(3)),
        (
            t,
            txn(vec![
                act(en, b("b4")),
                act(dis, b("b4")),
                act(dis, b("b4")),
                act(en, b("b4")),
            ]),
        ),
        (
            t,
            txn(vec![
                act(rm, b("b1")),
                act(
                    merge,
                    json!({"node": "disk0", "target": "b2", "bitmaps": ["b4"]}),
                ),
                act(rm, b("b2")),
            ]),
        ),
        ("writes", json!(4)),
    ]
}

#[test]
fn transaction_replies_and_bitmaps_match_qemu() -> Result<()> {
    let dir = ScratchDir::new("txn-qsd")?;
    let (ours_img, theirs_img) = (dir.join("vubd.img"), dir.join("qsd.img"));
    create_image(&ours_img, SIZE)?;
    create_image(&theirs_img, SIZE)?;
    let (mut vubd, vubd_qmp, vubd_vhost) = start_vubd(&dir, &ours_img, "vubd")?;
    let (qsd_qmp, qsd_vhost) = (dir.join("qsd-qmp.sock"), dir.join("qsd-vhost.sock"));
    let _qsd = Daemon::qsd_with_monitor(&qsd_vhost, &qsd_qmp, &theirs_img, "", true)?;
    let mut ours = QmpClient::connect(&vubd_qmp, TIMEOUT)?;
    let mut theirs = QmpClient::connect(&qsd_qmp, TIMEOUT)?;
    let mut failures = 0;
    for (step, (cmd, args)) in script().into_iter().enumerate() {
        if cmd == "writes" {
            let set = args.as_u64().unwrap_or(0);
            guest_writes(&vubd_vhost, set)?;
            guest_writes(&qsd_vhost, set)?;
        } else {
            let (x, y) = (
                reply(&mut ours, cmd, &args)?,
                reply(&mut theirs, cmd, &args)?,
            );
            ensure!(x == y, "step {step} {cmd} {args}:\n vubd {x}\n qemu {y}");
            failures += usize::from(x.get("error").is_some());
        }
        let (x, y) = (bitmaps(&mut ours, true)?, bitmaps(&mut theirs, false)?);
        ensure!(
            x == y,
            "bitmaps after step {step} {cmd} {args}:\n vubd {x:?}\n qemu {y:?}"
        );
    }
    ensure!(
        failures > 30,
        "the script's error cases did not run: {failures}"
    );
    let last = bitmaps(&mut ours, true)?;
    ensure!(
        last.iter().any(|m| m["count"].as_u64().unwrap_or(0) > 0),
        "nothing marked: {last:?}"
    );
    ensure!(vubd.try_wait()?.is_none(), "vubd exited");
    Ok(())
}

/// The files beside the image (sidecars, staged sidecars).
fn files(dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("disk.img"))
        .collect();
    v.sort();
    Ok(v)
}

/// Name, recording and persistence of each bitmap, and its bits' hash.
fn shape(q: &mut QmpClient) -> Result<Vec<(String, bool, bool, u64)>> {
    Ok(bitmaps(q, true)?
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_string(),
                m["recording"].as_bool().unwrap_or(false),
                m["persistent"].as_bool().unwrap_or(false),
                m["count"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

/// Persistent bitmaps: a transaction whose last action fails leaves the
/// bitmaps and the sidecar as they were, also across kill -9; one that
/// succeeds is all there after kill -9.
#[test]
fn persistent_transaction_is_all_or_nothing_across_kill_9() -> Result<()> {
    let dir = ScratchDir::new("txn-kill")?;
    let image = dir.join("disk.img");
    create_image(&image, SIZE)?;
    let (mut d, qmp, vhost) = start_vubd(&dir, &image, "a")?;
    let mut q = QmpClient::connect(&qmp, TIMEOUT)?;
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "p0", "persistent": true}),
    )?;
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "disk0", "name": "p1", "persistent": true, "disabled": true}),
    )?;
    guest_writes(&vhost, 1)?;
    q.ok(
        "block-dirty-bitmap-merge",
        json!({"node": "disk0", "target": "p1", "bitmaps": ["p0"]}),
    )?;
    let before = shape(&mut q)?;
    let p1_sha = q.ok("x-debug-block-dirty-bitmap-sha256", b("p1"))?;
    let sidecars = files(dir.path())?;
    ensure!(
        sidecars == ["disk.img", "disk.img.vubd-bitmaps"],
        "{sidecars:?}"
    );

    let actions = |last: Value| {
        txn(vec![
            act("block-dirty-bitmap-disable", b("p0")),
            act(
                "block-dirty-bitmap-add",
                json!({"node": "disk0", "name": "p2", "persistent": true}),
            ),
            act("block-dirty-bitmap-clear", b("p1")),
            act("block-dirty-bitmap-remove", b("p1")),
            last,
        ])
    };
    let e = q.err(
        "transaction",
        actions(act(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "p2", "persistent": true}),
        )),
    )?;
    ensure!(e.desc == "Bitmap already exists: p2", "{e}");
    ensure!(shape(&mut q)? == before, "changed by a failed transaction");
    ensure!(
        files(dir.path())? == sidecars,
        "files left: {:?}",
        files(dir.path())?
    );
    d.kill();
    let (mut d, qmp, _) = start_vubd(&dir, &image, "b")?;
    let mut q = QmpClient::connect(&qmp, TIMEOUT)?;
    let after_kill = shape(&mut q)?;
    // p0 records: recovery may add logged extents (never fewer bits); p1
    // does not record: exactly as it was.
    ensure!(
        after_kill.len() == 2 && after_kill[0] == before[0],
        "{after_kill:?} vs {before:?}"
    );
    ensure!(
        after_kill[1].0 == "p0" && after_kill[1].1 && after_kill[1].3 >= before[1].3,
        "{after_kill:?} vs {before:?}"
    );
    ensure!(
        q.ok("x-debug-block-dirty-bitmap-sha256", b("p1"))? == p1_sha,
        "p1's bits"
    );
    ensure!(
        files(dir.path())? == sidecars,
        "files left: {:?}",
        files(dir.path())?
    );

    q.ok(
        "transaction",
        actions(act("block-dirty-bitmap-enable", b("p0"))),
    )
    .context("the same transaction without the failing action")?;
    let committed = shape(&mut q)?;
    d.kill();
    let (_d, qmp, _) = start_vubd(&dir, &image, "c")?;
    let mut q = QmpClient::connect(&qmp, TIMEOUT)?;
    let after_kill = shape(&mut q)?;
    ensure!(
        committed
            .iter()
            .map(|s| (&s.0, s.1, s.2))
            .collect::<Vec<_>>()
            == [
                (&"p2".to_string(), true, true),
                (&"p0".to_string(), true, true)
            ],
        "{committed:?}"
    );
    ensure!(
        after_kill == committed,
        "after kill -9: {after_kill:?} vs {committed:?}"
    );
    ensure!(
        files(dir.path())? == sidecars,
        "files left: {:?}",
        files(dir.path())?
    );
    Ok(())
}

/// Attaches strace to `pid` so that it delivers SIGKILL when the daemon
/// enters the `when`-th `syscall` from now: a kill -9 at a chosen step of
/// the real daemon, with no test switch in it. Returns once every thread
/// is traced.
fn kill_at(pid: u32, syscall: &str, when: u32, log: &Path) -> Result<std::process::Child> {
    let err = std::fs::File::create(log)?;
    let child = Command::new("strace")
        .args(["-f", "-p", &pid.to_string(), "-o", "/dev/null", "-e"])
        .arg(format!("trace={syscall}"))
        .arg("-e")
        .arg(format!("inject={syscall}:signal=SIGKILL:when={when}"))
        .stderr(err)
        .spawn()
        .context("strace is required (apt-get install strace)")?;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !std::fs::read_to_string(log)?.contains("attached with") {
        ensure!(
            std::time::Instant::now() < deadline,
            "strace did not attach"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

/// kill -9 inside a transaction's prepare (staging the new sidecar), inside
/// its commit (guest I/O held, bitmaps changed in memory, before the
/// rename), and just after the rename: the next start has the old bitmaps
/// and no staged file in the first two cases, the new ones in the last.
#[test]
fn kill_9_inside_a_transaction_leaves_the_old_or_the_new_state() -> Result<()> {
    use std::os::unix::process::ExitStatusExt;
    // The transaction's sidecar syscalls, in order: fsync (staged file),
    // fdatasync (pages changed since), rename, fsync (directory).
    for (syscall, when, committed) in [
        ("fsync", 1, false),
        ("rename", 1, false),
        ("fsync", 2, true),
    ] {
        let step = format!("{syscall}#{when}");
        let dir = ScratchDir::new("txn-strace")?;
        let image = dir.join("disk.img");
        create_image(&image, SIZE)?;
        let (mut d, qmp, vhost) = start_vubd(&dir, &image, "a")?;
        let mut q = QmpClient::connect(&qmp, TIMEOUT)?;
        q.ok(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "p0", "persistent": true}),
        )?;
        guest_writes(&vhost, 1)?;
        let before = shape(&mut q)?;
        let mut strace = kill_at(d.pid(), syscall, when, &dir.join("strace.log"))?;
        let r = q.execute(
            "transaction",
            txn(vec![
                act("block-dirty-bitmap-disable", b("p0")),
                act(
                    "block-dirty-bitmap-add",
                    json!({"node": "disk0", "name": "p1", "persistent": true}),
                ),
            ]),
        );
        ensure!(r.is_err(), "{step}: the daemon answered: {r:?}");
        let status = d.wait_exit(TIMEOUT)?;
        ensure!(status.signal() == Some(9), "{step}: {status}");
        let _ = strace.wait();

        let (_d, qmp, _) = start_vubd(&dir, &image, "b")?;
        let mut q = QmpClient::connect(&qmp, TIMEOUT)?;
        let after = shape(&mut q)?;
        let names: Vec<(&str, bool)> = after.iter().map(|s| (s.0.as_str(), s.1)).collect();
        if committed {
            ensure!(names == [("p1", true), ("p0", false)], "{step}: {after:?}");
            ensure!(
                after[1].3 == before[0].3,
                "{step}: p0's bits {after:?} vs {before:?}"
            );
        } else {
            ensure!(names == [("p0", true)], "{step}: {after:?}");
            ensure!(
                after[0].3 >= before[0].3,
                "{step}: p0 lost bits: {after:?} vs {before:?}"
            );
        }
        let left = files(dir.path())?;
        ensure!(
            left == ["disk.img", "disk.img.vubd-bitmaps"],
            "{step}: files {left:?}"
        );
    }
    Ok(())
}

/// Jobs and nodes of the daemon that a backup action would leave: the ids
/// in `query-jobs` and whether a node `cbw0` exists.
fn backup_traces(q: &mut QmpClient) -> Result<(Vec<Value>, bool)> {
    let jobs = q.ok("query-jobs", json!({}))?;
    let jobs: Vec<Value> = jobs
        .as_array()
        .map(|a| a.iter().map(|j| j["id"].clone()).collect())
        .unwrap_or_default();
    let nodes = q.ok("query-named-block-nodes", json!({}))?;
    let filter = nodes
        .as_array()
        .is_some_and(|a| a.iter().any(|n| n["node-name"] == "cbw0"));
    Ok((jobs, filter))
}

/// A transaction with a `blockdev-backup` action among persistent bitmap
/// actions: when its last action fails it leaves no job, no filter node,
/// no bitmap change and no file change, also after kill -9; killed inside
/// its commit (at the staging fsync, the rename, the directory fsync) the
/// restarted daemon has the old or the new bitmaps, complete, and no
/// staged file.
#[test]
fn a_transaction_with_a_backup_action_is_all_or_nothing_across_kill_9() -> Result<()> {
    use std::os::unix::process::ExitStatusExt;
    let backup = || {
        act(
            "blockdev-backup",
            json!({"job-id": "fl0", "device": "disk0", "target": "tmp0", "sync": "none",
                   "filter-node-name": "cbw0"}),
        )
    };
    let actions = |last: Option<Value>| {
        let mut v = vec![
            act("block-dirty-bitmap-disable", b("p0")),
            act(
                "block-dirty-bitmap-add",
                json!({"node": "disk0", "name": "p1", "persistent": true}),
            ),
            backup(),
        ];
        v.extend(last);
        txn(v)
    };
    let setup = |dir: &ScratchDir, tag: &str| -> Result<(Daemon, QmpClient, PathBuf)> {
        let image = dir.join("disk.img");
        if !image.exists() {
            create_image(&image, SIZE)?;
            create_image(&dir.join("tmp.raw"), SIZE)?;
        }
        let (d, qmp, vhost) = start_vubd(dir, &image, tag)?;
        let mut q = QmpClient::connect(&qmp, TIMEOUT)?;
        if tag == "a" {
            q.ok(
                "block-dirty-bitmap-add",
                json!({"node": "disk0", "name": "p0", "persistent": true}),
            )?;
            guest_writes(&vhost, 1)?;
        }
        q.ok(
            "blockdev-add",
            json!({"driver": "file", "node-name": "tmp0",
                   "filename": dir.join("tmp.raw")}),
        )?;
        Ok((d, q, vhost))
    };
    let untouched = |dir: &ScratchDir| -> Result<()> {
        let tmp = std::fs::read(dir.join("tmp.raw"))?;
        ensure!(
            tmp.len() as u64 == SIZE && tmp.iter().all(|&b| b == 0),
            "the backup target was written"
        );
        Ok(())
    };

    // The last action fails: nothing of the others stays.
    let dir = ScratchDir::new("txn-backup-fail")?;
    let (mut d, mut q, _) = setup(&dir, "a")?;
    let before = shape(&mut q)?;
    let sidecars = files(dir.path())?;
    let e = q.err(
        "transaction",
        actions(Some(act(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "p1", "persistent": true}),
        ))),
    )?;
    ensure!(e.desc == "Bitmap already exists: p1", "{e}");
    ensure!(
        shape(&mut q)? == before,
        "bitmaps changed by a failed transaction"
    );
    ensure!(
        backup_traces(&mut q)? == (vec![], false),
        "the failed transaction left a job or a filter: {:?}",
        backup_traces(&mut q)?
    );
    ensure!(files(dir.path())? == sidecars, "{:?}", files(dir.path())?);
    d.kill();
    let (_d, mut q, _) = setup(&dir, "b")?;
    let after = shape(&mut q)?;
    ensure!(
        after.len() == 1 && after[0].0 == "p0" && after[0].1 && after[0].3 >= before[0].3,
        "after kill -9: {after:?} vs {before:?}"
    );
    ensure!(files(dir.path())? == sidecars, "{:?}", files(dir.path())?);
    untouched(&dir)?;
    // The same transaction without the failing action takes effect.
    q.ok("transaction", actions(None))?;
    ensure!(
        backup_traces(&mut q)? == (vec![json!("fl0")], true),
        "{:?}",
        backup_traces(&mut q)?
    );

    // Killed inside the commit: the old or the new bitmaps.
    for (syscall, when, committed) in [
        ("fsync", 1, false),
        ("rename", 1, false),
        ("fsync", 2, true),
    ] {
        let step = format!("{syscall}#{when}");
        let dir = ScratchDir::new("txn-backup-strace")?;
        let (mut d, mut q, _) = setup(&dir, "a")?;
        let before = shape(&mut q)?;
        let mut strace = kill_at(d.pid(), syscall, when, &dir.join("strace.log"))?;
        let r = q.execute("transaction", actions(None));
        ensure!(r.is_err(), "{step}: the daemon answered: {r:?}");
        let status = d.wait_exit(TIMEOUT)?;
        ensure!(status.signal() == Some(9), "{step}: {status}");
        let _ = strace.wait();
        let (_d, mut q, _) = setup(&dir, "b")?;
        let after = shape(&mut q)?;
        let names: Vec<(&str, bool)> = after.iter().map(|s| (s.0.as_str(), s.1)).collect();
        if committed {
            ensure!(names == [("p1", true), ("p0", false)], "{step}: {after:?}");
        } else {
            ensure!(names == [("p0", true)], "{step}: {after:?}");
            ensure!(after[0].3 >= before[0].3, "{step}: p0 lost bits: {after:?}");
        }
        ensure!(
            backup_traces(&mut q)? == (vec![], false),
            "{step}: a restarted daemon has a backup job or filter"
        );
        let left = files(dir.path())?;
        ensure!(
            left == ["disk.img", "disk.img.vubd-bitmaps"],
            "{step}: files {left:?}"
        );
        untouched(&dir)?;
    }
    Ok(())
}
