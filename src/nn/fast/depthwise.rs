//! Depthwise convolutions (the first half of every sep and dil conv), as batched matrix products on
//! small feature maps.
//!
//! On an H×W map a depthwise k×k convolution is, per channel, a linear map from the H·W input pixels
//! to the H'·W' output pixels. Which tap links which two pixels depends only on kernel size,
//! dilation, stride and map size, so the map's matrix is one gather of the weights, and the
//! convolution of every channel is one batched product (its backward: two products and the gather's
//! scatter-add). At few-shot sizes (7×7 maps and smaller) the matrices are small. On the CPU this
//! replaces oneDNN's backward for 5×5 and dilated depthwise kernels, an im2col and a GEMM per
//! channel that took a third of an adaptation step (docs/PERFORMANCE.md). Larger maps, where the
//! matrices would outgrow the convolution, keep `conv2d`.

use crate::nn::conv::conv;
use crate::nn::search_space::Primitive;
use crate::runtime::index_cache::IndexCache;
use tch::{Device, Kind, Tensor};

/// Largest (H·W)·(H'·W') computed as a product: 7×7 → 7×7 is, 8×8 → 8×8 is not (there the two
/// ways cost the same, and beyond it the convolution wins).
const MAX_MATRIX_ELEMENTS: i64 = 2500;

/// A depthwise kernel `[C, 1, k, k]` with its dilation; padding keeps the map size, d·(k − 1)/2.
#[derive(Clone, Copy)]
pub struct Kernel<'a> {
    pub weight: &'a Tensor,
    pub dilation: i64,
}

impl<'a> Kernel<'a> {
    /// The depthwise kernel of a sep or dil conv `primitive` (dil convs dilate by 2).
    pub fn of(primitive: Primitive, weight: &'a Tensor) -> Kernel<'a> {
        let dilation = if matches!(primitive, Primitive::DilConv3x3 | Primitive::DilConv5x5) {
            2
        } else {
            1
        };
        Kernel { weight, dilation }
    }

    fn size(&self) -> i64 {
        self.weight.size()[3]
    }

    fn padding(&self) -> i64 {
        self.dilation * (self.size() - 1) / 2
    }

    fn output_size(&self, h: i64, w: i64, stride: i64) -> (i64, i64) {
        (
            output_side(h, self.size(), self.dilation, stride),
            output_side(w, self.size(), self.dilation, stride),
        )
    }

    fn convolve(&self, x: &Tensor, stride: i64) -> Tensor {
        conv(x, self.weight, stride, self.padding(), self.dilation)
    }
}

/// The per-channel matrices of `kernels` on an h×w map, for an input of `states` blocks of D
/// channels that each feed `fanout` edges: weights [S·E·D, 1, k, k] in (state, edge, channel) order
/// → [S·D, H·W, E·P·H'·W'], entry (q, (e, p, o)) the weight of kernel p on edge e linking input
/// pixel q to output pixel o, or 0. One gather of the weights (and, backward, one scatter-add), as
/// no two taps of a kernel link the same two pixels. The zero that entries without a tap gather is
/// a column concatenated to each edge's taps, expanded from a cached zero: no kernel of its own,
/// where padding the taps took two, and one more backward.
fn matrices(kernels: &[Kernel], states: i64, fanout: i64, h: i64, w: i64, stride: i64) -> Tensor {
    let rows = kernels[0].weight.size()[0];
    let d = rows / (states * fanout);
    let mut taps: Vec<Tensor> = kernels
        .iter()
        .map(|k| k.weight.view([states, fanout, d, -1]).transpose(1, 2))
        .collect();
    taps.push(cached_zero(kernels[0].weight).expand([states, d, fanout, 1], false));
    let with_zero = Tensor::cat(&taps, 3).reshape([states * d, -1]);
    let shapes: Vec<(i64, i64)> = kernels.iter().map(|k| (k.size(), k.dilation)).collect();
    with_zero
        .index_select(
            1,
            &tap_index(&shapes, fanout, stride, h, w, kernels[0].weight.device()),
        )
        .view([states * d, h * w, -1])
}

/// One depthwise convolution: `x` [N, C, H, W] → [N, C, H', W'].
pub fn depthwise(x: &Tensor, kernel: Kernel, stride: i64) -> Tensor {
    depthwise_blocks(x, &[kernel], stride)
}

/// The depthwise convs of several edges and candidates reading the same states: `x` holds S states
/// of D channels, [N, S·D, H, W]; each state feeds E edges, and each edge has every kernel, with
/// weights [S·E·D, 1, k, k] in (state, edge, channel) order. Returns [N, P·S·E·D, H', W'], kernel
/// p's outputs in block p, in the weights' order within it.
pub fn depthwise_fanout(x: &Tensor, kernels: &[Kernel], states: i64, stride: i64) -> Tensor {
    let [n, sd, h, w] = x.size()[..] else {
        panic!("depthwise input must be [N, C, H, W]")
    };
    let (p, d) = (kernels.len() as i64, sd / states);
    let fanout = kernels[0].weight.size()[0] / sd;
    let (ho, wo) = kernels[0].output_size(h, w, stride);
    if !small_enough(h * w, ho * wo) {
        let per_edge = x
            .view([n, states, 1, d, h, w])
            .expand([n, states, fanout, d, h, w], false)
            .reshape([n, -1, h, w]);
        return join(
            kernels
                .iter()
                .map(|k| k.convolve(&per_edge, stride))
                .collect(),
            1,
        );
    }
    let y = channels_first(x).bmm(&matrices(kernels, states, fanout, h, w, stride));
    y.view(&[states, d, n, fanout, p, ho, wo][..])
        .permute([2, 4, 0, 3, 1, 5, 6])
        .reshape([n, p * sd * fanout, ho, wo])
}

/// Kernel p applied to channel block p of `x`: [N, P·C, H, W] → [N, P·C, H', W'].
pub fn depthwise_blocks(x: &Tensor, kernels: &[Kernel], stride: i64) -> Tensor {
    let [n, pc, h, w] = x.size()[..] else {
        panic!("depthwise input must be [N, C, H, W]")
    };
    let (ho, wo) = kernels[0].output_size(h, w, stride);
    if !small_enough(h * w, ho * wo) {
        let c = pc / kernels.len() as i64;
        return join(
            kernels
                .iter()
                .enumerate()
                .map(|(i, k)| k.convolve(&x.narrow(1, i as i64 * c, c), stride))
                .collect(),
            1,
        );
    }
    let block_matrices = match widened_to_one(kernels) {
        Some(weight) => matrices(
            &[Kernel {
                weight: &weight,
                dilation: kernels[0].dilation,
            }],
            1,
            1,
            h,
            w,
            stride,
        ),
        None => join(
            kernels
                .iter()
                .map(|k| matrices(&[*k], 1, 1, h, w, stride))
                .collect(),
            0,
        ),
    };
    channels_first(x)
        .bmm(&block_matrices)
        .permute([1, 0, 2])
        .reshape([n, pc, ho, wo])
}

/// Kernels of one dilation (the sep convs' second halves) as one kernel over all their blocks,
/// each widened to the largest size with a zero border: a "same"-padded convolution's output does
/// not change, and the blocks' matrices come from one gather instead of one each (three kernels
/// fewer, forward and backward, for the two sep convs).
fn widened_to_one(kernels: &[Kernel]) -> Option<Tensor> {
    let dilation = kernels[0].dilation;
    if kernels.len() < 2 || kernels.iter().any(|k| k.dilation != dilation) {
        return None;
    }
    let size = kernels.iter().map(Kernel::size).max()?;
    let widened: Vec<Tensor> = kernels
        .iter()
        .map(|k| {
            let border = (size - k.size()) / 2;
            debug_assert_eq!(
                size - k.size(),
                2 * border,
                "odd kernel sizes widen by a whole border"
            );
            if border == 0 {
                k.weight.shallow_clone()
            } else {
                k.weight.constant_pad_nd([border; 4])
            }
        })
        .collect();
    Some(Tensor::cat(&widened, 0))
}

/// Output side of a "same"-padded convolution at `stride`.
fn output_side(side: i64, kernel: i64, dilation: i64, stride: i64) -> i64 {
    let pad = dilation * (kernel - 1) / 2;
    (side + 2 * pad - dilation * (kernel - 1) - 1) / stride + 1
}

fn small_enough(input_pixels: i64, output_pixels: i64) -> bool {
    input_pixels * output_pixels <= MAX_MATRIX_ELEMENTS
}

/// `parts` concatenated along `dim`; a single part is returned as it is (`cat` would copy it, and
/// a lone sep or dil conv has one kernel).
fn join(mut parts: Vec<Tensor>, dim: i64) -> Tensor {
    if parts.len() == 1 {
        return parts.remove(0);
    }
    Tensor::cat(&parts, dim)
}

/// A zero of `like`'s kind on its device, [1, 1, 1, 1], made once (so a recorded graph only reads it).
fn cached_zero(like: &Tensor) -> Tensor {
    static CACHE: IndexCache<Kind> = IndexCache::new();
    CACHE.get_tensor(like.kind(), like.device(), |&kind| {
        Tensor::zeros([1, 1, 1, 1], (kind, Device::Cpu))
    })
}

/// [N, C, H, W] → [C, N, H·W], each channel's images as rows of a matrix.
fn channels_first(x: &Tensor) -> Tensor {
    let s = x.size();
    x.permute([1, 0, 2, 3]).reshape([s[1], s[0], s[2] * s[3]])
}

/// For kernels of (size, dilation) `shapes` on `fanout` edges, at `stride` on an h×w map:
/// [H·W·E·P·H'·W'], for each (input pixel, edge, kernel, output pixel) the column of that tap among
/// all edges' taps laid side by side (each edge's kernels' taps, then a zero), or the first edge's
/// zero where no tap links the two pixels. Built once per shape and device.
fn tap_index(
    shapes: &[(i64, i64)],
    fanout: i64,
    stride: i64,
    h: i64,
    w: i64,
    device: Device,
) -> Tensor {
    /// (kernel shapes, fanout, stride, h, w)
    type Key = (Vec<(i64, i64)>, i64, i64, i64, i64);
    static CACHE: IndexCache<Key> = IndexCache::new();
    CACHE.get((shapes.to_vec(), fanout, stride, h, w), device, |_| {
        let taps: i64 = shapes.iter().map(|(k, _)| k * k).sum();
        let (columns_per_edge, no_tap) = (taps + 1, taps);
        // The tap of a kernel linking input (row, col) to output (a, b), if any.
        let tap = |(kernel, dilation): (i64, i64), (row, col): (i64, i64), (a, b): (i64, i64)| {
            let pad = dilation * (kernel - 1) / 2;
            let offset = |input: i64, output: i64| {
                let d = input - output * stride + pad;
                (d >= 0 && d % dilation == 0 && d / dilation < kernel).then_some(d / dilation)
            };
            Some(offset(row, a)? * kernel + offset(col, b)?)
        };
        let mut index = Vec::new();
        for input in (0..h).flat_map(|r| (0..w).map(move |c| (r, c))) {
            for edge in 0..fanout {
                let mut first_tap = edge * columns_per_edge;
                for &shape @ (kernel, dilation) in shapes {
                    let (ho, wo) = (
                        output_side(h, kernel, dilation, stride),
                        output_side(w, kernel, dilation, stride),
                    );
                    index.extend(
                        (0..ho)
                            .flat_map(|a| (0..wo).map(move |b| (a, b)))
                            .map(|output| {
                                tap(shape, input, output).map_or(no_tap, |t| first_tap + t)
                            }),
                    );
                    first_tap += kernel * kernel;
                }
            }
        }
        index
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
    }

    /// Values and both gradients equal `conv2d`'s for every DARTS kernel, stride and a map on
    /// each side of the size limit.
    #[test]
    fn products_equal_the_convolution_and_its_gradients() {
        tch::manual_seed(0);
        for (side, stride) in [(7, 1), (7, 2), (4, 1), (2, 1), (5, 2), (11, 2)] {
            let x = Tensor::randn([3, 6, side, side], (Kind::Float, Device::Cpu))
                .set_requires_grad(true);
            let weights: Vec<Tensor> = [3, 5, 3, 5]
                .iter()
                .map(|&k| {
                    Tensor::randn([6, 1, k, k], (Kind::Float, Device::Cpu)).set_requires_grad(true)
                })
                .collect();
            let kernels: Vec<Kernel> = weights
                .iter()
                .zip([1, 1, 2, 2])
                .map(|(weight, dilation)| Kernel { weight, dilation })
                .collect();
            let reference = Tensor::cat(
                &kernels
                    .iter()
                    .map(|k| k.convolve(&x, stride))
                    .collect::<Vec<_>>(),
                1,
            );
            let ours = depthwise_fanout(&x, &kernels, 1, stride);
            assert_eq!(ours.size(), reference.size());
            assert!(
                relative_error(&ours, &reference) < 1e-5,
                "{side}×{side} stride {stride}"
            );
            let mut inputs = vec![&x];
            inputs.extend(&weights);
            assert_same_gradients(
                &ours,
                &reference,
                &inputs,
                &format!("{side}×{side} stride {stride}"),
            );

            // Two states of 3 channels, each feeding 2 edges with their own weights.
            let edge_weights: Vec<Tensor> = [3, 5, 3, 5]
                .iter()
                .map(|&k| Tensor::randn([12, 1, k, k], (Kind::Float, Device::Cpu)))
                .collect();
            let edge_kernels: Vec<Kernel> = edge_weights
                .iter()
                .zip([1, 1, 2, 2])
                .map(|(weight, dilation)| Kernel { weight, dilation })
                .collect();
            let per_edge = x
                .view([3, 2, 1, 3, side, side])
                .expand([3, 2, 2, 3, side, side], false)
                .reshape([3, 12, side, side]);
            let expected = Tensor::cat(
                &edge_kernels
                    .iter()
                    .map(|k| k.convolve(&per_edge, stride))
                    .collect::<Vec<_>>(),
                1,
            );
            assert!(
                relative_error(&depthwise_fanout(&x, &edge_kernels, 2, stride), &expected) < 1e-5,
                "{side}×{side} stride {stride} fan-out"
            );

            let blocks = x.repeat([1, 4, 1, 1]);
            assert!(
                relative_error(&depthwise_blocks(&blocks, &kernels, stride), &reference) < 1e-5
            );

            // The sep convs' second halves: a 3×3 and a 5×5 kernel of one dilation, each on its own
            // block, widened to one kernel.
            let seps = &kernels[..2];
            let expected = Tensor::cat(
                &seps
                    .iter()
                    .map(|k| k.convolve(&x, stride))
                    .collect::<Vec<_>>(),
                1,
            );
            let ours = depthwise_blocks(&x.repeat([1, 2, 1, 1]), seps, stride);
            assert!(
                relative_error(&ours, &expected) < 1e-5,
                "{side}×{side} stride {stride} widened"
            );
            assert_same_gradients(
                &ours,
                &expected,
                &[&x, &weights[0], &weights[1]],
                &format!("{side}×{side} stride {stride} widened"),
            );
        }
    }

    /// The gradients of `ours` and `reference` with respect to `inputs`, under one random
    /// upstream gradient, agree.
    fn assert_same_gradients(ours: &Tensor, reference: &Tensor, inputs: &[&Tensor], what: &str) {
        let upstream = Tensor::randn(reference.size(), (Kind::Float, Device::Cpu));
        let backward = |out: &Tensor| {
            Tensor::run_backward(&[(out * &upstream).sum(Kind::Float)], inputs, false, false)
        };
        for (g, e) in backward(ours).iter().zip(&backward(reference)) {
            assert!(relative_error(g, e) < 1e-5, "{what} gradient");
        }
    }
}
