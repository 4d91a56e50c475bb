//! tnas: fast adaptation of neural architectures (T-NAS, Lian et al., ICLR 2020).
//!
//! A DARTS supernet is meta-trained offline (`tnas-train`); the HTTP server (`tnas-server`) adapts
//! it to a new task's few labelled images in one request and returns the task's genotype and the
//! query predictions.
//!
//! # Layout
//!
//! Search space and networks (pure functions of explicit weights, so tasks adapt private copies):
//! - [`search_space`]: the primitive table and the supernet's shape (`SearchSpace`).
//! - [`conv`]: convolution grouped by shape (tasks side by side convolve their own channels).
//! - [`ops`]: DARTS operations (sep/dil conv, pools, FactorizedReduce, BatchNorm modes).
//! - [`depthwise`]: depthwise convolutions on small maps as batched matrix products.
//! - [`params`]: `ParamSet`, named weights: initialised, copied per task, checked on load.
//! - [`mixed_op`]: DARTS's `MixedOp`: an edge's candidate ops, their parameters, their weighted sum.
//! - [`supernet`]: the T-NAS learner's forward pass and `Alphas` (θ).
//! - [`relaxation`]: θ → mixing weights: DARTS's softmax, or annealed soft pruning (MetaNAS).
//! - [`fused_edges`]: a cell's mixed ops computed together, per input state.
//! - [`genotype`]: the DARTS decoding rule and the `Genotype` JSON/Python forms.
//! - [`genotype_svg`]: a genotype drawn the way DARTS draws cells.
//! - [`derived`]: the discrete network of a genotype on inherited supernet weights.
//! - [`conv4`]: MAML's Conv-4 baseline network.
//! - [`head`]: fixed and prototype (Proto-MAML) classifier heads.
//! - [`network`]: the three networks behind one interface.
//!
//! Adaptation and models:
//! - [`adapt`]: T-NAS Algorithm 2 on a task's copies, and query prediction.
//! - [`learned_rates`]: meta-learned per-step, per-tensor inner learning rates (MAML++'s LSLR).
//! - [`task_batch`]: several same-shaped tasks adapted as one pass (cross-task batching).
//! - [`cuda_graph`]: GPU work recorded once as a CUDA graph and replayed with one launch.
//! - [`settings`]: the adaptation settings (BN mode, prediction network) models and requests share.
//! - [`metadata`]: what `model.json` records.
//! - [`checkpoint`]: loading, verifying and atomically saving `models/<name>/`.
//! - [`imaging`]: image bytes → network input, shared by training and serving.
//! - [`data`]: few-shot datasets (Omniglot zips, mini-ImageNet, folders) and episode sampling.
//! - [`device`]: `--device auto|cpu|cuda|cuda:N`.
//! - [`grad`]: no-grad scopes that restore the grad mode even when libtorch panics.
//! - [`panics`]: libtorch errors (panics) caught as messages.
//! - [`index_cache`]: index tensors built once per shape and device.
//!
//! Programs (the binaries in `src/bin/` only parse arguments and call these):
//! - [`meta`]: meta-training (T-NAS Algorithm 1 and baselines), evaluation, model cards.
//! - [`server`]: the HTTP adaptation server: router, handlers, the compute worker and its queue.

pub mod adapt;
pub mod checkpoint;
pub mod conv;
pub mod conv4;
pub mod cuda_graph;
pub mod data;
pub mod depthwise;
pub mod derived;
pub mod device;
pub mod flat_layout;
pub mod fused_edges;
pub mod genotype;
pub mod genotype_svg;
pub mod grad;
pub mod head;
pub mod imaging;
pub mod index_cache;
pub mod learned_rates;
pub mod meta;
pub mod metadata;
pub mod mixed_op;
pub mod network;
pub mod ops;
pub mod panics;
pub mod params;
pub mod relaxation;
pub mod search_space;
pub mod server;
pub mod settings;
pub mod supernet;
pub mod task_batch;
