//! The DARTS operations as pure functions of an input and explicit weights (DARTS `operations.py`).
//!
//! Nothing here owns a parameter: callers pass the weights, so the same code runs the meta-weights,
//! a request's adapted copy, or a derived network. Every BatchNorm is the batch-statistics kind
//! (T-NAS never uses running statistics); [`BnStats`] says which rows supply the statistics.

pub use crate::nn::conv::conv;
use crate::nn::fast::depthwise::{depthwise, Kernel};
use tch::{Device, Tensor};

/// BatchNorm epsilon, as PyTorch's default.
pub const BN_EPS: f64 = 1e-5;

/// Which rows of the batch the BatchNorm statistics come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnStats {
    /// The whole batch (adaptation steps; `transductive` predictions).
    Batch,
    /// Only the first `n` rows, applied to all rows: with the support set first, a query's output
    /// does not depend on the other queries (`support` predictions).
    LeadingRows(i64),
}

/// BatchNorm with batch statistics over (N, H, W), optionally affine. `x`: [N, C, H, W].
pub fn batch_norm(x: &Tensor, affine: Option<(&Tensor, &Tensor)>, stats: BnStats) -> Tensor {
    let (weight, bias) = affine.unzip();
    match stats {
        BnStats::LeadingRows(n) if n < x.size()[0] => {
            let (var, mean) = x
                .narrow(0, 0, n)
                .var_mean_correction(&[0i64, 2, 3][..], 0, true);
            if !x.requires_grad() {
                // Predictions: the inference kernel applies given statistics in one pass.
                let flat = |t: Tensor| t.view([-1]);
                return Tensor::batch_norm(
                    x,
                    weight,
                    bias,
                    Some(&flat(mean)),
                    Some(&flat(var)),
                    false,
                    0.0,
                    BN_EPS,
                    true,
                );
            }
            // Meta-training differentiates through the statistics, which the kernel would not.
            let normalised = (x - mean) * (var + BN_EPS).rsqrt();
            match (weight, bias) {
                (Some(w), Some(b)) => normalised * w.view([1, -1, 1, 1]) + b.view([1, -1, 1, 1]),
                _ => normalised,
            }
        }
        _ => Tensor::batch_norm(
            x,
            weight,
            bias,
            None::<&Tensor>,
            None::<&Tensor>,
            true,
            0.1,
            BN_EPS,
            true,
        ),
    }
}

/// Concatenates channel blocks task by task: each part is [N, T·C_i, H, W] with T tasks side by
/// side; the result is [N, T·ΣC_i, H, W], each task's channels together (plain `cat` when T = 1).
pub fn cat_channels(parts: &[Tensor], tasks: i64) -> Tensor {
    let per_task: Vec<Tensor> = parts
        .iter()
        .map(|p| {
            let s = p.size();
            p.view([s[0], tasks, s[1] / tasks, s[2], s[3]])
        })
        .collect();
    let joined = Tensor::cat(&per_task, 2);
    let s = joined.size();
    joined.view([s[0], s[1] * s[2], s[3], s[4]])
}

/// ReLU → 1×1 conv → non-affine BN (cell preprocessing, `ReLUConvBN`). `w`: [C_out, C_in, 1, 1].
pub fn relu_conv_bn(x: &Tensor, w: &Tensor, stats: BnStats) -> Tensor {
    batch_norm(&conv(&x.relu(), w, 1, 0, 1), None, stats)
}

/// `FactorizedReduce`: halves H and W with two stride-2 1×1 convs, the second shifted by a pixel.
/// An odd-sized map first gets one zero row on top and one zero column on the left.
/// `w1`, `w2`: [C_out/2, C_in, 1, 1].
pub fn factorized_reduce(x: &Tensor, w1: &Tensor, w2: &Tensor, stats: BnStats) -> Tensor {
    let tasks = x.size()[1] / w1.size()[1];
    let (x, shifted) = factorized_inputs(&x.relu());
    let out = cat_channels(&[conv(&x, w1, 2, 0, 1), conv(&shifted, w2, 2, 0, 1)], tasks);
    batch_norm(&out, None, stats)
}

/// What `FactorizedReduce`'s two convolutions read from ReLU(x): the map (zero-padded on top and
/// left when its size is odd) and the same map shifted by one pixel.
pub fn factorized_inputs(relu: &Tensor) -> (Tensor, Tensor) {
    let x = if relu.size()[2] % 2 != 0 {
        relu.constant_pad_nd([1, 0, 1, 0])
    } else {
        relu.shallow_clone()
    };
    let shifted = x.slice(2, 1, None, 1).slice(3, 1, None, 1);
    (x, shifted)
}

/// `SepConv`: [ReLU, depthwise k×k (stride), 1×1, BN] twice, the second at stride 1.
/// `w`: [depthwise1 [C,1,k,k], pointwise1 [C,C,1,1], depthwise2, pointwise2].
pub fn sep_conv(x: &Tensor, w: [&Tensor; 4], stride: i64, stats: BnStats) -> Tensor {
    let h = conv(
        &depthwise(
            &x.relu(),
            Kernel {
                weight: w[0],
                dilation: 1,
            },
            stride,
        ),
        w[1],
        1,
        0,
        1,
    );
    let h = batch_norm(&h, None, stats).relu();
    let h = conv(
        &depthwise(
            &h,
            Kernel {
                weight: w[2],
                dilation: 1,
            },
            1,
        ),
        w[3],
        1,
        0,
        1,
    );
    batch_norm(&h, None, stats)
}

/// `DilConv`: ReLU, depthwise k×k with dilation 2 (stride), 1×1, BN.
/// `w`: [depthwise [C,1,k,k], pointwise [C,C,1,1]].
pub fn dil_conv(x: &Tensor, w: [&Tensor; 2], stride: i64, stats: BnStats) -> Tensor {
    let h = conv(
        &depthwise(
            &x.relu(),
            Kernel {
                weight: w[0],
                dilation: 2,
            },
            stride,
        ),
        w[1],
        1,
        0,
        1,
    );
    batch_norm(&h, None, stats)
}

/// 3×3 max or average pool (average excludes padding), then the non-affine BN that DARTS's
/// `MixedOp` appends to pooling ops.
pub fn pool_bn(x: &Tensor, max: bool, stride: i64, stats: BnStats) -> Tensor {
    let pooled = if max {
        x.max_pool2d([3, 3], [stride, stride], [1, 1], [1, 1], false)
    } else {
        x.avg_pool2d([3, 3], [stride, stride], [1, 1], false, false, None)
    };
    batch_norm(&pooled, None, stats)
}

/// A 2×2 max pool, stride 2 (the supernet's stem, Conv-4's blocks). On the CPU it runs on a
/// channels-last copy: libtorch's NCHW max-pool kernel is a scalar loop, and at the stem's map sizes
/// forward and backward take 40% less time this way, the two copies included (same values and
/// gradients).
pub fn max_pool_2x2(x: &Tensor) -> Tensor {
    let pool = |t: &Tensor| t.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
    if x.device() != Device::Cpu {
        return pool(x);
    }
    let channels_last = x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2]);
    pool(&channels_last).contiguous()
}

/// The `none` op: zeros of the (strided) input's shape.
pub fn zero(x: &Tensor, stride: i64) -> Tensor {
    if stride == 1 {
        x.zeros_like()
    } else {
        x.slice(2, 0, None, stride)
            .slice(3, 0, None, stride)
            .zeros_like()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// The channels-last route gives libtorch's NCHW values and gradients, ties included: after a
    /// ReLU half the inputs are 0, and the gradient must go to the same (first) maximum.
    #[test]
    fn max_pool_2x2_equals_the_nchw_pool_with_ties() {
        tch::manual_seed(0);
        for side in [28, 7, 3] {
            let x = Tensor::randn([4, 5, side, side], (Kind::Float, Device::Cpu))
                .relu()
                .set_requires_grad(true);
            let nchw = x.max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false);
            let ours = max_pool_2x2(&x);
            assert!(ours.equal(&nchw) && ours.is_contiguous(), "{side}×{side}");
            let upstream = Tensor::randn(nchw.size(), (Kind::Float, Device::Cpu));
            let expected =
                Tensor::run_backward(&[(&nchw * &upstream).sum(Kind::Float)], &[&x], false, false);
            let got =
                Tensor::run_backward(&[(&ours * &upstream).sum(Kind::Float)], &[&x], false, false);
            assert!(got[0].equal(&expected[0]), "{side}×{side} gradient");
        }
    }
}
