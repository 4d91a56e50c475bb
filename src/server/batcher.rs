//! Which waiting adaptations run together: the worker's batch formation, apart from running them.
//!
//! Jobs here are plain numbers and a reply channel ([`Job`]); nothing in this module touches a
//! tensor or a device, so what forms a batch is tested on its own, without a model.

use super::compute::{TaskInput, TaskOutput};
use super::worker_error::WorkerError;
use crate::adapt::{Adaptation, PredictWith};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// One queued request.
pub struct Job {
    pub input: TaskInput,
    pub deadline: Instant,
    pub enqueued: Instant,
    pub reply: oneshot::Sender<Result<TaskOutput, WorkerError>>,
}

impl Job {
    /// Why this job should not start (or go on) at `now`, if so: its client went away, or its
    /// deadline has passed, so running it would spend the worker on an answer nobody receives.
    /// (Not dropped on an estimate: one too high would then drop every task of its shape, and with
    /// none run, no measurement would ever lower it.)
    pub fn unstartable(&self, now: Instant) -> Option<&'static str> {
        if self.reply.is_closed() {
            Some("cancelled")
        } else if now >= self.deadline {
            Some("expired")
        } else {
            None
        }
    }
}

/// What must match for tasks to run as one batch: their model, shapes and settings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BatchKey {
    model: String,
    n_way: usize,
    support_images: usize,
    query_values: usize,
    settings: Adaptation,
}

impl BatchKey {
    /// `None` when the task runs alone: its model cannot batch (`batches`: only supernets can,
    /// networks without θ run one task at a time), it predicts with the derived network, or its
    /// model is to be kept (a batch hands out only its logits and θ, not each task's weights).
    pub fn of(input: &TaskInput, batches: bool) -> Option<BatchKey> {
        let o = input.options;
        let joins = batches && o.predict_with == PredictWith::Supernet && !input.keep;
        joins.then(|| BatchKey {
            model: input.model.clone(),
            n_way: input.n_way,
            support_images: input.support_labels.len(),
            query_values: input.query.len(),
            // The supernet predicts: the derived network's fine-tuning steps play no part.
            settings: Adaptation {
                finetune_steps: 0,
                ..o
            },
        })
    }
}

/// What a batch is adapted as: `tasks` tasks (the batch, padded) with the same [`BatchKey`]; each
/// recorded adaptation is recorded for one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TaskShape {
    pub key: BatchKey,
    pub tasks: usize,
}

impl TaskShape {
    /// The shape `batch` tasks run as: with recorded adaptations, padded to a power of two (so a
    /// key needs at most five recordings at a `max_batch` of 16, not sixteen); else as they are.
    pub fn of(key: BatchKey, batch: usize, max_batch: usize, recording: bool) -> TaskShape {
        let tasks = match recording {
            true => batch.next_power_of_two().min(max_batch),
            false => batch,
        };
        TaskShape { key, tasks }
    }
}

/// The jobs taken off the queue and not yet started: the candidates for the next batch, in the
/// order they came.
#[derive(Default)]
pub struct Held {
    jobs: VecDeque<Job>,
}

impl Held {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn push(&mut self, job: Job) {
        self.jobs.push_back(job);
    }

    /// The job that came first.
    pub fn pop(&mut self) -> Option<Job> {
        self.jobs.pop_front()
    }

    /// `first` and the held jobs that can run with it as one batch, in the order they came, up
    /// to `max_batch`, with the key they share (`key_of`); `first` alone when its key is `None`.
    /// Every task of a batch is answered when the whole batch is done, so a job joins only if the
    /// batch, at `per_task` each, still ends before the earliest deadline among its tasks, this
    /// job's included; jobs that should not start stay held, for the worker to answer in turn.
    pub fn take_batch(
        &mut self,
        first: Job,
        key_of: impl Fn(&TaskInput) -> Option<BatchKey>,
        per_task: Duration,
        max_batch: usize,
        now: Instant,
    ) -> (Option<BatchKey>, Vec<Job>) {
        let key = key_of(&first.input);
        let mut earliest = first.deadline;
        let mut batch = vec![first];
        let Some(shared) = &key else {
            return (key, batch);
        };
        let mut index = 0;
        while batch.len() < max_batch && index < self.jobs.len() {
            let candidate = &self.jobs[index];
            let deadline = earliest.min(candidate.deadline);
            let in_time = now + per_task * (batch.len() as u32 + 1) <= deadline;
            if in_time
                && candidate.unstartable(now).is_none()
                && key_of(&candidate.input).as_ref() == Some(shared)
            {
                earliest = deadline;
                batch.push(self.jobs.remove(index).expect("index is in range"));
            } else {
                index += 1;
            }
        }
        (key, batch)
    }

    /// Every held job, oldest first, leaving none.
    pub fn drain(&mut self) -> impl Iterator<Item = Job> + '_ {
        self.jobs.drain(..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// A queued 5-way 1-shot task of `model` with `steps` steps, due `due` after `now`, and the
    /// receiver its answer would go to (dropping it cancels the job).
    fn job(
        model: &str,
        steps: usize,
        now: Instant,
        due: Duration,
    ) -> (Job, oneshot::Receiver<Result<TaskOutput, WorkerError>>) {
        let (reply, receiver) = oneshot::channel();
        let input = TaskInput {
            model: model.into(),
            support: vec![0.0; 5 * 4],
            support_labels: (0..5).collect(),
            n_way: 5,
            query: vec![0.0; 2 * 4],
            options: Adaptation {
                steps,
                lr_w: 0.1,
                lr_theta: 30.0,
                bn: crate::adapt::BnMode::Support,
                learned_rates: false,
                predict_with: PredictWith::Supernet,
                finetune_steps: 0,
                views: 1,
            },
            keep: false,
        };
        let job = Job {
            input,
            deadline: now + due,
            enqueued: now,
            reply,
        };
        (job, receiver)
    }

    fn supernet_key(input: &TaskInput) -> Option<BatchKey> {
        BatchKey::of(input, true)
    }

    /// Holds `jobs` and forms the batch of the first, as the worker does.
    fn batch_of_first(
        held: &mut Held,
        per_task: Duration,
        max_batch: usize,
        now: Instant,
    ) -> Vec<Job> {
        let first = held.pop().expect("a job is held");
        held.take_batch(first, supernet_key, per_task, max_batch, now)
            .1
    }

    fn steps(batch: &[Job]) -> Vec<usize> {
        batch.iter().map(|job| job.input.options.steps).collect()
    }

    #[test]
    fn same_shaped_tasks_batch_in_order_up_to_max_batch() {
        let now = Instant::now();
        let mut held = Held::default();
        let mut receivers = Vec::new();
        // Each job told apart by its deadline: 10 s plus its place in the queue, in ms.
        let due = |place: u64| 10 * SECOND + Duration::from_millis(place);
        for place in 0..5 {
            let (job, receiver) = job("a", 1, now, due(place));
            held.push(job);
            receivers.push(receiver);
        }
        let deadlines =
            |jobs: Vec<Job>| -> Vec<Instant> { jobs.iter().map(|j| j.deadline).collect() };
        let batch = batch_of_first(&mut held, Duration::from_millis(10), 3, now);
        assert_eq!(deadlines(batch), [0, 1, 2].map(|p| now + due(p)));
        let rest = deadlines(held.drain().collect());
        assert_eq!(
            rest,
            [3, 4].map(|p| now + due(p)),
            "the rest stay held, in order"
        );
    }

    #[test]
    fn other_models_and_settings_are_skipped_and_keep_their_place() {
        let now = Instant::now();
        let mut held = Held::default();
        let mut receivers = Vec::new();
        for (model, steps) in [("a", 1), ("b", 1), ("a", 2), ("a", 1)] {
            let (job, receiver) = job(model, steps, now, 10 * SECOND);
            held.push(job);
            receivers.push(receiver);
        }
        let batch = batch_of_first(&mut held, Duration::from_millis(10), 8, now);
        assert_eq!(steps(&batch), [1, 1]);
        assert!(batch.iter().all(|job| job.input.model == "a"));
        let left: Vec<(String, usize)> = held
            .drain()
            .map(|job| (job.input.model, job.input.options.steps))
            .collect();
        assert_eq!(left, [("b".to_string(), 1), ("a".to_string(), 2)]);
    }

    #[test]
    fn a_job_joins_only_if_the_batch_still_meets_every_deadline() {
        let now = Instant::now();
        let mut held = Held::default();
        let mut receivers = Vec::new();
        // 1 s a task: the first is due in 2.5 s, so a batch of two (2 s) fits and of three does not.
        for due in [2500, 10_000, 10_000] {
            let (job, receiver) = job("a", 1, now, Duration::from_millis(due));
            held.push(job);
            receivers.push(receiver);
        }
        assert_eq!(batch_of_first(&mut held, SECOND, 8, now).len(), 2);
        assert_eq!(held.len(), 1);

        // A candidate due sooner than the batch would end stays out, however early it came.
        let mut held = Held::default();
        for due in [10_000, 1500, 10_000] {
            let (job, receiver) = job("a", 1, now, Duration::from_millis(due));
            held.push(job);
            receivers.push(receiver);
        }
        let batch = batch_of_first(&mut held, SECOND, 8, now);
        assert_eq!(batch.len(), 2);
        assert!(batch.iter().all(|job| job.deadline == now + 10 * SECOND));
    }

    #[test]
    fn cancelled_and_expired_jobs_do_not_join() {
        let now = Instant::now();
        let mut held = Held::default();
        let (first, _first) = job("a", 1, now, 10 * SECOND);
        let (cancelled, receiver) = job("a", 1, now, 10 * SECOND);
        drop(receiver);
        let (expired, _expired) = job("a", 1, now, Duration::ZERO);
        let (fine, _fine) = job("a", 1, now, 10 * SECOND);
        for job in [first, cancelled, expired, fine] {
            held.push(job);
        }
        let batch = batch_of_first(&mut held, Duration::ZERO, 8, now);
        assert_eq!(batch.len(), 2);
        let reasons: Vec<_> = held.drain().map(|job| job.unstartable(now)).collect();
        assert_eq!(reasons, [Some("cancelled"), Some("expired")]);
    }

    #[test]
    fn kept_derived_and_unbatchable_tasks_run_alone() {
        let now = Instant::now();
        let (plain, _r) = job("a", 1, now, SECOND);
        assert!(BatchKey::of(&plain.input, true).is_some());
        assert_eq!(BatchKey::of(&plain.input, false), None, "no θ: alone");
        let (mut kept, _r) = job("a", 1, now, SECOND);
        kept.input.keep = true;
        assert_eq!(BatchKey::of(&kept.input, true), None);
        let (mut derived, _r) = job("a", 1, now, SECOND);
        derived.input.options.predict_with = PredictWith::Derived;
        assert_eq!(BatchKey::of(&derived.input, true), None);

        let mut held = Held::default();
        let (same, _r) = job("a", 1, now, 10 * SECOND);
        held.push(same);
        let (key, batch) = held.take_batch(kept, supernet_key, Duration::ZERO, 8, now);
        assert_eq!(key, None);
        assert_eq!(batch.len(), 1);
        assert_eq!(held.len(), 1);
    }

    /// Fine-tuning steps play no part in a supernet's batch; test-time views change its shapes.
    #[test]
    fn fine_tuning_steps_do_not_split_supernet_batches_and_views_do() {
        let now = Instant::now();
        let (a, _r) = job("a", 1, now, SECOND);
        let (mut b, _r) = job("a", 1, now, SECOND);
        b.input.options.finetune_steps = 7;
        assert_eq!(BatchKey::of(&a.input, true), BatchKey::of(&b.input, true));
        b.input.options.views = 5;
        assert_ne!(BatchKey::of(&a.input, true), BatchKey::of(&b.input, true));
    }

    #[test]
    fn recorded_batches_pad_to_a_power_of_two_within_max_batch() {
        let (job, _r) = job("a", 1, Instant::now(), SECOND);
        let key = BatchKey::of(&job.input, true).unwrap();
        let tasks = |batch, recording| TaskShape::of(key.clone(), batch, 16, recording).tasks;
        assert_eq!(
            [1, 2, 3, 5, 9, 16].map(|b| tasks(b, true)),
            [1, 2, 4, 8, 16, 16]
        );
        assert_eq!([1, 3, 5].map(|b| tasks(b, false)), [1, 3, 5]);
        assert_eq!(TaskShape::of(key, 12, 12, true).tasks, 12);
    }
}
