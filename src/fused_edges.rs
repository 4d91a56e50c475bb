//! All the mixed ops that read one state of a cell, computed together.
//!
//! In a DARTS cell, state j feeds one edge of every later node. The parameter-free candidates
//! (pools with their BN, identity, zero) give the same output on each of those K edges, so they
//! are computed once; the parametric ones (sep/dil convs, FactorizedReduce) run as grouped
//! convolutions over the K edges at once, with BatchNorm over the K·C channels, which is exactly
//! the per-edge BN because BN is per channel. Values and gradients equal the per-edge `MixedOp`
//! sums (the parity tests compare against the PyTorch reference); what changes is K times fewer
//! kernel launches, which dominate the cost at few-shot sizes.

use crate::ops::{self, BnStats};
use crate::params::ParamSet;
use crate::search_space::Primitive;
use crate::supernet::op_prefix;
use tch::{Kind, Tensor};

/// The edges leaving one state: cell index, edge indices (rows of α), and their common stride.
pub struct EdgeGroup<'a> {
    pub cell: usize,
    pub edges: &'a [usize],
    pub stride: i64,
}

impl EdgeGroup<'_> {
    fn k(&self) -> i64 {
        self.edges.len() as i64
    }

    /// Every edge's `suffix` weight for `primitive`, concatenated along dim 0.
    fn stacked(&self, params: &ParamSet, primitive: Primitive, suffix: &str) -> Tensor {
        let weights: Vec<&Tensor> = self.edges.iter().map(|&e| params.get(&format!("{}.{suffix}", op_prefix(self.cell, e, primitive)))).collect();
        Tensor::cat(&weights, 0)
    }
}

/// [N, K·C, H, W] → [N, K, C, H, W].
fn split_edges(t: &Tensor, k: i64) -> Tensor {
    let s = t.size();
    t.view([s[0], k, s[1] / k, s[2], s[3]])
}

fn conv(x: &Tensor, w: &Tensor, stride: i64, padding: i64, dilation: i64, groups: i64) -> Tensor {
    x.conv2d(w, None::<Tensor>, [stride, stride], [padding, padding], [dilation, dilation], groups)
}

/// `SepConv` on K edges: `relu_k` is ReLU(x) repeated K times, [N, K·C, H, W].
fn sep_convs(params: &ParamSet, group: &EdgeGroup, primitive: Primitive, relu_k: &Tensor, stats: BnStats) -> Tensor {
    let (kernel, k) = (if primitive == Primitive::SepConv3x3 { 3 } else { 5 }, group.k());
    let channels = relu_k.size()[1];
    let w = |suffix: &str| group.stacked(params, primitive, suffix);
    let h = conv(&conv(relu_k, &w("op.1.weight"), group.stride, kernel / 2, 1, channels), &w("op.2.weight"), 1, 0, 1, k);
    let h = ops::batch_norm(&h, None, stats).relu();
    let h = conv(&conv(&h, &w("op.5.weight"), 1, kernel / 2, 1, channels), &w("op.6.weight"), 1, 0, 1, k);
    split_edges(&ops::batch_norm(&h, None, stats), k)
}

/// `DilConv` on K edges.
fn dil_convs(params: &ParamSet, group: &EdgeGroup, primitive: Primitive, relu_k: &Tensor, stats: BnStats) -> Tensor {
    let (kernel, k) = (if primitive == Primitive::DilConv3x3 { 3 } else { 5 }, group.k());
    let channels = relu_k.size()[1];
    let w = |suffix: &str| group.stacked(params, primitive, suffix);
    let h = conv(&conv(relu_k, &w("op.1.weight"), group.stride, kernel - 1, 2, channels), &w("op.2.weight"), 1, 0, 1, k);
    split_edges(&ops::batch_norm(&h, None, stats), k)
}

/// The stride-2 skip (`FactorizedReduce`) on K edges; `relu` is ReLU(x), [N, C, H, W].
fn factorized_reduces(params: &ParamSet, group: &EdgeGroup, relu: &Tensor, stats: BnStats) -> Tensor {
    let k = group.k();
    let x = if relu.size()[2] % 2 != 0 { relu.constant_pad_nd([1, 0, 1, 0]) } else { relu.shallow_clone() };
    let shifted = x.slice(2, 1, None, 1).slice(3, 1, None, 1);
    let first = split_edges(&conv(&x, &group.stacked(params, Primitive::SkipConnect, "conv_1.weight"), 2, 0, 1, 1), k);
    let second = split_edges(&conv(&shifted, &group.stacked(params, Primitive::SkipConnect, "conv_2.weight"), 2, 0, 1, 1), k);
    let both = Tensor::cat(&[first, second], 2);
    let s = both.size();
    split_edges(&ops::batch_norm(&both.view([s[0], s[1] * s[2], s[3], s[4]]), None, stats), k)
}

/// Σ_o softmax(α_e)_o · o(x) for every edge e of `group`. `x`: [N, C, H, W]; `mixing`: softmax(θ)
/// of the cell, [num_edges, 8]. Returns [N, K, C, H', W'], edge-major in `group.edges` order.
pub fn mixed_ops(params: &ParamSet, group: &EdgeGroup, x: &Tensor, mixing: &Tensor, stats: BnStats) -> Tensor {
    let k = group.k();
    let rows = Tensor::from_slice(&group.edges.iter().map(|&e| e as i64).collect::<Vec<_>>()).to_device(x.device());
    let weights = mixing.index_select(0, &rows);
    let weight = |p: Primitive| weights.select(1, p.index() as i64).view([1, k, 1, 1, 1]);
    let relu = x.relu();
    let relu_k = relu.repeat([1, k, 1, 1]);
    let shared = |t: Tensor| t.unsqueeze(1);
    let mut sum = shared(ops::pool_bn(x, true, group.stride, stats)) * weight(Primitive::MaxPool3x3)
        + shared(ops::pool_bn(x, false, group.stride, stats)) * weight(Primitive::AvgPool3x3);
    sum += if group.stride == 1 { shared(x.shallow_clone()) * weight(Primitive::SkipConnect) } else { factorized_reduces(params, group, &relu, stats) * weight(Primitive::SkipConnect) };
    for p in [Primitive::SepConv3x3, Primitive::SepConv5x5] {
        sum += sep_convs(params, group, p, &relu_k, stats) * weight(p);
    }
    for p in [Primitive::DilConv3x3, Primitive::DilConv5x5] {
        sum += dil_convs(params, group, p, &relu_k, stats) * weight(p);
    }
    debug_assert_eq!(sum.kind(), Kind::Float);
    sum
}
