//! The persistent dirty-bitmap sidecar loader, as the daemon runs it at
//! start-up: the input is the sidecar's content, loaded for a disk of
//! `DISK_SIZE` bytes (the size the seeds were written for).
//!
//! Checks: loading never panics; a damaged sidecar loads (its bitmaps
//! inconsistent), and every loaded bitmap covers the disk.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use vubd_backend::dirty::{recover, DirtyTracker, MemStore, MetaStore, TrackerConfig};

/// The seeds' disk size (64 MiB, as in `ci/fuzz-seeds.sh`).
const DISK_SIZE: u64 = 64 << 20;

fuzz_target!(|input: &[u8]| {
    let store = Arc::new(MemStore::new());
    store.set_contents(Some(input.to_vec()));
    let Ok(rec) = recover(store.as_ref(), DISK_SIZE) else {
        return;
    };
    for b in &rec.bitmaps {
        assert!(b.bitmap.dirty_chunks() <= DISK_SIZE.div_ceil(b.granularity));
    }
    // The tracker's start-up on the same sidecar: recovery, then the
    // rewrite of the file it does after an unclean stop.
    let mut cfg = TrackerConfig::new(DISK_SIZE);
    cfg.sidecar = Some(store.clone() as Arc<dyn MetaStore>);
    if let Ok(tracker) = DirtyTracker::open(cfg) {
        drop(tracker);
    }
});
