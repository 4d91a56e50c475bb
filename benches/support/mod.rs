//! Shared by the benches that go through HTTP: closed-loop clients that record every answer's
//! status and latency (the server itself is `common::ServerProcess`).

use reqwest::blocking::{Client, Response};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One answered request.
#[derive(Clone, Copy, Debug)]
#[allow(dead_code)] // each bench reads the fields it reports
pub struct Answer {
    /// Which client sent it, and its number among that client's requests.
    pub client: usize,
    pub n: usize,
    pub status: u16,
    pub ms: f64,
    /// When the answer arrived, in seconds since the clients started.
    pub done_s: f64,
}

impl Answer {
    /// Whether it arrived within the run's duration (answers to requests still in flight at the
    /// end are waited for but do not count towards throughput).
    pub fn in_time(&self, duration: Duration) -> bool {
        self.done_s <= duration.as_secs_f64()
    }
}

/// Runs `clients` threads for `duration`, each sending `send(client, its index, request number)`
/// back to back. A 429 is answered as a polite client would: wait the Retry-After (at most 1 s).
pub fn closed_loop(
    clients: usize,
    duration: Duration,
    send: &(dyn Fn(&Client, usize, usize) -> reqwest::Result<Response> + Sync),
) -> Vec<Answer> {
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..clients)
            .map(|index| {
                let (stop, started) = (&stop, &started);
                scope.spawn(move || {
                    let client = Client::builder()
                        .timeout(Duration::from_secs(120))
                        .build()
                        .unwrap();
                    let mut answers = Vec::new();
                    for n in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let sent = Instant::now();
                        let response =
                            send(&client, index, n).expect("the server answers every request");
                        let status = response.status().as_u16();
                        let retry_after = response
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok()?.parse::<f64>().ok());
                        let _ = response.bytes();
                        answers.push(Answer {
                            client: index,
                            n,
                            status,
                            ms: sent.elapsed().as_secs_f64() * 1e3,
                            done_s: started.elapsed().as_secs_f64(),
                        });
                        if status == 429 {
                            std::thread::sleep(Duration::from_secs_f64(
                                retry_after.unwrap_or(1.0).min(1.0),
                            ));
                        }
                    }
                    answers
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    })
}

/// The `p`-quantile (0..=1) of unsorted values, nearest rank.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}
