//! libtorch plumbing for every layer above: devices, grad-mode scopes, libtorch errors as
//! messages, shape-keyed index tensors and CUDA graphs.

pub mod cuda_graph;
pub mod device;
pub(crate) mod grad;
pub(crate) mod index_cache;
pub(crate) mod panics;
