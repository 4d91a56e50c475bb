//! `ParamSet`: named weight tensors, the unit that is meta-learned, copied per task, and saved.
//!
//! Forward functions take a `ParamSet` explicitly instead of owning modules, so a request adapts a
//! private copy while the meta-weights stay untouched (T-NAS Algorithm 2 works on copies of w̃, θ̃).

use crate::nn::fast::flat_layout::Layout;
use crate::runtime::index_cache::IndexCache;
use std::collections::HashMap;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// How a parameter is initialised (PyTorch's defaults for the module it belongs to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// Conv2d / Linear weight: U(-1/√fan_in, 1/√fan_in) (kaiming_uniform with a = √5).
    FanIn,
    /// Linear bias: U(-1/√fan_in, 1/√fan_in) with the layer's fan_in.
    FanInBias(i64),
    /// BatchNorm weight.
    Ones,
    /// BatchNorm bias.
    Zeros,
}

/// Name, shape and initialisation of one parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub init: Init,
}

impl ParamSpec {
    pub fn new(name: impl Into<String>, shape: &[i64], init: Init) -> Self {
        ParamSpec {
            name: name.into(),
            shape: shape.to_vec(),
            init,
        }
    }

    fn initial_value(&self, device: Device) -> Tensor {
        let opts = (Kind::Float, device);
        match self.init {
            Init::FanIn => {
                let fan_in: i64 = self.shape[1..].iter().product();
                let bound = 1.0 / (fan_in as f64).sqrt();
                Tensor::empty(self.shape.as_slice(), opts).uniform_(-bound, bound)
            }
            Init::FanInBias(fan_in) => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                Tensor::empty(self.shape.as_slice(), opts).uniform_(-bound, bound)
            }
            Init::Ones => Tensor::ones(self.shape.as_slice(), opts),
            Init::Zeros => Tensor::zeros(self.shape.as_slice(), opts),
        }
    }
}

/// An ordered set of named tensors. Order is the spec order, so iteration is deterministic.
#[derive(Debug)]
pub struct ParamSet {
    names: Vec<String>,
    tensors: Vec<Tensor>,
    index: HashMap<String, usize>,
    /// How the tensors lie in a flat tensor ([`ParamSet::flattened`]); in set order when `None`.
    layout: Option<Arc<Layout>>,
    /// The flat tensor whose views the tensors are, when they are ([`ParamSet::views_of`]), and
    /// its blocks: an SGD step neither concatenates again what it just split nor the forward pass
    /// a run of weights that lies in one piece.
    flat: Option<FlatViews>,
}

#[derive(Debug)]
struct FlatViews {
    /// [numel]: the set's first `covers` tensors, laid out by the layout.
    flat: Tensor,
    /// One per block of the layout that it holds, in its order.
    blocks: Vec<Tensor>,
    /// How many tensors it holds; any after them were inserted since (a proto head's classifier)
    /// and lie outside it.
    covers: usize,
}

impl ParamSet {
    /// Builds a set from (name, tensor) pairs; later duplicates replace earlier ones.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        let mut set = ParamSet {
            names: Vec::new(),
            tensors: Vec::new(),
            index: HashMap::new(),
            layout: None,
            flat: None,
        };
        for (name, tensor) in pairs {
            set.insert(name, tensor);
        }
        set
    }

    /// Fresh parameters with PyTorch's default initialisation (seed with `tch::manual_seed`).
    pub fn initialise(specs: &[ParamSpec], device: Device) -> Self {
        crate::runtime::grad::no_grad(|| {
            ParamSet::from_pairs(
                specs
                    .iter()
                    .map(|s| (s.name.clone(), s.initial_value(device))),
            )
        })
    }

    /// Adds or replaces a tensor. A new one comes last, also in the layout, after the flat tensor
    /// the others may lie in, which stays; replacing one that lies in it leaves the set not flat.
    pub fn insert(&mut self, name: String, tensor: Tensor) {
        match self.index.get(&name) {
            Some(&i) => {
                if self.flat.as_ref().is_some_and(|f| i < f.covers) {
                    self.flat = None;
                }
                self.tensors[i] = tensor;
            }
            None => {
                if let Some(layout) = &mut self.layout {
                    Arc::make_mut(layout).append_alone();
                }
                self.index.insert(name.clone(), self.names.len());
                self.names.push(name);
                self.tensors.push(tensor);
            }
        }
    }

    /// The tensor called `name`. Sets are checked against their spec when loaded, so a missing
    /// name is a bug in the network code, not a user error.
    pub fn get(&self, name: &str) -> &Tensor {
        match self.index.get(name) {
            Some(&i) => &self.tensors[i],
            None => panic!("parameter '{name}' is not in the set"),
        }
    }

    /// Where `name` is in set order.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.names.iter().zip(self.tensors.iter())
    }

    /// Number of scalar weights.
    pub fn numel(&self) -> i64 {
        self.tensors.iter().map(|t| t.numel() as i64).sum()
    }

    /// A new set with `f` applied to every tensor, names and order kept.
    pub fn map(&self, f: impl Fn(&str, &Tensor) -> Tensor) -> ParamSet {
        ParamSet {
            names: self.names.clone(),
            tensors: self.iter().map(|(n, t)| f(n, t)).collect(),
            index: self.index.clone(),
            layout: self.layout.clone(),
            flat: None,
        }
    }

    /// The tensors of each block, in flat order.
    fn blocks(&self) -> Vec<Vec<usize>> {
        match &self.layout {
            Some(layout) => layout.blocks().to_vec(),
            None => (0..self.len()).map(|i| vec![i]).collect(),
        }
    }

    /// Every tensor's index in set order, in flat order.
    pub(crate) fn flat_order(&self) -> Vec<usize> {
        self.blocks().concat()
    }

    /// Whether the tensors (but any inserted since) are views of one flat tensor.
    pub fn is_flat(&self) -> bool {
        self.flat.is_some()
    }

    /// What this set's flat layout is made of, in order: the flat tensor the tensors are views
    /// of and any tensor inserted after it, or else every tensor in flat order. Differentiating
    /// with respect to these gives every tensor's gradient from one backward pass, the flat
    /// tensor's in one piece; [`ParamSet::join`] lays them (or their gradients) out flat.
    pub fn flat_parts(&self) -> Vec<&Tensor> {
        match &self.flat {
            Some(f) => std::iter::once(&f.flat)
                .chain(&self.tensors[f.covers..])
                .collect(),
            None => self
                .flat_order()
                .into_iter()
                .map(|i| &self.tensors[i])
                .collect(),
        }
    }

    /// `parts` (as [`ParamSet::flat_parts`] lists them, or their gradients) flattened and
    /// concatenated: [numel]. A lone flat tensor is returned as it is.
    pub fn join(parts: &[impl std::borrow::Borrow<Tensor>]) -> Tensor {
        match parts {
            [only] => only.borrow().reshape([-1]),
            parts => Tensor::cat(
                &parts
                    .iter()
                    .map(|t| t.borrow().reshape([-1]))
                    .collect::<Vec<_>>(),
                0,
            ),
        }
    }

    /// This set's tensors in its flat layout: the tensor they are views of when that is all,
    /// else a concatenation.
    pub fn flattened(&self) -> Tensor {
        ParamSet::join(&self.flat_parts())
    }

    /// A set with these names, shapes and layout whose tensors are views of `flat` (laid out as
    /// [`ParamSet::flattened`] lays them).
    pub fn views_of(&self, flat: &Tensor) -> ParamSet {
        let shapes: Vec<Vec<i64>> = self.tensors.iter().map(Tensor::size).collect();
        self.views_shaped(flat, &shapes)
    }

    fn views_shaped(&self, flat: &Tensor, shapes: &[Vec<i64>]) -> ParamSet {
        let blocks = self.blocks();
        let sizes: Vec<i64> = blocks
            .iter()
            .map(|block| {
                block
                    .iter()
                    .map(|&i| shapes[i].iter().product::<i64>())
                    .sum()
            })
            .collect();
        let mut tensors: Vec<Option<Tensor>> = (0..self.len()).map(|_| None).collect();
        let mut block_views = Vec::with_capacity(blocks.len());
        for (part, block) in flat.split_with_sizes(&sizes, 0).iter().zip(&blocks) {
            if let [i] = block[..] {
                let view = part.view(shapes[i].as_slice());
                tensors[i] = Some(view.shallow_clone());
                block_views.push(view);
                continue;
            }
            let rows = block.iter().map(|&i| shapes[i][0]).sum::<i64>();
            let stacked = part.view([&[rows], &shapes[block[0]][1..]].concat().as_slice());
            let mut first_row = 0;
            for &i in block {
                tensors[i] = Some(stacked.narrow(0, first_row, shapes[i][0]));
                first_row += shapes[i][0];
            }
            block_views.push(stacked);
        }
        ParamSet {
            names: self.names.clone(),
            tensors: tensors
                .into_iter()
                .map(|t| t.expect("every tensor is in a block"))
                .collect(),
            index: self.index.clone(),
            layout: self.layout.clone(),
            flat: Some(FlatViews {
                flat: flat.shallow_clone(),
                blocks: block_views,
                covers: self.len(),
            }),
        }
    }

    /// The tensors called `names` concatenated along dim 0: a view when they are one block of
    /// the flat tensor the set lies in, else a concatenation.
    pub fn stacked(&self, names: &[String]) -> Tensor {
        let positions: Vec<usize> = names.iter().map(|n| self.index[n]).collect();
        if let (Some(layout), Some(flat)) = (&self.layout, &self.flat) {
            match layout.run_starting_at(positions[0]) {
                Some(b) if layout.blocks()[b] == positions => return flat.blocks[b].shallow_clone(),
                _ => debug_assert!(false, "{names:?} is not a run of the layout: the forward pass and Network::weight_runs disagree"),
            }
        }
        Tensor::cat(
            &positions
                .iter()
                .map(|&i| &self.tensors[i])
                .collect::<Vec<_>>(),
            0,
        )
    }

    /// A task's starting point: an independent copy whose tensors are views of one new leaf of
    /// the autograd graph, laid out with `runs` as blocks ([`Layout`]), with `tasks` copies of
    /// every tensor stacked along dim 0 for a task batch ([`crate::adapt::task_batch`]; 1 for a single
    /// task). One concatenation and, for a batch, one gather, whatever the number of tensors
    /// (copying them one by one takes two kernels each: 724 launches on a GPU for the shipped model).
    pub fn task_copy(&self, runs: &[Vec<String>], device: Device, tasks: i64) -> ParamSet {
        let laid_out = ParamSet {
            layout: Some(Arc::new(Layout::new(
                self.tensors(),
                |name| self.position(name),
                runs,
            ))),
            flat: None,
            ..self.clone()
        };
        let flat = crate::runtime::grad::no_grad(|| {
            // Always a concatenation (never `join`'s lone-tensor view): the copy must not alias `self`.
            let flat = Tensor::cat(
                &laid_out
                    .flat_parts()
                    .iter()
                    .map(|t| t.reshape([-1]))
                    .collect::<Vec<_>>(),
                0,
            )
            .to_device(device);
            if tasks == 1 {
                flat
            } else {
                flat.index_select(0, &laid_out.repeat_index(tasks, device))
            }
        });
        let shapes: Vec<Vec<i64>> = self
            .tensors
            .iter()
            .map(|t| [&[t.size()[0] * tasks], &t.size()[1..]].concat())
            .collect();
        laid_out.views_shaped(&flat.set_requires_grad(true), &shapes)
    }

    /// For each tensor in flat order, its positions in the flat tensor `tasks` times over.
    fn repeat_index(&self, tasks: i64, device: Device) -> Tensor {
        static CACHE: IndexCache<(Vec<i64>, i64)> = IndexCache::new();
        let sizes: Vec<i64> = self
            .flat_order()
            .into_iter()
            .map(|i| self.tensors[i].numel() as i64)
            .collect();
        CACHE.get((sizes, tasks), device, |(sizes, tasks)| {
            let starts = sizes
                .iter()
                .scan(0, |start, n| Some(std::mem::replace(start, *start + n)));
            starts
                .zip(sizes)
                .flat_map(|(start, &n)| (0..*tasks).flat_map(move |_| start..start + n))
                .collect()
        })
    }

    /// Checks names and shapes against `specs`; the error lists what is missing, extra or misshapen.
    pub fn check_against(&self, specs: &[ParamSpec]) -> Result<(), String> {
        let mut problems = Vec::new();
        for spec in specs {
            match self.index.get(&spec.name) {
                None => problems.push(format!("missing '{}'", spec.name)),
                Some(&i) if self.tensors[i].size() != spec.shape => problems.push(format!(
                    "'{}' has shape {:?}, expected {:?}",
                    spec.name,
                    self.tensors[i].size(),
                    spec.shape
                )),
                Some(_) => {}
            }
        }
        let known: std::collections::HashSet<&str> =
            specs.iter().map(|s| s.name.as_str()).collect();
        problems.extend(
            self.names
                .iter()
                .filter(|n| !known.contains(n.as_str()))
                .map(|n| format!("unexpected '{n}'")),
        );
        match problems.len() {
            0 => Ok(()),
            n => Err(format!(
                "{n} parameter problem(s): {}",
                problems.into_iter().take(8).collect::<Vec<_>>().join("; ")
            )),
        }
    }
}

impl ParamSet {
    /// The same tensors in `specs` order, after [`ParamSet::check_against`].
    pub fn ordered_like(&self, specs: &[ParamSpec]) -> Result<ParamSet, String> {
        self.check_against(specs)?;
        Ok(ParamSet::from_pairs(specs.iter().map(|s| {
            (s.name.clone(), self.get(&s.name).shallow_clone())
        })))
    }
}

impl Clone for ParamSet {
    /// Shares storage (like `Tensor::shallow_clone`); use [`ParamSet::task_copy`] for a copy.
    fn clone(&self) -> Self {
        let flat = self.flat.as_ref().map(|f| FlatViews {
            flat: f.flat.shallow_clone(),
            blocks: f.blocks.iter().map(Tensor::shallow_clone).collect(),
            covers: f.covers,
        });
        ParamSet {
            flat,
            ..self.map(|_, t| t.shallow_clone())
        }
    }
}

/// A 2-D tensor as rows of plain floats (for decoding and JSON), from any device.
pub fn matrix_rows(t: &Tensor) -> Vec<Vec<f32>> {
    let t = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let cols = t.size()[1] as usize;
    let flat: Vec<f32> = Vec::try_from(t.view([-1])).expect("float tensor converts to Vec<f32>");
    flat.chunks(cols).map(<[f32]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initialisation_follows_pytorch_defaults() {
        tch::manual_seed(0);
        let specs = vec![
            ParamSpec::new("conv.weight", &[16, 4, 3, 3], Init::FanIn),
            ParamSpec::new("bn.weight", &[16], Init::Ones),
            ParamSpec::new("bn.bias", &[16], Init::Zeros),
        ];
        let set = ParamSet::initialise(&specs, Device::Cpu);
        let bound = 1.0 / 36f64.sqrt();
        let w = set.get("conv.weight");
        assert!(w.abs().max().double_value(&[]) <= bound);
        assert!(w.std(true).double_value(&[]) > bound / 3.0);
        assert_eq!(
            set.get("bn.weight").sum(Kind::Float).double_value(&[]),
            16.0
        );
        assert_eq!(set.numel(), 16 * 36 + 32);
        assert!(set.check_against(&specs).is_ok());
    }

    #[test]
    fn mismatches_are_listed() {
        let specs = vec![
            ParamSpec::new("a", &[2], Init::Zeros),
            ParamSpec::new("b", &[3], Init::Zeros),
        ];
        let set = ParamSet::from_pairs([
            (
                "a".to_string(),
                Tensor::zeros([5], (Kind::Float, Device::Cpu)),
            ),
            (
                "c".to_string(),
                Tensor::zeros([1], (Kind::Float, Device::Cpu)),
            ),
        ]);
        let err = set.check_against(&specs).unwrap_err();
        assert!(
            err.contains("'a' has shape [5]")
                && err.contains("missing 'b'")
                && err.contains("unexpected 'c'"),
            "{err}"
        );
    }

    #[test]
    fn views_of_the_flat_layout_have_each_tensor_back_and_carry_gradients() {
        let set = ParamSet::from_pairs([
            (
                "w".to_string(),
                Tensor::randn([2, 3], (Kind::Float, Device::Cpu)).transpose(0, 1),
            ),
            (
                "b".to_string(),
                Tensor::randn([4], (Kind::Float, Device::Cpu)),
            ),
        ]);
        let flat = set.flattened().set_requires_grad(true);
        assert_eq!(flat.size(), [10]);
        let views = set.views_of(&flat);
        assert_eq!(views.names(), set.names());
        for (view, original) in views.tensors().iter().zip(set.tensors()) {
            assert!(
                view.equal(original),
                "same shape and values, a non-contiguous original included"
            );
        }
        let loss =
            (views.get("w").sum(Kind::Float) * 2.0) + views.get("b").square().sum(Kind::Float);
        let grads = Tensor::run_backward(
            &[loss],
            &views.tensors().iter().collect::<Vec<_>>(),
            false,
            false,
        );
        assert!(grads[0].equal(&Tensor::full([3, 2], 2.0, (Kind::Float, Device::Cpu))));
        assert!(grads[1].allclose(&(set.get("b") * 2.0), 1e-6, 1e-6, false));
    }

    #[test]
    fn views_flatten_to_their_own_flat_tensor_until_one_is_replaced() {
        let set = ParamSet::from_pairs([
            (
                "w".to_string(),
                Tensor::ones([2, 3], (Kind::Float, Device::Cpu)),
            ),
            (
                "b".to_string(),
                Tensor::zeros([4], (Kind::Float, Device::Cpu)),
            ),
        ]);
        let flat = set.flattened();
        let mut views = set.views_of(&flat);
        assert_eq!(
            views.flattened().data_ptr(),
            flat.data_ptr(),
            "no concatenation"
        );
        assert_eq!(views.clone().flattened().data_ptr(), flat.data_ptr());
        views.insert(
            "b".into(),
            Tensor::full([4], 7.0, (Kind::Float, Device::Cpu)),
        );
        assert_eq!(
            views.flattened().sum(Kind::Float).double_value(&[]),
            6.0 + 28.0,
            "the replaced tensor's values"
        );
    }

    #[test]
    fn task_copies_do_not_alias_the_original_and_start_a_new_graph() {
        let original = Tensor::ones([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let set = ParamSet::from_pairs([
            ("w".to_string(), original.shallow_clone()),
            (
                "b".to_string(),
                Tensor::zeros([2], (Kind::Float, Device::Cpu)),
            ),
        ]);
        let copy = set.task_copy(&[], Device::Cpu, 1);
        crate::runtime::grad::no_grad(|| {
            let _ = original.shallow_clone().fill_(5.0);
        });
        assert_eq!(copy.get("w").sum(Kind::Float).double_value(&[]), 3.0);
        assert_eq!(copy.get("b").size(), [2]);
        let grads = Tensor::run_backward(
            &[copy.get("w").sum(Kind::Float)],
            &[copy.get("w")],
            false,
            false,
        );
        assert!(
            grads[0].equal(&Tensor::ones([3], (Kind::Float, Device::Cpu))),
            "the copy is differentiable"
        );
        let to_original = Tensor::run_backward(
            &[copy.get("w").sum(Kind::Float)],
            &[&original],
            false,
            false,
        );
        assert!(
            !to_original[0].defined(),
            "and not connected to the original"
        );
    }

    /// Whether `t` lies inside `flat`'s storage.
    fn lies_in(t: &Tensor, flat: &Tensor) -> bool {
        let (start, at) = (flat.data_ptr() as usize, t.data_ptr() as usize);
        at >= start && at < start + flat.numel() * 4
    }

    #[test]
    fn runs_of_the_layout_are_views_and_the_flat_gradient_holds_every_tensors() {
        tch::manual_seed(5);
        let randn = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, Device::Cpu));
        let set = ParamSet::from_pairs([
            ("a".to_string(), randn(&[2, 3])),
            ("b".to_string(), randn(&[4])),
            ("c".to_string(), randn(&[1, 3])),
            ("d".to_string(), randn(&[3, 3])),
        ]);
        let run: Vec<String> = ["d", "a"].map(String::from).to_vec();
        for tasks in [1, 3] {
            let copy = set.task_copy(std::slice::from_ref(&run), Device::Cpu, tasks);
            let [flat] = copy.flat_parts()[..] else {
                panic!("a task copy lies in one flat tensor")
            };
            let stacked = copy.stacked(&run);
            assert!(
                lies_in(&stacked, flat)
                    && stacked.equal(&Tensor::cat(&[copy.get("d"), copy.get("a")], 0)),
                "{tasks} tasks"
            );
            for (name, original) in set.iter() {
                assert!(
                    copy.get(name).equal(
                        &original.repeat([&[tasks], &vec![1; original.dim() - 1][..]].concat())
                    ),
                    "{name}, {tasks} tasks"
                );
            }
            let loss = stacked.square().sum(Kind::Float)
                + copy.get("b").sum(Kind::Float) * 3.0
                + copy.get("c").sum(Kind::Float);
            let grad = copy.views_of(&Tensor::run_backward(&[loss], &[flat], false, false)[0]);
            assert!(
                grad.get("a")
                    .allclose(&(copy.get("a") * 2.0), 1e-6, 1e-6, false)
                    && grad
                        .get("d")
                        .allclose(&(copy.get("d") * 2.0), 1e-6, 1e-6, false)
            );
            assert!(
                grad.get("b")
                    .equal(&Tensor::full([4 * tasks], 3.0, (Kind::Float, Device::Cpu)))
                    && grad.get("c").equal(&copy.get("c").ones_like())
            );
        }

        // A tensor inserted later lies after the flat tensor, which stays whole.
        let mut copy = set.task_copy(std::slice::from_ref(&run), Device::Cpu, 1);
        copy.insert("e".into(), randn(&[2]).set_requires_grad(true));
        let parts = copy.flat_parts();
        assert!(
            parts.len() == 2 && lies_in(&copy.stacked(&run), parts[0]),
            "the runs are still views"
        );
        // Blocks in the set order of their first tensors: b, c, then the run [d, a] (d first).
        let expected = Tensor::cat(
            &[
                copy.get("b").shallow_clone(),
                copy.get("c").reshape([-1]),
                copy.get("d").reshape([-1]),
                copy.get("a").reshape([-1]),
                copy.get("e").shallow_clone(),
            ],
            0,
        );
        assert!(
            copy.flattened().equal(&expected),
            "laid out in flat order, the new tensor last"
        );
        let loss = copy.get("a").sum(Kind::Float) + copy.get("e").sum(Kind::Float) * 2.0;
        let grad = ParamSet::join(&Tensor::run_backward(&[loss], &parts, false, false));
        assert_eq!(grad.sum(Kind::Float).double_value(&[]), 6.0 + 4.0);
        copy.insert("a".into(), randn(&[2, 3]));
        assert_eq!(
            copy.flat_parts().len(),
            5,
            "replacing a tensor of the flat tensor leaves the set not flat"
        );
        assert!(copy
            .stacked(&run)
            .equal(&Tensor::cat(&[copy.get("d"), copy.get("a")], 0)));
    }

    #[test]
    fn a_batch_copy_stacks_every_tensor_once_per_task() {
        tch::manual_seed(3);
        let set = ParamSet::from_pairs([
            (
                "w".to_string(),
                Tensor::randn([2, 3, 1, 1], (Kind::Float, Device::Cpu)),
            ),
            (
                "b".to_string(),
                Tensor::randn([4], (Kind::Float, Device::Cpu)),
            ),
        ]);
        let batch = set.task_copy(&[], Device::Cpu, 3);
        for (name, original) in set.iter() {
            let mut repeats = vec![1i64; original.dim()];
            repeats[0] = 3;
            assert!(batch.get(name).equal(&original.repeat(&repeats)), "{name}");
        }
        assert!(batch.get("b").requires_grad());
    }
}
