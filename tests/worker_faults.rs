//! The compute worker contains faults: a job that makes libtorch throw fails with an error, and
//! the same worker thread serves the next job.

mod common;

use common::random_supernet;
use std::time::{Duration, Instant};
use tch::Device;
use tnas::adapt::{BnMode, PredictWith};
use tnas::metadata::HeadSpec;
use tnas::search_space::SearchSpace;
use tnas::server::worker::{Job, Readiness, ResolvedOptions, TaskInput, TaskOutput, Worker, WorkerError};

const PIXELS: usize = 28 * 28;

fn task(support_labels: Vec<i64>, n_way: usize, support_pixels: usize) -> TaskInput {
    TaskInput {
        model: "fixture".into(),
        support: (0..support_pixels).map(|i| (i % 7) as f32 / 7.0).collect(),
        support_labels,
        n_way,
        query: vec![0.25; 2 * PIXELS],
        options: ResolvedOptions { steps: 2, lr_w: 0.1, lr_theta: 1.0, bn: BnMode::Support, predict_with: PredictWith::Supernet, finetune_steps: 0 },
    }
}

fn run(worker: &Worker, input: TaskInput) -> Result<TaskOutput, WorkerError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    worker.submit(Job { input, deadline: Instant::now() + Duration::from_secs(60), enqueued: Instant::now(), reply }).unwrap();
    answer.blocking_recv().expect("the worker always answers")
}

#[test]
fn a_failing_job_fails_alone_and_the_worker_keeps_serving() {
    let space = SearchSpace { stem_pools: 2, ..SearchSpace::tnas_official(1, 28, 4) };
    let mut checkpoint = random_supernet(space, HeadSpec::Proto { max_way: 20 }, 3, 1.0);
    checkpoint.meta.name = "fixture".into();
    let worker = Worker::spawn(vec![checkpoint], Device::Cpu, 4, 1);
    let started = Instant::now();
    while worker.readiness() != Readiness::Ready {
        assert!(started.elapsed() < Duration::from_secs(60), "worker not ready: {:?}", worker.readiness());
        std::thread::sleep(Duration::from_millis(20));
    }
    let faults = [
        ("label 7 in a 2-way task", task(vec![0, 7], 2, 2 * PIXELS)),
        ("support pixels that are not whole images", task(vec![0, 1], 2, 2 * PIXELS - 5)),
    ];
    for (name, input) in faults {
        match run(&worker, input) {
            Err(WorkerError::Failed(message)) => assert!(!message.is_empty(), "{name}"),
            other => panic!("{name}: expected a contained failure, got {other:?}"),
        }
        let output = run(&worker, task(vec![0, 1], 2, 2 * PIXELS)).unwrap_or_else(|e| panic!("after {name}: {e}"));
        assert_eq!(output.logits.len(), 2);
        assert!(output.logits.iter().flatten().all(|v| v.is_finite()));
    }
    assert_eq!(worker.readiness(), Readiness::Ready);
}
