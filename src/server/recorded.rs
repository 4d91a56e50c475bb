//! The worker's recorded adaptations: on a GPU, each task shape (model, way, shots, queries, steps,
//! learning rates, BN mode, test-time views, tasks in the batch) is recorded as a CUDA graph
//! ([`crate::runtime::cuda_graph`]) the second time it is seen, and every later batch of that shape replays
//! it, which launches the whole adaptation at once instead of kernel by kernel from the host. A
//! shape seen once adapts eagerly: steps and learning rates are request settings, and recording
//! (about two eager adaptations) only pays off for a shape that comes back.
//!
//! Each graph keeps its own GPU memory, so at most `capacity` are kept; the least recently used
//! goes first. A recording or replay that fails turns recording off for good (logged, with the
//! reason): a failed capture can leave libtorch's allocator in a state where trying again shape
//! after shape is not safe. The worker then adapts eagerly.

use crate::runtime::cuda_graph::Replay;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use tch::Tensor;

/// Shapes seen once, remembered so the second sighting records (most recent last).
const REMEMBERED_SHAPES: usize = 256;

/// Graphs by task shape `K`, each with when it was last used.
pub struct RecordedAdaptations<K> {
    capacity: usize,
    replays: HashMap<K, (Replay, u64)>,
    seen_once: VecDeque<K>,
    clock: u64,
}

impl<K: Hash + Eq + Clone + std::fmt::Debug> RecordedAdaptations<K> {
    /// Keeps up to `capacity` shapes; 0 records none.
    pub fn new(capacity: usize) -> Self {
        RecordedAdaptations {
            capacity,
            replays: HashMap::new(),
            seen_once: VecDeque::new(),
            clock: 0,
        }
    }

    pub fn is_on(&self) -> bool {
        self.capacity > 0
    }

    /// The outputs of `work(inputs)` from the graph of `key`, recorded now if this shape was seen
    /// before. `None` means: adapt eagerly (recording is off, this is the shape's first sighting,
    /// or recording has just failed).
    pub fn run(
        &mut self,
        key: &K,
        inputs: &[Tensor],
        work: impl Fn(&[Tensor]) -> Vec<Tensor>,
    ) -> Option<Vec<Tensor>> {
        if !self.is_on() {
            return None;
        }
        self.clock += 1;
        if !self.replays.contains_key(key) {
            if !self.seen_before(key) {
                return None;
            }
            self.make_room();
            match Replay::record(inputs, work) {
                Ok(replay) => {
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

    /// Whether `key` was seen once before (and is now taken off that list); remembers it if not.
    fn seen_before(&mut self, key: &K) -> bool {
        if let Some(position) = self.seen_once.iter().position(|k| k == key) {
            self.seen_once.remove(position);
            return true;
        }
        if self.seen_once.len() == REMEMBERED_SHAPES {
            self.seen_once.pop_front();
        }
        self.seen_once.push_back(key.clone());
        false
    }

    fn turn_off(&mut self, key: &K, what: &str, error: &str) -> Option<Vec<Tensor>> {
        tracing::warn!(?key, %error, "{what} a CUDA graph failed; this worker adapts eagerly from now on");
        self.capacity = 0;
        self.replays.clear();
        None
    }

    /// Drops the least recently used graph when `capacity` are kept, before recording another.
    fn make_room(&mut self) {
        if self.replays.len() < self.capacity {
            return;
        }
        let oldest = self
            .replays
            .iter()
            .min_by_key(|(_, (_, last_used))| *last_used)
            .map(|(key, _)| key.clone());
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
    fn a_shape_records_on_its_second_sighting_and_a_failed_recording_turns_recording_off() {
        let mut recorded = RecordedAdaptations::new(2);
        let work = |inputs: &[Tensor]| vec![&inputs[0] * 2.0];
        assert!(
            recorded.run(&"a", &cpu_input(), work).is_none(),
            "first sighting: eager"
        );
        assert!(recorded.run(&"b", &cpu_input(), work).is_none());
        assert!(recorded.is_on(), "nothing was recorded yet");
        assert!(
            recorded.run(&"a", &cpu_input(), work).is_none(),
            "second sighting records, which fails on the CPU"
        );
        assert!(!recorded.is_on(), "no second attempt");
        assert!(recorded.replays.is_empty());
    }

    #[test]
    fn only_the_most_recent_first_sightings_are_remembered() {
        let mut recorded = RecordedAdaptations::new(2);
        for shape in 0..=REMEMBERED_SHAPES {
            assert!(!recorded.seen_before(&shape));
        }
        assert!(
            !recorded.seen_before(&0),
            "the oldest sighting was forgotten"
        );
        assert!(recorded.seen_before(&REMEMBERED_SHAPES));
        assert!(
            !recorded.seen_before(&REMEMBERED_SHAPES),
            "taken off the list once recorded"
        );
    }

    #[test]
    fn capacity_zero_records_nothing() {
        let mut recorded = RecordedAdaptations::new(0);
        assert!(!recorded.is_on());
        assert!(recorded
            .run(&"a", &cpu_input(), |inputs| vec![inputs[0].copy()])
            .is_none());
        assert!(recorded.replays.is_empty());
    }
}
