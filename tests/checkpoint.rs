//! Checkpoints on disk: bit-exact round trips, and refusal of truncated, edited or missing files
//! with an error naming the file.

mod common;

use common::random_supernet;
use tch::Device;
use tnas::checkpoint::{Checkpoint, META_FILE, WEIGHTS_FILE};
use tnas::metadata::HeadSpec;
use tnas::search_space::SearchSpace;

fn saved() -> (tempfile::TempDir, Checkpoint) {
    let dir = tempfile::tempdir().unwrap();
    let mut checkpoint = random_supernet(SearchSpace::tnas_official(1, 28, 8), HeadSpec::Fixed { n_way: 5 }, 3, 1.0);
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
    assert_eq!(first, std::fs::read(again.path().join(WEIGHTS_FILE)).unwrap());
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
    assert!(err.contains(WEIGHTS_FILE) && err.contains("sha256"), "{err}");
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
    assert!(err.contains(WEIGHTS_FILE) && err.contains("not found"), "{err}");
    std::fs::remove_file(dir.path().join(META_FILE)).unwrap();
    assert!(load_error(dir.path()).contains(META_FILE));
}

#[test]
fn edited_metadata_is_refused_with_the_field() {
    let (dir, _) = saved();
    let path = dir.path().join(META_FILE);
    let text = std::fs::read_to_string(&path).unwrap().replace("\"init_channels\": 8", "\"init_channels\": 16");
    std::fs::write(&path, text).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains(WEIGHTS_FILE) && err.contains("shape"), "{err}");
}
