//! The worker's recorded adaptations: on a GPU, the first batch of each task shape (model, way,
//! shots, queries, steps, learning rates, BN mode, tasks in the batch) is recorded as a CUDA graph
//! ([`crate::cuda_graph`]), and every later batch of that shape replays it, which launches the
//! whole adaptation at once instead of kernel by kernel from the host.
//!
//! Each graph keeps its own GPU memory, so at most `capacity` are kept; the least recently used
//! goes first. A shape whose recording fails is remembered and adapts eagerly from then on.

use crate::cuda_graph::Replay;
use std::collections::HashMap;
use std::hash::Hash;
use tch::Tensor;

/// A task shape's graph, or `None` when the shape could not be recorded or replayed.
struct Entry {
    replay: Option<Replay>,
    last_used: u64,
}

/// Graphs by task shape `K`.
pub struct RecordedAdaptations<K> {
    capacity: usize,
    entries: HashMap<K, Entry>,
    clock: u64,
}

impl<K: Hash + Eq + Clone + std::fmt::Debug> RecordedAdaptations<K> {
    /// Keeps up to `capacity` shapes; 0 records none.
    pub fn new(capacity: usize) -> Self {
        RecordedAdaptations { capacity, entries: HashMap::new(), clock: 0 }
    }

    pub fn is_on(&self) -> bool {
        self.capacity > 0
    }

    /// The outputs of `work(inputs)`, from the graph of `key`, recorded now if this shape is new.
    /// `None` means: adapt eagerly (graphs off, or this shape could not be recorded or replayed;
    /// the reason is logged once).
    pub fn run(&mut self, key: &K, inputs: &[Tensor], work: impl Fn(&[Tensor]) -> Vec<Tensor>) -> Option<Vec<Tensor>> {
        if !self.is_on() {
            return None;
        }
        self.clock += 1;
        if !self.entries.contains_key(key) {
            let replay = Replay::record(inputs, work)
                .inspect_err(|error| tracing::warn!(?key, %error, "this task shape cannot be recorded as a CUDA graph; it adapts eagerly"))
                .ok();
            self.make_room();
            self.entries.insert(key.clone(), Entry { replay, last_used: self.clock });
        }
        let entry = self.entries.get_mut(key).expect("the shape has an entry");
        entry.last_used = self.clock;
        match entry.replay.as_ref()?.run(inputs) {
            Ok(outputs) => Some(outputs),
            Err(error) => {
                tracing::warn!(?key, %error, "replaying a recorded adaptation failed; this task shape adapts eagerly");
                entry.replay = None;
                None
            }
        }
    }

    /// Forgets the least recently used shape when `capacity` are kept.
    fn make_room(&mut self) {
        if self.entries.len() < self.capacity {
            return;
        }
        let oldest = self.entries.iter().min_by_key(|(_, entry)| entry.last_used).map(|(key, _)| key.clone());
        if let Some(key) = oldest {
            self.entries.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn cpu_input() -> Vec<Tensor> {
        vec![Tensor::ones([2], (Kind::Float, Device::Cpu))]
    }

    #[test]
    fn shapes_that_cannot_be_recorded_adapt_eagerly_and_the_least_recently_used_goes_first() {
        let mut recorded = RecordedAdaptations::new(2);
        for shape in ["a", "b", "a", "c"] {
            assert!(recorded.run(&shape, &cpu_input(), |inputs| vec![&inputs[0] * 2.0]).is_none(), "CPU work is not recorded");
        }
        let mut kept: Vec<&str> = recorded.entries.keys().copied().collect();
        kept.sort();
        assert_eq!(kept, ["a", "c"], "b was used least recently");
    }

    #[test]
    fn capacity_zero_records_nothing() {
        let mut recorded = RecordedAdaptations::new(0);
        assert!(!recorded.is_on());
        assert!(recorded.run(&"a", &cpu_input(), |inputs| vec![inputs[0].copy()]).is_none());
        assert!(recorded.entries.is_empty());
    }
}
