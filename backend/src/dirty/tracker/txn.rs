//! [`BitmapTxn`]: several bitmap operations that take effect together or
//! not at all (QMP `transaction`).
//!
//! The operations are checked one by one against the state the earlier
//! ones leave (so "add b1" twice fails, and a bitmap added earlier can be
//! cleared), but nothing visible changes until [`BitmapTxn::commit`]. That
//! is also where QEMU's semantics come from: a bitmap being removed stays
//! (busy) until the commit, so its name is still taken.
//!
//! Crash safety: persistent bitmaps of a disk share one sidecar, and a
//! transaction changes it with exactly one atomic file replacement (the
//! same `relayout` an `add` does), so a kill -9 at any instant leaves the
//! file of before or the file of after. [`BitmapTxn::prepare`] writes that
//! file ahead of time under a temporary name (what can fail on storage
//! fails there, while guest I/O runs); the commit only writes the pages the
//! guest changed since, syncs and renames. A staged file a killed process
//! left is removed at the next open.

use super::{DirtyError, DirtyTracker, MetaStore, Named, Staged, DEFAULT_GRANULARITY};
use crate::dirty::{check_granularity, DirtyBitmap};
use std::sync::Arc;

/// A bitmap as the transaction sees it.
struct Entry {
    named: Arc<Named>,
    /// Added by this transaction (not yet visible).
    new: bool,
    /// Removed by this transaction: still there, but busy.
    removed: bool,
}

/// One change, applied in order at the commit.
enum Step {
    Clear(Arc<Named>),
    Merge(Arc<Named>, Vec<Arc<Named>>),
    Recording(Arc<Named>, bool),
    /// The bits become these (little-endian words).
    Replace(Arc<Named>, Vec<u8>),
}

/// What restores a bitmap if the sidecar cannot be written at the commit.
enum Undo {
    Bits(Arc<Named>, Vec<u8>),
    Recording(Arc<Named>, bool),
}

/// Planned bitmap operations of one transaction; see the module docs.
/// Dropped without [`BitmapTxn::commit`], it changes nothing and removes
/// its staged file.
pub struct BitmapTxn<'a> {
    tracker: &'a DirtyTracker,
    /// The list the plan was made against; a commit refuses another.
    base: Arc<Vec<Arc<Named>>>,
    entries: Vec<Entry>,
    steps: Vec<Step>,
    /// The sidecar changes (a persistent bitmap is affected).
    persistent: bool,
    staged: Option<(Arc<dyn MetaStore>, Staged)>,
}

impl DirtyTracker {
    /// Starts planning a transaction against the bitmaps as they are now.
    pub fn transaction(&self) -> BitmapTxn<'_> {
        let base = self.inner.bitmaps.load_full();
        let entries = base
            .iter()
            .map(|b| Entry {
                named: b.clone(),
                new: false,
                removed: false,
            })
            .collect();
        BitmapTxn {
            tracker: self,
            base,
            entries,
            steps: Vec::new(),
            persistent: false,
            staged: None,
        }
    }
}

impl BitmapTxn<'_> {
    /// The bitmap `name` as the earlier operations left it, checked as
    /// [`DirtyTracker`]'s own operations check it; a bitmap this
    /// transaction removes is busy.
    fn find(
        &self,
        name: &str,
        ro: bool,
        inconsistent: bool,
    ) -> Result<(Arc<Named>, bool), DirtyError> {
        let e = self
            .entries
            .iter()
            .find(|e| e.named.name == name)
            .ok_or_else(|| DirtyError::NotFound(name.to_string()))?;
        if e.removed {
            return Err(DirtyError::Busy(name.to_string()));
        }
        DirtyTracker::check(&e.named, true, ro, inconsistent)?;
        Ok((e.named.clone(), e.new))
    }

    fn touch(&mut self, b: &Named) {
        self.persistent |= b.persistent;
    }

    /// Plans `block-dirty-bitmap-add` (checks as [`DirtyTracker::add`]).
    pub fn add(
        &mut self,
        name: &str,
        granularity: Option<u64>,
        persistent: bool,
        disabled: bool,
    ) -> Result<(), DirtyError> {
        if name.is_empty() {
            return Err(DirtyError::EmptyName);
        }
        let granularity = granularity.unwrap_or(DEFAULT_GRANULARITY);
        check_granularity(granularity)?;
        let inner = &*self.tracker.inner;
        if persistent && inner.read_only {
            return Err(DirtyError::PersistenceUnavailable(
                "the image is read-only".into(),
            ));
        }
        if persistent && self.tracker.control()?.store.is_none() {
            return Err(DirtyError::PersistenceUnavailable(
                "no sidecar file is configured".into(),
            ));
        }
        if self.entries.iter().any(|e| e.named.name == name) {
            return Err(DirtyError::AlreadyExists(name.to_string()));
        }
        // Not visible before the commit, so its state may be set now.
        let named = Named::new_empty(name, inner.disk_size, granularity, persistent, disabled)?;
        self.touch(&named);
        self.entries.push(Entry {
            named,
            new: true,
            removed: false,
        });
        Ok(())
    }

    /// Plans `block-dirty-bitmap-remove`.
    pub fn remove(&mut self, name: &str) -> Result<(), DirtyError> {
        let (b, _) = self.find(name, true, false)?;
        self.touch(&b);
        if let Some(e) = self.entries.iter_mut().find(|e| Arc::ptr_eq(&e.named, &b)) {
            e.removed = true;
        }
        Ok(())
    }

    /// Plans `block-dirty-bitmap-clear`.
    pub fn clear(&mut self, name: &str) -> Result<(), DirtyError> {
        let (b, _) = self.find(name, true, true)?;
        self.touch(&b);
        self.steps.push(Step::Clear(b));
        Ok(())
    }

    /// Plans `block-dirty-bitmap-enable`.
    pub fn enable(&mut self, name: &str) -> Result<(), DirtyError> {
        self.recording(name, true)
    }

    /// Plans `block-dirty-bitmap-disable`.
    pub fn disable(&mut self, name: &str) -> Result<(), DirtyError> {
        self.recording(name, false)
    }

    fn recording(&mut self, name: &str, on: bool) -> Result<(), DirtyError> {
        let (b, _) = self.find(name, false, true)?;
        // The flag is in the sidecar (unless the disk is read-only: then
        // it is only changed in memory, as outside a transaction).
        self.persistent |= b.persistent && !self.tracker.inner.read_only;
        self.steps.push(Step::Recording(b, on));
        Ok(())
    }

    /// Plans `block-dirty-bitmap-merge` (target first, then each source,
    /// as QEMU resolves them).
    pub fn merge(&mut self, target: &str, sources: &[&str]) -> Result<(), DirtyError> {
        let (t, _) = self.find(target, true, true)?;
        let mut srcs = Vec::with_capacity(sources.len());
        for s in sources {
            srcs.push(self.find(s, false, true)?.0);
        }
        self.touch(&t);
        self.steps.push(Step::Merge(t, srcs));
        Ok(())
    }

    /// Plans setting the bits of `name` to those of `bits` (same size and
    /// granularity): a backup job's end.
    pub fn replace(&mut self, name: &str, bits: &DirtyBitmap) -> Result<(), DirtyError> {
        let (b, _) = self.find(name, true, true)?;
        if bits.granularity() != b.bitmap.granularity() || bits.chunks() != b.bitmap.chunks() {
            return Err(DirtyError::ShapeMismatch {
                given: bits.granularity(),
                bitmap: b.bitmap.granularity(),
            });
        }
        self.touch(&b);
        self.steps.push(Step::Replace(b, bits.to_le_bytes()));
        Ok(())
    }

    /// The bitmaps after the commit, in list order.
    fn final_list(&self) -> Vec<Arc<Named>> {
        self.entries
            .iter()
            .filter(|e| !e.removed)
            .map(|e| e.named.clone())
            .collect()
    }

    /// Writes the sidecar the commit will put in place (as it would be
    /// now) under a temporary name, durably: storage errors surface here,
    /// before guest I/O is held. Nothing a recovery reads changes.
    pub fn prepare(&mut self) -> Result<(), DirtyError> {
        if !self.persistent || self.tracker.inner.read_only {
            return Ok(());
        }
        let ctl = self.tracker.control()?;
        let Some(store) = ctl.store.clone() else {
            return Ok(());
        };
        let members: Vec<Arc<Named>> = self
            .final_list()
            .into_iter()
            .filter(|b| b.persistent)
            .collect();
        if members.is_empty() {
            // The commit deletes the file: nothing to stage.
            return Ok(());
        }
        let staged = self.tracker.stage(ctl, &members, &store)?;
        self.staged = Some((store, staged));
        Ok(())
    }

    /// Makes every planned operation take effect at once. Precondition:
    /// no [`DirtyTracker::mark`] runs (the caller holds guest I/O at the
    /// disk's gate), so every write is seen by the bitmaps of before or by
    /// those of after. Persistent changes are durable when this returns.
    ///
    /// On error nothing changed (the bits, flags and sidecar are as they
    /// were); the staged file is removed.
    pub fn commit(mut self) -> Result<(), DirtyError> {
        let inner = &*self.tracker.inner;
        let mut ctl = self.tracker.control()?;
        if !Arc::ptr_eq(&inner.bitmaps.load_full(), &self.base) {
            return Err(DirtyError::Io {
                what: "transaction".into(),
                source: std::io::Error::other("the bitmaps changed while it was prepared"),
            });
        }
        // A job may have taken a bitmap since it was checked.
        let removed = self.entries.iter().filter(|e| e.removed && !e.new);
        let changed = self.steps.iter().flat_map(|s| match s {
            Step::Clear(b) | Step::Recording(b, _) | Step::Replace(b, _) => vec![b],
            Step::Merge(t, srcs) => std::iter::once(t).chain(srcs).collect(),
        });
        for b in removed.map(|e| &e.named).chain(changed) {
            DirtyTracker::check(b, true, false, false)?;
        }
        let file = self.persistent && !inner.read_only;
        let mut undo = Vec::new();
        for step in &self.steps {
            match step {
                Step::Clear(b) => {
                    if file {
                        undo.push(Undo::Bits(b.clone(), b.bitmap.to_le_bytes()));
                    }
                    b.bitmap.clear();
                }
                Step::Merge(t, srcs) => {
                    if file {
                        undo.push(Undo::Bits(t.clone(), t.bitmap.to_le_bytes()));
                    }
                    for s in srcs.iter().filter(|s| !Arc::ptr_eq(s, t)) {
                        t.bitmap.merge_from(&s.bitmap);
                    }
                }
                Step::Replace(b, bytes) => {
                    if file {
                        undo.push(Undo::Bits(b.clone(), b.bitmap.to_le_bytes()));
                    }
                    b.bitmap.clear();
                    b.bitmap.bits().or_le_bytes(bytes);
                }
                Step::Recording(b, on) => {
                    undo.push(Undo::Recording(b.clone(), b.bitmap.is_recording()));
                    b.bitmap.set_recording(*on);
                }
            }
        }
        let list = self.final_list();
        if file {
            if let Some(store) = ctl.store.clone() {
                let staged = match self.staged.take() {
                    Some((s, staged)) if Arc::ptr_eq(&s, &store) => Some(staged),
                    Some((s, _)) => {
                        // The sidecar moved (a pivot) since it was staged.
                        s.discard_staged();
                        None
                    }
                    None => None,
                };
                let members: Vec<Arc<Named>> =
                    list.iter().filter(|b| b.persistent).cloned().collect();
                let fresh = self
                    .steps
                    .iter()
                    .any(|s| matches!(s, Step::Clear(b) | Step::Replace(b, _) if b.persistent));
                let res = inner.persist.relayout(
                    inner,
                    &mut ctl,
                    &members,
                    &store,
                    staged.as_ref(),
                    fresh,
                );
                if let Err(e) = res {
                    store.discard_staged();
                    for u in undo.into_iter().rev() {
                        match u {
                            Undo::Bits(b, bytes) => {
                                b.bitmap.clear();
                                b.bitmap.bits().or_le_bytes(&bytes);
                            }
                            Undo::Recording(b, on) => b.bitmap.set_recording(on),
                        }
                    }
                    return Err(e);
                }
            }
        }
        inner.bitmaps.store(Arc::new(list));
        drop(ctl);
        log::info!(
            "bitmap transaction committed: {} added, {} removed, {} changed",
            self.entries.iter().filter(|e| e.new && !e.removed).count(),
            self.entries.iter().filter(|e| !e.new && e.removed).count(),
            self.steps.len()
        );
        Ok(())
    }
}

impl Drop for BitmapTxn<'_> {
    fn drop(&mut self) {
        if let Some((store, _)) = self.staged.take() {
            store.discard_staged();
        }
    }
}
