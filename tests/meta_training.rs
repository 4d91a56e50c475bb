//! `tnas-train` end to end on the real Omniglot zips: every algorithm writes a loadable checkpoint
//! (for a fixed genotype too), a short run learns, resume continues the same run exactly (and only
//! the same run, from a whole state), and `eval` reports an interval on classes the model never
//! trained on.

mod common;

use clap::Parser;
use common::omniglot_zips;
use serde_json::Value;
use std::sync::atomic::AtomicBool;
use tch::Device;
use tnas::meta::command::{eval, meta_train, EvalArgs, MetaTrainArgs};
use tnas::model::checkpoint::Checkpoint;

#[derive(Parser)]
struct Train {
    #[command(flatten)]
    args: MetaTrainArgs,
}

#[derive(Parser)]
struct Eval {
    #[command(flatten)]
    args: EvalArgs,
}

fn zips() -> Vec<String> {
    omniglot_zips()
        .iter()
        .map(|p| p.to_str().unwrap().to_string())
        .collect()
}

/// A small, fast configuration: 3-way 1-shot, C = 4 (one inner step unless `extra` says otherwise).
fn train_args(out: &std::path::Path, extra: &[&str]) -> MetaTrainArgs {
    let mut argv: Vec<String> = vec!["t".into(), "--data".into()];
    argv.extend(zips());
    for a in [
        "--way",
        "3",
        "--shot",
        "1",
        "--query",
        "2",
        "--meta-batch",
        "2",
        "--init-channels",
        "4",
        "--validation-tasks",
        "4",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--out",
        out.to_str().unwrap(),
    ] {
        argv.push(a.into());
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    if !extra.contains(&"--inner-steps") {
        argv.extend(["--inner-steps".to_string(), "1".to_string()]);
    }
    Train::parse_from(argv).args
}

fn metrics(out: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A short run into `out` that validates every 2 iterations and saves its resumable state after
/// every one.
fn run(out: &std::path::Path, extra: &[&str]) -> Result<(), String> {
    let common = ["--validate-every", "2", "--save-every", "1"];
    meta_train(
        &train_args(out, &[&common[..], extra].concat()),
        "t".into(),
        &AtomicBool::new(false),
    )
}

/// Each iteration's query loss.
fn loss(dir: &tempfile::TempDir) -> Vec<Value> {
    metrics(dir.path())
        .iter()
        .map(|l| l["query_loss"].clone())
        .collect()
}

#[test]
fn every_algorithm_writes_a_loadable_checkpoint() {
    for algo in ["tnas", "tnas-2nd", "maml", "reptile", "base"] {
        let dir = tempfile::tempdir().unwrap();
        let args = train_args(
            dir.path(),
            &["--algo", algo, "--iterations", "2", "--validate-every", "2"],
        );
        meta_train(&args, format!("test {algo}"), &AtomicBool::new(false)).unwrap();
        let checkpoint =
            Checkpoint::load(dir.path(), Device::Cpu).unwrap_or_else(|e| panic!("{algo}: {e}"));
        assert_eq!(checkpoint.meta.training.as_ref().unwrap().algorithm, algo);
        assert_eq!(checkpoint.alphas.is_some(), algo != "maml", "{algo}");
        assert_eq!(metrics(dir.path()).len(), 2, "{algo}");
        let card = std::fs::read_to_string(dir.path().join("README.md")).unwrap();
        assert!(
            card.contains(&format!("algorithm: `{algo}`")) && card.contains("accuracy (95% CI)"),
            "{algo}: {card}"
        );
    }
}

/// Auto-MAML: a supernet's meta-genotype meta-trained as a fixed network, with second-order MAML
/// and with T-NAS++'s learned rates (whose θ rates the fixed network never uses, so they stay put).
#[test]
fn a_fixed_genotype_meta_trains_with_maml_and_tnas_plus_plus() {
    let supernet = tempfile::tempdir().unwrap();
    run(supernet.path(), &["--algo", "tnas", "--iterations", "1"]).unwrap();
    let genotype = Checkpoint::load(supernet.path(), Device::Cpu)
        .unwrap()
        .meta_genotype()
        .unwrap();
    for algo in ["maml", "tnas++"] {
        let dir = tempfile::tempdir().unwrap();
        let from = supernet.path().to_str().unwrap();
        run(
            dir.path(),
            &[
                "--algo",
                algo,
                "--genotype",
                from,
                "--lr-theta",
                "7",
                "--iterations",
                "2",
            ],
        )
        .unwrap_or_else(|e| panic!("{algo}: {e}"));
        let checkpoint = Checkpoint::load(dir.path(), Device::Cpu).unwrap();
        assert_eq!(checkpoint.meta.genotype.as_ref(), Some(&genotype), "{algo}");
        assert!(checkpoint.alphas.is_none(), "{algo}");
        assert!(
            metrics(dir.path())
                .iter()
                .all(|m| m["query_loss"].as_f64().unwrap().is_finite()),
            "{algo}"
        );
        if let Some(rates) = &checkpoint.rates {
            let set = &checkpoint.meta.adaptation;
            assert!(
                rates.theta.eq(7.0).all().int64_value(&[]) == 1,
                "{algo}: θ rates moved: {}",
                rates.theta
            );
            assert!(
                rates.w.ne(set.lr_w).any().int64_value(&[]) == 1,
                "{algo}: w rates never learned"
            );
        }
        assert_eq!(checkpoint.rates.is_some(), algo == "tnas++");
    }
}

#[test]
fn resume_continues_the_same_run() {
    let straight = tempfile::tempdir().unwrap();
    meta_train(
        &train_args(
            straight.path(),
            &[
                "--iterations",
                "4",
                "--validate-every",
                "100",
                "--save-every",
                "2",
            ],
        ),
        "t".into(),
        &AtomicBool::new(false),
    )
    .unwrap();
    let resumed = tempfile::tempdir().unwrap();
    meta_train(
        &train_args(
            resumed.path(),
            &[
                "--iterations",
                "2",
                "--validate-every",
                "100",
                "--save-every",
                "2",
            ],
        ),
        "t".into(),
        &AtomicBool::new(false),
    )
    .unwrap();
    // As if the run had gone on past its last save before it was killed: that line goes.
    let log = resumed.path().join("metrics.jsonl");
    std::fs::write(
        &log,
        std::fs::read_to_string(&log).unwrap() + "{\"iteration\": 3, \"query_loss\": 0.0}\n",
    )
    .unwrap();
    let resume = |extra: &[&str]| {
        meta_train(
            &train_args(
                resumed.path(),
                &[
                    &[
                        "--iterations",
                        "4",
                        "--validate-every",
                        "100",
                        "--save-every",
                        "2",
                        "--resume",
                    ],
                    extra,
                ]
                .concat(),
            ),
            "t".into(),
            &AtomicBool::new(false),
        )
    };
    let refused = resume(&["--lr-w", "0.2"]).unwrap_err();
    assert!(refused.contains("lr_w: 0.2 (saved: 0.1)"), "{refused}");
    resume(&[]).unwrap();
    let (a, b) = (metrics(straight.path()), metrics(resumed.path()));
    assert_eq!(
        b.iter()
            .map(|l| l["iteration"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            x["query_loss"], y["query_loss"],
            "resumed run diverged at iteration {}",
            x["iteration"]
        );
    }
    // One tensors file, the one state.json names; a damaged one is refused, not half-loaded.
    let resume_dir = resumed.path().join("resume");
    let files: Vec<String> = std::fs::read_dir(&resume_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    assert_eq!(files, ["state-4.safetensors"]);
    let tensors = resume_dir.join(&files[0]);
    let mut bytes = std::fs::read(&tensors).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&tensors, bytes).unwrap();
    let refused = meta_train(
        &train_args(resumed.path(), &["--iterations", "6", "--resume"]),
        "t".into(),
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert!(refused.contains("sha256"), "{refused}");
    // A new run (no --resume) into the same folder starts a new metrics log.
    meta_train(
        &train_args(
            straight.path(),
            &["--iterations", "1", "--validate-every", "100"],
        ),
        "t".into(),
        &AtomicBool::new(false),
    )
    .unwrap();
    assert_eq!(metrics(straight.path()).len(), 1);
}

/// The default algorithm learns too: T-NAS's first-order updates of w̃ and θ̃ lower the query loss
/// of a small supernet within a few dozen meta-iterations (here about 3.2 → 1.2, accuracy 0.53 →
/// 0.70; the run is seeded and single-threaded, so it repeats).
#[test]
fn a_short_tnas_run_learns() {
    let dir = tempfile::tempdir().unwrap();
    let args = train_args(
        dir.path(),
        &[
            "--algo",
            "tnas",
            "--iterations",
            "30",
            "--validate-every",
            "30",
            "--inner-steps",
            "2",
            "--meta-lr-w",
            "0.003",
        ],
    );
    meta_train(&args, "t".into(), &AtomicBool::new(false)).unwrap();
    let lines = metrics(dir.path());
    let mean = |range: std::ops::Range<usize>, key: &str| {
        range
            .clone()
            .map(|i| lines[i][key].as_f64().unwrap())
            .sum::<f64>()
            / range.len() as f64
    };
    let (early_loss, late_loss) = (mean(0..10, "query_loss"), mean(20..30, "query_loss"));
    assert!(
        late_loss < 0.9 * early_loss,
        "query loss did not fall: {early_loss:.3} → {late_loss:.3}"
    );
    assert!(
        mean(20..30, "query_accuracy") > 0.55,
        "accuracy not above 3-way chance (0.33) by a margin"
    );
}

#[test]
fn a_short_run_learns_and_eval_reports_an_interval() {
    let dir = tempfile::tempdir().unwrap();
    let args = train_args(
        dir.path(),
        &[
            "--algo",
            "maml",
            "--iterations",
            "40",
            "--validate-every",
            "40",
            "--inner-steps",
            "3",
            "--lr-w",
            "0.4",
            "--meta-lr-w",
            "0.003",
        ],
    );
    meta_train(&args, "t".into(), &AtomicBool::new(false)).unwrap();
    let lines = metrics(dir.path());
    let mean = |range: std::ops::Range<usize>, key: &str| {
        range
            .clone()
            .map(|i| lines[i][key].as_f64().unwrap())
            .sum::<f64>()
            / range.len() as f64
    };
    let (early_loss, late_loss) = (mean(0..10, "query_loss"), mean(30..40, "query_loss"));
    assert!(
        late_loss < early_loss,
        "query loss did not fall: {early_loss:.3} → {late_loss:.3}"
    );
    assert!(
        mean(30..40, "query_accuracy") > 0.5,
        "accuracy not above 3-way chance (0.33) by a margin"
    );

    let mut argv: Vec<String> = vec!["e".into(), "--data".into()];
    argv.extend(zips());
    for a in [
        "--model",
        dir.path().to_str().unwrap(),
        "--way",
        "3",
        "--shot",
        "1",
        "--query",
        "3",
        "--tasks",
        "20",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--write",
    ] {
        argv.push(a.into());
    }
    let results = eval(&Eval::parse_from(argv.clone()).args).unwrap();
    assert_eq!(
        results.len(),
        2,
        "conv4 has supernet predictions in two BN modes"
    );
    for r in &results {
        assert!(r.accuracy > 0.4 && r.ci95 > 0.0 && r.ci95 < 0.3, "{r:?}");
        assert_eq!(r.tasks, 20);
    }
    // Rows record which tasks they measured: tasks from another seed stand beside them, the same
    // tasks measured again replace them.
    let rows = || {
        let meta = Checkpoint::load(dir.path(), Device::Cpu).unwrap().meta;
        let mut rows: Vec<(Option<usize>, Option<u64>)> = meta
            .evaluation
            .iter()
            .filter(|r| r.split == "test" && r.way == 3)
            .map(|r| (r.query, r.seed))
            .collect();
        rows.sort();
        rows
    };
    assert_eq!(rows(), vec![(Some(3), Some(0)); 2]);
    let mut reseeded = argv.clone();
    reseeded.extend(["--seed".to_string(), "1".to_string()]);
    eval(&Eval::parse_from(reseeded).args).unwrap();
    eval(&Eval::parse_from(argv.clone()).args).unwrap();
    assert_eq!(
        rows(),
        [vec![(Some(3), Some(0)); 2], vec![(Some(3), Some(1)); 2]].concat()
    );
    // No tasks is no evaluation: refused as the arguments are read.
    let no_tasks: Vec<String> = argv
        .iter()
        .map(|a| if a == "20" { "0".into() } else { a.clone() })
        .collect();
    assert!(Eval::try_parse_from(no_tasks).is_err(), "--tasks 0 parsed");
    // A fixed network has no architecture to derive: asking for one is an error, not silence.
    let mut derived = argv.clone();
    derived.extend(["--predict-with".to_string(), "derived".to_string()]);
    let refused = eval(&Eval::parse_from(derived).args).unwrap_err();
    assert!(refused.contains("--predict-with derived"), "{refused}");
    // Held-out groups that include an alphabet the model trained on are refused.
    argv.extend(["--test-groups".to_string(), "Latin,Greek".to_string()]);
    let refused = eval(&Eval::parse_from(argv).args).unwrap_err();
    assert!(
        refused.contains("Greek") && refused.contains("--test-groups Latin,Tagalog"),
        "{refused}"
    );
}

/// tnas++ learns one rate per inner step: a run without inner steps is refused before it starts.
#[test]
fn tnas_plus_plus_without_inner_steps_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let refused = run(dir.path(), &["--algo", "tnas++", "--inner-steps", "0"]).unwrap_err();
    assert!(refused.contains("--inner-steps 0"), "{refused}");
    assert!(!dir.path().join("model.json").exists());
}

/// A warm start (or a fixed genotype) from a model trained on an alphabet this run holds out is
/// refused, naming it: the new model's split would claim it held out. From a model trained without
/// it, the same run starts.
#[test]
fn starting_from_a_model_trained_on_a_held_out_alphabet_is_refused() {
    let (parent, child) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run(parent.path(), &["--iterations", "1"]).unwrap();
    let trained_on = Checkpoint::load(parent.path(), Device::Cpu)
        .unwrap()
        .meta
        .training
        .unwrap()
        .split
        .train;
    assert!(trained_on.contains(&"Greek".to_string()));
    let from = parent.path().to_str().unwrap();
    for flag in ["--init-from", "--genotype"] {
        let refused = run(
            child.path(),
            &[
                flag,
                from,
                "--validation-groups",
                "Greek",
                "--iterations",
                "1",
            ],
        )
        .unwrap_err();
        assert!(
            refused.contains(flag) && refused.contains("\"Greek\""),
            "{refused}"
        );
        assert!(!child.path().join("model.json").exists());
    }
    run(child.path(), &["--init-from", from, "--iterations", "1"]).unwrap();
}

/// Flags that would be silently ignored in a combination are refused before the run starts, each
/// with what to change: the recorded command must describe the run.
#[test]
fn flags_that_would_be_ignored_are_refused_up_front() {
    let cases: [(&[&str], &str); 6] = [
        (&["--hard-end"], "--relaxation annealed"),
        (&["--pairwise-inputs"], "--relaxation annealed"),
        (&["--temperature-end", "0.05"], "--relaxation annealed"),
        (
            &["--algo", "maml", "--relaxation", "annealed"],
            "maml trains a fixed network",
        ),
        (&["--head", "fixed", "--max-way", "10"], "--head proto"),
        (&["--head", "fixed", "--learned-scale"], "--head proto"),
    ];
    for (flags, fix) in cases {
        let dir = tempfile::tempdir().unwrap();
        let refused = run(dir.path(), &[flags, &["--iterations", "1"]].concat()).unwrap_err();
        assert!(refused.contains(fix), "{flags:?}: {refused}");
        assert!(!dir.path().join("model.json").exists(), "{flags:?}");
    }
}

/// `--augment-*` jitters the training images (the same run without it sees other losses), is
/// recorded in model.json, resumes with the same jitter, and refuses a resume with another one.
#[test]
fn augmentation_jitters_training_is_recorded_and_resumes_identically() {
    const JITTER: [&str; 6] = [
        "--augment-shift",
        "2",
        "--augment-scale",
        "0.1",
        "--augment-shear",
        "0.1",
    ];
    let (plain, jittered, resumed) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    run(plain.path(), &["--iterations", "2"]).unwrap();
    run(
        jittered.path(),
        &[&JITTER[..], &["--iterations", "2"]].concat(),
    )
    .unwrap();
    run(
        resumed.path(),
        &[&JITTER[..], &["--iterations", "1"]].concat(),
    )
    .unwrap();
    let other = run(
        resumed.path(),
        &["--augment-shift", "1", "--iterations", "2", "--resume"],
    )
    .unwrap_err();
    assert!(other.contains("augmentation"), "{other}");
    run(
        resumed.path(),
        &[&JITTER[..], &["--iterations", "2", "--resume"]].concat(),
    )
    .unwrap();

    assert_ne!(
        loss(&plain)[0],
        loss(&jittered)[0],
        "the jitter changed nothing"
    );
    assert_eq!(
        loss(&jittered),
        loss(&resumed),
        "a resumed run saw other images"
    );
    let recorded = Checkpoint::load(jittered.path(), Device::Cpu).unwrap();
    let augmentation = recorded.meta.training.unwrap().augmentation.unwrap();
    assert_eq!(
        (
            augmentation.shift_px,
            augmentation.scale,
            augmentation.shear
        ),
        (2.0, 0.1, 0.1)
    );
    assert!(Checkpoint::load(plain.path(), Device::Cpu)
        .unwrap()
        .meta
        .training
        .unwrap()
        .augmentation
        .is_none());
    let refused = run(
        plain.path(),
        &["--augment-scale", "1.5", "--iterations", "1"],
    )
    .unwrap_err();
    assert!(refused.contains("--augment-scale 1.5"), "{refused}");
}

/// `--within-group` trains on episodes whose classes share an alphabet (other tasks than a plain
/// run's), is recorded in model.json (its validation row names the alphabets its tasks were drawn
/// within), resumes with the same episodes, and refuses a resume without it.
#[test]
fn within_group_episodes_are_recorded_and_resume_identically() {
    let (plain, within, resumed) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    run(plain.path(), &["--iterations", "2"]).unwrap();
    run(within.path(), &["--within-group", "--iterations", "2"]).unwrap();
    run(resumed.path(), &["--within-group", "--iterations", "1"]).unwrap();
    let other = run(resumed.path(), &["--iterations", "2", "--resume"]).unwrap_err();
    assert!(other.contains("within_group"), "{other}");
    run(
        resumed.path(),
        &["--within-group", "--iterations", "2", "--resume"],
    )
    .unwrap();

    assert_ne!(loss(&plain)[0], loss(&within)[0], "the same episodes");
    assert_eq!(
        loss(&within),
        loss(&resumed),
        "a resumed run saw other tasks"
    );
    let training = |dir: &tempfile::TempDir| {
        Checkpoint::load(dir.path(), Device::Cpu)
            .unwrap()
            .meta
            .training
            .unwrap()
    };
    assert!(training(&within).within_group);
    assert!(!training(&plain).within_group);
    let validation_groups = |dir: &tempfile::TempDir| {
        let meta = Checkpoint::load(dir.path(), Device::Cpu).unwrap().meta;
        assert_eq!(meta.evaluation[0].split, "validation");
        meta.evaluation[0].within_groups.clone()
    };
    let validation = training(&within).split.validation;
    assert_eq!(validation_groups(&within), validation);
    assert!(validation_groups(&plain).is_empty());
    let json = std::fs::read_to_string(plain.path().join("model.json")).unwrap();
    assert!(
        !json.contains("within_group"),
        "old readers see no new field"
    );
}

/// `--no-validation` trains on the validation alphabet too, records an empty validation split,
/// keeps the latest checkpoint (not one picked by validation), resumes only with the flag, and
/// `eval` then refuses that alphabet as held out.
#[test]
fn no_validation_trains_on_the_validation_alphabet_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), &["--no-validation", "--iterations", "3"]).unwrap();

    let meta = Checkpoint::load(dir.path(), Device::Cpu).unwrap().meta;
    let training = meta.training.unwrap();
    assert_eq!(training.iterations, 3, "the end of the schedule");
    assert!(training.split.validation.is_empty());
    assert!(training.split.train.contains(&"Early_Aramaic".to_string()));
    assert!(meta.evaluation.is_empty(), "{:?}", meta.evaluation);
    assert!(metrics(dir.path())
        .iter()
        .all(|l| l["validation_accuracy"].is_null()));
    let card = std::fs::read_to_string(dir.path().join("README.md")).unwrap();
    assert!(
        card.contains("; validation: none; test:")
            && card.contains("(its latest save, no validation split): 3"),
        "{card}"
    );

    let without = run(dir.path(), &["--iterations", "4", "--resume"]).unwrap_err();
    assert!(without.contains("split"), "{without}");
    run(
        dir.path(),
        &["--no-validation", "--iterations", "4", "--resume"],
    )
    .unwrap();
    let resumed = Checkpoint::load(dir.path(), Device::Cpu).unwrap().meta;
    assert_eq!(resumed.training.unwrap().iterations, 4);

    let mut argv: Vec<String> = vec!["e".into(), "--data".into()];
    argv.extend(zips());
    let model = dir.path().to_str().unwrap();
    for a in ["--model", model, "--split", "validation", "--way", "3"] {
        argv.push(a.into());
    }
    argv.extend(["--tasks", "2", "--threads", "1", "--device", "cpu"].map(String::from));
    let refused = eval(&Eval::parse_from(argv).args).unwrap_err();
    assert!(
        refused.contains("Early_Aramaic")
            && refused.contains("--no-validation")
            && refused.contains("--split test --test-groups Latin,Tagalog"),
        "{refused}"
    );
}
