//! Meta-training: T-NAS Algorithm 1 and the baselines it is compared with.
//!
//! - [`algorithm`]: the per-task meta-gradient of each `--algo` (first/second order, Reptile).
//! - [`adam`]: the outer optimiser, resumable.
//! - [`learner`]: the meta-parameters w̃ (and θ̃) with their optimisers.
//! - [`evaluate`]: N-way K-shot accuracy over many held-out tasks with a 95% interval.
//! - [`card`]: the model card rendered from `model.json`.
//! - [`trainer`]: the training loop: logging, validation, best-checkpoint keeping, resume.
//! - [`command`]: the `tnas-train` subcommands (`meta-train`, `eval`, `card`) and their options.

pub mod adam;
pub mod algorithm;
pub mod card;
pub mod command;
pub mod evaluate;
pub mod learner;
pub mod trainer;
