//! The DARTS supernet of the T-NAS learner (`learner.Network`), as a function of explicit weights.
//!
//! Parameter names are the official learner's module paths (`stem0.0.weight`,
//! `cells.1._ops.3._ops.4.op.1.weight`, ...), so official checkpoints import by renaming nothing but
//! the classifier, and the derived network finds an edge's weights by the same name.

use crate::nn::fast::fused_edges::{self, EdgeGroup};
use crate::nn::mixed_op::{edge_stride, mixed_op, op_prefix, op_specs};
use crate::nn::ops::{self, BnStats};
use crate::nn::params::{matrix_rows, Init, ParamSet, ParamSpec};
use crate::nn::relaxation::Relaxation;
use crate::nn::search_space::{CellSpec, Primitive, SearchSpace};
use tch::{Kind, Tensor};

/// softmax(θ) as host rows, (normal, reduce), each [num_edges][8] (see [`Alphas::mixing_rows`]).
pub type MixingRows = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// Architecture logits θ: `alphas_normal` and `alphas_reduce`, each [num_edges, 8].
#[derive(Debug)]
pub struct Alphas {
    pub normal: Tensor,
    pub reduce: Tensor,
}

impl Alphas {
    /// DARTS initialisation: 1e-3 · N(0, 1).
    pub fn initialise(space: &SearchSpace, device: tch::Device) -> Alphas {
        let shape = [space.num_edges() as i64, Primitive::ALL.len() as i64];
        Alphas {
            normal: Tensor::randn(shape, (Kind::Float, device)) * 1e-3,
            reduce: Tensor::randn(shape, (Kind::Float, device)) * 1e-3,
        }
    }

    /// The mixing weights softmax(θ) over ops, per edge.
    pub fn softmaxed(&self) -> Alphas {
        Alphas {
            normal: self.normal.softmax(-1, Kind::Float),
            reduce: self.reduce.softmax(-1, Kind::Float),
        }
    }

    /// softmax(θ) on the host, a row of 8 op weights per edge: what genotypes decode from and
    /// responses show.
    pub fn mixing_rows(&self) -> MixingRows {
        let mixing = self.softmaxed();
        (matrix_rows(&mixing.normal), matrix_rows(&mixing.reduce))
    }

    pub fn for_cell(&self, reduction: bool) -> &Tensor {
        if reduction {
            &self.reduce
        } else {
            &self.normal
        }
    }

    /// A new pair with `f` applied to both matrices.
    pub fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Alphas {
        Alphas {
            normal: f(&self.normal),
            reduce: f(&self.reduce),
        }
    }

    /// Independent leaf copies for a task's adaptation, `tasks` copies stacked along dim 0 for a
    /// task batch ([`crate::adapt::task_batch`]; 1 for a single task), like [`ParamSet::task_copy`].
    pub fn task_copy(&self, device: tch::Device, tasks: i64) -> Alphas {
        self.map(|t| {
            t.detach()
                .to_device(device)
                .repeat([tasks, 1])
                .set_requires_grad(true)
        })
    }
}

impl Clone for Alphas {
    /// Shares storage (like `Tensor::shallow_clone`); use [`Alphas::task_copy`] for a copy.
    fn clone(&self) -> Self {
        self.map(Tensor::shallow_clone)
    }
}

/// The weights, BN mode and number of side-by-side tasks of one forward pass, passed down together.
#[derive(Clone, Copy)]
struct Pass<'a> {
    params: &'a ParamSet,
    stats: BnStats,
    tasks: i64,
}

/// The edges leaving some states of a cell ([`Supernet::edge_groups`]): the states, the nodes they
/// feed, the edges (state-major) and their stride.
struct GroupPlan {
    states: Vec<usize>,
    targets: Vec<usize>,
    edges: Vec<usize>,
    stride: i64,
}

/// The supernet of one [`SearchSpace`] and the relaxation its θ is read through; holds no weights.
#[derive(Clone, Copy, Debug)]
pub struct Supernet {
    pub space: SearchSpace,
    pub relaxation: Relaxation,
}

impl Supernet {
    /// The DARTS supernet: θ relaxed by a plain softmax.
    pub fn new(space: SearchSpace) -> Self {
        Supernet {
            space,
            relaxation: Relaxation::Softmax,
        }
    }

    /// The supernet with θ read through `relaxation`.
    pub fn relaxed(space: SearchSpace, relaxation: Relaxation) -> Self {
        Supernet { space, relaxation }
    }

    /// The mixing weights of θ (`tasks` tasks stacked) at `temperature` ([`Relaxation::mixing`]).
    pub fn mixing(&self, alphas: &Alphas, temperature: f64) -> Alphas {
        let tasks = alphas.normal.size()[0] / self.space.num_edges() as i64;
        alphas.map(|theta| {
            self.relaxation
                .mixing(&self.space, theta, temperature, tasks)
        })
    }

    /// Every parameter of the body (stem and cells), in the learner's registration order.
    pub fn body_specs(&self) -> Vec<ParamSpec> {
        let s = &self.space;
        let (c_half, c_stem) = ((s.stem_channels() / 2) as i64, s.stem_channels() as i64);
        let mut specs = vec![
            ParamSpec::new(
                "stem0.0.weight",
                &[c_half, s.in_channels as i64, 3, 3],
                Init::FanIn,
            ),
            ParamSpec::new("stem0.1.weight", &[c_half], Init::Ones),
            ParamSpec::new("stem0.1.bias", &[c_half], Init::Zeros),
            ParamSpec::new("stem0.4.weight", &[c_stem, c_half, 3, 3], Init::FanIn),
            ParamSpec::new("stem0.5.weight", &[c_stem], Init::Ones),
            ParamSpec::new("stem0.5.bias", &[c_stem], Init::Zeros),
        ];
        for (i, cell) in s.cells().iter().enumerate() {
            let c = cell.c as i64;
            if cell.reduction_prev {
                for conv in ["conv_1", "conv_2"] {
                    specs.push(ParamSpec::new(
                        format!("cells.{i}.preprocess0.{conv}.weight"),
                        &[c / 2, cell.c_prev_prev as i64, 1, 1],
                        Init::FanIn,
                    ));
                }
            } else {
                specs.push(ParamSpec::new(
                    format!("cells.{i}.preprocess0.op.1.weight"),
                    &[c, cell.c_prev_prev as i64, 1, 1],
                    Init::FanIn,
                ));
            }
            specs.push(ParamSpec::new(
                format!("cells.{i}.preprocess1.op.1.weight"),
                &[c, cell.c_prev as i64, 1, 1],
                Init::FanIn,
            ));
            for node in 0..s.steps {
                for input in 0..node + 2 {
                    let edge = s.first_edge_of_node(node) + input;
                    for p in Primitive::ALL {
                        specs.extend(op_specs(
                            &op_prefix(i, edge, p),
                            p,
                            c,
                            edge_stride(cell.reduction, input),
                        ));
                    }
                }
            }
        }
        specs
    }

    /// Stem: conv3×3 → BN(affine) → [maxpool2] → ReLU → conv3×3 → BN(affine) → [maxpool2].
    /// `x`: [N, in_ch, S, S] → [N, 3C, S / 2^stem_pools, S / 2^stem_pools].
    pub fn stem(&self, params: &ParamSet, x: &Tensor, stats: BnStats) -> Tensor {
        let conv = |x: &Tensor, w: &str| ops::conv(x, params.get(w), 1, 1, 1);
        let bn = |x: &Tensor, prefix: &str| {
            let (w, b) = (
                params.get(&format!("{prefix}.weight")),
                params.get(&format!("{prefix}.bias")),
            );
            ops::batch_norm(x, Some((w, b)), stats)
        };
        let mut h = bn(&conv(x, "stem0.0.weight"), "stem0.1");
        if self.space.stem_pools >= 1 {
            h = ops::max_pool_2x2(&h);
        }
        h = bn(&conv(&h.relu(), "stem0.4.weight"), "stem0.5");
        if self.space.stem_pools >= 2 {
            h = ops::max_pool_2x2(&h);
        }
        h
    }

    /// A cell's two input states after preprocessing (`preprocess0`, `preprocess1`).
    pub fn preprocess(
        &self,
        params: &ParamSet,
        i: usize,
        spec: &CellSpec,
        s0: &Tensor,
        s1: &Tensor,
        stats: BnStats,
    ) -> (Tensor, Tensor) {
        let p0 = if spec.reduction_prev {
            let w = |c: &str| params.get(&format!("cells.{i}.preprocess0.{c}.weight"));
            ops::factorized_reduce(s0, w("conv_1"), w("conv_2"), stats)
        } else {
            ops::relu_conv_bn(
                s0,
                params.get(&format!("cells.{i}.preprocess0.op.1.weight")),
                stats,
            )
        };
        let p1 = ops::relu_conv_bn(
            s1,
            params.get(&format!("cells.{i}.preprocess1.op.1.weight")),
            stats,
        );
        (p0, p1)
    }

    /// One search cell: node i = Σ_j MixedOp(state_j); output = concat of the last `multiplier` nodes.
    ///
    /// The edges leaving each state are computed together ([`fused_edges`]) as soon as the state
    /// exists (the two inputs together), and added into the partial sums of the nodes they feed.
    fn cell(
        &self,
        pass: Pass,
        i: usize,
        spec: &CellSpec,
        s0: &Tensor,
        s1: &Tensor,
        mixing: &Tensor,
    ) -> Tensor {
        let (p0, p1) = self.preprocess(pass.params, i, spec, s0, s1, pass.stats);
        let steps = self.space.steps;
        let mut states = vec![p0, p1];
        let mut partial: Vec<Option<Tensor>> = (0..steps).map(|_| None).collect();
        let plans = self.edge_groups(spec.reduction);
        let edges: Vec<&[usize]> = plans.iter().map(|plan| plan.edges.as_slice()).collect();
        let weights = fused_edges::mixing_weights(mixing, &edges, pass.tasks);
        for (plan, weights) in plans.iter().zip(&weights) {
            if let &[j] = plan.states.as_slice() {
                states.push(partial[j - 2].take().expect("every node has inputs"));
            }
            let group = EdgeGroup {
                cell: i,
                edges: &plan.edges,
                stride: plan.stride,
                tasks: pass.tasks,
            };
            let inputs: Vec<&Tensor> = plan.states.iter().map(|&j| &states[j]).collect();
            let contributions =
                fused_edges::node_contributions(pass.params, &group, &inputs, weights, pass.stats);
            for (&n, contribution) in plan.targets.iter().zip(contributions.unbind(1)) {
                partial[n] = Some(match partial[n].take() {
                    Some(sum) => sum + contribution,
                    None => contribution,
                });
            }
        }
        states.push(partial[steps - 1].take().expect("the last node has inputs"));
        ops::cat_channels(&states[states.len() - self.space.multiplier..], pass.tasks)
    }

    /// A cell's edges grouped by the states they read, in the order the cell computes them: the
    /// two inputs together, then each node's state as soon as it exists.
    fn edge_groups(&self, reduction: bool) -> Vec<GroupPlan> {
        let steps = self.space.steps;
        let sources = std::iter::once(vec![0, 1]).chain((2..=steps).map(|j| vec![j]));
        sources
            .map(|states| {
                // State j feeds node n when j <= n + 1 (both inputs feed every node).
                let targets: Vec<usize> = (states[0].saturating_sub(1)..steps).collect();
                let edges = states
                    .iter()
                    .flat_map(|&j| {
                        targets
                            .iter()
                            .map(move |&n| self.space.first_edge_of_node(n) + j)
                    })
                    .collect();
                let stride = edge_stride(reduction, states[0]);
                GroupPlan {
                    states,
                    targets,
                    edges,
                    stride,
                }
            })
            .collect()
    }

    /// Every run of weights the forward pass reads stacked, cell by cell and group by group
    /// ([`EdgeGroup::weight_runs`]).
    pub fn weight_runs(&self) -> Vec<Vec<String>> {
        let cells = self.space.cells();
        let groups = cells.iter().enumerate().flat_map(|(i, spec)| {
            self.edge_groups(spec.reduction)
                .into_iter()
                .map(move |plan| (i, plan))
        });
        groups
            .flat_map(|(cell, plan)| {
                EdgeGroup {
                    cell,
                    edges: &plan.edges,
                    stride: plan.stride,
                    tasks: 1,
                }
                .weight_runs()
            })
            .collect()
    }

    /// Pooled features before the head. `x`: [N, in_ch, S, S] → [N, feature_dim].
    /// `mixing` is θ's mixing weights (see [`Supernet::mixing`]).
    pub fn features(
        &self,
        params: &ParamSet,
        mixing: &Alphas,
        x: &Tensor,
        stats: BnStats,
    ) -> Tensor {
        self.task_features(params, mixing, x, stats, 1)
    }

    /// Features of `tasks` tasks at once, each with its own weights and θ: every parameter and θ
    /// stacked task by task along dim 0, `x` [N, T·in_ch, S, S] (image i of every task in row i)
    /// → [N, T·feature_dim]. See [`crate::adapt::task_batch`].
    pub fn task_features(
        &self,
        params: &ParamSet,
        mixing: &Alphas,
        x: &Tensor,
        stats: BnStats,
        tasks: i64,
    ) -> Tensor {
        let pass = Pass {
            params,
            stats,
            tasks,
        };
        self.body(params, x, stats, |i, spec, s0, s1| {
            self.cell(pass, i, spec, s0, s1, mixing.for_cell(spec.reduction))
        })
    }

    /// Features through the plain cell ([`Supernet::plain_cell`]), one task: the reference the
    /// fused [`Supernet::features`] is tested against.
    pub fn plain_features(
        &self,
        params: &ParamSet,
        mixing: &Alphas,
        x: &Tensor,
        stats: BnStats,
    ) -> Tensor {
        let pass = Pass {
            params,
            stats,
            tasks: 1,
        };
        self.body(params, x, stats, |i, spec, s0, s1| {
            self.plain_cell(pass, i, spec, s0, s1, mixing.for_cell(spec.reduction))
        })
    }

    /// Stem, then every cell (`cell(i, spec, s_{k-2}, s_{k-1})`), then the global average pool.
    fn body(
        &self,
        params: &ParamSet,
        x: &Tensor,
        stats: BnStats,
        cell: impl Fn(usize, &CellSpec, &Tensor, &Tensor) -> Tensor,
    ) -> Tensor {
        let stem = self.stem(params, x, stats);
        let (mut s0, mut s1) = (stem.shallow_clone(), stem);
        for (i, spec) in self.space.cells().iter().enumerate() {
            let out = cell(i, spec, &s0, &s1);
            (s0, s1) = (s1, out);
        }
        global_average_pool(&s1)
    }

    /// One search cell as DARTS writes it: node i = Σ_j mixed_op(state_j), the output the concat
    /// of the last `multiplier` nodes. `mixing`: the cell type's [E, 8] mixing weights.
    fn plain_cell(
        &self,
        pass: Pass,
        i: usize,
        spec: &CellSpec,
        s0: &Tensor,
        s1: &Tensor,
        mixing: &Tensor,
    ) -> Tensor {
        let Pass { params, stats, .. } = pass;
        let (p0, p1) = self.preprocess(params, i, spec, s0, s1, stats);
        let mut states = vec![p0, p1];
        for node in 0..self.space.steps {
            let first = self.space.first_edge_of_node(node);
            let inputs = (0..node + 2).map(|j| {
                let edge = first + j;
                mixed_op(
                    &states[j],
                    &mixing.get(edge as i64),
                    params,
                    i,
                    edge,
                    edge_stride(spec.reduction, j),
                    stats,
                )
            });
            let node_state = inputs
                .reduce(|sum, input| sum + input)
                .expect("every node has inputs");
            states.push(node_state);
        }
        ops::cat_channels(&states[states.len() - self.space.multiplier..], 1)
    }
}

/// Global average pool: [N, C, H, W] → [N, C].
pub fn global_average_pool(x: &Tensor) -> Tensor {
    x.mean_dim(&[2i64, 3][..], false, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The fused cell computes DARTS's plain cell: the same features and the same gradients of
    /// every weight and θ, for a normal and a reduction cell with stride-2 edges.
    #[test]
    fn the_fused_cell_equals_the_plain_cell_in_values_and_gradients() {
        let space = SearchSpace {
            in_channels: 1,
            image_size: 12,
            init_channels: 4,
            layers: 3,
            steps: 3,
            multiplier: 3,
            stem_multiplier: 2,
            stem_pools: 1,
        };
        let net = Supernet::new(space);
        tch::manual_seed(5);
        let params = ParamSet::initialise(&net.body_specs(), Device::Cpu)
            .map(|_, t| t.detach().set_requires_grad(true));
        let alphas =
            Alphas::initialise(&space, Device::Cpu).map(|t| (t * 1000.0).set_requires_grad(true));
        let x = Tensor::randn([6, 1, 12, 12], (Kind::Float, Device::Cpu));
        let upstream = Tensor::randn([6, space.feature_dim() as i64], (Kind::Float, Device::Cpu));
        let mut inputs: Vec<&Tensor> = params.tensors().iter().collect();
        inputs.extend([&alphas.normal, &alphas.reduce]);
        let run = |features: Tensor| {
            (
                Tensor::run_backward(
                    &[(&features * &upstream).sum(Kind::Float)],
                    &inputs,
                    false,
                    false,
                ),
                features,
            )
        };
        let (fused_grads, fused) =
            run(net.features(&params, &alphas.softmaxed(), &x, BnStats::Batch));
        let (plain_grads, plain) =
            run(net.plain_features(&params, &alphas.softmaxed(), &x, BnStats::Batch));
        assert!(
            fused.allclose(&plain, 1e-5, 1e-5, false),
            "features differ by {}",
            (&fused - &plain).abs().max()
        );
        for (i, (f, p)) in fused_grads.iter().zip(&plain_grads).enumerate() {
            let scale = p.abs().max().double_value(&[]).max(1e-6);
            let error = (f - p).abs().max().double_value(&[]) / scale;
            let name = params.names().get(i).map_or("θ", String::as_str);
            assert!(
                error < 1e-4,
                "gradient of {name} differs (relative {error})"
            );
        }
    }
}
