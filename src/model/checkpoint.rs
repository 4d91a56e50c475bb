//! Meta-checkpoints on disk (docs/MODEL_FORMAT.md): `model.safetensors` (w̃ and θ̃, float32) and `model.json`
//! (metadata with the weights' sha256).
//!
//! A save is a short list of [`SaveStep`]s, each atomic (a file written to a temp file, fsynced
//! and renamed; or a rename), after each of which the directory holds a checkpoint that loads,
//! however many saves in a row are cut short. Temp files that a crash leaves behind are removed at
//! the next start ([`remove_interrupted_temp_files`]). Loading verifies the hash, then every
//! tensor's name and shape against the network's spec.

use crate::model::metadata::{HeadSpec, ModelKind, ModelMeta};
use crate::nn::conv4::Conv4;
use crate::nn::derived::DerivedNetwork;
use crate::nn::head::{classifier_specs, logit_scale_specs};
use crate::nn::learned_rates::{LearnedRates, RATES_THETA, RATES_W};
use crate::nn::network::Network;
use crate::nn::params::{ParamSet, ParamSpec};
use crate::nn::supernet::{Alphas, Supernet};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub const WEIGHTS_FILE: &str = "model.safetensors";
/// New weights on their way to [`WEIGHTS_FILE`] while [`Checkpoint::save`] runs.
pub const PENDING_WEIGHTS_FILE: &str = "model.safetensors.new";
/// How the temp files of [`write_atomically`] begin, so that a later start finds those a crash
/// left behind.
pub const TEMP_PREFIX: &str = ".tnas-tmp-";
pub const META_FILE: &str = "model.json";
/// Tensor names of θ̃ inside `model.safetensors`.
pub const ALPHAS_NORMAL: &str = "alphas_normal";
pub const ALPHAS_REDUCE: &str = "alphas_reduce";

/// Why a checkpoint could not be read or written. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: file not found; a model directory needs {META_FILE} and {WEIGHTS_FILE}")]
    Missing { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: sha256 is {actual} but model.json records {expected}; the file is truncated, edited or from another model — restore it or re-export the checkpoint")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A loaded (or about to be saved) checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    pub meta: ModelMeta,
    /// w̃ (with the classifier when the head is fixed).
    pub params: ParamSet,
    /// θ̃, for supernet checkpoints.
    pub alphas: Option<Alphas>,
    /// The meta-learned inner rates, for a model with `adaptation.learned_rates`.
    pub rates: Option<LearnedRates>,
}

/// The network a `model.json` describes (assumes [`ModelMeta::validate`] passed).
pub fn network_of(meta: &ModelMeta) -> Result<Network, String> {
    Ok(match (meta.kind, meta.search_space, &meta.genotype) {
        (ModelKind::Supernet, Some(space), _) => {
            Network::Supernet(Supernet::relaxed(space, meta.relaxation))
        }
        (ModelKind::Genotype, Some(space), Some(g)) => {
            Network::Derived(DerivedNetwork::new(space, g.clone())?)
        }
        (ModelKind::Conv4, _, _) => Network::Conv4(Conv4 {
            in_channels: meta.input.channels,
            image_size: meta.input.size,
        }),
        _ => return Err("search_space (and genotype for kind genotype) required".into()),
    })
}

/// The number of weight tensors a task adapts: the meta-weights, and a proto head's classifier
/// (weight and bias), which tasks build and the checkpoint does not hold.
pub fn task_tensors(params: &ParamSet, head: HeadSpec) -> usize {
    params.len()
        + if matches!(head, HeadSpec::Proto { .. }) {
            2
        } else {
            0
        }
}

/// Every weight the checkpoint must hold: the body, plus the classifier for a fixed head.
pub fn param_specs(network: &Network, head: HeadSpec) -> Vec<ParamSpec> {
    let mut specs = network.body_specs();
    match head {
        HeadSpec::Fixed { n_way } => specs.extend(classifier_specs(network.feature_dim(), n_way)),
        HeadSpec::Proto {
            learned_scale: true,
            ..
        } => specs.extend(logit_scale_specs()),
        HeadSpec::Proto {
            learned_scale: false,
            ..
        } => {}
    }
    specs
}

impl Checkpoint {
    /// The meta-genotype: the genotype of the unadapted θ̃ (DARTS rule); `None` for a model
    /// without θ.
    pub fn meta_genotype(&self) -> Option<crate::nn::genotype::Genotype> {
        let (Network::Supernet(net), Some(alphas)) = (self.network(), &self.alphas) else {
            return None;
        };
        let (normal, reduce) = alphas.mixing_rows();
        Some(crate::nn::genotype::Genotype::decode(
            &net.space, &normal, &reduce,
        ))
    }

    pub fn network(&self) -> Network {
        network_of(&self.meta).expect("validated when loaded or built")
    }

    /// Writes both files into `dir` (created if needed), filling in `meta.sha256`: the steps of
    /// [`Checkpoint::save_steps`], one after the other.
    pub fn save(&mut self, dir: &Path) -> Result<(), CheckpointError> {
        self.save_steps(dir)?.iter().try_for_each(SaveStep::apply)
    }

    /// What [`Checkpoint::save`] does to `dir`, in order: the new weights go to a pending file,
    /// then `model.json` with their hash, then the weights move into place. Cut short before
    /// `model.json`, the old checkpoint stands; after it, [`Checkpoint::load`] takes the pending
    /// weights that `model.json` describes. When an earlier save was cut short there, its pending
    /// weights move into place first: writing new ones over them would leave `model.json`
    /// describing no file, should this save be cut short too.
    pub fn save_steps(&mut self, dir: &Path) -> Result<Vec<SaveStep>, CheckpointError> {
        std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let (weights, pending) = (dir.join(WEIGHTS_FILE), dir.join(PENDING_WEIGHTS_FILE));
        let mut steps = Vec::new();
        if pending_is_described(dir) {
            steps.push(SaveStep::Rename {
                from: pending.clone(),
                to: weights.clone(),
            });
        }
        let bytes = self
            .weights_bytes()
            .map_err(|message| CheckpointError::Invalid {
                path: weights.clone(),
                message,
            })?;
        self.meta.sha256 = sha256_hex(&bytes);
        let json = serde_json::to_vec_pretty(&self.meta).expect("metadata serialises");
        steps.push(SaveStep::Write {
            path: pending.clone(),
            bytes,
        });
        steps.push(SaveStep::Write {
            path: dir.join(META_FILE),
            bytes: json,
        });
        steps.push(SaveStep::Rename {
            from: pending,
            to: weights,
        });
        Ok(steps)
    }

    /// The bytes of this checkpoint's `model.safetensors`.
    pub fn weights_bytes(&self) -> Result<Vec<u8>, String> {
        let mut named: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        if let Some(a) = &self.alphas {
            named.push((ALPHAS_NORMAL.into(), a.normal.shallow_clone()));
            named.push((ALPHAS_REDUCE.into(), a.reduce.shallow_clone()));
        }
        if let Some(r) = &self.rates {
            named.push((RATES_W.into(), r.w.shallow_clone()));
            named.push((RATES_THETA.into(), r.theta.shallow_clone()));
        }
        safetensors_bytes(&named)
    }

    /// Reads and verifies `dir/model.json` and `dir/model.safetensors`, placing tensors on `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Checkpoint, CheckpointError> {
        let meta_path = dir.join(META_FILE);
        let meta: ModelMeta =
            serde_json::from_slice(&read(&meta_path)?).map_err(|source| CheckpointError::Json {
                path: meta_path.clone(),
                source,
            })?;
        let invalid = |path: &Path, message: String| CheckpointError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        meta.validate().map_err(|m| invalid(&meta_path, m))?;
        let (weights_path, bytes) = described_weights(dir, &meta.sha256)?;
        Checkpoint::from_bytes(meta, &bytes, device).map_err(|m| invalid(&weights_path, m))
    }

    /// The checkpoint `meta` (already validated) describes, from the bytes of its
    /// `model.safetensors` (whose hash the caller has checked, or produced), on `device`: every
    /// tensor checked against the network's spec.
    pub fn from_bytes(meta: ModelMeta, bytes: &[u8], device: Device) -> Result<Checkpoint, String> {
        let tensors = tensors_of_safetensors(bytes, device)?;
        let network = network_of(&meta)?;
        let mut params = ParamSet::from_pairs(Vec::new());
        let (mut alphas, mut rates) = ((None, None), (None, None));
        for (name, tensor) in tensors {
            match name.as_str() {
                ALPHAS_NORMAL => alphas.0 = Some(tensor),
                ALPHAS_REDUCE => alphas.1 = Some(tensor),
                RATES_W => rates.0 = Some(tensor),
                RATES_THETA => rates.1 = Some(tensor),
                _ => params.insert(name, tensor),
            }
        }
        let specs = param_specs(&network, meta.head);
        let params = params.ordered_like(&specs)?;
        let alphas = match (network.has_alphas(), alphas) {
            (true, (Some(normal), Some(reduce))) => Some(Alphas { normal, reduce }),
            (true, _) => {
                return Err(format!(
                    "a supernet checkpoint needs {ALPHAS_NORMAL} and {ALPHAS_REDUCE}"
                ))
            }
            (false, _) => None,
        };
        if let (Some(a), Network::Supernet(net)) = (&alphas, &network) {
            let expected = vec![net.space.num_edges() as i64, 8];
            for (name, t) in [(ALPHAS_NORMAL, &a.normal), (ALPHAS_REDUCE, &a.reduce)] {
                if t.size() != expected {
                    return Err(format!(
                        "{name} has shape {:?}, expected {expected:?}",
                        t.size()
                    ));
                }
            }
        }
        let rates = match (meta.adaptation.learned_rates, rates) {
            (false, (None, None)) => None,
            (true, (Some(w), Some(theta))) => {
                let rates = LearnedRates { w, theta };
                rates.check(task_tensors(&params, meta.head))?;
                Some(rates)
            }
            (true, _) => return Err(format!("adaptation.learned_rates needs {RATES_W} and {RATES_THETA}")),
            (false, _) => return Err(format!("{RATES_W}/{RATES_THETA} present but model.json's adaptation.learned_rates is not set")),
        };
        Ok(Checkpoint {
            meta,
            params,
            alphas,
            rates,
        })
    }
}

/// One step of a save, atomic on a POSIX file system.
#[derive(Debug)]
pub enum SaveStep {
    /// `bytes` written to `path` through a temp file ([`write_atomically`]).
    Write {
        path: PathBuf,
        bytes: Vec<u8>,
    },
    Rename {
        from: PathBuf,
        to: PathBuf,
    },
}

impl SaveStep {
    pub fn apply(&self) -> Result<(), CheckpointError> {
        match self {
            SaveStep::Write { path, bytes } => write_atomically(path, bytes),
            SaveStep::Rename { from, to } => std::fs::rename(from, to)
                .and_then(|()| sync_parent(to))
                .map_err(|source| CheckpointError::Io {
                    path: to.clone(),
                    source,
                }),
        }
    }
}

/// Makes a rename into `path`'s directory durable: without it, a power cut may lose the renames
/// or keep a later one without an earlier, so the save order would not hold on disk.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// Whether `dir` holds pending weights that its `model.json` describes: a save was cut short
/// between writing `model.json` and moving the weights into place.
fn pending_is_described(dir: &Path) -> bool {
    let described = std::fs::read(dir.join(META_FILE))
        .ok()
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok());
    let pending = std::fs::read(dir.join(PENDING_WEIGHTS_FILE)).ok();
    match (described, pending) {
        (Some(meta), Some(bytes)) => meta["sha256"].as_str() == Some(sha256_hex(&bytes).as_str()),
        _ => false,
    }
}

/// The weights file whose sha256 is `sha256`, with its bytes: `model.safetensors`, or the pending
/// file a save cut short after writing `model.json` left ([`Checkpoint::save`]).
fn described_weights(dir: &Path, sha256: &str) -> Result<(PathBuf, Vec<u8>), CheckpointError> {
    let path = dir.join(WEIGHTS_FILE);
    let found = read(&path);
    if found
        .as_ref()
        .is_ok_and(|bytes| sha256_hex(bytes) == sha256)
    {
        return Ok((path, found?));
    }
    let pending = dir.join(PENDING_WEIGHTS_FILE);
    if let Ok(bytes) = std::fs::read(&pending) {
        if sha256_hex(&bytes) == sha256 {
            return Ok((pending, bytes));
        }
    }
    let actual = sha256_hex(&found?);
    Err(CheckpointError::HashMismatch {
        path,
        expected: sha256.to_string(),
        actual,
    })
}

fn read(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => CheckpointError::Missing {
            path: path.to_path_buf(),
        },
        _ => CheckpointError::Io {
            path: path.to_path_buf(),
            source,
        },
    })
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Writes `bytes` to a temp file beside `path`, fsyncs it, and renames it over `path`. The temp
/// file is locked while it exists, so that [`remove_interrupted_temp_files`] leaves it alone.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir)
        .map_err(io)?;
    tmp.as_file().lock().map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    // Temp files are created 0600; a model file is meant to be readable like any other.
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    sync_parent(path).map_err(io)
}

/// Removes the temp files in `dir` that interrupted writes left behind: those whose writer no longer
/// holds their lock (a process's locks go with it). A writer still at work keeps its own. Returns
/// how many were removed; a directory that cannot be read or written is left as it is.
pub fn remove_interrupted_temp_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let abandoned =
        |path: &Path| std::fs::File::open(path).is_ok_and(|file| file.try_lock().is_ok());
    let removed = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(TEMP_PREFIX))
        })
        .filter(|path| abandoned(path) && std::fs::remove_file(path).is_ok())
        .count();
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "removed temp files that interrupted saves left behind");
    }
    removed
}

/// `named` tensors as the bytes of a float32 safetensors file.
pub fn safetensors_bytes(named: &[(String, Tensor)]) -> Result<Vec<u8>, String> {
    let floats: Vec<(&str, FloatBytes)> = named
        .iter()
        .map(|(n, t)| (n.as_str(), float_bytes(t)))
        .collect();
    let views = floats
        .iter()
        .map(|(n, (shape, data))| TensorView::new(Dtype::F32, shape.clone(), data).map(|v| (*n, v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    safetensors::serialize(views, &None).map_err(|e| e.to_string())
}

/// The tensors of a float32 safetensors file's `bytes`, by name, on `device`.
pub fn tensors_of_safetensors(
    bytes: &[u8],
    device: Device,
) -> Result<Vec<(String, Tensor)>, String> {
    let tensors =
        SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            tensor_from_view(&view, device)
                .map(|t| (name.clone(), t))
                .map_err(|m| format!("{name}: {m}"))
        })
        .collect()
}

/// Shape and little-endian float32 bytes of a tensor.
type FloatBytes = (Vec<usize>, Vec<u8>);

fn float_bytes(t: &Tensor) -> FloatBytes {
    let t = t
        .detach()
        .to_device(Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let shape = t.size().iter().map(|&d| d as usize).collect();
    let values: Vec<f32> = Vec::try_from(t.flatten(0, -1)).expect("float tensor converts");
    (shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

fn tensor_from_view(view: &TensorView, device: Device) -> Result<Tensor, String> {
    if view.dtype() != Dtype::F32 {
        return Err(format!("dtype {:?}, expected F32", view.dtype()));
    }
    let values: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::from_slice(&values)
        .view(shape.as_slice())
        .to_device(device))
}
