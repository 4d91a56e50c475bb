//! `model.json`: everything about a checkpoint except its tensors (docs/MODEL_FORMAT.md).
//!
//! A user reads it to know what a model expects (input, head, adaptation defaults) and how it was
//! made (training and evaluation); the loader reads it to rebuild the network and to check the
//! weights' sha256.

use crate::model::settings::{is_one_view, one_view, Adaptation, BnMode, MAX_VIEWS};
use crate::nn::genotype::Genotype;
use crate::nn::relaxation::Relaxation;
use crate::nn::search_space::{SearchSpace, PRIMITIVES};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Version of the checkpoint layout; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

/// What adapts per task, and so which network the checkpoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// θ̃ and w̃ adapt per task; a genotype is decoded per task (T-NAS).
    Supernet,
    /// A fixed DARTS cell network (e.g. Auto-MAML): only weights adapt.
    Genotype,
    /// The MAML Conv-4 baseline: only weights adapt, no genotype.
    Conv4,
}

/// How images are turned into the network's input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InputSpec {
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// Images are resized to size × size.
    pub size: usize,
    /// Per-channel mean and std applied after scaling pixels to [0, 1] (and inverting).
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Whether pixel values are inverted (1 − v) first: Omniglot strokes are black on white.
    pub invert: bool,
}

/// The classifier head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HeadSpec {
    /// A trained linear layer for exactly `n_way` classes.
    Fixed { n_way: usize },
    /// Proto-MAML: per task the linear layer starts from the support set's class-mean embeddings,
    /// so any 2..=max_way classes are served. With `learned_scale`, its logits are multiplied by a
    /// meta-learned exp(`classifier.log_scale`): prototypes built from one shot classify their own
    /// images with a loss near zero, and the scale gives the inner steps a loss to learn from.
    Proto {
        max_way: usize,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        learned_scale: bool,
    },
}

impl HeadSpec {
    /// Whether a task with `n_way` classes can be served, with the reason if not.
    pub fn accepts(&self, n_way: usize) -> Result<(), String> {
        match *self {
            HeadSpec::Fixed { n_way: n } if n_way != n => {
                Err(format!("this model has a fixed {n}-way head; send exactly {n} distinct labels (got {n_way})"))
            }
            HeadSpec::Proto { max_way, .. } if !(2..=max_way).contains(&n_way) => {
                Err(format!("this model serves 2 to {max_way} classes; got {n_way} distinct labels"))
            }
            _ => Ok(()),
        }
    }
}

/// How the checkpoint was produced.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TrainingInfo {
    pub algorithm: String,
    pub data: String,
    /// Class or alphabet names per split.
    #[serde(default)]
    pub split: Split,
    pub iterations: usize,
    pub seed: u64,
    pub wall_time_s: f64,
    /// The exact command line.
    #[serde(default)]
    pub command: String,
    /// Episode shape used in meta-training.
    #[serde(default)]
    pub way: usize,
    #[serde(default)]
    pub shot: usize,
    #[serde(default)]
    pub query: usize,
    /// Every episode's classes came from one group (alphabet): the hard protocol.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub within_group: bool,
    /// Each rotation of a training alphabet was a group of its own (`--rotation-groups`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rotation_groups: bool,
    /// Random jitter of the training images; absent when there was none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augmentation: Option<Augmentation>,
}

/// Meta-training's random jitter of training images (`crate::data::augment`): the largest shift,
/// scale and shear, each drawn uniformly in `[−max, max]` per image; all zero is off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Augmentation {
    /// Shift along each axis, in pixels.
    pub shift_px: f64,
    /// Relative change of size: 0.1 draws scales in [0.9, 1.1].
    pub scale: f64,
    /// Horizontal shear (the tangent of the shear angle).
    pub shear: f64,
}

impl Augmentation {
    pub fn is_off(&self) -> bool {
        self.shift_px == 0.0 && self.scale == 0.0 && self.shear == 0.0
    }
}

/// Which alphabets (or classes) went where. Test entries are never seen in training.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Split {
    pub train: Vec<String>,
    pub validation: Vec<String>,
    pub test: Vec<String>,
}

/// One evaluation result: mean accuracy and its 95% interval over `tasks` tasks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EvalResult {
    pub split: String,
    pub way: usize,
    pub shot: usize,
    pub tasks: usize,
    pub predict_with: String,
    pub bn: BnMode,
    pub steps: usize,
    /// Weight-only steps of the derived network before it predicts (0: none).
    #[serde(default)]
    pub finetune_steps: usize,
    /// Test-time views of each image (1: the images as drawn).
    #[serde(default = "one_view", skip_serializing_if = "is_one_view")]
    pub views: usize,
    /// The groups (alphabets) whose tasks each drew all their classes from one group; empty when
    /// tasks drew their classes across the split's groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub within_groups: Vec<String>,
    /// Queries per class in each task, and the seed the tasks were drawn from (absent from rows
    /// written before they were recorded): together with the rest, which tasks these were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    pub accuracy: f64,
    pub ci95: f64,
}

impl EvalResult {
    /// Whether `other` measured the same thing (it may differ in the number of tasks and the
    /// outcome), so a new evaluation replaces it rather than standing beside it. A row that does
    /// not record its queries or seed matches any.
    pub fn same_setting(&self, other: &EvalResult) -> bool {
        let agree = |a: Option<u64>, b: Option<u64>| a.zip(b).is_none_or(|(a, b)| a == b);
        let setting = |r: &EvalResult| {
            (
                r.split.clone(),
                r.way,
                r.shot,
                r.predict_with.clone(),
                r.bn,
                r.steps,
                r.finetune_steps,
                r.views,
                r.within_groups.clone(),
            )
        };
        setting(self) == setting(other)
            && agree(self.query.map(|q| q as u64), other.query.map(|q| q as u64))
            && agree(self.seed, other.seed)
    }
}

/// The whole `model.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelMeta {
    pub format_version: u32,
    pub name: String,
    pub kind: ModelKind,
    /// The primitive order of the alpha columns; must equal [`PRIMITIVES`].
    pub primitives: Vec<String>,
    /// The supernet shape (absent for `conv4`).
    pub search_space: Option<SearchSpace>,
    /// The fixed architecture of a `genotype` model.
    #[serde(default)]
    pub genotype: Option<Genotype>,
    pub input: InputSpec,
    pub head: HeadSpec,
    /// The adaptation defaults, which a request may override.
    pub adaptation: Adaptation,
    /// How a supernet's θ becomes mixing weights; absent (older and imported models): softmax.
    #[serde(default)]
    pub relaxation: Relaxation,
    #[serde(default)]
    pub training: Option<TrainingInfo>,
    #[serde(default)]
    pub evaluation: Vec<EvalResult>,
    /// Set on a task model (`GET /tasks/{task_id}/model`): the task it was adapted for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskOrigin>,
    /// sha256 of `model.safetensors`, lowercase hex.
    pub sha256: String,
}

/// Where a task model came from: the task, the model adapted to it, and its class names, so that
/// whoever runs the model alone knows what its logits' columns mean.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TaskOrigin {
    pub task_id: String,
    /// The model the task was adapted from, and the sha256 of its weights.
    pub adapted_from: String,
    pub adapted_from_sha256: String,
    /// Class i's name, in the order of the logits.
    pub labels: Vec<String>,
}

impl ModelMeta {
    /// Checks the fields that the loader and the server rely on, for form and for sense (a model
    /// that passes is one the worker can warm up and serve); the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!(
                "format_version {} is not supported (this build reads {FORMAT_VERSION})",
                self.format_version
            ));
        }
        if self.name.trim().is_empty() {
            return Err("name is empty; give the model the name requests will use".into());
        }
        if self.primitives != PRIMITIVES {
            return Err(format!("primitives must be {PRIMITIVES:?} in that order"));
        }
        match (self.kind, &self.search_space, &self.genotype) {
            (ModelKind::Conv4, _, _) => {}
            (_, None, _) => {
                return Err("search_space is required for supernet and genotype models".into())
            }
            (ModelKind::Genotype, Some(space), Some(g)) => {
                space.validate().map_err(|e| format!("search_space: {e}"))?;
                g.validate(space).map_err(|e| format!("genotype: {e}"))?
            }
            (ModelKind::Genotype, _, None) => {
                return Err("a genotype model needs its genotype".into())
            }
            (ModelKind::Supernet, Some(space), _) => {
                space.validate().map_err(|e| format!("search_space: {e}"))?
            }
        }
        self.relaxation.validate()?;
        self.validate_input()?;
        self.validate_head_and_adaptation()
    }

    fn validate_input(&self) -> Result<(), String> {
        let input = &self.input;
        if ![1, 3].contains(&input.channels) {
            return Err(format!(
                "input.channels must be 1 (grayscale) or 3 (RGB), got {}",
                input.channels
            ));
        }
        if input.mean.len() != input.channels || input.std.len() != input.channels {
            return Err("input.mean and input.std need one value per input channel".into());
        }
        if input.mean.iter().any(|m| !m.is_finite()) {
            return Err("input.mean values must be finite numbers".into());
        }
        if input.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err("input.std values must be positive finite numbers".into());
        }
        match (self.kind, &self.search_space) {
            (ModelKind::Conv4, _) if input.size < 16 => {
                Err(format!("input.size must be at least 16 for conv4 (its four max-pools halve it four times), got {}", input.size))
            }
            (ModelKind::Supernet | ModelKind::Genotype, Some(space)) if (input.size, input.channels) != (space.image_size, space.in_channels) => {
                Err(format!(
                    "input.size {} and input.channels {} must equal search_space.image_size {} and search_space.in_channels {}: \
                     the network is built for those",
                    input.size, input.channels, space.image_size, space.in_channels
                ))
            }
            _ => Ok(()),
        }
    }

    fn validate_head_and_adaptation(&self) -> Result<(), String> {
        match self.head {
            HeadSpec::Fixed { n_way } if n_way < 2 => {
                return Err(format!("head.n_way must be at least 2, got {n_way}"))
            }
            HeadSpec::Proto { max_way, .. } if max_way < 2 => {
                return Err(format!("head.max_way must be at least 2, got {max_way}"))
            }
            _ => {}
        }
        // `steps` may be 0: a task model is adapted already and answers as it was kept.
        let a = &self.adaptation;
        if !a.lr_w.is_finite() || a.lr_w <= 0.0 || a.lr_w > MAX_LEARNING_RATE {
            return Err(format!(
                "adaptation.lr_w must be positive and at most {MAX_LEARNING_RATE}, got {}",
                a.lr_w
            ));
        }
        if !a.lr_theta.is_finite() || a.lr_theta < 0.0 || a.lr_theta > MAX_LEARNING_RATE {
            return Err(format!("adaptation.lr_theta must be in [0, {MAX_LEARNING_RATE}] (0: the architecture does not adapt), got {}", a.lr_theta));
        }
        if !(1..=MAX_VIEWS).contains(&a.views) {
            return Err(format!(
                "adaptation.views must be from 1 to {MAX_VIEWS} (1: no test-time views), got {}",
                a.views
            ));
        }
        Ok(())
    }
}

/// The largest learning rate a model may default to, and a request may ask for.
pub const MAX_LEARNING_RATE: f64 = 1e4;
