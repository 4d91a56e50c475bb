//! Kept task models over real HTTP with real Omniglot PNGs and the shipped models: later
//! predictions answer as `/adapt` did, the downloaded model answers the same in a second
//! `tnas-server` process and in plain PyTorch (`tools/task_model.py`), and the store is bounded.

mod common;

use common::{b64, metric, omniglot_pngs, repo_path, serve, ServerProcess};
use reqwest::blocking::{multipart, Client};
use serde_json::{json, Value};
use std::io::Read;
use std::path::Path;
use tnas::data::imaging::{self, ImageLimits};
use tnas::model::checkpoint::{safetensors_bytes, Checkpoint};
use tnas::model::metadata::ModelMeta;

/// A models folder holding copies of shipped models.
fn shipped(names: &[&str]) -> tempfile::TempDir {
    let models = tempfile::tempdir().unwrap();
    for name in names {
        let to = models.path().join(name);
        std::fs::create_dir(&to).unwrap();
        for file in ["model.json", "model.safetensors"] {
            std::fs::copy(repo_path(&format!("models/{name}/{file}")), to.join(file)).unwrap();
        }
    }
    models
}

/// A 5-way 1-shot task of Latin (held out of training): drawing 0 of each class as its support
/// image, drawings 1..=3 as queries.
struct Task {
    pngs: Vec<Vec<Vec<u8>>>,
}

impl Task {
    fn new() -> Task {
        Task {
            pngs: omniglot_pngs("Latin", 5, 4),
        }
    }

    fn support(&self) -> Vec<Value> {
        self.pngs
            .iter()
            .enumerate()
            .map(|(c, d)| json!({"label": format!("c{c}"), "image": b64(&d[0])}))
            .collect()
    }

    fn queries(&self) -> Vec<(String, &[u8])> {
        self.pngs
            .iter()
            .enumerate()
            .flat_map(|(c, d)| {
                d[1..]
                    .iter()
                    .enumerate()
                    .map(move |(i, png)| (format!("c{c}q{i}"), png.as_slice()))
            })
            .collect()
    }

    fn query_json(&self) -> Vec<Value> {
        self.queries()
            .into_iter()
            .map(|(id, png)| json!({"id": id, "image": b64(png)}))
            .collect()
    }

    fn adapt_body(&self, options: Value) -> Value {
        let mut body = json!({"support": self.support(), "query": self.query_json()});
        body.as_object_mut()
            .unwrap()
            .extend(options.as_object().unwrap().clone());
        body
    }
}

fn post(url: &str, body: &Value) -> (u16, Value) {
    let response = Client::new().post(url).json(body).send().unwrap();
    (response.status().as_u16(), response.json().unwrap())
}

fn post_multipart(url: &str, form: multipart::Form) -> Value {
    Client::new()
        .post(url)
        .multipart(form)
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn logits(response: &Value) -> Vec<Vec<f64>> {
    response["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn assert_close(ours: &[Vec<f64>], expected: &[Vec<f64>], what: &str) {
    assert_eq!(ours.len(), expected.len(), "{what}: query count");
    for (a, b) in ours.iter().flatten().zip(expected.iter().flatten()) {
        assert!(
            (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
            "{what}: {a} against {b}"
        );
    }
}

/// Unzips a downloaded task model into `models`, returning its folder name.
fn unzip(archive: &[u8], models: &Path) -> String {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(archive)).unwrap();
    let mut folder = String::new();
    for i in 0..zip.len() {
        let mut file = zip.by_index(i).unwrap();
        let path = models.join(file.enclosed_name().unwrap());
        folder = file.name().split('/').next().unwrap().to_string();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    folder
}

/// The task's query images as the server decodes them, in a safetensors file for the PyTorch tool.
fn query_tensors(task: &Task, meta: &ModelMeta, path: &Path) {
    let values: Vec<f32> = task
        .queries()
        .iter()
        .flat_map(|(_, png)| {
            let image = imaging::decode(png, &ImageLimits::DEFAULT).unwrap();
            imaging::to_input(&image, &meta.input)
        })
        .collect();
    let (c, s) = (meta.input.channels as i64, meta.input.size as i64);
    let tensor = tch::Tensor::from_slice(&values).view([-1, c, s, s]);
    std::fs::write(
        path,
        safetensors_bytes(&[("query".into(), tensor)]).unwrap(),
    )
    .unwrap();
}

/// The logits `tools/task_model.py` gives for the task's queries with the model in `dir`.
fn pytorch_logits(dir: &Path, queries: &Path) -> Vec<Vec<f64>> {
    let output = std::process::Command::new(common::python())
        .arg(repo_path("tools/task_model.py"))
        .arg(dir)
        .arg(queries)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn a_kept_task_predicts_as_its_adaptation_did_and_its_download_answers_the_same_elsewhere() {
    let models = shipped(&["omniglot-tnas", "omniglot-tnas-hard"]);
    let url = serve(models.path(), &["--max-steps", "20"]);
    let task = Task::new();
    let downloads = tempfile::tempdir().unwrap();
    let cases = [
        ("omniglot-tnas", json!({"predict_with": "supernet"})),
        (
            "omniglot-tnas",
            json!({"predict_with": "supernet", "views": 5}),
        ),
        (
            "omniglot-tnas",
            json!({"predict_with": "derived", "finetune_steps": 3}),
        ),
        ("omniglot-tnas-hard", json!({"predict_with": "derived"})),
        (
            "omniglot-tnas-hard",
            json!({"predict_with": "derived", "views": 3}),
        ),
    ];
    let mut kept = Vec::new();
    for (model, options) in cases {
        let mut options = options;
        options["model"] = json!(model);
        let (status, adapted) = post(&format!("{url}/adapt"), &task.adapt_body(options.clone()));
        assert_eq!(status, 200, "{adapted}");
        assert_eq!(adapted["task_model_kept"], true);
        let id = adapted["task_id"].as_str().unwrap().to_string();
        let expected = logits(&adapted);

        let (status, predicted) = post(
            &format!("{url}/tasks/{id}/predict"),
            &json!({"query": task.query_json()}),
        );
        assert_eq!(status, 200, "{predicted}");
        assert_close(
            &logits(&predicted),
            &expected,
            &format!("{options}: JSON prediction"),
        );
        assert_eq!(predicted["labels"], adapted["labels"]);
        let form = task
            .queries()
            .into_iter()
            .fold(multipart::Form::new(), |form, (id, png)| {
                form.part("query", multipart::Part::bytes(png.to_vec()).file_name(id))
            });
        let multipart = post_multipart(&format!("{url}/tasks/{id}/predict"), form);
        assert_close(
            &logits(&multipart),
            &expected,
            &format!("{options}: multipart prediction"),
        );
        let (adapt_ms, predict_ms) = (
            adapted["timing_ms"]["total"].as_f64().unwrap(),
            predicted["timing_ms"]["total"].as_f64().unwrap(),
        );
        println!("{options}: /adapt {adapt_ms:.1} ms, /tasks/{{id}}/predict {predict_ms:.1} ms");
        let worker = |t: &Value, parts: &[&str]| {
            parts
                .iter()
                .map(|p| t["timing_ms"][p].as_f64().unwrap())
                .sum::<f64>()
        };
        assert!(
            worker(&predicted, &["load", "predict"])
                < worker(&adapted, &["adapt", "predict"]) / 2.0,
            "a prediction is one forward pass: {predicted}"
        );

        let archive = Client::new()
            .get(format!("{url}/tasks/{id}/model"))
            .send()
            .unwrap();
        assert_eq!(archive.status(), 200);
        assert_eq!(archive.headers()["content-type"], "application/zip");
        let folder = unzip(&archive.bytes().unwrap(), downloads.path());
        kept.push((folder, adapted, expected, options));
    }
    let (one_view, five_views) = (&kept[0].2, &kept[1].2);
    assert!(
        one_view
            .iter()
            .flatten()
            .zip(five_views.iter().flatten())
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "test-time views change the answer"
    );

    let elsewhere = ServerProcess::start(downloads.path(), &["--device", "cpu"]);
    let queries = downloads.path().join("queries.safetensors");
    for (folder, adapted, expected, options) in &kept {
        let dir = downloads.path().join(folder);
        let checkpoint = Checkpoint::load(&dir, tch::Device::Cpu).expect("the download loads");
        let meta = checkpoint.meta;
        assert_eq!(
            meta.task.as_ref().unwrap().labels,
            serde_json::from_value::<Vec<String>>(adapted["labels"].clone()).unwrap()
        );
        // The download answers with the views it was adapted with, as its own default, and takes
        // no further steps unless asked: at default options it gives the kept model's answer.
        assert_eq!(
            meta.adaptation.views as u64,
            options["views"].as_u64().unwrap_or(1)
        );
        assert_eq!(meta.adaptation.steps, 0, "a task model is adapted already");
        let options = json!({"model": meta.name});
        let (status, served) = post(
            &format!("{}/adapt", elsewhere.url),
            &task.adapt_body(options),
        );
        assert_eq!(status, 200, "{served}");
        assert_close(
            &logits(&served),
            expected,
            &format!("{folder} served by a second server"),
        );
        if meta.genotype.is_some() {
            assert_eq!(
                meta.genotype.as_ref().map(|g| json!(g)),
                Some(adapted["genotype"].clone())
            );
            query_tensors(&task, &meta, &queries);
            assert_close(
                &pytorch_logits(&dir, &queries),
                expected,
                &format!("{folder} in PyTorch"),
            );
        }
    }
}

/// The bytes one kept task model of the shipped supernet takes: its weights and θ, its support
/// images and its model.json (about 0.86 MB).
const SUPERNET_TASK_BYTES: usize = 870_000;

#[test]
fn the_store_evicts_the_least_recently_used_and_stays_within_its_bytes() {
    let models = shipped(&["omniglot-tnas"]);
    let budget = 2 * SUPERNET_TASK_BYTES + SUPERNET_TASK_BYTES / 2;
    let url = serve(models.path(), &["--task-store-bytes", &budget.to_string()]);
    let task = Task::new();
    let adapt = |options: Value| {
        let (status, body) = post(&format!("{url}/adapt"), &task.adapt_body(options));
        assert_eq!(status, 200, "{body}");
        body
    };
    let predict = |id: &str| {
        post(
            &format!("{url}/tasks/{id}/predict"),
            &json!({"query": task.query_json()}),
        )
    };
    let ids: Vec<String> = (0..2)
        .map(|_| {
            adapt(json!({"steps": 1}))["task_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        predict(&ids[0]).0,
        200,
        "the first is now the most recently used"
    );
    let third = adapt(json!({"steps": 1}));
    assert_eq!(third["task_model_kept"], true);
    let (status, evicted) = predict(&ids[1]);
    assert_eq!(status, 404, "the least recently used went: {evicted}");
    let message = evicted["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("evicted") && message.contains("POST /adapt again"),
        "{message}"
    );
    assert_eq!(predict(&ids[0]).0, 200);
    assert_eq!(predict(third["task_id"].as_str().unwrap()).0, 200);
    let download = Client::new()
        .get(format!("{url}/tasks/{}/model", ids[1]))
        .send()
        .unwrap();
    assert_eq!(download.status(), 404);

    let bytes = metric(&url, "tnas_task_store_bytes");
    assert!(
        bytes > 0.0 && bytes <= budget as f64,
        "{bytes} over {budget}"
    );
    assert!(metric(&url, "tnas_task_store_evictions_total") >= 1.0);
    assert!(metric(&url, "tnas_task_store_lookups_total{outcome=\"miss\"}") >= 1.0);

    let unkept = adapt(json!({"steps": 1, "keep": false}));
    assert_eq!(unkept["task_model_kept"], false);
    assert_eq!(predict(unkept["task_id"].as_str().unwrap()).0, 404);

    let tiny = serve(models.path(), &["--task-store-bytes", "100000"]);
    let (status, body) = post(
        &format!("{tiny}/adapt"),
        &task.adapt_body(json!({"steps": 1})),
    );
    assert_eq!(
        (status, &body["task_model_kept"]),
        (200, &json!(false)),
        "over the whole budget: not kept"
    );
}

#[test]
fn bad_predictions_get_clear_4xx_and_the_server_keeps_serving() {
    let models = shipped(&["omniglot-tnas"]);
    let url = serve(models.path(), &["--max-images", "12"]);
    let task = Task::new();
    let small = Task {
        pngs: task.pngs.iter().map(|d| d[..2].to_vec()).collect(),
    };
    let (status, adapted) = post(
        &format!("{url}/adapt"),
        &small.adapt_body(json!({"steps": 1})),
    );
    assert_eq!(status, 200, "{adapted}");
    let id = adapted["task_id"].as_str().unwrap();
    let predict = |id: &str, body: Value| post(&format!("{url}/tasks/{id}/predict"), &body);
    let one = json!([{"id": "q", "image": b64(&task.pngs[0][1])}]);
    let cases = [
        (
            uuid::Uuid::new_v4().to_string(),
            json!({"query": one}),
            404,
            "not_found",
        ),
        (
            "not-a-uuid".to_string(),
            json!({"query": one}),
            404,
            "not_found",
        ),
        (
            id.to_string(),
            json!({"query": one, "model": "other"}),
            422,
            "wrong_model",
        ),
        (id.to_string(), json!({"query": []}), 422, "empty_query"),
        (
            id.to_string(),
            json!({"query": one, "steps": 3}),
            400,
            "invalid_field",
        ),
        (
            id.to_string(),
            json!({"query": [{"id": "q", "image": "%%%"}]}),
            400,
            "invalid_base64",
        ),
        (
            id.to_string(),
            json!({"query": [{"id": "q", "image": b64(b"not a png")}]}),
            400,
            "invalid_image",
        ),
        (
            id.to_string(),
            json!({"query": [one[0].clone(), one[0].clone()]}),
            422,
            "duplicate_query_id",
        ),
        (
            id.to_string(),
            json!({"query": task.query_json()}),
            413,
            "payload_too_large",
        ),
    ];
    for (task_id, body, status, code) in cases {
        let (got, answer) = predict(&task_id, body);
        assert_eq!(
            (got, answer["error"]["code"].as_str().unwrap()),
            (status, code),
            "{answer}"
        );
    }
    let support = multipart::Form::new()
        .part(
            "support[a]",
            multipart::Part::bytes(task.pngs[0][0].clone()).file_name("a.png"),
        )
        .part(
            "query",
            multipart::Part::bytes(task.pngs[0][1].clone()).file_name("q.png"),
        );
    let answer = post_multipart(&format!("{url}/tasks/{id}/predict"), support);
    assert_eq!(answer["error"]["code"], "support_in_prediction", "{answer}");
    let rgb = {
        let mut png = Vec::new();
        image::DynamicImage::new_rgb8(60, 40)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png
    };
    let (status, answer) = predict(id, json!({"query": [{"id": "rgb", "image": b64(&rgb)}]}));
    assert_eq!(
        status, 200,
        "another size and channel count is converted as /adapt converts it: {answer}"
    );
    assert_eq!(predict(id, json!({"query": one})).0, 200);
}
