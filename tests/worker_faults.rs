//! The compute worker contains faults: a job that makes libtorch throw fails with an error, and
//! the same worker thread serves the next job; a task whose numbers are not finite is refused,
//! not answered with NaN; a worker that cannot start refuses its jobs. Its queue bound holds while it
//! batches.

mod common;

use common::random_supernet;
use tnas::adapt::{Adaptation, BnMode, PredictWith};
use tnas::model::metadata::HeadSpec;
use tnas::nn::params::ParamSet;
use tnas::nn::search_space::SearchSpace;
use tnas::server::compute::{TaskInput, TaskOutput};
use tnas::server::worker::{Readiness, Worker};
use tnas::server::worker_error::WorkerError;

const PIXELS: usize = 28 * 28;

fn task(support_labels: Vec<i64>, n_way: usize, support_pixels: usize) -> TaskInput {
    TaskInput {
        model: "fixture".into(),
        support: (0..support_pixels).map(|i| (i % 7) as f32 / 7.0).collect(),
        support_labels,
        n_way,
        query: vec![0.25; 2 * PIXELS],
        options: Adaptation {
            steps: 2,
            lr_w: 0.1,
            lr_theta: 1.0,
            bn: BnMode::Support,
            predict_with: PredictWith::Supernet,
            finetune_steps: 0,
            learned_rates: false,
            views: 1,
        },
        keep: false,
    }
}

fn run(worker: &Worker, input: TaskInput) -> Result<TaskOutput, WorkerError> {
    common::answers(worker, vec![input]).remove(0)
}

fn fixture_worker(queue_depth: usize, max_batch: usize) -> Worker {
    let space = SearchSpace {
        stem_pools: 2,
        ..SearchSpace::tnas_official(1, 28, 4)
    };
    let mut checkpoint = random_supernet(
        space,
        HeadSpec::Proto {
            max_way: 20,
            learned_scale: false,
        },
        3,
        1.0,
    );
    checkpoint.meta.name = "fixture".into();
    common::ready_worker(checkpoint, queue_depth, max_batch)
}

#[test]
fn a_failing_job_fails_alone_and_the_worker_keeps_serving() {
    let worker = fixture_worker(16, 1);
    let faults = [
        ("label 7 in a 2-way task", task(vec![0, 7], 2, 2 * PIXELS)),
        (
            "support pixels that are not whole images",
            task(vec![0, 1], 2, 2 * PIXELS - 5),
        ),
    ];
    for (name, input) in faults {
        match run(&worker, input) {
            Err(WorkerError::Failed(message)) => assert!(!message.is_empty(), "{name}"),
            other => panic!("{name}: expected a contained failure, got {other:?}"),
        }
        let output = run(&worker, task(vec![0, 1], 2, 2 * PIXELS))
            .unwrap_or_else(|e| panic!("after {name}: {e}"));
        assert_eq!(output.logits.len(), 2);
        assert!(output.logits.iter().flatten().all(|v| v.is_finite()));
    }
    assert_eq!(worker.readiness(), Readiness::Ready);
}

#[test]
fn a_faulty_task_batched_with_valid_ones_fails_alone() {
    let worker = fixture_worker(16, 8);
    // A longer task keeps the worker busy while three tasks of one shape queue behind it; the
    // middle one names class 7 in a 2-way task.
    let mut busy = task(vec![0, 1], 2, 2 * PIXELS);
    busy.options.steps = 20;
    let inputs = [
        busy,
        task(vec![0, 1], 2, 2 * PIXELS),
        task(vec![0, 7], 2, 2 * PIXELS),
        task(vec![1, 0], 2, 2 * PIXELS),
    ];
    let answers = common::answers(&worker, inputs.into());
    assert!(
        answers[0].is_ok() && answers[1].is_ok() && answers[3].is_ok(),
        "{answers:?}"
    );
    assert!(
        matches!(answers[2], Err(WorkerError::Failed(_))),
        "{:?}",
        answers[2]
    );
}

#[test]
fn jobs_held_back_for_a_batch_still_count_against_the_queue_depth() {
    let worker = fixture_worker(2, 8);
    let job = |n_way: usize, steps: usize| {
        let mut input = task((0..n_way as i64).collect(), n_way, n_way * PIXELS);
        input.options.steps = steps;
        input
    };
    // While the first job runs, a long 2-way job and a 3-way job queue behind it. They cannot
    // batch together, so when the first is done the worker starts one and holds the other.
    let first = common::submit(&worker, job(2, 5)).unwrap();
    while worker.queued() > 0 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let long = common::submit(&worker, job(2, 30)).unwrap();
    let held = common::submit(&worker, job(3, 2)).unwrap();
    first.blocking_recv().unwrap().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(worker.queued(), 1, "the held job is still waiting");
    let admitted = common::submit(&worker, job(3, 2)).unwrap();
    assert!(
        matches!(
            common::submit(&worker, job(3, 2)),
            Err(WorkerError::QueueFull)
        ),
        "a queue of depth 2 admits no third waiting job"
    );
    for answer in [long, held, admitted] {
        answer.blocking_recv().unwrap().unwrap();
    }
}

#[test]
fn an_adaptation_whose_numbers_are_not_finite_is_refused_not_answered_with_nan() {
    let worker = fixture_worker(16, 1);
    // One NaN pixel (decoding never yields one) poisons the task's numbers the way a diverging
    // adaptation does: the answer is an error, not NaN logits.
    let mut poisoned = task(vec![0, 1], 2, 2 * PIXELS);
    poisoned.support[3] = f32::NAN;
    assert_eq!(run(&worker, poisoned).unwrap_err(), WorkerError::Diverged);
    assert!(
        run(&worker, task(vec![0, 1], 2, 2 * PIXELS)).is_ok(),
        "the next task is served"
    );
}

#[test]
fn a_worker_that_cannot_warm_up_refuses_its_jobs_and_says_why() {
    let space = SearchSpace {
        stem_pools: 2,
        ..SearchSpace::tnas_official(1, 28, 4)
    };
    let mut checkpoint = random_supernet(
        space,
        HeadSpec::Proto {
            max_way: 20,
            learned_scale: false,
        },
        3,
        1.0,
    );
    checkpoint.meta.name = "fixture".into();
    // Without its first weight (the stem's), the warm-up's forward pass cannot run.
    let missing = checkpoint.params.names()[0].clone();
    checkpoint.params = ParamSet::from_pairs(
        checkpoint
            .params
            .names()
            .iter()
            .zip(checkpoint.params.tensors())
            .skip(1)
            .map(|(n, t)| (n.clone(), t.shallow_clone())),
    );
    let worker = Worker::spawn(vec![checkpoint], tch::Device::Cpu, 8, 1, 1, 0);
    // Whether a job reaches the queue before the warm-up fails or after, it hears that the
    // worker is not running; none is left waiting for an answer that never comes.
    for _ in 0..4 {
        match common::submit(&worker, task(vec![0, 1], 2, 2 * PIXELS)) {
            Ok(answer) => assert_eq!(
                answer
                    .blocking_recv()
                    .expect("an answer, not a dropped reply")
                    .unwrap_err(),
                WorkerError::Stopped
            ),
            Err(refused) => assert_eq!(refused, WorkerError::Stopped),
        }
    }
    match worker.readiness() {
        Readiness::Failed(fault) => assert!(
            fault.detail.contains(&missing) && !fault.summary.contains(&missing),
            "{fault:?}"
        ),
        other => panic!("readiness {other:?}"),
    }
    assert_eq!(worker.queued(), 0);
}
