//! The DARTS search space: the primitive table and the shape of the supernet.
//!
//! Plain data only. `SearchSpace` is stored in `model.json` and everything that builds or reads
//! tensors (`supernet`, `derived`, `params`) derives its layout from it, so the layout is written
//! down exactly once, in [`SearchSpace::cells`].

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The candidate operations on every edge, in checkpoint order (DARTS `genotypes.PRIMITIVES`).
pub const PRIMITIVES: [&str; 8] = [
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
];

/// Index of `none` in [`PRIMITIVES`]; decoding never picks it.
pub const NONE_INDEX: usize = 0;

/// One operation of [`PRIMITIVES`], typed so the network code can `match` on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Primitive {
    None,
    MaxPool3x3,
    AvgPool3x3,
    SkipConnect,
    SepConv3x3,
    SepConv5x5,
    DilConv3x3,
    DilConv5x5,
}

impl Primitive {
    pub const ALL: [Primitive; 8] = [
        Primitive::None,
        Primitive::MaxPool3x3,
        Primitive::AvgPool3x3,
        Primitive::SkipConnect,
        Primitive::SepConv3x3,
        Primitive::SepConv5x5,
        Primitive::DilConv3x3,
        Primitive::DilConv5x5,
    ];

    pub fn index(self) -> usize {
        Primitive::ALL
            .iter()
            .position(|p| *p == self)
            .expect("every primitive is in ALL")
    }

    pub fn name(self) -> &'static str {
        PRIMITIVES[self.index()]
    }

    /// Side of the depthwise kernel of a sep or dil conv; `None` for the other primitives.
    pub fn conv_kernel(self) -> Option<i64> {
        match self {
            Primitive::SepConv3x3 | Primitive::DilConv3x3 => Some(3),
            Primitive::SepConv5x5 | Primitive::DilConv5x5 => Some(5),
            _ => None,
        }
    }

    pub fn from_name(name: &str) -> Option<Primitive> {
        PRIMITIVES
            .iter()
            .position(|p| *p == name)
            .map(|i| Primitive::ALL[i])
    }
}

/// Shape of a DARTS supernet (the T-NAS learner when `layers == 2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SearchSpace {
    /// 1 for grayscale, 3 for RGB.
    pub in_channels: usize,
    /// Side of the square input image; divisible by 4.
    pub image_size: usize,
    /// C: channels of the first cell's nodes.
    pub init_channels: usize,
    /// Number of cells; 2 is the official T-NAS learner (normal, then reduction).
    pub layers: usize,
    /// Intermediate nodes per cell.
    pub steps: usize,
    /// How many of the last nodes are concatenated into the cell output.
    pub multiplier: usize,
    /// The stem outputs `stem_multiplier * C` channels.
    pub stem_multiplier: usize,
    /// Max-pools in the stem: 2 is official; fewer keep small inputs (Omniglot 28×28) larger.
    pub stem_pools: usize,
}

/// Channel layout and role of one cell, derived from a [`SearchSpace`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CellSpec {
    pub reduction: bool,
    /// Whether the cell before the previous one's output is twice as large (FactorizedReduce).
    pub reduction_prev: bool,
    pub c_prev_prev: usize,
    pub c_prev: usize,
    pub c: usize,
}

impl SearchSpace {
    /// The official T-NAS learner for mini-ImageNet (3×84×84, C = 16, two cells).
    pub fn tnas_official(in_channels: usize, image_size: usize, init_channels: usize) -> Self {
        SearchSpace {
            in_channels,
            image_size,
            init_channels,
            layers: 2,
            steps: 4,
            multiplier: 4,
            stem_multiplier: 3,
            stem_pools: 2,
        }
    }

    /// Edges per cell: node i has 2 + i inputs (14 for 4 steps).
    pub fn num_edges(&self) -> usize {
        (0..self.steps).map(|i| 2 + i).sum()
    }

    /// Index of the first edge of intermediate node `node` in the [num_edges, 8] alpha matrix.
    pub fn first_edge_of_node(&self, node: usize) -> usize {
        (0..node).map(|i| 2 + i).sum()
    }

    /// Whether cell `i` is a reduction cell: the second of two (official), else DARTS's L/3 and 2L/3.
    pub fn is_reduction(&self, i: usize) -> bool {
        if self.layers == 2 {
            i == 1
        } else {
            i == self.layers / 3 || i == 2 * self.layers / 3
        }
    }

    pub fn stem_channels(&self) -> usize {
        self.stem_multiplier * self.init_channels
    }

    /// The cells in order, with the channel bookkeeping of DARTS's `Network.__init__`.
    pub fn cells(&self) -> Vec<CellSpec> {
        let (mut c_prev_prev, mut c_prev, mut c) = (
            self.stem_channels(),
            self.stem_channels(),
            self.init_channels,
        );
        let mut reduction_prev = false;
        (0..self.layers)
            .map(|i| {
                let reduction = self.is_reduction(i);
                if reduction {
                    c *= 2;
                }
                let spec = CellSpec {
                    reduction,
                    reduction_prev,
                    c_prev_prev,
                    c_prev,
                    c,
                };
                reduction_prev = reduction;
                c_prev_prev = c_prev;
                c_prev = self.multiplier * c;
                spec
            })
            .collect()
    }

    /// Width of the pooled feature vector fed to the head.
    pub fn feature_dim(&self) -> usize {
        let last = self.cells().last().copied().expect("layers >= 1");
        self.multiplier * last.c
    }

    /// Checks the constraints the network code relies on; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if ![1, 3].contains(&self.in_channels) {
            return Err(format!(
                "in_channels must be 1 or 3, got {}",
                self.in_channels
            ));
        }
        if self.image_size == 0 || !self.image_size.is_multiple_of(4) {
            return Err(format!(
                "image_size must be a positive multiple of 4, got {}",
                self.image_size
            ));
        }
        if self.init_channels == 0 || !self.init_channels.is_multiple_of(2) {
            return Err(format!(
                "init_channels must be even and positive, got {}",
                self.init_channels
            ));
        }
        if self.layers < 2 {
            return Err(format!("layers must be at least 2, got {}", self.layers));
        }
        if self.steps == 0 || self.multiplier == 0 || self.multiplier > self.steps {
            return Err(format!(
                "need 1 <= multiplier <= steps, got steps {} multiplier {}",
                self.steps, self.multiplier
            ));
        }
        if self.stem_pools > 2 {
            return Err(format!(
                "stem_pools must be 0, 1 or 2, got {}",
                self.stem_pools
            ));
        }
        if !self.stem_channels().is_multiple_of(2) {
            return Err("stem_multiplier * init_channels must be even".into());
        }
        Ok(())
    }
}

#[cfg(test)]
impl SearchSpace {
    /// A supernet small enough for unit tests to adapt and differentiate in milliseconds.
    pub(crate) fn tiny() -> SearchSpace {
        SearchSpace {
            in_channels: 1,
            image_size: 8,
            init_channels: 4,
            layers: 2,
            steps: 2,
            multiplier: 2,
            stem_multiplier: 2,
            stem_pools: 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_layout_matches_the_tnas_learner() {
        let s = SearchSpace::tnas_official(3, 84, 16);
        assert_eq!(s.num_edges(), 14);
        let cells = s.cells();
        assert_eq!(
            cells[0],
            CellSpec {
                reduction: false,
                reduction_prev: false,
                c_prev_prev: 48,
                c_prev: 48,
                c: 16
            }
        );
        assert_eq!(
            cells[1],
            CellSpec {
                reduction: true,
                reduction_prev: false,
                c_prev_prev: 48,
                c_prev: 64,
                c: 32
            }
        );
        assert_eq!(s.feature_dim(), 128);
    }

    #[test]
    fn deeper_networks_reduce_at_thirds() {
        let s = SearchSpace {
            layers: 5,
            ..SearchSpace::tnas_official(1, 28, 8)
        };
        let reductions: Vec<bool> = s.cells().iter().map(|c| c.reduction).collect();
        assert_eq!(reductions, vec![false, true, false, true, false]);
        assert!(s.cells()[2].reduction_prev);
    }

    #[test]
    fn primitive_names_round_trip_in_checkpoint_order() {
        for (i, p) in Primitive::ALL.iter().enumerate() {
            assert_eq!(p.index(), i);
            assert_eq!(Primitive::from_name(p.name()), Some(*p));
        }
        assert_eq!(Primitive::from_name("conv_7x1_1x7"), None);
    }

    #[test]
    fn invalid_spaces_are_explained() {
        let bad = SearchSpace {
            image_size: 30,
            ..SearchSpace::tnas_official(1, 28, 8)
        };
        assert!(bad.validate().unwrap_err().contains("multiple of 4"));
    }
}
