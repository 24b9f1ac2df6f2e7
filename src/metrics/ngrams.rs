//! N-gram counting shared by BLEU and CIDEr-D.
//!
//! Tokens are interned to ids and an n-gram (n <= 4) is packed into one `u128` key, 32 bits per token
//! holding id + 1, so keys of different orders never collide and the order is recoverable from the
//! key's width. A sentence's n-grams are kept as a vector sorted by key, which makes clipping and
//! cosine similarity merge-joins instead of hash lookups (5000 images x 5 references score in well
//! under a second).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The largest n-gram order either metric uses.
pub(crate) const MAX_N: usize = 4;

/// A small multiplicative hasher for interned keys (no dependency; HashDoS is not a concern for
/// caption files a user scores locally).
#[derive(Default)]
pub(crate) struct KeyHasher(u64);

const K: u64 = 0x9e37_79b9_7f4a_7c15;

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(K);
        }
    }
    fn write_u32(&mut self, x: u32) {
        self.0 = (self.0.rotate_left(5) ^ x as u64).wrapping_mul(K);
    }
    fn write_u128(&mut self, x: u128) {
        self.0 = (self.0.rotate_left(5) ^ x as u64).wrapping_mul(K);
        self.0 = (self.0.rotate_left(5) ^ (x >> 64) as u64).wrapping_mul(K);
    }
    fn finish(&self) -> u64 {
        // fold the well-mixed high bits down: hashbrown indexes buckets with the low bits
        self.0 ^ (self.0 >> 29)
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// Token → id table.
#[derive(Default)]
pub(crate) struct Vocab<'a> {
    ids: FastMap<&'a str, u32>,
}

impl<'a> Vocab<'a> {
    pub fn ids(&mut self, words: &'a [String]) -> Vec<u32> {
        words
            .iter()
            .map(|w| {
                let next = self.ids.len() as u32;
                *self.ids.entry(w.as_str()).or_insert(next)
            })
            .collect()
    }
}

/// Order (1..=4) of a packed n-gram key.
pub(crate) fn order(key: u128) -> usize {
    (128 - key.leading_zeros() as usize).div_ceil(32)
}

/// All n-grams (n = 1..=MAX_N) of a sentence with their counts, sorted by key.
pub(crate) struct NGrams {
    /// number of tokens
    pub len: usize,
    pub grams: Vec<(u128, u32)>,
}

impl NGrams {
    pub fn new(ids: &[u32]) -> Self {
        let mut keys = Vec::with_capacity(ids.len() * MAX_N);
        for i in 0..ids.len() {
            let mut key = 0u128;
            for &id in ids[i..].iter().take(MAX_N) {
                key = (key << 32) | (id as u128 + 1);
                keys.push(key);
            }
        }
        keys.sort_unstable();
        let mut grams: Vec<(u128, u32)> = Vec::with_capacity(keys.len());
        for k in keys {
            match grams.last_mut() {
                Some((last, c)) if *last == k => *c += 1,
                _ => grams.push((k, 1)),
            }
        }
        NGrams { len: ids.len(), grams }
    }

    /// Count of one n-gram (0 when absent).
    pub fn count(&self, key: u128) -> u32 {
        self.grams.binary_search_by_key(&key, |&(k, _)| k).map_or(0, |i| self.grams[i].1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_and_counts() {
        // "a b a b": a x2, b x2, "a b" x2, "b a" x1, "a b a" x1, "b a b" x1, "a b a b" x1
        let g = NGrams::new(&[0, 1, 0, 1]);
        assert_eq!(g.grams.len(), 7);
        assert_eq!(g.count(1), 2);
        assert_eq!(g.count((1 << 32) | 2), 2);
        assert_eq!(g.count((2 << 32) | 1), 1);
        assert_eq!(g.count((1 << 32) | 1), 0);
        let orders: Vec<usize> = g.grams.iter().map(|&(k, _)| order(k)).collect();
        assert_eq!(orders.iter().filter(|&&o| o == 1).count(), 2);
        assert_eq!(orders.iter().filter(|&&o| o == 4).count(), 1);
        assert_eq!(order(u32::MAX as u128 + 1), 2);
    }
}
