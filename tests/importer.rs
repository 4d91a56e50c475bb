//! `tools/import_tnas_pytorch.py` on a checkpoint in the official T-NAS layout: the imported model
//! loads and gives the official network's transductive logits and genotype, before and after
//! adaptation.

mod common;

use common::{python, relative_error, repo_path, seeded, serve};
use std::process::Command;
use tch::{Device, Kind, Tensor};
use tnas::adapt::{BnMode, InnerLoop, SupportSet, TaskState};
use tnas::model::checkpoint::Checkpoint;
use tnas::nn::genotype::Genotype;

/// As the reference parity tests: the same computation in float32 on both sides.
const TOLERANCE: f64 = 1e-4;

fn run(args: &[&str]) {
    let status = Command::new(python())
        .args(args)
        .status()
        .expect("python runs");
    assert!(status.success(), "{args:?} failed");
}

#[test]
fn imported_official_checkpoint_reproduces_official_logits() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (support, query) = seeded(5, || {
        let image = |n: i64| Tensor::randn([n, 3, 32, 32], (Kind::Float, Device::Cpu));
        (image(10), image(6))
    });
    let labels =
        Tensor::arange(5, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(2, None, None);
    Tensor::write_safetensors(
        &[
            ("support", &support),
            ("support_labels", &labels),
            ("query", &query),
        ],
        path("inputs.safetensors"),
    )
    .unwrap();
    let maker = repo_path("tests/reference/make_official_checkpoint.py");
    run(&[
        maker.to_str().unwrap(),
        "--out",
        &path("official.pth"),
        "--inputs",
        &path("inputs.safetensors"),
        "--expected",
        &path("expected.safetensors"),
        "--steps",
        "3",
    ]);
    let importer = repo_path("tools/import_tnas_pytorch.py");
    run(&[
        importer.to_str().unwrap(),
        "--checkpoint",
        &path("official.pth"),
        "--out",
        &path("imported"),
        "--in-channels",
        "3",
        "--image-size",
        "32",
        "--init-channels",
        "8",
        "--n-way",
        "5",
        "--steps",
        "3",
    ]);

    let checkpoint = Checkpoint::load(&dir.path().join("imported"), Device::Cpu).unwrap();
    let expected: Vec<(String, Tensor)> =
        Tensor::read_safetensors(path("expected.safetensors")).unwrap();
    let expected = |name: &str| {
        expected
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .shallow_clone()
    };
    let network = checkpoint.network();
    let support_set = SupportSet {
        images: &support,
        labels: &labels,
        n_way: 5,
    };
    let (mut state, first_loss) = TaskState::start(
        &network,
        &checkpoint.params,
        checkpoint.alphas.as_ref(),
        checkpoint.meta.head,
        &support_set,
        Device::Cpu,
    );
    let initial = state.predict(&network, &support_set, &query, BnMode::Transductive);
    let err = relative_error(&initial, &expected("initial"));
    assert!(err <= TOLERANCE, "initial logits differ by {err:.2e}");
    let defaults = checkpoint.meta.adaptation;
    let inner = InnerLoop {
        steps: defaults.steps,
        lr_w: defaults.lr_w,
        lr_theta: defaults.lr_theta,
        second_order: false,
    };
    state
        .adapt(&support_set.on(&network), &inner, first_loss, &|| true)
        .unwrap();
    let adapted = state.predict(&network, &support_set, &query, BnMode::Transductive);
    let err = relative_error(&adapted, &expected("adapted"));
    assert!(err <= TOLERANCE, "adapted logits differ by {err:.2e}");
    let genotype: Genotype =
        serde_json::from_slice(&std::fs::read(path("expected.safetensors.json")).unwrap()).unwrap();
    assert_eq!(state.genotype(&network).unwrap(), genotype);
    assert_eq!(checkpoint.meta.adaptation.bn, BnMode::Transductive);
}

/// Random RGB PNGs and the exact network input the server makes of them, normalised as the
/// importer's default (the official mini-ImageNet loader's ImageNet mean and std) says.
fn png_task(count: usize, seed: u64) -> (Vec<Vec<u8>>, Tensor) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let spec = tnas::model::metadata::InputSpec {
        channels: 3,
        size: 32,
        mean: vec![0.485, 0.456, 0.406],
        std: vec![0.229, 0.224, 0.225],
        invert: false,
    };
    let mut pngs = Vec::new();
    let mut inputs = Vec::new();
    for _ in 0..count {
        let image =
            image::RgbImage::from_fn(32, 32, |_, _| image::Rgb([rng.gen(), rng.gen(), rng.gen()]));
        let mut bytes = Vec::new();
        image::DynamicImage::ImageRgb8(image)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
        let decoded =
            tnas::data::imaging::decode(&bytes, &tnas::data::imaging::ImageLimits::default())
                .unwrap();
        inputs.extend(tnas::data::imaging::to_input(&decoded, &spec));
        pngs.push(bytes);
    }
    (
        pngs,
        Tensor::from_slice(&inputs).view([count as i64, 3, 32, 32]),
    )
}

/// The same check through the server: PNGs over HTTP, `bn = transductive`, 0 and 3 steps.
#[test]
fn served_import_gives_the_official_logits_and_genotype() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (support_png, support) = png_task(10, 1);
    let (query_png, query) = png_task(6, 2);
    let labels =
        Tensor::arange(5, (Kind::Int64, Device::Cpu)).repeat_interleave_self_int(2, None, None);
    Tensor::write_safetensors(
        &[
            ("support", &support),
            ("support_labels", &labels),
            ("query", &query),
        ],
        path("inputs.safetensors"),
    )
    .unwrap();
    let maker = repo_path("tests/reference/make_official_checkpoint.py");
    run(&[
        maker.to_str().unwrap(),
        "--out",
        &path("official.pth"),
        "--inputs",
        &path("inputs.safetensors"),
        "--expected",
        &path("expected.safetensors"),
        "--steps",
        "3",
        "--seed",
        "4",
    ]);
    std::fs::create_dir(path("models")).unwrap();
    let importer = repo_path("tools/import_tnas_pytorch.py");
    run(&[
        importer.to_str().unwrap(),
        "--checkpoint",
        &path("official.pth"),
        "--out",
        &path("models/official"),
        "--in-channels",
        "3",
        "--image-size",
        "32",
        "--init-channels",
        "8",
        "--n-way",
        "5",
    ]);
    let url = serve(&dir.path().join("models"), &[]);

    let b64 = |b: &Vec<u8>| base64::engine::general_purpose::STANDARD.encode(b);
    let task = |steps: usize| {
        let support: Vec<serde_json::Value> = support_png
            .iter()
            .enumerate()
            .map(|(i, p)| serde_json::json!({"label": format!("class{}", i / 2), "image": b64(p)}))
            .collect();
        let query: Vec<serde_json::Value> = query_png
            .iter()
            .enumerate()
            .map(|(i, p)| serde_json::json!({"id": format!("q{i}"), "image": b64(p)}))
            .collect();
        serde_json::json!({"support": support, "query": query, "steps": steps, "bn": "transductive"})
    };
    let expected: Vec<(String, Tensor)> =
        Tensor::read_safetensors(path("expected.safetensors")).unwrap();
    let expected = |name: &str| {
        expected
            .iter()
            .find(|(n, _)| n == name)
            .unwrap()
            .1
            .shallow_clone()
    };
    for (steps, name) in [(0, "initial"), (3, "adapted")] {
        let body: serde_json::Value = reqwest::blocking::Client::new()
            .post(format!("{url}/adapt"))
            .json(&task(steps))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let logits: Vec<f32> = body["predictions"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|p| {
                p["logits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        let served = Tensor::from_slice(&logits).view([6, 5]);
        let err = relative_error(&served, &expected(name));
        assert!(
            err <= TOLERANCE,
            "{name}: served logits differ by {err:.2e}"
        );
        if steps == 3 {
            let genotype: Genotype = serde_json::from_value(body["genotype"].clone()).unwrap();
            let official: Genotype =
                serde_json::from_slice(&std::fs::read(path("expected.safetensors.json")).unwrap())
                    .unwrap();
            assert_eq!(genotype, official);
        }
    }
}
