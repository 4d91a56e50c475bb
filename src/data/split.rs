//! Train / validation / test splits by group, so that test classes, and for Omniglot whole test
//! alphabets, are never seen in training.

use super::{ClassImages, DataError, Dataset};
use serde::{Deserialize, Serialize};

/// Classes of the `(train, validation, test)` splits.
pub type SplitClasses = (Vec<ClassImages>, Vec<ClassImages>, Vec<ClassImages>);

/// Which groups go to which split, by name; recorded with a model so its evaluation can be
/// reproduced on the same held-out classes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitSpec {
    pub train: Vec<String>,
    pub validation: Vec<String>,
    pub test: Vec<String>,
}

/// The split of the bundled Omniglot subset (8 alphabets) that `tnas-train`'s defaults make: two
/// alphabets for testing, one for validation, five for training.
#[cfg(test)]
pub fn default_omniglot_split() -> SplitSpec {
    let names = |groups: &[&str]| groups.iter().map(|g| g.to_string()).collect();
    SplitSpec {
        train: names(&[
            "Balinese",
            "Greek",
            "Japanese_(katakana)",
            "Korean",
            "Sanskrit",
        ]),
        validation: names(&["Early_Aramaic"]),
        test: names(&["Latin", "Tagalog"]),
    }
}

impl SplitSpec {
    /// The split names and their groups, in the order errors report them.
    fn named(&self) -> [(&'static str, &[String]); 3] {
        [
            ("train", &self.train),
            ("validation", &self.validation),
            ("test", &self.test),
        ]
    }

    /// Checks that every named group exists in `dataset` and is in one split only.
    pub fn validate(&self, dataset: &Dataset) -> Result<(), DataError> {
        let known = dataset.groups();
        let named = self.named();
        for (i, (split, groups)) in named.iter().enumerate() {
            for group in groups.iter() {
                if !known.contains(group) {
                    return Err(DataError::UnknownGroup {
                        group: group.clone(),
                        split,
                        known: known.join(", "),
                    });
                }
                if let Some((second, _)) = named[i + 1..]
                    .iter()
                    .find(|(_, later)| later.contains(group))
                {
                    return Err(DataError::GroupInTwoSplits {
                        group: group.clone(),
                        first: split,
                        second,
                    });
                }
            }
        }
        Ok(())
    }

    /// Moves `dataset`'s classes into `(train, validation, test)`, each in dataset order; classes
    /// of groups named in no split are dropped.
    pub fn apply(&self, mut dataset: Dataset) -> Result<SplitClasses, DataError> {
        self.validate(&dataset)?;
        let train = dataset.take_groups(&self.train);
        let validation = dataset.take_groups(&self.validation);
        let test = dataset.take_groups(&self.test);
        Ok((train, validation, test))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fixtures::omniglot_copy;
    use std::collections::HashSet;

    fn names(classes: &[ClassImages]) -> HashSet<&str> {
        classes.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn default_split_never_shares_a_class_or_alphabet() {
        let (train, validation, test) = default_omniglot_split().apply(omniglot_copy()).unwrap();
        assert_eq!(train.len() + validation.len() + test.len(), 242);
        let (tr, va, te) = (names(&train), names(&validation), names(&test));
        assert!(tr.is_disjoint(&va) && tr.is_disjoint(&te) && va.is_disjoint(&te));
        let groups = |classes: &[ClassImages]| {
            classes
                .iter()
                .map(|c| c.group.clone())
                .collect::<HashSet<_>>()
        };
        assert_eq!(
            groups(&test),
            HashSet::from(["Latin".to_string(), "Tagalog".to_string()])
        );
        assert_eq!(
            groups(&validation),
            HashSet::from(["Early_Aramaic".to_string()])
        );
        assert_eq!(groups(&train).len(), 5);
    }

    #[test]
    fn unknown_group_is_refused_with_the_known_ones() {
        let mut spec = default_omniglot_split();
        spec.test.push("Klingon".into());
        let err = spec.apply(omniglot_copy()).unwrap_err();
        assert!(
            matches!(&err, DataError::UnknownGroup { group, split: "test", .. } if group == "Klingon"),
            "{err}"
        );
        assert!(
            err.to_string().contains("Tagalog"),
            "lists the known groups: {err}"
        );
    }

    #[test]
    fn group_in_two_splits_is_refused() {
        let mut spec = default_omniglot_split();
        spec.validation.push("Greek".into());
        let err = spec.apply(omniglot_copy()).unwrap_err();
        assert!(
            matches!(
                &err,
                DataError::GroupInTwoSplits {
                    first: "train",
                    second: "validation",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn groups_in_no_split_are_dropped() {
        let spec = SplitSpec {
            train: vec!["Greek".into()],
            validation: vec![],
            test: vec!["Latin".into()],
        };
        let (train, validation, test) = spec.apply(omniglot_copy()).unwrap();
        assert_eq!((train.len(), validation.len(), test.len()), (24, 0, 26));
    }
}
