//! `tools/import_tnas_pytorch.py` on a checkpoint in the official T-NAS layout: the imported model
//! loads and gives the official network's transductive logits and genotype, before and after
//! adaptation.

mod common;

use common::{python, relative_error, repo_path};
use std::process::Command;
use tch::{Device, Kind, Tensor};
use tnas::adapt::{BnMode, InnerLoop, SupportSet, TaskState};
use tnas::checkpoint::Checkpoint;
use tnas::genotype::Genotype;

fn run(args: &[&str]) {
    let status = Command::new(python()).args(args).status().expect("python runs");
    assert!(status.success(), "{args:?} failed");
}

#[test]
fn imported_official_checkpoint_reproduces_official_logits() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    tch::manual_seed(5);
    let support = Tensor::randn([10, 3, 32, 32], (Kind::Float, Device::Cpu));
    let labels = Tensor::arange(5, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(2, None, None);
    let query = Tensor::randn([6, 3, 32, 32], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(&[("support", &support), ("support_labels", &labels), ("query", &query)], path("inputs.safetensors")).unwrap();
    let maker = repo_path("tests/reference/make_official_checkpoint.py");
    run(&[maker.to_str().unwrap(), "--out", &path("official.pth"), "--inputs", &path("inputs.safetensors"), "--expected", &path("expected.safetensors"), "--steps", "3"]);
    let importer = repo_path("tools/import_tnas_pytorch.py");
    run(&[importer.to_str().unwrap(), "--checkpoint", &path("official.pth"), "--out", &path("imported"), "--in-channels", "3", "--image-size", "32", "--init-channels", "8", "--n-way", "5", "--steps", "3"]);

    let checkpoint = Checkpoint::load(&dir.path().join("imported"), Device::Cpu).unwrap();
    let expected: Vec<(String, Tensor)> = Tensor::read_safetensors(path("expected.safetensors")).unwrap();
    let expected = |name: &str| expected.iter().find(|(n, _)| n == name).unwrap().1.shallow_clone();
    let network = checkpoint.network();
    let support_set = SupportSet { images: &support, labels: &labels, n_way: 5 };
    let mut state = TaskState::start(&network, &checkpoint.params, checkpoint.alphas.as_ref(), checkpoint.meta.head, &support_set, Device::Cpu);
    let initial = state.predict(&network, &support_set, &query, BnMode::Transductive);
    assert!(relative_error(&initial, &expected("initial")) <= 2e-3, "initial logits differ");
    let defaults = checkpoint.meta.adaptation;
    let inner = InnerLoop { steps: defaults.steps, lr_w: defaults.lr_w, lr_theta: defaults.lr_theta, second_order: false };
    state.adapt(&network, &support_set, &inner, &|| true).unwrap();
    let adapted = state.predict(&network, &support_set, &query, BnMode::Transductive);
    let err = relative_error(&adapted, &expected("adapted"));
    assert!(err <= 2e-3, "adapted logits differ by {err:.2e}");
    let genotype: Genotype = serde_json::from_slice(&std::fs::read(path("expected.safetensors.json")).unwrap()).unwrap();
    assert_eq!(state.genotype(&network).unwrap(), genotype);
    assert_eq!(checkpoint.meta.adaptation.bn, BnMode::Transductive);
}
