//! The shared-memory region of VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, in the
//! split-ring layout of QEMU's vhost-user spec ("Inflight I/O tracking").
//!
//! The backend allocates the region (GET_INFLIGHT_FD), the frontend keeps
//! the descriptor across backend restarts and hands it back
//! (SET_INFLIGHT_FD). Per queue, at a stride of `queue_stride(queue_size)`:
//!
//! ```text
//! u64 features; u16 version; u16 desc_num; u16 last_batch_head; u16 used_idx;
//! desc_num x { u8 inflight; u8 padding[5]; u16 next; u64 counter; }
//! ```
//!
//! The frontend can write the region at any time, so every field is read
//! with atomics and every value read is treated as untrusted.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};

/// Bytes of a queue's header (features, version, desc_num, last_batch_head, used_idx).
const HEADER_LEN: usize = 16;
/// Bytes of one `DescStateSplit`.
const DESC_LEN: usize = 16;
/// Queue regions start on this alignment, as libvhost-user lays them out.
const QUEUE_ALIGN: usize = 64;
/// The region format this backend writes.
const VERSION: u16 = 1;

/// Why an inflight region could not be created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// num_queues or queue_size is zero, or queue_size above 32768.
    #[error("invalid inflight geometry: {num_queues} queues of {queue_size} descriptors")]
    Geometry {
        /// Queues asked for.
        num_queues: u16,
        /// Descriptors per queue asked for.
        queue_size: u16,
    },
    /// The frontend's mmap_size/offset does not fit the geometry or the file.
    #[error("inflight region of {size} bytes at offset {offset} does not fit (need {need}, file has {file})")]
    Size {
        /// mmap_size given.
        size: u64,
        /// mmap_offset given.
        offset: u64,
        /// Bytes the geometry needs.
        need: u64,
        /// Bytes the file has.
        file: u64,
    },
    /// The file could be shrunk under the mapping (SIGBUS on access).
    #[error("inflight memory file is not sealed against shrinking")]
    Unsealed,
    /// A system call failed.
    #[error("inflight region: {0}")]
    Io(#[from] io::Error),
}

/// Bytes one queue takes in the region.
pub fn queue_stride(queue_size: u16) -> usize {
    (HEADER_LEN + DESC_LEN * usize::from(queue_size)).div_ceil(QUEUE_ALIGN) * QUEUE_ALIGN
}

/// A mapped inflight region.
pub struct Region {
    addr: *mut u8,
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is shared memory accessed only through atomics; the
// pointer stays valid until Drop.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Allocates a zeroed region in a memfd sealed against resizing (the
    /// frontend maps it too and must not be able to shrink it under us).
    /// Returns the region and the file to hand to the frontend.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<(Region, File), RegionError> {
        check_geometry(num_queues, queue_size)?;
        let len = queue_stride(queue_size) * usize::from(num_queues);
        // SAFETY: a NUL-terminated name and valid flags; the fd is owned below.
        let fd = unsafe {
            libc::memfd_create(
                c"vubd-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on an owned fd.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let region = Region::map(&file, 0, len, num_queues, queue_size)?;
        Ok((region, file))
    }

    /// Maps the region a frontend hands back (SET_INFLIGHT_FD), after
    /// checking that the geometry fits `mmap_size` and the file, and that
    /// the file cannot shrink.
    pub fn open(
        file: &File,
        mmap_offset: u64,
        mmap_size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Region, RegionError> {
        check_geometry(num_queues, queue_size)?;
        let need = (queue_stride(queue_size) * usize::from(num_queues)) as u64;
        let file_len = file.metadata()?.len();
        let fits = mmap_size >= need
            && mmap_offset.is_multiple_of(page_size())
            && mmap_offset
                .checked_add(mmap_size)
                .is_some_and(|end| end <= file_len);
        if !fits {
            return Err(RegionError::Size {
                size: mmap_size,
                offset: mmap_offset,
                need,
                file: file_len,
            });
        }
        // SAFETY: fcntl on a valid fd.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(RegionError::Unsealed);
        }
        let offset = libc::off_t::try_from(mmap_offset).map_err(|_| RegionError::Size {
            size: mmap_size,
            offset: mmap_offset,
            need,
            file: file_len,
        })?;
        Region::map(file, offset, need as usize, num_queues, queue_size)
    }

    fn map(
        file: &File,
        offset: libc::off_t,
        len: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Region, RegionError> {
        // SAFETY: a fresh shared mapping of a file we checked is long enough
        // and sealed against shrinking; unmapped in Drop.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error().into());
        }
        Ok(Region {
            addr: addr.cast(),
            len,
            num_queues,
            queue_size,
        })
    }

    /// Bytes mapped (the mmap_size to report to the frontend).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never: the geometry is checked).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of queues the region tracks.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Descriptors tracked per queue.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Base of queue `q`'s part of the region; None if out of range.
    fn queue_base(&self, q: u16) -> Option<*mut u8> {
        (q < self.num_queues).then(|| {
            // SAFETY: q < num_queues, so the offset is inside the mapping.
            unsafe {
                self.addr
                    .add(usize::from(q) * queue_stride(self.queue_size))
            }
        })
    }

    /// Queue `q`'s header and descriptor states; None if out of range.
    pub fn queue(&self, q: u16) -> Option<QueueRegion<'_>> {
        Some(QueueRegion {
            base: self.queue_base(q)?,
            desc_num: self.queue_size,
            _region: self,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in Region::map.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

fn check_geometry(num_queues: u16, queue_size: u16) -> Result<(), RegionError> {
    if num_queues == 0 || queue_size == 0 || queue_size > 32768 {
        return Err(RegionError::Geometry {
            num_queues,
            queue_size,
        });
    }
    Ok(())
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// One queue's part of the region.
pub struct QueueRegion<'a> {
    base: *mut u8,
    desc_num: u16,
    _region: &'a Region,
}

impl QueueRegion<'_> {
    fn u16_at(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: callers pass header offsets (< HEADER_LEN) or descriptor
        // offsets of an index < desc_num, all inside the queue's stride and
        // 2-aligned (the mapping is page-aligned, the stride 64-aligned).
        unsafe { &*self.base.add(offset).cast::<AtomicU16>() }
    }

    fn desc_inflight(&self, head: u16) -> &AtomicU8 {
        debug_assert!(head < self.desc_num);
        // SAFETY: head < desc_num (checked by every caller), inside the stride.
        unsafe {
            &*self
                .base
                .add(HEADER_LEN + DESC_LEN * usize::from(head))
                .cast::<AtomicU8>()
        }
    }

    fn desc_counter(&self, head: u16) -> &AtomicU64 {
        debug_assert!(head < self.desc_num);
        // SAFETY: as desc_inflight; the counter is at offset 8, 8-aligned.
        unsafe {
            &*self
                .base
                .add(HEADER_LEN + DESC_LEN * usize::from(head) + 8)
                .cast::<AtomicU64>()
        }
    }

    /// Descriptor states in this queue's part.
    pub fn desc_num(&self) -> u16 {
        self.desc_num
    }

    /// The format version; 0 for a region never used.
    pub fn version(&self) -> u16 {
        self.u16_at(8).load(Ordering::Acquire)
    }

    /// Marks the queue's part as initialised (after a fresh GET_INFLIGHT_FD).
    pub fn init(&self, used_idx: u16) {
        // SAFETY: features sits at offset 0 of the header, 8-aligned.
        unsafe { &*self.base.cast::<AtomicU64>() }.store(0, Ordering::Relaxed);
        self.u16_at(10).store(self.desc_num, Ordering::Relaxed);
        self.u16_at(14).store(used_idx, Ordering::Relaxed);
        self.u16_at(8).store(VERSION, Ordering::Release);
    }

    /// The used index as the backend last recorded it.
    pub fn used_idx(&self) -> u16 {
        self.u16_at(14).load(Ordering::Acquire)
    }

    /// Records the used index after a used-ring update.
    pub fn set_used_idx(&self, idx: u16) {
        self.u16_at(14).store(idx, Ordering::Release);
    }

    /// The head last put into the used ring (possibly not yet cleared).
    pub fn last_batch_head(&self) -> u16 {
        self.u16_at(12).load(Ordering::Acquire)
    }

    /// Records the head about to be put into the used ring.
    pub fn set_last_batch_head(&self, head: u16) {
        self.u16_at(12).store(head, Ordering::Release);
    }

    /// Whether `head` is marked in flight (false when out of range).
    pub fn is_inflight(&self, head: u16) -> bool {
        head < self.desc_num && self.desc_inflight(head).load(Ordering::Acquire) == 1
    }

    /// The fetch counter of `head` (0 when out of range).
    pub fn counter(&self, head: u16) -> u64 {
        if head < self.desc_num {
            self.desc_counter(head).load(Ordering::Acquire)
        } else {
            0
        }
    }

    /// Marks `head` in flight with its fetch counter (counter first, so a
    /// head seen in flight always has its counter). False when out of range.
    pub fn set_inflight(&self, head: u16, counter: u64) -> bool {
        if head >= self.desc_num {
            return false;
        }
        self.desc_counter(head).store(counter, Ordering::Release);
        self.desc_inflight(head).store(1, Ordering::Release);
        true
    }

    /// Clears `head`'s in-flight mark.
    pub fn clear_inflight(&self, head: u16) {
        if head < self.desc_num {
            self.desc_inflight(head).store(0, Ordering::Release);
        }
    }
}
