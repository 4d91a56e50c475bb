//! The model card (`models/<name>/README.md`), rendered from `model.json` so its numbers are
//! exactly the recorded ones: data, split, the command that produced it, and results with 95%
//! intervals, optionally beside a baseline model's.

use crate::metadata::{EvalResult, ModelMeta};
use std::fmt::Write;

fn results_table(out: &mut String, models: &[&ModelMeta]) {
    let _ = writeln!(out, "| model | split | task | predictions | BN | steps | tasks | accuracy (95% CI) |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for meta in models {
        let mut rows: Vec<&EvalResult> = meta.evaluation.iter().collect();
        rows.sort_by_key(|r| (r.split.clone(), r.way, r.shot, r.predict_with.clone(), format!("{:?}", r.bn)));
        for r in rows {
            let _ = writeln!(
                out,
                "| {} | {} | {}-way {}-shot | {} | {:?} | {} | {} | {:.2}% ± {:.2}% |",
                meta.name,
                r.split,
                r.way,
                r.shot,
                r.predict_with,
                r.bn,
                match r.finetune_steps {
                    0 => r.steps.to_string(),
                    finetune => format!("{} + {finetune} fine-tuning", r.steps),
                },
                r.tasks,
                r.accuracy * 100.0,
                r.ci95 * 100.0
            );
        }
    }
}

/// Renders the card; `notes` is free text appended at the end (hardware, what more training adds).
pub fn render(meta: &ModelMeta, baselines: &[&ModelMeta], notes: &str) -> String {
    let mut out = format!("# {}\n\n", meta.name);
    let kind = format!("{:?}", meta.kind).to_lowercase();
    let _ = writeln!(out, "A `{kind}` meta-checkpoint for tnas: head `{:?}`, input {}×{}×{} (invert: {}).\n", meta.head, meta.input.channels, meta.input.size, meta.input.size, meta.input.invert);
    if let Some(space) = &meta.search_space {
        let _ = writeln!(out, "Search space: init_channels {}, layers {}, steps {}, multiplier {}, stem_multiplier {}, stem_pools {}.\n", space.init_channels, space.layers, space.steps, space.multiplier, space.stem_multiplier, space.stem_pools);
    }
    let a = meta.adaptation;
    let _ = writeln!(out, "Adaptation defaults: {} steps, lr_w {}, lr_theta {}, bn {:?}.\n", a.steps, a.lr_w, a.lr_theta, a.bn);
    if let Some(t) = &meta.training {
        let _ = writeln!(out, "## Training\n");
        let _ = writeln!(out, "- algorithm: `{}`; episodes {}-way {}-shot, {} queries per class", t.algorithm, t.way, t.shot, t.query);
        let _ = writeln!(out, "- data: {}", t.data);
        let _ = writeln!(out, "- split by group (Omniglot alphabet, or class) — train: {}; validation: {}; test: {}", t.split.train.join(", "), t.split.validation.join(", "), t.split.test.join(", "));
        let _ = writeln!(out, "- iterations at this checkpoint (best validation): {}; wall time {:.1} h; seed {}", t.iterations, t.wall_time_s / 3600.0, t.seed);
        let _ = writeln!(out, "\nCommand:\n\n```sh\n{}\n```\n", t.command);
    }
    let _ = writeln!(out, "## Results\n");
    let mut models = vec![meta];
    models.extend_from_slice(baselines);
    results_table(&mut out, &models);
    if !notes.is_empty() {
        let _ = writeln!(out, "\n## Notes\n\n{notes}");
    }
    let _ = writeln!(out, "\nweights: `model.safetensors`, sha256 `{}`", meta.sha256);
    out
}
