//! The compute worker: one OS thread per device that owns the models' tensors and runs
//! adaptations, fed by a bounded queue. The async side only sends a [`Job`] and awaits its reply.
//!
//! Queued supernet tasks of the same shape and settings run together, up to `max_batch` at a time,
//! as one pass over task-stacked weights ([`crate::adapt::task_batch`]): at few-shot sizes a step costs
//! kernel launches, so a batch costs little more than one task, and under load throughput grows
//! with the batch while each answer stays what the task alone would get.
//!
//! Which jobs run together is [`super::batcher`]'s; this module runs them and handles faults.
//!
//! On a GPU each task shape's batch is recorded once as a CUDA graph and replayed after that
//! ([`super::recorded`]); single tasks go that way too, as batches of one. Recorded batches are
//! padded to a power of two, repeating the last task (`TaskShape::of`).
//!
//! Backpressure is explicit: a full queue is refused at once (429). Each job carries its deadline
//! and reply channel, and the worker checks both between SGD steps, so a timed-out or abandoned
//! request stops burning compute; a job whose deadline has passed is dropped unstarted, and a job
//! joins a batch only if the batch can end before its deadline ([`super::admission`] measures
//! what tasks cost). A panic inside a job (a libtorch error, out of memory) fails that job only
//! and the thread keeps serving, unless the device itself no longer works: then the worker stops,
//! `/readyz` says why, and every waiting job is refused.
//!
//! Predictions for kept task models ([`PredictJob`]) come on a queue of their own, and the worker
//! takes turns: one waiting prediction, then one adaptation or batch. A prediction is one forward
//! pass, a fraction of an adaptation, so it need not wait behind every adaptation queued (it
//! waits for the predictions ahead of it and one adaptation each); and however many predictions
//! wait, adaptations keep at least every other turn, so clients predicting back to back cannot
//! starve them. With no adaptation waiting, predictions run back to back. Predictions of different
//! tasks have different weights, so they do not batch with each other or with adaptations.

use super::admission::{Admission, CostKey};
use super::batcher::{BatchKey, Held, TaskShape};
use super::compute::{
    run_batch, run_prediction, run_task, warm_up, PredictInput, PredictOutput, ResidentModel,
    TaskInput, TaskOutput,
};
use super::recorded::RecordedAdaptations;
use super::worker_error::WorkerError;
use crate::model::checkpoint::Checkpoint;
use crate::nn::learned_rates::LearnedRates;
use crate::runtime::panics::caught;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use tokio::sync::{mpsc, oneshot, watch};

pub use super::batcher::Job;

/// One queued prediction for a kept task model.
pub struct PredictJob {
    pub input: PredictInput,
    pub deadline: Instant,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<PredictOutput, WorkerError>>,
}

/// What the worker takes next.
enum Next {
    Predict(PredictJob),
    Adapt(Job),
}

/// Worker readiness, published on a watch channel (`/readyz`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Loading,
    Ready,
    Failed(WorkerFault),
}

/// Why the worker stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerFault {
    /// What happened, in words a client can act on: what responses say.
    pub summary: &'static str,
    /// The error as raised, often libtorch's text with C++ stack frames: for the log and the
    /// operator, never for a response.
    pub detail: String,
}

impl WorkerFault {
    fn warm_up(detail: String) -> WorkerFault {
        WorkerFault {
            summary: "a model failed its warm-up adaptation on the device, so none is served",
            detail,
        }
    }

    fn device(detail: String) -> WorkerFault {
        WorkerFault {
            summary: "the device stopped working after an adaptation failed on it",
            detail,
        }
    }
}

/// Handle to the worker thread; dropping it closes the queue and joins the thread.
pub struct Worker {
    sender: Option<mpsc::Sender<Job>>,
    /// Predictions, served before the adaptations waiting (at most `queue_depth` of them wait).
    predictions: Option<mpsc::Sender<PredictJob>>,
    /// Jobs submitted and not yet started: in the channel or held by the worker while it forms a
    /// batch. `queue_depth` bounds this count, so holding jobs back to batch them admits no more.
    waiting: Arc<AtomicUsize>,
    queue_depth: usize,
    /// What the jobs waiting and running will cost, from what recent ones did.
    admission: Arc<Admission>,
    readiness: watch::Receiver<Readiness>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub device: Device,
}

impl Worker {
    /// Starts the thread: moves the checkpoints to `device`, runs one warm-up adaptation per model,
    /// then serves jobs. `queue_depth` bounds the jobs waiting; up to `max_batch` run together; on
    /// a GPU up to `cuda_graphs` task shapes are kept as recorded graphs.
    pub fn spawn(
        checkpoints: Vec<Checkpoint>,
        device: Device,
        queue_depth: usize,
        max_batch: usize,
        threads: i32,
        cuda_graphs: usize,
    ) -> Worker {
        let queue_depth = queue_depth.max(1);
        let (sender, receiver) = mpsc::channel(queue_depth);
        let (predictions, prediction_receiver) = mpsc::channel(queue_depth);
        let waiting = Arc::new(AtomicUsize::new(0));
        let (ready_tx, readiness) = watch::channel(Readiness::Loading);
        let worker_waiting = Arc::clone(&waiting);
        let admission = Arc::new(Admission::default());
        let worker_admission = Arc::clone(&admission);
        let thread = std::thread::Builder::new()
            .name(format!(
                "tnas-worker-{}",
                crate::runtime::device::device_name(device)
            ))
            .spawn(move || {
                if threads > 0 {
                    tch::set_num_threads(threads);
                }
                let mut receiver = receiver;
                let queue = Queue {
                    waiting: &worker_waiting,
                    admission: &worker_admission,
                    predictions: std::cell::RefCell::new(prediction_receiver),
                    waiter: tokio::runtime::Builder::new_current_thread()
                        .build()
                        .expect("a current-thread runtime starts"),
                };
                let models = match caught(|| load_and_warm_up(checkpoints, device)) {
                    Ok(models) => models,
                    Err(message) => {
                        return stop_serving(
                            &ready_tx,
                            WorkerFault::warm_up(message),
                            &mut receiver,
                            Held::default(),
                            &queue,
                        )
                    }
                };
                let _ = ready_tx.send(Readiness::Ready);
                let recorded =
                    RecordedAdaptations::new(if device.is_cuda() { cuda_graphs } else { 0 });
                if let Err((fault, held)) = serve(
                    models,
                    &mut receiver,
                    &queue,
                    device,
                    max_batch.max(1),
                    recorded,
                ) {
                    stop_serving(
                        &ready_tx,
                        WorkerFault::device(fault),
                        &mut receiver,
                        held,
                        &queue,
                    );
                }
            })
            .expect("the OS can start a thread");
        Worker {
            sender: Some(sender),
            predictions: Some(predictions),
            waiting,
            queue_depth,
            admission,
            readiness,
            thread: Some(thread),
            device,
        }
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness.borrow().clone()
    }

    /// Queues a job without waiting; a full queue is an immediate [`WorkerError::QueueFull`].
    pub fn submit(&self, job: Job) -> Result<(), WorkerError> {
        let sender = self.sender.as_ref().ok_or(WorkerError::Stopped)?;
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.queue_depth {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(WorkerError::QueueFull);
        }
        match sender.try_send(job) {
            Ok(()) => {
                metrics::gauge!("tnas_queue_depth").increment(1.0);
                Ok(())
            }
            Err(error) => {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                Err(match error {
                    mpsc::error::TrySendError::Full(_) => WorkerError::QueueFull,
                    mpsc::error::TrySendError::Closed(_) => WorkerError::Stopped,
                })
            }
        }
    }

    /// Queues a prediction without waiting; a full prediction queue is an immediate
    /// [`WorkerError::QueueFull`].
    pub fn submit_prediction(&self, job: PredictJob) -> Result<(), WorkerError> {
        let sender = self.predictions.as_ref().ok_or(WorkerError::Stopped)?;
        sender.try_send(job).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => WorkerError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => WorkerError::Stopped,
        })
    }

    /// Jobs submitted and not yet started.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Measured costs and the work ahead of a new job, to refuse jobs that would miss their deadline.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.sender.take();
        self.predictions.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn load_and_warm_up(
    checkpoints: Vec<Checkpoint>,
    device: Device,
) -> HashMap<String, ResidentModel> {
    checkpoints
        .into_iter()
        .map(|c| {
            let checkpoint = Checkpoint {
                params: c.params.map(|_, t| t.to_device(device)),
                alphas: c.alphas.map(|a| a.map(|t| t.to_device(device))),
                rates: c.rates.map(|r| LearnedRates {
                    w: r.w.to_device(device),
                    theta: r.theta.to_device(device),
                }),
                meta: c.meta,
            };
            let model = ResidentModel {
                network: checkpoint.network(),
                checkpoint,
            };
            warm_up(&model, device);
            (model.checkpoint.meta.name.clone(), model)
        })
        .collect()
}

/// Takes jobs off the queue, in batches where they share a shape, until the queue closes; or,
/// after a fault that leaves the device unable to run anything, returns the fault and the jobs
/// held back unstarted.
fn serve(
    models: HashMap<String, ResidentModel>,
    receiver: &mut mpsc::Receiver<Job>,
    queue: &Queue,
    device: Device,
    max_batch: usize,
    mut recorded: RecordedAdaptations<TaskShape>,
) -> Result<(), (String, Held)> {
    // Jobs taken off the channel but not started: the candidates for the next batch.
    let mut held = Held::default();
    loop {
        let waiting_prediction = queue.predictions.borrow_mut().try_recv();
        if let Ok(job) = waiting_prediction {
            if let Some(fault) = lasting(predict(job, device), device) {
                return Err((fault, held));
            }
        }
        if held.is_empty() {
            match queue.next(receiver) {
                Some(Next::Adapt(job)) => held.push(job),
                Some(Next::Predict(job)) => match lasting(predict(job, device), device) {
                    Some(fault) => return Err((fault, held)),
                    None => continue,
                },
                None => return Ok(()),
            }
        }
        while held.len() < max_batch {
            match receiver.try_recv() {
                Ok(job) => held.push(job),
                Err(_) => break,
            }
        }
        let first = held.pop().expect("a job is held");
        queue.leaves(&first);
        if let Some(outcome) = first.unstartable(Instant::now()) {
            count_job(outcome);
            let _ = first
                .reply
                .send(Err(WorkerError::DeadlinePassed { completed_steps: 0 }));
            continue;
        }
        let Some(model) = models.get(&first.input.model) else {
            let _ = first.reply.send(Err(WorkerError::Failed(format!(
                "model {} is not resident",
                first.input.model
            ))));
            continue;
        };
        let batches = model.network.has_alphas();
        let per_task = queue
            .admission
            .cost(&CostKey::of(&first.input))
            .unwrap_or_default();
        let (key, batch) = held.take_batch(
            first,
            |input| BatchKey::of(input, batches),
            per_task,
            max_batch,
            Instant::now(),
        );
        for joined in &batch[1..] {
            queue.leaves(joined);
        }
        metrics::histogram!("tnas_batch_size").record(batch.len() as f64);
        let costs: Vec<CostKey> = batch.iter().map(|job| CostKey::of(&job.input)).collect();
        queue.admission.started(&costs);
        let started = Instant::now();
        let alone = |job: &Job| {
            let keep_going = || job.unstartable(Instant::now()).is_none();
            caught(|| run_task(model, &job.input, device, &keep_going))
                .unwrap_or_else(|message| Err(WorkerError::raised(message)))
        };
        // A batch that fails runs again task by task, so a faulty task fails alone.
        let results = match key {
            Some(key) if batch.len() > 1 || recorded.is_on() => {
                let inputs: Vec<&TaskInput> = batch.iter().map(|job| &job.input).collect();
                let keep_going = || {
                    let now = Instant::now();
                    batch.iter().any(|job| job.unstartable(now).is_none())
                };
                let shape = TaskShape::of(key, batch.len(), max_batch, recorded.is_on());
                caught(|| {
                    run_batch(
                        model,
                        &inputs,
                        device,
                        &keep_going,
                        shape.tasks,
                        &shape,
                        &mut recorded,
                    )
                })
                .unwrap_or_else(|_| batch.iter().map(alone).collect())
            }
            _ => batch.iter().map(alone).collect(),
        };
        queue
            .admission
            .finished(&costs, started.elapsed(), results.iter().all(Result::is_ok));
        let fault = results.iter().find_map(WorkerError::fault_of);
        for (job, result) in batch.into_iter().zip(results) {
            reply(job, result, started);
        }
        if let Some(fault) = lasting(fault, device) {
            return Err((fault, held));
        }
    }
}

/// A job's `fault`, kept only when it outlasted the job: the device no longer runs anything.
fn lasting(fault: Option<String>, device: Device) -> Option<String> {
    fault.filter(|_| !device_works(device))
}

/// Whether `device` still runs work after a job failed on it. Most faults are the job's own, but
/// some (an illegal memory access on a GPU) poison the device's context for good, and then no
/// later job can succeed: the worker must say so on `/readyz` instead of failing every request.
fn device_works(device: Device) -> bool {
    caught(|| (Tensor::ones([1], (Kind::Float, device)) + 1.0).double_value(&[]) == 2.0)
        .unwrap_or(false)
}

/// Logs why the worker stopped and publishes it (`/readyz` answers 503 with its summary) and refuses every job still
/// waiting, held back or queued, so each request hears at once that there is no worker.
fn stop_serving(
    ready: &watch::Sender<Readiness>,
    fault: WorkerFault,
    receiver: &mut mpsc::Receiver<Job>,
    mut held: Held,
    queue: &Queue,
) {
    tracing::error!(summary = fault.summary, detail = %fault.detail, "the compute worker stopped; /readyz reports it");
    let _ = ready.send(Readiness::Failed(fault));
    receiver.close();
    let queued = std::iter::from_fn(|| receiver.blocking_recv());
    for job in held.drain().chain(queued) {
        queue.leaves(&job);
        count_job("refused");
        let _ = job.reply.send(Err(WorkerError::Stopped));
    }
}

/// The worker's side of the queue's bookkeeping: the count that bounds it, and the ledger of
/// costs that admission reads.
struct Queue<'a> {
    waiting: &'a AtomicUsize,
    admission: &'a Admission,
    predictions: std::cell::RefCell<mpsc::Receiver<PredictJob>>,
    /// Waits on both queues at once ([`Queue::next`]); it runs nothing else.
    waiter: tokio::runtime::Runtime,
}

impl Queue<'_> {
    /// Waits for the next job of either queue, an adaptation first when both have one (the turn
    /// of a waiting prediction comes at the top of the loop); `None` once the adaptation queue is
    /// closed.
    fn next(&self, adaptations: &mut mpsc::Receiver<Job>) -> Option<Next> {
        let mut predictions = self.predictions.borrow_mut();
        let waiting = async {
            tokio::select! {
                biased;
                job = adaptations.recv() => job.map(Next::Adapt),
                Some(job) = predictions.recv() => Some(Next::Predict(job)),
            }
        };
        self.waiter.block_on(waiting)
    }

    /// Bookkeeping when a job stops waiting: it starts, or is dropped unstarted.
    fn leaves(&self, job: &Job) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.admission.dequeued(&CostKey::of(&job.input));
        metrics::gauge!("tnas_queue_depth").decrement(1.0);
        metrics::histogram!("tnas_queue_wait_seconds").record(job.enqueued.elapsed().as_secs_f64());
    }
}

/// Sends a job's answer, with its time in the queue until the worker `started` it, and counts the
/// outcome.
fn reply(job: Job, result: Result<TaskOutput, WorkerError>, started: Instant) {
    let queue_ms = started.duration_since(job.enqueued).as_secs_f64() * 1e3;
    let result = result
        .map_err(|e| match e {
            WorkerError::DeadlinePassed { .. } if job.reply.is_closed() => WorkerError::Cancelled,
            other => other,
        })
        .map(|mut out| {
            out.queue_ms = queue_ms;
            out
        });
    count_job(match &result {
        Ok(_) => "completed",
        Err(WorkerError::Cancelled) => "cancelled",
        Err(WorkerError::DeadlinePassed { .. }) => "deadline",
        Err(error) => {
            tracing::error!(%error, "an adaptation failed inside the worker; the worker goes on");
            "failed"
        }
    });
    let _ = job.reply.send(result);
}

/// Runs one prediction, unless its client has gone or its deadline has passed, and answers it;
/// returns the fault when it failed on our side, for the worker to check the device.
fn predict(job: PredictJob, device: Device) -> Option<String> {
    let started = Instant::now();
    if job.reply.is_closed() || started >= job.deadline {
        let _ = job
            .reply
            .send(Err(WorkerError::DeadlinePassed { completed_steps: 0 }));
        return None;
    }
    let result = caught(|| run_prediction(&job.input, device))
        .unwrap_or_else(|message| Err(WorkerError::raised(message)))
        .map(|mut out| {
            out.queue_ms = started.duration_since(job.enqueued).as_secs_f64() * 1e3;
            out
        });
    if let Err(error) = &result {
        tracing::error!(%error, "a prediction failed inside the worker; the worker goes on");
    }
    metrics::histogram!("tnas_predict_seconds").record(started.elapsed().as_secs_f64());
    let fault = WorkerError::fault_of(&result);
    let _ = job.reply.send(result);
    fault
}

/// `tnas_jobs_total{outcome}`: what became of each job the worker took off the queue.
fn count_job(outcome: &'static str) {
    metrics::counter!("tnas_jobs_total", "outcome" => outcome).increment(1);
}
