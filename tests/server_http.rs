//! The adaptation server over real HTTP on loopback, with real Omniglot PNGs.

mod common;

use common::{b64, omniglot_pngs, random_supernet, serve};
use reqwest::blocking::{multipart, Client};
use serde_json::{json, Value};
use std::sync::OnceLock;
use tnas::model::metadata::HeadSpec;
use tnas::nn::search_space::SearchSpace;

/// A server over a random proto-head fixture model, with its model directory kept alive.
struct TestServer {
    url: String,
    _models: tempfile::TempDir,
}

fn start(extra_args: &[&str]) -> TestServer {
    let models = tempfile::tempdir().unwrap();
    let space = SearchSpace {
        stem_pools: 2,
        ..SearchSpace::tnas_official(1, 28, 8)
    };
    let mut checkpoint = random_supernet(
        space,
        HeadSpec::Proto {
            max_way: 20,
            learned_scale: false,
        },
        7,
        1.0,
    );
    checkpoint.meta.name = "fixture".into();
    checkpoint.save(&models.path().join("fixture")).unwrap();
    let url = serve(models.path(), extra_args);
    TestServer {
        url,
        _models: models,
    }
}

fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| start(&["--max-steps", "20", "--max-body-bytes", "4000000"]))
}

/// A 3-way 1-shot task from Greek: support images drawer 0, queries drawers 1 and 2.
fn task_json(steps: usize) -> Value {
    let pngs = omniglot_pngs("Greek", 3, 3);
    let labels = ["alpha", "beta", "gamma"];
    let support: Vec<Value> = pngs
        .iter()
        .zip(labels)
        .map(|(imgs, l)| json!({"label": l, "image": b64(&imgs[0])}))
        .collect();
    let query: Vec<Value> = pngs
        .iter()
        .enumerate()
        .flat_map(|(c, imgs)| {
            (1..3).map(move |i| json!({"id": format!("q{c}{i}"), "image": b64(&imgs[i])}))
        })
        .collect();
    json!({"support": support, "query": query, "steps": steps})
}

fn post_json(body: &Value) -> reqwest::blocking::Response {
    Client::new()
        .post(format!("{}/adapt", server().url))
        .json(body)
        .send()
        .unwrap()
}

#[test]
fn json_adaptation_returns_genotype_and_predictions() {
    let response = post_json(&task_json(2));
    assert_eq!(response.status(), 200);
    let body: Value = response.json().unwrap();
    assert_eq!(body["labels"], json!(["alpha", "beta", "gamma"]));
    assert_eq!(body["model"], "fixture");
    assert_eq!(body["steps"], 2);
    assert_eq!(body["device"], "cpu");
    assert_eq!(body["cuda_graph"], false, "the CPU adapts eagerly");
    assert_eq!(body["genotype_stored"], true, "the memory store kept it");
    assert_eq!(body["genotype"]["normal"].as_array().unwrap().len(), 8);
    assert_eq!(body["alphas"]["normal"].as_array().unwrap().len(), 14);
    let predictions = body["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 6);
    for p in predictions {
        let probs: Vec<f64> = p["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(probs.len(), 3);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4);
        assert!(["alpha", "beta", "gamma"].contains(&p["label"].as_str().unwrap()));
    }
    assert!(
        body["timing_ms"]["total"].as_f64().unwrap()
            >= body["timing_ms"]["adapt"].as_f64().unwrap()
    );
}

/// The most test-time views a request may ask for answer a real task, with probabilities.
#[test]
fn nine_test_time_views_answer() {
    let mut body = task_json(1);
    body["views"] = json!(9);
    let response = post_json(&body);
    assert_eq!(response.status(), 200);
    let body: Value = response.json().unwrap();
    for p in body["predictions"].as_array().unwrap() {
        let probs = p["probabilities"].as_array().unwrap();
        let sum: f64 = probs.iter().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-4, "{p}");
    }
}

#[test]
fn multipart_adaptation_matches_json() {
    let pngs = omniglot_pngs("Greek", 3, 2);
    let mut form = multipart::Form::new();
    for (label, imgs) in ["alpha", "beta", "gamma"].iter().zip(&pngs) {
        form = form.part(
            format!("support[{label}]"),
            multipart::Part::bytes(imgs[0].clone())
                .file_name("s.png")
                .mime_str("image/png")
                .unwrap(),
        );
    }
    for (c, imgs) in pngs.iter().enumerate() {
        form = form.part(
            "query",
            multipart::Part::bytes(imgs[1].clone())
                .file_name(format!("query-{c}.png"))
                .mime_str("image/png")
                .unwrap(),
        );
    }
    form = form.text(
        "options",
        r#"{"steps": 1, "predict_with": "derived", "finetune_steps": 1}"#,
    );
    let response = Client::new()
        .post(format!("{}/adapt", server().url))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().unwrap();
    assert_eq!(body["labels"], json!(["alpha", "beta", "gamma"]));
    let ids: Vec<&str> = body["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["query-0.png", "query-1.png", "query-2.png"]);
}

#[test]
fn base64_wrapped_at_76_columns_as_mime_writes_it_is_accepted() {
    let mut task = task_json(1);
    for part in ["support", "query"] {
        for image in task[part].as_array_mut().unwrap() {
            let text = image["image"].as_str().unwrap().to_string();
            let lines: Vec<&str> = text
                .as_bytes()
                .chunks(76)
                .map(|line| std::str::from_utf8(line).unwrap())
                .collect();
            image["image"] = json!(lines.join("\r\n"));
        }
    }
    let response = post_json(&task);
    assert_eq!(response.status(), 200, "{:?}", response.text());
}

#[test]
fn support_bn_makes_a_query_independent_of_the_others() {
    let mut full = task_json(1);
    let first_query = full["query"][0].clone();
    let everything: Value = post_json(&full).json().unwrap();
    full["query"] = json!([first_query]);
    let alone: Value = post_json(&full).json().unwrap();
    let logits = |v: &Value| -> Vec<f64> {
        v["predictions"][0]["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    for (a, b) in logits(&everything).iter().zip(logits(&alone)) {
        assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{a} vs {b}");
    }
}

#[test]
fn genotype_can_be_fetched_as_json_python_and_svg() {
    let body: Value = post_json(&task_json(1)).json().unwrap();
    let id = body["task_id"].as_str().unwrap();
    let url = &server().url;
    let record = |task_id: &str| -> Value {
        Client::new()
            .get(format!("{url}/genotypes/{task_id}"))
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let fetched = record(id);
    assert_eq!(fetched["genotype"], body["genotype"]);
    assert_eq!(fetched["n_way"], 3);
    assert_eq!(fetched["k_shot"], 1);
    // Another spelling of the same UUID names the same task.
    for spelling in [id.to_uppercase(), format!("urn:uuid:{id}")] {
        assert_eq!(record(&spelling)["task_id"], id, "{spelling}");
    }
    let python = Client::new()
        .get(format!("{url}/genotypes/{id}?format=python"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(python.starts_with("Genotype(normal=[('"), "{python}");
    let unknown_format = Client::new()
        .get(format!("{url}/genotypes/{id}?format=xml"))
        .send()
        .unwrap();
    assert_eq!(unknown_format.status(), 400);
    assert_eq!(
        unknown_format.json::<Value>().unwrap()["error"]["code"],
        "invalid_format"
    );
    let svg = Client::new()
        .get(format!("{url}/genotypes/{id}/svg"))
        .send()
        .unwrap();
    assert_eq!(svg.headers()["content-type"], "image/svg+xml");
    let svg = svg.text().unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("c_{k-2}") && svg.contains("palegoldenrod"));
    let recent: Value = Client::new()
        .get(format!("{url}/genotypes?limit=1"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(recent.as_array().unwrap().len(), 1);
}

/// A valid all-black grayscale PNG of `width` × `height` (small: it compresses to almost nothing).
fn blank_png(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::DynamicImage::from(image::GrayImage::new(width, height))
        .write_to(&mut bytes, image::ImageFormat::Png)
        .unwrap();
    bytes.into_inner()
}

/// The budgets' messages name the flag that raises them.
#[test]
fn budget_refusals_name_their_flag() {
    let large = b64(&blank_png(2048, 2048));
    let mut task = task_json(1);
    task["query"] = (0..9)
        .map(|i| json!({"id": format!("large{i}"), "image": large}))
        .collect();
    let sent = std::time::Instant::now();
    let response = post_json(&task);
    assert!(
        sent.elapsed().as_millis() < 2000,
        "refused from the headers, not after decoding: {:?}",
        sent.elapsed()
    );
    assert_eq!(response.status(), 413);
    let message = response.json::<Value>().unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("37781811 pixels") && message.contains("--max-request-pixels"),
        "{message}"
    );
    let mut task = task_json(1);
    task["support"][0]["label"] = json!("x".repeat(300));
    let message = post_json(&task).json::<Value>().unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("300 bytes") && message.contains("--max-label-bytes"),
        "{message}"
    );
}

/// The genotype store keeps to its byte bound: long labels evict older records.
#[test]
fn the_genotype_store_is_bounded_in_bytes() {
    let small = start(&["--genotype-store-bytes", "3000"]);
    let mut task = task_json(1);
    for (i, label) in ["alpha", "beta", "gamma"].iter().enumerate() {
        task["support"][i]["label"] = json!(format!("{label}-{}", "x".repeat(240)));
    }
    let ids: Vec<String> = (0..4)
        .map(|_| {
            let answer: Value = Client::new()
                .post(format!("{}/adapt", small.url))
                .json(&task)
                .send()
                .unwrap()
                .json()
                .unwrap();
            answer["task_id"].as_str().unwrap().to_string()
        })
        .collect();
    let found = |id: &str| {
        Client::new()
            .get(format!("{}/genotypes/{id}", small.url))
            .send()
            .unwrap()
            .status()
            == 200
    };
    assert!(
        !found(&ids[0]),
        "the oldest record was evicted to keep the store within 3000 bytes"
    );
    assert!(found(&ids[3]));
    let listed: Value = Client::new()
        .get(format!("{}/genotypes?limit=1000", small.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let listed_bytes: usize = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.to_string().len())
        .sum();
    assert!(listed_bytes <= 3000, "{listed_bytes} bytes listed");
}

/// A valid 67-byte grayscale PNG whose header declares 100 000 × 100 000 pixels (CRCs correct):
/// decoding it would need 10 GB.
const PNG_DECLARING_100K_SQUARE: &str =
    "iVBORw0KGgoAAAANSUhEUgABhqAAAYagCAAAAACNOVQUAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg==";

/// A valid grayscale PNG whose header declares 2³¹ × 1 pixels: over the pixel limit (413), though
/// the PNG decoder's own memory limit would call it something else.
const PNG_DECLARING_2_31_BY_1: &str =
    "iVBORw0KGgoAAAANSUhEUoAAAAAAAAABCAAAAAB11tV8AAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg==";

/// Every error path of the HTTP contract (docs/HTTP_API.md): status, code, and the server still serves.
#[test]
fn errors_are_specific_and_the_server_keeps_serving() {
    let url = &server().url;
    let client = Client::new();
    let valid = task_json(1);
    let with = |key: &str, value: Value| {
        let mut v = valid.clone();
        v[key] = value;
        v
    };
    let not_png = b64(b"definitely not an image");
    let png = &valid["query"][0]["image"];
    let truncated = b64(&omniglot_pngs("Greek", 1, 1)[0][0][..60]);
    let query_with = |image: &str| with("query", json!([{"id": "q", "image": image}]));
    let query_with_id = |id: &str| with("query", json!([{"id": id, "image": png}]));
    let too_many: Vec<Value> = (0..600)
        .map(|i| json!({"id": format!("q{i}"), "image": png}))
        .collect();
    // With the 3 support images, 60 images: 540 forwarded at 9 views, over the limit of 512.
    let mut fifty_seven_at_nine_views = with("query", json!(too_many[..57]));
    fifty_seven_at_nine_views["views"] = json!(9);
    let multipart = |body: Vec<u8>| {
        client
            .post(format!("{url}/adapt"))
            .header("content-type", "multipart/form-data; boundary=XYZ")
            .body(body)
    };
    // Nine valid 2048 × 2048 pictures of about 5 KB each: 37.7 million pixels with the support set, over the default
    // per-request budget, which is checked from their headers before any is decoded.
    let large = b64(&blank_png(2048, 2048));
    let nine_large: Vec<Value> = (0..9)
        .map(|i| json!({"id": format!("large{i}"), "image": large}))
        .collect();
    let options_part = |steps: usize| {
        format!("--XYZ\r\nContent-Disposition: form-data; name=\"options\"\r\n\r\n{{\"steps\": {steps}}}\r\n")
    };
    let two_options = options_part(1) + &options_part(2) + "--XYZ--\r\n";
    let long_name = "x".repeat(10_000);
    let long_label = json!([{"label": long_name, "image": png}, valid["support"][1]]);
    let junk_query_part = [
        &b"--XYZ\r\nContent-Disposition: form-data; name=\"query\"; filename=\"a.png\"\r\n\r\n"[..],
        &[b'x'; 3_000_000],
        b"\r\n--XYZ--\r\n",
    ]
    .concat();
    let cases: Vec<(&str, reqwest::blocking::RequestBuilder, u16, &str)> = vec![
        ("invalid json", client.post(format!("{url}/adapt")).header("content-type", "application/json").body("{not json"), 400, "invalid_json"),
        ("wrong media type", client.post(format!("{url}/adapt")).header("content-type", "text/plain").body("hi"), 415, "unsupported_media_type"),
        ("no media type", client.post(format!("{url}/adapt")).body(valid.to_string()), 415, "unsupported_media_type"),
        ("multipart part without a name", multipart("--XYZ\r\nContent-Disposition: form-data\r\n\r\nx\r\n--XYZ--\r\n".into()), 400, "invalid_multipart"),
        ("multipart part unknown", multipart("--XYZ\r\nContent-Disposition: form-data; name=\"labels\"\r\n\r\nx\r\n--XYZ--\r\n".into()), 400, "unknown_part"),
        ("multipart cut short", multipart("--XYZ\r\nContent-Disposition: form-data; name=\"query\"; filename=\"a.png\"\r\n\r\nabc".into()), 400, "invalid_multipart"),
        ("broken base64", client.post(format!("{url}/adapt")).json(&with("query", json!([{"id": "q", "image": "%%%"}]))), 400, "invalid_base64"),
        ("not an image", client.post(format!("{url}/adapt")).json(&query_with(&not_png)), 400, "invalid_image"),
        ("truncated PNG", client.post(format!("{url}/adapt")).json(&query_with(&truncated)), 400, "invalid_image"),
        ("zero-byte image", client.post(format!("{url}/adapt")).json(&query_with("")), 400, "invalid_image"),
        ("decompression bomb", client.post(format!("{url}/adapt")).json(&query_with(PNG_DECLARING_100K_SQUARE)), 413, "payload_too_large"),
        ("2^31 x 1 PNG", client.post(format!("{url}/adapt")).json(&query_with(PNG_DECLARING_2_31_BY_1)), 413, "payload_too_large"),
        ("JSON-ish media type", client.post(format!("{url}/adapt")).header("content-type", "application/jsonfoo").body(valid.to_string()), 415, "unsupported_media_type"),
        ("two options parts", multipart(two_options.into()), 400, "duplicate_part"),
        ("request pixels over budget", client.post(format!("{url}/adapt")).json(&with("query", json!(nine_large))), 413, "payload_too_large"),
        ("label over its limit", client.post(format!("{url}/adapt")).json(&with("support", long_label)), 422, "name_too_long"),
        ("query id over its limit", client.post(format!("{url}/adapt")).json(&query_with_id(&long_name)), 422, "name_too_long"),
        ("genotype list limit over the cap", client.get(format!("{url}/genotypes?limit=1000000")), 400, "limit_over_cap"),
        ("too many images", client.post(format!("{url}/adapt")).json(&with("query", json!(too_many))), 413, "payload_too_large"),
        ("empty query", client.post(format!("{url}/adapt")).json(&with("query", json!([]))), 422, "empty_query"),
        ("empty label", client.post(format!("{url}/adapt")).json(&with("support", json!([{"label": " ", "image": png}, valid["support"][1]]))), 422, "invalid_label"),
        ("empty support", client.post(format!("{url}/adapt")).json(&with("support", json!([]))), 422, "empty_support"),
        ("one class", client.post(format!("{url}/adapt")).json(&with("support", json!([valid["support"][0]]))), 422, "wrong_class_count"),
        ("steps over limit", client.post(format!("{url}/adapt")).json(&with("steps", json!(1000))), 422, "steps_over_limit"),
        ("finetune steps over limit", client.post(format!("{url}/adapt")).json(&with("finetune_steps", json!(21))), 422, "steps_over_limit"),
        ("no views", client.post(format!("{url}/adapt")).json(&with("views", json!(0))), 422, "invalid_views"),
        ("more views than shifts", client.post(format!("{url}/adapt")).json(&with("views", json!(10))), 422, "invalid_views"),
        ("images × views over the image limit", client.post(format!("{url}/adapt")).json(&fifty_seven_at_nine_views), 413, "payload_too_large"),
        ("negative steps", client.post(format!("{url}/adapt")).json(&with("steps", json!(-1))), 400, "invalid_field"),
        ("negative lr", client.post(format!("{url}/adapt")).json(&with("lr_w", json!(-1.0))), 422, "invalid_learning_rate"),
        ("huge lr", client.post(format!("{url}/adapt")).json(&with("lr_theta", json!(1e300))), 422, "invalid_learning_rate"),
        ("infinite lr", client.post(format!("{url}/adapt")).header("content-type", "application/json").body(valid.to_string().replacen('{', "{\"lr_w\": 1e999,", 1)), 400, "invalid_json"),
        ("NaN lr", client.post(format!("{url}/adapt")).header("content-type", "application/json").body(valid.to_string().replacen('{', "{\"lr_w\": NaN,", 1)), 400, "invalid_json"),
        ("duplicate ids", client.post(format!("{url}/adapt")).json(&with("query", json!([valid["query"][0], valid["query"][0]]))), 422, "duplicate_query_id"),
        ("unknown model", client.post(format!("{url}/adapt")).json(&with("model", json!("nope"))), 404, "not_found"),
        ("unknown field", client.post(format!("{url}/adapt")).json(&with("stpes", json!(3))), 400, "invalid_field"),
        // The configured 4 MB limit, not axum's 2 MiB default, is the one that bites, for both
        // body kinds: a 3 MB body is read and refused for what it holds, not for its size.
        ("JSON body over axum's default, under ours", client.post(format!("{url}/adapt")).header("content-type", "application/json").body(vec![b' '; 3_000_000]), 400, "invalid_json"),
        ("multipart body over axum's default, under ours", multipart(junk_query_part), 422, "empty_support"),
        ("malformed genotype id", client.get(format!("{url}/genotypes/not-a-uuid")), 404, "not_found"),
        ("malformed genotype list limit", client.get(format!("{url}/genotypes?limit=-1")), 400, "invalid_query"),
        ("unknown genotype query parameter", client.get(format!("{url}/genotypes/{}?fromat=python", uuid::Uuid::new_v4())), 400, "invalid_query"),
        ("undecodable path", client.get(format!("{url}/models/%FF")), 400, "invalid_path"),
        ("wrong method", client.get(format!("{url}/adapt")), 405, "method_not_allowed"),
        ("unknown genotype id", client.get(format!("{url}/genotypes/{}", uuid::Uuid::new_v4())), 404, "not_found"),
        ("unknown model name", client.get(format!("{url}/models/nope")), 404, "not_found"),
        ("unknown route", client.get(format!("{url}/nope")), 404, "not_found"),
    ];
    for (name, request, status, code) in cases {
        let sent = std::time::Instant::now();
        let response = request.send().unwrap();
        assert!(
            sent.elapsed().as_secs() < 5,
            "{name}: refusing took {:?}",
            sent.elapsed()
        );
        assert_eq!(response.status().as_u16(), status, "{name}");
        let body: Value = response
            .json()
            .unwrap_or_else(|e| panic!("{name}: body is not JSON: {e}"));
        assert_eq!(body["error"]["code"], code, "{name}: {body}");
        assert!(
            !body["error"]["message"].as_str().unwrap().is_empty(),
            "{name}"
        );
        assert_eq!(
            post_json(&valid).status(),
            200,
            "next valid request after {name}"
        );
    }
}

/// Sends only the headers and the first byte of a request that declares `length` body bytes and
/// reads the answer: an oversized body must be refused before the server reads it, and a body
/// that never finishes arriving must meet the request's deadline.
fn declared_only(url: &str, content_type: &str, length: usize) -> (u16, Value) {
    use std::io::{Read, Write};
    let address = url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    write!(stream, "POST /adapt HTTP/1.1\r\nHost: {address}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n").unwrap();
    stream.write_all(b"{").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    let json = body
        .find('{')
        .map(|start| {
            serde_json::from_str(body[start..].trim_end_matches(|c: char| c != '}')).unwrap()
        })
        .unwrap_or(Value::Null);
    (status, json)
}

#[test]
fn oversized_bodies_get_413_before_being_read() {
    let url = &server().url;
    for content_type in ["application/json", "multipart/form-data; boundary=x"] {
        let (status, body) = declared_only(url, content_type, 5_000_000);
        assert_eq!(status, 413, "{content_type}");
        assert_eq!(body["error"]["code"], "payload_too_large");
    }
    assert_eq!(post_json(&task_json(1)).status(), 200);
}

#[test]
fn a_burst_gets_only_200_or_429() {
    let small_queue = start(&["--queue-depth", "1"]);
    let body = task_json(1);
    let responses: Vec<reqwest::blocking::Response> = std::thread::scope(|s| {
        let post = || {
            Client::new()
                .post(format!("{}/adapt", small_queue.url))
                .json(&body)
                .send()
                .unwrap()
        };
        let handles: Vec<_> = (0..10).map(|_| s.spawn(post)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let statuses: Vec<u16> = responses.iter().map(|r| r.status().as_u16()).collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&200) && statuses.contains(&429),
        "{statuses:?}"
    );
    for refused in responses.into_iter().filter(|r| r.status() == 429) {
        assert_eq!(refused.headers()["retry-after"], "1");
        assert_eq!(
            refused.json::<Value>().unwrap()["error"]["code"],
            "queue_full"
        );
    }
}

/// A burst that the worker cannot finish within the request timeout: the tasks that would miss
/// their deadline behind the work queued are refused at once with a 429 and a `Retry-After`,
/// rather than queued to time out (504) after spending the worker's time.
#[test]
fn tasks_that_would_miss_their_deadline_get_a_fast_429_not_a_504() {
    let tight = start(&[
        "--request-timeout-ms",
        "4000",
        "--max-batch",
        "1",
        "--max-steps",
        "1000",
    ]);
    let adapt = format!("{}/adapt", tight.url);
    let post = |steps: usize| {
        Client::new()
            .post(&adapt)
            .json(&task_json(steps))
            .send()
            .unwrap()
    };
    // Steps for a task of about a quarter of a second here; one task of that shape measures its
    // cost. The server admits work ahead of a task up to half its remaining time (2 s of the 4 s
    // timeout), so about eight; at a twofold slowdown from a test beside this one, still four.
    let probe: Value = post(10).json().unwrap();
    let steps =
        ((250.0 / (probe["timing_ms"]["adapt"].as_f64().unwrap() / 10.0)) as usize).clamp(1, 1000);
    assert_eq!(post(steps).status(), 200);
    // Twenty-four at once: about 6 s of work, where each may take 4 s.
    let answers: Vec<(u16, Option<u64>, Value, std::time::Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..24)
            .map(|_| {
                s.spawn(|| {
                    let sent = std::time::Instant::now();
                    let response = post(steps);
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().parse().unwrap());
                    (
                        response.status().as_u16(),
                        retry_after,
                        response.json().unwrap(),
                        sent.elapsed(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let count = |status: u16| answers.iter().filter(|(s, ..)| *s == status).count();
    assert!(
        count(504) <= 1 && count(429) >= 6 && count(200) >= 3,
        "{:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    for (_, retry_after, body, took) in answers.iter().filter(|(s, ..)| *s == 429) {
        assert_eq!(body["error"]["code"], "would_miss_deadline", "{body}");
        assert!(
            retry_after.is_some_and(|seconds| seconds >= 1),
            "{retry_after:?}"
        );
        assert!(
            took.as_millis() < 1500,
            "refused at once, not after waiting: {took:?}"
        );
    }
}

#[test]
fn past_its_limit_of_requests_in_flight_the_server_refuses_before_reading() {
    let one_at_a_time = start(&["--max-in-flight", "1", "--max-steps", "1000"]);
    let adapt = format!("{}/adapt", one_at_a_time.url);
    std::thread::scope(|s| {
        // 1000 steps take well over the client's 3 s; when it gives up, the request leaves.
        let long = s.spawn(|| {
            Client::builder()
                .timeout(std::time::Duration::from_secs(3))
                .build()
                .unwrap()
                .post(&adapt)
                .json(&task_json(1000))
                .send()
        });
        std::thread::sleep(std::time::Duration::from_secs(1));
        let refused = Client::new()
            .post(&adapt)
            .json(&task_json(1))
            .send()
            .unwrap();
        assert_eq!(refused.status(), 429);
        assert_eq!(refused.headers()["retry-after"], "1");
        assert_eq!(
            refused.json::<Value>().unwrap()["error"]["code"],
            "overloaded"
        );
        assert!(long.join().unwrap().unwrap_err().is_timeout());
    });
    assert_eq!(
        Client::new()
            .post(&adapt)
            .json(&task_json(1))
            .send()
            .unwrap()
            .status(),
        200,
        "served again once the request left"
    );
}

#[test]
fn service_endpoints_answer() {
    let url = &server().url;
    let models: Value = Client::new()
        .get(format!("{url}/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(models[0]["name"], "fixture");
    assert_eq!(
        Client::new()
            .get(format!("{url}/healthz"))
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(post_json(&task_json(1)).status(), 200);
    let metrics = Client::new()
        .get(format!("{url}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    for name in [
        "tnas_requests_total",
        "tnas_adapt_seconds",
        "tnas_queue_wait_seconds",
        "tnas_images_decoded_total",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}");
    }
    assert_eq!(
        Client::new()
            .get(format!("{url}/docs/"))
            .send()
            .unwrap()
            .status(),
        200
    );
}

/// A real `/adapt` body, options included, is valid against the served document's `AdaptRequest`
/// (checked by Python's jsonschema, installed with the deployment validator), and a body with a
/// field the server refuses is not.
#[test]
fn real_adapt_bodies_validate_against_the_published_schema() {
    let document: Value = Client::new()
        .get(format!("{}/openapi.json", server().url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let mut body = task_json(2);
    body["model"] = json!("fixture");
    body["views"] = json!(1);
    assert_eq!(post_json(&body).status(), 200, "the server takes it");
    let mut unknown = body.clone();
    unknown["stepz"] = json!(2);
    assert_eq!(post_json(&unknown).status(), 400, "the server refuses it");
    const CHECK: &str = "import json, sys, jsonschema
document, bodies = json.load(sys.stdin)
schema = {'$ref': '#/components/schemas/AdaptRequest', 'components': document['components']}
validator = jsonschema.Draft202012Validator(schema)
print(json.dumps([validator.is_valid(body) for body in bodies]))";
    let mut child = std::process::Command::new(common::python())
        .args(["-c", CHECK])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    serde_json::to_writer(
        child.stdin.take().unwrap(),
        &json!([document, [body, unknown]]),
    )
    .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let valid: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(valid, json!([true, false]));
}

#[test]
fn served_openapi_matches_the_committed_document() {
    let served = Client::new()
        .get(format!("{}/openapi.json", server().url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let committed = std::fs::read_to_string(common::repo_path("openapi/openapi.json"))
        .expect("openapi/openapi.json is committed");
    let (served, committed): (Value, Value) = (
        serde_json::from_str(&served).unwrap(),
        serde_json::from_str(&committed).unwrap(),
    );
    assert_eq!(
        served, committed,
        "openapi/openapi.json is stale: regenerate it with `make openapi`"
    );
}

/// Browsers get CORS headers for the configured origins only, or for any with `*`; `*` among
/// other origins is refused at start-up with what to give instead.
#[test]
fn cors_allows_the_configured_origins_or_every_one() {
    let preflight = |url: &str, origin: &str| {
        Client::new()
            .request(reqwest::Method::OPTIONS, format!("{url}/adapt"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .send()
            .unwrap()
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_string())
    };
    let listed = start(&["--cors-origins", "https://a.example"]);
    assert_eq!(
        preflight(&listed.url, "https://a.example").as_deref(),
        Some("https://a.example")
    );
    assert_eq!(preflight(&listed.url, "https://b.example"), None);
    let any = start(&["--cors-origins", "*"]);
    assert_eq!(
        preflight(&any.url, "https://b.example").as_deref(),
        Some("*")
    );

    use clap::Parser;
    let models = common::fixture_models();
    let config = tnas::server::config::ServerConfig::parse_from([
        "tnas-server",
        "--models",
        models.path().to_str().unwrap(),
        "--cors-origins",
        "*,https://a.example",
    ]);
    let checkpoints = tnas::server::load_models(&config.models).unwrap();
    let refused = tnas::server::build_state(&config, checkpoints, tch::Device::Cpu)
        .err()
        .expect("'*' among origins is refused");
    assert!(refused.contains("stands alone"), "{refused}");
}

#[test]
fn api_key_protects_everything_but_health() {
    let secured = start(&["--api-key", "s3cret"]);
    let client = Client::new();
    let denied = client
        .post(format!("{}/adapt", secured.url))
        .json(&task_json(1))
        .send()
        .unwrap();
    assert_eq!(denied.status(), 401);
    assert_eq!(
        client
            .get(format!("{}/models", secured.url))
            .bearer_auth("wrong")
            .send()
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        client
            .get(format!("{}/models", secured.url))
            .bearer_auth("s3cret")
            .send()
            .unwrap()
            .status(),
        200
    );
    for scheme in ["bearer", "BEARER"] {
        let response = client
            .get(format!("{}/models", secured.url))
            .header("authorization", format!("{scheme} s3cret"))
            .send()
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "the scheme is case-insensitive (RFC 7235): {scheme}"
        );
    }
    assert_eq!(
        client
            .get(format!("{}/healthz", secured.url))
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client
            .get(format!("{}/metrics", secured.url))
            .send()
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn past_the_deadline_the_request_gets_504_and_the_server_recovers() {
    let hurried = start(&["--request-timeout-ms", "1"]);
    let response = Client::new()
        .post(format!("{}/adapt", hurried.url))
        .json(&task_json(20))
        .send()
        .unwrap();
    assert_eq!(response.status(), 504);
    let body: Value = response.json().unwrap();
    assert_eq!(body["error"]["code"], "timeout");
    let (status, body) = declared_only(&hurried.url, "application/json", 1000);
    assert_eq!(
        (status, &body["error"]["code"]),
        (504, &json!("timeout")),
        "a body that never arrives"
    );
    assert_eq!(
        Client::new()
            .get(format!("{}/readyz", hurried.url))
            .send()
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn a_proto_head_serves_twenty_way_one_shot() {
    let pngs = omniglot_pngs("Greek", 20, 2);
    let support: Vec<Value> = pngs
        .iter()
        .enumerate()
        .map(|(c, imgs)| json!({"label": format!("class{c:02}"), "image": b64(&imgs[0])}))
        .collect();
    let query: Vec<Value> = pngs
        .iter()
        .enumerate()
        .map(|(c, imgs)| json!({"id": format!("q{c}"), "image": b64(&imgs[1])}))
        .collect();
    let response = post_json(&json!({"support": support, "query": query, "steps": 1}));
    assert_eq!(response.status(), 200);
    let body: Value = response.json().unwrap();
    assert_eq!(body["labels"].as_array().unwrap().len(), 20);
    assert_eq!(
        body["predictions"][0]["probabilities"]
            .as_array()
            .unwrap()
            .len(),
        20
    );
    // 21 classes is over this model's max_way of 20.
    let mut too_many = support.clone();
    too_many.push(json!({"label": "extra", "image": b64(&pngs[0][1])}));
    let response = post_json(&json!({"support": too_many, "query": query, "steps": 1}));
    assert_eq!(response.status(), 422);
}

#[test]
fn a_client_that_disconnects_cancels_its_work() {
    // Its own server, so the worker has nothing else to do: 1000 steps take well over 10 s here.
    let own = start(&["--max-steps", "1000"]);
    let impatient = Client::builder()
        .timeout(std::time::Duration::from_millis(500))
        .build()
        .unwrap();
    assert!(impatient
        .post(format!("{}/adapt", own.url))
        .json(&task_json(1000))
        .send()
        .unwrap_err()
        .is_timeout());
    // The worker notices between steps that nobody waits for the answer and drops the job, so the
    // next request does not queue behind the abandoned 1000 steps. (The metrics are the process's,
    // shared with the other tests' servers, so the next request's queue time is the evidence.)
    let next = Client::new()
        .post(format!("{}/adapt", own.url))
        .json(&task_json(1))
        .send()
        .unwrap();
    assert_eq!(next.status(), 200);
    let body: Value = next.json().unwrap();
    let queued_ms = body["timing_ms"]["queue"].as_f64().unwrap();
    assert!(
        queued_ms < 3000.0,
        "the next request waited {queued_ms} ms behind abandoned work"
    );
}
