//! The meta-training loop (T-NAS Algorithm 1): episodes → task gradients → outer Adam step, with
//! JSONL metrics, periodic validation on held-out classes, the best checkpoint kept by validation
//! accuracy (or, without a validation split, the latest), and a resumable state saved on interval
//! and on request (Ctrl-C, SIGTERM).

use super::adam::Adam;
use super::algorithm::{Algorithm, MetaTask, TaskContext};
use super::evaluate::{mean_and_ci95, prediction_label, Evaluation};
use super::learner::{MetaLearner, OuterConfig};
use crate::adapt::{Adaptation, BnMode, InnerLoop, PredictWith, SupportSet};
use crate::data::augment::jitter;
use crate::data::sampler::{EpisodeSampler, SamplerState};
use crate::data::{ClassImages, DataError};
use crate::model::checkpoint::{
    param_specs, safetensors_bytes, sha256_hex, task_tensors, tensors_of_safetensors,
    write_atomically, Checkpoint, CheckpointError,
};
use crate::model::metadata::{Augmentation, EvalResult, HeadSpec, InputSpec, ModelMeta, Split};
use crate::nn::genotype::Genotype;
use crate::nn::learned_rates::LearnedRates;
use crate::nn::network::Network;
use crate::nn::params::ParamSet;
use crate::nn::relaxation::Relaxation;
use crate::nn::search_space::SearchSpace;
use crate::nn::supernet::Alphas;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tch::{Device, Tensor};

/// Everything a run needs besides its data.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub algorithm: Algorithm,
    pub way: usize,
    pub shot: usize,
    pub query: usize,
    /// Every episode's classes from one group (the hard protocol), in training and validation.
    pub within_group: bool,
    pub meta_batch: usize,
    pub iterations: usize,
    pub inner: InnerLoop,
    pub outer: OuterConfig,
    /// BN mode of the query forward in the outer loss (serving uses `support`).
    pub bn: BnMode,
    pub seed: u64,
    pub validate_every: usize,
    pub validation_tasks: usize,
    /// No validation split: keep the latest model instead of the best by validation accuracy.
    pub no_validation: bool,
    pub save_every: usize,
    pub out: PathBuf,
    pub device: Device,
    /// The checkpoint metadata to write (training info is filled in as the run goes).
    pub meta: ModelMeta,
}

/// What a run is: every setting a resumed run must share with the saved one to continue it (the
/// iteration count, except a cosine schedule's, validation and save cadence, threads and device
/// may change).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RunSettings {
    algorithm: Algorithm,
    way: usize,
    shot: usize,
    query: usize,
    #[serde(default)]
    within_group: bool,
    meta_batch: usize,
    seed: u64,
    inner_steps: usize,
    lr_w: f64,
    lr_theta: f64,
    meta_lr_w: f64,
    meta_lr_theta: f64,
    theta_weight_decay: f64,
    #[serde(default)]
    cosine: bool,
    /// A cosine schedule's length (`--iterations`): resumed with another, the outer rates would
    /// jump to another point of another curve.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cosine_iterations: Option<usize>,
    bn: BnMode,
    search_space: Option<SearchSpace>,
    #[serde(default)]
    relaxation: Relaxation,
    #[serde(default)]
    learned_rates: bool,
    head: HeadSpec,
    input: InputSpec,
    /// The data, its split and its augmentation: continued on other classes, a run would record a
    /// split it did not train on. Absent from states saved before they were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    split: Option<Split>,
    /// Whether the training classes include their 90° rotations (Omniglot's augmentation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rotations: Option<bool>,
    /// Whether each rotation of an alphabet was a group of its own (`--rotation-groups`); states
    /// saved before the option existed were made without it.
    #[serde(default)]
    rotation_groups: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    augmentation: Option<Augmentation>,
    /// The fixed architecture of a `--genotype` run: another one may have the same weights (pools
    /// and skips have none) and would go on silently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    genotype: Option<Genotype>,
}

impl RunSettings {
    fn of(config: &TrainConfig, train: &[ClassImages]) -> RunSettings {
        let training = config.meta.training.as_ref();
        RunSettings {
            algorithm: config.algorithm,
            way: config.way,
            shot: config.shot,
            query: config.query,
            within_group: config.within_group,
            meta_batch: config.meta_batch,
            seed: config.seed,
            inner_steps: config.inner.steps,
            lr_w: config.inner.lr_w,
            lr_theta: config.inner.lr_theta,
            meta_lr_w: config.outer.meta_lr_w,
            meta_lr_theta: config.outer.meta_lr_theta,
            theta_weight_decay: config.outer.theta_weight_decay,
            cosine: config.outer.cosine,
            cosine_iterations: config.outer.cosine.then_some(config.iterations),
            bn: config.bn,
            search_space: config.meta.search_space,
            relaxation: config.meta.relaxation,
            learned_rates: config.meta.adaptation.learned_rates,
            head: config.meta.head,
            input: config.meta.input.clone(),
            data: training.map(|t| t.data.clone()),
            split: training.map(|t| t.split.clone()),
            rotations: Some(train.iter().any(|class| class.name.ends_with("/rot90"))),
            rotation_groups: training.is_some_and(|t| t.rotation_groups),
            augmentation: training.and_then(|t| t.augmentation),
            genotype: config.meta.genotype.clone(),
        }
    }

    /// The settings in which `self` and `other` differ, as `name: ours (saved: theirs)`; a setting
    /// the saved state does not record is not compared.
    fn differences(&self, saved: &RunSettings) -> Vec<String> {
        let (ours, theirs) = (
            serde_json::to_value(self).expect("settings serialise"),
            serde_json::to_value(saved).expect("settings serialise"),
        );
        let (ours, theirs) = (
            ours.as_object().expect("a struct"),
            theirs.as_object().expect("a struct"),
        );
        let differs = |name: &String, value: &serde_json::Value| {
            theirs.get(name).is_some_and(|saved| saved != value)
        };
        ours.iter()
            .filter(|(name, value)| differs(name, value))
            .map(|(name, value)| format!("{name}: {value} (saved: {})", theirs[name]))
            .collect()
    }
}

/// The resumable part of a run, in `resume/state.json`; its tensors (w̃, θ̃, the optimisers'
/// moments) are in the file it names, checked against the hash it records. The file is new for
/// every save and `state.json` is written last, so a save cut short leaves the previous pair whole.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ResumeState {
    run: RunSettings,
    iteration: usize,
    sampler: SamplerState,
    best_validation: Option<f64>,
    wall_time_s: f64,
    adam_w_steps: i64,
    adam_theta_steps: Option<i64>,
    #[serde(default)]
    adam_rates_steps: Option<i64>,
    tensors: String,
    tensors_sha256: String,
}

/// An optimiser's name, its state and the tensors it updates (by their resume-state names).
type OptimiserGroup<'a> = (&'a str, &'a Adam, Vec<(&'a str, &'a Tensor)>);

/// One line of `metrics.jsonl`.
#[derive(Serialize)]
struct MetricsLine {
    iteration: usize,
    query_loss: f64,
    query_accuracy: f64,
    alpha_entropy: Option<f64>,
    validation_accuracy: Option<f64>,
    validation_ci95: Option<f64>,
    wall_time_s: f64,
}

/// A training episode's images through the run's augmentation, drawn from the task's seed (so a
/// resumed run sees the same images).
fn augmented(
    support: Tensor,
    query: Tensor,
    augmentation: Option<Augmentation>,
    seed: u64,
) -> (Tensor, Tensor) {
    let Some(how) = augmentation else {
        return (support, query);
    };
    let n = support.size()[0];
    let both = jitter(&Tensor::cat(&[support, query], 0), &how, seed);
    let queries = both.size()[0] - n;
    (both.narrow(0, 0, n), both.narrow(0, n, queries))
}

/// A meta-training run over `train` classes, validated on `validation` classes (none with
/// `no_validation`).
pub struct Trainer<'a> {
    config: TrainConfig,
    network: Network,
    learner: MetaLearner,
    train: &'a [ClassImages],
    validation: &'a [ClassImages],
    sampler: EpisodeSampler<'a>,
    state: ResumeState,
}

/// Validation draws the same tasks at every validation, from this seed.
const VALIDATION_SEED: u64 = 1;

/// The run's episodes from `classes`, starting at `seed`.
fn episodes<'c>(
    config: &TrainConfig,
    classes: &'c [ClassImages],
    seed: u64,
) -> Result<EpisodeSampler<'c>, DataError> {
    let sampler = EpisodeSampler::new(classes, config.way, config.shot, config.query, seed)?;
    match config.within_group {
        true => sampler.within_groups(),
        false => Ok(sampler),
    }
}

fn resume_dir(out: &Path) -> PathBuf {
    out.join("resume")
}

impl<'a> Trainer<'a> {
    /// A new run (fresh weights from `config.seed`), or the saved one when `resume` is set and
    /// `out/resume/` exists.
    pub fn new(
        config: TrainConfig,
        train: &'a [ClassImages],
        validation: &'a [ClassImages],
        resume: bool,
    ) -> Result<Self, String> {
        config.meta.validate()?;
        let network = crate::model::checkpoint::network_of(&config.meta)?;
        tch::manual_seed(config.seed as i64);
        let params = ParamSet::initialise(&param_specs(&network, config.meta.head), config.device);
        let alphas = network.has_alphas().then(|| match network {
            Network::Supernet(n) => Alphas::initialise(&n.space, config.device),
            _ => unreachable!("only supernets have alphas"),
        });
        let rates = config.meta.adaptation.learned_rates.then(|| {
            let (inner, tensors) = (config.inner, task_tensors(&params, config.meta.head));
            LearnedRates::initial(
                inner.steps,
                tensors,
                inner.lr_w,
                inner.lr_theta,
                config.device,
            )
        });
        let learner = MetaLearner::new(params, alphas, rates, config.outer);
        let sampler =
            episodes(&config, train, config.seed).map_err(|e| format!("training split: {e}"))?;
        if !config.no_validation {
            // Checked now, not at the first validation after hours of training.
            episodes(&config, validation, VALIDATION_SEED)
                .map_err(|e| format!("validation split: {e}"))?;
            if config.validation_tasks == 0 {
                return Err("--validation-tasks must be at least 1: the saved model is the one with the best validation accuracy".into());
            }
        }
        let state = ResumeState {
            run: RunSettings::of(&config, train),
            iteration: 0,
            sampler: sampler.state(),
            best_validation: None,
            wall_time_s: 0.0,
            adam_w_steps: 0,
            adam_theta_steps: None,
            adam_rates_steps: None,
            tensors: String::new(),
            tensors_sha256: String::new(),
        };
        let mut trainer = Trainer {
            config,
            network,
            learner,
            train,
            validation,
            sampler,
            state,
        };
        for dir in [trainer.config.out.clone(), resume_dir(&trainer.config.out)] {
            crate::model::checkpoint::remove_interrupted_temp_files(&dir);
        }
        if resume && resume_dir(&trainer.config.out).join("state.json").exists() {
            trainer.load_resume_state()?;
        }
        Ok(trainer)
    }

    pub fn iteration(&self) -> usize {
        self.state.iteration
    }

    /// Replaces the fresh meta-weights, θ̃ and learned rates with `from`'s where it has a tensor of
    /// the same name and shape (a warm start; the optimisers start fresh). Returns the names it lacks, which
    /// keep their fresh initialisation; a tensor of another shape is refused.
    pub fn warm_start(&mut self, from: &Checkpoint) -> Result<Vec<String>, String> {
        let mut fresh = Vec::new();
        let device = self.config.device;
        let mut params = Vec::new();
        for (name, tensor) in self.learner.params.iter() {
            let tensor = match from.params.contains(name) {
                true if from.params.get(name).size() == tensor.size() => {
                    from.params.get(name).to_device(device).detach().copy()
                }
                true => {
                    return Err(format!(
                        "--init-from: {name} has shape {:?}, this run's {:?}",
                        from.params.get(name).size(),
                        tensor.size()
                    ))
                }
                false => {
                    fresh.push(name.clone());
                    tensor.shallow_clone()
                }
            };
            params.push((name.clone(), tensor));
        }
        self.learner.params = ParamSet::from_pairs(params);
        match (&self.learner.alphas, &from.alphas) {
            (Some(ours), Some(theirs)) if ours.normal.size() == theirs.normal.size() => {
                self.learner.alphas = Some(theirs.map(|t| t.to_device(device).detach().copy()))
            }
            (Some(_), Some(_)) => return Err("--init-from: θ has another shape".into()),
            (Some(_), None) => fresh.push("θ".into()),
            (None, _) => {}
        }
        let copy = |t: &Tensor| t.to_device(device).detach().copy().set_requires_grad(true);
        match (&self.learner.rates, &from.rates) {
            (Some(ours), Some(theirs))
                if ours.w.size() == theirs.w.size() && ours.theta.size() == theirs.theta.size() =>
            {
                self.learner.rates = Some(LearnedRates {
                    w: copy(&theirs.w),
                    theta: copy(&theirs.theta),
                })
            }
            (Some(_), _) => fresh.push("learned rates".into()),
            (None, _) => {}
        }
        Ok(fresh)
    }

    /// Runs until `config.iterations` or until `stop` is raised; saves a resumable state either way.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), String> {
        std::fs::create_dir_all(&self.config.out)
            .map_err(|e| format!("{}: {e}", self.config.out.display()))?;
        let progress = indicatif::ProgressBar::new(self.config.iterations as u64)
            .with_position(self.state.iteration as u64);
        progress.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} it  {per_sec}  eta {eta}  {msg}",
            )
            .expect("valid template"),
        );
        self.start_metrics()?;
        let started = Instant::now();
        let base_time = self.state.wall_time_s;
        while self.state.iteration < self.config.iterations && !stop.load(Ordering::SeqCst) {
            let (loss, acc) = self.meta_step();
            self.state.iteration += 1;
            self.state.wall_time_s = base_time + started.elapsed().as_secs_f64();
            let it = self.state.iteration;
            let mut line = MetricsLine {
                iteration: it,
                query_loss: loss,
                query_accuracy: acc,
                alpha_entropy: self.alpha_entropy(),
                validation_accuracy: None,
                validation_ci95: None,
                wall_time_s: self.state.wall_time_s,
            };
            if it.is_multiple_of(self.config.validate_every) || it == self.config.iterations {
                if self.config.no_validation {
                    self.save_model(None).map_err(|e| e.to_string())?;
                } else {
                    let (mean, ci) = self.validate();
                    (line.validation_accuracy, line.validation_ci95) = (Some(mean), Some(ci));
                    if self.state.best_validation.is_none_or(|best| mean > best) {
                        self.state.best_validation = Some(mean);
                        self.save_model(Some((mean, ci)))
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            self.append_metrics(&line)?;
            if it.is_multiple_of(self.config.save_every) {
                self.save_resume_state()?;
            }
            progress.set_position(it as u64);
            let best = self.state.best_validation;
            progress.set_message(format!(
                "loss {loss:.3} acc {acc:.3}{}",
                best.map_or(String::new(), |v| format!(" best val {v:.3}"))
            ));
        }
        progress.finish();
        self.save_resume_state()
    }

    /// One outer iteration over a meta-batch; returns mean query loss and accuracy.
    fn meta_step(&mut self) -> (f64, f64) {
        let context = TaskContext {
            network: &self.network,
            head: self.config.meta.head,
            inner: self.config.inner,
            bn: self.config.bn,
            rule: self.config.algorithm.rule(),
            sample_architecture: self.config.algorithm.samples_architecture(),
            rates: self.learner.rates.clone(),
            device: self.config.device,
        };
        let augmentation = self
            .config
            .meta
            .training
            .as_ref()
            .and_then(|t| t.augmentation);
        let seeds: Vec<u64> = (0..self.config.meta_batch)
            .map(|index| self.task_seed(index))
            .collect();
        let grads: Vec<_> = (0..self.config.meta_batch)
            .map(|index| {
                let e = self.sampler.sample();
                let (support, query) = augmented(e.support, e.query, augmentation, seeds[index]);
                let (support, labels, query, query_labels) = (
                    support.to_device(self.config.device),
                    e.support_labels.to_device(self.config.device),
                    query.to_device(self.config.device),
                    e.query_labels.to_device(self.config.device),
                );
                let task = MetaTask {
                    support: SupportSet {
                        images: &support,
                        labels: &labels,
                        n_way: self.config.way,
                    },
                    query: &query,
                    query_labels: &query_labels,
                    seed: seeds[index],
                };
                context.task_gradient(&self.learner.params, self.learner.alphas.as_ref(), &task)
            })
            .collect();
        self.learner.outer_step(
            &grads,
            self.config
                .outer
                .lr_factor(self.state.iteration, self.config.iterations),
        );
        let n = grads.len() as f64;
        (
            grads.iter().map(|g| g.query_loss).sum::<f64>() / n,
            grads.iter().map(|g| g.query_accuracy).sum::<f64>() / n,
        )
    }

    /// The seed of the meta-batch's task `index`, unique within the run and the same on resume.
    fn task_seed(&self, index: usize) -> u64 {
        let position = (self.state.iteration * self.config.meta_batch + index) as u64;
        self.config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ position
    }

    /// Mean entropy of softmax(θ̃) rows (nats): how decided the architecture is.
    fn alpha_entropy(&self) -> Option<f64> {
        self.learner.alphas.as_ref().map(|a| {
            crate::runtime::grad::no_grad(|| {
                let rows = Tensor::cat(&[&a.normal, &a.reduce], 0);
                let p = rows.softmax(-1, tch::Kind::Float);
                (-(&p * p.log()).sum_dim_intlist(1i64, false, tch::Kind::Float))
                    .mean(tch::Kind::Float)
                    .double_value(&[])
            })
        })
    }

    /// Accuracy on the validation classes, on the same tasks every time (a fixed sampler seed).
    fn validate(&self) -> (f64, f64) {
        let mut sampler = episodes(&self.config, self.validation, VALIDATION_SEED)
            .expect("validation split large enough");
        let evaluation = Evaluation {
            network: &self.network,
            params: &self.learner.params,
            alphas: self.learner.alphas.as_ref(),
            head: self.config.meta.head,
            settings: Adaptation {
                steps: self.config.inner.steps,
                lr_w: self.config.inner.lr_w,
                lr_theta: self.config.inner.lr_theta,
                bn: self.config.bn,
                learned_rates: self.learner.rates.is_some(),
                predict_with: PredictWith::Supernet,
                finetune_steps: 0,
                views: 1,
            },
            rates: self.learner.rates.clone(),
            device: self.config.device,
        };
        mean_and_ci95(&evaluation.accuracies(&mut sampler, self.config.validation_tasks))
    }

    /// Saves the model with its validation accuracy and interval, if it has a validation split.
    fn save_model(&mut self, validation: Option<(f64, f64)>) -> Result<(), CheckpointError> {
        let mut meta = self.config.meta.clone();
        if let Some(training) = meta.training.as_mut() {
            training.iterations = self.state.iteration;
            training.wall_time_s = self.state.wall_time_s;
        }
        meta.evaluation = validation
            .map(|(accuracy, ci95)| EvalResult {
                split: "validation".into(),
                way: self.config.way,
                shot: self.config.shot,
                tasks: self.config.validation_tasks,
                predict_with: prediction_label(&self.network, PredictWith::Supernet).into(),
                bn: self.config.bn,
                steps: self.config.inner.steps,
                finetune_steps: 0,
                views: 1,
                within_groups: episodes(&self.config, self.validation, VALIDATION_SEED)
                    .expect("validation split large enough")
                    .group_names(),
                query: Some(self.config.query),
                seed: Some(VALIDATION_SEED),
                accuracy,
                ci95,
            })
            .into_iter()
            .collect();
        let rates = self.learner.rates.as_ref().map(LearnedRates::detach);
        let mut checkpoint = Checkpoint {
            meta,
            params: self.learner.params.clone(),
            alphas: self.learner.alphas.clone(),
            rates,
        };
        checkpoint.save(&self.config.out)?;
        super::card::write_run_card(&self.config.out, &checkpoint.meta)
    }

    /// Makes `metrics.jsonl` this run's record up to its current iteration: empty for a new run;
    /// for a resumed one, without the lines of iterations after its saved state (a run stopped
    /// between saves logged them, and repeats them now).
    fn start_metrics(&self) -> Result<(), String> {
        let path = self.config.out.join("metrics.jsonl");
        let kept = match std::fs::read_to_string(&path) {
            Ok(text) if self.state.iteration > 0 => {
                let up_to_now = |line: &&str| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v["iteration"].as_u64())
                        .is_some_and(|i| i as usize <= self.state.iteration)
                };
                text.lines()
                    .filter(up_to_now)
                    .map(|line| format!("{line}\n"))
                    .collect()
            }
            _ => String::new(),
        };
        write_atomically(&path, kept.as_bytes()).map_err(|e| e.to_string())
    }

    fn append_metrics(&self, line: &MetricsLine) -> Result<(), String> {
        let path = self.config.out.join("metrics.jsonl");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        writeln!(
            file,
            "{}",
            serde_json::to_string(line).expect("metrics serialise")
        )
        .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Tensors of the resumable state: w̃, θ̃, the learned rates and their optimisers' moments,
    /// by name.
    fn resume_tensors(&self) -> Vec<(String, Tensor)> {
        let learner = &self.learner;
        let mut named: Vec<(String, Tensor)> = learner
            .params
            .iter()
            .map(|(n, t)| (format!("w/{n}"), t.shallow_clone()))
            .collect();
        let mut groups: Vec<OptimiserGroup> = vec![("adam_w", &learner.adam_w, Vec::new())];
        if let (Some(a), Some(adam)) = (&learner.alphas, &learner.adam_theta) {
            groups.push((
                "adam_theta",
                adam,
                vec![("theta/normal", &a.normal), ("theta/reduce", &a.reduce)],
            ));
        }
        if let (Some(r), Some(adam)) = (&learner.rates, &learner.adam_rates) {
            groups.push((
                "adam_rates",
                adam,
                vec![("rates/w", &r.w), ("rates/theta", &r.theta)],
            ));
        }
        for (prefix, adam, tensors) in groups {
            for (i, (m, v)) in adam.m.iter().zip(&adam.v).enumerate() {
                named.push((format!("{prefix}/m/{i}"), m.shallow_clone()));
                named.push((format!("{prefix}/v/{i}"), v.shallow_clone()));
            }
            named.extend(
                tensors
                    .into_iter()
                    .map(|(name, t)| (name.to_string(), t.detach())),
            );
        }
        named
    }

    fn save_resume_state(&mut self) -> Result<(), String> {
        let dir = resume_dir(&self.config.out);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        self.state.sampler = self.sampler.state();
        self.state.adam_w_steps = self.learner.adam_w.steps;
        self.state.adam_theta_steps = self.learner.adam_theta.as_ref().map(|a| a.steps);
        self.state.adam_rates_steps = self.learner.adam_rates.as_ref().map(|a| a.steps);
        let bytes = safetensors_bytes(&self.resume_tensors())?;
        let previous = std::mem::replace(
            &mut self.state.tensors,
            format!("state-{}.safetensors", self.state.iteration),
        );
        self.state.tensors_sha256 = sha256_hex(&bytes);
        write_atomically(&dir.join(&self.state.tensors), &bytes).map_err(|e| e.to_string())?;
        let json = serde_json::to_vec_pretty(&self.state).expect("state serialises");
        write_atomically(&dir.join("state.json"), &json).map_err(|e| e.to_string())?;
        if !previous.is_empty() && previous != self.state.tensors {
            // Unreferenced only now; a leftover is harmless, so a failure to remove it is too.
            let _ = std::fs::remove_file(dir.join(previous));
        }
        Ok(())
    }

    /// Restores the saved run after checking that it is this run (the same settings), that its
    /// tensors are the file `state.json` describes (the hash), and that each has the shape this run's
    /// own tensor has.
    fn load_resume_state(&mut self) -> Result<(), String> {
        let dir = resume_dir(&self.config.out);
        let json_path = dir.join("state.json");
        let bytes =
            std::fs::read(&json_path).map_err(|e| format!("{}: {e}", json_path.display()))?;
        let saved: ResumeState =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", json_path.display()))?;
        let differences = self.state.run.differences(&saved.run);
        if !differences.is_empty() {
            return Err(format!("{}: --resume continues a run with other settings ({}); use that run's settings, or a new --out", json_path.display(), differences.join("; ")));
        }
        let path = dir.join(&saved.tensors);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if sha256_hex(&bytes) != saved.tensors_sha256 {
            return Err(format!("{}: not the file {} describes (its sha256 differs): the resume state is damaged; start a new run", path.display(), json_path.display()));
        }
        let named: std::collections::HashMap<String, Tensor> =
            tensors_of_safetensors(&bytes, self.config.device)
                .map_err(|m| format!("{}: {m}", path.display()))?
                .into_iter()
                .collect();
        let take = |name: &str, like: &Tensor| match named.get(name) {
            Some(t) if t.size() == like.size() => Ok(t.shallow_clone()),
            Some(t) => Err(format!(
                "{}: {name} has shape {:?}, this run's {:?}",
                path.display(),
                t.size(),
                like.size()
            )),
            None => Err(format!("{}: lacks {name}", path.display())),
        };
        let learner = &mut self.learner;
        learner.params = ParamSet::from_pairs(
            learner
                .params
                .iter()
                .map(|(n, t)| Ok((n.clone(), take(&format!("w/{n}"), t)?)))
                .collect::<Result<Vec<_>, String>>()?,
        );
        let restore = |adam: &mut Adam, prefix: &str, steps: i64| -> Result<(), String> {
            for i in 0..adam.m.len() {
                adam.m[i] = take(&format!("{prefix}/m/{i}"), &adam.m[i])?;
                adam.v[i] = take(&format!("{prefix}/v/{i}"), &adam.v[i])?;
            }
            adam.steps = steps;
            Ok(())
        };
        restore(&mut learner.adam_w, "adam_w", saved.adam_w_steps)?;
        if let (Some(adam), Some(alphas)) = (learner.adam_theta.as_mut(), learner.alphas.as_ref()) {
            restore(adam, "adam_theta", saved.adam_theta_steps.unwrap_or(0))?;
            learner.alphas = Some(Alphas {
                normal: take("theta/normal", &alphas.normal)?,
                reduce: take("theta/reduce", &alphas.reduce)?,
            });
        }
        if let (Some(adam), Some(rates)) = (learner.adam_rates.as_mut(), learner.rates.as_ref()) {
            restore(adam, "adam_rates", saved.adam_rates_steps.unwrap_or(0))?;
            let (w, theta) = (
                take("rates/w", &rates.w)?,
                take("rates/theta", &rates.theta)?,
            );
            learner.rates = Some(LearnedRates {
                w: w.set_requires_grad(true),
                theta: theta.set_requires_grad(true),
            });
        }
        self.sampler = episodes(&self.config, self.train, self.config.seed)
            .map_err(|e| e.to_string())?
            .continued(&saved.sampler);
        self.state = saved;
        Ok(())
    }
}
