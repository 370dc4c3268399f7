//! The test frontend's "guest memory": one memfd mapped into the test
//! process, of which only some ranges are offered to the backend as guest
//! memory regions. The ranges of the file that are *not* offered are filled
//! with a sentinel pattern, so that a backend that mis-translates addresses
//! (and writes somewhere in the file it was never given) is caught, and the
//! gaps between regions in guest-physical space let tests aim descriptors at
//! memory that does not exist.

use anyhow::{bail, ensure, Context, Result};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use vhost::VhostUserMemoryRegionInfo;

const MIB: u64 = 1 << 20;

/// Guest-physical address of the first region (rings, requests, buffers).
pub const REGION0_GPA: u64 = 0;
/// Size of the first region.
pub const REGION0_SIZE: u64 = 4 * MIB;
/// Guest-physical address of the second region, after a hole.
pub const REGION1_GPA: u64 = 8 * MIB;
/// Size of the second region.
pub const REGION1_SIZE: u64 = 2 * MIB;
/// An address inside the hole between the two regions: no memory there.
pub const HOLE_GPA: u64 = REGION0_GPA + REGION0_SIZE + MIB;
/// An address above every region: no memory there either.
pub const BEYOND_GPA: u64 = 64 * MIB;

/// Where each region lives in the memfd. Gaps in the file before, between
/// and after the regions are never offered and hold the guard pattern.
const REGION0_FILE_OFFSET: u64 = MIB;
const REGION1_FILE_OFFSET: u64 = 6 * MIB;
const FILE_SIZE: u64 = 9 * MIB;

/// One guest memory region: a window of the memfd seen at a guest address.
#[derive(Debug, Clone, Copy)]
pub struct MemRegion {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of the region in the memfd (the vhost-user `mmap_offset`).
    pub file_offset: u64,
}

impl MemRegion {
    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= self.gpa + self.len)
    }
}

/// The byte expected at offset `off` of the memfd in a guard area: position
/// dependent, so a misplaced copy of guard bytes is noticed too.
fn guard_byte(off: u64) -> u8 {
    (off.wrapping_mul(0x9E37_79B9) >> 7) as u8 | 0x80
}

/// The memfd, its mapping in this process and the regions offered from it.
pub struct GuestMemory {
    file: File,
    base: *mut u8,
    size: usize,
    regions: Vec<MemRegion>,
    guards: Vec<(u64, u64)>,
}

// SAFETY: the mapping is process-wide shared memory that lives as long as
// `GuestMemory`; every access goes through volatile or atomic operations,
// because the backend (another process) may change it at any time.
unsafe impl Send for GuestMemory {}
// SAFETY: as above; no access relies on exclusive ownership of the bytes.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Creates the memfd with the standard layout (two regions, a hole
    /// between them, guard areas in the file around both) and fills the
    /// guard areas. `sealed`: sealed against growing and shrinking, as
    /// QEMU's memory-backend-memfd creates its memory by default.
    pub fn new(sealed: bool) -> Result<Self> {
        let regions = vec![
            MemRegion {
                gpa: REGION0_GPA,
                len: REGION0_SIZE,
                file_offset: REGION0_FILE_OFFSET,
            },
            MemRegion {
                gpa: REGION1_GPA,
                len: REGION1_SIZE,
                file_offset: REGION1_FILE_OFFSET,
            },
        ];
        // SAFETY: memfd_create with a NUL-terminated name; the result is
        // checked before use and then owned by a File.
        let flags = libc::MFD_CLOEXEC | if sealed { libc::MFD_ALLOW_SEALING } else { 0 };
        let fd = unsafe { libc::memfd_create(c"vubd-hostile-guest".as_ptr(), flags) };
        if fd < 0 {
            bail!("memfd_create: {}", std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(FILE_SIZE).context("ftruncate memfd")?;
        if sealed {
            let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
            // SAFETY: F_ADD_SEALS on a descriptor we own, with an int argument.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
                bail!("seal memfd: {}", std::io::Error::last_os_error());
            }
        }
        let size = FILE_SIZE as usize;
        // SAFETY: mapping a file we own, shared, with a length equal to its
        // size; the result is checked against MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            bail!("mmap memfd: {}", std::io::Error::last_os_error());
        }
        let mut guards = Vec::new();
        let mut cursor = 0;
        let mut sorted = regions.clone();
        sorted.sort_by_key(|r| r.file_offset);
        for r in &sorted {
            if r.file_offset > cursor {
                guards.push((cursor, r.file_offset - cursor));
            }
            cursor = r.file_offset + r.len;
        }
        if cursor < FILE_SIZE {
            guards.push((cursor, FILE_SIZE - cursor));
        }
        let mem = GuestMemory {
            file,
            base: base.cast(),
            size,
            regions,
            guards,
        };
        for &(off, len) in &mem.guards {
            for o in off..off + len {
                // SAFETY: guard ranges lie inside the mapping (built above
                // from offsets below FILE_SIZE).
                unsafe { mem.base.add(o as usize).write_volatile(guard_byte(o)) };
            }
        }
        Ok(mem)
    }

    /// The regions offered to the backend.
    pub fn regions(&self) -> &[MemRegion] {
        &self.regions
    }

    /// The regions as the vhost crate wants them for SET_MEM_TABLE or
    /// ADD_MEM_REG (user address = where this process mapped the region).
    pub fn region_infos(&self) -> Vec<VhostUserMemoryRegionInfo> {
        self.regions
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                userspace_addr: self.base as u64 + r.file_offset,
                mmap_offset: r.file_offset,
                mmap_handle: self.file.as_raw_fd(),
            })
            .collect()
    }

    /// Whether `[gpa, gpa+len)` lies inside one offered region.
    pub fn is_mapped(&self, gpa: u64, len: u64) -> bool {
        self.regions.iter().any(|r| r.contains(gpa, len))
    }

    /// Pointer in this process to `[gpa, gpa+len)`, which must lie inside
    /// one region.
    fn ptr(&self, gpa: u64, len: u64) -> Result<*mut u8> {
        let r = self
            .regions
            .iter()
            .find(|r| r.contains(gpa, len))
            .with_context(|| format!("guest range {gpa:#x}+{len:#x} is not in one region"))?;
        let off = r.file_offset + (gpa - r.gpa);
        ensure!(off + len <= self.size as u64, "region outside the memfd");
        // SAFETY: off+len is within the mapping, checked just above.
        Ok(unsafe { self.base.add(off as usize) })
    }

    /// This process's virtual address for a guest address (vhost-user
    /// carries ring addresses as frontend virtual addresses).
    pub fn host_addr(&self, gpa: u64) -> Result<u64> {
        Ok(self.ptr(gpa, 1)? as u64)
    }

    /// Copies `data` to guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        let p = self.ptr(gpa, data.len() as u64)?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: p..p+len is inside the mapping (checked by ptr()).
            unsafe { p.add(i).write_volatile(*b) };
        }
        Ok(())
    }

    /// Fills `len` bytes at `gpa` with `byte`.
    pub fn fill(&self, gpa: u64, len: u64, byte: u8) -> Result<()> {
        let p = self.ptr(gpa, len)?;
        for i in 0..len as usize {
            // SAFETY: p..p+len is inside the mapping (checked by ptr()).
            unsafe { p.add(i).write_volatile(byte) };
        }
        Ok(())
    }

    /// Reads `len` bytes of guest memory at `gpa`.
    pub fn read(&self, gpa: u64, len: u64) -> Result<Vec<u8>> {
        let p = self.ptr(gpa, len)?;
        // SAFETY: p..p+len is inside the mapping (checked by ptr()).
        Ok((0..len as usize)
            .map(|i| unsafe { p.add(i).read_volatile() })
            .collect())
    }

    /// Reads one byte.
    pub fn read_u8(&self, gpa: u64) -> Result<u8> {
        let p = self.ptr(gpa, 1)?;
        // SAFETY: p is inside the mapping (checked by ptr()).
        Ok(unsafe { p.read_volatile() })
    }

    fn atomic_u16(&self, gpa: u64) -> Result<&AtomicU16> {
        ensure!(gpa.is_multiple_of(2), "unaligned u16 at {gpa:#x}");
        let p = self.ptr(gpa, 2)?;
        // SAFETY: p is 2-byte aligned (the mapping is page aligned and gpa
        // and the region offsets are even) and lives as long as &self.
        Ok(unsafe { AtomicU16::from_ptr(p.cast()) })
    }

    /// Stores a little-endian u16 with release ordering (ring indexes).
    pub fn store_u16(&self, gpa: u64, v: u16) -> Result<()> {
        self.atomic_u16(gpa)?.store(v.to_le(), Ordering::Release);
        Ok(())
    }

    /// Loads a little-endian u16 with acquire ordering (ring indexes).
    pub fn load_u16(&self, gpa: u64) -> Result<u16> {
        Ok(u16::from_le(self.atomic_u16(gpa)?.load(Ordering::Acquire)))
    }

    /// Reads a little-endian u32.
    pub fn read_u32(&self, gpa: u64) -> Result<u32> {
        let b = self.read(gpa, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Truncates (or extends) the memfd behind the backend's back. After
    /// shrinking, neither side may touch the cut-off part (SIGBUS): the
    /// test must not read those addresses nor call `check_guards`.
    pub fn set_file_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len).context("ftruncate memfd")
    }

    /// Checks that no byte of the never-offered parts of the memfd changed:
    /// the backend must only ever touch the regions it was given.
    pub fn check_guards(&self) -> Result<()> {
        for &(off, len) in &self.guards {
            for o in off..off + len {
                // SAFETY: guard ranges lie inside the mapping.
                let got = unsafe { self.base.add(o as usize).read_volatile() };
                if got != guard_byte(o) {
                    bail!(
                        "memory never offered to the backend was modified: memfd offset {o:#x} \
                         holds {got:#04x}, expected {:#04x}",
                        guard_byte(o)
                    );
                }
            }
        }
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: base/size are exactly what mmap returned; nothing refers
        // to the mapping after drop (borrows end with &self).
        unsafe { libc::munmap(self.base.cast(), self.size) };
    }
}
