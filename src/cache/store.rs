//! The bounded in-memory store: TinyUFO (TinyLFU admission, S3-FIFO eviction)
//! weighted by bytes, an object-size limit, and the counters behind the metrics.
//!
//! It knows nothing of HTTP: values are opaque, each put says how many bytes it
//! costs. TinyUFO weights are `u16`, so bytes are counted in 1 KiB units rounded
//! up: the bound is never exceeded by rounding, only approached more slowly.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tinyufo::TinyUfo;

/// Bytes per unit of TinyUFO weight.
pub const UNIT: usize = 1024;
/// The largest object TinyUFO can weigh.
pub const MAX_OBJECT_BYTES: usize = u16::MAX as usize * UNIT;
// Config accepts no `cache_max_object_bytes` the store cannot weigh.
const _: () = assert!(crate::config::CACHE_MAX_OBJECT_BYTES_LIMIT <= MAX_OBJECT_BYTES);

/// Counters of one store.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes held, in weight units × UNIT.
    pub bytes: AtomicI64,
    pub objects: AtomicI64,
    pub evictions: AtomicU64,
}

struct Slot<T> {
    key: Arc<str>,
    value: T,
    weight: u16,
}

impl<T: Clone> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Slot {
            key: self.key.clone(),
            value: self.value.clone(),
            weight: self.weight,
        }
    }
}

/// A store of `T` by string key, bounded by total bytes and by object size.
pub struct Store<T> {
    /// By a hash of the key, so a lookup hashes the `&str` it is given instead of
    /// allocating a key to hash (TinyUFO keeps only a hash of its keys anyway).
    ufo: TinyUfo<u64, Slot<T>>,
    hasher: RandomState,
    max_object: usize,
    /// Held by every put and remove: TinyUFO does not say what a put replaced, so the
    /// weight a put takes over is read first, and no other write may come in between
    /// (reads go on unlocked).
    writing: Mutex<()>,
    pub stats: Stats,
}

impl<T: Clone + Send + Sync + 'static> Store<T> {
    /// `max_bytes` total, `max_object` per object (at most [`MAX_OBJECT_BYTES`]).
    pub fn new(max_bytes: usize, max_object: usize) -> Store<T> {
        let units = (max_bytes / UNIT).max(1);
        // TinyUFO sizes its frequency sketch for this many objects; assume ~4 KiB each.
        let estimated = (max_bytes / (4 * UNIT)).clamp(256, 1 << 20);
        Store {
            ufo: TinyUfo::new(units, estimated),
            hasher: RandomState::new(),
            max_object: max_object.min(MAX_OBJECT_BYTES).min(max_bytes),
            writing: Mutex::new(()),
            stats: Stats::default(),
        }
    }

    pub fn max_object(&self) -> usize {
        self.max_object
    }

    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    pub fn get(&self, key: &str) -> Option<T> {
        let slot = self.ufo.get(&self.hash(key))?;
        // Only a hash of the key was looked up: confirm it is ours.
        (*slot.key == *key).then_some(slot.value)
    }

    /// Stores `value` costing `bytes`. False when it is not stored: over the object
    /// limit, or not admitted (TinyLFU keeps a more popular object it would evict).
    pub fn put(&self, key: &str, value: T, bytes: usize) -> bool {
        if bytes > self.max_object {
            return false;
        }
        let weight = bytes.div_ceil(UNIT).clamp(1, u16::MAX as usize) as u16;
        let hash = self.hash(key);
        let key: Arc<str> = Arc::from(key);
        let slot = Slot {
            key: key.clone(),
            value,
            weight,
        };
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = self.ufo.get(&hash) {
            self.account(-1, -i64::from(old.weight));
        }
        self.account(1, i64::from(weight));
        let mut stored = true;
        for evicted in self.ufo.put(hash, slot, weight) {
            self.account(-1, -i64::from(evicted.weight));
            if Arc::ptr_eq(&evicted.data.key, &key) {
                // Handed back at once: not admitted.
                stored = false;
            } else {
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        stored
    }

    pub fn remove(&self, key: &str) -> Option<T> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let slot = self.ufo.remove(&self.hash(key))?;
        self.account(-1, -i64::from(slot.weight));
        (*slot.key == *key).then_some(slot.value)
    }

    fn account(&self, objects: i64, units: i64) {
        self.stats.objects.fetch_add(objects, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(units * UNIT as i64, Ordering::Relaxed);
    }

    pub fn bytes(&self) -> u64 {
        self.stats.bytes.load(Ordering::Relaxed).max(0) as u64
    }

    pub fn objects(&self) -> u64 {
        self.stats.objects.load(Ordering::Relaxed).max(0) as u64
    }

    pub fn evictions(&self) -> u64 {
        self.stats.evictions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_put_remove() {
        let store: Store<u32> = Store::new(1 << 20, 1 << 16);
        assert!(store.put("a", 1, 100));
        assert_eq!(store.get("a"), Some(1));
        assert_eq!(store.get("b"), None);
        assert_eq!(store.objects(), 1);
        assert_eq!(store.bytes(), 1024);
        assert!(store.put("a", 2, 3000));
        assert_eq!(store.get("a"), Some(2));
        assert_eq!(store.objects(), 1);
        assert_eq!(store.bytes(), 3072);
        assert_eq!(store.remove("a"), Some(2));
        assert_eq!(store.get("a"), None);
        assert_eq!(store.objects(), 0);
        assert_eq!(store.bytes(), 0);
    }

    #[test]
    fn refuses_objects_over_the_limit() {
        let store: Store<u32> = Store::new(1 << 20, 10_000);
        assert!(!store.put("big", 1, 10_001));
        assert!(store.put("ok", 1, 10_000));
        assert_eq!(store.get("big"), None);
    }

    /// What the store holds, counted key by key (each key weighs 1 KiB).
    fn held(store: &Store<u32>, keys: &[String]) -> (u64, u64) {
        let present = keys.iter().filter(|k| store.get(k).is_some()).count() as u64;
        (present, present * 1024)
    }

    #[test]
    fn a_put_that_admission_refuses_says_so_and_is_not_counted() {
        let store: Store<u32> = Store::new(64 * 1024, 8 * 1024);
        let hot: Vec<String> = (0..64).map(|i| format!("hot-{i}")).collect();
        // TinyLFU counts puts: keys stored again and again are popular.
        for _ in 0..5 {
            for (i, key) in hot.iter().enumerate() {
                store.put(key, i as u32, 1024);
            }
        }
        // A new key evicting one popular key is refused (the popular one is put back).
        let cold: Vec<String> = (0..100).map(|i| format!("cold-{i}")).collect();
        let mut refused = 0;
        for (i, key) in cold.iter().enumerate() {
            let stored = store.put(key, i as u32, 1024);
            assert_eq!(stored, store.get(key).is_some(), "{key}: put says {stored}");
            refused += usize::from(!stored);
        }
        assert!(refused > 0, "admission refused none of 100 cold keys");
        let all: Vec<String> = hot.into_iter().chain(cold).collect();
        assert_eq!((store.objects(), store.bytes()), held(&store, &all));
    }

    #[test]
    fn counts_stay_exact_under_concurrent_puts_of_the_same_keys() {
        let store: Arc<Store<u32>> = Arc::new(Store::new(1 << 20, 8 * 1024));
        let keys: Vec<String> = (0..16).map(|i| format!("k-{i}")).collect();
        std::thread::scope(|scope| {
            for t in 0..4 {
                let (store, keys) = (&store, &keys);
                scope.spawn(move || {
                    for round in 0..500 {
                        let key = &keys[(round * 7 + t) % keys.len()];
                        store.put(key, round as u32, 1024);
                        if round % 5 == 0 {
                            store.remove(key);
                        }
                    }
                });
            }
        });
        assert_eq!((store.objects(), store.bytes()), held(&store, &keys));
    }

    #[test]
    fn byte_bound_holds_after_many_keys() {
        let max = 256 * 1024;
        let store: Store<u32> = Store::new(max, 8 * 1024);
        for i in 0..5_000u32 {
            store.put(&format!("key-{i}"), i, 1 + (i as usize * 37) % 6000);
            assert!(store.bytes() as usize <= max, "bound broken at {i}");
        }
        assert!(store.evictions() > 0);
        assert!(store.objects() > 0);
    }
}
