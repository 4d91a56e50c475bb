//! `GenotypeStore`: the genotypes of recent tasks, bounded, oldest evicted first.
//!
//! A dashmap serves concurrent reads without a global lock; insertion order is kept in a small
//! mutex-guarded queue, taken only on insert, to know what to evict.

use super::api::GenotypeRecord;
use dashmap::DashMap;
use std::collections::VecDeque;
use std::sync::Mutex;

pub struct GenotypeStore {
    records: DashMap<String, GenotypeRecord>,
    order: Mutex<VecDeque<String>>,
    capacity: usize,
}

impl GenotypeStore {
    pub fn new(capacity: usize) -> Self {
        GenotypeStore { records: DashMap::new(), order: Mutex::new(VecDeque::new()), capacity: capacity.max(1) }
    }

    pub fn insert(&self, record: GenotypeRecord) {
        let mut order = self.order.lock().expect("store lock is never poisoned");
        order.push_back(record.task_id.clone());
        self.records.insert(record.task_id.clone(), record);
        while order.len() > self.capacity {
            if let Some(oldest) = order.pop_front() {
                self.records.remove(&oldest);
            }
        }
    }

    pub fn get(&self, task_id: &str) -> Option<GenotypeRecord> {
        self.records.get(task_id).map(|r| r.clone())
    }

    /// Up to `limit` records, newest first.
    pub fn recent(&self, limit: usize) -> Vec<GenotypeRecord> {
        let order = self.order.lock().expect("store lock is never poisoned");
        order.iter().rev().filter_map(|id| self.get(id)).take(limit).collect()
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
    use crate::genotype::Genotype;

    fn record(id: &str) -> GenotypeRecord {
        let genotype = Genotype { normal: vec![], normal_concat: vec![2, 3, 4, 5], reduce: vec![], reduce_concat: vec![2, 3, 4, 5] };
        GenotypeRecord { task_id: id.into(), model: "m".into(), labels: vec![], n_way: 2, k_shot: 1, created_at: String::new(), genotype }
    }

    #[test]
    fn evicts_the_oldest_beyond_capacity() {
        let store = GenotypeStore::new(2);
        for id in ["a", "b", "c"] {
            store.insert(record(id));
        }
        assert!(store.get("a").is_none());
        assert_eq!(store.len(), 2);
        let recent: Vec<String> = store.recent(10).into_iter().map(|r| r.task_id).collect();
        assert_eq!(recent, vec!["c", "b"]);
        assert_eq!(store.recent(1).len(), 1);
    }
}
