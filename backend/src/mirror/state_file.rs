//! The mirror's persistent state: a sidecar file beside the *source* image
//! (`IMAGE.vubd-mirror`) holding a header (disk size, granularity, target
//! path, the host's boot id) and the persistent bitmap P, memory-mapped.
//!
//! Invariant: every chunk whose bytes on the target may differ from the
//! source has its bit set in P. Guest writes set P before their data is
//! issued (a store into the shared mapping is in the page cache at once,
//! so it survives kill -9 of the daemon); bits are cleared only at a
//! checkpoint, P := D, taken while guest I/O is paused at the disk's gate
//! and no chunk copy is in flight, so that no write is between its mark
//! and its landing and D is exact. After a crash, D := P and the mirror
//! copies only those chunks.
//!
//! Marks are not msync'ed before the guest write (that would cost a
//! synchronous write per guest write): after a host crash or power loss the
//! bitmap cannot be trusted. The header records the boot id; a sidecar from
//! an earlier boot makes the whole disk dirty again (a full copy, never a
//! silently incomplete one).

use super::MirrorError;
use crate::bits::{words_for, AtomicBits};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

const MAGIC: &[u8; 8] = b"VUBDMIRR";
const VERSION: u32 = 1;
/// Header size; the bitmap words start here (page aligned).
const HEADER: usize = 4096;
const MAX_TARGET_PATH: usize = 3800;

/// The sidecar path for a source image.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".vubd-mirror");
    PathBuf::from(s)
}

/// The kernel's id of this boot (empty if unavailable).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// What the header records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateHeader {
    /// Size of the disk in bytes.
    pub disk_size: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// The mirror's target image.
    pub target: PathBuf,
    /// Boot id of the host when the state was written.
    pub boot_id: String,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

impl StateHeader {
    fn encode(&self) -> Result<Vec<u8>, MirrorError> {
        use std::os::unix::ffi::OsStrExt;
        let target = self.target.as_os_str().as_bytes();
        if target.len() > MAX_TARGET_PATH {
            return Err(MirrorError::State(format!(
                "target path is longer than {MAX_TARGET_PATH} bytes"
            )));
        }
        let mut h = vec![0u8; HEADER];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&self.disk_size.to_le_bytes());
        h[24..32].copy_from_slice(&self.granularity.to_le_bytes());
        let boot = self.boot_id.as_bytes();
        let n = boot.len().min(48);
        h[40..40 + n].copy_from_slice(&boot[..n]);
        h[88..92].copy_from_slice(&(target.len() as u32).to_le_bytes());
        h[92..92 + target.len()].copy_from_slice(target);
        let sum = fnv1a(&h[..HEADER - 8]);
        h[HEADER - 8..].copy_from_slice(&sum.to_le_bytes());
        Ok(h)
    }

    fn decode(h: &[u8]) -> Result<StateHeader, String> {
        use std::os::unix::ffi::OsStrExt;
        if h.len() < HEADER || &h[0..8] != MAGIC {
            return Err("not a vubd mirror state file".into());
        }
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap_or([0; 4]));
        if u64_at(HEADER - 8) != fnv1a(&h[..HEADER - 8]) {
            return Err("header checksum mismatch".into());
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!("unsupported version {version}"));
        }
        let granularity = u64_at(24);
        if !granularity.is_power_of_two() || granularity < 512 {
            return Err(format!("bad granularity {granularity}"));
        }
        let tlen = u32_at(88) as usize;
        if tlen > MAX_TARGET_PATH {
            return Err("bad target path length".into());
        }
        let boot = &h[40..88];
        let boot_len = boot.iter().position(|&b| b == 0).unwrap_or(boot.len());
        Ok(StateHeader {
            disk_size: u64_at(16),
            granularity,
            target: PathBuf::from(std::ffi::OsStr::from_bytes(&h[92..92 + tlen])),
            boot_id: String::from_utf8_lossy(&boot[..boot_len]).into_owned(),
        })
    }
}

/// A shared, writable mapping of the whole sidecar.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics
// (the bitmap words); the pointer is valid until Drop.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len come from a successful mmap and are unmapped once.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// An open sidecar: its header and its persistent bitmap P.
pub struct StateFile {
    // Declared before `map`: dropped before the mapping it points into.
    bits: AtomicBits,
    map: Mapping,
    file: File,
    path: PathBuf,
    header: StateHeader,
}

impl std::fmt::Debug for StateFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateFile")
            .field("path", &self.path)
            .field("header", &self.header)
            .field("dirty", &self.bits.count())
            .finish()
    }
}

fn io_err(path: &Path, what: &str) -> impl FnOnce(io::Error) -> MirrorError {
    let p = path.display().to_string();
    let what = what.to_string();
    move |e| MirrorError::State(format!("{what} {p}: {e}"))
}

impl StateFile {
    fn file_len(header: &StateHeader) -> (u64, usize) {
        let chunks = header.disk_size.div_ceil(header.granularity);
        (chunks, HEADER + words_for(chunks) * 8)
    }

    fn map(file: File, path: PathBuf, header: StateHeader) -> Result<StateFile, MirrorError> {
        let (chunks, len) = Self::file_len(&header);
        // SAFETY: mapping a file we opened read-write, of at least `len`
        // bytes (checked or allocated by the callers).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io_err(&path, "cannot map")(io::Error::last_os_error()));
        }
        let map = Mapping {
            ptr: ptr.cast(),
            len,
        };
        // SAFETY: the words lie inside the mapping (HEADER is page aligned,
        // so they are 8-byte aligned); AtomicU64 has u64's layout. The slice
        // is only used through `bits`, which is dropped before `map`.
        let words: &'static [AtomicU64] = unsafe {
            std::slice::from_raw_parts(map.ptr.add(HEADER).cast::<AtomicU64>(), words_for(chunks))
        };
        Ok(StateFile {
            bits: AtomicBits::over(chunks, words),
            map,
            file,
            path,
            header,
        })
    }

    /// Creates (or replaces) the sidecar at `path` with all bits clear,
    /// space allocated up front (a full file system then fails here, not
    /// with SIGBUS on a later store).
    pub fn create(path: &Path, header: StateHeader) -> Result<StateFile, MirrorError> {
        let encoded = header.encode()?;
        let (_, len) = Self::file_len(&header);
        let file =
            crate::allowed_dirs::create_sidecar(path).map_err(io_err(path, "cannot create"))?;
        file.set_len(len as u64)
            .map_err(io_err(path, "cannot size"))?;
        // SAFETY: fallocate on our fd; no memory involved.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if !matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
            ) {
                let _ = std::fs::remove_file(path);
                return Err(io_err(path, "cannot allocate")(e));
            }
        }
        file.write_all_at(&encoded, 0)
            .map_err(io_err(path, "cannot write"))?;
        file.sync_all().map_err(io_err(path, "cannot sync"))?;
        Self::map(file, path.to_path_buf(), header)
    }

    /// Opens an existing sidecar; `Ok(None)` if there is none.
    pub fn open(path: &Path) -> Result<Option<StateFile>, MirrorError> {
        let file = match crate::allowed_dirs::open_sidecar(path, true) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(path, "cannot open")(e)),
        };
        let mut h = vec![0u8; HEADER];
        file.read_exact_at(&mut h, 0)
            .map_err(io_err(path, "cannot read"))?;
        let header = StateHeader::decode(&h)
            .map_err(|e| MirrorError::State(format!("{}: {e}", path.display())))?;
        let (_, len) = Self::file_len(&header);
        let actual = file.metadata().map_err(io_err(path, "cannot stat"))?.len();
        if actual < len as u64 {
            return Err(MirrorError::State(format!(
                "{}: truncated ({actual} bytes, {len} expected)",
                path.display()
            )));
        }
        Self::map(file, path.to_path_buf(), header).map(Some)
    }

    /// The header.
    pub fn header(&self) -> &StateHeader {
        &self.header
    }

    /// The persistent bitmap P.
    pub fn bits(&self) -> &AtomicBits {
        &self.bits
    }

    /// Where the sidecar is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the mapping back to storage (a checkpoint's durability
    /// against host crashes is best effort; see the module comment).
    pub fn sync(&self) {
        // SAFETY: msync over our own mapping.
        let rc = unsafe { libc::msync(self.map.ptr.cast(), self.map.len, libc::MS_ASYNC) };
        if rc != 0 {
            log::debug!(
                "msync {}: {}",
                self.path.display(),
                io::Error::last_os_error()
            );
        }
        let _ = &self.file;
    }

    /// Deletes the sidecar (the mirror ended; nothing to resume).
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("cannot remove mirror state {}: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_mark_reopen_and_reject_damage() {
        let dir = std::env::temp_dir().join(format!("vubd-mirror-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("img.vubd-mirror");
        let header = StateHeader {
            disk_size: (10 << 20) + 512,
            granularity: 65536,
            target: dir.join("target image"),
            boot_id: boot_id(),
        };
        let s = StateFile::create(&path, header.clone()).unwrap();
        assert_eq!(s.bits().len(), 161);
        s.bits().set(3, 5);
        s.bits().set(160, 160);
        drop(s);
        let s = StateFile::open(&path).unwrap().unwrap();
        assert_eq!(s.header(), &header);
        assert_eq!(s.bits().count(), 4);
        assert!(s.bits().get(160) && s.bits().get(3) && !s.bits().get(6));
        drop(s);
        // A flipped header byte is detected.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], 20).unwrap();
        let e = StateFile::open(&path).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        assert!(StateFile::open(&dir.join("none")).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
