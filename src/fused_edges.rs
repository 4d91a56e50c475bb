//! All the mixed ops that read some states of a cell, computed together.
//!
//! In a DARTS cell, state j feeds one edge of every later node. The parameter-free candidates
//! (pools with their BN, identity, zero) give the same output on each of those K edges, so they
//! are computed once per state; the parametric ones (sep/dil convs, FactorizedReduce) run as
//! grouped convolutions over all the edges at once, with BatchNorm over their stacked channels,
//! which is exactly the per-edge BN because BN is per channel. The two cell inputs, which exist
//! before any node and feed the same number of edges, go through together. Values and gradients
//! equal the per-edge `MixedOp` sums (the parity tests compare against the PyTorch reference);
//! what changes is many times fewer kernel launches, which dominate the cost at few-shot sizes.

use crate::depthwise::{depthwise_blocks, depthwise_fanout, Kernel};
use crate::ops::{self, conv, BnStats};
use crate::params::ParamSet;
use crate::search_space::Primitive;
use crate::supernet::op_prefix;
use tch::{Kind, Tensor};

/// The edges leaving S states of a cell, K per state: cell index, edge indices (rows of α,
/// state-major: the first K read the first state), their common stride, and how many tasks'
/// channels sit side by side in every state ([`crate::task_batch`]; 1 for a single task).
pub struct EdgeGroup<'a> {
    pub cell: usize,
    pub edges: &'a [usize],
    pub stride: i64,
    pub tasks: i64,
}

impl EdgeGroup<'_> {
    /// All the edges, S·K.
    fn k(&self) -> i64 {
        self.edges.len() as i64
    }

    /// Every edge's `suffix` weight for `primitive`, concatenated along dim 0.
    fn stacked(&self, params: &ParamSet, primitive: Primitive, suffix: &str) -> Tensor {
        let weights: Vec<&Tensor> = self.edges.iter().map(|&e| params.get(&format!("{}.{suffix}", op_prefix(self.cell, e, primitive)))).collect();
        Tensor::cat(&weights, 0)
    }
}

/// [N, K·T·C, H, W] → [N, K, T, C, H, W] (K edges, T tasks).
fn split_edges(t: &Tensor, k: i64, tasks: i64) -> Tensor {
    let s = t.size();
    t.view([s[0], k, tasks, s[1] / (k * tasks), s[2], s[3]])
}

/// The four parametric candidates (sep 3×3, sep 5×5, dil 3×3, dil 5×5): primitives
/// `FIRST_CONV..FIRST_CONV + 4`, in the order their channel blocks are laid out below.
const FIRST_CONV: usize = 4;
const CONVS: [Primitive; 4] = [Primitive::ALL[FIRST_CONV], Primitive::ALL[FIRST_CONV + 1], Primitive::ALL[FIRST_CONV + 2], Primitive::ALL[FIRST_CONV + 3]];

/// The sep and dil convs of all K edges. `relu` is ReLU of the S states side by side,
/// [N, S·T·C, H, W]. Returns [N, 4, K, T, C, H', W'], blocks in [`CONVS`] order.
///
/// The four candidates' depthwise convs on all K edges run as one ([`depthwise_fanout`]); then
/// their pointwise convs are one grouped conv over 4·K groups and one BN normalises all 4·K·C
/// channels (BN is per channel, so this is exactly the per-op BN). The sep convs' second half runs
/// the same way over 2·K groups.
fn conv_candidates(params: &ParamSet, group: &EdgeGroup, relu: &Tensor, states: i64, stats: BnStats) -> Tensor {
    let k = group.k();
    let kc = relu.size()[1] / states * k;
    let stacked = |primitives: &[Primitive], suffix: &str| primitives.iter().map(|&p| group.stacked(params, p, suffix)).collect::<Vec<_>>();
    let first_depthwise = stacked(&CONVS, "op.1.weight");
    let first = depthwise_fanout(relu, &kernels_of(&CONVS, &first_depthwise), states, group.stride);
    let first = ops::batch_norm(&conv(&first, &Tensor::cat(&stacked(&CONVS, "op.2.weight"), 0), 1, 0, 1), None, stats);
    let seps = &CONVS[..2];
    let second_depthwise = stacked(seps, "op.5.weight");
    let second = depthwise_blocks(&first.narrow(1, 0, 2 * kc).relu(), &kernels_of(seps, &second_depthwise), 1);
    let second = ops::batch_norm(&conv(&second, &Tensor::cat(&stacked(seps, "op.6.weight"), 0), 1, 0, 1), None, stats);
    let out = Tensor::cat(&[second, first.narrow(1, 2 * kc, 2 * kc)], 1);
    let s = out.size();
    out.view(&[s[0], 4, k, group.tasks, kc / (k * group.tasks), s[2], s[3]][..])
}

/// Each primitive's depthwise kernel with its stacked weights.
fn kernels_of<'a>(primitives: &[Primitive], weights: &'a [Tensor]) -> Vec<Kernel<'a>> {
    primitives.iter().zip(weights).map(|(&p, w)| Kernel::of(p, w)).collect()
}

/// The stride-2 skip (`FactorizedReduce`) on every edge; `relu` is ReLU of the S states side by
/// side, [N, S·T·C, H, W]. Returns [N, K, T, C, H', W'].
///
/// Each (state, task) block is one group of a grouped conv, so its weights are regrouped from the
/// stacked order (state, edge, task) to (state, task, edge), and the outputs back.
fn factorized_reduces(params: &ParamSet, group: &EdgeGroup, relu: &Tensor, states: i64, stats: BnStats) -> Tensor {
    let (k, tasks) = (group.k(), group.tasks);
    let (x, shifted) = ops::factorized_inputs(relu);
    let half = |input: &Tensor, suffix: &str| {
        let w = group.stacked(params, Primitive::SkipConnect, suffix);
        let c = w.size()[1];
        let w = w.view(&[states, k / states, tasks, -1, c, 1, 1][..]).transpose(1, 2).reshape([-1, c, 1, 1]);
        let out = conv(input, &w, 2, 0, 1);
        let s = out.size();
        out.view(&[s[0], states, tasks, k / states, -1, s[2], s[3]][..]).transpose(2, 3)
    };
    let both = Tensor::cat(&[half(&x, "conv_1.weight"), half(&shifted, "conv_2.weight")], 4);
    let s = both.size();
    let normalised = ops::batch_norm(&both.reshape([s[0], -1, s[5], s[6]]), None, stats);
    split_edges(&normalised, k, tasks)
}

/// Σ_o softmax(α_e)_o · o(x_e) for every edge e of `group`, where x_e is the edge's state among
/// `states` (each [N, T·C, H, W], same shape). `mixing`: softmax(θ) of the cell for each task,
/// [T·num_edges, 8]. Returns [N, S·K, T·C, H', W'], edge-major in `group.edges` order.
pub fn mixed_ops(params: &ParamSet, group: &EdgeGroup, states: &[&Tensor], mixing: &Tensor, stats: BnStats) -> Tensor {
    let (k, s, tasks) = (group.k(), states.len() as i64, group.tasks);
    let mixing = mixing.view([tasks, -1, mixing.size()[1]]);
    // [T, S·K, 8] → per primitive [1, S, K/S, T, 1, 1, 1], to broadcast over the edges' outputs.
    let weights = Tensor::stack(&group.edges.iter().map(|&e| mixing.select(1, e as i64)).collect::<Vec<_>>(), 1);
    let x = if states.len() == 1 { states[0].shallow_clone() } else { Tensor::cat(states, 1) };
    let c = x.size()[1] / (s * tasks);
    // A per-state tensor [N, S·T·C, H', W'] viewed [N, S, 1, T, C, H', W'].
    let per_state = |t: &Tensor| {
        let z = t.size();
        t.reshape(&[z[0], s, 1, tasks, c, z[2], z[3]][..])
    };
    let weight = |p: Primitive| weights.select(2, p.index() as i64).transpose(0, 1).reshape(&[1, s, k / s, tasks, 1, 1, 1][..]);
    let relu = x.relu();
    let mut sum = per_state(&ops::pool_bn(&x, true, group.stride, stats)) * weight(Primitive::MaxPool3x3)
        + per_state(&ops::pool_bn(&x, false, group.stride, stats)) * weight(Primitive::AvgPool3x3);
    sum += if group.stride == 1 { per_state(&x) * weight(Primitive::SkipConnect) } else { factorized_reduces(params, group, &relu, s, stats).view_as(&sum) * weight(Primitive::SkipConnect) };
    let sum = sum.flatten(1, 2);
    let conv_weights = weights.narrow(2, FIRST_CONV as i64, 4).permute([2, 1, 0]).reshape(&[1, 4, k, tasks, 1, 1, 1][..]);
    let sum = sum + (conv_candidates(params, group, &relu, s, stats) * conv_weights).sum_dim_intlist(&[1i64][..], false, None);
    debug_assert_eq!(sum.kind(), Kind::Float);
    sum.flatten(2, 3)
}
