//! The fast paths of the supernet's forward pass, each checked against the plain op it replaces:
//! a cell's mixed ops computed together, depthwise convolutions as batched matrix products, and
//! all weights in one flat tensor.

pub(crate) mod depthwise;
pub(crate) mod flat_layout;
pub(crate) mod fused_edges;
