//! The generic folder-per-class layout, `<root>/<class>/*.{png,jpg,jpeg}`: bring your own
//! classes. Each class is its own group, so splits assign whole classes.

use super::preprocess::{decode_classes, EncodedClass, EncodedImage};
use super::{DataError, Dataset};
use crate::model::metadata::InputSpec;
use std::path::{Path, PathBuf};

/// What [`load`] expects, for error messages.
const LAYOUT: &str = "<root>/<class>/*.png|jpg|jpeg";

/// Loads every class folder under `root`, sorted by name.
pub fn load(root: &Path, spec: &InputSpec) -> Result<Dataset, DataError> {
    let classes = subfolders(root)?
        .into_iter()
        .map(|(name, dir)| {
            let images = image_files(&dir)?
                .into_iter()
                .map(EncodedImage::OnDisk)
                .collect();
            Ok(EncodedClass {
                group: name.clone(),
                name,
                images,
            })
        })
        .collect::<Result<Vec<_>, DataError>>()?;
    if classes.is_empty() {
        return Err(DataError::NoClasses {
            path: root.to_path_buf(),
            layout: LAYOUT,
        });
    }
    Ok(Dataset {
        classes: decode_classes(classes, spec)?,
    })
}

/// The non-hidden subfolders of `dir` as (name, path), sorted by name so loading order, and so
/// sampling, is the same on every file system.
pub(crate) fn subfolders(dir: &Path) -> Result<Vec<(String, PathBuf)>, DataError> {
    let mut folders: Vec<(String, PathBuf)> = entries(dir)?
        .into_iter()
        .filter(|path| path.is_dir())
        .filter_map(|path| Some((visible_name(&path)?, path)))
        .collect();
    folders.sort();
    Ok(folders)
}

/// The PNG and JPEG files directly in `dir`, sorted; a class folder without any is an error
/// rather than a silently smaller dataset.
pub(crate) fn image_files(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut files: Vec<PathBuf> = entries(dir)?
        .into_iter()
        .filter(|path| path.is_file() && visible_name(path).is_some() && has_image_extension(path))
        .collect();
    if files.is_empty() {
        return Err(DataError::EmptyClass {
            path: dir.to_path_buf(),
        });
    }
    files.sort();
    Ok(files)
}

/// Whether `name` ends in .png, .jpg or .jpeg, in any case.
pub(crate) fn has_image_extension(name: impl AsRef<Path>) -> bool {
    name.as_ref()
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str()))
}

fn entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    if !dir.exists() {
        return Err(DataError::MissingPath {
            path: dir.to_path_buf(),
        });
    }
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::read_dir(dir)
        .map_err(io)?
        .map(|entry| entry.map(|e| e.path()).map_err(io))
        .collect()
}

/// The file name, unless it is hidden (`.DS_Store`, `.git`, …).
fn visible_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    (!name.starts_with('.')).then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, GrayImage, Luma};

    fn spec() -> InputSpec {
        InputSpec {
            channels: 3,
            size: 8,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
            invert: false,
        }
    }

    fn write_image(path: &Path, value: u8) {
        DynamicImage::from(GrayImage::from_pixel(10, 12, Luma([value])))
            .save(path)
            .unwrap();
    }

    #[test]
    fn loads_every_class_folder_sorted() {
        let root = tempfile::tempdir().unwrap();
        for (class, files) in [
            ("zebra", vec!["1.png", "2.JPG"]),
            ("ant", vec!["a.jpeg", "b.png", "c.png"]),
        ] {
            std::fs::create_dir(root.path().join(class)).unwrap();
            files
                .iter()
                .for_each(|f| write_image(&root.path().join(class).join(f), 200));
        }
        std::fs::write(root.path().join("ant/notes.txt"), "ignored").unwrap();
        std::fs::write(root.path().join("README.md"), "ignored").unwrap();
        let data = load(root.path(), &spec()).unwrap();
        let summary: Vec<_> = data
            .classes
            .iter()
            .map(|c| (c.name.as_str(), c.group.as_str(), c.images.size()))
            .collect();
        assert_eq!(
            summary,
            [
                ("ant", "ant", vec![3, 3, 8, 8]),
                ("zebra", "zebra", vec![2, 3, 8, 8])
            ]
        );
    }

    #[test]
    fn empty_class_folder_and_missing_root_are_named() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("empty")).unwrap();
        let err = load(root.path(), &spec()).unwrap_err();
        assert!(
            matches!(&err, DataError::EmptyClass { path } if path.ends_with("empty")),
            "{err}"
        );
        let missing = root.path().join("nowhere");
        let err = load(&missing, &spec()).unwrap_err();
        assert!(err.to_string().contains("nowhere"), "{err}");
    }

    #[test]
    fn corrupt_image_file_is_named() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("cat")).unwrap();
        std::fs::write(
            root.path().join("cat/broken.png"),
            b"\x89PNG\r\n\x1a\nnot really",
        )
        .unwrap();
        let err = load(root.path(), &spec()).unwrap_err();
        assert!(err.to_string().contains("broken.png"), "{err}");
    }
}
