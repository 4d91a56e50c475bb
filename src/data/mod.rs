//! Few-shot datasets: classes of preprocessed images, split by group, sampled into episodes.
//!
//! - [`omniglot`]: `<Alphabet>/<character>/*.png` folders or the official zips, and the 90°
//!   rotation class augmentation.
//! - [`augment`]: random shifts, scales and shears of meta-training images.
//! - [`miniimagenet`]: Ravi & Larochelle's `images/` plus `{train,val,test}.csv`.
//! - [`imaging`]: image bytes → network input, shared by training and serving.
//! - [`folder`]: a generic `<class>/*.{png,jpg,jpeg}` layout.
//! - [`split`]: train / validation / test by group, so test classes are never seen in training.
//! - [`sampler`]: N-way K-shot episodes, deterministic and resumable.
//!
//! Every loader decodes and resizes each image once, with [`crate::data::imaging`], into a tensor kept
//! in memory: episodes only index those tensors.

pub mod augment;
mod error;
pub mod folder;
pub mod imaging;
pub mod miniimagenet;
pub mod omniglot;
mod preprocess;
pub mod sampler;
pub mod split;

pub use error::DataError;

use tch::Tensor;

/// One class: every image of it, preprocessed.
#[derive(Debug)]
pub struct ClassImages {
    /// Unique within a dataset, e.g. `Greek/character03` or `n01532829`; names it in errors.
    pub name: String,
    /// The unit a split assigns: the alphabet for Omniglot (characters of one alphabet look
    /// alike, so they must not straddle train and test), the class name itself otherwise.
    pub group: String,
    /// `[n, C, S, S]` f32, already through [`crate::data::imaging::to_input`].
    pub images: Tensor,
}

impl ClassImages {
    /// Number of images of this class.
    pub fn num_images(&self) -> usize {
        self.images.size()[0] as usize
    }

    /// A copy that shares the pixel storage: cheap, and safe because class tensors are never
    /// written in place.
    pub fn shallow_clone(&self) -> ClassImages {
        ClassImages {
            name: self.name.clone(),
            group: self.group.clone(),
            images: self.images.shallow_clone(),
        }
    }
}

/// Every class a loader found, in a deterministic order (sorted by the loaders), so that a seed
/// always draws the same episodes.
#[derive(Debug, Default)]
pub struct Dataset {
    pub classes: Vec<ClassImages>,
}

impl Dataset {
    /// Distinct groups, in order of first appearance.
    pub fn groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = Vec::new();
        for class in &self.classes {
            if !groups.contains(&class.group) {
                groups.push(class.group.clone());
            }
        }
        groups
    }

    /// Moves out the classes whose group is in `groups`, keeping their order; the others stay.
    pub fn take_groups(&mut self, groups: &[String]) -> Vec<ClassImages> {
        let (taken, kept) = std::mem::take(&mut self.classes)
            .into_iter()
            .partition(|c| groups.contains(&c.group));
        self.classes = kept;
        taken
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! The two Omniglot zips, loaded once per test binary.

    use super::{omniglot, Dataset};
    use crate::model::metadata::InputSpec;
    use std::path::PathBuf;
    use std::sync::{Mutex, MutexGuard, OnceLock};

    /// Omniglot's preprocessing at 28 × 28: strokes (black on white) become bright after invert.
    pub fn omniglot_spec() -> InputSpec {
        InputSpec {
            channels: 1,
            size: 28,
            mean: vec![0.0],
            std: vec![1.0],
            invert: true,
        }
    }

    pub fn omniglot_zips() -> Vec<PathBuf> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/omniglot");
        vec![
            dir.join("images_background_small1.zip"),
            dir.join("images_background_small2.zip"),
        ]
    }

    /// Both zips at 28 × 28. Behind a mutex because tensors are `Send` but not `Sync`.
    pub fn omniglot() -> MutexGuard<'static, Dataset> {
        static DATA: OnceLock<Mutex<Dataset>> = OnceLock::new();
        let data = DATA.get_or_init(|| {
            Mutex::new(omniglot::load(&omniglot_zips(), &omniglot_spec()).unwrap())
        });
        data.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A dataset sharing the fixture's storage, for tests that consume one.
    pub fn omniglot_copy() -> Dataset {
        Dataset {
            classes: omniglot()
                .classes
                .iter()
                .map(|c| c.shallow_clone())
                .collect(),
        }
    }
}
