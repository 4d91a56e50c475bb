//! tnas: fast adaptation of neural architectures (T-NAS, Lian et al., ICLR 2020).
//!
//! A DARTS supernet is meta-trained offline (`tnas-train`); the HTTP server (`tnas-server`) adapts
//! it to a new task's few labelled images in one request and returns the task's genotype and the
//! query predictions.
//!
//! # Layout
//!
//! Each folder uses only the ones listed before it:
//! - [`runtime`]: libtorch plumbing: devices, grad-mode scopes, libtorch errors as messages,
//!   cached index tensors, CUDA graphs.
//! - [`nn`]: the search space and the networks (supernet, derived, Conv-4, heads), where θ becomes
//!   mixing weights and where a genotype is decoded; `nn::fast` holds the fused kernels.
//! - [`model`]: a model on disk: `model.json`, the shared adaptation settings, checkpoints.
//! - [`data`]: where images become tensors (for requests and datasets alike), few-shot datasets
//!   and episode sampling, augmentation (shifts that test-time views reuse).
//! - [`adapt`]: T-NAS Algorithm 2 (where θ is updated for a task) and query prediction; one task or
//!   several stacked as one pass; the task model that predicts, kept and written as a model folder.
//!
//! Programs (the binaries in `src/bin/` only parse arguments and call these):
//! - [`meta`]: meta-training (where the meta-update happens: T-NAS Algorithm 1 and baselines),
//!   evaluation, model cards.
//! - [`server`]: the HTTP adaptation server: router, handlers, where a request becomes tensors,
//!   which queued tasks batch together, the compute worker and its queue.

pub mod adapt;
pub mod data;
pub mod meta;
pub mod model;
pub mod nn;
pub mod runtime;
pub mod server;
