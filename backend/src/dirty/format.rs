//! The sidecar file format (version 1) and crash recovery. The normative
//! description, with the durability protocol and why recovery is complete,
//! is docs/bitmap-format.md; this module is its implementation.
//!
//! Layout (all integers little-endian, regions 4 KiB aligned):
//!
//! ```text
//! [0, P)              preamble: header, bitmap directory, SHA-256 (immutable)
//! [P, P+S)            state block A   (even generations)
//! [P+S, P+2S)         state block B   (odd generations)
//! [al_off, +A)        activity-log slot 0 (even epochs): header page, bit pages
//! [al_off+A, +A)      activity-log slot 1 (odd epochs)
//! data_off of each    fine level of each bitmap: QEMU's words, LE u64
//! ```

use super::bitmap::{qemu_words, DirtyBitmap};
use super::store::{read_all, MetaStore};
use super::DirtyError;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The sidecar format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

const MAGIC: &[u8; 8] = b"VUBDBMAP";
const STATE_MAGIC: &[u8; 8] = b"VUBDSTAT";
const AL_MAGIC: &[u8; 8] = b"VUBDALOG";
pub(crate) const PAGE: u64 = 4096;
const HEADER_LEN: usize = 128;
const ENTRY_FIXED: usize = 40;
const HASH_LEN: usize = 32;
const AL_HEADER_LEN: usize = 24;

/// Preamble flag bit of a directory entry: the bitmap is inconsistent.
const ENTRY_INCONSISTENT: u64 = 1;
/// State flag: the file was closed cleanly (the activity log is empty).
pub(crate) const STATE_CLEAN: u64 = 1;
/// Per-bitmap state flag: recording (enabled).
pub(crate) const BITMAP_RECORDING: u64 = 1;

/// The sidecar of an image: `IMAGE.vubd-bitmaps`, beside it.
pub fn sidecar_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".vubd-bitmaps");
    PathBuf::from(p)
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

fn sha(bytes: &[u8]) -> [u8; HASH_LEN] {
    Sha256::digest(bytes).into()
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    Some(u32::from_le_bytes(a))
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// One bitmap's directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub name: String,
    pub granularity: u64,
    pub data_off: u64,
    pub data_len: u64,
    pub inconsistent: bool,
}

/// Where everything is in one sidecar file; fixed for the file's lifetime
/// (adding or removing a persistent bitmap writes a new file).
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub file_id: u64,
    pub disk_size: u64,
    pub extent_size: u64,
    pub preamble_len: u64,
    pub state_off: u64,
    pub state_len: u64,
    pub al_off: u64,
    pub al_len: u64,
    pub entries: Vec<Entry>,
    pub total_len: u64,
}

impl Layout {
    /// Plans a file for `bitmaps` = (name, granularity, inconsistent).
    pub fn plan(
        file_id: u64,
        disk_size: u64,
        extent_size: u64,
        bitmaps: &[(String, u64, bool)],
    ) -> Layout {
        let dir_len: usize = bitmaps
            .iter()
            .map(|(name, _, _)| ENTRY_FIXED + (name.len().div_ceil(8) * 8))
            .sum();
        let preamble_len = round_up((HEADER_LEN + dir_len + HASH_LEN) as u64, PAGE);
        let state_len = round_up(40 + 8 * bitmaps.len() as u64 + HASH_LEN as u64, PAGE);
        let state_off = preamble_len;
        let al_off = state_off + 2 * state_len;
        let nextents = disk_size.div_ceil(extent_size);
        let al_len = PAGE + round_up(qemu_words(nextents) * 8, PAGE);
        let mut off = al_off + 2 * al_len;
        let entries = bitmaps
            .iter()
            .map(|(name, granularity, inconsistent)| {
                let data_len = if *inconsistent {
                    0
                } else {
                    round_up(qemu_words(disk_size.div_ceil(*granularity)) * 8, PAGE)
                };
                let e = Entry {
                    name: name.clone(),
                    granularity: *granularity,
                    data_off: off,
                    data_len,
                    inconsistent: *inconsistent,
                };
                off += data_len;
                e
            })
            .collect();
        Layout {
            file_id,
            disk_size,
            extent_size,
            preamble_len,
            state_off,
            state_len,
            al_off,
            al_len,
            entries,
            total_len: off,
        }
    }

    /// Offset of activity-log slot `slot` (0 or 1).
    pub fn al_slot_off(&self, slot: u64) -> u64 {
        self.al_off + (slot % 2) * self.al_len
    }

    /// Offset of the state block for generation `gen`.
    pub fn state_off_for(&self, gen: u64) -> u64 {
        self.state_off + (gen % 2) * self.state_len
    }

    /// The immutable preamble, padded to `preamble_len`.
    pub fn encode_preamble(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        put_u64(&mut b, 24, self.file_id);
        put_u64(&mut b, 32, self.disk_size);
        put_u64(&mut b, 40, self.extent_size);
        put_u64(&mut b, 48, self.entries.len() as u64);
        put_u64(&mut b, 56, self.state_off);
        put_u64(&mut b, 64, self.state_len);
        put_u64(&mut b, 72, self.al_off);
        put_u64(&mut b, 80, self.al_len);
        for e in &self.entries {
            let mut fixed = [0u8; ENTRY_FIXED];
            put_u64(&mut fixed, 0, e.granularity);
            put_u64(&mut fixed, 8, e.data_off);
            put_u64(&mut fixed, 16, e.data_len);
            put_u64(
                &mut fixed,
                24,
                if e.inconsistent {
                    ENTRY_INCONSISTENT
                } else {
                    0
                },
            );
            put_u64(&mut fixed, 32, e.name.len() as u64);
            b.extend_from_slice(&fixed);
            b.extend_from_slice(e.name.as_bytes());
            b.resize(b.len().div_ceil(8) * 8, 0);
        }
        let header_len = b.len() as u64;
        put_u64(&mut b, 16, header_len);
        let h = sha(&b);
        b.extend_from_slice(&h);
        b.resize(self.preamble_len as usize, 0);
        b
    }

    /// Encodes the state block of generation `gen`.
    pub fn encode_state(&self, gen: u64, flags: u64, bitmap_flags: &[u64]) -> Vec<u8> {
        let mut b = vec![0u8; 40];
        b[0..8].copy_from_slice(STATE_MAGIC);
        put_u64(&mut b, 8, self.file_id);
        put_u64(&mut b, 16, gen);
        put_u64(&mut b, 24, flags);
        put_u64(&mut b, 32, bitmap_flags.len() as u64);
        for f in bitmap_flags {
            b.extend_from_slice(&f.to_le_bytes());
        }
        let h = sha(&b);
        b.extend_from_slice(&h);
        b
    }

    /// Encodes an activity-log slot header page for `epoch`.
    pub fn encode_al_header(&self, epoch: u64) -> Vec<u8> {
        let mut b = vec![0u8; PAGE as usize];
        b[0..8].copy_from_slice(AL_MAGIC);
        put_u64(&mut b, 8, self.file_id);
        put_u64(&mut b, 16, epoch);
        let h = sha(&b[..AL_HEADER_LEN]);
        b[AL_HEADER_LEN..AL_HEADER_LEN + HASH_LEN].copy_from_slice(&h);
        b
    }
}

/// Why a preamble could not be used.
enum PreambleError {
    /// Not recognisable at all (names unknown).
    Unusable(String),
    /// Checksum or bounds failed; the directory could be parsed for names.
    Damaged(String, Vec<String>),
    /// A format version this build does not know.
    Unsupported(u32),
}

fn parse_directory(b: &[u8], count: u64, end: usize) -> Option<Vec<Entry>> {
    let mut off = HEADER_LEN;
    let mut out = Vec::new();
    for _ in 0..count.min(1 << 20) {
        let granularity = u64_at(b, off)?;
        let data_off = u64_at(b, off + 8)?;
        let data_len = u64_at(b, off + 16)?;
        let flags = u64_at(b, off + 24)?;
        let name_len = usize::try_from(u64_at(b, off + 32)?).ok()?;
        let name_start = off + ENTRY_FIXED;
        let name_end = name_start.checked_add(name_len)?;
        if name_end > end {
            return None;
        }
        let name = String::from_utf8_lossy(b.get(name_start..name_end)?).into_owned();
        out.push(Entry {
            name,
            granularity,
            data_off,
            data_len,
            inconsistent: flags & ENTRY_INCONSISTENT != 0,
        });
        off = name_start + name_len.div_ceil(8) * 8;
    }
    Some(out)
}

fn decode_preamble(b: &[u8]) -> Result<Layout, PreambleError> {
    if b.len() < HEADER_LEN || &b[0..8] != MAGIC {
        return Err(PreambleError::Unusable(format!(
            "not a vubd bitmap sidecar (bad magic or only {} bytes)",
            b.len()
        )));
    }
    let version = u32_at(b, 8).unwrap_or(0);
    if version != FORMAT_VERSION {
        return if version > FORMAT_VERSION {
            Err(PreambleError::Unsupported(version))
        } else {
            Err(PreambleError::Unusable(format!(
                "bad format version {version}"
            )))
        };
    }
    let field = |off| u64_at(b, off).unwrap_or(0);
    let header_len = usize::try_from(field(16)).unwrap_or(usize::MAX);
    let count = field(48);
    let salvage = |why: String| {
        let limit = header_len.min(b.len());
        let names = parse_directory(b, count, limit)
            .map(|d| d.into_iter().map(|e| e.name).collect())
            .unwrap_or_default();
        PreambleError::Damaged(why, names)
    };
    let Some(hash_end) = header_len
        .checked_add(HASH_LEN)
        .filter(|&e| e <= b.len() && header_len >= HEADER_LEN)
    else {
        return Err(salvage(format!(
            "preamble truncated (header length {header_len}, file {} bytes)",
            b.len()
        )));
    };
    if sha(&b[..header_len])[..] != b[header_len..hash_end] {
        return Err(salvage("preamble checksum mismatch".to_string()));
    }
    let entries = parse_directory(b, count, header_len)
        .ok_or_else(|| salvage("directory malformed".to_string()))?;
    let extent_size = field(40);
    if !extent_size.is_power_of_two() {
        return Err(salvage(format!("bad extent size {extent_size}")));
    }
    let mut layout = Layout {
        file_id: field(24),
        disk_size: field(32),
        extent_size,
        preamble_len: round_up(hash_end as u64, PAGE),
        state_off: field(56),
        state_len: field(64),
        al_off: field(72),
        al_len: field(80),
        entries,
        total_len: 0,
    };
    layout.total_len = layout
        .entries
        .iter()
        .map(|e| e.data_off.saturating_add(e.data_len))
        .max()
        .unwrap_or(0)
        .max(layout.al_off.saturating_add(2 * layout.al_len));
    Ok(layout)
}

/// A decoded state block.
#[derive(Debug, Clone)]
pub(crate) struct State {
    pub generation: u64,
    pub flags: u64,
    pub bitmap_flags: Vec<u64>,
}

fn decode_state(layout: &Layout, b: &[u8]) -> Option<State> {
    if b.len() < 40 || &b[0..8] != STATE_MAGIC || u64_at(b, 8)? != layout.file_id {
        return None;
    }
    let n = u64_at(b, 32)?;
    if n != layout.entries.len() as u64 {
        return None;
    }
    let body = 40usize.checked_add(usize::try_from(n).ok()?.checked_mul(8)?)?;
    let hash = b.get(body..body + HASH_LEN)?;
    if sha(&b[..body])[..] != *hash {
        return None;
    }
    Some(State {
        generation: u64_at(b, 16)?,
        flags: u64_at(b, 24)?,
        bitmap_flags: (0..n as usize)
            .filter_map(|i| u64_at(b, 40 + 8 * i))
            .collect(),
    })
}

/// What an activity-log slot header says.
enum AlHeader {
    Valid { epoch: u64 },
    Invalid,
}

fn decode_al_header(layout: &Layout, b: &[u8]) -> AlHeader {
    let ok = b.len() >= AL_HEADER_LEN + HASH_LEN
        && &b[0..8] == AL_MAGIC
        && u64_at(b, 8) == Some(layout.file_id)
        && sha(&b[..AL_HEADER_LEN])[..] == b[AL_HEADER_LEN..AL_HEADER_LEN + HASH_LEN];
    match (ok, u64_at(b, 16)) {
        (true, Some(epoch)) => AlHeader::Valid { epoch },
        _ => AlHeader::Invalid,
    }
}

/// One bitmap as recovered from a sidecar.
#[derive(Debug)]
pub struct RecoveredBitmap {
    /// The bitmap's name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// It was recording (enabled) when last written.
    pub recording: bool,
    /// The stored copy could not be trusted; `bitmap` is then empty.
    pub inconsistent: bool,
    /// The recovered bits (fine level OR the activity-log extents).
    pub bitmap: DirtyBitmap,
    /// Chunks set only because the activity log covered them (not in the fine
    /// level): the upper bound of over-marking this recovery added.
    pub chunks_from_log: u64,
}

/// The result of reading a sidecar after a clean or unclean stop.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Whether a sidecar existed at all.
    pub existed: bool,
    /// The bitmaps in file order.
    pub bitmaps: Vec<RecoveredBitmap>,
    /// The state generation recovery started from (0 if none).
    pub generation: u64,
    /// The last stop was clean (the activity log was not needed).
    pub clean: bool,
    /// Activity-log extents applied.
    pub log_extents: u64,
    /// The activity-log extent size in the file.
    pub extent_size: u64,
    /// A problem with the file as a whole (bitmaps then load inconsistent).
    pub damage: Option<String>,
    pub(crate) layout: Option<Layout>,
}

fn inconsistent_bitmap(
    name: String,
    granularity: u64,
    disk_size: u64,
) -> Result<RecoveredBitmap, DirtyError> {
    let g = if super::check_granularity(granularity).is_ok() {
        granularity
    } else {
        super::DEFAULT_GRANULARITY
    };
    let bitmap = DirtyBitmap::new(disk_size, g, false)?;
    bitmap.set_recording(false);
    Ok(RecoveredBitmap {
        name,
        granularity: g,
        recording: false,
        inconsistent: true,
        bitmap,
        chunks_from_log: 0,
    })
}

/// Reads the sidecar in `store` and recovers every bitmap for a disk of
/// `disk_size` bytes: fine level, OR every chunk of every activity-log extent
/// logged since that fine level was written (unless the last stop was clean).
/// Damage never fails the call: affected bitmaps come back `inconsistent`
/// with an error logged. Fails only on an I/O error reading the file or on
/// a newer format version.
pub fn recover(store: &dyn MetaStore, disk_size: u64) -> Result<Recovery, DirtyError> {
    let what = store.describe();
    let Some(bytes) = read_all(store).map_err(|e| DirtyError::io(format!("reading {what}"), e))?
    else {
        return Ok(Recovery::default());
    };
    let mut rec = Recovery {
        existed: true,
        ..Recovery::default()
    };
    let layout = match decode_preamble(&bytes) {
        Ok(l) => l,
        Err(PreambleError::Unsupported(v)) => {
            return Err(DirtyError::UnsupportedFormat(format!(
                "{what} has format version {v}; this vubd reads version {FORMAT_VERSION}"
            )))
        }
        Err(PreambleError::Unusable(why)) => {
            log::error!(
                "bitmap sidecar {what} is unusable: {why}; no persistent bitmap can be recovered"
            );
            rec.damage = Some(why);
            return Ok(rec);
        }
        Err(PreambleError::Damaged(why, names)) => {
            log::error!(
                "bitmap sidecar {what} is damaged: {why}; bitmaps {names:?} load as inconsistent"
            );
            for name in names {
                rec.bitmaps.push(inconsistent_bitmap(
                    name,
                    super::DEFAULT_GRANULARITY,
                    disk_size,
                )?);
            }
            rec.damage = Some(why);
            return Ok(rec);
        }
    };
    rec.extent_size = layout.extent_size;
    let all_inconsistent =
        |rec: &mut Recovery, why: String, layout: &Layout| -> Result<(), DirtyError> {
            log::error!(
                "bitmap sidecar {what}: {why}; bitmaps {:?} load as inconsistent",
                layout.entries.iter().map(|e| &e.name).collect::<Vec<_>>()
            );
            for e in &layout.entries {
                rec.bitmaps.push(inconsistent_bitmap(
                    e.name.clone(),
                    e.granularity,
                    disk_size,
                )?);
            }
            rec.damage = Some(why);
            Ok(())
        };
    if layout.disk_size != disk_size {
        let why = format!(
            "disk size changed from {} to {disk_size} bytes",
            layout.disk_size
        );
        all_inconsistent(&mut rec, why, &layout)?;
        rec.layout = Some(layout);
        return Ok(rec);
    }
    let region = |off: u64, len: u64| -> Option<&[u8]> {
        let start = usize::try_from(off).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        bytes.get(start..end)
    };
    let state = (0..2)
        .filter_map(|g| region(layout.state_off_for(g), layout.state_len))
        .filter_map(|b| decode_state(&layout, b))
        .max_by_key(|s| s.generation);
    let Some(state) = state else {
        all_inconsistent(
            &mut rec,
            "no valid state block (truncated or damaged)".to_string(),
            &layout,
        )?;
        rec.layout = Some(layout);
        return Ok(rec);
    };
    rec.generation = state.generation;
    rec.clean = state.flags & STATE_CLEAN != 0;

    // The activity log: every slot whose epoch is at least the state's
    // generation (or whose header cannot be read: counting it only adds bits).
    let mut log_ok = true;
    let mut extents: Option<DirtyBitmap> = None;
    if !rec.clean {
        let ext = DirtyBitmap::new(disk_size, layout.extent_size.clamp(512, 1 << 62), false)?;
        for slot in 0..2 {
            let Some(slot_bytes) = region(layout.al_slot_off(slot), layout.al_len) else {
                log_ok = false;
                continue;
            };
            let (hdr, bits) = slot_bytes.split_at(PAGE as usize);
            match decode_al_header(&layout, hdr) {
                AlHeader::Valid { epoch } if epoch < state.generation => continue,
                AlHeader::Valid { .. } => {}
                AlHeader::Invalid => log::warn!(
                    "bitmap sidecar {what}: activity-log slot {slot} has a damaged header; applying it anyway"
                ),
            }
            ext.bits().or_le_bytes(bits);
        }
        rec.log_extents = ext.dirty_chunks();
        extents = Some(ext);
    }

    for (i, e) in layout.entries.iter().enumerate() {
        let recording = state.bitmap_flags.get(i).copied().unwrap_or(0) & BITMAP_RECORDING != 0;
        // A bitmap that cannot be trusted loads empty and inconsistent.
        let untrusted = |why: &str| {
            log::error!(
                "bitmap sidecar {what}: bitmap '{}' {why}; it loads as inconsistent",
                e.name
            );
            inconsistent_bitmap(e.name.clone(), e.granularity, disk_size)
        };
        if e.inconsistent {
            log::warn!(
                "bitmap sidecar {what}: bitmap '{}' was already inconsistent",
                e.name
            );
            rec.bitmaps.push(inconsistent_bitmap(
                e.name.clone(),
                e.granularity,
                disk_size,
            )?);
            continue;
        }
        if super::check_granularity(e.granularity).is_err() {
            rec.bitmaps.push(untrusted(&format!(
                "has an invalid granularity {}",
                e.granularity
            ))?);
            continue;
        }
        let need = qemu_words(disk_size.div_ceil(e.granularity)) * 8;
        let Some(data) = region(e.data_off, need).filter(|_| e.data_len >= need) else {
            rec.bitmaps
                .push(untrusted("has its data missing (sidecar truncated)")?);
            continue;
        };
        if recording && !log_ok {
            rec.bitmaps.push(untrusted(
                "was recording but the activity log is missing (sidecar truncated)",
            )?);
            continue;
        }
        // Page tracking on: the tracker keeps using this bitmap after open.
        let bitmap = DirtyBitmap::new(disk_size, e.granularity, true)?;
        bitmap.bits().or_le_bytes(data);
        let before = bitmap.dirty_chunks();
        if let (true, Some(ext)) = (recording, &extents) {
            for (off, len) in ext.dirty_ranges() {
                bitmap.set_range(off, len);
            }
        }
        let chunks_from_log = bitmap.dirty_chunks() - before;
        bitmap.set_recording(recording);
        rec.bitmaps.push(RecoveredBitmap {
            name: e.name.clone(),
            granularity: e.granularity,
            recording,
            inconsistent: false,
            bitmap,
            chunks_from_log,
        });
    }
    rec.layout = Some(layout);
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::MemStore;

    fn sample() -> (Layout, Vec<u8>) {
        let layout = Layout::plan(
            42,
            10 << 20,
            1 << 20,
            &[
                ("a".into(), 65536, false),
                ("bee".into(), 512, false),
                ("bad".into(), 4096, true),
            ],
        );
        let mut file = vec![0u8; layout.total_len as usize];
        let pre = layout.encode_preamble();
        file[..pre.len()].copy_from_slice(&pre);
        let st = layout.encode_state(7, 0, &[BITMAP_RECORDING, 0, 0]);
        let off = layout.state_off_for(7) as usize;
        file[off..off + st.len()].copy_from_slice(&st);
        for (slot, epoch) in [(0u64, 6u64), (1, 7)] {
            let h = layout.encode_al_header(epoch);
            let off = layout.al_slot_off(slot) as usize;
            file[off..off + h.len()].copy_from_slice(&h);
        }
        (layout, file)
    }

    #[test]
    fn layout_round_trips_and_recovers_log() {
        let (layout, mut file) = sample();
        // Fine level of "a": chunk 3. Of "bee": chunk 100.
        let a = &layout.entries[0];
        file[a.data_off as usize] = 1 << 3;
        let b = &layout.entries[1];
        file[b.data_off as usize + 12] = 1 << 4; // chunk 100
                                                 // Slot 1 (epoch 7 >= generation 7): extent 5 logged. Slot 0 (epoch 6): extent 9, stale.
        file[(layout.al_slot_off(1) + PAGE) as usize] = 1 << 5;
        file[(layout.al_slot_off(0) + PAGE) as usize + 1] = 1 << 1;
        let store = MemStore::new();
        store.set_contents(Some(file));
        let rec = recover(&store, 10 << 20).unwrap();
        assert!(!rec.clean);
        assert_eq!(rec.generation, 7);
        assert_eq!(rec.log_extents, 1);
        let names: Vec<_> = rec.bitmaps.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["a", "bee", "bad"]);
        let ra = &rec.bitmaps[0];
        assert!(ra.recording && !ra.inconsistent);
        // chunk 3 plus the 16 chunks of extent 5 (5 MiB..6 MiB at 64 KiB).
        assert!(ra.bitmap.get_chunk(3));
        assert_eq!(ra.bitmap.dirty_chunks(), 17);
        assert_eq!(ra.chunks_from_log, 16);
        // "bee" was not recording: the log does not apply to it.
        let rb = &rec.bitmaps[1];
        assert!(!rb.recording);
        assert_eq!(rb.bitmap.dirty_chunks(), 1);
        assert!(rb.bitmap.get_chunk(100));
        assert!(rec.bitmaps[2].inconsistent);
    }

    #[test]
    fn damage_makes_bitmaps_inconsistent_never_panics() {
        let (layout, file) = sample();
        // Truncation at every page boundary and a few odd places.
        let mut cuts: Vec<usize> = (0..file.len()).step_by(PAGE as usize).collect();
        cuts.extend([1, 7, 100, 130, file.len() - 1]);
        for cut in cuts {
            let store = MemStore::new();
            store.set_contents(Some(file[..cut].to_vec()));
            let rec = recover(&store, 10 << 20).unwrap();
            for b in &rec.bitmaps {
                // Every bitmap still trusted has its words (not necessarily
                // the page padding after them) inside the truncated file.
                let words_end = layout
                    .entries
                    .iter()
                    .find(|e| e.name == b.name)
                    .map(|e| e.data_off + qemu_words((10 << 20) / e.granularity) * 8);
                if !b.inconsistent {
                    assert!(
                        words_end.is_some_and(|end| end as usize <= cut),
                        "cut {cut}: {}",
                        b.name
                    );
                }
            }
            if cut < layout.al_off as usize + 2 * layout.al_len as usize {
                assert!(
                    rec.bitmaps.iter().all(|b| b.inconsistent || !b.recording),
                    "cut {cut}"
                );
            }
        }
        // A flipped byte in the directory: checksum fails, names salvaged.
        let mut bad = file.clone();
        bad[HEADER_LEN + ENTRY_FIXED] ^= 0x20; // 'a' -> 'A'
        let store = MemStore::new();
        store.set_contents(Some(bad));
        let rec = recover(&store, 10 << 20).unwrap();
        assert!(rec.damage.is_some());
        assert_eq!(rec.bitmaps.len(), 3);
        assert!(rec.bitmaps.iter().all(|b| b.inconsistent));
        // A damaged state block falls back to the other one; both damaged: inconsistent.
        let mut bad = file.clone();
        bad[layout.state_off_for(7) as usize + 20] ^= 1;
        store.set_contents(Some(bad));
        let rec = recover(&store, 10 << 20).unwrap();
        assert!(rec.bitmaps.iter().all(|b| b.inconsistent));
        // Different disk size.
        store.set_contents(Some(file.clone()));
        let rec = recover(&store, 11 << 20).unwrap();
        assert!(rec.bitmaps.iter().all(|b| b.inconsistent));
        // Garbage and a newer version.
        store.set_contents(Some(vec![0xAB; 5000]));
        let rec = recover(&store, 10 << 20).unwrap();
        assert!(rec.bitmaps.is_empty() && rec.damage.is_some());
        let mut newer = file;
        newer[8] = 2;
        store.set_contents(Some(newer));
        assert!(matches!(
            recover(&store, 10 << 20),
            Err(DirtyError::UnsupportedFormat(_))
        ));
        // Missing file: nothing to recover.
        store.set_contents(None);
        let rec = recover(&store, 10 << 20).unwrap();
        assert!(!rec.existed && rec.bitmaps.is_empty());
    }
}
