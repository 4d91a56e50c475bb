//! Convolution whose grouping follows from the shapes, the one every op and kernel calls.

use tch::{Device, Tensor};

/// A convolution whose grouping follows from the shapes: `x` [N, G·C_in, H, W] and `w`
/// [G·C_out, C_in, k, k] make G groups. So a depthwise weight is depthwise, a dense weight is dense,
/// and weights stacked for several tasks ([`crate::adapt::task_batch`]) convolve each task's own channels.
pub fn conv(x: &Tensor, w: &Tensor, stride: i64, padding: i64, dilation: i64) -> Tensor {
    let groups = x.size()[1] / w.size()[1];
    if x.device() == Device::Cpu && w.size()[2..] == [1, 1] && stride == 1 && padding == 0 {
        return pointwise_product(x, w, groups);
    }
    x.conv2d(
        w,
        None::<Tensor>,
        [stride, stride],
        [padding, padding],
        [dilation, dilation],
        groups,
    )
}

/// A 1×1, stride-1 convolution of G groups as one batched matrix product: [G, C_out, C_in] times
/// every image's [G, C_in, H·W]. On the CPU libtorch runs a small batch's 1×1 convolution on its
/// reference kernel, one call per group with a copy in and out of each, and a cell's pointwise
/// convs have 4·K groups per task (172 calls a step for the shipped model's 1-shot tasks); the
/// product is one call whatever the groups.
fn pointwise_product(x: &Tensor, w: &Tensor, groups: i64) -> Tensor {
    let [n, _, h, width] = x.size()[..] else {
        panic!("conv input must be [N, C, H, W]")
    };
    let c_out = w.size()[0] / groups;
    w.reshape([groups, c_out, -1])
        .matmul(&x.reshape([n, groups, -1, h * width]))
        .view([n, groups * c_out, h, width])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    /// The matrix-product route gives `conv2d`'s values and gradients for dense and grouped
    /// 1×1 convolutions, a non-contiguous input included.
    #[test]
    fn pointwise_products_equal_the_convolution_and_its_gradients() {
        tch::manual_seed(0);
        for (groups, c_in, c_out, n) in [(1, 6, 4, 3), (8, 4, 4, 5), (3, 2, 5, 20)] {
            let x = Tensor::randn([n, 2 * groups * c_in, 3, 3], (Kind::Float, Device::Cpu))
                .set_requires_grad(true);
            let every_other = x.slice(1, 0, None, 2);
            let w = Tensor::randn([groups * c_out, c_in, 1, 1], (Kind::Float, Device::Cpu))
                .set_requires_grad(true);
            let expected = every_other.conv2d(&w, None::<Tensor>, [1, 1], [0, 0], [1, 1], groups);
            let ours = conv(&every_other, &w, 1, 0, 1);
            assert_eq!(ours.size(), expected.size());
            assert!(
                ours.allclose(&expected, 1e-5, 1e-5, false),
                "{groups} groups"
            );
            let upstream = Tensor::randn(expected.size(), (Kind::Float, Device::Cpu));
            let want = Tensor::run_backward(
                &[(&expected * &upstream).sum(Kind::Float)],
                &[&x, &w],
                false,
                false,
            );
            let got = Tensor::run_backward(
                &[(&ours * &upstream).sum(Kind::Float)],
                &[&x, &w],
                false,
                false,
            );
            for (g, e) in got.iter().zip(&want) {
                assert!(g.allclose(e, 1e-5, 1e-5, false), "{groups} groups gradient");
            }
        }
    }
}
