//! The Rust supernet, derived network, decoding and adaptation against our independent PyTorch
//! reference (`tests/reference/tnas_reference.py`), fed identical weights and inputs.

mod common;

use common::{draw_random_supernet, python, relative_error, repo_path, seeded};
use serde_json::Value;
use std::process::Command;
use tch::{Device, Kind, Tensor};
use tnas::adapt::{query_logits, BnMode, InnerLoop, SupportSet, TaskState};
use tnas::meta::algorithm::{GradientRule, MetaTask, TaskContext};
use tnas::model::checkpoint::task_tensors;
use tnas::model::metadata::HeadSpec;
use tnas::nn::derived::DerivedNetwork;
use tnas::nn::genotype::Genotype;
use tnas::nn::head::LOGIT_SCALE;
use tnas::nn::learned_rates::LearnedRates;
use tnas::nn::relaxation::Relaxation;
use tnas::nn::search_space::SearchSpace;

const TOLERANCE: f64 = 1e-4;
const N_WAY: usize = 5;

struct Case {
    space: SearchSpace,
    head: HeadSpec,
    shot: usize,
    steps: usize,
    alpha_scale: f64,
}

const FIXED: HeadSpec = HeadSpec::Fixed { n_way: N_WAY };

/// Runs the reference on a saved checkpoint and inputs, with any `extra` arguments; returns its
/// tensors and JSON report.
fn run_reference(
    dir: &std::path::Path,
    inputs: &std::path::Path,
    steps: usize,
    lr_w: f64,
    lr_theta: f64,
    extra: &[&str],
) -> (Vec<(String, Tensor)>, Value) {
    let out = dir.join("reference.safetensors");
    let status = Command::new(python())
        .arg(repo_path("tests/reference/tnas_reference.py"))
        .args([
            "--checkpoint",
            dir.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args([
            "--steps",
            &steps.to_string(),
            "--lr-w",
            &lr_w.to_string(),
            "--lr-theta",
            &lr_theta.to_string(),
        ])
        .args(extra)
        .status()
        .expect("python runs");
    assert!(status.success(), "reference failed");
    let tensors = Tensor::read_safetensors(&out).unwrap();
    let report: Value =
        serde_json::from_slice(&std::fs::read(out.with_extension("safetensors.json")).unwrap())
            .unwrap();
    (tensors, report)
}

fn get<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("reference output lacks {name}"))
        .1
}

/// Asserts `ours` is within the tolerance of `reference`; returns the relative error.
fn assert_close(ours: &Tensor, reference: &Tensor, what: &str) -> f64 {
    assert_eq!(ours.size(), reference.size(), "{what}: shapes differ");
    let err = relative_error(ours, reference);
    assert!(
        err <= TOLERANCE,
        "{what}: relative error {err:.2e} over {TOLERANCE:.0e}"
    );
    err
}

/// How a case's θ is relaxed, and the learned logit scale its checkpoint holds (a proto head with
/// `learned_scale` only): the plain cases use the softmax.
#[derive(Clone, Copy)]
struct Variant {
    relaxation: Relaxation,
    log_scale: Option<f64>,
}

const PLAIN: Variant = Variant {
    relaxation: Relaxation::Softmax,
    log_scale: None,
};

/// `draw_random_supernet` with `variant`'s relaxation and logit scale; call inside `seeded`.
fn variant_supernet(
    space: SearchSpace,
    head: HeadSpec,
    seed: i64,
    alpha_scale: f64,
    variant: Variant,
) -> tnas::model::checkpoint::Checkpoint {
    let mut checkpoint = draw_random_supernet(space, head, seed, alpha_scale);
    checkpoint.meta.relaxation = variant.relaxation;
    if let Some(log_scale) = variant.log_scale {
        assert!(
            matches!(
                head,
                HeadSpec::Proto {
                    learned_scale: true,
                    ..
                }
            ),
            "a logit scale needs a learned-scale proto head"
        );
        checkpoint
            .params
            .insert(LOGIT_SCALE.into(), Tensor::from_slice(&[log_scale as f32]));
    }
    checkpoint
}

/// Gives `checkpoint` meta-learned inner rates (`adaptation.learned_rates`): a row per entry of
/// `theta` (its θ rates, normal and reduce), each with a random rate in [0.02, 0.3] for every
/// weight tensor of a task, so that a tensor read in the wrong column or row, or at the scalar
/// `lr_w`, moves differently.
fn with_learned_rates(checkpoint: &mut tnas::model::checkpoint::Checkpoint, theta: &[[f32; 2]]) {
    let (rows, tensors) = (
        theta.len() as i64,
        task_tensors(&checkpoint.params, checkpoint.meta.head) as i64,
    );
    let w = Tensor::rand([rows, tensors], (Kind::Float, Device::Cpu)) * 0.28 + 0.02;
    let theta = Tensor::from_slice(&theta.concat()).view([rows, 2]);
    checkpoint.meta.adaptation.learned_rates = true;
    checkpoint.rates = Some(LearnedRates { w, theta });
}

fn check_case(case: &Case, seed: i64) {
    check_variant(case, PLAIN, seed);
}

fn check_variant(case: &Case, variant: Variant, seed: i64) {
    check_variant_with_rates(case, variant, None, seed);
}

/// [`check_variant`], with the checkpoint's learned inner rates ([`with_learned_rates`]) when
/// `theta_rates` is given: then both sides adapt with the tables, not `lr_w` and `lr_theta`.
fn check_variant_with_rates(
    case: &Case,
    variant: Variant,
    theta_rates: Option<&[[f32; 2]]>,
    seed: i64,
) {
    let Case {
        space,
        head,
        shot,
        steps,
        alpha_scale,
    } = *case;
    let dir = tempfile::tempdir().unwrap();
    let s = space.image_size as i64;
    let (mut checkpoint, support, query) = seeded(seed, || {
        let mut checkpoint = variant_supernet(space, head, seed, alpha_scale, variant);
        if let Some(theta) = theta_rates {
            with_learned_rates(&mut checkpoint, theta);
        }
        let support = Tensor::randn(
            [(N_WAY * shot) as i64, space.in_channels as i64, s, s],
            (Kind::Float, Device::Cpu),
        );
        (
            checkpoint,
            support,
            Tensor::randn(
                [7, space.in_channels as i64, s, s],
                (Kind::Float, Device::Cpu),
            ),
        )
    });
    checkpoint.save(dir.path()).unwrap();
    let labels = Tensor::arange(N_WAY as i64, (Kind::Int64, Device::Cpu))
        .repeat_interleave_self_int(shot as i64, None, None);
    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(
        &[
            ("support", &support),
            ("support_labels", &labels),
            ("query", &query),
        ],
        &inputs,
    )
    .unwrap();
    let (lr_w, lr_theta) = (0.01, 30.0);
    let (reference, report) = run_reference(dir.path(), &inputs, steps, lr_w, lr_theta, &[]);

    let loaded = tnas::model::checkpoint::Checkpoint::load(dir.path(), Device::Cpu).unwrap();
    let network = loaded.network();
    // A proto head's classifier is built per task, not stored: the reference counts it.
    let built_head = if let HeadSpec::Proto { .. } = head {
        N_WAY as i64 * (network.feature_dim() as i64 + 1)
    } else {
        0
    };
    assert_eq!(
        loaded.params.numel() + built_head,
        report["param_count"].as_i64().unwrap(),
        "parameter counts differ"
    );
    let support_set = SupportSet {
        images: &support,
        labels: &labels,
        n_way: N_WAY,
    };
    let (mut state, mut first_loss) = TaskState::start(
        &network,
        &loaded.params,
        loaded.alphas.as_ref(),
        head,
        &support_set,
        Device::Cpu,
    );
    assert_eq!(
        loaded.rates.is_some(),
        theta_rates.is_some(),
        "the checkpoint's rates load"
    );
    state.rates = loaded.rates.clone();
    for tag in ["initial", "adapted"] {
        if tag == "adapted" {
            let inner = InnerLoop {
                steps,
                lr_w,
                lr_theta,
                second_order: false,
            };
            let losses: Vec<f64> = state
                .adapt(
                    &support_set.on(&network),
                    &inner,
                    first_loss.take(),
                    &|| true,
                )
                .unwrap()
                .iter()
                .map(|l| l.double_value(&[]))
                .collect();
            let ref_losses: Vec<f64> = report["losses"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            for (a, b) in losses.iter().zip(&ref_losses) {
                assert!(
                    (a - b).abs() <= TOLERANCE * b.abs().max(1.0),
                    "support losses differ: {losses:?} vs {ref_losses:?}"
                );
            }
        }
        let genotype = state.genotype(&network).unwrap();
        let expected: Genotype =
            serde_json::from_value(report[format!("genotype_{tag}")].clone()).unwrap();
        assert_eq!(genotype, expected, "{tag} genotype differs");
        for (mode, bn) in [
            ("transductive", BnMode::Transductive),
            ("support", BnMode::Support),
        ] {
            let ours = state.predict(&network, &support_set, &query, bn);
            let err = assert_close(
                &ours,
                get(&reference, &format!("{tag}_{mode}")),
                &format!(
                    "{tag} supernet {mode} ({space:?}, {:?})",
                    variant.relaxation
                ),
            );
            eprintln!("{tag} supernet {mode}: relative error {err:.2e}");
            let derived = DerivedNetwork::new(space, genotype.clone()).unwrap();
            let (derived_net, derived_state, _) =
                state.derive(&network, &derived, head, &support_set);
            let ours = tch::no_grad(|| {
                query_logits(
                    &derived_net,
                    &derived_state.params,
                    None,
                    &support_set,
                    &query,
                    bn,
                )
            });
            let err = assert_close(
                &ours,
                get(&reference, &format!("{tag}_derived_{mode}")),
                &format!("{tag} derived {mode} ({space:?}, {:?})", variant.relaxation),
            );
            eprintln!("{tag} derived {mode}: relative error {err:.2e}");
        }
    }
}

fn space(
    in_channels: usize,
    image_size: usize,
    init_channels: usize,
    stem_pools: usize,
) -> SearchSpace {
    SearchSpace {
        stem_pools,
        ..SearchSpace::tnas_official(in_channels, image_size, init_channels)
    }
}

#[test]
fn grayscale_28_official_stem_matches_reference() {
    check_case(
        &Case {
            space: space(1, 28, 8, 2),
            head: FIXED,
            shot: 1,
            steps: 3,
            alpha_scale: 1.0,
        },
        11,
    );
}

#[test]
fn rgb_32_sixteen_channels_matches_reference() {
    check_case(
        &Case {
            space: space(3, 32, 16, 2),
            head: FIXED,
            shot: 2,
            steps: 2,
            alpha_scale: 0.5,
        },
        12,
    );
}

#[test]
fn grayscale_28_one_stem_pool_matches_reference() {
    check_case(
        &Case {
            space: space(1, 28, 16, 1),
            head: FIXED,
            shot: 1,
            steps: 2,
            alpha_scale: 1.0,
        },
        13,
    );
}

#[test]
fn rgb_20_no_stem_pool_matches_reference() {
    check_case(
        &Case {
            space: space(3, 20, 8, 0),
            head: FIXED,
            shot: 1,
            steps: 1,
            alpha_scale: 2.0,
        },
        14,
    );
}

/// A proto head (built from the support prototypes, the supernet's and the derived network's), on
/// which the first step reuses the head's forward pass for its loss. One step: with lr_θ = 30 a
/// proto head's logits are sensitive enough that after two, the float32 reference itself is
/// 1.4e-4 from a float64 run of it, over the tolerance, and so are we.
#[test]
fn proto_head_matches_reference() {
    check_case(
        &Case {
            space: space(1, 28, 8, 2),
            head: HeadSpec::Proto {
                max_way: 20,
                learned_scale: false,
            },
            shot: 2,
            steps: 1,
            alpha_scale: 1.0,
        },
        16,
    );
}

#[test]
fn deeper_network_matches_reference() {
    check_case(
        &Case {
            space: SearchSpace {
                layers: 4,
                ..space(1, 28, 8, 1)
            },
            head: FIXED,
            shot: 1,
            steps: 1,
            alpha_scale: 1.0,
        },
        15,
    );
}

/// One task's meta-gradient, first order (Eq. 7: the query loss's gradient at the adapted point)
/// and second order (through the inner steps), against the reference's autograd of the same
/// functional adaptation, query BN statistics from the support rows as meta-training uses them.
#[test]
fn meta_gradients_match_reference_first_and_second_order() {
    check_meta_gradients(HeadSpec::Fixed { n_way: N_WAY }, 1.0, PLAIN, 31);
}

fn check_meta_gradients(head: HeadSpec, alpha_scale: f64, variant: Variant, seed: i64) {
    check_meta_gradients_with_rates(head, alpha_scale, variant, None, 2, seed);
}

/// [`check_meta_gradients`] over `steps` inner steps, with learned inner rates when `theta_rates`
/// is given ([`with_learned_rates`]): then the rate tables' gradients are checked too, and told
/// apart between the orders.
fn check_meta_gradients_with_rates(
    head: HeadSpec,
    alpha_scale: f64,
    variant: Variant,
    theta_rates: Option<&[[f32; 2]]>,
    steps: usize,
    seed: i64,
) {
    let space = space(1, 28, 4, 2);
    let dir = tempfile::tempdir().unwrap();
    let (mut checkpoint, support, query) = seeded(seed, || {
        let mut checkpoint = variant_supernet(space, head, seed, alpha_scale, variant);
        if let Some(theta) = theta_rates {
            with_learned_rates(&mut checkpoint, theta);
        }
        let image = |n: i64| Tensor::randn([n, 1, 28, 28], (Kind::Float, Device::Cpu));
        (checkpoint, image(N_WAY as i64), image(2 * N_WAY as i64))
    });
    checkpoint.save(dir.path()).unwrap();
    let labels = Tensor::arange(N_WAY as i64, (Kind::Int64, Device::Cpu));
    let query_labels = labels.repeat([2]);
    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(
        &[
            ("support", &support),
            ("support_labels", &labels),
            ("query", &query),
            ("query_labels", &query_labels),
        ],
        &inputs,
    )
    .unwrap();
    let loaded = tnas::model::checkpoint::Checkpoint::load(dir.path(), Device::Cpu).unwrap();
    let network = loaded.network();
    let inner = InnerLoop {
        steps,
        lr_w: 0.01,
        lr_theta: 30.0,
        second_order: false,
    };
    assert_eq!(
        loaded.rates.is_some(),
        theta_rates.is_some(),
        "the checkpoint's rates load"
    );
    // The tables as meta-training learns them: leaves of the graph.
    let learning = || {
        loaded.rates.as_ref().map(|r| LearnedRates {
            w: r.w.copy().set_requires_grad(true),
            theta: r.theta.copy().set_requires_grad(true),
        })
    };
    let mut rate_gradients = Vec::new();
    let task = MetaTask {
        support: SupportSet {
            images: &support,
            labels: &labels,
            n_way: N_WAY,
        },
        query: &query,
        query_labels: &query_labels,
        seed: 0,
    };
    let mut theta_gradients = Vec::new();
    for (order, rule) in [
        ("first", GradientRule::FirstOrder),
        ("second", GradientRule::SecondOrder),
    ] {
        let (reference, report) = run_reference(
            dir.path(),
            &inputs,
            inner.steps,
            inner.lr_w,
            inner.lr_theta,
            &["--meta-gradient", order],
        );
        let context = TaskContext {
            network: &network,
            head: loaded.meta.head,
            inner,
            bn: BnMode::Support,
            rule,
            sample_architecture: false,
            rates: learning(),
            device: Device::Cpu,
        };
        let ours = context.task_gradient(&loaded.params, loaded.alphas.as_ref(), &task);
        let loss = report["query_loss"].as_f64().unwrap();
        let relaxation = variant.relaxation;
        assert!(
            (ours.query_loss - loss).abs() <= TOLERANCE * loss,
            "{order} order ({relaxation:?}): query loss {} vs {loss}",
            ours.query_loss
        );
        let mut worst = 0f64;
        for (name, gradient) in loaded.params.names().iter().zip(&ours.w) {
            let err = assert_close(
                gradient,
                get(&reference, &format!("grad/{name}")),
                &format!("{order}-order gradient of {name} ({relaxation:?})"),
            );
            if name == LOGIT_SCALE {
                eprintln!("{order}-order gradient of {name}: relative error {err:.2e}");
            }
            worst = worst.max(err);
        }
        eprintln!("{order}-order gradients of the weights: largest relative error {worst:.2e}");
        let (normal, reduce) = ours.theta.expect("a supernet's θ has gradients");
        let err = assert_close(
            &normal,
            get(&reference, "grad/alphas_normal"),
            &format!("{order}-order gradient of θ normal ({relaxation:?})"),
        );
        let err = err.max(assert_close(
            &reduce,
            get(&reference, "grad/alphas_reduce"),
            &format!("{order}-order gradient of θ reduce ({relaxation:?})"),
        ));
        eprintln!("{order}-order gradients of θ: largest relative error {err:.2e}");
        theta_gradients.push(normal);
        assert_eq!(
            ours.rates.is_some(),
            theta_rates.is_some(),
            "{order} order: the rates have gradients exactly when learned"
        );
        if let Some((w, theta)) = ours.rates {
            let err = assert_close(
                &w,
                get(&reference, "grad/inner.lr_w"),
                &format!("{order}-order gradient of inner.lr_w ({relaxation:?})"),
            );
            let err = err.max(assert_close(
                &theta,
                get(&reference, "grad/inner.lr_theta"),
                &format!("{order}-order gradient of inner.lr_theta ({relaxation:?})"),
            ));
            eprintln!(
                "{order}-order gradients of the rate tables: largest relative error {err:.2e}"
            );
            rate_gradients.push((w, theta));
        }
    }
    if let [(first_w, first_theta), (second_w, second_theta)] = &rate_gradients[..] {
        assert!(
            relative_error(first_w, second_w) > 1e-2
                && relative_error(first_theta, second_theta) > 1e-2,
            "second-order rate gradients equal first-order"
        );
    }
    // The two orders are different quantities here, so the check above tells them apart.
    assert!(
        relative_error(&theta_gradients[0], &theta_gradients[1]) > 1e-2,
        "second-order θ gradient equals first-order"
    );
}

/// Soft pruning with pairwise inputs, annealed from τ 1 to 0.2 (θ ~ 1.5·N(0, 1), so neither the op
/// nor the pair softmax is near uniform), and a learned logit scale away from 1 (0.3).
const PAIRWISE: Variant = Variant {
    relaxation: Relaxation::Annealed {
        start: 1.0,
        end: 0.2,
        pairwise_inputs: true,
        hard_end: false,
    },
    log_scale: Some(-1.203_972_804_325_936),
};
/// Soft pruning whose end state is the genotype itself: one-hot weights forward at τ1, the soft
/// weights' gradient backward.
const HARD_END: Variant = Variant {
    relaxation: Relaxation::Annealed {
        start: 1.0,
        end: 0.2,
        pairwise_inputs: true,
        hard_end: true,
    },
    log_scale: Some(-1.203_972_804_325_936),
};
/// Soft pruning of the ops alone (every input kept), also with a learned logit scale.
const OPS_ONLY: Variant = Variant {
    relaxation: Relaxation::Annealed {
        start: 1.5,
        end: 0.4,
        pairwise_inputs: false,
        hard_end: false,
    },
    log_scale: Some(-1.203_972_804_325_936),
};
const SCALED_PROTO: HeadSpec = HeadSpec::Proto {
    max_way: 20,
    learned_scale: true,
};

/// Annealed, pairwise inputs, learned scale: the supernet at τ0 (where the head is built), after
/// steps on the schedule at τ1, and the derived network keeping the adapted head and scale.
#[test]
fn annealed_pairwise_learned_scale_matches_reference_after_steps() {
    check_variant(
        &Case {
            space: space(1, 28, 8, 2),
            head: SCALED_PROTO,
            shot: 2,
            steps: 2,
            alpha_scale: 1.5,
        },
        PAIRWISE,
        41,
    );
}

/// No steps: the queries are predicted at τ1 straight from the head built at τ0.
#[test]
fn annealed_pairwise_learned_scale_matches_reference_without_steps() {
    check_variant(
        &Case {
            space: space(1, 28, 8, 2),
            head: SCALED_PROTO,
            shot: 2,
            steps: 0,
            alpha_scale: 1.5,
        },
        PAIRWISE,
        42,
    );
}

/// Annealed ops without the pair softmax; the derived network rebuilds its head from its own
/// prototypes and keeps the adapted scale.
#[test]
fn annealed_ops_only_learned_scale_matches_reference_after_steps() {
    check_variant(
        &Case {
            space: space(1, 28, 8, 2),
            head: SCALED_PROTO,
            shot: 2,
            steps: 2,
            alpha_scale: 1.5,
        },
        OPS_ONLY,
        43,
    );
}

#[test]
fn annealed_ops_only_learned_scale_matches_reference_without_steps() {
    check_variant(
        &Case {
            space: space(1, 28, 8, 2),
            head: SCALED_PROTO,
            shot: 2,
            steps: 0,
            alpha_scale: 1.5,
        },
        OPS_ONLY,
        44,
    );
}

/// Meta-gradients of every weight (the logit scale included) and θ through the annealing schedule.
/// Some fixtures' per-tensor gradients are ill-conditioned (seed 45: the float32 reference is
/// 1.4e-4 from a float64 run of itself, on a depthwise conv); on these two float32 rounding alone
/// moves every gradient by at most 1.5e-5 (`tnas_reference.py --float64`).
#[test]
fn annealed_pairwise_learned_scale_meta_gradients_match_reference() {
    check_meta_gradients(SCALED_PROTO, 1.5, PAIRWISE, 48);
}

/// A hard end: queries predicted by the genotype's network, after two steps and with none (the
/// head still built at τ0, as meta-training builds it).
#[test]
fn hard_end_matches_reference_with_and_without_steps() {
    for (steps, seed) in [(2, 41), (0, 42)] {
        check_variant(
            &Case {
                space: space(1, 28, 8, 2),
                head: SCALED_PROTO,
                shot: 2,
                steps,
                alpha_scale: 1.5,
            },
            HARD_END,
            seed,
        );
    }
}

#[test]
fn hard_end_meta_gradients_match_reference() {
    check_meta_gradients(SCALED_PROTO, 1.5, HARD_END, 48);
}

#[test]
fn annealed_ops_only_learned_scale_meta_gradients_match_reference() {
    check_meta_gradients(SCALED_PROTO, 1.5, OPS_ONLY, 46);
}

/// Meta-learned inner rates (T-NAS++): distinct θ rates per row and cell type, random per-tensor
/// weight rates; three steps on two learned rows, so the third reuses the last. Supernet and
/// derived network, both BN modes, support losses and genotypes after the steps.
#[test]
fn learned_rates_match_reference_past_the_learned_steps() {
    check_variant_with_rates(
        &Case {
            space: space(1, 28, 4, 2),
            head: FIXED,
            shot: 1,
            steps: 3,
            alpha_scale: 1.0,
        },
        PLAIN,
        Some(&[[25.0, 40.0], [12.0, 33.0]]),
        51,
    );
}

/// Learned rates with soft pruning (pairwise inputs), a learned logit scale and a proto head,
/// whose built weight and bias are the tables' last two columns; two steps on three rows.
#[test]
fn learned_rates_annealed_pairwise_learned_scale_match_reference() {
    check_variant_with_rates(
        &Case {
            space: space(1, 28, 4, 2),
            head: SCALED_PROTO,
            shot: 2,
            steps: 2,
            alpha_scale: 1.5,
        },
        PAIRWISE,
        Some(&[[20.0, 35.0], [8.0, 28.0], [50.0, 1.0]]),
        52,
    );
}

/// First- and second-order meta-gradients of every weight, θ and both rate tables, three steps on
/// two learned rows (the last row's gradient gathers two steps).
#[test]
fn learned_rates_meta_gradients_match_reference() {
    check_meta_gradients_with_rates(
        FIXED,
        1.0,
        PLAIN,
        Some(&[[25.0, 40.0], [12.0, 33.0]]),
        3,
        53,
    );
}

/// The same through the annealing schedule with pairwise inputs, a learned logit scale and a proto
/// head (its built classifier's rates included).
#[test]
fn learned_rates_annealed_pairwise_learned_scale_meta_gradients_match_reference() {
    check_meta_gradients_with_rates(
        SCALED_PROTO,
        1.5,
        PAIRWISE,
        Some(&[[20.0, 35.0], [8.0, 28.0]]),
        2,
        54,
    );
}

/// Random alphas on a coarse grid (many exact ties after softmax) plus tiny perturbations
/// (near-ties): the Rust decoder and the reference agree on every one.
#[test]
fn decoding_agrees_with_reference_on_ties_and_near_ties() {
    let dir = tempfile::tempdir().unwrap();
    let named: Vec<(String, Tensor)> = seeded(21, || {
        (0..60)
            .flat_map(|i| ["normal", "reduce"].map(|cell| (i, cell)))
            .map(|(i, cell)| {
                let coarse =
                    (Tensor::randn([14, 8], (Kind::Float, Device::Cpu)) * 2.0).round() / 2.0;
                let jitter = Tensor::randn([14, 8], (Kind::Float, Device::Cpu))
                    * if i % 2 == 0 { 0.0 } else { 1e-6 };
                (format!("{cell}_{i}"), coarse + jitter)
            })
            .collect()
    });
    let inputs = dir.path().join("alphas.safetensors");
    Tensor::write_safetensors(&named, &inputs).unwrap();
    let out = dir.path().join("genotypes.json");
    let status = Command::new(python())
        .arg(repo_path("tests/reference/decode_reference.py"))
        .arg(&inputs)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let expected: Vec<Genotype> = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let space = SearchSpace::tnas_official(1, 28, 8);
    for (i, want) in expected.iter().enumerate() {
        let rows = |t: &Tensor| tnas::nn::params::matrix_rows(&t.softmax(-1, Kind::Float));
        let got = Genotype::decode(&space, &rows(&named[2 * i].1), &rows(&named[2 * i + 1].1));
        assert_eq!(&got, want, "alphas #{i}");
    }
}
