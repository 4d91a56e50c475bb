//! `tnas-train meta-train --resume`, the real binary on the real Omniglot zips: a run continues
//! only on the data, split, augmentation and schedule it was saved with, and the refusal lists what
//! differs.

mod common;

use common::omniglot_zips;
use std::process::{Command, Output};

/// `tnas-train meta-train` of a tiny 3-way run into `out`, with `extra` arguments.
fn meta_train(out: &std::path::Path, extra: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tnas-train"));
    command
        .arg("meta-train")
        .arg("--data")
        .args(omniglot_zips());
    command.args([
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
        "--inner-steps",
        "1",
    ]);
    command.args([
        "--validation-tasks",
        "4",
        "--validate-every",
        "100",
        "--save-every",
        "2",
        "--threads",
        "1",
        "--device",
        "cpu",
    ]);
    command
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("tnas-train runs")
}

#[test]
fn resume_refuses_another_split_or_augmentation_and_lists_the_difference() {
    let out = tempfile::tempdir().unwrap();
    let first = meta_train(out.path(), &["--iterations", "2"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let changes: [(&[&str], &str); 4] = [
        (&["--test-groups", "Latin,Greek"], "\"Greek\""),
        (&["--validation-groups", "Greek"], "\"Greek\""),
        (&["--no-rotations"], "rotations: false (saved: true)"),
        (
            &["--rotation-groups"],
            "rotation_groups: true (saved: false)",
        ),
    ];
    for (change, named) in changes {
        let refused = meta_train(
            out.path(),
            &[&["--iterations", "4", "--resume"], change].concat(),
        );
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{change:?} was accepted");
        assert!(
            stderr.contains("other settings") && stderr.contains(named),
            "{change:?}: {stderr}"
        );
    }
    let resumed = meta_train(out.path(), &["--iterations", "4", "--resume"]);
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("resuming at iteration 2"));
}

/// A cosine schedule runs over `--iterations`: resumed with another count, its outer rates would
/// jump onto another curve, so the resume is refused and names the saved length.
#[test]
fn resume_refuses_another_length_of_a_cosine_schedule() {
    let out = tempfile::tempdir().unwrap();
    let first = meta_train(out.path(), &["--cosine", "--iterations", "2"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let refused = meta_train(out.path(), &["--cosine", "--iterations", "4", "--resume"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "another schedule was accepted");
    assert!(
        stderr.contains("cosine_iterations: 4 (saved: 2)"),
        "{stderr}"
    );
}
