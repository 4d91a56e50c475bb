//! `make load`, second part: two release replicas of `models/omniglot-tnas` sharing a real Redis
//! (`--store redis://…`) behind HAProxy (round robin), on loopback. Clients send 5-way 1-shot
//! Omniglot tasks through the balancer for a while; then genotypes of the run are fetched by id
//! from each replica directly. Prints throughput overall and for each replica (from its
//! `/metrics`), latency, status counts, and each process's memory; exits non-zero on a 5xx, a
//! replica that served nothing, or a stored genotype that a replica cannot serve.

#[path = "../tests/common/mod.rs"]
mod common;
mod support;

use common::cluster::{Balancer, RedisServer};
use common::ServerProcess;
use reqwest::blocking::Client;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::{closed_loop, percentile};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Adaptations a replica answered 200, from its own `/metrics`.
fn adapted(client: &Client, replica: &ServerProcess) -> f64 {
    let text = client
        .get(format!("{}/metrics", replica.url))
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("tnas_requests_total{") && l.contains("route=\"/adapt\""))
        .filter(|l| l.contains("status=\"200\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn main() {
    let seconds: u64 = env_or("TNAS_LOAD_REPLICA_SECONDS", 20);
    let clients: usize = env_or("TNAS_LOAD_REPLICA_CLIENTS", 8);
    let duration = Duration::from_secs(seconds);
    let redis = RedisServer::start();
    let store = redis.url(0);
    let models = common::repo_path("models");
    let args = [
        "--default-model",
        "omniglot-tnas",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--store",
        &store,
    ];
    let replicas = [
        ServerProcess::start(&models, &args),
        ServerProcess::start(&models, &args),
    ];
    let balancer = Balancer::start(&[replicas[0].port, replicas[1].port]);
    let task = common::task_json(&common::omniglot_pngs("Latin", 5, 4));
    let body: &'static [u8] = Box::leak(serde_json::to_vec(&task).unwrap().into_boxed_slice());
    let adapt = format!("{}/adapt", balancer.url);
    let client = Client::new();
    let before: Vec<f64> = replicas.iter().map(|r| adapted(&client, r)).collect();

    let started = Instant::now();
    let answers = closed_loop(clients, duration, &|client: &Client, _, _| {
        client
            .post(&adapt)
            .header("content-type", "application/json")
            .body(body)
            .send()
    });
    // The run and the answers still in flight at its end, which the replicas' counts include.
    let elapsed = started.elapsed().as_secs_f64();
    let served: Vec<f64> = replicas
        .iter()
        .zip(&before)
        .map(|(r, before)| adapted(&client, r) - before)
        .collect();

    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for answer in &answers {
        *statuses.entry(answer.status).or_default() += 1;
    }
    let ok: Vec<f64> = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| a.ms)
        .collect();
    let in_time = answers
        .iter()
        .filter(|a| a.status == 200 && a.in_time(duration))
        .count();
    println!(
        "two replicas sharing Redis, {clients} clients of 5-way 1-shot tasks for {seconds} s through HAProxy"
    );
    println!(
        "  throughput {:.2} tasks/s; latency p50 {:.0} ms, p99 {:.0} ms; statuses {statuses:?}",
        in_time as f64 / seconds as f64,
        percentile(&ok, 0.5),
        percentile(&ok, 0.99)
    );
    for (i, (replica, served)) in replicas.iter().zip(&served).enumerate() {
        let (rss, peak) = replica.memory_mib();
        println!(
            "  replica {i}: {served} adaptations in {elapsed:.1} s ({:.2} tasks/s), RSS {rss:.0} MiB, peak {peak:.0} MiB",
            served / elapsed
        );
    }
    if let Some(pid) = redis.pid() {
        let (rss, peak) = common::memory_mib(pid);
        println!("  redis-server: RSS {rss:.0} MiB, peak {peak:.0} MiB");
    }

    let unserved = unservable(&client, &balancer, &replicas);
    let mut failures = Vec::new();
    if statuses.keys().any(|&s| s >= 500) {
        failures.push(format!("5xx answers: {statuses:?}"));
    }
    if served.contains(&0.0) {
        failures.push(format!("a replica served nothing: {served:?}"));
    }
    if unserved > 0 {
        failures.push(format!(
            "{unserved} stored genotypes a replica could not serve"
        ));
    }
    for failure in &failures {
        println!("FAILED: {failure}");
    }
    if !failures.is_empty() {
        std::process::exit(1);
    }
}

/// The run's most recent genotypes (up to 1000, listed through the balancer), each fetched from
/// both replicas directly; how many fetches did not answer 200.
fn unservable(client: &Client, balancer: &Balancer, replicas: &[ServerProcess]) -> usize {
    let listing: Value = client
        .get(format!("{}/genotypes?limit=1000", balancer.url))
        .send()
        .and_then(|r| r.json())
        .unwrap_or(Value::Null);
    let ids: Vec<&str> = listing
        .as_array()
        .map(|records| {
            records
                .iter()
                .filter_map(|r| r["task_id"].as_str())
                .collect()
        })
        .unwrap_or_default();
    println!(
        "  {} genotypes listed, each fetched from both replicas",
        ids.len()
    );
    if ids.is_empty() {
        return 1;
    }
    ids.iter()
        .flat_map(|id| {
            replicas
                .iter()
                .map(move |r| format!("{}/genotypes/{id}", r.url))
        })
        .filter(|url| !client.get(url).send().is_ok_and(|r| r.status() == 200))
        .count()
}
