//! Why a dataset could not be loaded, split or sampled.

use crate::data::imaging::ImageError;
use std::path::PathBuf;
use thiserror::Error;

/// Errors of the data layer; each names the file, class or group at fault and what to do.
#[derive(Debug, Error)]
pub enum DataError {
    #[error("{path} does not exist; pass the dataset directory or zip")]
    MissingPath { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable zip archive ({source}); re-download it")]
    Zip {
        path: PathBuf,
        source: zip::result::ZipError,
    },
    #[error("cannot read {entry} in {zip} ({source}); the archive is corrupt, re-download it")]
    ZipEntry {
        zip: PathBuf,
        entry: String,
        source: zip::result::ZipError,
    },
    #[error("cannot use image {origin}: {source}")]
    Image { origin: String, source: ImageError },
    #[error("{path} is neither a directory nor a .zip archive")]
    UnknownSource { path: PathBuf },
    #[error("found no classes in {path}; expected {layout}")]
    NoClasses { path: PathBuf, layout: &'static str },
    #[error(
        "class folder {path} holds no .png/.jpg/.jpeg images; add images or remove the folder"
    )]
    EmptyClass { path: PathBuf },
    #[error("{path} line {line}: {reason}")]
    Csv {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("group {group:?} (in the {split} split) is not in the dataset; known groups: {known}")]
    UnknownGroup {
        group: String,
        split: &'static str,
        known: String,
    },
    #[error(
        "group {group:?} is in both the {first} and {second} splits; a group must be in one only"
    )]
    GroupInTwoSplits {
        group: String,
        first: &'static str,
        second: &'static str,
    },
    #[error(
        "episodes need at least 1 class and 1 support image per class (got way={way}, shot={shot})"
    )]
    EmptyEpisode { way: usize, shot: usize },
    #[error("{way}-way episodes need {way} classes but only {available} are available; lower --way or add classes")]
    NotEnoughClasses { way: usize, available: usize },
    #[error("{way}-way tasks within one group need a group of {way} classes, and the largest has {largest}; lower --way")]
    NoGroupLargeEnough { way: usize, largest: usize },
    #[error("tasks within one group need groups of several classes (Omniglot's alphabets), and each class of this data is a group of its own; drop --within-group")]
    NoGroups,
    #[error(
        "class {class} has {available} images but episodes need {needed} (shot + query); lower --shot/--query"
    )]
    NotEnoughImages {
        class: String,
        needed: usize,
        available: usize,
    },
}
