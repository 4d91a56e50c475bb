//! The Rust supernet, derived network, decoding and adaptation against our independent PyTorch
//! reference (`tests/reference/tnas_reference.py`), fed identical weights and inputs.

mod common;

use common::{python, random_supernet, relative_error, repo_path};
use serde_json::Value;
use std::process::Command;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};
use tnas::adapt::{query_logits, BnMode, InnerLoop, SupportSet, TaskState};
use tnas::meta::algorithm::{GradientRule, MetaTask, TaskContext};
use tnas::derived::DerivedNetwork;
use tnas::genotype::Genotype;
use tnas::metadata::HeadSpec;
use tnas::search_space::SearchSpace;

const TOLERANCE: f64 = 1e-4;
const N_WAY: usize = 5;

/// Runs `draw` right after seeding libtorch's global generator, with no other test drawing in
/// between: the tests run in parallel and share the generator, so without this a test's weights and
/// inputs would depend on the interleaving, and a failure could not be reproduced.
fn seeded<T>(seed: i64, draw: impl FnOnce() -> T) -> T {
    static GENERATOR: Mutex<()> = Mutex::new(());
    let _alone = GENERATOR.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed);
    draw()
}

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
fn run_reference(dir: &std::path::Path, inputs: &std::path::Path, steps: usize, lr_w: f64, lr_theta: f64, extra: &[&str]) -> (Vec<(String, Tensor)>, Value) {
    let out = dir.join("reference.safetensors");
    let status = Command::new(python())
        .arg(repo_path("tests/reference/tnas_reference.py"))
        .args(["--checkpoint", dir.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--steps", &steps.to_string(), "--lr-w", &lr_w.to_string(), "--lr-theta", &lr_theta.to_string()])
        .args(extra)
        .status()
        .expect("python runs");
    assert!(status.success(), "reference failed");
    let tensors = Tensor::read_safetensors(&out).unwrap();
    let report: Value = serde_json::from_slice(&std::fs::read(out.with_extension("safetensors.json")).unwrap()).unwrap();
    (tensors, report)
}

fn get<'a>(tensors: &'a [(String, Tensor)], name: &str) -> &'a Tensor {
    &tensors.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("reference output lacks {name}")).1
}

fn assert_close(ours: &Tensor, reference: &Tensor, what: &str) {
    assert_eq!(ours.size(), reference.size(), "{what}: shapes differ");
    let err = relative_error(ours, reference);
    assert!(err <= TOLERANCE, "{what}: relative error {err:.2e} over {TOLERANCE:.0e}");
}

fn check_case(case: &Case, seed: i64) {
    let Case { space, head, shot, steps, alpha_scale } = *case;
    let dir = tempfile::tempdir().unwrap();
    let s = space.image_size as i64;
    let (mut checkpoint, support, query) = seeded(seed, || {
        let checkpoint = random_supernet(space, head, seed, alpha_scale);
        let support = Tensor::randn([(N_WAY * shot) as i64, space.in_channels as i64, s, s], (Kind::Float, Device::Cpu));
        (checkpoint, support, Tensor::randn([7, space.in_channels as i64, s, s], (Kind::Float, Device::Cpu)))
    });
    checkpoint.save(dir.path()).unwrap();
    let labels = Tensor::arange(N_WAY as i64, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(shot as i64, None, None);
    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(&[("support", &support), ("support_labels", &labels), ("query", &query)], &inputs).unwrap();
    let (lr_w, lr_theta) = (0.01, 30.0);
    let (reference, report) = run_reference(dir.path(), &inputs, steps, lr_w, lr_theta, &[]);

    let loaded = tnas::checkpoint::Checkpoint::load(dir.path(), Device::Cpu).unwrap();
    let network = loaded.network();
    // A proto head's classifier is built per task, not stored: the reference counts it.
    let built_head = if let HeadSpec::Proto { .. } = head { N_WAY as i64 * (network.feature_dim() as i64 + 1) } else { 0 };
    assert_eq!(loaded.params.numel() + built_head, report["param_count"].as_i64().unwrap(), "parameter counts differ");
    let support_set = SupportSet { images: &support, labels: &labels, n_way: N_WAY };
    let mut state = TaskState::start(&network, &loaded.params, loaded.alphas.as_ref(), head, &support_set, Device::Cpu);
    for tag in ["initial", "adapted"] {
        if tag == "adapted" {
            let inner = InnerLoop { steps, lr_w, lr_theta, second_order: false };
            let losses = state.adapt(&network, &support_set, &inner, &|| true).unwrap();
            let ref_losses: Vec<f64> = report["losses"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            for (a, b) in losses.iter().zip(&ref_losses) {
                assert!((a - b).abs() <= TOLERANCE * b.abs().max(1.0), "support losses differ: {losses:?} vs {ref_losses:?}");
            }
        }
        let genotype = state.genotype(&network).unwrap();
        let expected: Genotype = serde_json::from_value(report[format!("genotype_{tag}")].clone()).unwrap();
        assert_eq!(genotype, expected, "{tag} genotype differs");
        for (mode, bn) in [("transductive", BnMode::Transductive), ("support", BnMode::Support)] {
            let ours = state.predict(&network, &support_set, &query, bn);
            assert_close(&ours, get(&reference, &format!("{tag}_{mode}")), &format!("{tag} supernet {mode} ({space:?})"));
            let derived = DerivedNetwork::new(space, genotype.clone()).unwrap();
            let (derived_net, derived_state) = state.derive(&network, &derived, head, &support_set);
            let ours = tch::no_grad(|| query_logits(&derived_net, &derived_state.params, None, &support_set, &query, bn));
            assert_close(&ours, get(&reference, &format!("{tag}_derived_{mode}")), &format!("{tag} derived {mode} ({space:?})"));
        }
    }
}

fn space(in_channels: usize, image_size: usize, init_channels: usize, stem_pools: usize) -> SearchSpace {
    SearchSpace { stem_pools, ..SearchSpace::tnas_official(in_channels, image_size, init_channels) }
}

#[test]
fn grayscale_28_official_stem_matches_reference() {
    check_case(&Case { space: space(1, 28, 8, 2), head: FIXED, shot: 1, steps: 3, alpha_scale: 1.0 }, 11);
}

#[test]
fn rgb_32_sixteen_channels_matches_reference() {
    check_case(&Case { space: space(3, 32, 16, 2), head: FIXED, shot: 2, steps: 2, alpha_scale: 0.5 }, 12);
}

#[test]
fn grayscale_28_one_stem_pool_matches_reference() {
    check_case(&Case { space: space(1, 28, 16, 1), head: FIXED, shot: 1, steps: 2, alpha_scale: 1.0 }, 13);
}

#[test]
fn rgb_20_no_stem_pool_matches_reference() {
    check_case(&Case { space: space(3, 20, 8, 0), head: FIXED, shot: 1, steps: 1, alpha_scale: 2.0 }, 14);
}

/// A proto head (built from the support prototypes, the supernet's and the derived network's), on
/// which the first step reuses the head's forward pass for its loss. One step: with lr_θ = 30 a
/// proto head's logits are sensitive enough that after two, the float32 reference itself is
/// 1.4e-4 from a float64 run of it, over the tolerance, and so are we.
#[test]
fn proto_head_matches_reference() {
    check_case(&Case { space: space(1, 28, 8, 2), head: HeadSpec::Proto { max_way: 20 }, shot: 2, steps: 1, alpha_scale: 1.0 }, 16);
}

#[test]
fn deeper_network_matches_reference() {
    check_case(&Case { space: SearchSpace { layers: 4, ..space(1, 28, 8, 1) }, head: FIXED, shot: 1, steps: 1, alpha_scale: 1.0 }, 15);
}

/// One task's meta-gradient, first order (Eq. 7: the query loss's gradient at the adapted point)
/// and second order (through the inner steps), against the reference's autograd of the same
/// functional adaptation, query BN statistics from the support rows as meta-training uses them.
#[test]
fn meta_gradients_match_reference_first_and_second_order() {
    let space = space(1, 28, 4, 2);
    let dir = tempfile::tempdir().unwrap();
    let (mut checkpoint, support, query) = seeded(31, || {
        let checkpoint = random_supernet(space, HeadSpec::Fixed { n_way: N_WAY }, 31, 1.0);
        let image = |n: i64| Tensor::randn([n, 1, 28, 28], (Kind::Float, Device::Cpu));
        (checkpoint, image(N_WAY as i64), image(2 * N_WAY as i64))
    });
    checkpoint.save(dir.path()).unwrap();
    let labels = Tensor::arange(N_WAY as i64, (Kind::Int64, Device::Cpu));
    let query_labels = labels.repeat([2]);
    let inputs = dir.path().join("inputs.safetensors");
    Tensor::write_safetensors(&[("support", &support), ("support_labels", &labels), ("query", &query), ("query_labels", &query_labels)], &inputs).unwrap();
    let loaded = tnas::checkpoint::Checkpoint::load(dir.path(), Device::Cpu).unwrap();
    let network = loaded.network();
    let inner = InnerLoop { steps: 2, lr_w: 0.01, lr_theta: 30.0, second_order: false };
    let task = MetaTask { support: SupportSet { images: &support, labels: &labels, n_way: N_WAY }, query: &query, query_labels: &query_labels, seed: 0 };
    let mut theta_gradients = Vec::new();
    for (order, rule) in [("first", GradientRule::FirstOrder), ("second", GradientRule::SecondOrder)] {
        let (reference, report) = run_reference(dir.path(), &inputs, inner.steps, inner.lr_w, inner.lr_theta, &["--meta-gradient", order]);
        let context = TaskContext { network: &network, head: loaded.meta.head, inner, bn: BnMode::Support, rule, sample_architecture: false, rates: None, device: Device::Cpu };
        let ours = context.task_gradient(&loaded.params, loaded.alphas.as_ref(), &task);
        let loss = report["query_loss"].as_f64().unwrap();
        assert!((ours.query_loss - loss).abs() <= TOLERANCE * loss, "{order} order: query loss {} vs {loss}", ours.query_loss);
        for (name, gradient) in loaded.params.names().iter().zip(&ours.w) {
            assert_close(gradient, get(&reference, &format!("grad/{name}")), &format!("{order}-order gradient of {name}"));
        }
        let (normal, reduce) = ours.theta.expect("a supernet's θ has gradients");
        assert_close(&normal, get(&reference, "grad/alphas_normal"), &format!("{order}-order gradient of θ normal"));
        assert_close(&reduce, get(&reference, "grad/alphas_reduce"), &format!("{order}-order gradient of θ reduce"));
        theta_gradients.push(normal);
    }
    // The two orders are different quantities here, so the check above tells them apart.
    assert!(relative_error(&theta_gradients[0], &theta_gradients[1]) > 1e-2, "second-order θ gradient equals first-order");
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
                let coarse = (Tensor::randn([14, 8], (Kind::Float, Device::Cpu)) * 2.0).round() / 2.0;
                let jitter = Tensor::randn([14, 8], (Kind::Float, Device::Cpu)) * if i % 2 == 0 { 0.0 } else { 1e-6 };
                (format!("{cell}_{i}"), coarse + jitter)
            })
            .collect()
    });
    let inputs = dir.path().join("alphas.safetensors");
    Tensor::write_safetensors(&named, &inputs).unwrap();
    let out = dir.path().join("genotypes.json");
    let status = Command::new(python()).arg(repo_path("tests/reference/decode_reference.py")).arg(&inputs).arg(&out).status().unwrap();
    assert!(status.success());
    let expected: Vec<Genotype> = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let space = SearchSpace::tnas_official(1, 28, 8);
    for (i, want) in expected.iter().enumerate() {
        let rows = |t: &Tensor| tnas::params::matrix_rows(&t.softmax(-1, Kind::Float));
        let got = Genotype::decode(&space, &rows(&named[2 * i].1), &rows(&named[2 * i + 1].1));
        assert_eq!(&got, want, "alphas #{i}");
    }
}
