//! The pivot marker: a small file `IMAGE.vubd-pivoted` that a mirror's
//! pivot leaves beside the image the disk leaves, naming the image it moved
//! to. The daemon's command line is not rewritten by a pivot, so without it
//! a restart with the old `--image` would silently serve the guest its disk
//! as it was before the pivot. The daemon refuses to start on an image with
//! a marker unless told to (`--allow-stale-image`, which removes it).
//!
//! The marker is written once the target is complete and flushed, with guest
//! I/O paused: from then until the swap nothing changes either image, so a
//! marker that survives a crash in that window is still true. It is written
//! atomically (temporary file, fsync, rename, fsync of the directory), so a
//! crash never leaves half a marker.
//!
//! Format (text): `vubd-pivoted 1`, then `identity DEV INO` (or
//! `identity -`), then `path ` followed by the new image's path, raw bytes
//! up to the end of the file.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const MAGIC: &str = "vubd-pivoted 1\n";
/// Markers are tiny; anything larger is not one of ours.
const MAX_LEN: u64 = 64 << 10;

/// What a marker records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PivotMarker {
    /// The image the disk moved to.
    pub new_image: PathBuf,
    /// Its identity ([`crate::image::file_identity`]), if known.
    pub identity: Option<(u64, u64)>,
}

/// Where the marker of `image` lives.
pub fn marker_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".vubd-pivoted");
    PathBuf::from(s)
}

fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

/// A marker written and synced under a temporary name, before the pivot's
/// pause: [`StagedMarker::commit`] puts it in place (a rename and a
/// directory fsync, the only part that must wait until the target is
/// complete); dropped uncommitted, it leaves nothing behind.
#[must_use = "a staged marker is removed again unless committed"]
pub struct StagedMarker {
    tmp: PathBuf,
    path: PathBuf,
}

/// Stages the marker beside `old`: the disk moves to `new` (whose identity
/// is `identity`).
pub fn stage(old: &Path, new: &Path, identity: Option<(u64, u64)>) -> io::Result<StagedMarker> {
    let path = marker_path(old);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let staged = StagedMarker {
        tmp: PathBuf::from(tmp),
        path,
    };
    let mut body = MAGIC.as_bytes().to_vec();
    match identity {
        Some((dev, ino)) => body.extend_from_slice(format!("identity {dev} {ino}\n").as_bytes()),
        None => body.extend_from_slice(b"identity -\n"),
    }
    body.extend_from_slice(b"path ");
    body.extend_from_slice(new.as_os_str().as_bytes());
    let mut f = crate::allowed_dirs::create_sidecar(&staged.tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    Ok(staged)
}

impl StagedMarker {
    /// Puts the marker in place; durable when this returns.
    pub fn commit(self) -> io::Result<()> {
        std::fs::rename(&self.tmp, &self.path)?;
        sync_dir(&self.path)
    }
}

impl Drop for StagedMarker {
    fn drop(&mut self) {
        // After a commit the temporary name is gone: nothing to remove.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Reads the marker beside `image`; `Ok(None)` if there is none. A file
/// that is there but cannot be parsed is an error (refuse rather than
/// guess).
pub fn read(image: &Path) -> io::Result<Option<PivotMarker>> {
    let path = marker_path(image);
    let f = match crate::allowed_dirs::open_sidecar(&path, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(f, MAX_LEN), &mut bytes)?;
    parse(&bytes)
        .map(Some)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a vubd pivot marker"))
}

fn parse(bytes: &[u8]) -> Option<PivotMarker> {
    let rest = bytes.strip_prefix(MAGIC.as_bytes())?;
    let nl = rest.iter().position(|&b| b == b'\n')?;
    let (line, rest) = (std::str::from_utf8(&rest[..nl]).ok()?, &rest[nl + 1..]);
    let identity = match line.strip_prefix("identity ")? {
        "-" => None,
        pair => {
            let (dev, ino) = pair.split_once(' ')?;
            Some((dev.parse().ok()?, ino.parse().ok()?))
        }
    };
    let path = rest.strip_prefix(b"path ")?;
    if path.is_empty() {
        return None;
    }
    Some(PivotMarker {
        new_image: PathBuf::from(std::ffi::OsStr::from_bytes(path)),
        identity,
    })
}

/// Removes the marker beside `image` (the disk serves `image` again);
/// durable when this returns. No marker is not an error.
pub fn remove(image: &Path) -> io::Result<()> {
    let path = marker_path(image);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(&path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_remove() {
        let dir = std::env::temp_dir().join(format!("vubd-marker-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = dir.join("a.img");
        assert_eq!(read(&old).unwrap(), None);
        let new = dir.join("new\nline b.img");
        stage(&old, &new, Some((7, 42))).unwrap().commit().unwrap();
        let m = read(&old).unwrap().unwrap();
        assert_eq!(m.new_image, new);
        assert_eq!(m.identity, Some((7, 42)));
        drop(stage(&old, &new, None).unwrap());
        assert_eq!(
            read(&old).unwrap().unwrap().identity,
            Some((7, 42)),
            "an uncommitted marker replaced the one in place"
        );
        stage(&old, &new, None).unwrap().commit().unwrap();
        assert_eq!(read(&old).unwrap().unwrap().identity, None);
        std::fs::write(marker_path(&old), b"garbage").unwrap();
        assert_eq!(read(&old).unwrap_err().kind(), io::ErrorKind::InvalidData);
        remove(&old).unwrap();
        remove(&old).unwrap();
        assert_eq!(read(&old).unwrap(), None);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "temp file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
