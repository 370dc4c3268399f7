//! [`MetaStore`]: the one narrow door through which sidecar bytes reach
//! storage. Everything the durability protocol relies on is stated here
//! (what is durable when), so a test can put a store that forgets unsynced
//! writes at a "power cut" in place of the real file and check recovery.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

/// Positional storage for one sidecar file.
///
/// Durability contract the tracker relies on:
/// - a [`MetaStore::write_at`] may be lost, partly (per 512-byte sector) or
///   wholly, in any order relative to other unsynced writes, until a
///   [`MetaStore::sync`] that started after it returns;
/// - [`MetaStore::replace`] is atomic (a crash leaves the old or the new
///   content) and durable when it returns;
/// - [`MetaStore::remove`] is durable when it returns;
/// - [`MetaStore::stage`] changes nothing a recovery reads;
///   [`MetaStore::commit_staged`] is a [`MetaStore::replace`];
/// - a [`MetaStore::replace`] or [`MetaStore::remove`] that fails with an
///   error [`took_effect`] says so did happen, only not durably: the store
///   reads and writes the new content from then on, a crash may bring back
///   the old one until a later [`MetaStore::sync`] (or replacement, or
///   removal) succeeds, and no [`MetaStore::sync`] succeeds before it is
///   durable.
pub trait MetaStore: Send + Sync {
    /// Current size in bytes, or `None` if the file does not exist.
    fn size(&self) -> io::Result<Option<u64>>;
    /// Reads at `offset` into `buf`; returns the bytes read (short at end of file).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes all of `buf` at `offset` (not durable until [`MetaStore::sync`]).
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every write that completed before the call durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Atomically replaces the whole content, durably (creates the file).
    fn replace(&self, contents: &[u8]) -> io::Result<()>;
    /// Deletes the file, durably; no error if it does not exist.
    fn remove(&self) -> io::Result<()>;
    /// The slow part of a [`MetaStore::replace`] done ahead of time: writes
    /// `contents` where it does not replace anything yet (a temporary
    /// file) and makes it durable. The default stages nothing (then
    /// [`MetaStore::commit_staged`] does the whole replacement).
    fn stage(&self, _contents: &[u8]) -> io::Result<()> {
        Ok(())
    }
    /// Atomically and durably replaces the whole content with `contents`,
    /// which differs from what [`MetaStore::stage`] wrote only in the byte
    /// ranges `changed`: those are written, synced, and the staged file is
    /// put in place. Without a staged file: [`MetaStore::replace`].
    fn commit_staged(&self, contents: &[u8], _changed: &[Range<usize>]) -> io::Result<()> {
        self.replace(contents)
    }
    /// Forgets a staged file that will not be put in place (if any, also
    /// one a killed process left behind).
    fn discard_staged(&self) {}
    /// A name for log lines (the path).
    fn describe(&self) -> String;
}

/// The error of a replacement or removal that took effect (the file at the
/// path is the new one) but could not be made durable: the directory sync
/// after the rename or unlink failed.
#[derive(Debug)]
pub struct NotDurable(pub io::Error);

impl std::fmt::Display for NotDurable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "done but not durable: {}", self.0)
    }
}

impl std::error::Error for NotDurable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// Whether a failed [`MetaStore::replace`], [`MetaStore::commit_staged`] or
/// [`MetaStore::remove`] nevertheless took effect ([`NotDurable`]).
pub fn took_effect(err: &io::Error) -> bool {
    err.get_ref().is_some_and(|e| e.is::<NotDurable>())
}

/// Syncs a directory (the default of [`FileStore::with_dir_sync`]).
fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads the whole content (or `None` if the file does not exist).
pub(crate) fn read_all(store: &dyn MetaStore) -> io::Result<Option<Vec<u8>>> {
    let Some(size) = store.size()? else {
        return Ok(None);
    };
    let size = usize::try_from(size).map_err(|_| io::Error::other("sidecar too large"))?;
    let mut buf = vec![0u8; size];
    let mut done = 0;
    while done < size {
        let n = store.read_at(done as u64, &mut buf[done..])?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(Some(buf))
}

/// The real sidecar: a file beside the image. Replacement writes
/// `PATH.tmp`, fsyncs it, renames it over `PATH` and fsyncs the directory;
/// a staged replacement does the first two ahead of time.
pub struct FileStore {
    path: PathBuf,
    file: RwLock<Option<File>>,
    /// `PATH.tmp`, written and synced by `stage`.
    staged: Mutex<Option<File>>,
    /// A rename or unlink in the directory is not durable yet: the next
    /// `sync` syncs the directory first.
    dir_pending: AtomicBool,
    sync_dir_op: fn(&Path) -> io::Result<()>,
}

impl FileStore {
    /// A store for the file at `path` (which need not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self::with_dir_sync(path, fsync_dir)
    }

    /// A store whose directory syncs go through `sync_dir` (a test injects
    /// failures there).
    pub fn with_dir_sync(path: impl Into<PathBuf>, sync_dir: fn(&Path) -> io::Result<()>) -> Self {
        FileStore {
            path: path.into(),
            file: RwLock::new(None),
            staged: Mutex::new(None),
            dir_pending: AtomicBool::new(false),
            sync_dir_op: sync_dir,
        }
    }

    fn tmp_path(&self) -> PathBuf {
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        PathBuf::from(tmp)
    }

    fn write_tmp(&self, contents: &[u8]) -> io::Result<File> {
        let file = crate::allowed_dirs::create_sidecar(&self.tmp_path())?;
        file.write_all_at(contents, 0)?;
        file.sync_all()?;
        Ok(file)
    }

    /// Puts the synced `PATH.tmp` in place, durably. Once renamed, the new
    /// file is the one in use even if the directory sync fails
    /// ([`NotDurable`]): writes to the old, unlinked file would be lost.
    fn install(&self, file: File) -> io::Result<()> {
        std::fs::rename(self.tmp_path(), &self.path)?;
        *self.file.write().unwrap_or_else(|e| e.into_inner()) = Some(file);
        self.dir_pending.store(true, Ordering::SeqCst);
        self.sync_dir_pending()
    }

    /// Syncs the directory after a rename or unlink; on failure the change
    /// stays pending for the next [`MetaStore::sync`].
    fn sync_dir_pending(&self) -> io::Result<()> {
        match self.sync_dir() {
            Ok(()) => {
                self.dir_pending.store(false, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => Err(io::Error::new(e.kind(), NotDurable(e))),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with_file<T>(&self, f: impl FnOnce(&File) -> io::Result<T>) -> io::Result<T> {
        {
            let guard = self.file.read().unwrap_or_else(|e| e.into_inner());
            if let Some(file) = guard.as_ref() {
                return f(file);
            }
        }
        let mut guard = self.file.write().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(crate::allowed_dirs::open_sidecar(&self.path, true)?);
        }
        match guard.as_ref() {
            Some(file) => f(file),
            None => Err(io::Error::other("sidecar not open")),
        }
    }

    fn sync_dir(&self) -> io::Result<()> {
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (self.sync_dir_op)(&dir)
    }
}

impl MetaStore for FileStore {
    fn size(&self) -> io::Result<Option<u64>> {
        match std::fs::metadata(&self.path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        self.with_file(|f| f.read_at(buf, offset))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.with_file(|f| f.write_all_at(buf, offset))
    }

    fn sync(&self) -> io::Result<()> {
        // Data synced into a file whose name may still vanish is not durable.
        if self.dir_pending.load(Ordering::SeqCst) {
            self.sync_dir()?;
            self.dir_pending.store(false, Ordering::SeqCst);
        }
        self.with_file(|f| f.sync_data())
    }

    fn replace(&self, contents: &[u8]) -> io::Result<()> {
        // Whatever was staged is overwritten.
        self.staged.lock().unwrap_or_else(|e| e.into_inner()).take();
        let file = self.write_tmp(contents)?;
        self.install(file)
    }

    fn stage(&self, contents: &[u8]) -> io::Result<()> {
        let mut staged = self.staged.lock().unwrap_or_else(|e| e.into_inner());
        *staged = None;
        *staged = Some(self.write_tmp(contents)?);
        Ok(())
    }

    fn commit_staged(&self, contents: &[u8], changed: &[Range<usize>]) -> io::Result<()> {
        let Some(file) = self.staged.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return self.replace(contents);
        };
        if file.metadata()?.len() != contents.len() as u64 {
            return self.replace(contents);
        }
        let result = (|| {
            for r in changed {
                let bytes = contents
                    .get(r.clone())
                    .ok_or_else(|| io::Error::other("changed range outside the sidecar"))?;
                file.write_all_at(bytes, r.start as u64)?;
            }
            if !changed.is_empty() {
                file.sync_data()?;
            }
            self.install(file)
        })();
        if result.is_err() {
            // Taken from `staged` above, so `discard_staged` no longer
            // knows of it (gone already if the rename went through).
            let _ = std::fs::remove_file(self.tmp_path());
        }
        result
    }

    fn discard_staged(&self) {
        // Also a file a killed process staged: `PATH.tmp` is only ever a
        // staging area, never a state anything recovers from.
        self.staged.lock().unwrap_or_else(|e| e.into_inner()).take();
        match std::fs::remove_file(self.tmp_path()) {
            Ok(()) => {
                if let Err(e) = self.sync_dir() {
                    log::debug!("syncing the directory of {}: {e}", self.path.display());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::debug!("removing {}: {e}", self.tmp_path().display()),
        }
    }

    fn remove(&self) -> io::Result<()> {
        *self.file.write().unwrap_or_else(|e| e.into_inner()) = None;
        match std::fs::remove_file(&self.path) {
            Ok(()) => {
                self.dir_pending.store(true, Ordering::SeqCst);
                self.sync_dir_pending()
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// An in-memory store where everything is durable at once (unit tests, and
/// a place to keep a sidecar image in memory).
#[derive(Default)]
pub struct MemStore {
    data: Mutex<Option<Vec<u8>>>,
}

impl MemStore {
    /// An empty store (no file).
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the current content.
    pub fn contents(&self) -> Option<Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets the content (e.g. to inject damage).
    pub fn set_contents(&self, contents: Option<Vec<u8>>) {
        *self.data.lock().unwrap_or_else(|e| e.into_inner()) = contents;
    }
}

impl MetaStore for MemStore {
    fn size(&self) -> io::Result<Option<u64>> {
        Ok(self
            .data
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|d| d.len() as u64))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let guard = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let data = guard
            .as_ref()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut guard = self.data.lock().unwrap_or_else(|e| e.into_inner());
        let data = guard
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let start = usize::try_from(offset).map_err(|_| io::Error::other("offset"))?;
        if data.len() < start + buf.len() {
            data.resize(start + buf.len(), 0);
        }
        data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn replace(&self, contents: &[u8]) -> io::Result<()> {
        *self.data.lock().unwrap_or_else(|e| e.into_inner()) = Some(contents.to_vec());
        Ok(())
    }

    fn remove(&self) -> io::Result<()> {
        *self.data.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static FAIL: AtomicBool = AtomicBool::new(false);

    fn flaky_dir_sync(dir: &Path) -> io::Result<()> {
        if FAIL.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5));
        }
        fsync_dir(dir)
    }

    /// After a rename whose directory sync failed, the store uses the new
    /// file and refuses to call anything durable until the directory is.
    #[test]
    fn replace_with_failed_directory_sync_takes_effect_and_blocks_sync() {
        let dir = std::env::temp_dir().join(format!("vubd-store-dirsync-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("s");
        let store = FileStore::with_dir_sync(&path, flaky_dir_sync);
        store.replace(b"old!").expect("first replace");
        FAIL.store(true, Ordering::SeqCst);
        let err = store.replace(b"new!").expect_err("directory sync fails");
        assert!(took_effect(&err), "not reported as in place: {err}");
        store.write_at(0, b"N").expect("write");
        assert_eq!(
            std::fs::read(&path).expect("read"),
            b"New!",
            "wrote elsewhere"
        );
        assert!(store.sync().is_err(), "synced before the rename is durable");
        FAIL.store(false, Ordering::SeqCst);
        store.sync().expect("sync once the directory syncs");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
