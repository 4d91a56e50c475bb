//! `make bench`: adaptation latency next to PyTorch eager doing the same work, and server
//! throughput through real HTTP. Prints figures; asserts only that both sides computed the same
//! logits (so the comparison is of equal work).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use tnas::adapt::{BnMode, InnerLoop, SupportSet, TaskState};
use tnas::checkpoint::{param_specs, Checkpoint};
use tnas::metadata::{AdaptationDefaults, HeadSpec, InputSpec, ModelKind, ModelMeta, FORMAT_VERSION};
use tnas::network::Network;
use tnas::params::{matrix_rows, ParamSet};
use tnas::search_space::{SearchSpace, PRIMITIVES};
use tnas::supernet::{Alphas, Supernet};

const RUNS: usize = 20;
const STEPS: usize = 10;
const WAY: usize = 5;
const QUERIES: usize = 75;

fn repo(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A mini-ImageNet-sized supernet (3×84×84, C = 16, official stem) with PyTorch-default weights.
fn miniimagenet_sized(dir: &Path) -> PathBuf {
    tch::manual_seed(0);
    let space = SearchSpace::tnas_official(3, 84, 16);
    let head = HeadSpec::Fixed { n_way: WAY };
    let network = Network::Supernet(Supernet::new(space));
    let meta = ModelMeta {
        format_version: FORMAT_VERSION,
        name: "miniimagenet-sized".into(),
        kind: ModelKind::Supernet,
        primitives: PRIMITIVES.iter().map(|p| p.to_string()).collect(),
        search_space: Some(space),
        genotype: None,
        input: InputSpec { channels: 3, size: 84, mean: vec![0.0; 3], std: vec![1.0; 3], invert: false },
        head,
        adaptation: AdaptationDefaults { steps: STEPS, lr_w: 0.01, lr_theta: 30.0, bn: BnMode::Support },
        training: None,
        evaluation: Vec::new(),
        sha256: String::new(),
    };
    let params = ParamSet::initialise(&param_specs(&network, head), Device::Cpu);
    let mut checkpoint = Checkpoint { meta, params, alphas: Some(Alphas::initialise(&space, Device::Cpu)) };
    let out = dir.join("miniimagenet-sized");
    checkpoint.save(&out).expect("temp dir is writable");
    out
}

/// Our side: start, 10 steps, decode, predict 75 queries with support BN; milliseconds per run.
fn ours(checkpoint: &Checkpoint, support: &Tensor, labels: &Tensor, query: &Tensor) -> (Vec<f64>, Tensor) {
    let network = checkpoint.network();
    let set = SupportSet { images: support, labels, n_way: WAY };
    let a = checkpoint.meta.adaptation;
    let inner = InnerLoop { steps: STEPS, lr_w: a.lr_w, lr_theta: a.lr_theta, second_order: false };
    let run = || {
        let mut state = TaskState::start(&network, &checkpoint.params, checkpoint.alphas.as_ref(), checkpoint.meta.head, &set, Device::Cpu);
        state.adapt(&network, &set, &inner, &|| true).expect("not interrupted");
        let _genotype = state.genotype(&network);
        let logits = state.predict(&network, &set, query, BnMode::Support);
        let _rows = matrix_rows(&logits);
        logits
    };
    let _warm_up = run();
    let mut times = Vec::new();
    let mut last = Tensor::zeros([1], (Kind::Float, Device::Cpu));
    for _ in 0..RUNS {
        let start = Instant::now();
        last = run();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    (times, last)
}

fn pytorch(model_dir: &Path, inputs: &Path, out: &Path, threads: i32) -> (Vec<f64>, Tensor) {
    let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
    let output = Command::new(python)
        .arg(repo("bench/pytorch_eager.py"))
        .args(["--checkpoint", model_dir.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .args(["--steps", &STEPS.to_string(), "--runs", &RUNS.to_string(), "--threads", &threads.to_string()])
        .output()
        .expect("python runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    let times = report["ms"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let logits = Tensor::read_safetensors(out).unwrap().remove(0).1;
    (times, logits)
}

fn latency(model_dir: &Path, label: &str, threads: i32, scratch: &Path) {
    let checkpoint = Checkpoint::load(model_dir, Device::Cpu).expect("benchmark model loads");
    let input = &checkpoint.meta.input;
    let (c, s) = (input.channels as i64, input.size as i64);
    for shot in [1usize, 5] {
        tch::manual_seed(shot as i64);
        let support = Tensor::randn([(WAY * shot) as i64, c, s, s], (Kind::Float, Device::Cpu));
        let labels = Tensor::arange(WAY as i64, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(shot as i64, None, None);
        let query = Tensor::randn([QUERIES as i64, c, s, s], (Kind::Float, Device::Cpu));
        let inputs = scratch.join("inputs.safetensors");
        Tensor::write_safetensors(&[("support", &support), ("support_labels", &labels), ("query", &query)], &inputs).unwrap();
        let (mut mine, my_logits) = ours(&checkpoint, &support, &labels, &query);
        let (mut theirs, their_logits) = pytorch(model_dir, &inputs, &scratch.join("logits.safetensors"), threads);
        let diff = (&my_logits - &their_logits).abs().max().double_value(&[]) / their_logits.abs().max().double_value(&[]).max(1e-12);
        assert!(diff < 1e-3, "{label}: the two sides computed different logits (relative {diff:.1e})");
        mine.sort_by(f64::total_cmp);
        theirs.sort_by(f64::total_cmp);
        let (m50, t50) = (percentile(&mine, 0.5), percentile(&theirs, 0.5));
        println!(
            "| {label} | 5-way {shot}-shot | {m50:.1} | {:.1} | {t50:.1} | {:.1} | {:.2} | {diff:.1e} |",
            percentile(&mine, 0.95),
            percentile(&theirs, 0.95),
            m50 / t50
        );
    }
}

fn main() {
    let threads: i32 = std::env::var("TNAS_BENCH_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    tch::set_num_threads(threads);
    let scratch = tempfile::tempdir().unwrap();
    println!("adaptation: {STEPS} steps + decode + {QUERIES} query predictions (support BN), CPU, {threads} threads, {RUNS} runs");
    println!("| model | task | ours p50 ms | ours p95 ms | PyTorch eager p50 ms | PyTorch p95 ms | ours / PyTorch (p50) | logits rel. diff |");
    println!("|---|---|---|---|---|---|---|---|");
    let shipped = repo("models/omniglot-tnas");
    if shipped.join("model.json").exists() {
        latency(&shipped, "omniglot-tnas (shipped)", threads, scratch.path());
    }
    let mini = miniimagenet_sized(scratch.path());
    latency(&mini, "3×84×84, C=16", threads, scratch.path());
}
