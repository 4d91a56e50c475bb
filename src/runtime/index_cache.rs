//! Index tensors (and other constants) that depend only on shapes, built once per key and device.
//!
//! Gathers with a fixed pattern (depthwise matrices, mixing weights, a task batch's weight copies)
//! need an index on the compute device. Built in every pass it would be a host-to-device copy per
//! pass, which a CUDA graph cannot record; cached, the eager warm-up before a recording builds it
//! and the recording only reads it. Entries live as long as the process, so the addresses a
//! recorded graph holds stay valid.

use std::collections::hash_map::{Entry, HashMap};
use std::hash::Hash;
use std::sync::{Mutex, OnceLock};
use tch::{Device, Tensor};

/// One cache per kind of index, as a `static`.
pub struct IndexCache<K>(OnceLock<Mutex<HashMap<(K, Device), Tensor>>>);

impl<K: Hash + Eq> Default for IndexCache<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Hash + Eq> IndexCache<K> {
    pub const fn new() -> Self {
        IndexCache(OnceLock::new())
    }

    /// The index of `key` on `device`, built from `build(&key)` the first time.
    pub fn get(&self, key: K, device: Device, build: impl FnOnce(&K) -> Vec<i64>) -> Tensor {
        self.get_tensor(key, device, |key| Tensor::from_slice(&build(key)))
    }

    /// The tensor of `key` on `device`, built on the host from `build(&key)` the first time: a
    /// constant other than an index (a zero to gather from).
    pub fn get_tensor(&self, key: K, device: Device, build: impl FnOnce(&K) -> Tensor) -> Tensor {
        let mut cache = self
            .0
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let tensor = match cache.entry((key, device)) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let tensor = build(&entry.key().0).to_device(device);
                entry.insert(tensor)
            }
        };
        tensor.shallow_clone()
    }
}
