//! [`Slab`]: a growable array whose elements never move.

use std::ops::{Index, IndexMut};

/// Elements per chunk: a chunk of OVER partitions or join buffers is a few hundred kilobytes,
/// small next to a million keys and large enough that the chunk list stays short.
const CHUNK: usize = 4096;

/// A vector of optional elements stored in fixed-size chunks.
///
/// A `Vec` of a million state slots (each 100–200 bytes) doubles by copying everything it
/// holds: growing from half a million to a million keys moves 75 MB and touches as much fresh
/// memory again, in the middle of an epoch. Chunks are allocated once and never move, so
/// growth costs one chunk at a time and indices stay valid.
pub(crate) struct Slab<T> {
    chunks: Vec<Vec<Option<T>>>,
    len: usize,
}

impl<T> Slab<T> {
    pub(crate) fn new() -> Self {
        Slab {
            chunks: Vec::new(),
            len: 0,
        }
    }

    /// Number of slots (occupied or not).
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends an empty slot and returns its index.
    pub(crate) fn push_empty(&mut self) -> usize {
        if self.len.is_multiple_of(CHUNK) {
            let mut chunk = Vec::with_capacity(CHUNK);
            chunk.resize_with(CHUNK, || None);
            self.chunks.push(chunk);
        }
        self.len += 1;
        self.len - 1
    }

    pub(crate) fn clear(&mut self) {
        self.chunks.clear();
        self.len = 0;
    }

    /// The occupied slots.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten().take(self.len).flatten()
    }

    /// The occupied slots, mutably.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.chunks.iter_mut().flatten().take(self.len).flatten()
    }
}

impl<T> Index<usize> for Slab<T> {
    type Output = Option<T>;
    fn index(&self, i: usize) -> &Option<T> {
        debug_assert!(i < self.len);
        &self.chunks[i / CHUNK][i % CHUNK]
    }
}

impl<T> IndexMut<usize> for Slab<T> {
    fn index_mut(&mut self, i: usize) -> &mut Option<T> {
        debug_assert!(i < self.len);
        &mut self.chunks[i / CHUNK][i % CHUNK]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_keep_their_place_across_chunks() {
        let mut slab = Slab::new();
        for v in 0..(CHUNK * 2 + 3) {
            let i = slab.push_empty();
            assert_eq!(i, v);
            slab[i] = (v % 3 != 0).then_some(v);
        }
        assert_eq!(slab.len(), CHUNK * 2 + 3);
        assert_eq!(slab[CHUNK + 1], Some(CHUNK + 1));
        assert_eq!(slab[CHUNK * 2 + 1], None);
        assert_eq!(slab[CHUNK * 2 + 2], Some(CHUNK * 2 + 2));
        let occupied: Vec<usize> = slab.iter().copied().collect();
        let expected: Vec<usize> = (0..CHUNK * 2 + 3).filter(|v| v % 3 != 0).collect();
        assert_eq!(occupied, expected);
        for v in slab.iter_mut() {
            *v += 1;
        }
        assert_eq!(slab[1], Some(2));
        slab.clear();
        assert_eq!(slab.len(), 0);
        assert_eq!(slab.iter().count(), 0);
    }
}
