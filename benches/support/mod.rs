//! Shared by the benches that go through HTTP: the release `tnas-server` as a child process on
//! loopback (so its memory can be read from /proc), and closed-loop clients that record every
//! answer's status and latency.

use reqwest::blocking::{Client, Response};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A running `tnas-server`; killed when dropped.
pub struct ServerProcess {
    child: Child,
    pub url: String,
}

impl ServerProcess {
    /// Starts the server on a free loopback port and waits (up to two minutes) for /readyz.
    pub fn start(models: &Path, args: &[&str]) -> ServerProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(env!("CARGO_BIN_EXE_tnas-server"))
            .args(["--models", models.to_str().unwrap(), "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the server binary starts");
        let server = ServerProcess { child, url: format!("http://127.0.0.1:{port}") };
        let started = Instant::now();
        while !server.ready() {
            assert!(started.elapsed() < Duration::from_secs(120), "the server did not become ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    pub fn ready(&self) -> bool {
        Client::new().get(format!("{}/readyz", self.url)).send().is_ok_and(|r| r.status() == 200)
    }

    /// (resident, peak resident) memory in MiB, from /proc/<pid>/status.
    #[allow(dead_code)] // read by the load bench only
    pub fn memory_mib(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
pub fn closed_loop(clients: usize, duration: Duration, send: &(dyn Fn(&Client, usize, usize) -> reqwest::Result<Response> + Sync)) -> Vec<Answer> {
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..clients)
            .map(|index| {
                let (stop, started) = (&stop, &started);
                scope.spawn(move || {
                    let client = Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
                    let mut answers = Vec::new();
                    for n in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let sent = Instant::now();
                        let response = send(&client, index, n).expect("the server answers every request");
                        let status = response.status().as_u16();
                        let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<f64>().ok());
                        let _ = response.bytes();
                        answers.push(Answer { client: index, n, status, ms: sent.elapsed().as_secs_f64() * 1e3, done_s: started.elapsed().as_secs_f64() });
                        if status == 429 {
                            std::thread::sleep(Duration::from_secs_f64(retry_after.unwrap_or(1.0).min(1.0)));
                        }
                    }
                    answers
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
    })
}

/// The `p`-quantile (0..=1) of unsorted values, nearest rank.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(((sorted.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN)
}
