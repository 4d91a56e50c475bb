//! Two real `tnas-server` replicas behind a real HAProxy (round robin), sharing a real Redis
//! (`--store redis://…`): tasks adapted through the balancer are fetched by id from either
//! replica, as JSON, Python and SVG, and their kept task models predict the same on either; a
//! replica killed mid-run and Redis restarted lose no stored genotype or task model; while Redis
//! is down `/adapt` still answers, reads answer 503 and `/readyz` says why.
//! A server also starts before its Redis, and a stalled Redis costs a request at most the store's
//! timeout.

mod common;

use common::cluster::{free_port, Balancer, RedisServer};
use common::{fixture_models, metric, omniglot_pngs, task_json, ServerProcess};
use reqwest::blocking::Client;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const TASKS: usize = 100;
/// Adaptations answered before replica 0 is killed.
const KILL_AFTER: usize = 40;

/// One answer through HTTP: its status, its body and the replica the balancer names.
struct Answer {
    status: u16,
    body: String,
    served_by: Option<String>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn get(client: &Client, url: &str) -> Answer {
    answer(client.get(url).send())
}

fn post(client: &Client, url: &str, body: &'static [u8]) -> Answer {
    answer(
        client
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send(),
    )
}

fn answer(sent: reqwest::Result<reqwest::blocking::Response>) -> Answer {
    let response = sent.expect("every request through the balancer is answered");
    let status = response.status().as_u16();
    let served_by = response
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response.text().unwrap();
    Answer {
        status,
        body,
        served_by,
    }
}

/// A replica on `port` keeping genotypes in `store`, giving up on a Redis call after `timeout_ms`.
fn replica(models: &Path, port: u16, store: &str, timeout_ms: &str) -> ServerProcess {
    replica_with(models, port, store, timeout_ms, &[])
}

/// [`replica`] with `extra` arguments.
fn replica_with(
    models: &Path,
    port: u16,
    store: &str,
    timeout_ms: &str,
    extra: &[&str],
) -> ServerProcess {
    let args = [
        "--device",
        "cpu",
        "--threads",
        "1",
        "--store",
        store,
        "--store-timeout-ms",
        timeout_ms,
    ];
    ServerProcess::start_on(port, models, &[&args[..], extra].concat())
}

/// A 2-way 1-shot Omniglot task with two queries and one adaptation step, serialised once.
fn task_body() -> &'static [u8] {
    let mut task = task_json(&omniglot_pngs("Greek", 2, 2));
    task["steps"] = 1.into();
    Box::leak(serde_json::to_vec(&task).unwrap().into_boxed_slice())
}

/// The task's queries alone, for `POST /tasks/{id}/predict`.
fn queries_body() -> &'static [u8] {
    let task = task_json(&omniglot_pngs("Greek", 2, 2));
    let queries = serde_json::json!({"query": task["query"]});
    Box::leak(serde_json::to_vec(&queries).unwrap().into_boxed_slice())
}

/// The first tasks' kept models asked for predictions on each replica directly: both answer, and
/// with the same logits, whichever replica adapted the task.
fn predict_on_each(client: &Client, replicas: &[Option<ServerProcess>], tasks: &[(String, Value)]) {
    for (id, _) in tasks.iter().take(5) {
        let logits: Vec<Value> = replicas
            .iter()
            .flatten()
            .map(|server| {
                let url = format!("{}/tasks/{id}/predict", server.url);
                let answer = post(client, &url, queries_body());
                assert_eq!(answer.status, 200, "{}", answer.body);
                answer.json()["predictions"].clone()
            })
            .collect();
        assert_eq!(logits.len(), 2);
        assert_eq!(logits[0], logits[1], "task {id}");
    }
}

/// Statuses of every answer, by phase, and which replicas served.
#[derive(Default)]
struct Tally {
    statuses: BTreeMap<u16, usize>,
    served_by: BTreeSet<String>,
}

impl Tally {
    fn add(&mut self, answer: &Answer) {
        *self.statuses.entry(answer.status).or_default() += 1;
        self.served_by.extend(answer.served_by.clone());
    }

    fn assert_all_ok(&self, phase: &str, expected: usize) {
        assert_eq!(
            self.statuses.get(&200).copied().unwrap_or(0),
            expected,
            "{phase}: every answer is 200, got {:?}",
            self.statuses
        );
        assert_eq!(
            self.served_by,
            BTreeSet::from(["replica-0".to_string(), "replica-1".to_string()]),
            "{phase}: both replicas serve"
        );
    }
}

/// `TASKS` adaptations through the balancer from four clients; replica 0 is killed (SIGKILL, no
/// chance to finish anything) once `KILL_AFTER` have been answered. Returns each task's id and
/// genotype.
fn adapt_while_killing(
    balancer: &Balancer,
    body: &'static [u8],
    victim: u32,
) -> Vec<(String, Value)> {
    let next = AtomicUsize::new(0);
    let answered = AtomicUsize::new(0);
    let tasks = Mutex::new(Vec::new());
    let tally = Mutex::new(Tally::default());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let client = Client::new();
                while next.fetch_add(1, Ordering::SeqCst) < TASKS {
                    let answer = post(&client, &format!("{}/adapt", balancer.url), body);
                    tally.lock().unwrap().add(&answer);
                    if answer.status == 200 {
                        let json = answer.json();
                        assert_eq!(json["genotype_stored"], true, "{json}");
                        assert_eq!(json["task_model_kept"], true, "{json}");
                        let id = json["task_id"].as_str().unwrap().to_string();
                        tasks.lock().unwrap().push((id, json["genotype"].clone()));
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        scope.spawn(|| {
            while answered.load(Ordering::SeqCst) < KILL_AFTER {
                std::thread::sleep(Duration::from_millis(5));
            }
            let killed = Command::new("kill")
                .args(["-KILL", &victim.to_string()])
                .status()
                .unwrap();
            assert!(killed.success());
        });
    });
    tally
        .into_inner()
        .unwrap()
        .assert_all_ok("adaptations with a replica killed", TASKS);
    tasks.into_inner().unwrap()
}

/// Every task's genotype as JSON, Python and SVG through the balancer.
fn fetch_all(client: &Client, base: &str, tasks: &[(String, Value)], phase: &str) {
    let mut tally = Tally::default();
    for (id, genotype) in tasks {
        let json = get(client, &format!("{base}/genotypes/{id}"));
        tally.add(&json);
        assert_eq!(json.status, 200, "{phase}: {}", json.body);
        assert_eq!(&json.json()["genotype"], genotype, "{phase}: task {id}");
        let python = get(client, &format!("{base}/genotypes/{id}?format=python"));
        tally.add(&python);
        assert!(
            python.body.starts_with("Genotype("),
            "{phase}: {}",
            python.body
        );
        let svg = get(client, &format!("{base}/genotypes/{id}/svg"));
        tally.add(&svg);
        assert!(svg.body.contains("<svg"), "{phase}: {}", svg.body);
    }
    tally.assert_all_ok(phase, 3 * tasks.len());
}

fn readiness(client: &Client, server: &ServerProcess) -> Value {
    let answer = get(client, &format!("{}/readyz", server.url));
    assert_eq!(
        answer.status, 200,
        "a replica stays ready without its store: {}",
        answer.body
    );
    answer.json()
}

#[test]
fn replicas_share_genotypes_across_a_replica_kill_and_a_redis_restart() {
    let started = Instant::now();
    let models = fixture_models();
    let mut redis = RedisServer::start();
    let store = redis.url(0);
    let ports = [free_port(), free_port()];
    let mut replicas = ports.map(|port| Some(replica(models.path(), port, &store, "2000")));
    let balancer = Balancer::start(&ports);
    let client = Client::new();
    let body = task_body();

    let victim = replicas[0].as_ref().unwrap().pid();
    let tasks = adapt_while_killing(&balancer, body, victim);
    assert_eq!(tasks.len(), TASKS);
    drop(replicas[0].take());

    // The killed replica comes back empty-handed; through the balancer, either one serves any id.
    replicas[0] = Some(replica(models.path(), ports[0], &store, "2000"));
    balancer.wait_until_routed_to("replica-0");
    fetch_all(&client, &balancer.url, &tasks, "fetches after the kill");
    predict_on_each(&client, &replicas, &tasks);
    let listing = get(&client, &format!("{}/genotypes?limit=1000", balancer.url)).json();
    let listed: BTreeSet<&str> = listing
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["task_id"].as_str().unwrap())
        .collect();
    assert!(
        tasks.iter().all(|(id, _)| listed.contains(id.as_str())),
        "the listing holds every task"
    );

    // Redis stopped: adaptation answers without storing, reads answer 503, /readyz says why.
    redis.stop();
    let mut down = Tally::default();
    for _ in 0..4 {
        let adapted = post(&client, &format!("{}/adapt", balancer.url), body);
        down.add(&adapted);
        assert_eq!(adapted.status, 200, "{}", adapted.body);
        assert_eq!(adapted.json()["genotype_stored"], false);
        assert!(adapted.json()["genotype"].is_object());
        let read = get(
            &client,
            &format!("{}/genotypes/{}", balancer.url, tasks[0].0),
        );
        down.add(&read);
        assert_eq!(read.status, 503, "{}", read.body);
        assert_eq!(read.json()["error"]["code"], "store_unavailable");
        let message = read.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(message.contains(&store), "{message}");
        let listing = get(&client, &format!("{}/genotypes", balancer.url));
        down.add(&listing);
        assert_eq!(listing.status, 503, "{}", listing.body);
        assert_eq!(adapted.json()["task_model_kept"], false);
        let predicted = post(
            &client,
            &format!("{}/tasks/{}/predict", balancer.url, tasks[0].0),
            queries_body(),
        );
        down.add(&predicted);
        assert_eq!(predicted.status, 503, "{}", predicted.body);
        assert_eq!(predicted.json()["error"]["code"], "store_unavailable");
    }
    assert_eq!(
        down.statuses.keys().copied().collect::<Vec<_>>(),
        vec![200, 503],
        "only the documented 503 while Redis is down"
    );
    for server in replicas.iter().flatten() {
        let ready = readiness(&client, server);
        assert_eq!(ready["status"], "degraded", "{ready}");
        assert_eq!(ready["store"], "redis", "{ready}");
        let reason = ready["reason"].as_str().unwrap();
        assert!(
            reason.contains(&store) && reason.contains("503"),
            "{reason}"
        );
    }

    // Redis back with its data: the replicas reconnect by themselves and lose nothing.
    redis.restart();
    for server in replicas.iter().flatten() {
        let since = Instant::now();
        while readiness(&client, server)["status"] != "ready" {
            assert!(
                since.elapsed() < Duration::from_secs(15),
                "a replica did not reconnect to Redis within 15 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    fetch_all(
        &client,
        &balancer.url,
        &tasks,
        "fetches after Redis restarted",
    );
    predict_on_each(&client, &replicas, &tasks);
    let adapted = post(&client, &format!("{}/adapt", balancer.url), body).json();
    assert_eq!(adapted["genotype_stored"], true, "{adapted}");
    for server in replicas.iter().flatten() {
        let id = adapted["task_id"].as_str().unwrap();
        let fetched = get(&client, &format!("{}/genotypes/{id}", server.url));
        assert_eq!(fetched.status, 200, "{}", fetched.body);
    }
    eprintln!(
        "replica scenario took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A request's answer and how long it took.
fn timed(request: impl FnOnce() -> Answer) -> (Answer, Duration) {
    let sent = Instant::now();
    let answer = request();
    (answer, sent.elapsed())
}

#[test]
fn a_server_starts_before_its_redis_and_rides_out_a_stalled_one() {
    let models = fixture_models();
    let redis_port = free_port();
    let store = format!("redis://127.0.0.1:{redis_port}/0");
    let server = replica(models.path(), free_port(), &store, "500");
    let client = Client::new();
    let body = task_body();
    let unknown = format!("{}/genotypes/{}", server.url, uuid::Uuid::new_v4());

    // No Redis yet: the server is up, degraded, adapting without storing, refusing reads at once.
    let ready = readiness(&client, &server);
    assert_eq!(ready["status"], "degraded", "{ready}");
    let adapted = post(&client, &format!("{}/adapt", server.url), body);
    assert_eq!(
        (adapted.status, &adapted.json()["genotype_stored"]),
        (200, &false.into())
    );
    let (read, took) = timed(|| get(&client, &unknown));
    assert_eq!(read.status, 503, "{}", read.body);
    assert!(took < Duration::from_millis(2500), "a read waited {took:?}");

    // Redis comes up where the server expects it: it connects by itself.
    let redis = RedisServer::start_on(redis_port);
    let since = Instant::now();
    while readiness(&client, &server)["status"] != "ready" {
        assert!(
            since.elapsed() < Duration::from_secs(15),
            "the server never connected to Redis"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let adapted = post(&client, &format!("{}/adapt", server.url), body).json();
    assert_eq!(adapted["genotype_stored"], true, "{adapted}");
    let stored = format!(
        "{}/genotypes/{}",
        server.url,
        adapted["task_id"].as_str().unwrap()
    );
    assert_eq!(get(&client, &stored).status, 200);

    // Redis stalled (it holds the connection and never answers): every call gives up in time.
    redis.pause();
    let (read, took) = timed(|| get(&client, &stored));
    assert_eq!(read.status, 503, "{}", read.body);
    assert!(
        read.body.contains("no answer within 500 ms"),
        "{}",
        read.body
    );
    assert!(took < Duration::from_millis(2500), "a read waited {took:?}");
    let adapted = post(&client, &format!("{}/adapt", server.url), body);
    assert_eq!(
        (adapted.status, &adapted.json()["genotype_stored"]),
        (200, &false.into())
    );
    let timing = &adapted.json()["timing_ms"];
    let storing = ["decode_images", "queue", "adapt", "predict"]
        .iter()
        .fold(timing["total"].as_f64().unwrap(), |rest, part| {
            rest - timing[part].as_f64().unwrap()
        });
    assert!(
        storing < 1500.0,
        "trying to store took {storing} ms of the answer, past the 500 ms timeout: {timing}"
    );
    let ready = readiness(&client, &server);
    assert_eq!(ready["status"], "degraded", "{ready}");
    redis.resume();
    let since = Instant::now();
    while get(&client, &stored).status != 200 {
        assert!(
            since.elapsed() < Duration::from_secs(15),
            "reads never came back after the stall"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kept task models in Redis keep to `--task-store-bytes` for all replicas together: a replica
/// with room for two and a half evicts, across replicas, the least recently used first. When Redis
/// drops the index of its own accord (under `maxmemory`), the sizes it indexed no longer count.
#[test]
fn task_models_in_redis_keep_to_their_byte_bound_across_replicas() {
    let models = fixture_models();
    let redis = RedisServer::start();
    let store = redis.url(0);
    let client = Client::new();
    let adapt = |server: &ServerProcess| {
        let answer = post(&client, &format!("{}/adapt", server.url), task_body());
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.json()["task_model_kept"], true);
        answer.json()["task_id"].as_str().unwrap().to_string()
    };
    let roomy = replica(models.path(), free_port(), &store, "2000");
    let mut ids = vec![adapt(&roomy)];
    let one = metric(&roomy.url, "tnas_task_store_bytes");
    assert!(one > 0.0, "the store reports the bytes it keeps");
    drop(roomy);

    let bound = (2.5 * one) as usize;
    let bound_arg = bound.to_string();
    let tight = replica_with(
        models.path(),
        free_port(),
        &store,
        "2000",
        &["--task-store-bytes", &bound_arg],
    );
    // The other replica's model is used again, so it is now more recent than the next one.
    ids.push(adapt(&tight));
    let predict = |id: &str| {
        post(
            &client,
            &format!("{}/tasks/{id}/predict", tight.url),
            queries_body(),
        )
        .status
    };
    assert_eq!(predict(&ids[0]), 200);
    ids.push(adapt(&tight));
    assert!(metric(&tight.url, "tnas_task_store_bytes") <= bound as f64);
    assert_eq!(
        ids.iter().map(|id| predict(id)).collect::<Vec<_>>(),
        vec![200, 404, 200],
        "the least recently used of three went, the one used again stayed"
    );

    let mut redis_cli = redis::Client::open(store.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let dropped: i64 = redis::cmd("DEL")
        .arg("tnas:v1:task-models")
        .query(&mut redis_cli)
        .unwrap();
    assert_eq!(dropped, 1);
    let after = adapt(&tight);
    assert_eq!(
        predict(&after),
        200,
        "the new model is kept, not evicted for ghosts"
    );
    assert!(metric(&tight.url, "tnas_task_store_bytes") <= one * 1.01);
}
