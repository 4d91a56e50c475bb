//! How θ becomes the mixing weights of a supernet pass: DARTS's softmax over each edge's ops, or
//! soft pruning (MetaNAS, Elsken et al. 2020), which anneals that softmax over the inner steps so
//! the adapted supernet ends as the discrete network of its own genotype.
//!
//! Soft pruning differs from the softmax in three ways, each chosen so that as the temperature
//! falls the mixing weights reach exactly what [`crate::nn::genotype::Genotype::decode`] keeps:
//! - the op softmax is taken at temperature τ, over the ops other than `none` (DARTS never keeps
//!   `none`), so each edge tends to its strongest op;
//! - with `pairwise_inputs`, each node weighs its input edges by a softmax over input *pairs* at
//!   τ, a pair's logit being the sum of its two edges' strengths, so each node tends to exactly
//!   two inputs of weight 1. An edge's strength is DARTS's ranking score, its best non-`none` op's
//!   log-probability under softmax(θ);
//! - the temperature falls linearly from `start` at the first inner step to `end`, and queries are
//!   always predicted at `end`: the network that answers is the annealed end state.
//!
//! Meta-learned θ stays close to uniform, so at any usable end temperature the annealed weights
//! are still a mixture. With `hard_end` the end state *is* the decoded genotype: its weights are
//! the genotype's one-hot weights in the forward pass, and gradients pass straight through to the
//! soft weights at `end` (as in GDAS, Dong & Yang 2019), so meta-training optimises the network
//! that each task's genotype describes.
//!
//! In float32 an edge's strength saturates at 0 once its best op leads the others by about 17
//! logits; saturated edges then tie (decoding keeps the lower index, the relaxation splits the
//! weight). Meta-learned θ stays far from that (its softmax is close to uniform).

use crate::nn::search_space::SearchSpace;
use crate::runtime::index_cache::IndexCache;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};
use utoipa::ToSchema;

/// How a supernet's θ is relaxed into mixing weights (`model.json` `relaxation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Relaxation {
    /// DARTS and T-NAS: softmax(θ) over all ops of each edge, at every step.
    #[default]
    Softmax,
    /// Soft pruning: softmax(θ/τ) over the ops other than `none`, τ annealed linearly from `start`
    /// (first inner step) to `end` (predictions), each node's inputs weighed by a softmax over
    /// input pairs when `pairwise_inputs` is set.
    Annealed {
        start: f64,
        end: f64,
        pairwise_inputs: bool,
        /// At `end`, the forward pass uses the decoded genotype's one-hot weights; gradients
        /// are the soft weights'.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        hard_end: bool,
    },
}

impl Relaxation {
    /// Checks the temperatures; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Relaxation::Annealed { start, end, .. } if !(start.is_finite() && end.is_finite() && start > 0.0 && end > 0.0) => {
                Err(format!("relaxation temperatures must be positive and finite (start {start}, end {end})"))
            }
            Relaxation::Annealed { start, end, hard_end: true, .. } if start <= end => Err(format!(
                "a hard end needs the temperature to fall (start {start} > end {end}): the genotype's one-hot weights are used at the end temperature only"
            )),
            _ => Ok(()),
        }
    }

    /// Whether the end state is a discrete network, the decoded genotype's (one op per edge, two
    /// inputs per node): exactly with `hard_end`, up to the end temperature with pairwise inputs.
    pub fn ends_discrete(&self) -> bool {
        matches!(
            self,
            Relaxation::Annealed {
                pairwise_inputs: true,
                hard_end: false,
                ..
            } | Relaxation::Annealed { hard_end: true, .. }
        )
    }

    /// τ of the first inner step, where a task starts and a proto head is built, also when it takes
    /// no steps: meta-training builds heads here, and at 0 steps a head built at the end
    /// temperature instead measured lower (docs/MODEL_FORMAT.md).
    pub fn start_temperature(&self) -> f64 {
        self.temperature(0, 1)
    }

    /// τ of inner step `step` of `steps`; `step == steps` (and any step of a task adapted for 0
    /// steps) is the end state, where queries are predicted.
    pub fn temperature(&self, step: usize, steps: usize) -> f64 {
        match *self {
            Relaxation::Softmax => 1.0,
            Relaxation::Annealed { end, .. } if step >= steps => end,
            Relaxation::Annealed { start, end, .. } => {
                start + (end - start) * step as f64 / steps as f64
            }
        }
    }

    /// The mixing weights of one cell type's θ ([T·E, 8], `tasks` tasks stacked task by task) at
    /// temperature `temperature`.
    pub fn mixing(
        &self,
        space: &SearchSpace,
        theta: &Tensor,
        temperature: f64,
        tasks: i64,
    ) -> Tensor {
        match *self {
            Relaxation::Softmax => theta.softmax(-1, Kind::Float),
            Relaxation::Annealed {
                pairwise_inputs,
                end,
                hard_end,
                ..
            } => {
                let ops = annealed_op_weights(theta, temperature);
                let soft = if pairwise_inputs {
                    ops * input_weights(space, theta, temperature, tasks).reshape([-1, 1])
                } else {
                    ops
                };
                if hard_end && temperature <= end {
                    // Forward: exactly the genotype (soft − soft is 0); backward: the soft weights.
                    genotype_weights(space, theta, tasks) + (&soft - soft.detach())
                } else {
                    soft
                }
            }
        }
    }
}

/// The decoded genotype as mixing weights: 1 on each node's two strongest input edges' strongest
/// op other than `none`, 0 elsewhere; [T·E, 8] → [T·E, 8], no gradient. Chosen as
/// [`crate::nn::genotype::Genotype::decode`] chooses, from the same softmax(θ) and with the same
/// ties (the lower index wins), so the network that answers is the genotype returned.
fn genotype_weights(space: &SearchSpace, theta: &Tensor, tasks: i64) -> Tensor {
    tch::no_grad(|| {
        let ops = theta.size()[1];
        let (strength, best_op) = theta
            .softmax(-1, Kind::Float)
            .narrow(1, 1, ops - 1)
            .max_dim(1, false);
        let op_one_hot = (best_op + 1).one_hot(ops).to_kind(Kind::Float);
        let strength = strength.reshape([tasks, -1]);
        let kept: Vec<Tensor> = (0..space.steps)
            .map(|node| {
                let inputs = node as i64 + 2;
                let s = strength.narrow(1, space.first_edge_of_node(node) as i64, inputs);
                // An edge's rank: the edges stronger than it, and those as strong before it.
                let (this, other) = (s.unsqueeze(2), s.unsqueeze(1));
                let before = Tensor::ones([inputs, inputs], (Kind::Bool, s.device())).tril(-1);
                let ahead = other
                    .gt_tensor(&this)
                    .logical_or(&other.eq_tensor(&this).logical_and(&before));
                ahead.sum_dim_intlist(2i64, false, Kind::Int64).lt(2)
            })
            .collect();
        Tensor::cat(&kept, 1).to_kind(Kind::Float).reshape([-1, 1]) * op_one_hot
    })
}

/// DARTS's ranking score of each edge: its best non-`none` op's log-probability under softmax(θ);
/// θ [T·E, 8] → [T, E].
fn edge_strengths(theta: &Tensor, tasks: i64) -> Tensor {
    let ops = theta.size()[1];
    theta
        .log_softmax(-1, Kind::Float)
        .narrow(1, 1, ops - 1)
        .amax(&[1i64][..], false)
        .reshape([tasks, -1])
}

/// softmax(θ/τ) over every op but `none` (column 0), whose weight is 0: [E, 8] → [E, 8].
fn annealed_op_weights(theta: &Tensor, temperature: f64) -> Tensor {
    let ops = theta.size()[1];
    let kept = (theta.narrow(1, 1, ops - 1) / temperature).softmax(-1, Kind::Float);
    Tensor::cat(&[kept.zeros_like().narrow(1, 0, 1), kept], 1)
}

/// Each edge's weight in its node: a softmax over the node's input pairs of (strength_i +
/// strength_j)/τ, summed over the pairs that hold the edge. θ [T·E, 8] → [T, E]; each node's
/// weights sum to 2.
fn input_weights(space: &SearchSpace, theta: &Tensor, temperature: f64, tasks: i64) -> Tensor {
    let strength = edge_strengths(theta, tasks);
    let membership = pair_membership(space, theta.device());
    let pair_logits = strength.matmul(&membership) / temperature;
    let mut offset = 0;
    let per_node: Vec<Tensor> = (0..space.steps)
        .map(|node| {
            let pairs = ((node + 2) * (node + 1) / 2) as i64;
            let p = pair_logits
                .narrow(1, offset, pairs)
                .softmax(-1, Kind::Float);
            offset += pairs;
            p
        })
        .collect();
    Tensor::cat(&per_node, 1).matmul(&membership.transpose(0, 1))
}

/// [E, P]: 1 where edge e is one of pair p's two inputs; pairs node by node, (i, j) with i < j.
fn pair_membership(space: &SearchSpace, device: tch::Device) -> Tensor {
    static CACHE: IndexCache<usize> = IndexCache::new();
    CACHE.get_tensor(space.steps, device, |&steps| {
        let edges = (0..steps).map(|n| n + 2).sum::<usize>();
        let mut columns = Vec::new();
        let mut first = 0;
        for node in 0..steps {
            for i in 0..node + 2 {
                for j in i + 1..node + 2 {
                    let mut column = vec![0f32; edges];
                    (column[first + i], column[first + j]) = (1.0, 1.0);
                    columns.push(column);
                }
            }
            first += node + 2;
        }
        let pairs = columns.len() as i64;
        Tensor::from_slice(&columns.concat())
            .view([pairs, edges as i64])
            .transpose(0, 1)
            .contiguous()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::genotype::{Edge, Genotype};
    use crate::nn::params::matrix_rows;
    use crate::nn::search_space::Primitive;
    use tch::Device;

    fn space() -> SearchSpace {
        SearchSpace {
            in_channels: 1,
            image_size: 8,
            init_channels: 4,
            layers: 2,
            steps: 4,
            multiplier: 4,
            stem_multiplier: 2,
            stem_pools: 1,
        }
    }

    /// The softmax is DARTS's, bit for bit: imported and older checkpoints keep their behaviour.
    #[test]
    fn the_softmax_relaxation_is_the_plain_softmax() {
        tch::manual_seed(3);
        let theta = Tensor::randn([14, 8], (Kind::Float, Device::Cpu));
        assert!(Relaxation::Softmax
            .mixing(&space(), &theta, 0.05, 1)
            .equal(&theta.softmax(-1, Kind::Float)));
        assert_eq!(Relaxation::Softmax.temperature(0, 10), 1.0);
    }

    #[test]
    fn the_temperature_falls_linearly_and_predictions_are_at_the_end() {
        let annealed = Relaxation::Annealed {
            start: 1.0,
            end: 0.1,
            pairwise_inputs: true,
            hard_end: false,
        };
        let taus: Vec<f64> = (0..=3).map(|s| annealed.temperature(s, 3)).collect();
        for (got, want) in taus.iter().zip([1.0, 0.7, 0.4, 0.1]) {
            assert!((got - want).abs() < 1e-12, "{taus:?}");
        }
        assert_eq!(annealed.temperature(0, 0), 0.1, "no steps: the end state");
        assert!(Relaxation::Annealed {
            start: 1.0,
            end: 0.0,
            pairwise_inputs: true,
            hard_end: false,
        }
        .validate()
        .is_err());
    }

    /// Each node's input weights sum to 2, and as τ falls (θ of a few logits' spread, as adapted
    /// θ has) the mixing weights become the genotype
    /// DARTS decodes from the same θ: its op with weight 1 on each of its two kept inputs per node,
    /// 0 elsewhere; for several tasks at once, each task's own.
    #[test]
    fn the_annealed_end_state_is_the_decoded_genotype() {
        let space = space();
        let relaxation = Relaxation::Annealed {
            start: 1.0,
            end: 1e-5,
            pairwise_inputs: true,
            hard_end: false,
        };
        tch::manual_seed(4);
        let tasks = 3;
        let theta = || {
            (Tensor::randn([14, 8], (Kind::Float, Device::Cpu)).repeat([tasks, 1])
                + Tensor::randn([tasks * 14, 8], (Kind::Float, Device::Cpu)))
                * 2.0
        };
        let (normal, reduce) = (theta(), theta());
        let soft = relaxation.mixing(&space, &normal, 1.0, tasks);
        let per_node = soft
            .sum_dim_intlist(1i64, false, Kind::Float)
            .reshape([tasks, -1]);
        for node in 0..space.steps {
            let sums = per_node
                .narrow(1, space.first_edge_of_node(node) as i64, node as i64 + 2)
                .sum_dim_intlist(1i64, false, Kind::Float);
            assert!(
                sums.allclose(&Tensor::from_slice(&[2f32; 3]), 1e-5, 1e-5, false),
                "node {node}: {sums}"
            );
        }
        let end =
            |theta: &Tensor| relaxation.mixing(&space, theta, relaxation.temperature(5, 5), tasks);
        let (end_normal, end_reduce) = (end(&normal), end(&reduce));
        let rows = |theta: &Tensor, t: i64| {
            matrix_rows(&theta.narrow(0, t * 14, 14).softmax(-1, Kind::Float))
        };
        for t in 0..tasks {
            let genotype = Genotype::decode(&space, &rows(&normal, t), &rows(&reduce, t));
            for (cell, mixing) in [
                (&genotype.normal, &end_normal),
                (&genotype.reduce, &end_reduce),
            ] {
                let mut expected = vec![vec![0f32; 8]; 14];
                for (node, pair) in cell.chunks(2).enumerate() {
                    for Edge(op, input) in pair {
                        let op = Primitive::from_name(op).expect("a decoded op");
                        expected[space.first_edge_of_node(node) + input][op.index()] = 1.0;
                    }
                }
                let expected = Tensor::from_slice(&expected.concat()).view([14, 8]);
                let got = mixing.narrow(0, t * 14, 14);
                assert!(
                    got.allclose(&expected, 1e-4, 1e-4, false),
                    "task {t}: {got} vs {expected}"
                );
            }
        }
    }

    /// With `hard_end`, the end state is the decoded genotype exactly, even for θ close to uniform
    /// (where the soft end state is still a mixture), and θ's gradient is the soft weights'.
    #[test]
    fn a_hard_end_is_the_genotype_with_the_soft_gradient() {
        let space = space();
        let soft = Relaxation::Annealed {
            start: 1.0,
            end: 0.1,
            pairwise_inputs: true,
            hard_end: false,
        };
        let hard = Relaxation::Annealed {
            start: 1.0,
            end: 0.1,
            pairwise_inputs: true,
            hard_end: true,
        };
        tch::manual_seed(5);
        let tasks = 3;
        // The third task's θ has exact ties (repeated rows, as in node 1's three inputs, and two
        // equal logits in a row): decoding keeps the lower index, and so must the end state.
        let near_uniform = Tensor::randn([tasks * 14, 8], (Kind::Float, Device::Cpu)) * 0.01;
        let row = near_uniform.get(28).copy();
        row.get(5).copy_(&row.get(3));
        for r in [28, 30, 31, 32] {
            near_uniform.get(r).copy_(&row);
        }
        let theta = near_uniform.set_requires_grad(true);
        let end = hard.temperature(5, 5);
        let hard_end = hard.mixing(&space, &theta, end, tasks);
        for t in 0..tasks {
            let rows = matrix_rows(&theta.narrow(0, t * 14, 14).softmax(-1, Kind::Float));
            let genotype = Genotype::decode(&space, &rows, &rows);
            let mut expected = vec![vec![0f32; 8]; 14];
            for (node, pair) in genotype.normal.chunks(2).enumerate() {
                for Edge(op, input) in pair {
                    let op = Primitive::from_name(op).expect("a decoded op");
                    expected[space.first_edge_of_node(node) + input][op.index()] = 1.0;
                }
            }
            let expected = Tensor::from_slice(&expected.concat()).view([14, 8]);
            assert!(hard_end.narrow(0, t * 14, 14).equal(&expected), "task {t}");
        }
        assert!(
            hard.mixing(&space, &theta, hard.temperature(2, 5), tasks)
                .equal(&soft.mixing(&space, &theta, soft.temperature(2, 5), tasks)),
            "before the end the weights are the soft ones"
        );
        let probe = Tensor::randn([tasks * 14, 8], (Kind::Float, Device::Cpu));
        let gradient = |relaxation: &Relaxation| {
            let loss = (relaxation.mixing(&space, &theta, end, tasks) * &probe).sum(Kind::Float);
            Tensor::run_backward(&[loss], &[&theta], false, false).remove(0)
        };
        assert!(gradient(&hard).allclose(&gradient(&soft), 1e-6, 1e-6, false));
        assert!(hard.ends_discrete());
        let rising = Relaxation::Annealed {
            start: 0.1,
            end: 0.1,
            pairwise_inputs: true,
            hard_end: true,
        };
        assert!(
            rising.validate().is_err(),
            "a hard end needs a falling temperature"
        );
    }
}
