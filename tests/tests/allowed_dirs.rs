//! `--allow-dir`: paths a QMP client names (`drive-mirror` targets,
//! `blockdev-add` filenames) are opened only beneath the allowed
//! directories (default: the image's), never through a symlink leading out
//! or at the last component, and only if they are regular files. Each
//! refusal names the rule, and nothing is created, truncated or written:
//! a victim file beside the image directory keeps its bytes and mtime.

use anyhow::{ensure, Result};
use serde_json::json;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tests::bench_mirror::MirrorDaemon;
use tests::daemon::{create_image, ScratchDir};
use tests::qmp_client::QmpClient;

const MIB: u64 = 1 << 20;

/// What must not change: contents, size and mtime of a file.
fn fingerprint(p: &Path) -> Result<(Vec<u8>, u64, i64, i64)> {
    let m = std::fs::metadata(p)?;
    Ok((std::fs::read(p)?, m.len(), m.mtime(), m.mtime_nsec()))
}

/// Layout: ROOT/img/disk.img (served), ROOT/victim (outside).
struct Setup {
    root: ScratchDir,
    img: PathBuf,
    victim: PathBuf,
}

fn setup(tag: &str) -> Result<Setup> {
    let root = ScratchDir::new(tag)?;
    let img = root.join("img");
    std::fs::create_dir(&img)?;
    create_image(&img.join("disk.img"), 4 * MIB)?;
    let victim = root.join("victim");
    std::fs::write(&victim, b"the victim's bytes")?;
    Ok(Setup { root, img, victim })
}

fn mirror_err(q: &mut QmpClient, target: &Path, mode: &str) -> Result<String> {
    let e = q.err(
        "drive-mirror",
        json!({"device": "disk0", "target": target, "sync": "full",
               "mode": mode, "format": "raw"}),
    )?;
    ensure!(e.class == "GenericError", "{e}");
    Ok(e.desc)
}

fn mknod(path: &Path, mode: u32, dev: u64) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid C string.
    ensure!(
        unsafe { libc::mknod(c.as_ptr(), mode, dev) } == 0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// drive-mirror onto every hostile target: outside, `..`, symlinks out
/// (absolute and relative), a symlink as last component, a fifo, a device
/// node; in both modes. Fails on a daemon without `--allow-dir` (it
/// creates or truncates them, or hangs on the fifo).
#[test]
fn drive_mirror_refuses_targets_outside_and_links() -> Result<()> {
    let s = setup("allow-mirror")?;
    let d = MirrorDaemon::start(&s.img, &s.img.join("disk.img"), &[])?;
    let mut q = d.qmp()?;
    let before = fingerprint(&s.victim)?;
    let etc = PathBuf::from(format!("/etc/vubd-allow-test-{}", std::process::id()));
    let outside_new = s.root.join("outside-new");
    // Links at the last component (O_NOFOLLOW) and in the middle
    // (RESOLVE_BENEATH), absolute and relative.
    std::os::unix::fs::symlink(&s.victim, s.img.join("abs"))?;
    std::os::unix::fs::symlink("../victim", s.img.join("rel"))?;
    std::os::unix::fs::symlink(s.root.path(), s.img.join("absdir"))?;
    std::os::unix::fs::symlink("..", s.img.join("reldir"))?;
    std::fs::write(s.img.join("inside.img"), vec![7u8; 4 * MIB as usize])?;
    std::os::unix::fs::symlink("inside.img", s.img.join("last"))?;
    let inside_before = fingerprint(&s.img.join("inside.img"))?;
    mknod(&s.img.join("fifo"), libc::S_IFIFO | 0o600, 0)?;
    mknod(
        &s.img.join("null"),
        libc::S_IFCHR | 0o600,
        libc::makedev(1, 3),
    )?;
    let cases: Vec<(PathBuf, &str)> = vec![
        (etc.clone(), "outside the allowed directories"),
        (outside_new.clone(), "outside the allowed directories"),
        (s.img.join("../victim"), "outside the allowed directories"),
        (s.img.join("abs"), "is a symbolic link"),
        (s.img.join("rel"), "is a symbolic link"),
        (
            s.img.join("absdir/victim"),
            "outside the allowed directories",
        ),
        (
            s.img.join("reldir/victim"),
            "outside the allowed directories",
        ),
        (
            s.img.join("absdir/outside-new"),
            "outside the allowed directories",
        ),
        (s.img.join("last"), "is a symbolic link"),
        (s.img.join("fifo"), "not a regular file"),
        (s.img.join("null"), "not a regular file"),
    ];
    let mut failures = Vec::new();
    for (target, rule) in &cases {
        for mode in ["absolute-paths", "existing"] {
            let desc = mirror_err(&mut q, target, mode)?;
            if !desc.contains(rule) {
                failures.push(format!("{} ({mode}): {desc}", target.display()));
            }
        }
    }
    let etc_made = etc.exists();
    let _ = std::fs::remove_file(&etc);
    ensure!(
        failures.is_empty(),
        "not refused by the rule: {failures:#?}"
    );
    ensure!(!etc_made, "{} was created", etc.display());
    ensure!(
        !outside_new.exists(),
        "{} was created",
        outside_new.display()
    );
    ensure!(fingerprint(&s.victim)? == before, "the victim changed");
    ensure!(
        fingerprint(&s.img.join("inside.img"))? == inside_before,
        "the symlink's target changed"
    );
    // The daemon still mirrors inside its directory.
    q.ok(
        "drive-mirror",
        json!({"device": "disk0", "target": s.img.join("new.img"), "sync": "full",
               "mode": "absolute-paths", "format": "raw", "job-id": "m"}),
    )?;
    q.wait_event("BLOCK_JOB_READY", Duration::from_secs(60), |_| true)?;
    q.ok("block-job-cancel", json!({"device": "m"}))?;
    q.wait_event("BLOCK_JOB_COMPLETED", Duration::from_secs(60), |_| true)?;
    Ok(())
}

/// blockdev-add driver=file: the same rule for a filename outside or
/// through a symlink; an `--allow-dir` given explicitly replaces the
/// default and opens its own files.
#[test]
fn blockdev_add_refuses_files_outside() -> Result<()> {
    let s = setup("allow-add")?;
    let other = s.root.join("other");
    std::fs::create_dir(&other)?;
    create_image(&other.join("b.img"), 4 * MIB)?;
    create_image(&s.img.join("a.img"), 4 * MIB)?;
    std::os::unix::fs::symlink(&s.victim, s.img.join("abs"))?;
    std::os::unix::fs::symlink(s.root.path(), s.img.join("absdir"))?;
    let before = fingerprint(&s.victim)?;
    let d = MirrorDaemon::start(&s.img, &s.img.join("disk.img"), &[])?;
    let mut q = d.qmp()?;
    let add = |q: &mut QmpClient, name: &str, file: &Path| {
        q.execute(
            "blockdev-add",
            json!({"driver": "file", "node-name": name, "filename": file}),
        )
    };
    for (file, rule) in [
        (&s.victim, "outside the allowed directories"),
        (&s.img.join("abs"), "is a symbolic link"),
        (
            &s.img.join("absdir/victim"),
            "outside the allowed directories",
        ),
        (&other.join("b.img"), "outside the allowed directories"),
    ] {
        let r = add(&mut q, "n", file)?;
        ensure!(
            matches!(&r, Err(e) if e.desc.contains(rule)),
            "blockdev-add {}: {r:?}",
            file.display()
        );
    }
    add(&mut q, "a", &s.img.join("a.img"))?.map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(fingerprint(&s.victim)? == before, "the victim changed");
    drop(q);
    drop(d);
    let other_arg = other.to_string_lossy().into_owned();
    let d = MirrorDaemon::start(
        &s.img,
        &s.img.join("disk.img"),
        &["--allow-dir", &other_arg],
    )?;
    let mut q = d.qmp()?;
    add(&mut q, "b", &other.join("b.img"))?.map_err(|e| anyhow::anyhow!("{e}"))?;
    let r = add(&mut q, "a", &s.img.join("a.img"))?;
    ensure!(
        matches!(&r, Err(e) if e.desc.contains("outside the allowed directories")),
        "the image's directory is still allowed: {r:?}"
    );
    Ok(())
}
