//! Omniglot (Lake et al., Science 2015): 1,623 handwritten characters from 50 alphabets, 20
//! drawers each, read from `<Alphabet>/<character>/*.png` folders or straight from the official
//! zips, plus the rotation class augmentation MAML and T-NAS train with.

use super::folder::{has_image_extension, image_files, subfolders};
use super::preprocess::{decode_classes, EncodedClass, EncodedImage};
use super::{ClassImages, DataError, Dataset};
use crate::data::imaging::ImageLimits;
use crate::model::metadata::InputSpec;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use zip::result::ZipError;
use zip::ZipArchive;

/// What [`load`] expects, for error messages.
const LAYOUT: &str = "<Alphabet>/<character>/*.png, or an official images_background*.zip";

/// Loads every character of every source (a directory or an official zip) as a class named
/// `Alphabet/character`, grouped by alphabet.
///
/// An alphabet found in an earlier source is skipped in later ones, so overlapping archives
/// (Greek and Latin are in both `images_background_small*.zip`) do not duplicate classes.
/// Classes are sorted by alphabet then character within each source.
pub fn load(sources: &[PathBuf], spec: &InputSpec) -> Result<Dataset, DataError> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut classes = Vec::new();
    for source in sources {
        let found = scan(source)?;
        let alphabets: HashSet<String> = found.iter().map(|c| c.group.clone()).collect();
        classes.extend(found.into_iter().filter(|c| !seen.contains(&c.group)));
        seen.extend(alphabets);
    }
    Ok(Dataset {
        classes: decode_classes(classes, spec)?,
    })
}

/// The rotation class augmentation (Santoro et al. 2016, as in MAML and T-NAS): each character
/// rotated by 90°, 180° and 270° becomes a new class, so every class yields four. The original
/// keeps its name, the others are suffixed `/rot90`, `/rot180`, `/rot270`. Meant for the training
/// classes only.
///
/// Without `orientation_groups`, a rotated class keeps its alphabet as group, so a split still
/// holds whole alphabets, and each class is followed by its rotations. With it, each rotation of
/// an alphabet is a group of its own (`Greek/rot90`), listed after the alphabet's originals (each
/// alphabet's classes must come together, as loaders list them): within-group episodes then hold
/// one alphabet in one orientation, as held-out tasks do, instead of mixing orientations, which
/// are easier to tell apart than the characters.
pub fn with_rotations(classes: Vec<ClassImages>, orientation_groups: bool) -> Vec<ClassImages> {
    let rotate = |class: &ClassImages, quarter_turns: i64| ClassImages {
        name: format!("{}/rot{}", class.name, 90 * quarter_turns),
        group: match orientation_groups {
            true => format!("{}/rot{}", class.group, 90 * quarter_turns),
            false => class.group.clone(),
        },
        images: class.images.rot90(quarter_turns, [2, 3]).contiguous(),
    };
    let mut rotated = Vec::with_capacity(4 * classes.len());
    let mut classes = classes.into_iter().peekable();
    while let Some(first) = classes.next() {
        // What a rotation follows: its class, or with orientation groups its alphabet.
        let mut unit = vec![first];
        while let Some(class) = classes.next_if(|c| orientation_groups && c.group == unit[0].group)
        {
            unit.push(class);
        }
        let turned: Vec<ClassImages> = (1..=3)
            .flat_map(|quarter_turns| unit.iter().map(move |c| rotate(c, quarter_turns)))
            .collect();
        rotated.extend(unit);
        rotated.extend(turned);
    }
    rotated
}

/// The still-encoded classes of one source.
fn scan(source: &Path) -> Result<Vec<EncodedClass>, DataError> {
    let classes = if source.is_dir() {
        scan_directory(source)?
    } else if source
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zip"))
    {
        scan_zip(source)?
    } else if source.exists() {
        return Err(DataError::UnknownSource {
            path: source.to_path_buf(),
        });
    } else {
        return Err(DataError::MissingPath {
            path: source.to_path_buf(),
        });
    };
    if classes.is_empty() {
        return Err(DataError::NoClasses {
            path: source.to_path_buf(),
            layout: LAYOUT,
        });
    }
    Ok(classes)
}

fn scan_directory(root: &Path) -> Result<Vec<EncodedClass>, DataError> {
    let mut classes = Vec::new();
    for (alphabet, alphabet_dir) in subfolders(root)? {
        for (character, character_dir) in subfolders(&alphabet_dir)? {
            classes.push(EncodedClass {
                name: format!("{alphabet}/{character}"),
                group: alphabet.clone(),
                images: image_files(&character_dir)?
                    .into_iter()
                    .map(EncodedImage::OnDisk)
                    .collect(),
            });
        }
    }
    Ok(classes)
}

/// Reads the PNG entries of an official zip into memory (decoding happens later, in parallel),
/// in entry-name order so that classes and their images are sorted like a directory's.
fn scan_zip(path: &Path) -> Result<Vec<EncodedClass>, DataError> {
    let file = File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut archive = ZipArchive::new(BufReader::new(file)).map_err(|source| DataError::Zip {
        path: path.to_path_buf(),
        source,
    })?;
    let mut entries: Vec<(String, usize)> = (0..archive.len())
        .filter_map(|i| Some((archive.name_for_index(i)?.to_owned(), i)))
        .collect();
    entries.sort();
    let mut characters: BTreeMap<(String, String), Vec<EncodedImage>> = BTreeMap::new();
    for (entry, index) in entries {
        let Some(class) = class_of_entry(&entry) else {
            continue;
        };
        let bytes = read_entry(&mut archive, index).map_err(|source| DataError::ZipEntry {
            zip: path.to_path_buf(),
            entry: entry.clone(),
            source,
        })?;
        let origin = format!("{}:{entry}", path.display());
        characters
            .entry(class)
            .or_default()
            .push(EncodedImage::InMemory { origin, bytes });
    }
    Ok(characters
        .into_iter()
        .map(|((alphabet, character), images)| EncodedClass {
            name: format!("{alphabet}/{character}"),
            group: alphabet,
            images,
        })
        .collect())
}

/// An entry's bytes, read up to one byte past the image size limit: enough for
/// [`crate::data::imaging::decode`] to refuse an oversized entry without reading all of it.
fn read_entry(
    archive: &mut ZipArchive<BufReader<File>>,
    index: usize,
) -> Result<Vec<u8>, ZipError> {
    let entry = archive.by_index(index)?;
    let mut bytes = Vec::new();
    entry
        .take(ImageLimits::default().max_bytes as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// `(alphabet, character)` of an entry `[<zip stem>/]<Alphabet>/<character>/<file>.png`; `None`
/// for folders, other files and hidden or `__MACOSX` metadata.
fn class_of_entry(name: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = name.split('/').collect();
    let hidden = parts.iter().any(|p| p.starts_with('.') || *p == "__MACOSX");
    match parts.as_slice() {
        [.., alphabet, character, file]
            if !hidden
                && has_image_extension(file)
                && !alphabet.is_empty()
                && !character.is_empty() =>
        {
            Some((alphabet.to_string(), character.to_string()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fixtures::{omniglot, omniglot_copy, omniglot_spec, omniglot_zips};
    use std::io::Write;
    use tch::Kind;
    use zip::write::SimpleFileOptions;
    use zip::{CompressionMethod, ZipWriter};

    #[test]
    fn both_zips_give_8_alphabets_and_242_characters_of_20_drawings() {
        let data = omniglot();
        let alphabets = [
            "Balinese",
            "Early_Aramaic",
            "Greek",
            "Korean",
            "Latin",
            "Japanese_(katakana)",
            "Sanskrit",
            "Tagalog",
        ];
        assert_eq!(data.groups(), alphabets);
        assert_eq!(data.classes.len(), 242);
        assert!(data.classes.iter().all(|c| c.num_images() == 20));
        assert_eq!(data.classes[0].name, "Balinese/character01");
        let names: HashSet<&str> = data.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names.len(), 242, "class names are unique");
    }

    #[test]
    fn images_are_28x28_with_bright_strokes_after_invert() {
        let data = omniglot();
        let images = &data.classes[17].images;
        assert_eq!(images.size(), [20, 1, 28, 28]);
        assert_eq!(images.kind(), Kind::Float);
        let (min, max, mean) = (
            images.min().double_value(&[]),
            images.max().double_value(&[]),
            images.mean(Kind::Float).double_value(&[]),
        );
        assert!(
            min >= 0.0 && max <= 1.0 + 1e-6,
            "values in [0, 1]: {min}..{max}"
        );
        assert!(max > 0.9, "strokes are bright: max {max}");
        assert!(mean < 0.3, "background is dark: mean {mean}");
    }

    #[test]
    fn rotations_make_four_classes_per_character() {
        let classes: Vec<ClassImages> = omniglot_copy().classes.into_iter().take(2).collect();
        let original = classes[0].images.shallow_clone();
        let rotated = with_rotations(classes, false);
        let names: Vec<&str> = rotated.iter().take(5).map(|c| c.name.as_str()).collect();
        let base = "Balinese/character01";
        assert_eq!(
            names,
            [
                base,
                &format!("{base}/rot90"),
                &format!("{base}/rot180"),
                &format!("{base}/rot270"),
                "Balinese/character02"
            ]
        );
        assert_eq!(rotated.len(), 8);
        assert!(rotated.iter().all(|c| c.group == "Balinese"));
        assert!(rotated[0].images.equal(&original));
        assert!(!rotated[1].images.equal(&original));
        assert!(rotated[1].images.rot90(1, [2, 3]).equal(&rotated[2].images));
        assert!(rotated[3].images.rot90(1, [2, 3]).equal(&original));
    }

    /// With orientation groups, each alphabet's originals come first and each of its rotations
    /// follows as a contiguous group of its own, before the next alphabet begins, so within-group
    /// sampling never mixes orientations or alphabets.
    #[test]
    fn orientation_groups_keep_each_rotation_of_an_alphabet_together() {
        let mut classes = omniglot_copy().classes;
        let second_alphabet = classes.iter().position(|c| c.group != classes[0].group);
        let second = classes.split_off(second_alphabet.unwrap());
        let two_of_each: Vec<ClassImages> = classes
            .into_iter()
            .take(2)
            .chain(second.into_iter().take(2))
            .collect();
        let first_of = |i: usize| two_of_each[i].images.shallow_clone();
        let (kept, turned_once) = (first_of(2), first_of(0).rot90(1, [2, 3]));
        let alphabets: Vec<(String, [String; 2])> = two_of_each
            .chunks(2)
            .map(|pair| (pair[0].group.clone(), [0, 1].map(|i| pair[i].name.clone())))
            .collect();
        let rotated = with_rotations(two_of_each, true);

        let mut expected = Vec::new();
        for (alphabet, names) in &alphabets {
            expected.extend(names.iter().map(|n| (n.clone(), alphabet.clone())));
            for degrees in [90, 180, 270] {
                expected.extend(names.iter().map(|n| {
                    (
                        format!("{n}/rot{degrees}"),
                        format!("{alphabet}/rot{degrees}"),
                    )
                }));
            }
        }
        let named: Vec<(String, String)> = rotated
            .iter()
            .map(|c| (c.name.clone(), c.group.clone()))
            .collect();
        assert_eq!(named, expected);
        assert_ne!(alphabets[0].0, alphabets[1].0);
        assert!(rotated[2].images.equal(&turned_once), "first class, 90°");
        assert!(
            rotated[8].images.equal(&kept),
            "second alphabet's first class"
        );
        let groups = crate::data::sampler::groups_of(&rotated, 2).unwrap();
        assert_eq!(groups, (0..8).map(|g| 2 * g..2 * g + 2).collect::<Vec<_>>());
    }

    /// A zip holding `entries`, deflated.
    fn write_zip(path: &Path, entries: &[(&str, &[u8])]) {
        let mut zip = ZipWriter::new(File::create(path).unwrap());
        for (name, bytes) in entries {
            zip.start_file(
                *name,
                SimpleFileOptions::default().compression_method(CompressionMethod::Deflated),
            )
            .unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
    }

    #[test]
    fn undecodable_image_in_a_zip_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.zip");
        write_zip(
            &path,
            &[(
                "bad/Alpha/character01/0001_01.png",
                b"\x89PNG\r\n\x1a\ntruncated",
            )],
        );
        let err = load(&[path], &omniglot_spec()).unwrap_err();
        assert!(
            err.to_string()
                .contains("bad.zip:bad/Alpha/character01/0001_01.png"),
            "{err}"
        );
    }

    #[test]
    fn corrupt_zip_entry_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corrupt.zip");
        let entry = "corrupt/Alpha/character01/0001_01.png";
        let content: Vec<u8> = (0..4000u32).map(|i| (i * 31 % 251) as u8).collect();
        write_zip(&path, &[(entry, &content)]);
        let mut bytes = std::fs::read(&path).unwrap();
        let data_start = 30 + entry.len();
        bytes[data_start + 10..data_start + 30]
            .iter_mut()
            .for_each(|b| *b ^= 0x5a);
        std::fs::write(&path, bytes).unwrap();
        let err = load(&[path], &omniglot_spec()).unwrap_err();
        assert!(
            matches!(&err, DataError::ZipEntry { entry: e, .. } if e == entry),
            "{err}"
        );
        assert!(err.to_string().contains("corrupt.zip"), "{err}");
    }

    #[test]
    fn missing_source_and_non_zip_file_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no_such_dir");
        let err = load(&[missing], &omniglot_spec()).unwrap_err();
        assert!(
            matches!(&err, DataError::MissingPath { path } if path.ends_with("no_such_dir")),
            "{err}"
        );
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "x").unwrap();
        assert!(matches!(
            load(&[text], &omniglot_spec()),
            Err(DataError::UnknownSource { .. })
        ));
        let fake = dir.path().join("fake.zip");
        std::fs::write(&fake, "not a zip").unwrap();
        assert!(matches!(
            load(&[fake], &omniglot_spec()),
            Err(DataError::Zip { .. })
        ));
    }

    #[test]
    fn directory_layout_matches_the_zip_layout() {
        let mut archive = ZipArchive::new(File::open(&omniglot_zips()[0]).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let wanted = ["Greek/character02/", "Latin/character01/"];
        for index in 0..archive.len() {
            let mut entry = archive.by_index(index).unwrap();
            let name = entry.name().to_owned();
            if let Some(rel) = wanted
                .iter()
                .find_map(|w| name.find(w).map(|at| name[at..].to_owned()))
                .filter(|_| entry.is_file())
            {
                let target = dir.path().join(rel);
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::io::copy(&mut entry, &mut File::create(target).unwrap()).unwrap();
            }
        }
        let from_dir = load(&[dir.path().to_path_buf()], &omniglot_spec()).unwrap();
        let names: Vec<&str> = from_dir.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["Greek/character02", "Latin/character01"]);
        let from_zip = omniglot();
        for class in &from_dir.classes {
            let same = from_zip
                .classes
                .iter()
                .find(|c| c.name == class.name)
                .unwrap();
            assert!(class.images.equal(&same.images), "{}", class.name);
        }
    }
}
