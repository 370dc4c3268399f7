//! `--allow-dir`: drive-mirror and blockdev-add may open or create files
//! only beneath the allowed directories (default: the image's). Each
//! hostile path gets a GenericError naming the rule, and the file it aims
//! at is neither created, truncated nor written (stat before and after).

use anyhow::{ensure, Result};
use serde_json::json;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tests::daemon::{create_image, Daemon, ScratchDir};
use tests::qmp_client::{wait_for_socket, QmpClient};

const T: Duration = Duration::from_secs(15);

/// (size, mtime, inode) of a file, or None if it is not there.
fn stat(p: &Path) -> Option<(u64, i64, i64, u64)> {
    std::fs::symlink_metadata(p)
        .ok()
        .map(|m| (m.len(), m.mtime(), m.mtime_nsec(), m.ino()))
}

#[test]
fn mirror_and_blockdev_add_refuse_paths_outside_the_allowed_dirs() -> Result<()> {
    let dir = ScratchDir::new("allow-dir")?;
    let img_dir = dir.join("img");
    std::fs::create_dir(&img_dir)?;
    let image = img_dir.join("disk.img");
    create_image(&image, 4 << 20)?;
    let victim = dir.join("victim");
    std::fs::write(&victim, b"precious")?;
    symlink(&victim, img_dir.join("abs-link"))?;
    symlink("../victim", img_dir.join("rel-link"))?;
    symlink("/etc", img_dir.join("etc-link"))?;
    std::fs::create_dir(img_dir.join("sub"))?;
    let fifo = std::ffi::CString::new(img_dir.join("fifo").to_string_lossy().as_bytes())?;
    // SAFETY: a valid C string.
    ensure!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) } == 0);
    let qmp = dir.join("qmp.sock");
    let qmp_arg = qmp.to_string_lossy().into_owned();
    let _d = Daemon::vubd(&dir.join("vhost.sock"), &image, &["--qmp", &qmp_arg])?;
    wait_for_socket(&qmp, T)?;
    let mut q = QmpClient::connect(&qmp, T)?;

    let etc = PathBuf::from("/etc/vubd-allow-dir-test");
    let hostile: Vec<PathBuf> = vec![
        etc.clone(),
        victim.clone(),
        img_dir.join("../victim"),
        img_dir.join("sub/../../victim"),
        img_dir.join("abs-link"),
        img_dir.join("rel-link"),
        img_dir.join("etc-link/vubd-allow-dir-test"),
        img_dir.join("fifo"),
        PathBuf::from("/dev/null"),
    ];
    let watched = [victim.clone(), etc.clone(), img_dir.join("fifo")];
    let before: Vec<_> = watched.iter().map(|p| stat(p)).collect();
    for target in &hostile {
        for mode in ["absolute-paths", "existing"] {
            let e = q
                .execute(
                    "drive-mirror",
                    json!({"device": "disk0", "target": target, "sync": "full",
                           "format": "raw", "mode": mode, "job-id": "m"}),
                )?
                .err();
            let e = e.ok_or_else(|| anyhow::anyhow!("drive-mirror onto {target:?} accepted"))?;
            ensure!(
                e.class == "GenericError"
                    && (e
                        .desc
                        .contains("is outside the allowed directories (--allow-dir)")
                        || e.desc.contains("is not a regular file")),
                "drive-mirror {mode} onto {target:?}: {}: {}",
                e.class,
                e.desc
            );
        }
        let e = q
            .execute(
                "blockdev-add",
                json!({"driver": "file", "node-name": "f1", "filename": target}),
            )?
            .err()
            .ok_or_else(|| anyhow::anyhow!("blockdev-add of {target:?} accepted"))?;
        ensure!(
            e.desc
                .contains("is outside the allowed directories (--allow-dir)")
                || e.desc.contains("is not a regular file"),
            "blockdev-add {target:?}: {}",
            e.desc
        );
    }
    let after: Vec<_> = watched.iter().map(|p| stat(p)).collect();
    ensure!(before == after, "touched: {before:?} -> {after:?}");
    ensure!(std::fs::read(&victim)? == b"precious");

    // Beneath the image's directory, through a symlink that stays inside.
    symlink("sub", img_dir.join("inner"))?;
    create_image(&img_dir.join("sub/other.img"), 4 << 20)?;
    q.ok(
        "blockdev-add",
        json!({"driver": "file", "node-name": "f1", "filename": img_dir.join("inner/other.img")}),
    )?;
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": img_dir.join("inner/t.img"), "sync": "full",
               "format": "raw", "mode": "absolute-paths", "job-id": "m"}),
    )?;
    ensure!(img_dir.join("sub/t.img").is_file());
    Ok(())
}
