//! DARTS's `MixedOp`: the candidate ops of one edge, their parameters, and the edge's output as
//! the mixing-weighted sum of every candidate. The supernet's cells run the same computation fused
//! ([`crate::nn::fast::fused_edges`]); [`mixed_op`] is its plain form, which the fused cell is tested against.

use crate::nn::ops::{self, BnStats};
use crate::nn::params::{Init, ParamSet, ParamSpec};
use crate::nn::search_space::Primitive;
use tch::Tensor;

/// Prefix of the parameters of op `primitive` on edge `edge` of cell `cell`.
pub fn op_prefix(cell: usize, edge: usize, primitive: Primitive) -> String {
    format!("cells.{cell}._ops.{edge}._ops.{}", primitive.index())
}

/// Parameters of one candidate op with `c` channels at `stride` (DARTS `OPS`, non-affine BN).
pub fn op_specs(prefix: &str, primitive: Primitive, c: i64, stride: i64) -> Vec<ParamSpec> {
    let depthwise = |k: i64| [c, 1, k, k];
    let pointwise = [c, c, 1, 1];
    match primitive {
        Primitive::SkipConnect if stride == 2 => vec![
            ParamSpec::new(
                format!("{prefix}.conv_1.weight"),
                &[c / 2, c, 1, 1],
                Init::FanIn,
            ),
            ParamSpec::new(
                format!("{prefix}.conv_2.weight"),
                &[c / 2, c, 1, 1],
                Init::FanIn,
            ),
        ],
        Primitive::SepConv3x3 | Primitive::SepConv5x5 => {
            let k = primitive.conv_kernel().expect("a sep conv");
            vec![
                ParamSpec::new(format!("{prefix}.op.1.weight"), &depthwise(k), Init::FanIn),
                ParamSpec::new(format!("{prefix}.op.2.weight"), &pointwise, Init::FanIn),
                ParamSpec::new(format!("{prefix}.op.5.weight"), &depthwise(k), Init::FanIn),
                ParamSpec::new(format!("{prefix}.op.6.weight"), &pointwise, Init::FanIn),
            ]
        }
        Primitive::DilConv3x3 | Primitive::DilConv5x5 => {
            let k = primitive.conv_kernel().expect("a dil conv");
            vec![
                ParamSpec::new(format!("{prefix}.op.1.weight"), &depthwise(k), Init::FanIn),
                ParamSpec::new(format!("{prefix}.op.2.weight"), &pointwise, Init::FanIn),
            ]
        }
        _ => Vec::new(),
    }
}

/// Applies one candidate op of an edge, reading its weights from `params` under `prefix`.
pub fn edge_op(
    primitive: Primitive,
    x: &Tensor,
    params: &ParamSet,
    prefix: &str,
    stride: i64,
    stats: BnStats,
) -> Tensor {
    let w = |suffix: &str| params.get(&format!("{prefix}.{suffix}"));
    match primitive {
        Primitive::None => ops::zero(x, stride),
        Primitive::MaxPool3x3 => ops::pool_bn(x, true, stride, stats),
        Primitive::AvgPool3x3 => ops::pool_bn(x, false, stride, stats),
        Primitive::SkipConnect if stride == 2 => {
            ops::factorized_reduce(x, w("conv_1.weight"), w("conv_2.weight"), stats)
        }
        Primitive::SkipConnect => x.shallow_clone(),
        Primitive::SepConv3x3 | Primitive::SepConv5x5 => ops::sep_conv(
            x,
            [
                w("op.1.weight"),
                w("op.2.weight"),
                w("op.5.weight"),
                w("op.6.weight"),
            ],
            stride,
            stats,
        ),
        Primitive::DilConv3x3 | Primitive::DilConv5x5 => {
            ops::dil_conv(x, [w("op.1.weight"), w("op.2.weight")], stride, stats)
        }
    }
}

/// Stride of the edge from input `input` in a cell: 2 from the cell inputs of a reduction cell.
pub fn edge_stride(reduction: bool, input: usize) -> i64 {
    if reduction && input < 2 {
        2
    } else {
        1
    }
}

/// The edge's output as DARTS's `MixedOp` computes it: Σ_k mixing[k] · op_k(x), over every
/// candidate op of edge `edge` of cell `cell`. `mixing`: [8], the edge's row of mixing weights.
pub fn mixed_op(
    x: &Tensor,
    mixing: &Tensor,
    params: &ParamSet,
    cell: usize,
    edge: usize,
    stride: i64,
    stats: BnStats,
) -> Tensor {
    let outputs = Primitive::ALL.iter().map(|&p| {
        edge_op(p, x, params, &op_prefix(cell, edge, p), stride, stats)
            * mixing.get(p.index() as i64)
    });
    outputs
        .reduce(|sum, output| sum + output)
        .expect("eight candidate ops")
}
