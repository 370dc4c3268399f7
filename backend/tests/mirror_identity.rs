//! Which image a mirror treats as "the disk": the one the disk uses now,
//! known by device + inode. After a pivot A -> B, a mirror onto B (by any
//! name: hard link, symlink, bind mount) is refused before anything touches
//! B, a mirror back onto A is allowed, and the persistent state of a new
//! mirror lies beside B, where a daemon restarted on B looks for it.

#[path = "mirror_util.rs"]
mod util;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use util::*;
use vubd_backend::jobs::JobStatus;
use vubd_backend::mirror::pivot_marker;
use vubd_backend::{Disk, IoBuf};

const T: Duration = Duration::from_secs(30);
const SELF: &str = "Can't mirror node into itself";

/// What the guest reads, the whole disk.
fn read_disk(disk: &Disk) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; disk.size() as usize];
    for (i, chunk) in buf.chunks_mut(MIB as usize).enumerate() {
        disk.read(i as u64 * MIB, &[IoBuf::from_slice(chunk)])?;
    }
    Ok(buf)
}

fn guest_write(disk: &Disk, model: &mut [u8], off: u64, data: &[u8]) -> Result<()> {
    let mut buf = data.to_vec();
    {
        let _batch = disk.gate().enter();
        disk.write(off, &[IoBuf::from_slice(&mut buf)])?;
    }
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
    Ok(())
}

/// Mirrors the rig's disk to `target` (QMP `drive-mirror`, default mode:
/// the target is created) and pivots onto it.
fn mirror_and_pivot(rig: &Rig, target: &Path, id: &str) -> Result<()> {
    rig.qmp(
        "drive-mirror",
        json!({"device": "disk0", "target": target, "sync": "full", "job-id": id}),
    )
    .map_err(anyhow::Error::msg)?;
    let job = rig.job(id)?;
    wait_status(&job, JobStatus::Ready, T)?;
    rig.qmp("job-complete", json!({"id": id}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    ensure!(
        rig.disk.image().path() == target,
        "the disk did not switch to {}",
        target.display()
    );
    Ok(())
}

/// Every way of naming `live` as a target is refused, in both modes, and
/// the guest's data is untouched.
fn refused_by_every_mode(rig: &Rig, target: &Path, model: &[u8]) -> Result<()> {
    for (cmd, extra) in [
        ("drive-mirror", json!({})),
        ("drive-mirror", json!({"mode": "existing"})),
        ("blockdev-mirror", json!({})),
    ] {
        // blockdev-mirror takes a node on the file.
        let node = cmd == "blockdev-mirror";
        if node {
            rig.qmp(
                "blockdev-add",
                json!({"driver": "file", "node-name": "t0", "filename": target}),
            )
            .map_err(anyhow::Error::msg)?;
        }
        let name = if node { json!("t0") } else { json!(target) };
        let mut args = json!({"device": "disk0", "target": name, "sync": "full", "job-id": "x"});
        if let (Some(a), Some(e)) = (args.as_object_mut(), extra.as_object()) {
            a.extend(e.clone());
        }
        let got = rig.qmp(cmd, args.clone());
        ensure!(
            got.as_ref().err().map(String::as_str) == Some(SELF),
            "{cmd} {args} onto the live image: {got:?}"
        );
        ensure!(
            read_disk(&rig.disk)? == model,
            "the guest's disk changed after {cmd} {args}"
        );
        if node {
            rig.qmp("blockdev-del", json!({"node-name": "t0"}))
                .map_err(anyhow::Error::msg)?;
        }
    }
    Ok(())
}

#[test]
fn after_a_pivot_the_live_image_is_refused_and_the_old_source_allowed() -> Result<()> {
    let dir = Scratch::new("ident-pivot");
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    let mut model = make_image(&a, 8 * MIB, 1)?;
    let rig = Rig::new(&a)?;
    mirror_and_pivot(&rig, &b, "m1")?;
    // Only on B, the live image, from now on.
    guest_write(&rig.disk, &mut model, 3 * MIB, &pattern(3, 9, 65536))?;

    refused_by_every_mode(&rig, &b, &model)?;
    compare_file(&b, &model)?;

    // A is no longer in use: mirroring back onto it is allowed, and the
    // mirror's state lies beside B, the image in use.
    rig.qmp(
        "drive-mirror",
        json!({"device": "disk0", "target": a, "sync": "full", "job-id": "m2", "speed": 4 * MIB}),
    )
    .map_err(anyhow::Error::msg)?;
    let job = rig.job("m2")?;
    ensure!(
        dir.join("b.img.vubd-mirror").exists() && !dir.join("a.img.vubd-mirror").exists(),
        "the state of the second mirror is not beside the live image"
    );
    rig.qmp("block-job-set-speed", json!({"device": "m2", "speed": 0}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Ready, T)?;
    guest_write(&rig.disk, &mut model, 5 * MIB, &pattern(5, 9, 4096))?;
    rig.qmp("job-complete", json!({"id": "m2"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    ensure!(rig.disk.image().path() == a, "no pivot back onto A");
    compare_file(&a, &model)?;
    ensure!(read_disk(&rig.disk)? == model, "the guest reads other data");

    // The markers follow: B is stale now, A is live again.
    let m = pivot_marker::read(&b)?.context("no marker beside B")?;
    ensure!(
        m.new_image == a,
        "B's marker names {}",
        m.new_image.display()
    );
    ensure!(
        pivot_marker::read(&a)?.is_none(),
        "A's marker stayed although the disk is back on A"
    );
    Ok(())
}

#[test]
fn hard_links_and_symlinks_of_the_live_image_are_refused() -> Result<()> {
    let dir = Scratch::new("ident-links");
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    let mut model = make_image(&a, 4 * MIB, 1)?;
    let rig = Rig::new(&a)?;
    // Before any pivot: names of A.
    std::fs::hard_link(&a, dir.join("a-link.img"))?;
    refused_by_every_mode(&rig, &dir.join("a-link.img"), &model)?;
    mirror_and_pivot(&rig, &b, "m")?;
    guest_write(&rig.disk, &mut model, MIB, &pattern(1, 2, 8192))?;
    // After it: names of B.
    std::fs::hard_link(&b, dir.join("b-link.img"))?;
    std::os::unix::fs::symlink(&b, dir.join("b-sym.img"))?;
    std::os::unix::fs::symlink("b-link.img", dir.join("b-rel-sym.img"))?;
    std::fs::create_dir(dir.join("sub"))?;
    std::os::unix::fs::symlink(&dir.0, dir.join("sub/up"))?;
    for name in ["b-link.img", "b-sym.img", "b-rel-sym.img", "sub/up/b.img"] {
        refused_by_every_mode(&rig, &dir.join(name), &model)?;
    }
    compare_file(&b, &model)?;
    Ok(())
}

/// A bind mount of `source` at `at`, unmounted on drop.
struct BindMount(PathBuf);

impl BindMount {
    fn new(source: &Path, at: &Path) -> std::result::Result<BindMount, String> {
        match Command::new("mount")
            .arg("--bind")
            .arg(source)
            .arg(at)
            .output()
        {
            Ok(o) if o.status.success() => Ok(BindMount(at.to_path_buf())),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
            Err(e) => Err(format!("cannot run mount: {e}")),
        }
    }
}

impl Drop for BindMount {
    fn drop(&mut self) {
        // Lazy: a file still open beneath must not leave the mount behind.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_bind_mount_of_the_live_image_is_refused() -> Result<()> {
    let dir = Scratch::new("ident-bind");
    let other = Scratch::new("ident-bind-at");
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    let mut model = make_image(&a, 4 * MIB, 1)?;
    let rig = Rig::new(&a)?;
    mirror_and_pivot(&rig, &b, "m")?;
    guest_write(&rig.disk, &mut model, 2 * MIB, &pattern(2, 2, 4096))?;
    // Declared last: unmounted before the directories are removed.
    let _bind = match BindMount::new(&dir.0, &other.0) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("SKIPPED a_bind_mount_of_the_live_image_is_refused: mount --bind failed ({e}); needs root");
            return Ok(());
        }
    };
    let through = other.join("b.img");
    ensure!(through.exists(), "the bind mount does not show B");
    refused_by_every_mode(&rig, &through, &model)?;
    compare_file(&b, &model)?;
    // The old source through the mount is fine.
    let job_args =
        json!({"device": "disk0", "target": other.join("a.img"), "sync": "full", "job-id": "back"});
    rig.qmp("drive-mirror", job_args)
        .map_err(anyhow::Error::msg)?;
    let job = rig.job("back")?;
    wait_status(&job, JobStatus::Ready, T)?;
    rig.qmp("job-cancel", json!({"id": "back"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    drop((job, rig));
    Ok(())
}

#[test]
fn resume_after_a_restart_on_the_new_image_finds_the_state() -> Result<()> {
    let dir = Scratch::new("ident-resume");
    let (a, b, c) = (dir.join("a.img"), dir.join("b.img"), dir.join("c.img"));
    let mut model = make_image(&a, 16 * MIB, 1)?;
    let first = Rig::new(&a)?;
    mirror_and_pivot(&first, &b, "m1")?;
    guest_write(&first.disk, &mut model, 7 * MIB, &pattern(7, 1, 65536))?;
    // A second mirror B -> C, interrupted halfway.
    first
        .qmp("drive-mirror", json!({"device": "disk0", "target": c, "sync": "full", "job-id": "m2", "speed": 8 * MIB}))
        .map_err(anyhow::Error::msg)?;
    let job = first.job("m2")?;
    std::thread::sleep(Duration::from_millis(700));
    first
        .qmp("job-pause", json!({"id": "m2"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Paused, T)?;
    std::mem::forget(first);
    // A real restart closes every descriptor, releasing the image locks;
    // this one happens in the same process, so close the forgotten
    // daemon's descriptors of C (its job is paused and never resumes).
    close_fds_of(&c.canonicalize()?)?;

    // The restarted daemon is told `--image B`.
    let second = Rig::new(&b)?;
    ensure!(
        second.manager.pending_resume() == Some(c.canonicalize()?),
        "a restart on the new image does not find the interrupted mirror: {:?}",
        second.manager.pending_resume()
    );
    guest_write(&second.disk, &mut model, 9 * MIB, &pattern(9, 1, 4096))?;
    second
        .qmp("drive-mirror", json!({"device": "disk0", "target": c, "sync": "full", "job-id": "m2", "x-resume": true}))
        .map_err(anyhow::Error::msg)?;
    let job = second.job("m2")?;
    wait_status(&job, JobStatus::Ready, T)?;
    second
        .qmp("job-complete", json!({"id": "m2"}))
        .map_err(anyhow::Error::msg)?;
    wait_status(&job, JobStatus::Null, T)?;
    compare_file(&c, &model)?;
    Ok(())
}

#[test]
fn a_pivot_that_fails_leaves_no_marker() -> Result<()> {
    // As the daemon's bitmap relocation would fail on a full disk: while
    // preparing (before the pause), or under the pause, after the marker
    // went in place.
    for fail_under_pause in [false, true] {
        let dir = Scratch::new("ident-failed-pivot");
        let (a, b) = (dir.join("a.img"), dir.join("b.img"));
        make_image(&a, 4 * MIB, 1)?;
        let rig = Rig::new(&a)?;
        rig.manager.on_pivot(move |_, new| {
            let why = format!("cannot move state beside {}", new.display());
            match fail_under_pause {
                false => Err(why),
                true => Ok(Box::new(move || Err(why))),
            }
        });
        rig.qmp(
            "drive-mirror",
            json!({"device": "disk0", "target": b, "sync": "full", "job-id": "m"}),
        )
        .map_err(anyhow::Error::msg)?;
        let job = rig.job("m")?;
        wait_status(&job, JobStatus::Ready, T)?;
        rig.qmp("job-complete", json!({"id": "m"}))
            .map_err(anyhow::Error::msg)?;
        wait_status(&job, JobStatus::Null, T)?;
        ensure!(rig.disk.image().path() == a, "the failed pivot switched");
        ensure!(
            pivot_marker::read(&a)?.is_none(),
            "a pivot failing {} left its marker beside the image still in use",
            if fail_under_pause {
                "under the pause"
            } else {
                "in its preparation"
            }
        );
        let mut left = std::fs::read_dir(&dir.0)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("vubd-pivoted"));
        ensure!(left.next().is_none(), "a staged marker was left behind");
    }
    Ok(())
}
