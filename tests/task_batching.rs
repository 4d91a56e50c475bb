//! Cross-task batching: several tasks adapted as one pass give each task exactly what adapting it
//! alone gives, the same query logits and the same genotype, in the library and in the worker; and
//! on a GPU, so do adaptations replayed from recorded CUDA graphs.

mod common;

use tch::{Device, Tensor};
use tnas::adapt::task_batch::{side_by_side, BatchedSupport, TaskBatch};
use tnas::adapt::{Adaptation, BnMode, InnerLoop, PredictWith, SupportSet, TaskState};
use tnas::data::imaging::{decode, to_input, ImageLimits};
use tnas::model::checkpoint::Checkpoint;
use tnas::model::metadata::HeadSpec;
use tnas::nn::head::LOGIT_SCALE;
use tnas::nn::network::Network;
use tnas::nn::relaxation::Relaxation;
use tnas::nn::search_space::SearchSpace;
use tnas::server::compute::TaskInput;

struct Task {
    support: Tensor,
    labels: Tensor,
    query: Tensor,
}

/// A PNG as the model's input, in plain numbers (CHW), as the server hands images to the worker.
fn pixels(checkpoint: &Checkpoint, png: &[u8]) -> Vec<f32> {
    to_input(
        &decode(png, &ImageLimits::default()).unwrap(),
        &checkpoint.meta.input,
    )
}

/// Real Omniglot 5-way 1-shot tasks (4 queries each), one per alphabet, with the support classes
/// in a different order in each task.
fn tasks(checkpoint: &Checkpoint, alphabets: &[&str]) -> Vec<Task> {
    let input = &checkpoint.meta.input;
    let image = |png: &[u8]| {
        Tensor::from_slice(&pixels(checkpoint, png)).view([
            1,
            input.channels as i64,
            input.size as i64,
            input.size as i64,
        ])
    };
    alphabets
        .iter()
        .enumerate()
        .map(|(t, alphabet)| {
            let pngs = common::omniglot_pngs(alphabet, 5, 2);
            let order: Vec<i64> = (0..5).map(|c| (c + t as i64) % 5).collect();
            let support = Tensor::cat(
                &order
                    .iter()
                    .map(|&c| image(&pngs[c as usize][0]))
                    .collect::<Vec<_>>(),
                0,
            );
            let query = Tensor::cat(&[0, 2, 4, 1].map(|c| image(&pngs[c][1])), 0);
            Task {
                support,
                labels: Tensor::from_slice(&order),
                query,
            }
        })
        .collect()
}

fn assert_batch_equals_alone(checkpoint: &Checkpoint, alphabets: &[&str], bn: BnMode) {
    let network = checkpoint.network();
    let Network::Supernet(net) = &network else {
        panic!("a supernet checkpoint")
    };
    let alphas = checkpoint.alphas.as_ref().unwrap();
    let inner = InnerLoop {
        steps: 3,
        lr_w: checkpoint.meta.adaptation.lr_w,
        lr_theta: checkpoint.meta.adaptation.lr_theta,
        second_order: false,
    };
    let tasks = tasks(checkpoint, alphabets);

    let support = BatchedSupport::new(
        &tasks
            .iter()
            .map(|t| t.support.shallow_clone())
            .collect::<Vec<_>>(),
        &tasks
            .iter()
            .map(|t| t.labels.shallow_clone())
            .collect::<Vec<_>>(),
        5,
    );
    let (mut batch, first_loss) = TaskBatch::start(
        net,
        &checkpoint.params,
        alphas,
        checkpoint.meta.head,
        &support,
    );
    batch
        .adapt(net, &support, &inner, first_loss, &|| true)
        .unwrap();
    let batched_logits = batch.predict(
        net,
        &support,
        &side_by_side(
            &tasks
                .iter()
                .map(|t| t.query.shallow_clone())
                .collect::<Vec<_>>(),
        ),
        bn,
    );
    let batched_genotypes = batch.genotypes(net);

    for (t, task) in tasks.iter().enumerate() {
        let set = SupportSet {
            images: &task.support,
            labels: &task.labels,
            n_way: 5,
        };
        let (mut alone, first_loss) = TaskState::start(
            &network,
            &checkpoint.params,
            Some(alphas),
            checkpoint.meta.head,
            &set,
            Device::Cpu,
        );
        alone
            .adapt(&set.on(&network), &inner, first_loss, &|| true)
            .unwrap();
        let logits = alone.predict(&network, &set, &task.query, bn);
        let error = common::relative_error(&batched_logits.select(1, t as i64), &logits);
        assert!(
            error < 1e-4,
            "task {t}: batched logits differ from adapting alone by {error:.1e}"
        );
        assert_eq!(
            batched_genotypes[t],
            alone.genotype(&network).unwrap(),
            "task {t}: genotype"
        );
    }
    // Tasks stay apart: the same start adapted on different tasks does not end in one answer.
    let first = batched_logits.select(1, 0);
    assert!((0..tasks.len() as i64)
        .skip(1)
        .all(|t| common::relative_error(&batched_logits.select(1, t), &first) > 1e-3));
}

#[test]
fn batched_tasks_of_a_trained_model_match_adapting_each_alone() {
    tch::set_num_threads(2);
    let checkpoint = Checkpoint::load(&common::repo_path("models/omniglot-tnas"), Device::Cpu)
        .expect("the trained model loads");
    assert_batch_equals_alone(&checkpoint, &["Latin", "Greek", "Korean"], BnMode::Support);
}

#[test]
fn batched_tasks_with_a_fixed_head_stride_two_stem_and_reduction_inputs_match_alone() {
    tch::set_num_threads(2);
    // No stem pool: the first cell reads 28×28 maps, reduction cells halve odd and even sizes.
    let checkpoint = common::random_supernet(
        SearchSpace {
            stem_pools: 0,
            ..SearchSpace::tnas_official(1, 28, 4)
        },
        HeadSpec::Fixed { n_way: 5 },
        3,
        1.0,
    );
    assert_batch_equals_alone(&checkpoint, &["Latin", "Greek"], BnMode::Transductive);
}

/// Soft pruning with pairwise inputs and a learned logit scale: the batch anneals every task's θ on
/// the schedule, with each task's own pair softmax, head and scale, as adapting it alone does.
#[test]
fn batched_tasks_with_annealed_pairwise_relaxation_and_learned_scale_match_alone() {
    tch::set_num_threads(2);
    let mut checkpoint = common::random_supernet(
        SearchSpace::tnas_official(1, 28, 4),
        HeadSpec::Proto {
            max_way: 20,
            learned_scale: true,
        },
        5,
        1.5,
    );
    checkpoint.meta.relaxation = Relaxation::Annealed {
        start: 1.0,
        end: 0.2,
        pairwise_inputs: true,
        hard_end: false,
    };
    checkpoint
        .params
        .insert(LOGIT_SCALE.into(), Tensor::from_slice(&[0.3f32.ln()]));
    assert_batch_equals_alone(&checkpoint, &["Latin", "Greek"], BnMode::Support);
}

/// Real Omniglot pixels of a 5-way 1-shot task with 3 queries, as the server hands them to the
/// worker.
fn worker_input(checkpoint: &Checkpoint, alphabet: &str, steps: usize) -> TaskInput {
    let pixels = |png: &[u8]| pixels(checkpoint, png);
    let pngs = common::omniglot_pngs(alphabet, 5, 2);
    let a = checkpoint.meta.adaptation;
    TaskInput {
        model: checkpoint.meta.name.clone(),
        support: pngs.iter().flat_map(|class| pixels(&class[0])).collect(),
        support_labels: (0..5).collect(),
        n_way: 5,
        query: [3, 0, 1]
            .iter()
            .flat_map(|&c| pixels(&pngs[c][1]))
            .collect(),
        options: Adaptation {
            steps,
            lr_w: a.lr_w,
            lr_theta: a.lr_theta,
            bn: BnMode::Support,
            predict_with: PredictWith::Supernet,
            finetune_steps: 0,
            learned_rates: a.learned_rates,
            views: 1,
        },
        keep: false,
    }
}

#[test]
fn the_worker_batches_queued_tasks_and_answers_each_as_if_alone() {
    assert_the_worker_batches_as_alone("omniglot-tnas", 1);
}

/// The default model adapts with meta-learned per-step rates and a learned logit scale, and anneals
/// θ to a hard end: its tasks batch and answer as each alone, too.
#[test]
fn tasks_of_a_model_with_learned_rates_and_a_hard_end_batch_as_if_alone() {
    assert_the_worker_batches_as_alone("omniglot-tnas-six-clean2", 1);
}

/// Test-time views batch too: each task's support views adapt it and its queries' views merge
/// into its own answer, as when it runs alone.
#[test]
fn tasks_with_test_time_views_batch_and_answer_as_if_alone() {
    assert_the_worker_batches_as_alone("omniglot-tnas", 3);
}

/// Queued tasks for `model` (a folder in `models/`), `views` views each, give the same answers
/// from a worker that batches them as from one that runs them one by one.
fn assert_the_worker_batches_as_alone(model: &str, views: usize) {
    tch::set_num_threads(2);
    let load = || {
        Checkpoint::load(&common::repo_path(&format!("models/{model}")), Device::Cpu)
            .expect("the trained model loads")
    };
    let checkpoint = load();
    let alphabets = ["Latin", "Greek", "Korean"];
    // A 4-step task first keeps the worker busy while the three 2-step tasks queue up behind it.
    let with_views = |mut input: TaskInput| {
        input.options.views = views;
        input
    };
    let inputs = || {
        std::iter::once(worker_input(&checkpoint, "Greek", 4))
            .chain(alphabets.iter().map(|a| worker_input(&checkpoint, a, 2)))
            .map(with_views)
            .collect::<Vec<_>>()
    };
    let outputs = |max_batch| {
        common::answers(&common::ready_worker(load(), 16, max_batch), inputs())
            .into_iter()
            .map(|r| r.expect("the task succeeds"))
            .collect::<Vec<_>>()
    };
    let (batched, alone) = (outputs(8), outputs(1));
    // One batch: the three share one adaptation, so one timing.
    assert!(
        batched[1..]
            .iter()
            .all(|out| out.adapt_ms == batched[1].adapt_ms),
        "the queued tasks ran as one batch"
    );
    assert!(
        alone[1..]
            .iter()
            .any(|out| out.adapt_ms != alone[1].adapt_ms),
        "max_batch 1 runs tasks one by one"
    );
    for (t, (b, a)) in batched.iter().zip(&alone).enumerate() {
        assert_eq!(b.genotype, a.genotype, "task {t}: genotype");
        assert_eq!(
            b.alphas.as_ref().map(|m| m.normal.len()),
            a.alphas.as_ref().map(|m| m.normal.len())
        );
        let error = common::relative_error(
            &Tensor::from_slice2(&b.logits),
            &Tensor::from_slice2(&a.logits),
        );
        assert!(
            error < 1e-4,
            "task {t}: batched logits differ from alone by {error:.1e}"
        );
    }
}

/// Tasks of the same shape for two models queue together but adapt apart, each on its own model.
#[test]
fn tasks_for_different_models_never_share_a_batch() {
    tch::set_num_threads(2);
    let trained = || {
        Checkpoint::load(&common::repo_path("models/omniglot-tnas"), Device::Cpu)
            .expect("the trained model loads")
    };
    // A second model of the same shape: the trained weights with θ negated, so it decodes differently.
    let flipped = || {
        let mut checkpoint = trained();
        checkpoint.meta.name = "flipped".into();
        checkpoint.alphas = checkpoint.alphas.map(|a| a.map(|t| -t));
        checkpoint
    };
    let checkpoint = trained();
    let inputs = || {
        let mut other = worker_input(&checkpoint, "Latin", 2);
        other.model = "flipped".into();
        // The 4-step task keeps the worker busy while the other two queue up behind it.
        vec![
            worker_input(&checkpoint, "Greek", 4),
            worker_input(&checkpoint, "Latin", 2),
            other,
        ]
    };
    let outputs = |max_batch| {
        let worker =
            common::ready_worker_on(Device::Cpu, vec![trained(), flipped()], 16, max_batch, 0);
        common::answers(&worker, inputs())
            .into_iter()
            .map(|r| r.expect("the task succeeds"))
            .collect::<Vec<_>>()
    };
    let (batched, alone) = (outputs(8), outputs(1));
    assert_ne!(
        alone[1].genotype, alone[2].genotype,
        "the two models answer the same task differently"
    );
    for (t, (b, a)) in batched.iter().zip(&alone).enumerate() {
        assert_eq!(b.genotype, a.genotype, "task {t}: genotype");
        let error = common::relative_error(
            &Tensor::from_slice2(&b.logits),
            &Tensor::from_slice2(&a.logits),
        );
        assert!(
            error < 1e-4,
            "task {t}: logits differ from adapting on its own model alone by {error:.1e}"
        );
    }
}

/// On a GPU the worker records each task shape as a CUDA graph on its second sighting and replays
/// it: eager, recorded and replayed answers, single and batched, are what the eager worker gives.
#[test]
fn recorded_adaptations_answer_like_eager_ones_on_a_gpu() {
    if !tch::Cuda::is_available() {
        eprintln!("no CUDA device: recorded adaptations are checked on GPU machines only");
        return;
    }
    let load = || {
        Checkpoint::load(&common::repo_path("models/omniglot-tnas"), Device::Cpu)
            .expect("the trained model loads")
    };
    let checkpoint = load();
    let alphabets = ["Latin", "Greek", "Korean", "Latin"];
    let outputs = |cuda_graphs| {
        let worker = common::ready_worker_on(Device::Cuda(0), vec![load()], 16, 8, cuda_graphs);
        // One at a time (eager, then recorded, then replayed), then two rounds of three queued
        // together (batches, whose recording evicts the single task's graph: room for one).
        let mut out: Vec<_> = alphabets
            .iter()
            .flat_map(|a| common::answers(&worker, vec![worker_input(&checkpoint, a, 10)]))
            .collect();
        for _ in 0..2 {
            out.extend(common::answers(
                &worker,
                alphabets[..3]
                    .iter()
                    .map(|a| worker_input(&checkpoint, a, 10))
                    .collect(),
            ));
        }
        out.into_iter()
            .map(|r| r.expect("the task succeeds"))
            .collect::<Vec<_>>()
    };
    let (recorded, eager) = (outputs(1), outputs(0));
    assert!(
        !recorded[0].cuda_graph,
        "a shape's first task adapts eagerly"
    );
    assert!(
        recorded[1..4].iter().all(|out| out.cuda_graph),
        "its later tasks replay the shape's graph"
    );
    assert!(eager.iter().all(|out| !out.cuda_graph));
    for (t, (r, e)) in recorded.iter().zip(&eager).enumerate() {
        assert_eq!(r.genotype, e.genotype, "task {t}: genotype");
        let error = common::relative_error(
            &Tensor::from_slice2(&r.logits),
            &Tensor::from_slice2(&e.logits),
        );
        assert!(
            error < 1e-3,
            "task {t}: replayed logits differ from eager ones by {error:.1e}"
        );
    }
    let latin = common::relative_error(
        &Tensor::from_slice2(&recorded[3].logits),
        &Tensor::from_slice2(&recorded[0].logits),
    );
    assert!(
        latin < 1e-3,
        "the same task eager and replayed gives the same answer ({latin:.1e})"
    );
}
