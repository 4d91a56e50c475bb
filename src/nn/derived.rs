//! The derived network: the discrete DARTS network a genotype describes, running on the weights the
//! supernet holds for the kept edges (no retraining; T-NAS retrains from scratch, we inherit).
//!
//! Like DARTS's `model.Cell`, each node sums its two kept ops without architecture weights. Each
//! op keeps the exact form it had inside the supernet (pooling followed by its non-affine BN), since
//! that is the form its inherited weights were trained in.

use crate::nn::genotype::{Edge, Genotype, EDGES_PER_NODE};
use crate::nn::mixed_op::{edge_op, edge_stride, op_prefix, op_specs};
use crate::nn::ops::BnStats;
use crate::nn::params::{ParamSet, ParamSpec};
use crate::nn::search_space::{Primitive, SearchSpace};
use crate::nn::supernet::{global_average_pool, Supernet};
use tch::Tensor;

/// A derived network: a search space plus a validated genotype.
#[derive(Clone, Debug)]
pub struct DerivedNetwork {
    supernet: Supernet,
    genotype: Genotype,
    /// Per cell, per node, the kept (op, input) pairs parsed once.
    cells: Vec<Vec<[(Primitive, usize); EDGES_PER_NODE]>>,
}

impl DerivedNetwork {
    pub fn new(space: SearchSpace, genotype: Genotype) -> Result<Self, String> {
        genotype.validate(&space)?;
        let parse = |edges: &[Edge]| -> Vec<[(Primitive, usize); EDGES_PER_NODE]> {
            edges
                .chunks(EDGES_PER_NODE)
                .map(|pair| {
                    let op = |e: &Edge| (Primitive::from_name(&e.0).expect("validated"), e.1);
                    [op(&pair[0]), op(&pair[1])]
                })
                .collect()
        };
        let cells = space
            .cells()
            .iter()
            .map(|c| {
                if c.reduction {
                    parse(&genotype.reduce)
                } else {
                    parse(&genotype.normal)
                }
            })
            .collect();
        Ok(DerivedNetwork {
            supernet: Supernet::new(space),
            genotype,
            cells,
        })
    }

    pub fn supernet(&self) -> &Supernet {
        &self.supernet
    }

    pub fn genotype(&self) -> &Genotype {
        &self.genotype
    }

    /// Names of the supernet weights this network uses (stem, preprocessing, kept edges' ops).
    /// Fine-tuning the derived network updates only these.
    pub fn body_specs(&self) -> Vec<ParamSpec> {
        let space = &self.supernet.space;
        let all = self.supernet.body_specs();
        let mut kept: Vec<ParamSpec> = all
            .iter()
            .filter(|s| !s.name.contains("._ops."))
            .cloned()
            .collect();
        for (i, spec) in space.cells().iter().enumerate() {
            for (node, pair) in self.cells[i].iter().enumerate() {
                for &(op, input) in pair {
                    let edge = space.first_edge_of_node(node) + input;
                    kept.extend(op_specs(
                        &op_prefix(i, edge, op),
                        op,
                        spec.c as i64,
                        edge_stride(spec.reduction, input),
                    ));
                }
            }
        }
        kept.sort_by_key(|s| all.iter().position(|a| a.name == s.name));
        kept.dedup_by(|a, b| a.name == b.name);
        kept
    }

    /// Pooled features. `x`: [N, in_ch, S, S] → [N, feature_dim].
    pub fn features(&self, params: &ParamSet, x: &Tensor, stats: BnStats) -> Tensor {
        let space = &self.supernet.space;
        let stem = self.supernet.stem(params, x, stats);
        let (mut s0, mut s1) = (stem.shallow_clone(), stem);
        for (i, spec) in space.cells().iter().enumerate() {
            let (p0, p1) = self.supernet.preprocess(params, i, spec, &s0, &s1, stats);
            let mut states = vec![p0, p1];
            for (node, pair) in self.cells[i].iter().enumerate() {
                let sum = pair
                    .iter()
                    .map(|&(op, input)| {
                        let prefix = op_prefix(i, space.first_edge_of_node(node) + input, op);
                        edge_op(
                            op,
                            &states[input],
                            params,
                            &prefix,
                            edge_stride(spec.reduction, input),
                            stats,
                        )
                    })
                    .reduce(|a, b| a + b)
                    .expect("two edges per node");
                states.push(sum);
            }
            let concat = if spec.reduction {
                &self.genotype.reduce_concat
            } else {
                &self.genotype.normal_concat
            };
            let out = Tensor::cat(
                &concat
                    .iter()
                    .map(|&k| states[k].shallow_clone())
                    .collect::<Vec<_>>(),
                1,
            );
            (s0, s1) = (s1, out);
        }
        global_average_pool(&s1)
    }
}
