//! The index of a [`KeyedTable`](super::KeyedTable): from 32 bits of a key's hash to the
//! key's slot, by open addressing with linear probing.
//!
//! Why our own rather than a general hash map: at a million keys, finding a key costs a cache
//! miss in the index and another in the slot that holds the key, and a batch of rows looks up
//! a hundred thousand keys one after the other. An operator knows a batch's keys before it
//! looks them up, so the table hashes them all first and asks for the index entries a few rows
//! ahead ([`prefetch`](SlotIndex::prefetch)), then for the slots once those entries have
//! arrived ([`guess`](SlotIndex::guess)): the misses of several rows overlap. A general map
//! does not say where a key's bucket lives, so it cannot be asked ahead.
//!
//! Each entry is one `u64`: the hash bits in the high half and the slot plus one in the low
//! half (zero is an empty entry). Probing compares the stored hash bits and reads a slot only
//! when they agree, and growing moves entries without reading a key. Removal shifts the
//! entries after the hole back (no tombstones), so a probe always ends at the first empty
//! entry and the table never needs cleaning. The table grows at five eighths full, which keeps
//! linear probes short (about 1.8 entries on a hit), at 8 bytes per entry.

use crate::common::memory::prefetch;

/// Entries of the smallest non-empty index.
const MIN_ENTRIES: usize = 16;

/// Index entries for a table's keys; see the module docs.
#[derive(Default)]
pub(super) struct SlotIndex {
    entries: Vec<u64>,
    len: usize,
}

fn pack(hash: u32, slot: u32) -> u64 {
    (u64::from(hash) << 32) | (u64::from(slot) + 1)
}

fn hash_of(entry: u64) -> u32 {
    (entry >> 32) as u32
}

fn slot_of(entry: u64) -> u32 {
    (entry as u32) - 1
}

impl SlotIndex {
    /// Where `hash` starts probing: the top bits of the hash times an odd constant, so that
    /// hashes differing only in their high bits (or only in their low ones) spread out.
    fn home(&self, hash: u32) -> usize {
        let bits = self.entries.len().trailing_zeros();
        (u64::from(hash).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize
    }

    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    /// The slot whose entry has hash bits `hash` and for which `is_key` holds.
    pub(super) fn find(&self, hash: u32, mut is_key: impl FnMut(u32) -> bool) -> Option<u32> {
        if self.entries.is_empty() {
            return None;
        }
        let mask = self.mask();
        let mut i = self.home(hash);
        loop {
            let entry = self.entries[i];
            if entry == 0 {
                return None;
            }
            if hash_of(entry) == hash && is_key(slot_of(entry)) {
                return Some(slot_of(entry));
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds `slot` under `hash` (the caller knows its key is not in the index).
    pub(super) fn insert(&mut self, hash: u32, slot: u32) {
        if (self.len + 1) * 8 > self.entries.len() * 5 {
            self.grow();
        }
        self.place(pack(hash, slot));
        self.len += 1;
    }

    fn place(&mut self, entry: u64) {
        let mask = self.mask();
        let mut i = self.home(hash_of(entry));
        while self.entries[i] != 0 {
            i = (i + 1) & mask;
        }
        self.entries[i] = entry;
    }

    fn grow(&mut self) {
        let size = (self.entries.len() * 2).max(MIN_ENTRIES);
        let old = std::mem::replace(&mut self.entries, vec![0; size]);
        for entry in old.into_iter().filter(|&e| e != 0) {
            self.place(entry);
        }
    }

    /// Removes `slot`, which is in the index under `hash`.
    ///
    /// # Panics
    /// If it is not.
    pub(super) fn remove(&mut self, hash: u32, slot: u32) {
        let mask = self.mask();
        let wanted = pack(hash, slot);
        let mut hole = self.home(hash);
        while self.entries[hole] != wanted {
            assert_ne!(self.entries[hole], 0, "slot {slot} is not in the index");
            hole = (hole + 1) & mask;
        }
        // Close the hole: each later entry of the run moves into it if its probe passes it
        // (its home is not between the hole and where it sits).
        let mut i = (hole + 1) & mask;
        loop {
            let entry = self.entries[i];
            if entry == 0 {
                break;
            }
            let home = self.home(hash_of(entry));
            if (i.wrapping_sub(home) & mask) >= (i.wrapping_sub(hole) & mask) {
                self.entries[hole] = entry;
                hole = i;
            }
            i = (i + 1) & mask;
        }
        self.entries[hole] = 0;
        self.len -= 1;
    }

    /// Forgets every entry (keeping the memory).
    pub(super) fn clear(&mut self) {
        self.entries.fill(0);
        self.len = 0;
    }

    /// Asks the CPU to bring `hash`'s first index entry into cache.
    pub(super) fn prefetch(&self, hash: u32) {
        if !self.entries.is_empty() {
            prefetch(&self.entries[self.home(hash)]);
        }
    }

    /// The slot `hash` most likely finds (the first entry with its hash bits), without
    /// comparing keys: good enough to prefetch the slot.
    pub(super) fn guess(&self, hash: u32) -> Option<u32> {
        self.find(hash, |_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    /// Random inserts and removals, with many equal and near-equal hashes (so runs wrap
    /// around the end and removals shift entries), checked against a map after every step.
    #[test]
    fn agrees_with_a_map_through_inserts_and_removals() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut index = SlotIndex::default();
        let mut model: HashMap<u32, u32> = HashMap::new(); // slot -> hash
        let mut next_slot = 0u32;
        for step in 0..20_000 {
            if model.is_empty() || rng.gen_bool(0.6) {
                // Few distinct hashes: long runs of equal homes.
                let hash = if rng.gen_bool(0.5) {
                    rng.gen_range(0..8)
                } else {
                    rng.r#gen()
                };
                index.insert(hash, next_slot);
                model.insert(next_slot, hash);
                next_slot += 1;
            } else {
                let slot = *model.keys().nth(rng.gen_range(0..model.len())).unwrap();
                let hash = model.remove(&slot).unwrap();
                index.remove(hash, slot);
            }
            assert_eq!(index.len, model.len(), "step {step}");
            if step % 97 == 0 {
                for (&slot, &hash) in &model {
                    assert_eq!(index.find(hash, |s| s == slot), Some(slot), "step {step}");
                }
                assert_eq!(index.find(12345, |s| !model.contains_key(&s)), None);
            }
        }
        index.clear();
        assert_eq!(index.find(3, |_| true), None);
    }

    #[test]
    fn guess_finds_the_first_slot_of_a_hash() {
        let mut index = SlotIndex::default();
        assert_eq!(index.guess(1), None);
        index.prefetch(1);
        index.insert(1, 10);
        index.insert(1, 11);
        index.insert(2, 12);
        assert_eq!(index.guess(1), Some(10));
        assert_eq!(index.guess(2), Some(12));
        index.remove(1, 10);
        assert_eq!(index.guess(1), Some(11));
        assert_eq!(index.find(1, |s| s == 10), None);
    }
}
