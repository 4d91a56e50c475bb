//! Random affine jitter of meta-training images: each image shifted, scaled and sheared a little,
//! so that the few training classes look like more handwriting than they are. Only training
//! episodes are jittered; validation and test images are never touched.
//!
//! The jitter of a task is drawn from the task's seed, so a resumed run sees the same images.

use crate::model::metadata::Augmentation;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

/// `images` (`[n, C, S, S]`) each through its own random affine map, drawn from `seed` within
/// `how`'s bounds.
pub fn jitter(images: &Tensor, how: &Augmentation, seed: u64) -> Tensor {
    if how.is_off() {
        return images.shallow_clone();
    }
    let size = images.size();
    let (n, side) = (size[0], size[3] as f64);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut uniform = |max: f64| {
        if max == 0.0 {
            0.0
        } else {
            rng.gen_range(-max..=max)
        }
    };
    let maps: Vec<[f64; 6]> = (0..n)
        .map(|_| {
            let scale = 1.0 + uniform(how.scale);
            let shear = uniform(how.shear);
            let (dx, dy) = (uniform(how.shift_px), uniform(how.shift_px));
            pixel_map(scale, shear, dx, dy, side)
        })
        .collect();
    warp(images, &maps)
}

/// `images` (`[n, C, S, S]`) moved by `dx`, `dy` whole pixels (a positive `dx` moves the picture
/// left), the uncovered edge repeating the border.
pub fn shifted(images: &Tensor, dx: f64, dy: f64) -> Tensor {
    let size = images.size();
    let map = pixel_map(1.0, 0.0, dx, dy, size[3] as f64);
    warp(images, &vec![map; size[0] as usize])
}

/// The affine map (output grid point → input point, in the [−1, 1] coordinates of
/// `affine_grid_generator`) that scales, shears and then shifts by `dx`, `dy` pixels; a
/// positive `dx` moves the picture left.
fn pixel_map(scale: f64, shear: f64, dx: f64, dy: f64, side: f64) -> [f64; 6] {
    let pixel = 2.0 / side;
    [scale, scale * shear, dx * pixel, 0.0, scale, dy * pixel]
}

/// Each image resampled (bilinear) through its map; border pixels fill what a map uncovers, so
/// the background stays whatever it is under the input normalisation.
fn warp(images: &Tensor, maps: &[[f64; 6]]) -> Tensor {
    const BILINEAR: i64 = 0;
    const BORDER: i64 = 1;
    let flat: Vec<f32> = maps.iter().flatten().map(|&v| v as f32).collect();
    let maps = Tensor::from_slice(&flat)
        .view([maps.len() as i64, 2, 3])
        .to_device(images.device());
    let grid = Tensor::affine_grid_generator(&maps, images.size().as_slice(), false);
    images.grid_sampler(&grid, BILINEAR, BORDER, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fixtures;
    use tch::Kind;

    const SOME: Augmentation = Augmentation {
        shift_px: 2.0,
        scale: 0.1,
        shear: 0.1,
    };

    fn some_images() -> Tensor {
        let data = fixtures::omniglot();
        data.classes[0].images.narrow(0, 0, 4)
    }

    #[test]
    fn off_leaves_images_untouched() {
        let images = some_images();
        let out = jitter(&images, &Augmentation::default(), 7);
        assert!(out.equal(&images));
    }

    #[test]
    fn the_identity_map_reproduces_the_images() {
        let images = some_images();
        let out = warp(&images, &[pixel_map(1.0, 0.0, 0.0, 0.0, 28.0); 4]);
        let diff = (&out - &images).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "max difference {diff}");
    }

    #[test]
    fn a_one_pixel_shift_moves_every_column_by_one() {
        let images = some_images();
        let out = warp(&images, &[pixel_map(1.0, 0.0, 1.0, 0.0, 28.0); 4]);
        let moved = out.narrow(3, 0, 27);
        let expected = images.narrow(3, 1, 27);
        let diff = (&moved - &expected).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "max difference {diff}");
        // The uncovered last column repeats the border.
        assert!(out
            .select(3, 27)
            .allclose(&images.select(3, 27), 1e-5, 1e-5, false));
    }

    #[test]
    fn jitter_keeps_the_shape_and_the_ink_roughly() {
        let images = some_images();
        let out = jitter(&images, &SOME, 11);
        assert_eq!(out.size(), images.size());
        assert!(!out.equal(&images), "a jitter changes the images");
        let (before, after) = (
            images.sum(Kind::Double).double_value(&[]),
            out.sum(Kind::Double).double_value(&[]),
        );
        assert!(
            (before - after).abs() / before < 0.25,
            "ink {before} → {after}"
        );
    }

    #[test]
    fn same_seed_same_jitter_other_seed_other_jitter() {
        let images = some_images();
        assert!(jitter(&images, &SOME, 3).equal(&jitter(&images, &SOME, 3)));
        assert!(!jitter(&images, &SOME, 3).equal(&jitter(&images, &SOME, 4)));
    }
}
