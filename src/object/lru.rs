//! A cache bounded by bytes, least recently used out first: what a lazy
//! reader of a point keeps of the blobs it fetched, so a guest reading
//! the same blocks again (a boot's second pass, a filesystem's metadata)
//! costs no request. Values are shared (`Arc`), so an entry evicted while
//! a reader still copies from it stays valid for that reader.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Arc;

/// Values by key, at most `capacity` bytes of them (as their `weight`s
/// say); one lock around it is the caller's.
#[derive(Debug)]
pub struct Lru<K, V> {
    capacity: u64,
    used: u64,
    tick: u64,
    /// key → (value, weight, last use).
    entries: HashMap<K, (Arc<V>, u64, u64)>,
    /// last use → key, oldest first.
    order: BTreeMap<u64, K>,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    /// An empty cache of `capacity` bytes.
    pub fn new(capacity: u64) -> Lru<K, V> {
        Lru {
            capacity,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// The value of `key`, now the most recently used.
    pub fn get(&mut self, key: &K) -> Option<Arc<V>> {
        self.tick += 1;
        let (value, _, used) = self.entries.get_mut(key)?;
        self.order.remove(used);
        *used = self.tick;
        self.order.insert(self.tick, key.clone());
        Some(value.clone())
    }

    /// Keeps `value` of `weight` bytes under `key`, evicting the least
    /// recently used beyond the capacity (a value larger than the whole
    /// cache is not kept).
    pub fn insert(&mut self, key: K, value: Arc<V>, weight: u64) {
        if weight > self.capacity {
            return;
        }
        self.remove(&key);
        while self.used + weight > self.capacity {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, w, _)) = self.entries.remove(&old) {
                self.used -= w;
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.entries.insert(key, (value, weight, self.tick));
        self.used += weight;
    }

    fn remove(&mut self, key: &K) {
        if let Some((_, w, used)) = self.entries.remove(key) {
            self.order.remove(&used);
            self.used -= w;
        }
    }

    /// Bytes held.
    pub fn used(&self) -> u64 {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_goes_first_and_bytes_stay_bounded() {
        let mut lru = Lru::new(30);
        lru.insert(1, Arc::new("a"), 10);
        lru.insert(2, Arc::new("b"), 10);
        lru.insert(3, Arc::new("c"), 10);
        assert!(lru.get(&1).is_some());
        lru.insert(4, Arc::new("d"), 10);
        assert!(lru.get(&2).is_none(), "2 was the least recently used");
        assert!(lru.get(&1).is_some() && lru.get(&3).is_some() && lru.get(&4).is_some());
        assert_eq!(lru.used(), 30);
        lru.insert(5, Arc::new("e"), 31);
        assert!(lru.get(&5).is_none(), "larger than the cache");
        lru.insert(3, Arc::new("c2"), 20);
        assert!(lru.used() <= 30);
        assert_eq!(*lru.get(&3).unwrap(), "c2");
    }
}
