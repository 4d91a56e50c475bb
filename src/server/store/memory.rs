//! `MemoryStore`: the genotypes of recent tasks in this process, bounded in count and in bytes,
//! oldest evicted first; the default store, for one replica.
//!
//! A dashmap serves concurrent reads without a global lock; insertion order (with each record's
//! size) is kept in a small mutex-guarded queue, taken only on insert, to know what to evict.

use super::StoreError;
use crate::server::api::GenotypeRecord;
use dashmap::DashMap;
use std::collections::VecDeque;
use std::sync::Mutex;

pub struct MemoryStore {
    records: DashMap<String, GenotypeRecord>,
    /// Task ids oldest first, each with its record's size, and the sum of those sizes.
    order: Mutex<(VecDeque<(String, usize)>, usize)>,
    capacity: usize,
    max_bytes: usize,
}

impl MemoryStore {
    /// Keeps at most `capacity` records and `max_bytes` of them (each counted as its JSON).
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        MemoryStore {
            records: DashMap::new(),
            order: Mutex::new((VecDeque::new(), 0)),
            capacity: capacity.max(1),
            max_bytes,
        }
    }

    /// Stores `record`, evicting the oldest until both bounds hold. A record larger than the byte
    /// bound on its own is not kept, rather than emptying the store for it.
    pub fn insert(&self, record: GenotypeRecord) -> Result<(), StoreError> {
        let size = serde_json::to_vec(&record).map_or(0, |json| json.len());
        if size > self.max_bytes {
            return Err(StoreError::TooLarge {
                size,
                max_bytes: self.max_bytes,
            });
        }
        let mut guard = self.order.lock().expect("store lock is never poisoned");
        let (order, bytes) = &mut *guard;
        order.push_back((record.task_id.clone(), size));
        *bytes += size;
        self.records.insert(record.task_id.clone(), record);
        while order.len() > self.capacity || *bytes > self.max_bytes {
            let Some((oldest, size)) = order.pop_front() else {
                break;
            };
            self.records.remove(&oldest);
            *bytes -= size;
        }
        Ok(())
    }

    pub fn get(&self, task_id: &str) -> Option<GenotypeRecord> {
        self.records.get(task_id).map(|r| r.clone())
    }

    /// Up to `limit` records, newest first.
    pub fn recent(&self, limit: usize) -> Vec<GenotypeRecord> {
        let guard = self.order.lock().expect("store lock is never poisoned");
        guard
            .0
            .iter()
            .rev()
            .filter_map(|(id, _)| self.get(id))
            .take(limit)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::genotype::Genotype;

    fn record(id: &str, label_bytes: usize) -> GenotypeRecord {
        let genotype = Genotype {
            normal: vec![],
            normal_concat: vec![2, 3, 4, 5],
            reduce: vec![],
            reduce_concat: vec![2, 3, 4, 5],
        };
        let labels = vec!["x".repeat(label_bytes)];
        GenotypeRecord {
            task_id: id.into(),
            model: "m".into(),
            labels,
            n_way: 2,
            k_shot: 1,
            created_at: String::new(),
            genotype,
        }
    }

    #[test]
    fn evicts_the_oldest_beyond_capacity() {
        let store = MemoryStore::new(2, usize::MAX);
        for id in ["a", "b", "c"] {
            store.insert(record(id, 1)).unwrap();
        }
        assert!(store.get("a").is_none());
        assert_eq!(store.len(), 2);
        let recent: Vec<String> = store.recent(10).into_iter().map(|r| r.task_id).collect();
        assert_eq!(recent, vec!["c", "b"]);
        assert_eq!(store.recent(1).len(), 1);
    }

    #[test]
    fn evicts_the_oldest_beyond_its_bytes() {
        let store = MemoryStore::new(100, 3000);
        for id in ["a", "b", "c"] {
            store.insert(record(id, 1000)).unwrap();
        }
        assert!(
            store.get("a").is_none(),
            "three records of over 1000 bytes do not fit in 3000"
        );
        assert_eq!(store.len(), 2);
        assert!(matches!(
            store.insert(record("huge", 5000)),
            Err(StoreError::TooLarge { size, .. }) if size > 5000
        ));
        assert!(
            store.get("huge").is_none() && store.len() == 2,
            "a record over the bound on its own is not kept, and evicts nothing"
        );
    }
}
