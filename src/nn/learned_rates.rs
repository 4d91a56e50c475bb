//! Meta-learned inner-loop learning rates (MAML++'s per-layer, per-step rates, Antoniou et al.
//! 2019): a rate for every weight tensor at every inner step, and one for each cell type's θ.
//!
//! With one rate for every weight, a proto head built from one shot barely moves and the steps
//! change little; learned rates let the outer loop decide which layers adapt, how far, and at
//! which step. A task's steps past the learned ones reuse the last step's rates.

use crate::nn::params::ParamSet;
use crate::runtime::index_cache::IndexCache;
use tch::{Device, Kind, Tensor};

/// Names of the rate tables in a checkpoint.
pub const RATES_W: &str = "inner.lr_w";
pub const RATES_THETA: &str = "inner.lr_theta";

/// The rate tables: `w` [M, G], a rate per step and per tensor of a task's weights (in their set
/// order, a proto head's classifier weight and bias last); `theta` [M, 2], a rate per step for θ
/// of the normal and of the reduction cell.
#[derive(Debug)]
pub struct LearnedRates {
    pub w: Tensor,
    pub theta: Tensor,
}

impl Clone for LearnedRates {
    /// Shares storage (like `Tensor::shallow_clone`).
    fn clone(&self) -> Self {
        LearnedRates {
            w: self.w.shallow_clone(),
            theta: self.theta.shallow_clone(),
        }
    }
}

impl LearnedRates {
    /// Tables for `steps` steps and `tensors` weight tensors, every rate starting at the
    /// hand-set `lr_w` and `lr_theta`.
    pub fn initial(
        steps: usize,
        tensors: usize,
        lr_w: f64,
        lr_theta: f64,
        device: Device,
    ) -> LearnedRates {
        let filled = |columns: usize, lr: f64| {
            Tensor::full([steps as i64, columns as i64], lr, (Kind::Float, device))
        };
        LearnedRates {
            w: filled(tensors, lr_w),
            theta: filled(2, lr_theta),
        }
    }

    /// The same rates, out of any graph (to adapt with them, not learn them).
    pub fn detach(&self) -> LearnedRates {
        LearnedRates {
            w: self.w.detach(),
            theta: self.theta.detach(),
        }
    }

    /// Whether the rates are being meta-learned (their updates must stay in the graph).
    pub fn requires_grad(&self) -> bool {
        self.w.requires_grad()
    }

    /// The number of steps the tables were learned for.
    pub fn steps(&self) -> usize {
        self.w.size()[0] as usize
    }

    /// The table row of inner step `step`: the last one past the learned steps.
    fn row(&self, step: usize) -> i64 {
        step.min(self.steps() - 1) as i64
    }

    /// Step `step`'s rate for every element of `params.flattened()`, each its tensor's rate.
    pub fn for_weights(&self, step: usize, params: &ParamSet) -> Tensor {
        self.w
            .get(self.row(step))
            .index_select(0, &element_owners(params, self.w.device()))
    }

    /// Step `step`'s rates for θ (normal, reduce), as scalars.
    pub fn for_theta(&self, step: usize) -> (Tensor, Tensor) {
        let row = self.theta.get(self.row(step));
        (row.get(0), row.get(1))
    }

    /// Checks the tables' shapes against a task's `tensors` weight tensors; the message says what
    /// differs.
    pub fn check(&self, tensors: usize) -> Result<(), String> {
        let (w, theta) = (self.w.size(), self.theta.size());
        match (w.as_slice(), theta.as_slice()) {
            ([m, g], [m2, 2]) if m == m2 && *m > 0 && *g == tensors as i64 => Ok(()),
            _ => Err(format!("{RATES_W} has shape {w:?} and {RATES_THETA} {theta:?}; expected [steps, {tensors}] and [steps, 2]")),
        }
    }
}

/// For every element of `params.flattened()`, the set index of the tensor it belongs to.
fn element_owners(params: &ParamSet, device: Device) -> Tensor {
    static CACHE: IndexCache<Vec<(usize, i64)>> = IndexCache::new();
    let owners: Vec<(usize, i64)> = params
        .flat_order()
        .into_iter()
        .map(|i| (i, params.tensors()[i].numel() as i64))
        .collect();
    CACHE.get(owners, device, |owners| {
        owners
            .iter()
            .flat_map(|&(i, n)| std::iter::repeat_n(i as i64, n as usize))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element of the flat weights gets its own tensor's rate, whatever the layout, and steps
    /// past the learned ones take the last row.
    #[test]
    fn each_element_gets_its_tensors_rate_of_its_step() {
        let params = ParamSet::from_pairs([
            (
                "a".to_string(),
                Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)),
            ),
            (
                "b".to_string(),
                Tensor::zeros([4], (Kind::Float, Device::Cpu)),
            ),
        ]);
        let laid_out = params.task_copy(&[], Device::Cpu, 1);
        let rates = LearnedRates {
            w: Tensor::from_slice(&[1f32, 2., 3., 4.]).view([2, 2]),
            theta: Tensor::from_slice(&[5f32, 6., 7., 8.]).view([2, 2]),
        };
        let expected = |a: f32, b: f32| Tensor::from_slice(&[[a; 6].as_slice(), &[b; 4]].concat());
        assert!(rates.for_weights(0, &laid_out).equal(&expected(1., 2.)));
        assert!(rates.for_weights(1, &laid_out).equal(&expected(3., 4.)));
        assert!(
            rates.for_weights(7, &laid_out).equal(&expected(3., 4.)),
            "past the learned steps: the last row"
        );
        let (normal, reduce) = rates.for_theta(1);
        assert_eq!(
            (normal.double_value(&[]), reduce.double_value(&[])),
            (7.0, 8.0)
        );
        assert!(rates.check(2).is_ok() && rates.check(3).is_err());
    }
}
