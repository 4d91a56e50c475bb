//! Test-time views: a task seen through one-pixel shifts of each of its images. A one-shot support
//! set takes each image's views as more examples of its class (the prototypes average them, the
//! steps learn from all of them), and a query's prediction averages its views' log-probabilities,
//! so a character drawn a pixel away from its class's one example still lands near it.
//!
//! One view is the task as sent, untouched.

use crate::data::augment::shifted;
use crate::model::settings::MAX_VIEWS;
use tch::{Kind, Tensor};

/// The shifts (dx, dy) in pixels, in the order views take them: none, the four edge neighbours,
/// then the four diagonal ones.
const SHIFTS: [(f64, f64); MAX_VIEWS] = [
    (0.0, 0.0),
    (1.0, 0.0),
    (-1.0, 0.0),
    (0.0, 1.0),
    (0.0, -1.0),
    (1.0, 1.0),
    (-1.0, -1.0),
    (1.0, -1.0),
    (-1.0, 1.0),
];

/// `images` ([N, C, S, S]) under each of the first `views` shifts, view after view:
/// [views · N, C, S, S], the first N the images themselves. `views` is from 1 to [`MAX_VIEWS`].
pub fn of_images(images: &Tensor, views: usize) -> Tensor {
    if views == 1 {
        return images.shallow_clone();
    }
    let mut each = vec![images.shallow_clone()];
    each.extend(
        SHIFTS[1..views]
            .iter()
            .map(|&(dx, dy)| shifted(images, dx, dy)),
    );
    Tensor::cat(&each, 0)
}

/// A support set with its images' views as more examples of their classes: the images
/// ([`of_images`]) and their labels ([N] → [views · N]).
pub fn of_support(images: &Tensor, labels: &Tensor, views: usize) -> (Tensor, Tensor) {
    let labels = match views {
        1 => labels.shallow_clone(),
        _ => labels.repeat([views as i64]),
    };
    (of_images(images, views), labels)
}

/// The queries' logits from their views' ([views · N_q, …, n_way], as [`of_images`] lays the
/// views out): the mean of the views' log-probabilities, [N_q, …, n_way]. One view's logits come
/// back as they are.
pub fn merged(logits: &Tensor, views: usize) -> Tensor {
    if views == 1 {
        return logits.shallow_clone();
    }
    let mut shape = logits.size();
    assert_eq!(shape[0] % views as i64, 0, "every query has {views} views");
    shape[0] /= views as i64;
    shape.insert(0, views as i64);
    logits
        .log_softmax(-1, Kind::Float)
        .view(shape.as_slice())
        .mean_dim(0, false, Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fixtures;

    fn some_images() -> Tensor {
        fixtures::omniglot().classes[0].images.narrow(0, 0, 3)
    }

    #[test]
    fn one_view_is_the_task_as_sent() {
        let (images, labels) = (some_images(), Tensor::from_slice(&[0i64, 1, 2]));
        let (same_images, same_labels) = of_support(&images, &labels, 1);
        assert!(same_images.equal(&images) && same_labels.equal(&labels));
        let logits = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0]).view([2, 2]);
        assert!(merged(&logits, 1).equal(&logits));
    }

    #[test]
    fn views_are_the_images_then_their_one_pixel_shifts() {
        let images = some_images();
        let labels = Tensor::from_slice(&[0i64, 1, 2]);
        let (views, view_labels) = of_support(&images, &labels, 5);
        assert_eq!(views.size(), [15, 1, 28, 28]);
        assert_eq!(
            Vec::<i64>::try_from(&view_labels).unwrap(),
            [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]
        );
        assert!(views.narrow(0, 0, 3).equal(&images));
        // The second view moves each picture one pixel left.
        let second = views.narrow(0, 3, 3);
        let diff = (second.narrow(3, 0, 27) - images.narrow(3, 1, 27))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 1e-5, "max difference {diff}");
        for v in 1..5 {
            assert!(!views.narrow(0, 3 * v, 3).equal(&images), "view {v} moved");
        }
    }

    #[test]
    fn a_querys_views_merge_into_their_mean_log_probability() {
        // Two queries, three views each, view after view.
        let logits = Tensor::from_slice(&[
            2.0f32, 0.0, /* q0 v0 */ 0.0, 1.0, /* q1 v0 */
            1.0, 0.0, /* q0 v1 */ 0.0, 3.0, /* q1 v1 */
            0.0, 0.5, /* q0 v2 */ 1.0, 0.0, /* q1 v2 */
        ])
        .view([6, 2]);
        let merged = merged(&logits, 3);
        assert_eq!(merged.size(), [2, 2]);
        let log_p = logits.log_softmax(-1, Kind::Float);
        for q in 0..2 {
            let expected = (log_p.get(q) + log_p.get(2 + q) + log_p.get(4 + q)) / 3.0;
            assert!(merged.get(q).allclose(&expected, 1e-6, 1e-6, false));
        }
    }
}
