//! N-way K-shot episodes (tasks) drawn from a set of classes: deterministic from a seed and
//! resumable, so an interrupted meta-training run continues with exactly the tasks it would have
//! seen.

use super::{ClassImages, DataError};
use rand::seq::index;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::ops::Range;
use tch::{Device, Tensor};

/// One few-shot task. Labels are `0..way` in the order the classes were drawn; support and query
/// are class-major (all images of label 0, then label 1, …).
#[derive(Debug)]
pub struct Episode {
    /// `[way·shot, C, S, S]` f32.
    pub support: Tensor,
    /// `[way·shot]` i64.
    pub support_labels: Tensor,
    /// `[way·query, C, S, S]` f32.
    pub query: Tensor,
    /// `[way·query]` i64.
    pub query_labels: Tensor,
    /// Which of the sampler's classes label `i` is, so callers can trace an episode to its data.
    pub class_indices: Vec<usize>,
}

impl Episode {
    /// The episode's tensors on `device`; images are kept on the CPU and moved per episode.
    pub fn to_device(self, device: Device) -> Episode {
        Episode {
            support: self.support.to_device(device),
            support_labels: self.support_labels.to_device(device),
            query: self.query.to_device(device),
            query_labels: self.query_labels.to_device(device),
            class_indices: self.class_indices,
        }
    }
}

/// Everything needed to continue a sampler's sequence: saved with a resumable checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub seed: u64,
    /// Episodes drawn so far.
    pub episodes: u64,
}

/// Draws episodes from `classes`: `way` classes uniformly without replacement (from one group
/// when [`EpisodeSampler::within_groups`] says so), then `shot + query` distinct images of each.
pub struct EpisodeSampler<'a> {
    classes: &'a [ClassImages],
    /// Within groups: each group's classes (indices into `classes`), for the groups with at
    /// least `way` classes.
    groups: Option<Vec<Range<usize>>>,
    way: usize,
    shot: usize,
    query: usize,
    seed: u64,
    episodes: u64,
    /// ChaCha8 is portable and specified, so a seed gives the same tasks on every platform and
    /// `rand` version that keeps the algorithm.
    rng: ChaCha8Rng,
}

/// The random part of an episode: for each drawn class, its index and `shot + query` image rows.
type Draw = Vec<(usize, Vec<usize>)>;

impl<'a> EpisodeSampler<'a> {
    /// A sampler at the start of `seed`'s sequence; errors (rather than panicking later) when the
    /// classes cannot supply the requested episodes.
    pub fn new(
        classes: &'a [ClassImages],
        way: usize,
        shot: usize,
        query: usize,
        seed: u64,
    ) -> Result<Self, DataError> {
        check_shape(classes, way, shot, query)?;
        let rng = ChaCha8Rng::seed_from_u64(seed);
        Ok(EpisodeSampler {
            classes,
            groups: None,
            way,
            shot,
            query,
            seed,
            episodes: 0,
            rng,
        })
    }

    /// This sampler with every episode's classes from one group (an Omniglot alphabet: the hard
    /// protocol, where classes look alike): a group drawn uniformly among those with at least
    /// `way` classes ([`groups_of`]), then `way` of its classes.
    pub fn within_groups(mut self) -> Result<Self, DataError> {
        self.groups = Some(groups_of(self.classes, self.way)?);
        Ok(self)
    }

    /// This sampler continued from `state`, exactly where the sampler that saved it stopped; its
    /// classes must be the same in the same order (loaders sort them, so reloading the data
    /// suffices), and its shape the same.
    pub fn continued(mut self, state: &SamplerState) -> Self {
        self.seed = state.seed;
        self.rng = ChaCha8Rng::seed_from_u64(state.seed);
        self.episodes = 0;
        for _ in 0..state.episodes {
            self.draw();
        }
        self
    }

    pub fn way(&self) -> usize {
        self.way
    }

    /// The names of the groups each task is drawn within; empty when tasks draw from all classes.
    pub fn group_names(&self) -> Vec<String> {
        self.groups
            .iter()
            .flatten()
            .map(|range| self.classes[range.start].group.clone())
            .collect()
    }

    pub fn state(&self) -> SamplerState {
        SamplerState {
            seed: self.seed,
            episodes: self.episodes,
        }
    }

    /// The next episode.
    pub fn sample(&mut self) -> Episode {
        let draw = self.draw();
        let (mut support, mut query) = (Vec::with_capacity(self.way), Vec::with_capacity(self.way));
        for (class, rows) in &draw {
            let rows: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
            let images = self.classes[*class]
                .images
                .index_select(0, &Tensor::from_slice(&rows));
            support.push(images.narrow(0, 0, self.shot as i64));
            query.push(images.narrow(0, self.shot as i64, self.query as i64));
        }
        Episode {
            support: Tensor::cat(&support, 0),
            support_labels: class_major_labels(self.way, self.shot),
            query: Tensor::cat(&query, 0),
            query_labels: class_major_labels(self.way, self.query),
            class_indices: draw.into_iter().map(|(class, _)| class).collect(),
        }
    }

    /// Advances the random sequence by one episode; kept apart from building tensors so that
    /// [`EpisodeSampler::continued`] can fast-forward cheaply.
    fn draw(&mut self) -> Draw {
        self.episodes += 1;
        let classes = match &self.groups {
            None => index::sample(&mut self.rng, self.classes.len(), self.way).into_vec(),
            Some(groups) => {
                let group = &groups[self.rng.gen_range(0..groups.len())];
                let members = index::sample(&mut self.rng, group.len(), self.way);
                members.into_iter().map(|m| group.start + m).collect()
            }
        };
        classes
            .into_iter()
            .map(|class| {
                let rows = index::sample(
                    &mut self.rng,
                    self.classes[class].num_images(),
                    self.shot + self.query,
                );
                (class, rows.into_vec())
            })
            .collect()
    }
}

/// The groups of `classes` (their places in it) that have at least `way` classes each, for
/// tasks within one group. A group's classes are adjacent: loaders sort classes by name, and a
/// name starts with its group.
pub fn groups_of(classes: &[ClassImages], way: usize) -> Result<Vec<Range<usize>>, DataError> {
    let mut groups = Vec::new();
    let mut start = 0;
    for group in classes.chunk_by(|a, b| a.group == b.group) {
        groups.push(start..start + group.len());
        start += group.len();
    }
    let largest = groups.iter().map(ExactSizeIterator::len).max().unwrap_or(0);
    groups.retain(|g| g.len() >= way);
    match (groups.is_empty(), largest) {
        (false, _) => Ok(groups),
        (true, 0 | 1) => Err(DataError::NoGroups),
        (true, _) => Err(DataError::NoGroupLargeEnough { way, largest }),
    }
}

/// `[0 ×n, 1 ×n, …, way−1 ×n]` as i64.
fn class_major_labels(way: usize, n: usize) -> Tensor {
    let labels: Vec<i64> = (0..way as i64)
        .flat_map(|label| std::iter::repeat_n(label, n))
        .collect();
    Tensor::from_slice(&labels)
}

fn check_shape(
    classes: &[ClassImages],
    way: usize,
    shot: usize,
    query: usize,
) -> Result<(), DataError> {
    if way == 0 || shot == 0 {
        return Err(DataError::EmptyEpisode { way, shot });
    }
    if way > classes.len() {
        return Err(DataError::NotEnoughClasses {
            way,
            available: classes.len(),
        });
    }
    let needed = shot + query;
    match classes.iter().find(|c| c.num_images() < needed) {
        Some(class) => Err(DataError::NotEnoughImages {
            class: class.name.clone(),
            needed,
            available: class.num_images(),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fixtures::omniglot_copy;
    use crate::data::split::default_omniglot_split;
    use tch::Kind;

    fn split_test_classes() -> Vec<ClassImages> {
        default_omniglot_split().apply(omniglot_copy()).unwrap().2
    }

    #[test]
    fn episodes_have_n_k_q_shapes_and_class_major_labels() {
        let classes = split_test_classes();
        let mut sampler = EpisodeSampler::new(&classes, 5, 2, 3, 7).unwrap();
        let e = sampler.sample();
        assert_eq!(e.support.size(), [10, 1, 28, 28]);
        assert_eq!(e.query.size(), [15, 1, 28, 28]);
        assert_eq!(e.support_labels.kind(), Kind::Int64);
        assert_eq!(
            Vec::<i64>::try_from(&e.support_labels).unwrap(),
            [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
        );
        assert_eq!(
            Vec::<i64>::try_from(&e.query_labels).unwrap(),
            [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
        );
        let mut distinct = e.class_indices.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 5, "classes drawn without replacement");
    }

    #[test]
    fn images_are_distinct_and_from_the_labelled_class() {
        let classes = split_test_classes();
        let mut sampler = EpisodeSampler::new(&classes, 3, 5, 15, 11).unwrap();
        for _ in 0..5 {
            let e = sampler.sample();
            for (label, &class) in e.class_indices.iter().enumerate() {
                let images = Tensor::cat(
                    &[
                        e.support.narrow(0, 5 * label as i64, 5),
                        e.query.narrow(0, 15 * label as i64, 15),
                    ],
                    0,
                );
                // All 20 images of the class, each exactly once: same sum of pixels per image, sorted.
                let sums = |t: &Tensor| {
                    Vec::<f32>::try_from(
                        t.sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float)
                            .sort(0, false)
                            .0,
                    )
                    .unwrap()
                };
                assert_eq!(sums(&images), sums(&classes[class].images));
            }
        }
    }

    #[test]
    fn test_split_episodes_only_use_test_alphabets() {
        let classes = split_test_classes();
        let mut sampler = EpisodeSampler::new(&classes, 5, 1, 5, 3).unwrap();
        for _ in 0..50 {
            let e = sampler.sample();
            assert!(e
                .class_indices
                .iter()
                .all(|&c| ["Latin", "Tagalog"].contains(&classes[c].group.as_str())));
        }
    }

    #[test]
    fn same_seed_same_episodes_and_restore_continues_identically() {
        let classes = split_test_classes();
        let mut a = EpisodeSampler::new(&classes, 5, 1, 2, 42).unwrap();
        let mut b = EpisodeSampler::new(&classes, 5, 1, 2, 42).unwrap();
        for _ in 0..3 {
            let (x, y) = (a.sample(), b.sample());
            assert_eq!(x.class_indices, y.class_indices);
            assert!(x.support.equal(&y.support) && x.query.equal(&y.query));
        }
        let state: SamplerState =
            serde_json::from_str(&serde_json::to_string(&a.state()).unwrap()).unwrap();
        assert_eq!(
            state,
            SamplerState {
                seed: 42,
                episodes: 3
            }
        );
        let mut restored = EpisodeSampler::new(&classes, 5, 1, 2, 0)
            .unwrap()
            .continued(&state);
        for _ in 0..3 {
            let (x, y) = (a.sample(), restored.sample());
            assert_eq!(x.class_indices, y.class_indices);
            assert!(x.support.equal(&y.support) && x.query.equal(&y.query));
        }
        let other = EpisodeSampler::new(&classes, 5, 1, 2, 43).unwrap().sample();
        assert_ne!(
            other.class_indices,
            EpisodeSampler::new(&classes, 5, 1, 2, 42)
                .unwrap()
                .sample()
                .class_indices
        );
    }

    #[test]
    fn within_group_episodes_draw_every_class_from_one_group_and_continue_identically() {
        let classes = split_test_classes();
        let group_of = |e: &Episode| -> Vec<String> {
            let mut groups: Vec<String> = e
                .class_indices
                .iter()
                .map(|&c| classes[c].group.clone())
                .collect();
            groups.dedup();
            groups
        };
        let within = || {
            EpisodeSampler::new(&classes, 5, 1, 2, 9)
                .unwrap()
                .within_groups()
                .unwrap()
        };
        let mut sampler = within();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let groups = group_of(&sampler.sample());
            assert_eq!(groups.len(), 1, "one group per episode: {groups:?}");
            seen.insert(groups[0].clone());
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            ["Latin", "Tagalog"],
            "every group large enough is drawn"
        );
        // Across groups, 40 episodes of 5 classes would almost surely mix alphabets.
        let mut plain = EpisodeSampler::new(&classes, 5, 1, 2, 9).unwrap();
        assert!((0..40).any(|_| group_of(&plain.sample()).len() > 1));

        let mut a = within();
        for _ in 0..3 {
            a.sample();
        }
        let mut continued = within().continued(&a.state());
        for _ in 0..3 {
            assert_eq!(a.sample().class_indices, continued.sample().class_indices);
        }
        // 18 classes: Tagalog (17) is too small, so every 18-way episode is Latin's.
        let mut latin = EpisodeSampler::new(&classes, 18, 1, 2, 9)
            .unwrap()
            .within_groups()
            .unwrap();
        assert_eq!(group_of(&latin.sample()), ["Latin"]);
        let too_many = EpisodeSampler::new(&classes, 40, 1, 2, 9)
            .unwrap()
            .within_groups();
        assert!(matches!(
            too_many,
            Err(DataError::NoGroupLargeEnough {
                way: 40,
                largest: 26
            })
        ));
        // Data whose every class is its own group (folders, mini-ImageNet) has nothing to draw.
        let singletons: Vec<ClassImages> = classes
            .iter()
            .map(|c| ClassImages {
                name: c.name.clone(),
                group: c.name.clone(),
                images: c.images.shallow_clone(),
            })
            .collect();
        assert!(matches!(
            groups_of(&singletons, 2),
            Err(DataError::NoGroups)
        ));
    }

    #[test]
    fn impossible_episodes_are_errors() {
        let classes = split_test_classes();
        let too_many_ways = EpisodeSampler::new(&classes, classes.len() + 1, 1, 1, 0)
            .err()
            .unwrap();
        assert!(
            matches!(
                too_many_ways,
                DataError::NotEnoughClasses {
                    way: 44,
                    available: 43
                }
            ),
            "{too_many_ways}"
        );
        let too_many_images = EpisodeSampler::new(&classes, 5, 5, 16, 0).err().unwrap();
        assert!(
            matches!(
                too_many_images,
                DataError::NotEnoughImages {
                    needed: 21,
                    available: 20,
                    ..
                }
            ),
            "{too_many_images}"
        );
        assert!(matches!(
            EpisodeSampler::new(&classes, 0, 1, 1, 0),
            Err(DataError::EmptyEpisode { .. })
        ));
    }
}
