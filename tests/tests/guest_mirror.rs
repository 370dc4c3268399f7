//! A live mirror under a real guest: a QEMU guest (TCG) runs fio random
//! writes with crc32c verification on its vhost-user-blk disk while vubd
//! mirrors the disk, becomes READY and pivots to the target. fio verifies
//! after its write phase, so the blocks it wrote before the pivot are read
//! back from the target; it must find every one intact. After the guest
//! exits, the target image must be exactly the disk the guest saw (its
//! md5sum of /dev/vda) and the source must have stopped changing at the
//! pivot.

use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tests::bench_mirror::MirrorDaemon;
use tests::daemon::{create_image, ScratchDir};
use tests::guest::{log_path, wait_for_marker, Guest};

const MIB: u64 = 1 << 20;

fn md5(path: &Path) -> Result<String> {
    let out = Command::new("md5sum")
        .arg(path)
        .output()
        .context("cannot run md5sum")?;
    ensure!(out.status.success(), "md5sum failed");
    Ok(String::from_utf8(out.stdout)?
        .split_whitespace()
        .next()
        .context("empty md5sum output")?
        .to_string())
}

#[test]
fn fio_verify_passes_across_a_pivot() -> Result<()> {
    let dir = ScratchDir::new_in("/dev/shm", "guest-mirror")?;
    let (src, tgt) = (dir.join("src.img"), dir.join("tgt.img"));
    create_image(&src, 64 * MIB)?;
    let d = MirrorDaemon::start(dir.path(), &src, &[])?;
    let mut q = d.qmp()?;
    let script = r#"
result phase writing
$FIO --name=mirror --filename=/dev/vda --thread --direct=1 --ioengine=io_uring \
    --rw=randwrite --bs=4k --iodepth=8 --size=48M --loops=2 --rate_iops=1500 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_backlog=0 \
    --output-format=terse --terse-version=3 >/tmp/fio.out 2>/tmp/fio.err
rc=$?
cat /tmp/fio.err
result fio_rc $rc
result fio_read_kb "$(cut -d';' -f6 /tmp/fio.out)"
result fio_write_kb "$(cut -d';' -f47 /tmp/fio.out)"
[ $rc = 0 ] || fail "fio exited $rc"
result fio_done 1
sync
result md5 "$(md5sum /dev/vda | cut -d' ' -f1)"
"#;
    let name = "guest_mirror_fio_pivot";
    let log = log_path(name);
    let runner = Guest::new(name, &d.socket, script)
        .timeout(Duration::from_secs(240))
        .spawn()?;
    wait_for_marker(
        name,
        "VUBD-RESULT phase=writing",
        Duration::from_secs(120),
        &runner,
    )?;
    std::thread::sleep(Duration::from_secs(2));
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": tgt, "sync": "full", "job-id": "g"}),
    )?;
    q.wait_event("BLOCK_JOB_READY", Duration::from_secs(60), |_| true)?;
    std::thread::sleep(Duration::from_secs(1));
    q.ok("job-complete", json!({"id": "g"}))?;
    q.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60), |d| {
        d.get("error").is_none()
    })?;
    let text = String::from_utf8_lossy(&std::fs::read(&log)?).into_owned();
    ensure!(
        !text.contains("fio_done"),
        "fio finished before the pivot; the test did not test the pivot under load"
    );
    let info = q.ok("query-block", json!({}))?;
    ensure!(
        info[0]["inserted"]["file"] == json!(tgt.canonicalize()?.to_string_lossy()),
        "query-block after the pivot: {info}"
    );
    let src_at_pivot = md5(&src)?;

    let out = runner
        .join()
        .map_err(|_| anyhow::anyhow!("guest thread panicked"))??;
    out.ensure_clean()?;
    ensure!(out.get("fio_rc")? == "0", "fio failed: {}", out.tail(30));
    let (w, r) = (
        out.get_parsed::<u64>("fio_write_kb")?,
        out.get_parsed::<u64>("fio_read_kb")?,
    );
    ensure!(
        w == 2 * 48 * 1024 && r == w,
        "fio wrote {w} KiB and verified {r} KiB"
    );
    ensure!(
        md5(&tgt)? == out.get("md5")?,
        "the target image is not the disk the guest saw"
    );
    ensure!(
        md5(&src)? == src_at_pivot,
        "the source changed after the pivot"
    );
    Ok(())
}
