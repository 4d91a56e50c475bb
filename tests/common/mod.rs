//! Shared fixtures for the integration tests and the benches: random checkpoints built on the fly,
//! real Omniglot PNGs and `/adapt` bodies made of them, the server in-process, as a worker or as
//! a child process (and, in [`cluster`], the Redis and load balancer around replicas), and the
//! path to the Python that holds torch (the setup's virtual environment).
#![allow(dead_code)]

pub mod cluster;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use tnas::adapt::{Adaptation, BnMode, PredictWith};
use tnas::model::checkpoint::{param_specs, Checkpoint};
use tnas::model::metadata::{HeadSpec, InputSpec, ModelKind, ModelMeta, FORMAT_VERSION};
use tnas::nn::network::Network;
use tnas::nn::params::ParamSet;
use tnas::nn::search_space::{SearchSpace, PRIMITIVES};
use tnas::nn::supernet::{Alphas, Supernet};

/// The interpreter with torch: `PYTHON_SYS_EXECUTABLE` (exported by the Makefile), else python3.
pub fn python() -> String {
    std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into())
}

pub fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The Omniglot zips shipped beside the project.
pub fn omniglot_zips() -> Vec<PathBuf> {
    [
        "images_background_small1.zip",
        "images_background_small2.zip",
    ]
    .iter()
    .map(|z| repo_path("../shared/data/omniglot").join(z))
    .collect()
}

pub fn metadata(
    name: &str,
    kind: ModelKind,
    space: Option<SearchSpace>,
    input: InputSpec,
    head: HeadSpec,
) -> ModelMeta {
    ModelMeta {
        format_version: FORMAT_VERSION,
        name: name.into(),
        kind,
        primitives: PRIMITIVES.iter().map(|p| p.to_string()).collect(),
        search_space: space,
        genotype: None,
        input,
        head,
        adaptation: Adaptation {
            steps: 3,
            lr_w: 0.01,
            lr_theta: 30.0,
            bn: BnMode::Support,
            learned_rates: false,
            predict_with: PredictWith::Supernet,
            finetune_steps: 0,
            views: 1,
        },
        relaxation: Default::default(),
        training: None,
        evaluation: Vec::new(),
        task: None,
        sha256: String::new(),
    }
}

/// Runs `draw` right after seeding libtorch's one random generator, with no other seeded draw in
/// between: the tests of a binary run in parallel threads and share the generator, so without this
/// a fixture would depend on the interleaving, and the same seed could give two different ones.
pub fn seeded<T>(seed: i64, draw: impl FnOnce() -> T) -> T {
    static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _alone = GENERATOR
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed);
    draw()
}

/// A supernet checkpoint with PyTorch-default weights and θ = `alpha_scale` · N(0, 1), drawn
/// from `seed`. Random weights are fixtures for numerics and plumbing, never a shipped model.
pub fn random_supernet(
    space: SearchSpace,
    head: HeadSpec,
    seed: i64,
    alpha_scale: f64,
) -> Checkpoint {
    seeded(seed, || {
        draw_random_supernet(space, head, seed, alpha_scale)
    })
}

/// [`random_supernet`] drawn from the generator as it stands: for use inside [`seeded`] when a
/// test draws its inputs after the checkpoint under the same seed.
pub fn draw_random_supernet(
    space: SearchSpace,
    head: HeadSpec,
    seed: i64,
    alpha_scale: f64,
) -> Checkpoint {
    let input = InputSpec {
        channels: space.in_channels,
        size: space.image_size,
        mean: vec![0.0; space.in_channels],
        std: vec![1.0; space.in_channels],
        invert: true,
    };
    let meta = metadata(
        &format!("random-{seed}"),
        ModelKind::Supernet,
        Some(space),
        input,
        head,
    );
    let network = Network::Supernet(Supernet::new(space));
    let params = ParamSet::initialise(&param_specs(&network, head), Device::Cpu);
    let shape = [space.num_edges() as i64, 8];
    let alphas = Alphas {
        normal: Tensor::randn(shape, (Kind::Float, Device::Cpu)) * alpha_scale,
        reduce: Tensor::randn(shape, (Kind::Float, Device::Cpu)) * alpha_scale,
    };
    Checkpoint {
        meta,
        params,
        alphas: Some(alphas),
        rates: None,
    }
}

/// A small random supernet (one cell of 8 channels on 28 × 28 images, a proto head of up to 20
/// ways), for tests of the server process around a model rather than of the model.
pub fn fixture_supernet() -> Checkpoint {
    random_supernet(
        SearchSpace::tnas_official(1, 28, 8),
        HeadSpec::Proto {
            max_way: 20,
            learned_scale: false,
        },
        9,
        1.0,
    )
}

/// A models folder holding [`fixture_supernet`] as `fixture`.
pub fn fixture_models() -> tempfile::TempDir {
    let models = tempfile::tempdir().unwrap();
    fixture_supernet()
        .save(&models.path().join("fixture"))
        .unwrap();
    models
}

/// Largest absolute difference relative to the largest reference magnitude.
pub fn relative_error(ours: &Tensor, reference: &Tensor) -> f64 {
    let diff = (ours - reference).abs().max().double_value(&[]);
    diff / reference.abs().max().double_value(&[]).max(1e-12)
}

/// Raw PNG bytes of `per_class` drawings of each of the first `classes` characters of an alphabet
/// in the first Omniglot zip, in class order.
pub fn omniglot_pngs(alphabet: &str, classes: usize, per_class: usize) -> Vec<Vec<Vec<u8>>> {
    use std::io::Read;
    let file =
        std::fs::File::open(&omniglot_zips()[0]).expect("the Omniglot zip is beside the project");
    let mut archive = zip::ZipArchive::new(file).expect("a readable zip");
    let mut names: Vec<String> = archive
        .file_names()
        .filter(|n| n.contains(&format!("/{alphabet}/")) && n.ends_with(".png"))
        .map(str::to_string)
        .collect();
    names.sort();
    let character = |name: &str| name.rsplit('/').nth(1).unwrap().to_string();
    let mut characters: Vec<String> = names.iter().map(|n| character(n)).collect();
    characters.dedup();
    characters
        .iter()
        .take(classes)
        .map(|c| {
            names
                .iter()
                .filter(|n| &character(n) == c)
                .take(per_class)
                .map(|n| {
                    let mut bytes = Vec::new();
                    archive.by_name(n).unwrap().read_to_end(&mut bytes).unwrap();
                    bytes
                })
                .collect()
        })
        .collect()
}

/// Starts the real router on a loopback port for `models` (every test binary may start several),
/// waits for /readyz, and returns the base URL. The server lives until the test binary exits.
pub fn serve(models: &Path, extra_args: &[&str]) -> String {
    use clap::Parser;
    let mut args = vec![
        "tnas-server",
        "--models",
        models.to_str().unwrap(),
        "--device",
        "cpu",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra_args);
    let config = tnas::server::config::ServerConfig::parse_from(args);
    let checkpoints = tnas::server::load_models(&config.models).unwrap();
    let state = tnas::server::build_state(&config, checkpoints, Device::Cpu).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            tnas::server::run(state, listener, std::future::pending())
                .await
                .unwrap();
        });
    });
    let url = format!("http://{}", rx.recv().unwrap());
    let client = reqwest::blocking::Client::new();
    for _ in 0..1200 {
        if client
            .get(format!("{url}/readyz"))
            .send()
            .is_ok_and(|r| r.status() == 200)
        {
            return url;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("server never became ready");
}

/// A worker on the CPU serving `checkpoint`, once it reports ready.
pub fn ready_worker(
    checkpoint: Checkpoint,
    queue_depth: usize,
    max_batch: usize,
) -> tnas::server::worker::Worker {
    ready_worker_on(Device::Cpu, vec![checkpoint], queue_depth, max_batch, 0)
}

/// A worker on `device` serving `checkpoints` and keeping up to `cuda_graphs` recorded
/// adaptations, once it reports ready.
pub fn ready_worker_on(
    device: Device,
    checkpoints: Vec<Checkpoint>,
    queue_depth: usize,
    max_batch: usize,
    cuda_graphs: usize,
) -> tnas::server::worker::Worker {
    use tnas::server::worker::{Readiness, Worker};
    let worker = Worker::spawn(checkpoints, device, queue_depth, max_batch, 2, cuda_graphs);
    let started = Instant::now();
    while worker.readiness() != Readiness::Ready {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "worker not ready: {:?}",
            worker.readiness()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    worker
}

/// The answer to come of a job submitted to a worker.
pub type Answer = tokio::sync::oneshot::Receiver<
    Result<tnas::server::compute::TaskOutput, tnas::server::worker_error::WorkerError>,
>;

/// Submits `input` with a two-minute deadline; the queue's refusal is returned as is.
pub fn submit(
    worker: &tnas::server::worker::Worker,
    input: tnas::server::compute::TaskInput,
) -> Result<Answer, tnas::server::worker_error::WorkerError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    worker.submit(tnas::server::worker::Job {
        input,
        deadline: Instant::now() + Duration::from_secs(120),
        enqueued: Instant::now(),
        reply,
    })?;
    Ok(answer)
}

/// Queues every input at once (so queued ones can batch), then waits for every answer.
pub fn answers(
    worker: &tnas::server::worker::Worker,
    inputs: Vec<tnas::server::compute::TaskInput>,
) -> Vec<Result<tnas::server::compute::TaskOutput, tnas::server::worker_error::WorkerError>> {
    let receivers: Vec<Answer> = inputs
        .into_iter()
        .map(|input| submit(worker, input).expect("the queue has room"))
        .collect();
    receivers
        .into_iter()
        .map(|r| r.blocking_recv().expect("the worker always answers"))
        .collect()
}

/// The sum of a Prometheus metric's samples on `url`'s `/metrics`.
pub fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::blocking::Client::new()
        .get(format!("{url}/metrics"))
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn b64(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
}

/// A JSON `/adapt` body from `omniglot_pngs`: each class's drawing 0 as its support image, the
/// others as queries.
pub fn task_json(pngs: &[Vec<Vec<u8>>]) -> serde_json::Value {
    let support: Vec<_> = pngs
        .iter()
        .enumerate()
        .map(|(c, d)| serde_json::json!({"label": format!("c{c}"), "image": b64(&d[0])}))
        .collect();
    let query: Vec<_> = pngs
        .iter()
        .enumerate()
        .flat_map(|(c, d)| {
            d[1..].iter().enumerate().map(
                move |(i, png)| serde_json::json!({"id": format!("c{c}q{i}"), "image": b64(png)}),
            )
        })
        .collect();
    serde_json::json!({"support": support, "query": query})
}

/// A running `tnas-server`; killed when dropped.
pub struct ServerProcess {
    child: Child,
    pub port: u16,
    pub url: String,
}

impl ServerProcess {
    /// Starts the server on a free loopback port and waits (up to two minutes) for /readyz.
    pub fn start(models: &Path, args: &[&str]) -> ServerProcess {
        ServerProcess::start_on(cluster::free_port(), models, args)
    }

    /// Starts the server on `port` (a replica restarted where its balancer expects it) and waits
    /// (up to two minutes) for /readyz.
    pub fn start_on(port: u16, models: &Path, args: &[&str]) -> ServerProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_tnas-server"))
            .args([
                "--models",
                models.to_str().unwrap(),
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the server binary starts");
        let server = ServerProcess {
            child,
            port,
            url: format!("http://127.0.0.1:{port}"),
        };
        let started = Instant::now();
        while !server.ready() {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "the server did not become ready"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit (after a signal, say).
    pub fn wait(&mut self) -> ExitStatus {
        self.child
            .wait()
            .expect("the server process can be waited for")
    }

    /// The exit status once the process exits, if it does within `limit`.
    pub fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self
                .child
                .try_wait()
                .expect("the server process can be polled")
            {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn ready(&self) -> bool {
        reqwest::blocking::Client::new()
            .get(format!("{}/readyz", self.url))
            .send()
            .is_ok_and(|r| r.status() == 200)
    }

    /// (resident, peak resident) memory in MiB.
    pub fn memory_mib(&self) -> (f64, f64) {
        memory_mib(self.child.id())
    }
}

/// A process's (resident, peak resident) memory in MiB, from /proc/<pid>/status.
pub fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
