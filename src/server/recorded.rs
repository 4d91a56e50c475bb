//! The worker's recorded adaptations: on a GPU, the first batch of each task shape (model, way,
//! shots, queries, steps, learning rates, BN mode, tasks in the batch) is recorded as a CUDA graph
//! ([`crate::cuda_graph`]), and every later batch of that shape replays it, which launches the
//! whole adaptation at once instead of kernel by kernel from the host.
//!
//! Each graph keeps its own GPU memory, so at most `capacity` are kept; the least recently used
//! goes first. A recording or replay that fails turns recording off for good (logged, with the
//! reason): a failed capture can leave libtorch's allocator holding the capture's memory pool, so
//! trying again shape after shape is not safe. The worker then adapts eagerly.

use crate::cuda_graph::Replay;
use std::collections::HashMap;
use std::hash::Hash;
use tch::Tensor;

/// Graphs by task shape `K`, each with when it was last used.
pub struct RecordedAdaptations<K> {
    capacity: usize,
    replays: HashMap<K, (Replay, u64)>,
    clock: u64,
}

impl<K: Hash + Eq + Clone + std::fmt::Debug> RecordedAdaptations<K> {
    /// Keeps up to `capacity` shapes; 0 records none.
    pub fn new(capacity: usize) -> Self {
        RecordedAdaptations { capacity, replays: HashMap::new(), clock: 0 }
    }

    pub fn is_on(&self) -> bool {
        self.capacity > 0
    }

    /// The outputs of `work(inputs)`, from the graph of `key`, recorded now if this shape is new.
    /// `None` means: adapt eagerly (recording is off, or has just failed).
    pub fn run(&mut self, key: &K, inputs: &[Tensor], work: impl Fn(&[Tensor]) -> Vec<Tensor>) -> Option<Vec<Tensor>> {
        if !self.is_on() {
            return None;
        }
        self.clock += 1;
        if !self.replays.contains_key(key) {
            match Replay::record(inputs, work) {
                Ok(replay) => {
                    self.make_room();
                    self.replays.insert(key.clone(), (replay, self.clock));
                }
                Err(error) => return self.turn_off(key, "recording", &error),
            }
        }
        let (replay, last_used) = self.replays.get_mut(key).expect("the shape is recorded");
        *last_used = self.clock;
        match replay.run(inputs) {
            Ok(outputs) => Some(outputs),
            Err(error) => self.turn_off(key, "replaying", &error),
        }
    }

    fn turn_off(&mut self, key: &K, what: &str, error: &str) -> Option<Vec<Tensor>> {
        tracing::warn!(?key, %error, "{what} a CUDA graph failed; this worker adapts eagerly from now on");
        self.capacity = 0;
        self.replays.clear();
        None
    }

    /// Drops the least recently used graph when `capacity` are kept.
    fn make_room(&mut self) {
        if self.replays.len() < self.capacity {
            return;
        }
        let oldest = self.replays.iter().min_by_key(|(_, (_, last_used))| *last_used).map(|(key, _)| key.clone());
        if let Some(key) = oldest {
            self.replays.remove(&key);
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
    fn a_failed_recording_turns_recording_off_and_the_work_runs_eagerly() {
        let mut recorded = RecordedAdaptations::new(2);
        assert!(recorded.is_on());
        assert!(recorded.run(&"a", &cpu_input(), |inputs| vec![&inputs[0] * 2.0]).is_none(), "CPU work cannot be recorded");
        assert!(!recorded.is_on(), "no second attempt");
        assert!(recorded.replays.is_empty());
    }

    #[test]
    fn capacity_zero_records_nothing() {
        let mut recorded = RecordedAdaptations::new(0);
        assert!(!recorded.is_on());
        assert!(recorded.run(&"a", &cpu_input(), |inputs| vec![inputs[0].copy()]).is_none());
        assert!(recorded.replays.is_empty());
    }
}
