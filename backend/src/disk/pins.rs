//! Keeping old versions of a swappable resource (the active image, the
//! guest memory map) alive while requests issued on them are in flight,
//! without a reference count per request.
//!
//! A queue worker issues many requests on the same version; cloning an
//! `Arc` for each would put an atomic read-modify-write on a cache line that
//! every queue thread shares. `Pins` holds one clone per version, counts the
//! requests issued on it with plain integers (it belongs to one thread), and
//! drops a version once it is no longer current and nothing uses it. Its
//! owner lets go of the current version too when it goes idle
//! (`release_unused`), so that a version replaced while the owner sleeps
//! (an image after a mirror pivot) is not kept open by it.

/// Which version a request was issued on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinId(u64);

struct Pinned<T> {
    id: u64,
    value: T,
    users: usize,
}

/// The versions of one resource that requests still use; the last one is
/// the current version.
pub struct Pins<T> {
    versions: Vec<Pinned<T>>,
    next_id: u64,
}

impl<T> Default for Pins<T> {
    fn default() -> Self {
        Pins {
            versions: Vec::new(),
            next_id: 0,
        }
    }
}

impl<T> Pins<T> {
    /// Makes sure the current version is the one for which `is_it` is true,
    /// adding `make()` as the new current version if not. Older versions stay
    /// until their last user is unpinned.
    pub fn refresh(&mut self, is_it: impl FnOnce(&T) -> bool, make: impl FnOnce() -> T) {
        if self.versions.last().is_some_and(|v| is_it(&v.value)) {
            return;
        }
        // The old current version loses its last reason to live if unused.
        if self.versions.last().is_some_and(|v| v.users == 0) {
            self.versions.pop();
        }
        self.versions.push(Pinned {
            id: self.next_id,
            value: make(),
            users: 0,
        });
        self.next_id += 1;
    }

    /// The current version (None before the first `refresh`).
    pub fn current(&self) -> Option<&T> {
        self.versions.last().map(|v| &v.value)
    }

    /// Counts one more user of the current version (None before the first
    /// `refresh`).
    pub fn pin(&mut self) -> Option<PinId> {
        let v = self.versions.last_mut()?;
        v.users += 1;
        Some(PinId(v.id))
    }

    /// The version `id` (still pinned).
    pub fn get(&self, id: PinId) -> Option<&T> {
        self.versions
            .iter()
            .find(|v| v.id == id.0)
            .map(|v| &v.value)
    }

    /// Ends one use of version `id`; an old version goes away with its last user.
    pub fn unpin(&mut self, id: PinId) {
        let last = self.versions.len().saturating_sub(1);
        if let Some(i) = self.versions.iter().position(|v| v.id == id.0) {
            let v = &mut self.versions[i];
            v.users = v.users.saturating_sub(1);
            if v.users == 0 && i != last {
                self.versions.remove(i);
            }
        }
    }

    /// Drops every version nothing uses, the current one included; the
    /// next `refresh` takes the then current version again.
    pub fn release_unused(&mut self) {
        self.versions.retain(|v| v.users > 0);
    }

    /// Number of versions held (the current one included).
    pub fn versions(&self) -> usize {
        self.versions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn old_versions_live_exactly_as_long_as_their_users() {
        let mut pins: Pins<Arc<u32>> = Pins::default();
        assert!(pins.pin().is_none());
        let a = Arc::new(1);
        pins.refresh(|v| Arc::ptr_eq(v, &a), || a.clone());
        let p1 = pins.pin().unwrap();
        let p2 = pins.pin().unwrap();
        // Same version: no new entry, no clone.
        pins.refresh(|v| Arc::ptr_eq(v, &a), || unreachable!());
        assert_eq!(Arc::strong_count(&a), 2);

        let b = Arc::new(2);
        pins.refresh(|v| Arc::ptr_eq(v, &b), || b.clone());
        assert_eq!(**pins.current().unwrap(), 2);
        assert_eq!(pins.versions(), 2);
        let p3 = pins.pin().unwrap();
        assert_eq!(**pins.get(p1).unwrap(), 1);
        pins.unpin(p1);
        assert_eq!(Arc::strong_count(&a), 2, "still used by p2");
        pins.unpin(p2);
        assert_eq!(
            Arc::strong_count(&a),
            1,
            "old version dropped with its last user"
        );
        assert!(pins.get(p1).is_none());
        assert_eq!(**pins.get(p3).unwrap(), 2);

        // The current version stays even when unused.
        pins.unpin(p3);
        assert_eq!(pins.versions(), 1);
        assert_eq!(Arc::strong_count(&b), 2);

        // An unused current version is dropped at once when replaced.
        let c = Arc::new(3);
        pins.refresh(|v| Arc::ptr_eq(v, &c), || c.clone());
        assert_eq!(pins.versions(), 1);
        assert_eq!(Arc::strong_count(&b), 1);

        // Going idle lets go of the unused current version, not of a used one.
        let p4 = pins.pin().unwrap();
        pins.release_unused();
        assert_eq!(Arc::strong_count(&c), 2, "still used by p4");
        pins.unpin(p4);
        pins.release_unused();
        assert_eq!(Arc::strong_count(&c), 1, "idle owner still holds it");
        assert_eq!(pins.versions(), 0);
    }
}
