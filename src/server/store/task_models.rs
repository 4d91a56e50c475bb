//! `TaskModelStore`: the task models kept after `/adapt`, for `POST /tasks/{task_id}/predict`
//! and `GET /tasks/{task_id}/model`, bounded in bytes (`--task-store-bytes`), the least recently
//! used evicted first: in this process ([`MemoryTaskModels`]), or, beside the genotypes in Redis
//! (`--store redis://…`), for every replica ([`RedisStore`]), so that any replica serves a task
//! another adapted.
//!
//! Each is kept as the bytes of its model folder ([`KeptTask`]). In memory, one mutex guards the
//! map and the use order: every operation is a few map updates.

use super::kept_task::KeptTask;
use super::redis_store::RedisStore;
use super::{counted, GenotypeStore, StoreError};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// Why a task model was not kept.
#[derive(Debug, thiserror::Error)]
pub enum NotKept {
    #[error("the task model is {size} bytes, over --task-store-bytes {max_bytes}")]
    TooLarge { size: usize, max_bytes: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where task models are kept: beside the genotypes ([`TaskModelStore::beside`]).
pub enum TaskModelStore {
    Memory(MemoryTaskModels),
    Redis {
        redis: Arc<RedisStore>,
        max_bytes: usize,
    },
}

impl TaskModelStore {
    /// Task models kept where `genotypes` are, within `max_bytes` (for all replicas together, in
    /// Redis).
    pub fn beside(genotypes: &GenotypeStore, max_bytes: usize) -> TaskModelStore {
        match genotypes {
            GenotypeStore::Memory(_) => TaskModelStore::Memory(MemoryTaskModels::new(max_bytes)),
            GenotypeStore::Redis(redis) => TaskModelStore::Redis {
                redis: Arc::clone(redis),
                max_bytes,
            },
        }
    }

    /// Keeps `task`, evicting the least recently used until the bytes fit. A model larger than
    /// the whole budget is not kept, rather than emptying the store for it.
    pub async fn insert(&self, task: KeptTask) -> Result<(), NotKept> {
        match self {
            TaskModelStore::Memory(store) => store.insert(task),
            TaskModelStore::Redis { redis, max_bytes } => {
                let model_json = task.model_json();
                within(task.bytes_with(&model_json), *max_bytes)?;
                let kept = redis.keep_task_model(&task, &model_json, *max_bytes).await;
                let (evicted, bytes, models) = counted("keep_task_model", kept)?;
                metrics::counter!("tnas_task_store_evictions_total").increment(evicted as u64);
                metrics::gauge!("tnas_task_store_bytes").set(bytes as f64);
                metrics::gauge!("tnas_task_store_models").set(models as f64);
                Ok(())
            }
        }
    }

    /// The kept model of `task_id`, now the most recently used.
    pub async fn get(&self, task_id: &str) -> Result<Option<Arc<KeptTask>>, StoreError> {
        let found = match self {
            TaskModelStore::Memory(store) => store.get(task_id),
            TaskModelStore::Redis { redis, .. } => {
                counted("task_model", redis.task_model(task_id).await)?.map(Arc::new)
            }
        };
        let outcome = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!("tnas_task_store_lookups_total", "outcome" => outcome).increment(1);
        Ok(found)
    }
}

/// A task model's `size`, if it fits `max_bytes` at all.
fn within(size: usize, max_bytes: usize) -> Result<usize, NotKept> {
    match size {
        size if size > max_bytes => Err(NotKept::TooLarge { size, max_bytes }),
        size => Ok(size),
    }
}

/// Task models kept in this process.
pub struct MemoryTaskModels {
    lru: Mutex<Lru>,
    max_bytes: usize,
}

/// The kept models by task id, each with its last use, and the ids by last use.
#[derive(Default)]
struct Lru {
    tasks: HashMap<String, (Arc<KeptTask>, u64, usize)>,
    by_use: BTreeMap<u64, String>,
    clock: u64,
    bytes: usize,
}

impl Lru {
    fn touch(&mut self, task_id: &str) -> Option<Arc<KeptTask>> {
        self.clock += 1;
        let (task, used, _) = self.tasks.get_mut(task_id)?;
        self.by_use.remove(used);
        *used = self.clock;
        self.by_use.insert(self.clock, task_id.to_string());
        Some(Arc::clone(task))
    }
}

impl MemoryTaskModels {
    pub fn new(max_bytes: usize) -> Self {
        MemoryTaskModels {
            lru: Mutex::new(Lru::default()),
            max_bytes,
        }
    }

    /// [`TaskModelStore::insert`] in this process.
    pub fn insert(&self, task: KeptTask) -> Result<(), NotKept> {
        let size = within(task.bytes(), self.max_bytes)?;
        let mut lru = self.lru.lock().expect("task store lock is never poisoned");
        let id = task.task_id().to_string();
        lru.clock += 1;
        let used = lru.clock;
        if let Some((_, old_use, old_size)) =
            lru.tasks.insert(id.clone(), (Arc::new(task), used, size))
        {
            lru.by_use.remove(&old_use);
            lru.bytes -= old_size;
        }
        lru.by_use.insert(used, id);
        lru.bytes += size;
        while lru.bytes > self.max_bytes {
            let Some((_, oldest)) = lru.by_use.pop_first() else {
                break;
            };
            if let Some((_, _, size)) = lru.tasks.remove(&oldest) {
                lru.bytes -= size;
                metrics::counter!("tnas_task_store_evictions_total").increment(1);
            }
        }
        metrics::gauge!("tnas_task_store_bytes").set(lru.bytes as f64);
        metrics::gauge!("tnas_task_store_models").set(lru.tasks.len() as f64);
        Ok(())
    }

    /// The kept model of `task_id`, now the most recently used.
    pub fn get(&self, task_id: &str) -> Option<Arc<KeptTask>> {
        self.lru
            .lock()
            .expect("task store lock is never poisoned")
            .touch(task_id)
    }

    /// The bytes the kept models take.
    pub fn bytes(&self) -> usize {
        self.lru
            .lock()
            .expect("task store lock is never poisoned")
            .bytes
    }

    pub fn len(&self) -> usize {
        self.lru
            .lock()
            .expect("task store lock is never poisoned")
            .tasks
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::metadata::{ModelMeta, TaskOrigin};

    fn task(id: &str, bytes: usize) -> KeptTask {
        let mut meta: ModelMeta =
            serde_json::from_str(include_str!("../../../models/omniglot-tnas/model.json"))
                .expect("the shipped model.json parses");
        meta.task = Some(TaskOrigin {
            task_id: id.into(),
            adapted_from: meta.name.clone(),
            adapted_from_sha256: meta.sha256.clone(),
            labels: vec!["a".into(), "b".into()],
        });
        KeptTask {
            meta,
            weights: vec![0; bytes],
            support: Vec::new(),
        }
    }

    #[test]
    fn evicts_the_least_recently_used_and_stays_within_its_bytes() {
        let size = task("a", 10_000).bytes();
        let store = MemoryTaskModels::new(3 * size + size / 2);
        for id in ["a", "b", "c"] {
            store.insert(task(id, 10_000)).unwrap();
        }
        assert!(store.get("a").is_some(), "a is now the most recently used");
        store.insert(task("d", 10_000)).unwrap();
        assert!(
            store.get("b").is_none(),
            "b, the least recently used, went first"
        );
        for id in ["a", "c", "d"] {
            assert!(store.get(id).is_some(), "{id} kept");
        }
        assert_eq!(store.len(), 3);
        assert!(store.bytes() <= 3 * size + size / 2);

        store.insert(task("big", 25_000)).unwrap();
        assert!(store.bytes() <= 3 * size + size / 2, "{}", store.bytes());
        assert!(store.get("big").is_some());
        assert!(
            store.get("a").is_none() && store.get("c").is_none(),
            "the two oldest made room"
        );
    }

    #[test]
    fn a_model_over_the_whole_budget_is_not_kept_and_evicts_nothing() {
        let store = MemoryTaskModels::new(task("a", 1000).bytes() * 2);
        store.insert(task("a", 1000)).unwrap();
        let refused = store.insert(task("huge", 100_000)).unwrap_err();
        assert!(
            matches!(refused, NotKept::TooLarge { size, max_bytes } if size > max_bytes),
            "{refused}"
        );
        assert!(store.get("huge").is_none());
        assert!(store.get("a").is_some());
    }

    #[test]
    fn keeping_a_task_again_replaces_it_without_counting_it_twice() {
        let store = MemoryTaskModels::new(usize::MAX);
        store.insert(task("a", 1000)).unwrap();
        let once = store.bytes();
        store.insert(task("a", 1000)).unwrap();
        assert_eq!((store.len(), store.bytes()), (1, once));
    }
}
