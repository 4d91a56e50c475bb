//! Where a task's weights lie in the one flat tensor they are views of
//! ([`crate::nn::params::ParamSet::flattened`]).

use tch::Tensor;

/// Where a set's tensors lie in its flat tensor: in blocks, each either one tensor or a run of
/// tensors that the forward pass reads concatenated along dim 0 (one candidate's weights on every
/// edge of a group, [`crate::nn::fast::fused_edges`]), so that the run is one view of the flat tensor instead
/// of a concatenation in every forward pass (and a split of its gradient in every backward pass).
/// Blocks follow each other in the set order of their first tensors.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Each block's tensors, as indices in set order.
    blocks: Vec<Vec<usize>>,
    /// For each tensor that starts a block of several, that block.
    run_starting_at: Vec<Option<usize>>,
}

impl Layout {
    /// The layout of a set of `tensors` (`position` finds a name's index among them) with each of
    /// `runs` (names in the set, each run's tensors of equal shape but for dim 0) as a block and
    /// every other tensor alone.
    pub fn new(
        tensors: &[Tensor],
        position: impl Fn(&str) -> Option<usize>,
        runs: &[Vec<String>],
    ) -> Layout {
        let index = |name: &String| {
            position(name).unwrap_or_else(|| panic!("run member '{name}' is not in the set"))
        };
        let runs: Vec<Vec<usize>> = runs
            .iter()
            .map(|run| run.iter().map(index).collect())
            .collect();
        let mut run_of = vec![None; tensors.len()];
        for (r, run) in runs.iter().enumerate() {
            let trailing = &tensors[run[0]].size()[1..];
            for &i in run {
                assert!(run_of[i].is_none(), "tensor {i} is in two runs");
                assert_eq!(
                    &tensors[i].size()[1..],
                    trailing,
                    "tensor {i} does not stack with its run"
                );
                run_of[i] = Some(r);
            }
        }
        let (mut blocks, mut run_starting_at) = (Vec::new(), vec![None; tensors.len()]);
        for (i, run) in run_of.iter().enumerate() {
            match run {
                None => blocks.push(vec![i]),
                Some(r) if runs[*r][0] == i => {
                    run_starting_at[i] = Some(blocks.len());
                    blocks.push(runs[*r].clone());
                }
                Some(_) => {}
            }
        }
        Layout {
            blocks,
            run_starting_at,
        }
    }

    /// Each block's tensors, as indices in set order, in flat order.
    pub fn blocks(&self) -> &[Vec<usize>] {
        &self.blocks
    }

    /// The block of several tensors that tensor `i` starts, if any.
    pub fn run_starting_at(&self, i: usize) -> Option<usize> {
        self.run_starting_at[i]
    }

    /// Adds a tensor after the last, as a block of its own.
    pub fn append_alone(&mut self) {
        self.blocks.push(vec![self.run_starting_at.len()]);
        self.run_starting_at.push(None);
    }
}
