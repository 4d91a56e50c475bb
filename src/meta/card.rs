//! The model card (`models/<name>/README.md`), rendered from `model.json` so its numbers are
//! exactly the recorded ones: data, split, the command that produced it, and results with 95%
//! intervals, optionally beside a baseline model's.

use crate::model::checkpoint::{write_atomically, CheckpointError};
use crate::model::metadata::{EvalResult, ModelMeta};
use std::fmt::Write;
use std::path::Path;

fn results_table(out: &mut String, models: &[&ModelMeta]) {
    let _ = writeln!(
        out,
        "| model | split | task | predictions | BN | steps | tasks | accuracy (95% CI) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for meta in models {
        let mut rows: Vec<&EvalResult> = meta.evaluation.iter().collect();
        rows.sort_by_key(|r| {
            (
                r.split.clone(),
                r.way,
                r.shot,
                r.within_groups.clone(),
                r.predict_with.clone(),
                format!("{:?}", r.bn),
                r.steps,
                r.finetune_steps,
                r.views,
                r.seed,
                r.query,
            )
        });
        for r in rows {
            let _ = writeln!(
                out,
                "| {} | {} | {}-way {}-shot{}{} | {} | {:?} | {} | {} | {:.2}% ± {:.2}% |",
                meta.name,
                r.split,
                r.way,
                r.shot,
                match r.within_groups.as_slice() {
                    [] => String::new(),
                    groups => format!(" within {}", groups.join(" or ")),
                },
                // Tasks other than the usual draw (seed 0) say so, beside the same setting's row.
                match r.seed {
                    Some(seed) if seed != 0 => format!(", seed {seed}"),
                    _ => String::new(),
                },
                r.predict_with,
                r.bn,
                steps_cell(r),
                r.tasks,
                r.accuracy * 100.0,
                r.ci95 * 100.0
            );
        }
    }
}

/// A results row's steps: `5`, `5 + 3 fine-tuning`, `5, 9 views`.
fn steps_cell(r: &EvalResult) -> String {
    let mut cell = r.steps.to_string();
    if r.finetune_steps > 0 {
        let _ = write!(cell, " + {} fine-tuning", r.finetune_steps);
    }
    if r.views > 1 {
        let _ = write!(cell, ", {} views", r.views);
    }
    cell
}

/// The note of the card a training run writes beside each checkpoint it saves; a card without it was
/// written with `tnas-train card` (curated notes, baselines) and a run leaves it alone.
const RUN_CARD_NOTE: &str = "Written by `tnas-train meta-train` with this checkpoint; `tnas-train card --model <dir> --notes <file>` replaces it with a card that has notes and baselines.";

/// Writes `dir/README.md` for a checkpoint a training run just saved, unless the folder holds a
/// card written with `tnas-train card`.
pub fn write_run_card(dir: &Path, meta: &ModelMeta) -> Result<(), CheckpointError> {
    let path = dir.join("README.md");
    let curated = match std::fs::read_to_string(&path) {
        Ok(text) => !text.contains(RUN_CARD_NOTE),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(source) => return Err(CheckpointError::Io { path, source }),
    };
    if curated {
        return Ok(());
    }
    write_atomically(&path, render(meta, &[], RUN_CARD_NOTE).as_bytes())
}

/// Renders the card; `notes` is free text appended at the end (hardware, what more training adds).
pub fn render(meta: &ModelMeta, baselines: &[&ModelMeta], notes: &str) -> String {
    let mut out = format!("# {}\n\n", meta.name);
    let kind = format!("{:?}", meta.kind).to_lowercase();
    let _ = writeln!(
        out,
        "A `{kind}` meta-checkpoint for tnas: head `{:?}`, input {}×{}×{} (invert: {}).\n",
        meta.head, meta.input.channels, meta.input.size, meta.input.size, meta.input.invert
    );
    if let Some(space) = &meta.search_space {
        let _ = writeln!(out, "Search space: init_channels {}, layers {}, steps {}, multiplier {}, stem_multiplier {}, stem_pools {}.\n", space.init_channels, space.layers, space.steps, space.multiplier, space.stem_multiplier, space.stem_pools);
    }
    let a = meta.adaptation;
    let _ = writeln!(
        out,
        "Adaptation defaults: {} steps, lr_w {}, lr_theta {}, bn {:?}{}.\n",
        a.steps,
        a.lr_w,
        a.lr_theta,
        a.bn,
        match a.views {
            1 => String::new(),
            views => format!(", {views} test-time views"),
        }
    );
    if let Some(t) = &meta.training {
        let validated = !t.split.validation.is_empty();
        let _ = writeln!(out, "## Training\n");
        let _ = writeln!(
            out,
            "- algorithm: `{}`; episodes {}-way {}-shot, {} queries per class{}",
            t.algorithm,
            t.way,
            t.shot,
            t.query,
            match (t.within_group, t.rotation_groups) {
                (true, false) => ", all classes of an episode from one group (alphabet)",
                (true, true) => {
                    ", all classes of an episode from one group (alphabet, in one orientation)"
                }
                (false, _) => "",
            }
        );
        let _ = writeln!(out, "- data: {}", t.data);
        if let Some(a) = &t.augmentation {
            let _ = writeln!(
                out,
                "- augmentation of training images: shifts up to {} px, scales 1 ± {}, shears up to {}",
                a.shift_px, a.scale, a.shear
            );
        }
        let _ = writeln!(
            out,
            "- split by group (Omniglot alphabet, or class) — train: {}; validation: {}; test: {}",
            t.split.train.join(", "),
            match validated {
                true => t.split.validation.join(", "),
                false => "none".to_string(),
            },
            t.split.test.join(", ")
        );
        let _ = writeln!(
            out,
            "- iterations at this checkpoint ({}): {}; wall time {:.1} h; seed {}",
            match validated {
                true => "best validation",
                false => "its latest save, no validation split",
            },
            t.iterations,
            t.wall_time_s / 3600.0,
            t.seed
        );
        let _ = writeln!(out, "\nCommand:\n\n```sh\n{}\n```\n", t.command);
    }
    let _ = writeln!(out, "## Results\n");
    let mut models = vec![meta];
    models.extend_from_slice(baselines);
    results_table(&mut out, &models);
    if !notes.is_empty() {
        let _ = writeln!(out, "\n## Notes\n\n{notes}");
    }
    let _ = writeln!(
        out,
        "\nweights: `model.safetensors`, sha256 `{}`",
        meta.sha256
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_writes_and_rewrites_its_own_card_but_never_a_curated_one() {
        let shipped = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/omniglot-tnas/model.json"
        ))
        .unwrap();
        let mut meta: ModelMeta = serde_json::from_slice(&shipped).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let card = || std::fs::read_to_string(dir.path().join("README.md")).unwrap();
        write_run_card(dir.path(), &meta).unwrap();
        assert!(
            card().contains(RUN_CARD_NOTE)
                && card().contains("iterations at this checkpoint (best validation): 2000"),
            "{}",
            card()
        );
        meta.training.as_mut().unwrap().iterations = 2100;
        write_run_card(dir.path(), &meta).unwrap();
        assert!(
            card().contains("(best validation): 2100"),
            "a run's own card follows its checkpoint"
        );
        std::fs::write(dir.path().join("README.md"), "# curated\n").unwrap();
        write_run_card(dir.path(), &meta).unwrap();
        assert_eq!(card(), "# curated\n");
    }
}
