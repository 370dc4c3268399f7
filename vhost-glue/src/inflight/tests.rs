//! The tracking logic over a real sealed memfd, as a frontend keeps it
//! across a backend crash (the region is reopened from the same file).

use super::region::{queue_stride, Region, RegionError};
use super::QueueTracker;
use std::sync::Arc;

/// A backend's life on queue 0: returns the file the frontend keeps.
fn fresh(queue_size: u16) -> (Arc<Region>, std::fs::File) {
    let (region, file) = Region::create(2, queue_size).expect("create");
    (Arc::new(region), file)
}

fn reopen(file: &std::fs::File, queue_size: u16) -> Arc<Region> {
    let size = (queue_stride(queue_size) * 2) as u64;
    Arc::new(Region::open(file, 0, size, 2, queue_size).expect("reopen"))
}

#[test]
fn fresh_region_keeps_the_frontends_base() {
    let (region, _file) = fresh(8);
    let mut t = QueueTracker::new(region, 0).expect("queue 0");
    assert_eq!(t.start(5), None);
    assert_eq!(t.next_resubmit(), None);
}

#[test]
fn restart_resubmits_in_fetch_order_and_fixes_up_avail() {
    let (region, file) = fresh(16);
    let mut t = QueueTracker::new(region.clone(), 0).expect("queue 0");
    assert_eq!(t.start(0), None);
    // Fetch heads 7, 3, 12, 0, 9 (avail positions 0..5); 3 and 0 complete
    // (used idx 2), the others are in flight when the backend dies.
    for head in [7, 3, 12, 0, 9] {
        t.fetched(head);
    }
    let mut used = 0u16;
    for head in [3, 0] {
        t.completing(head);
        used += 1;
        t.completed(head, used);
    }
    drop(t);
    drop(region);

    let region = reopen(&file, 16);
    let mut t = QueueTracker::new(region, 0).expect("queue 0");
    // The frontend restarts the ring at the used index: 2. Without the
    // fix-up avail position 2 (head 12) would run again after 7 and 9 are
    // lost; with it, 7, 12, 9 are resubmitted and new requests start at 5.
    assert_eq!(t.start(2), Some(5));
    let resubmitted: Vec<u16> = std::iter::from_fn(|| t.next_resubmit()).collect();
    assert_eq!(resubmitted, [7, 12, 9]);
    // New fetches count on after the old ones.
    t.fetched(4);
    drop(t);
    let region2 = reopen(&file, 16);
    let mut t = QueueTracker::new(region2, 0).expect("queue 0");
    assert_eq!(t.start(2), Some(6));
    let order: Vec<u16> = std::iter::from_fn(|| t.next_resubmit()).collect();
    assert_eq!(order, [7, 12, 9, 4]);
}

#[test]
fn crash_between_used_update_and_clear_does_not_repeat_the_request() {
    let (region, file) = fresh(8);
    let mut t = QueueTracker::new(region.clone(), 1).expect("queue 1");
    t.start(100);
    for head in [1, 2, 3] {
        t.fetched(head);
    }
    // Head 2 went into the used ring (guest used idx 101), then the
    // backend died before clearing it.
    t.completing(2);
    drop(t);
    drop(region);

    let mut t = QueueTracker::new(reopen(&file, 8), 1).expect("queue 1");
    assert_eq!(t.start(101), Some(103));
    let order: Vec<u16> = std::iter::from_fn(|| t.next_resubmit()).collect();
    assert_eq!(order, [1, 3]);
}

#[test]
fn used_index_wraps() {
    let (region, file) = fresh(8);
    let mut t = QueueTracker::new(region.clone(), 0).expect("queue 0");
    t.start(65534);
    for head in [5, 6, 7] {
        t.fetched(head);
    }
    t.completing(6);
    t.completed(6, 65535);
    drop(t);
    drop(region);
    let mut t = QueueTracker::new(reopen(&file, 8), 0).expect("queue 0");
    assert_eq!(t.start(65535), Some(1));
    assert_eq!(t.resubmit_pending(), 2);
}

#[test]
fn frontend_garbage_is_refused_or_bounded() {
    let (region, file) = fresh(8);
    // mmap_size too small for the geometry, or beyond the file.
    assert!(matches!(
        Region::open(&file, 0, 64, 2, 8),
        Err(RegionError::Size { .. })
    ));
    assert!(matches!(
        Region::open(&file, 4096, region.len() as u64, 2, 8),
        Err(RegionError::Size { .. })
    ));
    assert!(matches!(
        Region::open(&file, 0, u64::MAX, 2, 8),
        Err(RegionError::Size { .. })
    ));
    assert!(matches!(
        Region::open(&file, 0, 4096, 0, 8),
        Err(RegionError::Geometry { .. })
    ));
    // A head out of range is not tracked; a bogus last batch head is ignored.
    let mut t = QueueTracker::new(region.clone(), 0).expect("queue 0");
    t.start(0);
    t.fetched(9);
    t.completing(60000);
    drop(t);
    let mut t = QueueTracker::new(region, 0).expect("queue 0");
    assert_eq!(t.start(7), Some(7));
    assert!(QueueTracker::new(reopen(&file, 8), 2).is_none());
}

#[test]
fn unsealed_file_is_refused() {
    let file = tempfile_memfd();
    file.set_len(4096).expect("set_len");
    assert!(matches!(
        Region::open(&file, 0, 4096, 1, 8),
        Err(RegionError::Unsealed)
    ));
}

fn tempfile_memfd() -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: a NUL-terminated name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is fresh and owned by nobody else.
    unsafe { std::fs::File::from_raw_fd(fd) }
}
