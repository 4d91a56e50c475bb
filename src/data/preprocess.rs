//! Where encoded image files become class tensors: decoded in parallel, once, at load time.

use super::{ClassImages, DataError};
use crate::data::imaging::{self, ImageLimits};
use crate::model::metadata::InputSpec;
use std::borrow::Cow;
use std::path::PathBuf;
use std::thread;
use tch::Tensor;

/// One image before decoding.
pub(crate) enum EncodedImage {
    /// Bytes already read (a zip entry); `origin` names it in errors (`archive.zip:entry.png`).
    InMemory { origin: String, bytes: Vec<u8> },
    /// A file, read by the decoding thread so that only decoded pixels accumulate in memory.
    OnDisk(PathBuf),
}

impl EncodedImage {
    /// Decodes and preprocesses the image into `out` (`C × S × S` floats).
    fn preprocess_into(&self, spec: &InputSpec, out: &mut [f32]) -> Result<(), DataError> {
        let bytes = match self {
            EncodedImage::InMemory { bytes, .. } => Cow::Borrowed(bytes.as_slice()),
            EncodedImage::OnDisk(path) => {
                Cow::Owned(std::fs::read(path).map_err(|source| DataError::Io {
                    path: path.clone(),
                    source,
                })?)
            }
        };
        let image = imaging::decode(&bytes, &ImageLimits::default()).map_err(|source| {
            DataError::Image {
                origin: self.origin(),
                source,
            }
        })?;
        out.copy_from_slice(&imaging::to_input(&image, spec));
        Ok(())
    }

    fn origin(&self) -> String {
        match self {
            EncodedImage::InMemory { origin, .. } => origin.clone(),
            EncodedImage::OnDisk(path) => path.display().to_string(),
        }
    }
}

/// A class whose images are still encoded.
pub(crate) struct EncodedClass {
    pub name: String,
    pub group: String,
    pub images: Vec<EncodedImage>,
}

/// Decodes every image of every class with [`imaging::to_input`], spread over the available
/// cores, into one `[n, C, S, S]` tensor per class; classes keep their order.
pub(crate) fn decode_classes(
    classes: Vec<EncodedClass>,
    spec: &InputSpec,
) -> Result<Vec<ClassImages>, DataError> {
    let per_image = spec.channels * spec.size * spec.size;
    let mut buffers: Vec<Vec<f32>> = classes
        .iter()
        .map(|c| vec![0.0; c.images.len() * per_image])
        .collect();
    let mut jobs: Vec<(&EncodedImage, &mut [f32])> = classes
        .iter()
        .zip(buffers.iter_mut())
        .flat_map(|(class, buffer)| class.images.iter().zip(buffer.chunks_mut(per_image)))
        .collect();
    let threads = thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, jobs.len().max(1));
    let chunk = jobs.len().div_ceil(threads).max(1);
    thread::scope(|scope| {
        let workers: Vec<_> = jobs
            .chunks_mut(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter_mut()
                        .try_for_each(|(image, out)| image.preprocess_into(spec, out))
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("image decoding thread panicked"))
    })?;
    let shape = |n: usize| {
        [
            n as i64,
            spec.channels as i64,
            spec.size as i64,
            spec.size as i64,
        ]
    };
    Ok(classes
        .into_iter()
        .zip(buffers)
        .map(|(class, buffer)| ClassImages {
            images: Tensor::from_slice(&buffer).view(shape(class.images.len())),
            name: class.name,
            group: class.group,
        })
        .collect())
}
