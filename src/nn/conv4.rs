//! The Conv-4 network of MAML (Finn et al., 2017), the fixed-architecture baseline T-NAS compares to:
//! 4 × [conv3×3 (64 filters, padding 1), BatchNorm (affine, batch statistics), ReLU, maxpool 2], then
//! a linear head on the flattened map.

use crate::nn::ops::{self, BnStats};
use crate::nn::params::{Init, ParamSet, ParamSpec};
use tch::Tensor;

/// Filters per block, as in MAML.
pub const FILTERS: i64 = 64;
/// Convolutional blocks.
pub const BLOCKS: usize = 4;

#[derive(Clone, Copy, Debug)]
pub struct Conv4 {
    pub in_channels: usize,
    pub image_size: usize,
}

impl Conv4 {
    /// Width of the flattened feature map: 64 × (size / 16)², at least 64.
    pub fn feature_dim(&self) -> usize {
        let side = (0..BLOCKS).fold(self.image_size, |s, _| s / 2).max(1);
        FILTERS as usize * side * side
    }

    pub fn body_specs(&self) -> Vec<ParamSpec> {
        (0..BLOCKS)
            .flat_map(|i| {
                let c_in = if i == 0 {
                    self.in_channels as i64
                } else {
                    FILTERS
                };
                vec![
                    ParamSpec::new(
                        format!("blocks.{i}.conv.weight"),
                        &[FILTERS, c_in, 3, 3],
                        Init::FanIn,
                    ),
                    ParamSpec::new(
                        format!("blocks.{i}.conv.bias"),
                        &[FILTERS],
                        Init::FanInBias(c_in * 9),
                    ),
                    ParamSpec::new(format!("blocks.{i}.bn.weight"), &[FILTERS], Init::Ones),
                    ParamSpec::new(format!("blocks.{i}.bn.bias"), &[FILTERS], Init::Zeros),
                ]
            })
            .collect()
    }

    /// `x`: [N, in_ch, S, S] → [N, feature_dim].
    pub fn features(&self, params: &ParamSet, x: &Tensor, stats: BnStats) -> Tensor {
        let mut h = x.shallow_clone();
        for i in 0..BLOCKS {
            let p = |n: &str| params.get(&format!("blocks.{i}.{n}"));
            h = h.conv2d(
                p("conv.weight"),
                Some(p("conv.bias")),
                [1, 1],
                [1, 1],
                [1, 1],
                1,
            );
            h = ops::batch_norm(&h, Some((p("bn.weight"), p("bn.bias"))), stats).relu();
            if h.size()[2] >= 2 {
                h = ops::max_pool_2x2(&h);
            }
        }
        h.flatten(1, -1)
    }
}
