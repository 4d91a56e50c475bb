//! `make load`: 60 s of 16 concurrent clients against the release server on loopback, with the
//! shipped model and real Omniglot PNGs from a test alphabet, mixing valid tasks (5-way and
//! 20-way, JSON and multipart) with invalid requests. Prints requests served, latency, status
//! counts and memory; exits non-zero on any 5xx, an invalid request that got anything but its
//! specific 4xx, memory growth after warm-up, or a server that is not ready at the end.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use reqwest::blocking::{multipart, Client};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use common::{b64, ServerProcess};
use support::{closed_loop, percentile};

/// A valid 67-byte PNG whose header declares 100 000 × 100 000 pixels.
const PNG_BOMB: &str = "iVBORw0KGgoAAAANSUhEUgABhqAAAYagCAAAAACNOVQUAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg==";
/// Memory may not grow by more than this fraction from the warm-up (the first third of the run,
/// in which every request kind has been served) to the last third.
const MAX_RSS_GROWTH: f64 = 0.2;

/// The request kinds, in the proportions the clients cycle through, with the statuses each may get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    FiveWay,
    TwentyWay,
    Multipart,
    BadJson,
    NotAnImage,
    Bomb,
    UnknownModel,
    TooManySteps,
    WrongMediaType,
}

const CYCLE: [Kind; 12] = [
    Kind::FiveWay, Kind::BadJson, Kind::FiveWay, Kind::Multipart, Kind::NotAnImage, Kind::FiveWay,
    Kind::Bomb, Kind::TwentyWay, Kind::UnknownModel, Kind::FiveWay, Kind::TooManySteps, Kind::WrongMediaType,
];

impl Kind {
    /// What client `index` sends as its request number `n` (clients start at different places).
    fn of(index: usize, n: usize) -> Kind {
        CYCLE[(index * 5 + n) % CYCLE.len()]
    }

    fn expected(self) -> &'static [u16] {
        match self {
            Kind::FiveWay | Kind::TwentyWay | Kind::Multipart => &[200, 429],
            Kind::BadJson | Kind::NotAnImage => &[400],
            Kind::Bomb => &[413],
            Kind::UnknownModel => &[404],
            Kind::TooManySteps => &[422],
            Kind::WrongMediaType => &[415],
        }
    }
}

fn main() {
    let seconds: u64 = std::env::var("TNAS_LOAD_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let clients: usize = std::env::var("TNAS_LOAD_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    let models = common::repo_path("models");
    let server = ServerProcess::start(&models, &["--default-model", "omniglot-tnas", "--device", "cpu", "--threads", "2", "--queue-depth", "4"]);
    let pngs = common::omniglot_pngs("Latin", 20, 4);
    // 5-way and 20-way 1-shot Latin tasks: drawer 0 as support, drawers 1..=3 as queries.
    let (five, twenty) = (common::task_json(&pngs[..5]), common::task_json(&pngs));
    let with = |key: &str, value: Value| {
        let mut v = five.clone();
        v[key] = value;
        v
    };
    let (not_image, bomb, unknown, too_many) = (
        with("query", json!([{"id": "q", "image": b64(b"plain text")}])),
        with("query", json!([{"id": "q", "image": PNG_BOMB}])),
        with("model", json!("no-such-model")),
        with("steps", json!(1_000_000)),
    );
    let url = format!("{}/adapt", server.url);
    let send = |client: &Client, index: usize, n: usize| {
        let post = client.post(&url);
        match Kind::of(index, n) {
            Kind::FiveWay => post.json(&five),
            Kind::TwentyWay => post.json(&twenty),
            Kind::Multipart => {
                let mut form = multipart::Form::new();
                for (c, d) in pngs.iter().take(5).enumerate() {
                    form = form.part(format!("support[latin{c}]"), multipart::Part::bytes(d[0].clone()).file_name("s.png"));
                    form = form.part("query", multipart::Part::bytes(d[1].clone()).file_name(format!("q{c}.png")));
                }
                post.multipart(form)
            }
            Kind::BadJson => post.header("content-type", "application/json").body("{\"support\": ["),
            Kind::NotAnImage => post.json(&not_image),
            Kind::Bomb => post.json(&bomb),
            Kind::UnknownModel => post.json(&unknown),
            Kind::TooManySteps => post.json(&too_many),
            Kind::WrongMediaType => post.header("content-type", "text/csv").body("a,b"),
        }
        .send()
    };

    let sampling = std::sync::atomic::AtomicBool::new(true);
    let (memory, answers) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let started = Instant::now();
            let mut samples = Vec::new();
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                samples.push((started.elapsed().as_secs_f64(), server.memory_mib().0));
                std::thread::sleep(Duration::from_millis(250));
            }
            samples
        });
        let answers = closed_loop(clients, Duration::from_secs(seconds), &send);
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        (sampler.join().unwrap(), answers)
    });

    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut by_kind: BTreeMap<(String, u16), usize> = BTreeMap::new();
    let mut failures = Vec::new();
    for answer in &answers {
        let kind = Kind::of(answer.client, answer.n);
        *by_status.entry(answer.status).or_default() += 1;
        *by_kind.entry((format!("{kind:?}"), answer.status)).or_default() += 1;
        if !kind.expected().contains(&answer.status) {
            failures.push(format!("{kind:?} got {}", answer.status));
        }
    }
    let served: Vec<f64> = answers.iter().filter(|a| a.status == 200).map(|a| a.ms).collect();
    let refused: Vec<f64> = answers.iter().filter(|a| a.status != 200 && a.status != 429).map(|a| a.ms).collect();
    let window_peak = |from: f64, to: f64| memory.iter().filter(|(t, _)| *t >= from && *t < to).map(|(_, m)| *m).fold(0.0, f64::max);
    let third = memory.last().map_or(0.0, |(t, _)| *t) / 3.0;
    let (warm, last) = (window_peak(0.0, third), window_peak(2.0 * third, f64::INFINITY));
    let (_, peak) = server.memory_mib();
    let ready = server.ready();

    println!("load: {clients} clients, {seconds} s, release tnas-server (CPU, 2 threads, queue depth 4), model omniglot-tnas, Latin PNGs");
    let duration = Duration::from_secs(seconds);
    let rate = |count: usize| count as f64 / seconds as f64;
    let in_time = answers.iter().filter(|a| a.in_time(duration));
    let (answered_in_time, served_in_time) = (in_time.clone().count(), in_time.filter(|a| a.status == 200).count());
    println!("requests answered: {} ({:.1}/s within the run); adaptations served: {} ({:.2}/s)", answers.len(), rate(answered_in_time), served.len(), rate(served_in_time));
    println!("latency of served adaptations: p50 {:.0} ms, p99 {:.0} ms", percentile(&served, 0.5), percentile(&served, 0.99));
    println!("latency of refused requests (4xx other than 429): p50 {:.1} ms, p99 {:.1} ms", percentile(&refused, 0.5), percentile(&refused, 0.99));
    println!("status counts: {}", by_status.iter().map(|(s, n)| format!("{s}: {n}")).collect::<Vec<_>>().join(", "));
    for ((kind, status), n) in &by_kind {
        println!("  {kind:<15} {status}: {n}");
    }
    println!("memory: peak RSS {peak:.0} MiB; peak in the first third {warm:.0} MiB, in the last third {last:.0} MiB");
    println!("/readyz at the end: {}", if ready { "200" } else { "not ready" });

    if answers.iter().any(|a| a.status >= 500) {
        failures.push("a 5xx was returned".into());
    }
    if last > warm * (1.0 + MAX_RSS_GROWTH) {
        failures.push(format!("memory grew from {warm:.0} MiB to {last:.0} MiB after warm-up"));
    }
    if !ready {
        failures.push("/readyz is not 200 at the end".into());
    }
    if served.is_empty() {
        failures.push("no adaptation was served".into());
    }
    if failures.is_empty() {
        println!("PASS");
    } else {
        failures.dedup();
        println!("FAIL: {}", failures.join("; "));
        std::process::exit(1);
    }
}
