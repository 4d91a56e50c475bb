//! The `tnas-train` subcommands as library functions: arguments in, files and reports out.

use super::algorithm::Algorithm;
use super::evaluate::{mean_and_ci95, prediction_label, Evaluation};
use super::learner::OuterConfig;
use super::trainer::{TrainConfig, Trainer};
use crate::adapt::{Adaptation, BnMode, InnerLoop, PredictWith};
use crate::data::sampler::{groups_of, EpisodeSampler};
use crate::data::split::SplitSpec;
use crate::data::{self, ClassImages};
use crate::model::checkpoint::{param_specs, Checkpoint};
use crate::model::metadata::{
    Augmentation, EvalResult, HeadSpec, InputSpec, ModelKind, ModelMeta, Split, TrainingInfo,
    FORMAT_VERSION,
};
use crate::model::settings::MAX_VIEWS;
use crate::nn::derived::DerivedNetwork;
use crate::nn::genotype::Genotype;
use crate::nn::network::Network;
use crate::nn::params::ParamSet;
use crate::nn::relaxation::Relaxation;
use crate::nn::search_space::{SearchSpace, PRIMITIVES};
use crate::runtime::device::DeviceChoice;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// Dataset layouts `--dataset` understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DatasetKind {
    /// `<Alphabet>/<character>/*.png`, or the official zips; split by alphabet.
    Omniglot,
    /// Ravi & Larochelle: `images/` plus `train.csv`, `val.csv`, `test.csv`.
    Miniimagenet,
    /// `<class>/*.png|jpg`; split by class.
    Folder,
}

/// Where the data is and how it is split.
#[derive(Clone, Debug, clap::Args)]
pub struct DataArgs {
    /// Dataset directory or zip; repeat for several Omniglot zips.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "omniglot")]
    pub dataset: DatasetKind,
    /// Groups (Omniglot alphabets, or classes) held out for validation, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "Early_Aramaic")]
    pub validation_groups: Vec<String>,
    /// Groups held out for testing, comma-separated; never seen in training.
    #[arg(long, value_delimiter = ',', default_value = "Latin,Tagalog")]
    pub test_groups: Vec<String>,
    /// Hold out no validation groups: `meta-train` trains on them too and, with nothing to
    /// select by, keeps its latest model, saved at each --validate-every and at the end of its
    /// schedule.
    #[arg(long, conflicts_with = "validation_groups")]
    pub no_validation: bool,
    /// Skip the 90° rotation class augmentation of the training classes (Omniglot).
    #[arg(long)]
    pub no_rotations: bool,
    /// Make each rotation of a training alphabet a group of its own, so that `--within-group`
    /// episodes hold one alphabet in one orientation, as held-out tasks do (Omniglot). An
    /// alphabet with fewer than --way characters then has no group large enough for them.
    #[arg(long, conflicts_with = "no_rotations")]
    pub rotation_groups: bool,
}

/// The three splits, loaded and preprocessed once.
pub struct LoadedData {
    pub train: Vec<ClassImages>,
    pub validation: Vec<ClassImages>,
    pub test: Vec<ClassImages>,
    pub split: Split,
}

impl DataArgs {
    pub fn load(&self, input: &InputSpec) -> Result<LoadedData, String> {
        if self.rotation_groups && self.dataset != DatasetKind::Omniglot {
            return Err(
                "--rotation-groups groups the rotations of Omniglot alphabets; \
                 other datasets have no rotations: leave it out"
                    .into(),
            );
        }
        if self.no_validation && self.dataset == DatasetKind::Miniimagenet {
            return Err(
                "--no-validation trains on the validation groups of a group split; \
                 mini-ImageNet's validation classes are a split of their own: leave it out"
                    .into(),
            );
        }
        let err = |e: data::DataError| e.to_string();
        let (train, validation, test) = match self.dataset {
            DatasetKind::Miniimagenet => {
                let root = self
                    .data
                    .first()
                    .ok_or("--data needs the mini-ImageNet root")?;
                data::miniimagenet::load(root, input).map_err(err)?
            }
            DatasetKind::Omniglot | DatasetKind::Folder => {
                let dataset = match self.dataset {
                    DatasetKind::Omniglot => {
                        data::omniglot::load(&self.data, input).map_err(err)?
                    }
                    _ => {
                        data::folder::load(self.data.first().ok_or("--data needs a folder")?, input)
                            .map_err(err)?
                    }
                };
                let groups = dataset.groups();
                let validation_groups: &[String] = match self.no_validation {
                    true => &[],
                    false => &self.validation_groups,
                };
                let held_out: Vec<&String> =
                    validation_groups.iter().chain(&self.test_groups).collect();
                let train_groups = groups
                    .into_iter()
                    .filter(|g| !held_out.contains(&g))
                    .collect();
                let spec = SplitSpec {
                    train: train_groups,
                    validation: validation_groups.to_vec(),
                    test: self.test_groups.clone(),
                };
                spec.apply(dataset).map_err(err)?
            }
        };
        let split = Split {
            train: group_names(&train),
            validation: group_names(&validation),
            test: group_names(&test),
        };
        let train = if self.dataset == DatasetKind::Omniglot && !self.no_rotations {
            data::omniglot::with_rotations(train, self.rotation_groups)
        } else {
            train
        };
        Ok(LoadedData {
            train,
            validation,
            test,
            split,
        })
    }
}

fn group_names(classes: &[ClassImages]) -> Vec<String> {
    let mut groups: Vec<String> = classes.iter().map(|c| c.group.clone()).collect();
    groups.dedup();
    groups
}

/// The shape of every episode: N-way K-shot with Q queries per class.
#[derive(Clone, Copy, Debug, clap::Args)]
pub struct EpisodeArgs {
    /// N: classes per task.
    #[arg(long, default_value_t = 5)]
    pub way: usize,
    /// K: support images per class.
    #[arg(long, default_value_t = 1)]
    pub shot: usize,
    /// Query images per class.
    #[arg(long, default_value_t = 15)]
    pub query: usize,
    /// Draw all of a task's classes from one group (alphabet), the hard Omniglot protocol:
    /// `eval` spreads its tasks evenly over the groups that have at least --way classes;
    /// `meta-train` draws such a group at random for each episode, in validation too.
    #[arg(long)]
    pub within_group: bool,
}

/// `tnas-train meta-train`.
#[derive(Clone, Debug, clap::Args)]
pub struct MetaTrainArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[arg(long, value_enum, default_value = "tnas")]
    pub algo: Algorithm,
    /// Output model directory (`models/<name>`); also holds metrics.jsonl and resume/.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run saved in `<out>/resume/`.
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub episode: EpisodeArgs,
    /// Tasks per outer step.
    #[arg(long, default_value_t = 4)]
    pub meta_batch: usize,
    #[arg(long, default_value_t = 1000)]
    pub iterations: usize,
    /// Inner SGD steps per task (M).
    #[arg(long, default_value_t = 5)]
    pub inner_steps: usize,
    #[arg(long, default_value_t = 0.1)]
    pub lr_w: f64,
    #[arg(long, default_value_t = 30.0)]
    pub lr_theta: f64,
    #[arg(long, default_value_t = 1e-3)]
    pub meta_lr_w: f64,
    #[arg(long, default_value_t = 1e-3)]
    pub meta_lr_theta: f64,
    #[arg(long, default_value_t = 1e-3)]
    pub theta_weight_decay: f64,
    /// Steps written into model.json as the serving default.
    #[arg(long, default_value_t = 10)]
    pub serve_steps: usize,
    /// Image side the data is resized to.
    #[arg(long, default_value_t = 28)]
    pub image_size: usize,
    #[arg(long, default_value_t = 16)]
    pub init_channels: usize,
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Max-pools in the stem (2 = official; fewer for small inputs).
    #[arg(long, default_value_t = 2)]
    pub stem_pools: usize,
    /// `proto` serves any 2..=max_way classes; `fixed` exactly --way.
    #[arg(long, default_value = "proto", value_parser = ["proto", "fixed"])]
    pub head: String,
    /// Proto head: the most classes a task may have (default 20).
    #[arg(long)]
    pub max_way: Option<usize>,
    #[arg(long, value_enum, default_value = "support")]
    pub bn: BnMode,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 100)]
    pub validate_every: usize,
    #[arg(long, default_value_t = 100)]
    pub validation_tasks: usize,
    #[arg(long, default_value_t = 20)]
    pub save_every: usize,
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Model name in model.json (default: the --out folder's name).
    #[arg(long)]
    pub name: Option<String>,
    /// How θ becomes mixing weights: `softmax` (DARTS, T-NAS) or `annealed` (soft pruning: the
    /// adapted supernet ends as its genotype's network).
    #[arg(long, value_enum, default_value = "softmax")]
    pub relaxation: RelaxationKind,
    /// `annealed`: the temperature at the first inner step (default 1).
    #[arg(long)]
    pub temperature_start: Option<f64>,
    /// `annealed`: the temperature at the last inner step's end, where queries are predicted
    /// (default 0.1).
    #[arg(long)]
    pub temperature_end: Option<f64>,
    /// `annealed`: weigh each node's inputs by a softmax over input pairs (two inputs at the end).
    #[arg(long)]
    pub pairwise_inputs: bool,
    /// `annealed`: predict with the decoded genotype's network itself (one-hot mixing weights at
    /// the end temperature, gradients through the soft ones), so meta-training trains it.
    #[arg(long)]
    pub hard_end: bool,
    /// Proto head: meta-learn a scale on its logits (implied by tnas++).
    #[arg(long)]
    pub learned_scale: bool,
    /// Cosine annealing of the outer learning rates over --iterations (implied by tnas++).
    #[arg(long)]
    pub cosine: bool,
    /// Start from this model's meta-weights and θ (a warm start; tensors it lacks start fresh).
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Meta-training augmentation: each training image shifted by up to this many pixels along
    /// each axis (0: off; 2 is a good start at 28 × 28).
    #[arg(long, default_value_t = 0.0)]
    pub augment_shift: f64,
    /// Meta-training augmentation: each training image scaled by a factor within 1 ± this.
    #[arg(long, default_value_t = 0.0)]
    pub augment_scale: f64,
    /// Meta-training augmentation: each training image sheared by up to this (a tangent).
    #[arg(long, default_value_t = 0.0)]
    pub augment_shear: f64,
    /// Meta-train this fixed architecture instead of the supernet (a `genotype` model, such as
    /// Auto-MAML with `--algo maml`): a genotype JSON file, or a supernet model folder whose
    /// meta-genotype (its θ̃ decoded) to take.
    #[arg(long)]
    pub genotype: Option<PathBuf>,
}

/// `--relaxation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RelaxationKind {
    Softmax,
    Annealed,
}

/// A proto head's largest task when `--max-way` is not given.
const DEFAULT_MAX_WAY: usize = 20;

impl MetaTrainArgs {
    /// Refuses flags that would be silently ignored in this combination: the run would not be
    /// what its recorded command says.
    fn check_flags_apply(&self) -> Result<(), String> {
        let supernet = self.algo.uses_supernet() && self.genotype.is_none();
        let annealed = self.relaxation == RelaxationKind::Annealed;
        let schedule = self.temperature_start.is_some() || self.temperature_end.is_some();
        if !annealed && (self.pairwise_inputs || self.hard_end || schedule) {
            return Err("--pairwise-inputs, --hard-end and --temperature-* shape an annealed relaxation: add --relaxation annealed".into());
        }
        if annealed && !supernet {
            return Err(format!(
                "--relaxation annealed anneals θ, which only a supernet has; {} trains a fixed network: drop the relaxation flags",
                match self.genotype {
                    Some(_) => "--genotype",
                    None => self.algo.name(),
                }
            ));
        }
        if self.head == "fixed" && (self.max_way.is_some() || self.learned_scale) {
            return Err("--max-way and --learned-scale shape a proto head; --head fixed has exactly --way classes: drop them, or use --head proto".into());
        }
        Ok(())
    }

    fn model_meta(
        &self,
        input: InputSpec,
        split: Split,
        command: String,
        genotype: Option<Genotype>,
    ) -> ModelMeta {
        let supernet = self.algo.uses_supernet() && genotype.is_none();
        let cells = supernet || genotype.is_some();
        let in_channels = input.channels;
        ModelMeta {
            format_version: FORMAT_VERSION,
            name: self.name.clone().unwrap_or_else(|| {
                self.out
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
            kind: match (supernet, &genotype) {
                (true, _) => ModelKind::Supernet,
                (false, Some(_)) => ModelKind::Genotype,
                (false, None) => ModelKind::Conv4,
            },
            primitives: PRIMITIVES.iter().map(|p| p.to_string()).collect(),
            search_space: cells.then_some(SearchSpace {
                in_channels,
                image_size: self.image_size,
                init_channels: self.init_channels,
                layers: self.layers,
                stem_pools: self.stem_pools,
                ..SearchSpace::tnas_official(in_channels, self.image_size, self.init_channels)
            }),
            genotype,
            input,
            head: match self.head.as_str() {
                "proto" => HeadSpec::Proto {
                    max_way: self.max_way.unwrap_or(DEFAULT_MAX_WAY),
                    learned_scale: self.learned_scale || self.algo.is_maml_plus_plus(),
                },
                _ => HeadSpec::Fixed {
                    n_way: self.episode.way,
                },
            },
            relaxation: match self.relaxation {
                RelaxationKind::Softmax => Relaxation::Softmax,
                RelaxationKind::Annealed => Relaxation::Annealed {
                    start: self.temperature_start.unwrap_or(1.0),
                    end: self.temperature_end.unwrap_or(0.1),
                    pairwise_inputs: self.pairwise_inputs,
                    hard_end: self.hard_end,
                },
            },
            adaptation: Adaptation {
                steps: self.serve_steps,
                lr_w: self.lr_w,
                lr_theta: if supernet { self.lr_theta } else { 0.0 },
                bn: self.bn,
                learned_rates: self.algo.is_maml_plus_plus(),
                predict_with: PredictWith::Supernet,
                finetune_steps: 0,
                views: 1,
            },
            training: Some(TrainingInfo {
                algorithm: self.algo.name().into(),
                data: self
                    .data
                    .data
                    .iter()
                    .map(|p| {
                        p.file_name()
                            .unwrap_or_default()
                            .to_string_lossy()
                            .into_owned()
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                split,
                iterations: 0,
                seed: self.seed,
                wall_time_s: 0.0,
                command,
                way: self.episode.way,
                shot: self.episode.shot,
                query: self.episode.query,
                within_group: self.episode.within_group,
                rotation_groups: self.data.rotation_groups,
                augmentation: Some(Augmentation {
                    shift_px: self.augment_shift,
                    scale: self.augment_scale,
                    shear: self.augment_shear,
                })
                .filter(|a| !a.is_off()),
            }),
            evaluation: Vec::new(),
            task: None,
            sha256: String::new(),
        }
    }
}

/// The model in `dir` a run starts from (`flag`), refused when it was trained on groups this run
/// holds out: results on them would not be held out, and the run's `model.json` records only its
/// own split. Warns when that model was trained with this run's seed, whose episodes this run
/// would draw again.
fn parent_model(
    flag: &str,
    dir: &Path,
    split: &Split,
    seed: u64,
    device: tch::Device,
) -> Result<Checkpoint, String> {
    let checkpoint =
        Checkpoint::load(dir, device).map_err(|e| format!("{flag} {}: {e}", dir.display()))?;
    // Imported official checkpoints record no training of ours.
    let Some(training) = &checkpoint.meta.training else {
        return Ok(checkpoint);
    };
    let held_out: Vec<&String> = training
        .split
        .train
        .iter()
        .filter(|g| split.test.contains(g) || split.validation.contains(g))
        .collect();
    if !held_out.is_empty() {
        return Err(format!(
            "{flag} {}: that model was trained on {held_out:?}, which this run holds out (test {:?}, validation {:?}), so results there would not be held out; start from a model trained without them, or hold out other groups",
            dir.display(),
            split.test,
            split.validation
        ));
    }
    if training.seed == seed {
        eprintln!(
            "warning: {flag} {} was meta-trained with --seed {seed} too; on the same data and episode shape this run draws its tasks again (pass another --seed for new ones)",
            dir.display()
        );
    }
    Ok(checkpoint)
}

/// A genotype from a JSON file (DARTS's `Genotype` form, as the server returns it), or a supernet
/// model folder's meta-genotype: its θ̃ decoded (the folder's model loaded by [`parent_model`]).
fn read_genotype(
    path: &Path,
    parent: impl FnOnce() -> Result<Checkpoint, String>,
) -> Result<Genotype, String> {
    if path.is_dir() {
        return parent()?.meta_genotype().ok_or_else(|| {
            format!(
                "--genotype {}: not a supernet model, whose θ̃ could be decoded",
                path.display()
            )
        });
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--genotype {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("--genotype {}: not a genotype ({e}); expected DARTS's form, {{\"normal\": [[\"sep_conv_3x3\", 0], ...], \"normal_concat\": [...], ...}}", path.display()))
}

/// The input convention of each dataset.
pub fn input_spec(dataset: DatasetKind, image_size: usize) -> InputSpec {
    match dataset {
        DatasetKind::Omniglot => InputSpec {
            channels: 1,
            size: image_size,
            mean: vec![0.0],
            std: vec![1.0],
            invert: true,
        },
        _ => InputSpec {
            channels: 3,
            size: image_size,
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
            invert: false,
        },
    }
}

/// Runs `meta-train`; `stop` is raised by Ctrl-C/SIGTERM and ends the run after a saved step.
pub fn meta_train(args: &MetaTrainArgs, command: String, stop: &AtomicBool) -> Result<(), String> {
    let (shift, scale, shear) = (args.augment_shift, args.augment_scale, args.augment_shear);
    if !(shift >= 0.0 && (0.0..1.0).contains(&scale) && shear >= 0.0) {
        return Err(format!(
            "--augment-shift {shift}, --augment-scale {scale}, --augment-shear {shear}: each is a \
             largest jitter, at least 0, and the scale below 1 (try 2, 0.1 and 0.1)"
        ));
    }
    if args.algo.is_maml_plus_plus() && args.inner_steps == 0 {
        return Err("--algo tnas++ --inner-steps 0: tnas++ learns one rate per inner step, so it needs at least one (try 5)".into());
    }
    args.check_flags_apply()?;
    tch::set_num_threads(args.threads);
    let device = args.device.resolve()?;
    let input = input_spec(args.data.dataset, args.image_size);
    let loaded = args.data.load(&input)?;
    let parent = |flag: &str, dir: &Path| parent_model(flag, dir, &loaded.split, args.seed, device);
    let init = args
        .init_from
        .as_deref()
        .map(|dir| parent("--init-from", dir))
        .transpose()?;
    let genotype = args
        .genotype
        .as_deref()
        .map(|path| read_genotype(path, || parent("--genotype", path)))
        .transpose()?;
    eprintln!(
        "data: {} training classes, {} validation, {} test",
        loaded.train.len(),
        loaded.validation.len(),
        loaded.test.len()
    );
    let config = TrainConfig {
        algorithm: args.algo,
        way: args.episode.way,
        shot: args.episode.shot,
        query: args.episode.query,
        within_group: args.episode.within_group,
        meta_batch: args.meta_batch,
        iterations: args.iterations,
        inner: InnerLoop {
            steps: args.inner_steps,
            lr_w: args.lr_w,
            lr_theta: args.lr_theta,
            second_order: false,
        },
        outer: OuterConfig {
            meta_lr_w: args.meta_lr_w,
            meta_lr_theta: args.meta_lr_theta,
            theta_weight_decay: args.theta_weight_decay,
            cosine: args.cosine || args.algo.is_maml_plus_plus(),
        },
        bn: args.bn,
        seed: args.seed,
        validate_every: args.validate_every.max(1),
        validation_tasks: args.validation_tasks,
        no_validation: args.data.no_validation,
        save_every: args.save_every.max(1),
        out: args.out.clone(),
        device,
        meta: args.model_meta(input, loaded.split.clone(), command, genotype),
    };
    let mut trainer = Trainer::new(config, &loaded.train, &loaded.validation, args.resume)?;
    if let (Some(init), Some(dir), 0) = (&init, &args.init_from, trainer.iteration()) {
        let fresh = trainer.warm_start(init)?;
        eprintln!(
            "warm start from {}{}",
            dir.display(),
            if fresh.is_empty() {
                String::new()
            } else {
                format!("; starting fresh: {}", fresh.join(", "))
            }
        );
    }
    if trainer.iteration() > 0 {
        eprintln!("resuming at iteration {}", trainer.iteration());
    }
    trainer.run(stop)
}

/// `tnas-train eval`.
#[derive(Clone, Debug, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub data: DataArgs,
    /// Model directory.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub episode: EpisodeArgs,
    /// Tasks to evaluate, at least 1.
    #[arg(long, default_value_t = 600, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub tasks: usize,
    /// Adaptation steps, comma-separated to evaluate several side by side (default: the model's).
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<usize>,
    /// Fine-tuning steps of derived predictions (default: the model's, as the server's).
    #[arg(long)]
    pub finetune_steps: Option<usize>,
    /// Test-time views (default: the model's): 1 for the images as sent; up to 9 adds each
    /// image's one-pixel shifts, the support's as more examples of their classes, the queries'
    /// averaged into one prediction.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=MAX_VIEWS as i64))]
    pub views: Option<u8>,
    /// Which held-out split to evaluate on.
    #[arg(long, default_value = "test", value_parser = ["test", "validation"])]
    pub split: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Record the results in the model's model.json (the card's numbers).
    #[arg(long)]
    pub write: bool,
    /// Evaluate only these prediction modes (default: `supernet` and `derived`, or the network
    /// itself). `meta-genotype` is one architecture for every task: the genotype of the
    /// meta-learned θ̃, unadapted, on the meta-weights, whose weights adapt per task.
    #[arg(long, value_delimiter = ',', value_parser = ["supernet", "derived", "meta-genotype"])]
    pub predict_with: Vec<String>,
    /// Evaluate only these BN modes (default: both).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub bn: Vec<BnMode>,
    /// Also report how much the task-specific genotypes vary: over the evaluated tasks, how many
    /// are distinct and how many of their edges differ from the meta-genotype's.
    #[arg(long)]
    pub genotype_variation: bool,
    #[arg(long, default_value_t = 2)]
    pub threads: i32,
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
}

/// Runs `eval`: every prediction mode the model supports, each over the same `--tasks` episodes.
pub fn eval(args: &EvalArgs) -> Result<Vec<EvalResult>, String> {
    tch::set_num_threads(args.threads);
    let device = args.device.resolve()?;
    let checkpoint = Checkpoint::load(&args.model, device).map_err(|e| e.to_string())?;
    if args.split == "validation" && args.data.no_validation {
        return Err("--split validation evaluates the validation groups, which --no-validation leaves out: drop one of the two".into());
    }
    let loaded = args.data.load(&checkpoint.meta.input)?;
    let classes = if args.split == "test" {
        &loaded.test
    } else {
        &loaded.validation
    };
    if let Some(training) = &checkpoint.meta.training {
        never_trained_on(classes, &training.split)?;
    }
    checkpoint.meta.head.accepts(args.episode.way)?;
    let network = checkpoint.network();
    let defaults = checkpoint.meta.adaptation;
    let all_steps = if args.steps.is_empty() {
        vec![defaults.steps]
    } else {
        args.steps.clone()
    };
    let settings_at = |steps, bn, predict_with| Adaptation {
        steps,
        bn,
        predict_with,
        // Only derived predictions fine-tune: other rows record none.
        finetune_steps: match predict_with {
            PredictWith::Derived => args.finetune_steps.unwrap_or(defaults.finetune_steps),
            PredictWith::Supernet => 0,
        },
        views: args.views.map_or(defaults.views, usize::from),
        ..defaults
    };
    let mut modes: Vec<&str> = if network.has_alphas() {
        vec!["supernet", "derived"]
    } else {
        vec!["supernet"]
    };
    if !args.predict_with.is_empty() {
        if let Some(mode) = args
            .predict_with
            .iter()
            .find(|m| !network.has_alphas() && *m != "supernet")
        {
            return Err(format!("--predict-with {mode}: {} is a fixed network without architecture weights, so it always predicts with itself; leave --predict-with out", args.model.display()));
        }
        modes = args.predict_with.iter().map(String::as_str).collect();
    }
    let bn_modes: Vec<BnMode> = if args.bn.is_empty() {
        vec![BnMode::Support, BnMode::Transductive]
    } else {
        args.bn.clone()
    };
    let (groups, task_counts) = task_groups(
        classes,
        args.episode.way,
        args.episode.within_group,
        args.tasks,
    )?;
    let meta_genotype = modes
        .contains(&"meta-genotype")
        .then(|| meta_genotype_model(&checkpoint))
        .transpose()?;
    let mut results = Vec::new();
    for &steps in &all_steps {
        for &mode in &modes {
            for &bn in &bn_modes {
                let predict_with = match mode {
                    "derived" => PredictWith::Derived,
                    _ => PredictWith::Supernet,
                };
                let settings = settings_at(steps, bn, predict_with);
                let evaluation = match (mode, &meta_genotype) {
                    ("meta-genotype", Some((net, params))) => {
                        let own = evaluation_of(&checkpoint, &network, settings, device);
                        // Its weights adapt alone, at the hand-set rate (the learned ones are the supernet's).
                        Evaluation {
                            network: net,
                            params,
                            alphas: None,
                            settings: Adaptation {
                                learned_rates: false,
                                ..settings
                            },
                            rates: None,
                            ..own
                        }
                    }
                    _ => evaluation_of(&checkpoint, &network, settings, device),
                };
                let mut accuracies = Vec::with_capacity(args.tasks);
                for (mut sampler, count) in group_samplers(&groups, &task_counts, args)? {
                    accuracies.extend(evaluation.accuracies(&mut sampler, count));
                }
                let (accuracy, ci95) = mean_and_ci95(&accuracies);
                let name = if mode == "meta-genotype" {
                    mode
                } else {
                    prediction_label(&network, evaluation.settings.predict_with)
                };
                let within_groups: Vec<String> = if args.episode.within_group {
                    groups.iter().map(|g| g[0].group.clone()).collect()
                } else {
                    Vec::new()
                };
                let within = if within_groups.is_empty() {
                    String::new()
                } else {
                    format!(" within {}", within_groups.join(" or "))
                };
                let views = match settings.views {
                    1 => String::new(),
                    v => format!(" views={v}"),
                };
                eprintln!("{}-way {}-shot{within} {name} bn={bn:?} steps={steps}{views}: {:.2}% ± {:.2}% ({} tasks)", args.episode.way, args.episode.shot, accuracy * 100.0, ci95 * 100.0, args.tasks);
                let (split, way, shot, tasks, finetune_steps) = (
                    args.split.clone(),
                    args.episode.way,
                    args.episode.shot,
                    args.tasks,
                    settings.finetune_steps,
                );
                results.push(EvalResult {
                    split,
                    way,
                    shot,
                    tasks,
                    predict_with: name.into(),
                    bn,
                    steps,
                    finetune_steps,
                    views: settings.views,
                    within_groups,
                    query: Some(args.episode.query),
                    seed: Some(args.seed),
                    accuracy,
                    ci95,
                });
            }
        }
    }
    if args.genotype_variation && network.has_alphas() {
        let settings = settings_at(
            all_steps[all_steps.len() - 1],
            BnMode::Support,
            PredictWith::Supernet,
        );
        let evaluation = evaluation_of(&checkpoint, &network, settings, device);
        let mut genotypes = Vec::with_capacity(args.tasks);
        for (mut sampler, count) in group_samplers(&groups, &task_counts, args)? {
            genotypes.extend(evaluation.genotypes(&mut sampler, count));
        }
        println!("{}", genotype_variation(&checkpoint, &genotypes));
    }
    if args.write {
        record_results(&args.model, &checkpoint.meta.sha256, &results)?;
    }
    Ok(results)
}

/// The evaluation of `checkpoint` with `settings`, at its learned rates when `settings` ask.
fn evaluation_of<'a>(
    checkpoint: &'a Checkpoint,
    network: &'a Network,
    settings: Adaptation,
    device: tch::Device,
) -> Evaluation<'a> {
    Evaluation {
        network,
        params: &checkpoint.params,
        alphas: checkpoint.alphas.as_ref(),
        head: checkpoint.meta.head,
        settings,
        rates: checkpoint.rates.clone().filter(|_| settings.learned_rates),
        device,
    }
}

/// Each group's episode sampler (seeded by the group's place, so every setting draws the same
/// tasks) with the number of tasks to draw from it.
fn group_samplers<'a>(
    groups: &[&'a [ClassImages]],
    task_counts: &[usize],
    args: &EvalArgs,
) -> Result<Vec<(EpisodeSampler<'a>, usize)>, String> {
    groups
        .iter()
        .zip(task_counts)
        .enumerate()
        .map(|(index, (group, &count))| {
            let sampler = EpisodeSampler::new(
                group,
                args.episode.way,
                args.episode.shot,
                args.episode.query,
                args.seed + index as u64,
            )
            .map_err(|e| e.to_string())?;
            Ok((sampler, count))
        })
        .collect()
}

/// The classes each task draws from and how many tasks each gives: all `classes` for every
/// task, or (`within_group`) each group with at least `way` classes, the tasks spread evenly.
fn task_groups(
    classes: &[ClassImages],
    way: usize,
    within_group: bool,
    tasks: usize,
) -> Result<(Vec<&[ClassImages]>, Vec<usize>), String> {
    if !within_group {
        return Ok((vec![classes], vec![tasks]));
    }
    let groups: Vec<&[ClassImages]> = groups_of(classes, way)
        .map_err(|e| format!("--within-group: {e}"))?
        .into_iter()
        .map(|range| &classes[range])
        .collect();
    let counts = (0..groups.len())
        .map(|g| tasks / groups.len() + usize::from(g < tasks % groups.len()))
        .collect();
    Ok((groups, counts))
}

/// How far task-specific `genotypes` are from each other and from the meta-genotype, in words.
fn genotype_variation(checkpoint: &Checkpoint, genotypes: &[Genotype]) -> String {
    let Some(meta) = checkpoint.meta_genotype() else {
        return String::new();
    };
    let edges = |g: &Genotype| {
        g.normal
            .iter()
            .chain(&g.reduce)
            .cloned()
            .collect::<Vec<_>>()
    };
    let differing: Vec<usize> = genotypes
        .iter()
        .map(|g| {
            edges(g)
                .iter()
                .zip(edges(&meta))
                .filter(|(a, b)| *a != b)
                .count()
        })
        .collect();
    let mut distinct: Vec<Vec<crate::nn::genotype::Edge>> = genotypes.iter().map(edges).collect();
    distinct.sort_by_key(|e| format!("{e:?}"));
    distinct.dedup();
    let (min, max) = (
        differing.iter().min().copied().unwrap_or(0),
        differing.iter().max().copied().unwrap_or(0),
    );
    let mean = differing.iter().sum::<usize>() as f64 / differing.len().max(1) as f64;
    let same = differing.iter().filter(|&&d| d == 0).count();
    format!(
        "genotypes of {} tasks: {} distinct; edges differing from the meta-genotype: mean {mean:.2} of {} (min {min}, max {max}); {same} tasks keep the meta-genotype",
        genotypes.len(),
        distinct.len(),
        edges(&meta).len()
    )
}

/// The meta-genotype's network: the genotype of the unadapted θ̃, on the meta-weights of its kept
/// edges (and the learned logit scale, if any).
fn meta_genotype_model(checkpoint: &Checkpoint) -> Result<(Network, ParamSet), String> {
    let (Network::Supernet(net), Some(genotype)) =
        (checkpoint.network(), checkpoint.meta_genotype())
    else {
        return Err("meta-genotype needs a supernet model".into());
    };
    let derived = DerivedNetwork::new(net.space, genotype)?;
    let params = param_specs(&Network::Derived(derived.clone()), checkpoint.meta.head)
        .into_iter()
        .map(|s| {
            (
                s.name.clone(),
                checkpoint.params.get(&s.name).shallow_clone(),
            )
        });
    Ok((Network::Derived(derived), ParamSet::from_pairs(params)))
}

/// Refuses to evaluate on `classes` of any group the model was trained on (as its `model.json`
/// records the split): held-out accuracy must come from classes never seen in training, whatever
/// `--validation-groups`/`--test-groups` say.
fn never_trained_on(classes: &[ClassImages], split: &Split) -> Result<(), String> {
    let seen: Vec<String> = group_names(classes)
        .into_iter()
        .filter(|g| split.train.contains(g))
        .collect();
    if seen.is_empty() {
        return Ok(());
    }
    let test = split.test.join(",");
    let fix = match split.validation.is_empty() {
        true => format!("it has no validation split (meta-trained with --no-validation): evaluate its test groups, --split test --test-groups {test}"),
        false => format!("pass the held-out groups its model.json records: --validation-groups {} --test-groups {test}", split.validation.join(",")),
    };
    Err(format!(
        "the evaluated groups include {seen:?}, which this model was trained on; {fix}"
    ))
}

/// Merges `results` into the model's `model.json` as it is on disk now, so evaluations that ran
/// side by side all keep their rows; refuses if the weights changed since they were evaluated.
pub fn record_results(
    model: &Path,
    evaluated_sha256: &str,
    results: &[EvalResult],
) -> Result<(), String> {
    let mut checkpoint = Checkpoint::load(model, tch::Device::Cpu).map_err(|e| e.to_string())?;
    if checkpoint.meta.sha256 != evaluated_sha256 {
        return Err(format!("{} changed while it was being evaluated (a training run saved a new best?); results not written, evaluate again", model.display()));
    }
    checkpoint
        .meta
        .evaluation
        .retain(|r| !results.iter().any(|n| n.same_setting(r)));
    checkpoint.meta.evaluation.extend(results.iter().cloned());
    checkpoint.save(model).map_err(|e| e.to_string())
}

/// `tnas-train card`.
#[derive(Clone, Debug, clap::Args)]
pub struct CardArgs {
    /// Model directory whose README.md is (re)written from its model.json.
    #[arg(long)]
    pub model: PathBuf,
    /// Baseline model directories whose results are listed beside this model's.
    #[arg(long)]
    pub baseline: Vec<PathBuf>,
    /// A Markdown file appended as the card's notes.
    #[arg(long)]
    pub notes: Option<PathBuf>,
}

/// Writes `<model>/README.md`.
pub fn card(args: &CardArgs) -> Result<(), String> {
    let read_meta = |dir: &Path| -> Result<crate::model::metadata::ModelMeta, String> {
        let path = dir.join(crate::model::checkpoint::META_FILE);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    };
    let meta = read_meta(&args.model)?;
    let baselines = args
        .baseline
        .iter()
        .map(|d| read_meta(d))
        .collect::<Result<Vec<_>, _>>()?;
    let notes = match &args.notes {
        Some(p) => std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => String::new(),
    };
    let text = super::card::render(&meta, &baselines.iter().collect::<Vec<_>>(), &notes);
    crate::model::checkpoint::write_atomically(&args.model.join("README.md"), text.as_bytes())
        .map_err(|e| e.to_string())
}
