//! `Admission`: whether a task can be answered before its deadline, from the work queued ahead of
//! it and what recent tasks of its shape cost. Under sustained overload, a queue that admits work
//! it cannot finish in time spends the worker on answers nobody will receive (504s after the whole
//! timeout); refusing that work at once (429 with the wait it would have had as `Retry-After`)
//! keeps the worker on tasks that still have time, so goodput stays near capacity.
//!
//! Costs are measured on the worker: each finished batch's wall time, divided among its tasks, is
//! folded into a moving average per task shape, and into a per-model rate per unit of work
//! (images × passes) that prices shapes not seen yet. Nothing is estimated before the first task
//! of a model finishes: until then every task is admitted.

use super::compute::TaskInput;
use crate::adapt::{Adaptation, PredictWith};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a task's cost depends on: its model, sizes, steps, prediction mode and test-time views (not its pixels:
/// images are resized to the model's input before they reach the worker).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CostKey {
    pub model: String,
    pub n_way: usize,
    pub support_images: usize,
    pub query_images: usize,
    pub steps: usize,
    pub finetune_steps: usize,
    pub derived: bool,
    /// Test-time views: each image is forwarded this many times.
    pub views: usize,
}

impl CostKey {
    /// The key of a task of `model` with these classes, images and options.
    pub fn new(
        model: &str,
        n_way: usize,
        support_images: usize,
        query_images: usize,
        options: &Adaptation,
    ) -> CostKey {
        CostKey {
            model: model.to_string(),
            n_way,
            support_images,
            query_images,
            steps: options.steps,
            finetune_steps: options.finetune_steps,
            derived: options.predict_with == PredictWith::Derived,
            views: options.views,
        }
    }

    /// The key of a task the worker holds (its images counted from its values).
    pub fn of(input: &TaskInput) -> CostKey {
        let support_images = input.support_labels.len();
        let values_per_image = (input.support.len() / support_images.max(1)).max(1);
        CostKey::new(
            &input.model,
            input.n_way,
            support_images,
            input.query.len() / values_per_image,
            &input.options,
        )
    }

    /// Images × passes over them: the work a task's cost grows with, to price unseen shapes.
    fn units(&self) -> f64 {
        let images = self.views * (self.support_images + self.query_images);
        ((self.steps + self.finetune_steps + 1) * images) as f64
    }
}

/// The share of a task's remaining time that the estimated wait and cost may fill: estimates are
/// of the recent past, and a task admitted on a too hopeful one ends as a 504 after all. Under
/// sustained load this costs no throughput: the queue still holds more work than the worker can
/// do before it runs dry.
const HEADROOM: f64 = 0.5;
/// Weight of the newest measurement in the moving averages.
const SMOOTHING: f64 = 0.3;
/// Shapes whose cost is remembered; the least recently measured are forgotten past it.
const REMEMBERED_SHAPES: usize = 1024;

/// Why a task is refused: what it would have waited and cost, and when to try again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Refusal {
    pub wait: Duration,
    pub cost: Duration,
    pub retry_after_s: u64,
}

/// Measured costs, and the work queued or running on the worker.
#[derive(Default)]
pub struct Admission {
    inner: Mutex<Ledger>,
}

#[derive(Default)]
struct Ledger {
    /// Seconds per task by shape, with when each was last measured.
    per_shape: HashMap<CostKey, (f64, Instant)>,
    /// Seconds per unit of work, by model.
    per_unit: HashMap<String, f64>,
    /// Tasks queued, by shape.
    queued: HashMap<CostKey, usize>,
    /// The batch running now: when it started and what it was estimated to take.
    running: Option<(Instant, f64)>,
}

impl Ledger {
    fn cost(&self, shape: &CostKey) -> Option<f64> {
        match self.per_shape.get(shape) {
            Some((seconds, _)) => Some(*seconds),
            None => self
                .per_unit
                .get(&shape.model)
                .map(|rate| rate * shape.units()),
        }
    }

    /// Seconds until the worker is through the work ahead of a new task (tasks of unknown cost
    /// count as free: they are the first of their model).
    fn wait(&self) -> f64 {
        let queued: f64 = self
            .queued
            .iter()
            .map(|(shape, n)| self.cost(shape).unwrap_or(0.0) * *n as f64)
            .sum();
        let running = self.running.map_or(0.0, |(started, estimate)| {
            (estimate - started.elapsed().as_secs_f64()).max(0.0)
        });
        queued + running
    }
}

impl Admission {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.inner.lock().expect("admission lock is never poisoned")
    }

    /// Whether a task of `shape` with `remaining` time before its deadline can be admitted: it is,
    /// unless there is work ahead of it and that work plus its own measured cost would take longer
    /// than [`HEADROOM`] of that time.
    /// `timeout` (the whole request timeout) sizes the `Retry-After`: the time until the work ahead
    /// has shrunk enough for a new request to fit.
    ///
    /// An admitted task counts as queued from now on (tasks admitted together see each other while
    /// their images decode), until its [`Reservation`] is dropped or the worker takes its job.
    pub fn admit(
        &self,
        shape: &CostKey,
        remaining: Duration,
        timeout: Duration,
    ) -> Result<Reservation<'_>, Refusal> {
        let mut ledger = self.ledger();
        if let (wait, Some(cost)) = (ledger.wait(), ledger.cost(shape)) {
            if wait > 0.0 && wait + cost > HEADROOM * remaining.as_secs_f64() {
                let retry_after_s = (wait + cost - HEADROOM * timeout.as_secs_f64())
                    .clamp(1.0, wait.max(1.0))
                    .ceil() as u64;
                return Err(Refusal {
                    wait: Duration::from_secs_f64(wait),
                    cost: Duration::from_secs_f64(cost),
                    retry_after_s,
                });
            }
        }
        *ledger.queued.entry(shape.clone()).or_default() += 1;
        Ok(Reservation {
            admission: self,
            shape: Some(shape.clone()),
        })
    }

    /// The measured cost of a task of `shape`, if any task of its model has been measured.
    pub fn cost(&self, shape: &CostKey) -> Option<Duration> {
        self.ledger().cost(shape).map(Duration::from_secs_f64)
    }

    /// A queued task started, or was dropped unstarted (a task submitted without being admitted
    /// was never counted, and is not now).
    pub fn dequeued(&self, shape: &CostKey) {
        let mut ledger = self.ledger();
        if let Some(n) = ledger.queued.get_mut(shape) {
            *n -= 1;
            if *n == 0 {
                ledger.queued.remove(shape);
            }
        }
    }

    /// A batch of tasks of `shapes` starts on the worker.
    pub fn started(&self, shapes: &[CostKey]) {
        let mut ledger = self.ledger();
        let estimate = shapes
            .iter()
            .map(|shape| ledger.cost(shape).unwrap_or(0.0))
            .sum();
        ledger.running = Some((Instant::now(), estimate));
    }

    /// The running batch of `shapes` ended after `elapsed`: each task cost its share. When the batch
    /// was cut short (`completed` false: deadlines passed, or a fault), the share is only a lower
    /// bound, which raises an estimate below it and leaves others alone: the tasks that overran
    /// an estimate (the machine slowed down) are the ones that correct it.
    pub fn finished(&self, shapes: &[CostKey], elapsed: Duration, completed: bool) {
        let mut ledger = self.ledger();
        ledger.running = None;
        let share = elapsed.as_secs_f64() / shapes.len().max(1) as f64;
        let update = |old: Option<f64>, new: f64| match (old, completed) {
            (None, _) => new,
            (Some(old), true) => old + SMOOTHING * (new - old),
            (Some(old), false) => old.max(new),
        };
        for shape in shapes {
            let per_task = update(
                ledger.per_shape.get(shape).map(|(seconds, _)| *seconds),
                share,
            );
            ledger
                .per_shape
                .insert(shape.clone(), (per_task, Instant::now()));
            let per_unit = update(
                ledger.per_unit.get(&shape.model).copied(),
                share / shape.units(),
            );
            ledger.per_unit.insert(shape.model.clone(), per_unit);
        }
        if ledger.per_shape.len() > REMEMBERED_SHAPES {
            let oldest = ledger
                .per_shape
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(shape, _)| shape.clone());
            if let Some(shape) = oldest {
                ledger.per_shape.remove(&shape);
            }
        }
    }
}

/// An admitted task's place in the queue's estimate while its request is decoded; the request
/// hands it over to the worker with its job, or gives it up by dropping it.
pub struct Reservation<'a> {
    admission: &'a Admission,
    shape: Option<CostKey>,
}

impl Reservation<'_> {
    /// The task's job is queued: the worker ends its place when it takes the job.
    pub fn hand_over(mut self) {
        self.shape = None;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(shape) = self.shape.take() {
            self.admission.dequeued(&shape);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(steps: usize) -> CostKey {
        CostKey {
            model: "m".into(),
            n_way: 5,
            support_images: 5,
            query_images: 15,
            steps,
            finetune_steps: 0,
            derived: false,
            views: 1,
        }
    }

    #[test]
    fn admits_everything_until_a_cost_is_measured_then_what_fits_before_the_deadline() {
        let admission = Admission::default();
        let (task, timeout) = (shape(10), Duration::from_secs(10));
        for _ in 0..100 {
            admission
                .admit(&task, timeout, timeout)
                .expect("nothing measured yet")
                .hand_over();
        }
        admission.finished(std::slice::from_ref(&task), Duration::from_secs(1), true);
        // 100 queued tasks of 1 s each: a new one would wait 100 s.
        let refusal = admission
            .admit(&task, timeout, timeout)
            .err()
            .expect("a task behind 100 s of work is refused");
        assert_eq!(refusal.wait, Duration::from_secs(100));
        assert_eq!(
            refusal.retry_after_s, 96,
            "after 96 s, the 4 s of work left and its own 1 s fit in 5 s (half of 10 s)"
        );
        for _ in 0..96 {
            admission.dequeued(&task);
        }
        let admitted = admission
            .admit(&task, timeout, timeout)
            .expect("4 s of work ahead and 1 s of its own fit");
        assert!(
            admission
                .admit(&task, Duration::from_secs(5), timeout)
                .is_err(),
            "but not in half of the 5 s this one has left"
        );
        assert!(
            admission.admit(&task, timeout, timeout).is_err(),
            "nor a task behind the one just admitted"
        );
        drop(admitted);
        assert!(
            admission.admit(&task, timeout, timeout).is_ok(),
            "whose place is free once its request gives it up"
        );
    }

    #[test]
    fn an_unseen_shape_is_priced_by_its_models_rate_per_unit_of_work() {
        let admission = Admission::default();
        admission.finished(&[shape(9), shape(9)], Duration::from_secs(4), true);
        let seconds = |shape: CostKey| admission.cost(&shape).unwrap().as_secs_f64();
        assert!(
            (seconds(shape(9)) - 2.0).abs() < 1e-6,
            "a batch's time is shared among its tasks"
        );
        assert!(
            (seconds(shape(19)) - 4.0).abs() < 1e-6,
            "twice the passes over the same images cost twice as much"
        );
        assert_eq!(
            admission.cost(&CostKey {
                model: "other".into(),
                ..shape(9)
            }),
            None
        );
    }

    #[test]
    fn a_batch_cut_short_raises_an_estimate_below_its_time_and_never_lowers_one() {
        let admission = Admission::default();
        let seconds = |admission: &Admission| admission.cost(&shape(9)).unwrap().as_secs_f64();
        admission.finished(&[shape(9)], Duration::from_secs(2), true);
        admission.finished(&[shape(9)], Duration::from_secs(1), false);
        assert_eq!(
            seconds(&admission),
            2.0,
            "cut short after 1 s: the task would have taken at least that"
        );
        admission.finished(&[shape(9)], Duration::from_secs(30), false);
        assert_eq!(
            seconds(&admission),
            30.0,
            "cut short after 30 s: it takes at least 30 s now"
        );
    }
}
