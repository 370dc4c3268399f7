//! What the fuzz targets share: real images on tmpfs, and an in-memory
//! NBD client stream.
//!
//! Every file a target makes lives in one scratch directory of this
//! process on tmpfs, and images are unlinked as soon as they are open, so a
//! fuzzer killed at any point leaves nothing behind.

use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;
use vubd_backend::dirty::{DirtyTracker, TrackerConfig};
use vubd_backend::nbd::export::{ExportBitmap, ExportConfig, Exports};
use vubd_backend::nbd::transmission::TimedRead;
use vubd_backend::nbd::DiskSource;
use vubd_backend::qmp::{DirtyBitmaps, EventBus};
use vubd_backend::{Disk, RawImage, RawImageOptions};

/// Size of the images the targets serve: small, so that any offset a
/// fuzzer picks is near an edge.
pub const DISK_SIZE: u64 = 1 << 20;

/// This process's scratch directory (on /dev/shm when there is one).
pub fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let base = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("vubd-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("cannot create the fuzz scratch directory");
        dir
    })
}

/// A disk over a fresh raw image of `DISK_SIZE` bytes (a pattern in its
/// first half, a hole in the second), already unlinked.
pub fn disk(name: &str) -> Arc<Disk> {
    let path = scratch_dir().join(format!("{name}.img"));
    let mut data = vec![0u8; (DISK_SIZE / 2) as usize];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    std::fs::write(&path, &data).expect("cannot write the fuzz image");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("cannot open the fuzz image");
    file.set_len(DISK_SIZE).expect("cannot size the fuzz image");
    let image = RawImage::open(
        &path,
        RawImageOptions {
            read_only: false,
            direct: false,
        },
    )
    .expect("cannot open the fuzz image");
    let _ = std::fs::remove_file(&path);
    Arc::new(Disk::new(Box::new(image), false))
}

/// The client side of an NBD connection: the fuzz input, then end of stream.
pub struct ClientBytes<'a>(pub &'a [u8]);

impl Read for ClientBytes<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl TimedRead for ClientBytes<'_> {
    // The input is all there: nothing ever waits.
    fn set_deadline(&mut self, _deadline: Option<Instant>) -> std::io::Result<()> {
        Ok(())
    }
}

/// The NBD exports the targets serve: `disk0`, writable, over a real disk,
/// with `qemu:allocation-depth` and one dirty bitmap `b0` (some bits set).
/// Made once per process: the handshake and transmission only read it.
pub fn nbd_exports() -> &'static Exports {
    static E: OnceLock<Exports> = OnceLock::new();
    E.get_or_init(|| {
        let tracker = Arc::new(
            DirtyTracker::open(TrackerConfig::new(DISK_SIZE)).expect("in-memory dirty tracker"),
        );
        DirtyBitmaps::add(tracker.as_ref(), "b0", 65536, false, false).expect("bitmap b0");
        tracker.mark(65536 + 10, 100_000).expect("mark b0");
        let exports = Exports::new(EventBus::new());
        exports.add(ExportConfig {
            id: "export0".into(),
            name: "disk0".into(),
            description: Some("fuzz".into()),
            node: "disk0".into(),
            writable: true,
            writethrough: false,
            allocation_depth: true,
            source: Arc::new(DiskSource::new(disk("nbd"))),
            bitmaps: vec![ExportBitmap {
                name: "b0".into(),
                engine: tracker as Arc<dyn DirtyBitmaps>,
            }],
            release: None,
        });
        exports
    })
}
