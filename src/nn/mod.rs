//! The search space and the networks: pure functions of explicit weights, so that each task adapts
//! its own copies.
//!
//! - [`search_space`]: the primitive table and the supernet's shape (`SearchSpace`).
//! - [`conv`]: convolution grouped by shape (tasks side by side convolve their own channels).
//! - [`ops`]: DARTS operations (sep/dil conv, pools, FactorizedReduce, BatchNorm modes).
//! - [`params`]: `ParamSet`, named weights: initialised, copied per task, checked on load.
//! - [`mixed_op`]: DARTS's `MixedOp`: an edge's candidate ops, their parameters, their weighted sum.
//! - [`supernet`]: the T-NAS learner's forward pass and `Alphas` (θ).
//! - [`relaxation`]: θ → mixing weights: DARTS's softmax, or annealed soft pruning (MetaNAS).
//! - [`genotype`]: where a genotype is decoded (the DARTS rule), and its JSON/Python forms.
//! - [`genotype_svg`]: a genotype drawn the way DARTS draws cells.
//! - [`derived`]: the discrete network of a genotype on inherited supernet weights.
//! - [`conv4`]: MAML's Conv-4 baseline network.
//! - [`head`]: fixed and prototype (Proto-MAML) classifier heads.
//! - [`learned_rates`]: meta-learned per-step, per-tensor inner learning rates (MAML++'s LSLR).
//! - [`network`]: the three networks behind one interface.
//! - [`fast`]: fused edges, depthwise kernels and the flat weight layout.

pub(crate) mod conv;
pub(crate) mod conv4;
pub mod derived;
pub(crate) mod fast;
pub mod genotype;
pub(crate) mod genotype_svg;
pub mod head;
pub mod learned_rates;
pub(crate) mod mixed_op;
pub mod network;
pub(crate) mod ops;
pub mod params;
pub mod relaxation;
pub mod search_space;
pub mod supernet;
