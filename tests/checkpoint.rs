//! Checkpoints on disk: bit-exact round trips, refusal of truncated, edited or missing files
//! with an error naming the file, saves that crashes cannot leave unloadable, however many in a
//! row, and evaluation results recorded without losing any.

mod common;

use common::random_supernet;
use tch::Device;
use tnas::adapt::BnMode;
use tnas::meta::command::record_results;
use tnas::model::checkpoint::{
    Checkpoint, SaveStep, META_FILE, PENDING_WEIGHTS_FILE, TEMP_PREFIX, WEIGHTS_FILE,
};
use tnas::model::metadata::{EvalResult, HeadSpec};
use tnas::nn::search_space::SearchSpace;

fn saved() -> (tempfile::TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    let mut checkpoint = random_supernet(
        SearchSpace::tnas_official(1, 28, 8),
        HeadSpec::Fixed { n_way: 5 },
        3,
        1.0,
    );
    checkpoint.save(dir.path()).unwrap();
    (dir, checkpoint)
}

#[test]
fn round_trip_is_bit_exact() {
    let (dir, original) = saved();
    let loaded = Checkpoint::load(dir.path(), Device::Cpu).unwrap();
    assert_eq!(loaded.meta, original.meta);
    assert_eq!(loaded.params.names(), original.params.names());
    for ((name, a), b) in original.params.iter().zip(loaded.params.tensors()) {
        assert!(a.equal(b), "{name} changed in the round trip");
    }
    let (a, b) = (original.alphas.unwrap(), loaded.alphas.unwrap());
    assert!(a.normal.equal(&b.normal) && a.reduce.equal(&b.reduce));
    // Saving the loaded checkpoint again gives the same bytes.
    let first = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
    let again = tempfile::tempdir().unwrap();
    let mut reloaded = Checkpoint::load(dir.path(), Device::Cpu).unwrap();
    reloaded.save(again.path()).unwrap();
    assert_eq!(
        first,
        std::fs::read(again.path().join(WEIGHTS_FILE)).unwrap()
    );
}

fn load_error(dir: &std::path::Path) -> String {
    Checkpoint::load(dir, Device::Cpu).unwrap_err().to_string()
}

#[test]
fn truncated_weights_are_refused_naming_the_file() {
    let (dir, _) = saved();
    let path = dir.path().join(WEIGHTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains(WEIGHTS_FILE) && err.contains("sha256"),
        "{err}"
    );
}

#[test]
fn an_edited_weight_is_refused() {
    let (dir, _) = saved();
    let path = dir.path().join(WEIGHTS_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    assert!(load_error(dir.path()).contains("truncated, edited"));
}

#[test]
fn missing_files_are_named() {
    let (dir, _) = saved();
    std::fs::remove_file(dir.path().join(WEIGHTS_FILE)).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains(WEIGHTS_FILE) && err.contains("not found"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join(META_FILE)).unwrap();
    assert!(load_error(dir.path()).contains(META_FILE));
}

#[test]
fn edited_metadata_is_refused_with_the_field() {
    let (dir, _) = saved();
    let path = dir.path().join(META_FILE);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"init_channels\": 8", "\"init_channels\": 16");
    std::fs::write(&path, text).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains(WEIGHTS_FILE) && err.contains("shape"), "{err}");
}

/// A save cut short at either point leaves a checkpoint that loads: before `model.json` is
/// written, the old one; after it (the new weights still in their pending file), the new one.
#[test]
fn a_save_cut_short_leaves_a_checkpoint_that_loads() {
    let (dir, old) = saved();
    let mut new = random_supernet(
        SearchSpace::tnas_official(1, 28, 8),
        HeadSpec::Fixed { n_way: 5 },
        4,
        1.0,
    );
    let elsewhere = tempfile::tempdir().unwrap();
    new.save(elsewhere.path()).unwrap();
    let first_weight = |c: &Checkpoint| c.params.tensors()[0].shallow_clone();
    let pending = dir.path().join(PENDING_WEIGHTS_FILE);

    // Cut before model.json: only the pending file (here, its first half) was written.
    let new_weights = std::fs::read(elsewhere.path().join(WEIGHTS_FILE)).unwrap();
    std::fs::write(&pending, &new_weights[..new_weights.len() / 2]).unwrap();
    assert!(
        first_weight(&Checkpoint::load(dir.path(), Device::Cpu).unwrap())
            .equal(&first_weight(&old))
    );

    // Cut after model.json, before the weights moved into place.
    std::fs::write(&pending, &new_weights).unwrap();
    std::fs::copy(elsewhere.path().join(META_FILE), dir.path().join(META_FILE)).unwrap();
    assert!(
        first_weight(&Checkpoint::load(dir.path(), Device::Cpu).unwrap())
            .equal(&first_weight(&new))
    );

    // A whole save leaves no pending file.
    Checkpoint::load(dir.path(), Device::Cpu)
        .unwrap()
        .save(dir.path())
        .unwrap();
    assert!(!pending.exists());
}

/// Applies the first `kept` steps of saving `checkpoint` into `dir`, as a crash after them would
/// leave it; with `mid_write`, the crash also came halfway through the next step's temp file.
fn save_cut_short(
    checkpoint: &mut Checkpoint,
    dir: &std::path::Path,
    kept: usize,
    mid_write: bool,
) {
    let steps = checkpoint.save_steps(dir).unwrap();
    for step in steps.iter().take(kept) {
        step.apply().unwrap();
    }
    if let (true, Some(SaveStep::Write { bytes, .. })) = (mid_write, steps.get(kept)) {
        let mut temp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
            .unwrap();
        std::io::Write::write_all(&mut temp, &bytes[..bytes.len() / 2]).unwrap();
        temp.keep().unwrap();
    }
}

fn temp_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(TEMP_PREFIX)
        })
        .count()
}

/// Two saves in a row cut short, at every step of each and halfway through every write (a save,
/// then the next save of the run resumed from what the first left): the directory always loads,
/// holding the checkpoint it held before the save or the one being saved, and the next start
/// removes the temp files the crashes left.
#[test]
fn a_directory_loads_after_two_saves_in_a_row_cut_short_at_every_step() {
    let mut fixtures = [3, 4, 5].map(|seed| {
        random_supernet(
            SearchSpace::tnas_official(1, 28, 8),
            HeadSpec::Fixed { n_way: 5 },
            seed,
            1.0,
        )
    });
    let first_weight = |c: &Checkpoint| c.params.tensors()[0].shallow_clone();
    let weights = fixtures.each_ref().map(first_weight);
    let which = |c: &Checkpoint| {
        weights
            .iter()
            .position(|w| w.equal(&first_weight(c)))
            .expect("one of the saved checkpoints")
    };
    for (first_cut, second_cut, mid_write) in
        (0..=4).flat_map(|a| (0..=4).flat_map(move |b| [(a, b, false), (a, b, true)]))
    {
        let case = format!("first save cut after {first_cut} steps, second after {second_cut}, mid-write {mid_write}");
        let dir = tempfile::tempdir().unwrap();
        fixtures[0].save(dir.path()).unwrap();
        save_cut_short(&mut fixtures[1], dir.path(), first_cut, mid_write);
        let resumed =
            Checkpoint::load(dir.path(), Device::Cpu).unwrap_or_else(|e| panic!("{case}: {e}"));
        let before = which(&resumed);
        save_cut_short(&mut fixtures[2], dir.path(), second_cut, mid_write);
        let loaded =
            Checkpoint::load(dir.path(), Device::Cpu).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert!(
            [before, 2].contains(&which(&loaded)),
            "{case}: holds checkpoint {} after holding {before}",
            which(&loaded)
        );
        tnas::model::checkpoint::remove_interrupted_temp_files(dir.path());
        assert_eq!(temp_files(dir.path()), 0, "{case}");
    }
}

#[test]
fn a_temp_file_still_being_written_is_not_removed() {
    let dir = tempfile::tempdir().unwrap();
    let writing = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempfile_in(dir.path())
        .unwrap();
    writing.as_file().lock().unwrap();
    assert_eq!(
        tnas::model::checkpoint::remove_interrupted_temp_files(dir.path()),
        0
    );
    assert!(writing.path().exists());
}

fn result(way: usize, accuracy: f64) -> EvalResult {
    EvalResult {
        split: "test".into(),
        way,
        shot: 1,
        tasks: 600,
        predict_with: "supernet".into(),
        bn: BnMode::Support,
        steps: 10,
        finetune_steps: 0,
        views: 1,
        within_groups: Vec::new(),
        query: None,
        seed: None,
        accuracy,
        ci95: 0.01,
    }
}

#[test]
fn evaluations_recorded_side_by_side_keep_every_row_and_never_attach_to_other_weights() {
    let (dir, original) = saved();
    let evaluated = original.meta.sha256.clone();
    // Two evaluations of the same weights, written one after the other: both rows stay, and a
    // repeated one replaces its old row.
    record_results(dir.path(), &evaluated, &[result(5, 0.9)]).unwrap();
    record_results(dir.path(), &evaluated, &[result(20, 0.8)]).unwrap();
    record_results(dir.path(), &evaluated, &[result(5, 0.91)]).unwrap();
    let rows = Checkpoint::load(dir.path(), Device::Cpu)
        .unwrap()
        .meta
        .evaluation;
    let accuracy_of = |way: usize| {
        rows.iter()
            .filter(|r| r.way == way)
            .map(|r| r.accuracy)
            .collect::<Vec<_>>()
    };
    assert_eq!((accuracy_of(5), accuracy_of(20)), (vec![0.91], vec![0.8]));
    // Weights replaced (a training run saved a new best) after the evaluation started: refused.
    let mut replaced = random_supernet(
        SearchSpace::tnas_official(1, 28, 8),
        HeadSpec::Fixed { n_way: 5 },
        4,
        1.0,
    );
    replaced.save(dir.path()).unwrap();
    let error = record_results(dir.path(), &evaluated, &[result(5, 0.99)]).unwrap_err();
    assert!(
        error.contains("changed while it was being evaluated"),
        "{error}"
    );
    assert!(Checkpoint::load(dir.path(), Device::Cpu)
        .unwrap()
        .meta
        .evaluation
        .is_empty());
}
