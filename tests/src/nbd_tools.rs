//! The stock NBD tools a backup tool uses, as the backup tests run them:
//! `nbdinfo --map` parsed into extents, and docs/backup.md's recipe that
//! applies an export's dirty extents to an earlier full copy.

use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::process::Command;

/// Runs `program args` and returns its standard output; fails with its
/// standard error if it does not exit 0.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nbdinfo --map=CONTEXT URI` as (offset, length, type) extents.
pub fn map(uri: &str, context: &str) -> Result<Vec<(u64, u64, u32)>> {
    let out = run("nbdinfo", &[&format!("--map={context}"), uri])?;
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            ensure!(f.len() >= 3, "bad map line {l:?}");
            Ok((f[0].parse()?, f[1].parse()?, f[2].parse()?))
        })
        .collect()
}

/// The extents `nbdinfo --map=qemu:dirty-bitmap:BITMAP` reports dirty, as
/// (start, end) byte ranges.
pub fn dirty_extents(uri: &str, bitmap: &str) -> Result<Vec<(u64, u64)>> {
    Ok(map(uri, &format!("qemu:dirty-bitmap:{bitmap}"))?
        .into_iter()
        .filter(|m| m.2 & 1 == 1)
        .map(|m| (m.0, m.0 + m.1))
        .collect())
}

/// The incremental backup as docs/backup.md has it, with stock tools only:
/// the extents of `export` on the unix socket `socket` that `bitmap` marks
/// dirty are read from the export (nbdkit's `offset` filter windows it) and
/// written at their offsets into `full`, the previous full copy.
pub fn apply_dirty_extents(socket: &Path, export: &str, bitmap: &str, full: &Path) -> Result<()> {
    let recipe = r#"nbdinfo --map=qemu:dirty-bitmap:$BITMAP "$URI" |
        while read -r off len type _; do
          [ "$type" = 1 ] || continue
          nbdcopy -- [ nbdkit -r nbd socket="$SOCK" export="$EXPORT" \
                       --filter=offset offset=$off range=$len ] - |
            dd of="$FULL" bs=1M oflag=seek_bytes seek=$off conv=notrunc status=none
        done"#;
    let out = Command::new("sh")
        .args(["-e", "-c", recipe])
        .env(
            "URI",
            format!("nbd+unix:///{export}?socket={}", socket.display()),
        )
        .env("SOCK", socket)
        .env("EXPORT", export)
        .env("BITMAP", bitmap)
        .env("FULL", full)
        .output()
        .context("cannot run sh")?;
    ensure!(
        out.status.success(),
        "the incremental recipe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
