//! `KeptTask`: a task model as it is kept after `/adapt`, the bytes of its model folder, not
//! tensors: the async side holds no tensors, a download is those bytes as they are, and a
//! prediction loads them onto the worker's device (for a few-shot model, a copy of about a
//! megabyte; the forward pass costs more).

use crate::adapt::task_model::{task_model_kind, task_model_meta};
use crate::adapt::Adaptation;
use crate::model::metadata::{ModelMeta, TaskOrigin};
use crate::nn::genotype::Genotype;

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

    /// Its `model.json`, as a download or a shared store holds it.
    pub fn model_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.meta).expect("model metadata serialises")
    }

    /// What keeping it costs: its tensors' bytes and its `model.json`.
    pub fn bytes(&self) -> usize {
        self.bytes_with(&self.model_json())
    }

    /// [`KeptTask::bytes`], given its `model.json` already serialised.
    pub fn bytes_with(&self, model_json: &[u8]) -> usize {
        self.weights.len() + self.support.len() + model_json.len()
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
