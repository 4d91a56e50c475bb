//! What the worker computes for a job: one task, or a batch of same-shaped tasks, adapted to
//! its support set and its queries predicted, on the worker's device. Plain numbers in
//! ([`TaskInput`]), plain numbers out ([`TaskOutput`]); the queue, batching and faults are
//! [`super::worker`]'s.

use super::api::AlphaWeights;
use super::recorded::RecordedAdaptations;
use super::store::kept_task::{KeptTask, TaskModelBytes};
use super::worker_error::WorkerError;
use crate::adapt::task_batch::{
    adapt_and_predict, side_by_side, task_mixings, BatchSource, BatchedSupport,
};
use crate::adapt::task_model::{TaskModel, SUPPORT_IMAGES};
use crate::adapt::{views, Adaptation, InnerLoop, PredictWith, SupportSet, TaskState};
use crate::model::checkpoint::{safetensors_bytes, sha256_hex, tensors_of_safetensors, Checkpoint};
use crate::model::metadata::ModelMeta;
use crate::nn::genotype::Genotype;
use crate::nn::network::Network;
use crate::nn::params::matrix_rows;
use crate::nn::supernet::{Alphas, MixingRows};
use std::hash::Hash;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Tensor};

/// A task in plain numbers: images already decoded and normalised (CHW, row-major).
#[derive(Debug)]
pub struct TaskInput {
    pub model: String,
    pub support: Vec<f32>,
    pub support_labels: Vec<i64>,
    pub n_way: usize,
    pub query: Vec<f32>,
    /// The model's defaults with the request's overrides.
    pub options: Adaptation,
    /// Hand the adapted task model back, to be kept for later predictions.
    pub keep: bool,
}

/// What the worker sends back.
#[derive(Debug)]
pub struct TaskOutput {
    pub genotype: Option<Genotype>,
    pub alphas: Option<AlphaWeights>,
    /// [n_query][n_way]
    pub logits: Vec<Vec<f32>>,
    pub queue_ms: f64,
    pub adapt_ms: f64,
    pub predict_ms: f64,
    /// Replayed from a recorded CUDA graph.
    pub cuda_graph: bool,
    /// The task model, when the input asked to keep it.
    pub task_model: Option<TaskModelBytes>,
}

/// `model`'s files as bytes the async side can keep: its `model.safetensors`
/// ([`TaskModel::weights`]) with their sha256, and the `support.safetensors` of its support images.
fn task_model_bytes(model: &TaskModel) -> Result<TaskModelBytes, WorkerError> {
    let weights = safetensors_bytes(&model.weights()).map_err(WorkerError::Failed)?;
    let support = safetensors_bytes(&[(
        SUPPORT_IMAGES.to_string(),
        model.support_images.shallow_clone(),
    )])
    .map_err(WorkerError::Failed)?;
    Ok(TaskModelBytes {
        sha256: sha256_hex(&weights),
        weights,
        support,
    })
}

/// The task model a kept task's files hold, on `device`.
fn load_task_model(task: &KeptTask, device: Device) -> Result<TaskModel, String> {
    let checkpoint = Checkpoint::from_bytes(task.meta.clone(), &task.weights, device)?;
    let support_images = tensors_of_safetensors(&task.support, device)?
        .into_iter()
        .find_map(|(name, t)| (name == SUPPORT_IMAGES).then_some(t))
        .ok_or_else(|| format!("support.safetensors holds no {SUPPORT_IMAGES}"))?;
    Ok(TaskModel::from_checkpoint(checkpoint, support_images))
}

/// Later queries for a kept task model.
#[derive(Debug)]
pub struct PredictInput {
    pub task: Arc<KeptTask>,
    /// Decoded and normalised query images (CHW, row-major, one after another).
    pub query: Vec<f32>,
}

/// What a prediction sends back.
#[derive(Debug)]
pub struct PredictOutput {
    /// [n_query][n_way]
    pub logits: Vec<Vec<f32>>,
    pub queue_ms: f64,
    /// Loading the kept weights onto the device.
    pub load_ms: f64,
    pub predict_ms: f64,
}

/// Classifies `input`'s queries with its kept task model: the weights onto the device, one
/// forward pass.
pub fn run_prediction(input: &PredictInput, device: Device) -> Result<PredictOutput, WorkerError> {
    let started = Instant::now();
    let task = &input.task;
    let model = load_task_model(task, device).map_err(WorkerError::Failed)?;
    let query = images(&input.query, &task.meta, device);
    let load_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let logits = matrix_rows(&model.predict(&query));
    if !logits.iter().flatten().all(|v| v.is_finite()) {
        return Err(WorkerError::Diverged);
    }
    Ok(PredictOutput {
        logits,
        queue_ms: 0.0,
        load_ms,
        predict_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// A model resident on the worker's device.
pub struct ResidentModel {
    pub network: Network,
    pub checkpoint: Checkpoint,
}

/// One full adaptation on blank images, so the first user request does not pay for lazy init.
pub fn warm_up(model: &ResidentModel, device: Device) {
    let meta = &model.checkpoint.meta;
    let n_way = match meta.head {
        crate::model::metadata::HeadSpec::Fixed { n_way } => n_way,
        crate::model::metadata::HeadSpec::Proto { .. } => 2,
    };
    let pixels = meta.input.channels * meta.input.size * meta.input.size;
    let input = TaskInput {
        model: meta.name.clone(),
        support: vec![0.5; n_way * pixels],
        support_labels: (0..n_way as i64).collect(),
        n_way,
        query: vec![0.5; pixels],
        keep: false,
        options: Adaptation {
            steps: 1,
            predict_with: PredictWith::Supernet,
            finetune_steps: 0,
            ..meta.adaptation
        },
    };
    run_task(model, &input, device, &|| true).expect("warm-up adaptation succeeds");
}

/// Images in plain numbers (CHW, row-major, one after another) as a tensor [N, C, S, S] on `device`.
fn images(values: &[f32], meta: &ModelMeta, device: Device) -> Tensor {
    let (c, s) = (meta.input.channels as i64, meta.input.size as i64);
    Tensor::from_slice(values)
        .view([-1, c, s, s])
        .to_device(device)
}

/// A task's numbers as tensors on the worker's device.
struct TaskTensors {
    /// [N, C, S, S], with the test-time views the task asked for ([`views::of_support`]).
    support: Tensor,
    /// [N] class indices.
    labels: Tensor,
    /// [N_q, C, S, S], as sent: their views are taken where they are predicted (by the task
    /// model, or side by side for a batch).
    query: Tensor,
}

impl TaskTensors {
    fn of(input: &TaskInput, meta: &ModelMeta, device: Device) -> TaskTensors {
        let (support, labels) = views::of_support(
            &images(&input.support, meta, device),
            &Tensor::from_slice(&input.support_labels).to_device(device),
            input.options.views,
        );
        TaskTensors {
            support,
            labels,
            query: images(&input.query, meta, device),
        }
    }
}

/// How long a task's answer took, and how it was computed.
#[derive(Clone, Copy)]
struct Timing {
    adapt_ms: f64,
    predict_ms: f64,
    cuda_graph: bool,
}

/// One task's answer from its architecture ([`architecture`]), query `logits` and `timing`;
/// an error if any of its numbers is not finite.
fn answer(
    (genotype, alphas): (Option<Genotype>, Option<AlphaWeights>),
    logits: Vec<Vec<f32>>,
    timing: Timing,
    task_model: Option<TaskModelBytes>,
) -> Result<TaskOutput, WorkerError> {
    finite(TaskOutput {
        genotype,
        alphas,
        logits,
        queue_ms: 0.0,
        adapt_ms: timing.adapt_ms,
        predict_ms: timing.predict_ms,
        cuda_graph: timing.cuda_graph,
        task_model,
    })
}

/// The architecture a response shows: the task's softmax(θ) when the model adapts θ, and the
/// genotype decoded from it (or, for a model without θ, the genotype it was built from, if any).
fn architecture(
    model: &ResidentModel,
    mixing: Option<MixingRows>,
) -> (Option<Genotype>, Option<AlphaWeights>) {
    let genotype = match (&model.network, &mixing) {
        (Network::Supernet(net), Some((normal, reduce))) => {
            Some(Genotype::decode(&net.space, normal, reduce))
        }
        _ => model.checkpoint.meta.genotype.clone(),
    };
    (
        genotype,
        mixing.map(|(normal, reduce)| AlphaWeights { normal, reduce }),
    )
}

/// Adapts one task and predicts its queries (T-NAS Algorithm 2 + decoding).
pub fn run_task(
    model: &ResidentModel,
    input: &TaskInput,
    device: Device,
    keep_going: &dyn Fn() -> bool,
) -> Result<TaskOutput, WorkerError> {
    let meta = &model.checkpoint.meta;
    let task = TaskTensors::of(input, meta, device);
    let support_set = SupportSet {
        images: &task.support,
        labels: &task.labels,
        n_way: input.n_way,
    };
    let o = input.options;
    let inner = InnerLoop::of(&o);
    let started = Instant::now();
    let network = &model.network;
    let (mut state, first_loss) = TaskState::start(
        network,
        &model.checkpoint.params,
        model.checkpoint.alphas.as_ref(),
        meta.head,
        &support_set,
        device,
    );
    state.rates = model.checkpoint.rates.clone().filter(|_| o.learned_rates);
    state
        .adapt(&support_set.on(network), &inner, first_loss, keep_going)
        .map_err(|i| WorkerError::DeadlinePassed {
            completed_steps: i.completed_steps,
        })?;
    let architecture = architecture(model, state.alphas.as_ref().map(Alphas::mixing_rows));
    let adapt_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let task_model = state
        .task_model(network, meta.head, &support_set, &o, keep_going)
        .map_err(|i| WorkerError::DeadlinePassed {
            completed_steps: o.steps + i.completed_steps,
        })?;
    let logits = matrix_rows(&task_model.predict(&task.query));
    let timing = Timing {
        adapt_ms,
        predict_ms: started.elapsed().as_secs_f64() * 1e3,
        cuda_graph: false,
    };
    let task_model = match input.keep && architecture.0.is_some() {
        true => Some(task_model_bytes(&task_model)?),
        false => None,
    };
    metrics::histogram!("tnas_adapt_seconds").record(adapt_ms / 1e3);
    answer(architecture, logits, timing, task_model)
}

/// Adapts same-shaped supernet tasks as one batch of `tasks` (the last task repeated to fill it)
/// and predicts their queries: by replaying the graph recorded for `shape` when there is one, else
/// eagerly.
pub fn run_batch<K: Clone + Eq + Hash + std::fmt::Debug>(
    model: &ResidentModel,
    inputs: &[&TaskInput],
    device: Device,
    keep_going: &dyn Fn() -> bool,
    tasks: usize,
    shape: &K,
    recorded: &mut RecordedAdaptations<K>,
) -> Vec<Result<TaskOutput, WorkerError>> {
    let Network::Supernet(net) = &model.network else {
        unreachable!("only supernet tasks batch")
    };
    let meta = &model.checkpoint.meta;
    let (n_way, o) = (inputs[0].n_way, inputs[0].options);
    let padding = std::iter::repeat_n(inputs[inputs.len() - 1], tasks - inputs.len());
    let tasks: Vec<TaskTensors> = inputs
        .iter()
        .copied()
        .chain(padding)
        .map(|input| TaskTensors::of(input, meta, device))
        .collect();
    let each = |part: fn(&TaskTensors) -> &Tensor| -> Vec<Tensor> {
        tasks.iter().map(|t| part(t).shallow_clone()).collect()
    };
    let support = BatchedSupport::new(&each(|t| &t.support), &each(|t| &t.labels), n_way);
    let query_views: Vec<Tensor> = tasks
        .iter()
        .map(|t| views::of_images(&t.query, o.views))
        .collect();
    let batch_inputs = [support.images, support.labels, side_by_side(&query_views)];
    let source = BatchSource {
        net,
        checkpoint: &model.checkpoint,
        rates: model.checkpoint.rates.as_ref().filter(|_| o.learned_rates),
    };
    let adapt = |tensors: &[Tensor], keep_going: &dyn Fn() -> bool| {
        adapt_and_predict(
            &source,
            tensors,
            n_way,
            &InnerLoop::of(&o),
            o.bn,
            keep_going,
        )
    };
    let started = Instant::now();
    if !keep_going() {
        return inputs
            .iter()
            .map(|_| Err(WorkerError::DeadlinePassed { completed_steps: 0 }))
            .collect();
    }
    let replayed = recorded.run(shape, &batch_inputs, |tensors| {
        adapt(tensors, &|| true).expect("recorded work is never interrupted")
    });
    let cuda_graph = replayed.is_some();
    let outputs = match replayed.map_or_else(|| adapt(&batch_inputs, keep_going), Ok) {
        Ok(outputs) => outputs,
        Err(interrupted) => {
            return inputs
                .iter()
                .map(|_| {
                    Err(WorkerError::DeadlinePassed {
                        completed_steps: interrupted.completed_steps,
                    })
                })
                .collect()
        }
    };
    let [logits, normal, reduce] = <[Tensor; 3]>::try_from(outputs).expect("three outputs");
    let mixings = task_mixings(&Alphas { normal, reduce }, tasks.len() as i64);
    let adapt_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    // [N_q, T, n_way] (its views merged) → one copy to the host, task-major rows.
    let logits = views::merged(&logits, o.views).transpose(0, 1);
    let queries = logits.size()[1] as usize;
    let rows = matrix_rows(&logits.reshape([-1, logits.size()[2]]));
    let timing = Timing {
        adapt_ms,
        predict_ms: started.elapsed().as_secs_f64() * 1e3,
        cuda_graph,
    };
    metrics::histogram!("tnas_adapt_seconds").record(adapt_ms / 1e3);
    mixings
        .into_iter()
        .zip(rows.chunks(queries))
        .take(inputs.len())
        .map(|(mixing, logits)| {
            answer(
                architecture(model, Some(mixing)),
                logits.to_vec(),
                timing,
                None,
            )
        })
        .collect()
}

/// `output`, unless its adaptation diverged: learning rates too large for the task drive θ or w
/// to infinity, and the logits and architecture weights that come out are NaN, not an answer.
fn finite(output: TaskOutput) -> Result<TaskOutput, WorkerError> {
    let architecture = output
        .alphas
        .iter()
        .flat_map(|a| a.normal.iter().chain(&a.reduce));
    match output
        .logits
        .iter()
        .chain(architecture)
        .flatten()
        .all(|v| v.is_finite())
    {
        true => Ok(output),
        false => Err(WorkerError::Diverged),
    }
}
