//! Raw memory buffers handed to image I/O without copying.
//!
//! The data path reads and writes guest memory directly: the caller
//! translates guest addresses into host pointers and passes them here as
//! `IoBuf`s, which are laid out exactly like `struct iovec` so that a slice
//! of them goes straight to `preadv`/`pwritev`.
//!
//! An `IoBuf<'a>` borrows the memory it points at for `'a`: one made from
//! a slice cannot outlive the slice, so safe code cannot hand freed memory
//! to a read. Guest memory, which the borrow checker cannot see, comes in
//! through the `unsafe` constructor, whose caller promises validity.
//!
//! ```compile_fail
//! # fn f(disk: &vubd_backend::Disk) {
//! // The buffer would outlive the vector it points into: a read through
//! // it would write into freed memory. This must not compile.
//! let buf = {
//!     let mut v = vec![0u8; 512];
//!     vubd_backend::IoBuf::from_slice(&mut v)
//! };
//! let _ = disk.read(0, &[buf]);
//! # }
//! ```
//!
//! The same read with the vector still alive compiles:
//!
//! ```
//! # fn f(disk: &vubd_backend::Disk) {
//! let mut v = vec![0u8; 512];
//! let buf = vubd_backend::IoBuf::from_slice(&mut v);
//! let _ = disk.read(0, &[buf]);
//! # }
//! ```

use std::marker::PhantomData;

/// One contiguous host-memory buffer (layout-compatible with `struct iovec`)
/// that borrows its memory for `'a`.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct IoBuf<'a> {
    iov: libc::iovec,
    _borrow: PhantomData<&'a mut [u8]>,
}

// SAFETY: an IoBuf is a plain (pointer, length) pair borrowing its memory
// (from a slice, or per `IoBuf::new`'s contract). Guest memory is shared
// with another process anyway, so there is no aliasing guarantee to uphold
// beyond validity.
unsafe impl Send for IoBuf<'_> {}
// SAFETY: see `Send`.
unsafe impl Sync for IoBuf<'_> {}

impl<'a> IoBuf<'a> {
    /// Wraps `len` bytes at `ptr`, for memory the borrow checker cannot see
    /// (guest memory, an allocation of the caller's); the caller picks `'a`.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be mapped, readable and (for reads into it)
    /// writable memory for all of `'a`, or at least for as long as the
    /// `IoBuf` (or a copy of it) is used for I/O.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        IoBuf {
            iov: libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            },
            _borrow: PhantomData,
        }
    }

    /// Wraps a mutable byte slice, borrowing it for as long as the `IoBuf`
    /// lives (no copy).
    pub fn from_slice(buf: &'a mut [u8]) -> Self {
        // SAFETY: the slice is valid for its length for all of 'a, and the
        // IoBuf cannot outlive 'a.
        unsafe { Self::new(buf.as_mut_ptr(), buf.len()) }
    }

    /// The same buffer with its borrow extended to `'b`, for engines that
    /// keep buffer lists past the call that gave them (io_uring slots).
    ///
    /// # Safety
    /// The memory must stay valid for as long as the result is used.
    pub unsafe fn extend<'b>(self) -> IoBuf<'b> {
        // SAFETY: forwarded to the caller.
        unsafe { IoBuf::new(self.ptr(), self.len()) }
    }

    /// Start address.
    pub fn ptr(&self) -> *mut u8 {
        self.iov.iov_base.cast()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.iov.iov_len
    }

    /// True for a zero-length buffer.
    pub fn is_empty(&self) -> bool {
        self.iov.iov_len == 0
    }

    /// The same buffer with its first `n` bytes dropped (`n <= len`).
    pub fn advance(&self, n: usize) -> IoBuf<'a> {
        let n = n.min(self.len());
        // SAFETY: stays within the original buffer.
        unsafe { IoBuf::new(self.ptr().add(n), self.len() - n) }
    }

    /// The first `n` bytes of this buffer (`n <= len`).
    pub fn truncate(&self, n: usize) -> IoBuf<'a> {
        // SAFETY: stays within the original buffer.
        unsafe { IoBuf::new(self.ptr(), n.min(self.len())) }
    }
}

/// Total length of a list of buffers.
pub fn total_len(bufs: &[IoBuf<'_>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// True if every buffer starts at a multiple of `mem_align` and spans a
/// multiple of `len_align` (both powers of two): what O_DIRECT asks of each
/// iovec.
pub fn is_aligned(bufs: &[IoBuf<'_>], mem_align: usize, len_align: usize) -> bool {
    let (mem_mask, len_mask) = (mem_align - 1, len_align - 1);
    bufs.iter()
        .all(|b| (b.ptr() as usize) & mem_mask == 0 && b.len() & len_mask == 0)
}
