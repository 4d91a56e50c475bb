//! `make load`: the release server on loopback with `models/omniglot-tnas` and real Omniglot PNGs from a
//! test alphabet. One client alone measures the server's throughput on 20-way 1-shot tasks, before
//! and after the run (the better of the two counts, so that a machine busier during one of them
//! does not flatter the run). For 60 s, 32 clients send such tasks (JSON and multipart) beside
//! hostile clients: invalid requests of every kind, requests over the per-request budgets (pixels,
//! label length, listing size), and raw connections that send half a request head and hold it,
//! and clients that classify new queries of an adapted task with its kept model
//! (`POST /tasks/{task_id}/predict`) while every adaptation keeps its own model in a 64 MiB store.
//! Prints goodput (answers within the deadline) beside the single-client throughput (less the
//! worker time the predictions take, from one prediction timed alone), latency,
//! status counts and memory; exits non-zero on a 5xx other than 504, fewer than 90% of the valid
//! requests not refused with 429 answered 200, goodput under 80% of the single client's
//! throughput, a hostile request that got anything but its own 4xx, a half-open connection held
//! past the header-read timeout, a prediction that got anything but 200, 429 or 504, kept task
//! models over their budget, memory not back within 10% of its start (plus the task store's
//! budget, which stays full) after the run, or a server that is not ready at the end.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::{b64, ServerProcess};
use reqwest::blocking::{multipart, Client};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::{closed_loop, percentile, Answer};

/// A valid 67-byte PNG whose header declares 100 000 × 100 000 pixels.
const PNG_BOMB: &str =
    "iVBORw0KGgoAAAANSUhEUgABhqAAAYagCAAAAACNOVQUAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg==";
/// What each hostile client waits before each request.
const HOSTILE_PAUSE: Duration = Duration::from_millis(250);
/// The server's header-read timeout in this run; half-open connections must be closed by then.
const HEADER_READ_TIMEOUT_S: f64 = 10.0;
/// What each predicting client waits before each request.
const PREDICT_PAUSE: Duration = Duration::from_secs(1);
/// `--task-store-bytes` in this run.
const TASK_STORE_BYTES: usize = 64 << 20;

/// What the hostile HTTP clients cycle through, each with the one status it must get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Hostile {
    BadJson,
    NotAnImage,
    Bomb,
    /// Many small files declaring 2048 × 2048 each: over the per-request pixel budget.
    DeclaredPixels,
    LongLabel,
    UnknownModel,
    TooManySteps,
    WrongMediaType,
    ListingOverCap,
}

const HOSTILE_CYCLE: [Hostile; 9] = [
    Hostile::BadJson,
    Hostile::DeclaredPixels,
    Hostile::NotAnImage,
    Hostile::LongLabel,
    Hostile::Bomb,
    Hostile::UnknownModel,
    Hostile::ListingOverCap,
    Hostile::TooManySteps,
    Hostile::WrongMediaType,
];

impl Hostile {
    fn of(index: usize, n: usize) -> Hostile {
        HOSTILE_CYCLE[(index * 2 + n) % HOSTILE_CYCLE.len()]
    }

    fn expected(self) -> u16 {
        match self {
            Hostile::BadJson | Hostile::NotAnImage | Hostile::ListingOverCap => 400,
            Hostile::Bomb | Hostile::DeclaredPixels => 413,
            Hostile::UnknownModel => 404,
            Hostile::LongLabel | Hostile::TooManySteps => 422,
            Hostile::WrongMediaType => 415,
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A valid all-black PNG of 2048 × 2048 (about 5 KB).
fn blank_2048_png() -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::DynamicImage::from(image::GrayImage::new(2048, 2048))
        .write_to(&mut bytes, image::ImageFormat::Png)
        .unwrap();
    bytes.into_inner()
}

/// Clients that each open a connection, send half a request head and hold it until the server
/// closes it, over and over until `stop`; returns how long each connection was held.
fn half_open_clients(port: u16, clients: usize, stop: &AtomicBool) -> Vec<f64> {
    std::thread::scope(|scope| {
        let holders: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(move || {
                    let mut held = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port))
                        else {
                            continue;
                        };
                        stream
                            .set_read_timeout(Some(Duration::from_secs(60)))
                            .unwrap();
                        let opened = Instant::now();
                        if stream
                            .write_all(b"POST /adapt HTTP/1.1\r\nHost: tnas\r\nContent-Le")
                            .is_ok()
                        {
                            let _ = stream.read_to_end(&mut Vec::new());
                            held.push(opened.elapsed().as_secs_f64());
                        }
                    }
                    held
                })
            })
            .collect();
        holders
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

fn main() {
    let seconds: u64 = env_or("TNAS_LOAD_SECONDS", 60);
    let clients: usize = env_or("TNAS_LOAD_CLIENTS", 32);
    let hostile_clients: usize = env_or("TNAS_LOAD_HOSTILE_CLIENTS", 4);
    let half_open: usize = env_or("TNAS_LOAD_HALF_OPEN", 64);
    let predicting_clients: usize = env_or("TNAS_LOAD_PREDICT_CLIENTS", 2);
    let baseline_seconds: u64 = env_or("TNAS_LOAD_BASELINE_SECONDS", 30);
    let models = common::repo_path("models");
    let server = ServerProcess::start(
        &models,
        &[
            "--default-model",
            "omniglot-tnas",
            "--device",
            "cpu",
            "--task-store-bytes",
            &TASK_STORE_BYTES.to_string(),
        ],
    );
    let pngs = common::omniglot_pngs("Latin", 20, 4);
    // A 20-way 1-shot Latin task: drawer 0 as support, drawers 1..=3 as queries.
    let twenty = common::task_json(&pngs);
    let with = |key: &str, value: Value| {
        let mut v = common::task_json(&pngs[..5]);
        v[key] = value;
        v
    };
    // Bodies serialised once: the clients share the server's two cores, and should spend them on
    // sending, not on serialising megabytes of JSON per request.
    let serialised = |v: &Value| -> &'static [u8] {
        Box::leak(serde_json::to_vec(v).unwrap().into_boxed_slice())
    };
    let large = b64(&blank_2048_png());
    let hostile_bodies: BTreeMap<Hostile, Value> = BTreeMap::from([
        (
            Hostile::NotAnImage,
            with("query", json!([{"id": "q", "image": b64(b"plain text")}])),
        ),
        (
            Hostile::Bomb,
            with("query", json!([{"id": "q", "image": PNG_BOMB}])),
        ),
        (
            Hostile::DeclaredPixels,
            with(
                "query",
                (0..505)
                    .map(|i| json!({"id": format!("q{i}"), "image": large}))
                    .collect(),
            ),
        ),
        (
            Hostile::LongLabel,
            with(
                "support",
                json!([{"label": "x".repeat(1 << 20), "image": twenty["support"][0]["image"]}]),
            ),
        ),
        (Hostile::UnknownModel, with("model", json!("no-such-model"))),
        (Hostile::TooManySteps, with("steps", json!(1_000_000))),
    ]);
    let hostile_bodies: BTreeMap<Hostile, &[u8]> = hostile_bodies
        .iter()
        .map(|(kind, body)| (*kind, serialised(body)))
        .collect();
    let twenty_body = serialised(&twenty);
    let adapt = format!("{}/adapt", server.url);
    let valid = |client: &Client, _: usize, n: usize| {
        if n % 4 == 3 {
            let mut form = multipart::Form::new();
            for (c, d) in pngs.iter().enumerate() {
                form = form.part(
                    format!("support[latin{c}]"),
                    multipart::Part::bytes(d[0].clone()).file_name("s.png"),
                );
                for (q, png) in d[1..].iter().enumerate() {
                    form = form.part(
                        "query",
                        multipart::Part::bytes(png.clone()).file_name(format!("q{c}-{q}.png")),
                    );
                }
            }
            client.post(&adapt).multipart(form).send()
        } else {
            client
                .post(&adapt)
                .header("content-type", "application/json")
                .body(twenty_body)
                .send()
        }
    };
    let hostile = |client: &Client, index: usize, n: usize| {
        // Bounded: a few requests a second from each, as a hostile but realistic client sends.
        std::thread::sleep(HOSTILE_PAUSE);
        let post = client.post(&adapt);
        match Hostile::of(index, n) {
            Hostile::BadJson => post
                .header("content-type", "application/json")
                .body("{\"support\": ["),
            Hostile::WrongMediaType => post.header("content-type", "text/csv").body("a,b"),
            Hostile::ListingOverCap => {
                client.get(format!("{}/genotypes?limit=1000000", server.url))
            }
            kind => post
                .header("content-type", "application/json")
                .body(hostile_bodies[&kind]),
        }
        .send()
    };

    // One adapted 20-way task whose kept model the predicting clients ask about its 60 queries.
    let kept: Value = Client::new()
        .post(&adapt)
        .header("content-type", "application/json")
        .body(twenty_body)
        .send()
        .and_then(|r| r.json())
        .expect("the first adaptation answers");
    let predict_url = format!(
        "{}/tasks/{}/predict",
        server.url,
        kept["task_id"].as_str().unwrap()
    );
    let predict_body = serialised(&json!({"query": twenty["query"]}));
    let predicting = |client: &Client, _: usize, _: usize| {
        // A client classifying new images as they come, not back to back.
        std::thread::sleep(PREDICT_PAUSE);
        client
            .post(&predict_url)
            .header("content-type", "application/json")
            .body(predict_body)
            .send()
    };

    // What one prediction costs the worker, alone: the adaptations' share of the run is what the
    // predictions leave.
    let mut alone_ms: Vec<f64> = (0..3)
        .map(|_| {
            let started = Instant::now();
            predicting(&Client::new(), 0, 0).expect("a prediction answers");
            started.elapsed().as_secs_f64() * 1e3 - PREDICT_PAUSE.as_secs_f64() * 1e3
        })
        .collect();
    alone_ms.sort_by(f64::total_cmp);
    let prediction_ms = alone_ms[1];

    // One client alone: the throughput the server can give 20-way tasks.
    let alone = || {
        let answers = closed_loop(1, Duration::from_secs(baseline_seconds), &valid);
        answers
            .iter()
            .filter(|a| a.status == 200 && a.in_time(Duration::from_secs(baseline_seconds)))
            .count() as f64
            / baseline_seconds as f64
    };
    let before = alone();
    let (rss_start, _) = server.memory_mib();

    let stop_half_open = AtomicBool::new(false);
    let (answers, hostile_answers, predictions, held) = std::thread::scope(|scope| {
        let holders = scope.spawn(|| half_open_clients(server.port, half_open, &stop_half_open));
        let hostile_run =
            scope.spawn(|| closed_loop(hostile_clients, Duration::from_secs(seconds), &hostile));
        let predicting_run = scope.spawn(|| {
            closed_loop(
                predicting_clients,
                Duration::from_secs(seconds),
                &predicting,
            )
        });
        let answers = closed_loop(clients, Duration::from_secs(seconds), &valid);
        let hostile_answers = hostile_run.join().unwrap();
        let predictions = predicting_run.join().unwrap();
        stop_half_open.store(true, Ordering::Relaxed);
        (
            answers,
            hostile_answers,
            predictions,
            holders.join().unwrap(),
        )
    });
    std::thread::sleep(Duration::from_secs(5));
    let (rss_end, peak) = server.memory_mib();
    let ready = server.ready();
    let task_store_bytes = common::metric(&server.url, "tnas_task_store_bytes");
    let single_client = before.max(alone());
    let passed = report(Run {
        seconds,
        clients,
        hostile_clients,
        half_open,
        single_client,
        answers,
        hostile_answers,
        predicting_clients,
        predictions,
        prediction_ms,
        task_store_bytes,
        held,
        rss_start,
        rss_end,
        peak,
        ready,
    });
    drop(server);
    if !passed {
        std::process::exit(1);
    }
}

/// What a run measured.
struct Run {
    seconds: u64,
    clients: usize,
    hostile_clients: usize,
    half_open: usize,
    /// 200s a second with one client alone.
    single_client: f64,
    answers: Vec<Answer>,
    hostile_answers: Vec<Answer>,
    predicting_clients: usize,
    /// Answers to later queries of one kept task model.
    predictions: Vec<Answer>,
    /// One prediction's latency with nothing else running.
    prediction_ms: f64,
    /// `tnas_task_store_bytes` at the end.
    task_store_bytes: f64,
    /// Seconds each half-open connection was held before the server closed it.
    held: Vec<f64>,
    rss_start: f64,
    rss_end: f64,
    peak: f64,
    ready: bool,
}

/// Prints the figures and the checks that failed; whether all passed.
fn report(run: Run) -> bool {
    let duration = Duration::from_secs(run.seconds);
    let count =
        |answers: &[Answer], status: u16| answers.iter().filter(|a| a.status == status).count();
    let goodput = run
        .answers
        .iter()
        .filter(|a| a.status == 200 && a.in_time(duration))
        .count() as f64
        / run.seconds as f64;
    let not_refused = run.answers.iter().filter(|a| a.status != 429).count();
    let served_share = count(&run.answers, 200) as f64 / not_refused.max(1) as f64;
    let latencies = |status: u16| {
        run.answers
            .iter()
            .filter(|a| a.status == status)
            .map(|a| a.ms)
            .collect::<Vec<f64>>()
    };
    let (served, refused) = (latencies(200), latencies(429));
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for answer in &run.answers {
        *by_status.entry(answer.status).or_default() += 1;
    }
    let mut hostile: BTreeMap<(Hostile, u16), usize> = BTreeMap::new();
    for answer in &run.hostile_answers {
        *hostile
            .entry((Hostile::of(answer.client, answer.n), answer.status))
            .or_default() += 1;
    }

    println!("load: release tnas-server (CPU, default threads and batching), model omniglot-tnas, Latin PNGs, 20-way 1-shot tasks with 60 queries");
    println!(
        "one client alone (the better of before and after the run): {:.2} tasks/s",
        run.single_client
    );
    println!(
        "{} s of {} clients of 20-way tasks, {} hostile clients, {} half-open connections held:",
        run.seconds, run.clients, run.hostile_clients, run.half_open
    );
    println!(
        "  goodput (200 within the run): {goodput:.2} tasks/s, {:.0}% of one client's throughput",
        100.0 * goodput / run.single_client
    );
    println!(
        "  valid requests: {}",
        by_status
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  of those not refused with 429, {:.1}% were 200",
        100.0 * served_share
    );
    println!(
        "  latency: 200 p50 {:.0} ms, p99 {:.0} ms; 429 p50 {:.1} ms, p99 {:.1} ms",
        percentile(&served, 0.5),
        percentile(&served, 0.99),
        percentile(&refused, 0.5),
        percentile(&refused, 0.99)
    );
    for ((kind, status), n) in &hostile {
        println!("  hostile {:<15} {status}: {n}", format!("{kind:?}"));
    }
    let mut predicted: BTreeMap<u16, usize> = BTreeMap::new();
    for answer in &run.predictions {
        *predicted.entry(answer.status).or_default() += 1;
    }
    let predicted_ms: Vec<f64> = run
        .predictions
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| a.ms)
        .collect();
    println!(
        "  {} clients predicting 60 queries with a kept task model: {}; 200 p50 {:.0} ms, p99 {:.0} ms",
        run.predicting_clients,
        predicted
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        percentile(&predicted_ms, 0.5),
        percentile(&predicted_ms, 0.99)
    );
    // The worker's time the predictions took, which the adaptations could not have.
    let predicting_share =
        (predicted_ms.len() as f64 * run.prediction_ms / 1e3 / run.seconds as f64).min(1.0);
    let adaptations_alone = run.single_client * (1.0 - predicting_share);
    println!(
        "  a prediction alone takes {:.0} ms: predictions took {:.0}% of the worker, leaving adaptations {adaptations_alone:.2} tasks/s",
        run.prediction_ms,
        100.0 * predicting_share
    );
    let store_mib = TASK_STORE_BYTES as f64 / (1 << 20) as f64;
    println!(
        "  kept task models: {:.1} MiB of the {store_mib:.0} MiB budget",
        run.task_store_bytes / (1 << 20) as f64
    );
    let longest_held = run.held.iter().copied().fold(0.0, f64::max);
    println!("  half-open connections closed by the server: {}, held p50 {:.1} s, at most {longest_held:.1} s", run.held.len(), percentile(&run.held, 0.5));
    println!(
        "memory: RSS {:.0} MiB before the run, {:.0} MiB 5 s after it, peak {:.0} MiB",
        run.rss_start, run.rss_end, run.peak
    );
    println!(
        "/readyz at the end: {}",
        if run.ready { "200" } else { "not ready" }
    );

    let mut failures = Vec::new();
    if run
        .answers
        .iter()
        .chain(&run.hostile_answers)
        .any(|a| a.status >= 500 && a.status != 504)
    {
        failures.push("a 5xx other than 504".to_string());
    }
    if served_share < 0.9 {
        failures.push(format!(
            "only {:.1}% of the valid requests not refused with 429 were 200",
            100.0 * served_share
        ));
    }
    if goodput < 0.8 * adaptations_alone {
        failures.push(format!(
            "goodput {goodput:.2}/s is under 80% of the {adaptations_alone:.2}/s that one client gets in the worker's time the predictions leave"
        ));
    }
    for ((kind, status), n) in &hostile {
        if *status != kind.expected() {
            failures.push(format!("{n} {kind:?} got {status}"));
        }
    }
    if longest_held > HEADER_READ_TIMEOUT_S + 2.0 {
        failures.push(format!(
            "a half-open connection was held {longest_held:.1} s"
        ));
    }
    if let Some((status, n)) = predicted
        .iter()
        .find(|(s, _)| ![200, 429, 504].contains(*s))
    {
        failures.push(format!("{n} predictions got {status}"));
    }
    if run.task_store_bytes > TASK_STORE_BYTES as f64 {
        failures.push(format!(
            "kept task models take {:.0} bytes, over their budget of {TASK_STORE_BYTES}",
            run.task_store_bytes
        ));
    }
    if run.rss_end > 1.1 * run.rss_start + store_mib {
        failures.push(format!(
            "memory did not come back: {:.0} MiB after against {:.0} MiB before and {store_mib:.0} MiB of kept task models",
            run.rss_end, run.rss_start
        ));
    }
    if !run.ready {
        failures.push("/readyz is not 200 at the end".into());
    }
    if failures.is_empty() {
        println!("PASS");
    } else {
        println!("FAIL: {}", failures.join("; "));
    }
    failures.is_empty()
}
