//! `tnas-server` configuration: every flag also reads an environment variable (`TNAS_*`).

use super::connections::ConnectionLimits;
use super::store::{StoreBounds, StoreLocation};
use crate::data::imaging::ImageLimits;
use crate::runtime::device::DeviceChoice;
use std::path::PathBuf;
use std::time::Duration;

/// Limits that protect the server from oversized or abusive requests.
#[derive(Clone, Debug, clap::Args)]
pub struct Limits {
    /// Largest request body in bytes (JSON or multipart).
    #[arg(long, env = "TNAS_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Most images (support + query) in one request, each counted once per test-time view.
    #[arg(long, env = "TNAS_MAX_IMAGES", default_value_t = 512)]
    pub max_images: usize,
    /// Largest single encoded image in bytes.
    #[arg(long, env = "TNAS_MAX_IMAGE_BYTES", default_value_t = ImageLimits::DEFAULT.max_bytes)]
    pub max_image_bytes: usize,
    /// Largest decoded image (width × height); refused before decoding (decompression bombs).
    /// Decoding one costs about 25 bytes a pixel, one request per core at a time.
    #[arg(long, env = "TNAS_MAX_IMAGE_PIXELS", default_value_t = ImageLimits::DEFAULT.max_pixels)]
    pub max_image_pixels: u64,
    /// Most pixels the images of one request may declare in total (width × height summed over
    /// them), checked from their headers before any is decoded: a small body of small files that
    /// declare large pictures would otherwise hold a decoding slot for as long as it likes.
    #[arg(long, env = "TNAS_MAX_REQUEST_PIXELS", default_value_t = 32 * 1024 * 1024)]
    pub max_request_pixels: u64,
    /// Longest support label or query id, in bytes (labels are kept with stored genotypes).
    #[arg(long, env = "TNAS_MAX_LABEL_BYTES", default_value_t = 256)]
    pub max_label_bytes: usize,
    /// Most adaptation steps (and fine-tuning steps) a request may ask for.
    #[arg(long, env = "TNAS_MAX_STEPS", default_value_t = 100)]
    pub max_steps: usize,
    /// Time from arrival to response before the request gets 504.
    #[arg(long, env = "TNAS_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Adaptations waiting for the worker before new ones get 429.
    #[arg(long, env = "TNAS_QUEUE_DEPTH", default_value_t = 64)]
    pub queue_depth: usize,
    /// `/adapt` requests in the server at once (reading, decoding, queued or running) before new
    /// ones get 429 without being read: with the body limit, this bounds the memory bodies take.
    #[arg(long, env = "TNAS_MAX_IN_FLIGHT", default_value_t = 128, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_in_flight: usize,
    /// Time a client has to send a whole request head, from its first byte; then the connection is
    /// closed, so a client that sends half a request line cannot hold a connection.
    #[arg(long, env = "TNAS_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_read_timeout_ms: u64,
    /// Time a kept-alive connection may wait for its next request before it is closed.
    #[arg(long, env = "TNAS_IDLE_TIMEOUT_MS", default_value_t = 30_000)]
    pub idle_timeout_ms: u64,
    /// TCP connections open at once; past it, a new connection gets 503 and is closed at once.
    #[arg(long, env = "TNAS_MAX_CONNECTIONS", default_value_t = 512, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: usize,
    /// Most queued tasks of the same shape and settings adapted together as one batch (1: none).
    /// Default: 16 on a GPU, where one task leaves the device idle; 1 on the CPU, where the work is
    /// compute-bound, so a batch adds no throughput, multiplies the memory a pass takes and makes
    /// every task in it wait for the last.
    #[arg(long, env = "TNAS_MAX_BATCH", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub max_batch: Option<usize>,
    /// Genotypes kept for `GET /genotypes/{id}` (in memory, or in Redis for every replica
    /// together); the oldest are evicted.
    #[arg(long, env = "TNAS_GENOTYPE_STORE_SIZE", default_value_t = 10_000)]
    pub genotype_store_size: usize,
    /// Bytes the kept genotypes may take (as JSON, with their labels); the oldest are evicted.
    /// With Redis, a record over it is not kept, and Redis's own `maxmemory` bounds the total.
    #[arg(long, env = "TNAS_GENOTYPE_STORE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub genotype_store_bytes: usize,
    /// Bytes the task models kept after `/adapt` may take (for `POST /tasks/{id}/predict` and
    /// `GET /tasks/{id}/model`), in this process or, with a Redis store, for all replicas
    /// together; the least recently used are evicted, and a model larger than the whole budget is
    /// not kept.
    #[arg(long, env = "TNAS_TASK_STORE_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub task_store_bytes: usize,
}

impl Limits {
    /// `--max-batch`, or its default for `device`.
    pub fn max_batch_on(&self, device: tch::Device) -> usize {
        self.max_batch
            .unwrap_or(if device.is_cuda() { 16 } else { 1 })
    }

    /// What one TCP connection may cost (see [`super::connections`]).
    pub fn connections(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            header_read_timeout: Duration::from_millis(self.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            // A request's own deadline, and a second to send its answer.
            drain_timeout: Duration::from_millis(self.request_timeout_ms) + Duration::from_secs(1),
        }
    }
}

/// Where genotypes are kept, and how long a shared store may take.
#[derive(Clone, Debug, clap::Args)]
pub struct StoreConfig {
    /// Where genotypes and kept task models live: `memory` (this process only; lost on restart)
    /// or `redis://host:port/db`, shared by every replica behind a load balancer.
    #[arg(long, env = "TNAS_STORE", default_value = "memory")]
    pub store: StoreLocation,
    /// How long Redis keeps a genotype, and a kept task model after its last use, in seconds.
    #[arg(long, env = "TNAS_STORE_TTL_S", default_value_t = 7 * 24 * 3600, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    pub store_ttl_s: u64,
    /// Longest wait for one Redis call (and for connecting); past it `/adapt` answers without
    /// storing its genotype or keeping its task model, and reads answer 503.
    #[arg(long, env = "TNAS_STORE_TIMEOUT_MS", default_value_t = 500, value_parser = clap::builder::RangedU64ValueParser::<u64>::new().range(1..))]
    pub store_timeout_ms: u64,
}

impl StoreConfig {
    pub fn bounds(&self, limits: &Limits) -> StoreBounds {
        StoreBounds {
            capacity: limits.genotype_store_size,
            max_bytes: limits.genotype_store_bytes,
            ttl: Duration::from_secs(self.store_ttl_s),
            timeout: Duration::from_millis(self.store_timeout_ms),
        }
    }
}

#[derive(Clone, Debug, clap::Parser)]
#[command(
    name = "tnas-server",
    version,
    about = "HTTP server for fast T-NAS adaptation: POST few-shot images, get the task's genotype and predictions"
)]
pub struct ServerConfig {
    /// Directory whose subfolders with a model.json are loaded.
    #[arg(long, env = "TNAS_MODELS", default_value = "models")]
    pub models: PathBuf,
    /// Model used when a request names none (default: the only or first model by name).
    #[arg(long, env = "TNAS_DEFAULT_MODEL")]
    pub default_model: Option<String>,
    /// Address to listen on (0.0.0.0: every interface).
    #[arg(long, env = "TNAS_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, env = "TNAS_PORT", default_value_t = 8080)]
    pub port: u16,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, env = "TNAS_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// Intra-op threads of the worker (0: libtorch's own choice). Default: one fewer than the CPUs
    /// (at least 1), leaving one for reading and decoding requests: an adaptation's thousands of
    /// small parallel ops each wait for their slowest thread, so a thread that shares its core
    /// with request handling slows every one of them (under load, several times over).
    #[arg(long, env = "TNAS_THREADS", value_parser = clap::builder::RangedI64ValueParser::<i32>::new().range(0..))]
    pub threads: Option<i32>,
    /// Task shapes whose adaptation is kept as a recorded CUDA graph on a GPU (recorded when a
    /// shape comes back, replayed for its later tasks; 0: none). Each keeps its own GPU memory.
    #[arg(long, env = "TNAS_CUDA_GRAPHS", default_value_t = 16)]
    pub cuda_graphs: usize,
    /// Require `Authorization: Bearer <key>` on everything but /healthz, /readyz and /metrics.
    #[arg(long, env = "TNAS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allowed CORS origins (comma-separated), or `*` for every origin; CORS is off when empty.
    #[arg(long, env = "TNAS_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Print the OpenAPI document and exit.
    #[arg(long)]
    pub print_openapi: bool,
    #[command(flatten)]
    pub store: StoreConfig,
    #[command(flatten)]
    pub limits: Limits,
}

impl ServerConfig {
    /// `--threads`, or one fewer than the CPUs this process may use (at least 1).
    pub fn worker_threads(&self) -> i32 {
        self.threads.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map_or(1, usize::from);
            cpus.saturating_sub(1).max(1) as i32
        })
    }
}
