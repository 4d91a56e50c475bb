//! `TaskModelStore`: the task models kept after `/adapt`, for `POST /tasks/{task_id}/predict`
//! and `GET /tasks/{task_id}/model`, bounded in bytes (`--task-store-bytes`), the least recently
//! used evicted first.
//!
//! Each is kept as the bytes of its model folder ([`KeptTask`]), not as tensors: the async side
//! holds no tensors, a download is those bytes as they are, and a prediction loads them onto the
//! worker's device (for a few-shot model, a copy of about a megabyte; the forward pass costs more).
//! One mutex guards the map and the use order: every operation is a few map updates.

use crate::adapt::task_model::{task_model_kind, task_model_meta};
use crate::adapt::Adaptation;
use crate::model::metadata::{ModelMeta, TaskOrigin};
use crate::nn::genotype::Genotype;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// A kept task model: its `model.json`, `model.safetensors` and `support.safetensors`.
#[derive(Debug)]
pub struct KeptTask {
    pub meta: ModelMeta,
    pub weights: Vec<u8>,
    pub support: Vec<u8>,
}

impl KeptTask {
    /// The model kept for a task adapted from `source` with `options`: the worker's `bytes`, and
    /// the `model.json` that describes them ([`task_model_meta`]). `genotype` is the one the
    /// response carries.
    pub fn new(
        source: &ModelMeta,
        origin: TaskOrigin,
        options: &Adaptation,
        genotype: Option<Genotype>,
        bytes: TaskModelBytes,
    ) -> KeptTask {
        let kind = task_model_kind(source.kind, options.predict_with).unwrap_or(source.kind);
        KeptTask {
            meta: task_model_meta(source, kind, genotype, options, origin, bytes.sha256),
            weights: bytes.weights,
            support: bytes.support,
        }
    }

    /// The task's id.
    pub fn task_id(&self) -> &str {
        self.meta.task.as_ref().map_or("", |t| t.task_id.as_str())
    }

    /// What keeping it costs: its tensors' bytes and its `model.json`.
    pub fn bytes(&self) -> usize {
        let json = serde_json::to_vec(&self.meta).map_or(0, |j| j.len());
        self.weights.len() + self.support.len() + json
    }
}

/// A task model's files as the worker hands them out: `model.safetensors` with its sha256, and
/// `support.safetensors`.
#[derive(Debug)]
pub struct TaskModelBytes {
    pub weights: Vec<u8>,
    pub sha256: String,
    pub support: Vec<u8>,
}

/// Why a task model was not kept.
#[derive(Debug, thiserror::Error)]
#[error("the task model is {size} bytes, over --task-store-bytes {max_bytes}")]
pub struct TooLarge {
    pub size: usize,
    pub max_bytes: usize,
}

pub struct TaskModelStore {
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

impl TaskModelStore {
    pub fn new(max_bytes: usize) -> Self {
        TaskModelStore {
            lru: Mutex::new(Lru::default()),
            max_bytes,
        }
    }

    /// Keeps `task`, evicting the least recently used until the bytes fit. A model larger than
    /// the whole budget is not kept, rather than emptying the store for it.
    pub fn insert(&self, task: KeptTask) -> Result<(), TooLarge> {
        let size = task.bytes();
        if size > self.max_bytes {
            return Err(TooLarge {
                size,
                max_bytes: self.max_bytes,
            });
        }
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
        let found = self
            .lru
            .lock()
            .expect("task store lock is never poisoned")
            .touch(task_id);
        let outcome = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!("tnas_task_store_lookups_total", "outcome" => outcome).increment(1);
        found
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
        let store = TaskModelStore::new(3 * size + size / 2);
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
        let store = TaskModelStore::new(task("a", 1000).bytes() * 2);
        store.insert(task("a", 1000)).unwrap();
        let refused = store.insert(task("huge", 100_000)).unwrap_err();
        assert!(refused.size > refused.max_bytes);
        assert!(store.get("huge").is_none());
        assert!(store.get("a").is_some());
    }

    #[test]
    fn keeping_a_task_again_replaces_it_without_counting_it_twice() {
        let store = TaskModelStore::new(usize::MAX);
        store.insert(task("a", 1000)).unwrap();
        let once = store.bytes();
        store.insert(task("a", 1000)).unwrap();
        assert_eq!((store.len(), store.bytes()), (1, once));
    }
}
