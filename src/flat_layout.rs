//! Where a task's weights lie in the one flat tensor they are views of ([`ParamSet::flattened`]).

use crate::params::ParamSet;

/// Where a set's tensors lie in its flat tensor: in blocks, each either one tensor or a run of
/// tensors that the forward pass reads concatenated along dim 0 (one candidate's weights on every
/// edge of a group, [`crate::fused_edges`]), so that the run is one view of the flat tensor instead
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
    /// The layout of `set` with each of `runs` (names in the set, each run's tensors of equal shape
    /// but for dim 0) as a block and every other tensor alone.
    pub fn new(set: &ParamSet, runs: &[Vec<String>]) -> Layout {
        let position = |name: &String| set.position(name).unwrap_or_else(|| panic!("run member '{name}' is not in the set"));
        let runs: Vec<Vec<usize>> = runs.iter().map(|run| run.iter().map(position).collect()).collect();
        let mut run_of = vec![None; set.len()];
        for (r, run) in runs.iter().enumerate() {
            let trailing = &set.tensors()[run[0]].size()[1..];
            for &i in run {
                assert!(run_of[i].is_none(), "'{}' is in two runs", set.names()[i]);
                assert_eq!(&set.tensors()[i].size()[1..], trailing, "'{}' does not stack with its run", set.names()[i]);
                run_of[i] = Some(r);
            }
        }
        let (mut blocks, mut run_starting_at) = (Vec::new(), vec![None; set.len()]);
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
        Layout { blocks, run_starting_at }
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
