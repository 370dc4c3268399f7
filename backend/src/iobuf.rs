//! Raw memory buffers handed to image I/O without copying.
//!
//! The data path reads and writes guest memory directly: the caller
//! translates guest addresses into host pointers and passes them here as
//! `IoBuf`s, which are laid out exactly like `struct iovec` so that a slice
//! of them goes straight to `preadv`/`pwritev`.

/// One contiguous host-memory buffer (layout-compatible with `struct iovec`).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct IoBuf(libc::iovec);

// SAFETY: an IoBuf is a plain (pointer, length) pair; whoever creates it
// promises (in `IoBuf::new`) that the memory stays valid while it is used.
// Guest memory is shared with another process anyway, so there is no
// aliasing guarantee to uphold beyond validity.
unsafe impl Send for IoBuf {}
// SAFETY: see `Send`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// Wraps `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be mapped, readable and (for reads into it)
    /// writable memory for as long as the `IoBuf` is used for I/O.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        IoBuf(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        })
    }

    /// Wraps a mutable byte slice (memory owned by the caller).
    pub fn from_slice(buf: &mut [u8]) -> Self {
        // SAFETY: the slice is valid for its length; the borrow checker does
        // not tie the IoBuf's lifetime to it, so callers keep the slice alive
        // for the I/O (all in-crate uses are within one call).
        unsafe { Self::new(buf.as_mut_ptr(), buf.len()) }
    }

    /// Start address.
    pub fn ptr(&self) -> *mut u8 {
        self.0.iov_base.cast()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.iov_len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.0.iov_len == 0
    }

    /// The same buffer with its first `n` bytes dropped (`n <= len`).
    pub fn advance(&self, n: usize) -> IoBuf {
        let n = n.min(self.len());
        // SAFETY: stays within the original buffer.
        unsafe { IoBuf::new(self.ptr().add(n), self.len() - n) }
    }

    /// The first `n` bytes of this buffer (`n <= len`).
    pub fn truncate(&self, n: usize) -> IoBuf {
        // SAFETY: stays within the original buffer.
        unsafe { IoBuf::new(self.ptr(), n.min(self.len())) }
    }
}

/// Total length of a list of buffers.
pub fn total_len(bufs: &[IoBuf]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// True if every buffer starts at and spans a multiple of `align` (a power of two).
pub fn is_aligned(bufs: &[IoBuf], align: usize) -> bool {
    let mask = align - 1;
    bufs.iter()
        .all(|b| (b.ptr() as usize) & mask == 0 && b.len() & mask == 0)
}
