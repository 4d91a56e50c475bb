//! All the mixed ops that read some states of a cell, computed together.
//!
//! In a DARTS cell, state j feeds one edge of every later node. The parameter-free candidates
//! (pools with their BN, identity, zero) give the same output on each of those edges, so they
//! are computed once per state; the parametric ones (sep/dil convs, FactorizedReduce) run as
//! grouped convolutions over all the edges at once, with BatchNorm over their stacked channels,
//! which is exactly the per-edge BN because BN is per channel. The two cell inputs, which exist
//! before any node and feed the same number of edges, go through together, and what they add to
//! each node comes out summed. Values and gradients equal the sums of per-edge `MixedOp`s (the
//! parity tests compare against the PyTorch reference); what changes is many times fewer kernel
//! launches, which dominate the cost at few-shot sizes.

use crate::nn::fast::depthwise::{depthwise_blocks, depthwise_fanout, Kernel};
use crate::nn::mixed_op::op_prefix;
use crate::nn::ops::{self, conv, BnStats};
use crate::nn::params::ParamSet;
use crate::nn::search_space::Primitive;
use crate::runtime::index_cache::IndexCache;
use tch::{Device, Kind, Tensor};

/// The edges leaving S states of a cell, K' per state: cell index, edge indices (rows of α,
/// state-major: the first K' read the first state), their common stride, and how many tasks'
/// channels sit side by side in every state ([`crate::adapt::task_batch`]; 1 for a single task).
pub struct EdgeGroup<'a> {
    pub cell: usize,
    pub edges: &'a [usize],
    pub stride: i64,
    pub tasks: i64,
}

impl EdgeGroup<'_> {
    /// All the edges, K = S·K'.
    fn k(&self) -> i64 {
        self.edges.len() as i64
    }

    /// The names of every edge's `suffix` weight of each of `primitives` in turn.
    fn run(&self, primitives: &[Primitive], suffix: &str) -> Vec<String> {
        primitives
            .iter()
            .flat_map(|&p| {
                self.edges
                    .iter()
                    .map(move |&e| format!("{}.{suffix}", op_prefix(self.cell, e, p)))
            })
            .collect()
    }

    /// Those weights concatenated along dim 0; a view of a task's flat weights when they are
    /// laid out by [`EdgeGroup::weight_runs`].
    fn stacked(&self, params: &ParamSet, primitives: &[Primitive], suffix: &str) -> Tensor {
        params.stacked(&self.run(primitives, suffix))
    }

    /// Every run of weights [`node_contributions`] reads stacked: each conv candidate's first
    /// depthwise kernels (their sizes differ), the four first pointwise convs, each sep conv's second
    /// depthwise kernels, the two second pointwise convs and, at stride 2, each half of
    /// `FactorizedReduce`.
    pub fn weight_runs(&self) -> Vec<Vec<String>> {
        let mut runs: Vec<Vec<String>> = CONVS
            .iter()
            .map(|&p| self.run(&[p], "op.1.weight"))
            .collect();
        runs.push(self.run(&CONVS, "op.2.weight"));
        runs.extend(SEPS.iter().map(|&p| self.run(&[p], "op.5.weight")));
        runs.push(self.run(&SEPS, "op.6.weight"));
        if self.stride == 2 {
            runs.extend(
                ["conv_1.weight", "conv_2.weight"]
                    .map(|half| self.run(&[Primitive::SkipConnect], half)),
            );
        }
        runs
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
const CONVS: [Primitive; 4] = [
    Primitive::ALL[FIRST_CONV],
    Primitive::ALL[FIRST_CONV + 1],
    Primitive::ALL[FIRST_CONV + 2],
    Primitive::ALL[FIRST_CONV + 3],
];
/// The two sep convs, whose blocks come first.
const SEPS: [Primitive; 2] = [CONVS[0], CONVS[1]];

/// The sep and dil convs of all K edges. `relu` is ReLU of the S states side by side,
/// [N, S·T·C, H, W]. Returns the two sep convs' and the two dil convs' outputs, each
/// [N, 2·K·T·C, H', W'], blocks in [`CONVS`] order.
///
/// The four candidates' depthwise convs on all K edges run as one ([`depthwise_fanout`]); then
/// their pointwise convs are one grouped conv over 4·K·T groups and one BN normalises all 4·K·T·C
/// channels (BN is per channel, so this is exactly the per-op BN). The sep convs' second half runs
/// the same way over 2·K·T groups.
fn conv_candidates(
    params: &ParamSet,
    group: &EdgeGroup,
    relu: &Tensor,
    states: i64,
    stats: BnStats,
) -> [Tensor; 2] {
    let k = group.k();
    let kc = relu.size()[1] / states * k;
    let depthwise = |primitives: &[Primitive], suffix: &str| {
        primitives
            .iter()
            .map(|&p| group.stacked(params, &[p], suffix))
            .collect::<Vec<_>>()
    };
    let first_depthwise = depthwise(&CONVS, "op.1.weight");
    let first = depthwise_fanout(
        relu,
        &kernels_of(&CONVS, &first_depthwise),
        states,
        group.stride,
    );
    let first = ops::batch_norm(
        &conv(
            &first,
            &group.stacked(params, &CONVS, "op.2.weight"),
            1,
            0,
            1,
        ),
        None,
        stats,
    );
    let second_depthwise = depthwise(&SEPS, "op.5.weight");
    // One split, not two narrows: its backward is one concatenation, where each narrow's is a
    // zero-filled copy of `first` plus an accumulation.
    let [first_seps, dils] =
        <[Tensor; 2]>::try_from(first.split(2 * kc, 1)).expect("sep and dil halves");
    let second = depthwise_blocks(&first_seps.relu(), &kernels_of(&SEPS, &second_depthwise), 1);
    let second = ops::batch_norm(
        &conv(
            &second,
            &group.stacked(params, &SEPS, "op.6.weight"),
            1,
            0,
            1,
        ),
        None,
        stats,
    );
    [second, dils]
}

/// Each primitive's depthwise kernel with its stacked weights.
fn kernels_of<'a>(primitives: &[Primitive], weights: &'a [Tensor]) -> Vec<Kernel<'a>> {
    primitives
        .iter()
        .zip(weights)
        .map(|(&p, w)| Kernel::of(p, w))
        .collect()
}

/// The stride-2 skip (`FactorizedReduce`) on every edge; `relu` is ReLU of the S states side by
/// side, [N, S·T·C, H, W]. Returns [N, K, T, C, H', W'].
///
/// Each (state, task) block is one group of a grouped conv, so its weights are regrouped from the
/// stacked order (state, edge, task) to (state, task, edge), and the outputs back.
fn factorized_reduces(
    params: &ParamSet,
    group: &EdgeGroup,
    relu: &Tensor,
    states: i64,
    stats: BnStats,
) -> Tensor {
    let (k, tasks) = (group.k(), group.tasks);
    let (x, shifted) = ops::factorized_inputs(relu);
    let half = |input: &Tensor, suffix: &str| {
        let w = group.stacked(params, &[Primitive::SkipConnect], suffix);
        let c = w.size()[1];
        let w = w
            .view(&[states, k / states, tasks, -1, c, 1, 1][..])
            .transpose(1, 2)
            .reshape([-1, c, 1, 1]);
        let out = conv(input, &w, 2, 0, 1);
        let s = out.size();
        out.view(&[s[0], states, tasks, k / states, -1, s[2], s[3]][..])
            .transpose(2, 3)
    };
    let both = Tensor::cat(
        &[half(&x, "conv_1.weight"), half(&shifted, "conv_2.weight")],
        4,
    );
    let s = both.size();
    let normalised = ops::batch_norm(&both.reshape([s[0], -1, s[5], s[6]]), None, stats);
    split_edges(&normalised, k, tasks)
}

/// What the S states of `group` add to each node they feed: Σ over the states j of
/// Σ_o softmax(α_(j→node))_o · o(state j), each state feeding the same K' nodes. `states`: each
/// [N, T·C, H, W], same shape; `weights`: the group's mixing weights ([`mixing_weights`]).
/// Returns [N, K', T·C, H', W'], nodes in the order of the first state's edges in `group.edges`.
///
/// Every candidate but `none` (whose output is zero) of every edge goes into one tensor,
/// [N, 7, S, K', T, C, H', W'] (the parameter-free ones computed once per state and repeated for
/// its edges), which one product with the mixing weights and one sum over candidates and states
/// reduce: a few kernels for the whole group, forward and backward, instead of a product and a
/// sum per candidate and a selection per edge.
pub fn node_contributions(
    params: &ParamSet,
    group: &EdgeGroup,
    states: &[&Tensor],
    weights: &Tensor,
    stats: BnStats,
) -> Tensor {
    let (k, s, tasks) = (group.k(), states.len() as i64, group.tasks);
    let x = if states.len() == 1 {
        states[0].shallow_clone()
    } else {
        Tensor::cat(states, 1)
    };
    let c = x.size()[1] / (s * tasks);
    let relu = x.relu();
    let pool = |max: bool| ops::pool_bn(&x, max, group.stride, stats);
    let [max_pool, avg_pool] = [pool(true), pool(false)];
    let [n, _, h, w] = max_pool.size()[..] else {
        unreachable!("pools keep the layout")
    };
    // [N, P·S·K'·T·C, H', W'] (P candidates, then the edges in `group.edges` order, tasks and
    // channels) or, with `once_per_state`, [N, S·T·C, H', W'] repeated for the K' edges of each
    // state, as [N, P, S, K', T, C, H', W'].
    let candidates = |t: &Tensor, once_per_state: bool| {
        let shape = [n, -1, s, k / s, tasks, c, h, w];
        if once_per_state {
            t.view(&[n, 1, s, 1, tasks, c, h, w][..])
                .expand(shape, false)
        } else {
            t.view(&shape[..])
        }
    };
    let skip = if group.stride == 1 {
        candidates(&x, true)
    } else {
        candidates(&factorized_reduces(params, group, &relu, s, stats), false)
    };
    let [seps, dils] = conv_candidates(params, group, &relu, s, stats);
    // Every primitive but `none`, in `Primitive::ALL` order.
    let outputs = Tensor::cat(
        &[
            candidates(&max_pool, true),
            candidates(&avg_pool, true),
            skip,
            candidates(&seps, false),
            candidates(&dils, false),
        ],
        1,
    );
    let mixed = (outputs * weights.view(&[1, -1, s, k / s, tasks, 1, 1, 1][..])).sum_dim_intlist(
        &[1i64, 2][..],
        false,
        None,
    );
    debug_assert_eq!(mixed.kind(), Kind::Float);
    mixed.view([n, k / s, tasks * c, h, w])
}

/// The mixing weights of every candidate but `none` on the edges of each of a cell's groups, one
/// tensor per group, [7·K, T] (candidate-major in `Primitive::ALL` order, then the group's edges;
/// T tasks): the order of [`node_contributions`]'s outputs. `mixing` is the cell's softmax(θ) for
/// each task, [T·num_edges, 8]. One gather for the whole cell, split into views: its backward is
/// one concatenation and one scatter, where a gather per group costs two kernels backward each.
pub fn mixing_weights(mixing: &Tensor, groups: &[&[usize]], tasks: i64) -> Vec<Tensor> {
    let candidates = Primitive::ALL.len() as i64 - 1;
    let sizes: Vec<i64> = groups
        .iter()
        .map(|edges| candidates * edges.len() as i64)
        .collect();
    let all = mixing
        .reshape([tasks, -1])
        .transpose(0, 1)
        .index_select(0, &mixing_index(groups, mixing.device()));
    all.split_with_sizes(&sizes, 0)
}

/// The rows of softmax(θ) laid out [num_edges·8, T] (edge-major, then op) that [`mixing_weights`]
/// gathers, group after group.
fn mixing_index(groups: &[&[usize]], device: Device) -> Tensor {
    static CACHE: IndexCache<Vec<Vec<usize>>> = IndexCache::new();
    CACHE.get(
        groups.iter().map(|edges| edges.to_vec()).collect(),
        device,
        |groups| {
            let ops = Primitive::ALL.len();
            let mixed: Vec<Primitive> = Primitive::ALL
                .into_iter()
                .filter(|&p| p != Primitive::None)
                .collect();
            groups
                .iter()
                .flat_map(|edges| {
                    mixed
                        .iter()
                        .flat_map(move |p| edges.iter().map(move |&e| (e * ops + p.index()) as i64))
                })
                .collect()
        },
    )
}
