//! mini-ImageNet in the layout of Ravi & Larochelle (ICLR 2017): `<root>/images/*.jpg` plus
//! `<root>/train.csv`, `val.csv` and `test.csv` with `filename,label` rows. The split is fixed by
//! the csv files; each label (a WordNet id) is a class and its own group.

use super::preprocess::{decode_classes, EncodedClass, EncodedImage};
use super::split::SplitClasses;
use super::DataError;
use crate::model::metadata::InputSpec;
use std::collections::HashMap;
use std::path::Path;

/// Loads the three splits; classes are in order of first appearance in their csv file.
pub fn load(root: &Path, spec: &InputSpec) -> Result<SplitClasses, DataError> {
    if !root.is_dir() {
        return Err(DataError::MissingPath {
            path: root.to_path_buf(),
        });
    }
    let images = root.join("images");
    let train = read_csv(&root.join("train.csv"), &images)?;
    let validation = read_csv(&root.join("val.csv"), &images)?;
    let test = read_csv(&root.join("test.csv"), &images)?;
    refuse_shared_labels(&[
        ("train", &train[..]),
        ("validation", &validation[..]),
        ("test", &test[..]),
    ])?;
    Ok((
        decode_classes(train, spec)?,
        decode_classes(validation, spec)?,
        decode_classes(test, spec)?,
    ))
}

/// One csv file's classes; image paths are resolved against `images`.
fn read_csv(path: &Path, images: &Path) -> Result<Vec<EncodedClass>, DataError> {
    if !path.is_file() {
        return Err(DataError::MissingPath {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let csv_error = |line: usize, reason: String| DataError::Csv {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()));
    match lines.next() {
        Some((_, header)) if header.trim_start_matches('\u{feff}') == "filename,label" => {}
        _ => return Err(csv_error(1, "expected the header `filename,label`".into())),
    }
    let mut classes: Vec<EncodedClass> = Vec::new();
    let mut index_of: HashMap<String, usize> = HashMap::new();
    for (number, line) in lines.filter(|(_, line)| !line.is_empty()) {
        let (file, label) = match line.split_once(',') {
            Some((file, label)) if !file.trim().is_empty() && !label.trim().is_empty() => {
                (file.trim(), label.trim())
            }
            _ => {
                return Err(csv_error(
                    number,
                    format!("expected `filename,label`, found {line:?}"),
                ))
            }
        };
        let index = *index_of.entry(label.to_owned()).or_insert_with(|| {
            classes.push(EncodedClass {
                name: label.to_owned(),
                group: label.to_owned(),
                images: Vec::new(),
            });
            classes.len() - 1
        });
        classes[index]
            .images
            .push(EncodedImage::OnDisk(images.join(file)));
    }
    if classes.is_empty() {
        return Err(DataError::NoClasses {
            path: path.to_path_buf(),
            layout: "`filename,label` rows",
        });
    }
    Ok(classes)
}

/// Test classes must never be seen in training: a label in two csv files is an error.
fn refuse_shared_labels(splits: &[(&'static str, &[EncodedClass])]) -> Result<(), DataError> {
    let mut owner: HashMap<&str, &'static str> = HashMap::new();
    for (split, classes) in splits {
        for class in *classes {
            if let Some(first) = owner.insert(&class.group, split) {
                return Err(DataError::GroupInTwoSplits {
                    group: class.group.clone(),
                    first,
                    second: split,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, Rgb, RgbImage};
    use std::fmt::Write;

    fn spec() -> InputSpec {
        InputSpec {
            channels: 3,
            size: 16,
            mean: vec![0.5; 3],
            std: vec![0.25; 3],
            invert: false,
        }
    }

    /// A synthetic layout: `classes` per split as (label, images), JPEGs of one colour per class.
    fn write_layout(root: &Path, splits: [&[(&str, usize)]; 3]) {
        std::fs::create_dir(root.join("images")).unwrap();
        for (file, classes) in ["train.csv", "val.csv", "test.csv"].into_iter().zip(splits) {
            let mut csv = String::from("filename,label\n");
            for (c, (label, count)) in classes.iter().enumerate() {
                for i in 0..*count {
                    let name = format!("{label}{i:08}.jpg");
                    let colour = Rgb([40 * c as u8, 100, 200]);
                    DynamicImage::from(RgbImage::from_pixel(24, 20, colour))
                        .save(root.join("images").join(&name))
                        .unwrap();
                    writeln!(csv, "{name},{label}").unwrap();
                }
            }
            std::fs::write(root.join(file), csv).unwrap();
        }
    }

    #[test]
    fn loads_the_three_csv_splits() {
        let root = tempfile::tempdir().unwrap();
        write_layout(
            root.path(),
            [
                &[("n01", 3), ("n02", 4)],
                &[("n03", 2)],
                &[("n04", 3), ("n05", 3)],
            ],
        );
        let (train, validation, test) = load(root.path(), &spec()).unwrap();
        let summary = |classes: &[super::super::ClassImages]| {
            classes
                .iter()
                .map(|c| (c.name.clone(), c.group.clone(), c.num_images()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            summary(&train),
            [
                ("n01".into(), "n01".into(), 3),
                ("n02".into(), "n02".into(), 4)
            ]
        );
        assert_eq!(summary(&validation), [("n03".into(), "n03".into(), 2)]);
        assert_eq!(summary(&test).len(), 2);
        assert_eq!(train[1].images.size(), [4, 3, 16, 16]);
    }

    #[test]
    fn label_in_two_csv_files_is_refused() {
        let root = tempfile::tempdir().unwrap();
        write_layout(root.path(), [&[("n01", 2)], &[("n02", 2)], &[("n01", 2)]]);
        let err = load(root.path(), &spec()).unwrap_err();
        assert!(
            matches!(
                &err,
                DataError::GroupInTwoSplits {
                    first: "train",
                    second: "test",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn bad_csv_and_missing_files_are_named() {
        let root = tempfile::tempdir().unwrap();
        write_layout(root.path(), [&[("n01", 2)], &[("n02", 2)], &[("n03", 2)]]);
        std::fs::write(root.path().join("val.csv"), "filename,label\nonly_a_name\n").unwrap();
        let err = load(root.path(), &spec()).unwrap_err();
        assert!(
            matches!(&err, DataError::Csv { line: 2, .. }) && err.to_string().contains("val.csv"),
            "{err}"
        );
        std::fs::write(
            root.path().join("val.csv"),
            "filename,label\nmissing.jpg,n02\n",
        )
        .unwrap();
        let err = load(root.path(), &spec()).unwrap_err();
        assert!(err.to_string().contains("missing.jpg"), "{err}");
        std::fs::remove_file(root.path().join("test.csv")).unwrap();
        let err = load(root.path(), &spec()).unwrap_err();
        assert!(
            matches!(&err, DataError::MissingPath { path } if path.ends_with("test.csv")),
            "{err}"
        );
    }
}
