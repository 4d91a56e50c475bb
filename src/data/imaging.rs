//! Image bytes → network input, in one place so that serving and training preprocess identically.
//!
//! [`decode`] turns untrusted PNG/JPEG bytes into pixels, refusing oversized, unknown and
//! corrupt inputs before they cost memory; [`to_input`] turns any decoded pixel format into the
//! normalised CHW floats a model's [`InputSpec`] asks for.

use crate::model::metadata::InputSpec;
use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageBuffer, ImageFormat, ImageReader, Luma};
use std::io::Cursor;
use thiserror::Error;

/// Caps on what [`decode`] accepts; the server makes them configurable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// Encoded size: refused before any parsing.
    pub max_bytes: usize,
    /// Declared width × height: refused from the header, before pixels are allocated, so a small
    /// file that declares a huge picture (a decompression bomb) costs nothing.
    pub max_pixels: u64,
}

impl ImageLimits {
    /// 4 MiB and 2048 × 2048 pixels: far above few-shot inputs (28 to 84 pixels a side), and at
    /// most about 100 MB to decode and convert one picture ([`to_input`] works in f32 RGBA).
    pub const DEFAULT: ImageLimits = ImageLimits {
        max_bytes: 4 * 1024 * 1024,
        max_pixels: 2048 * 2048,
    };
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits::DEFAULT
    }
}

/// Why image bytes were refused; every message says what was wrong and how to fix it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("image is empty (0 bytes); send the contents of a PNG or JPEG file")]
    Empty,
    #[error("image is {bytes} bytes, over the limit of {max_bytes}; compress or downscale it before sending")]
    TooManyBytes { bytes: usize, max_bytes: usize },
    #[error("image format is {found}; only PNG and JPEG are accepted, convert it to one of them")]
    UnsupportedFormat { found: String },
    #[error(
        "image is {width}x{height} = {pixels} pixels, over the limit of {max_pixels}; downscale it before sending"
    )]
    TooManyPixels {
        width: u32,
        height: u32,
        pixels: u64,
        max_pixels: u64,
    },
    #[error("image is {width}x{height}: it has no pixels; send a picture at least 1x1")]
    ZeroSize { width: u32, height: u32 },
    #[error("{format} data is corrupt or truncated ({reason}); re-export the image and send the whole file")]
    Corrupt {
        format: &'static str,
        reason: String,
    },
}

/// Rec. 709 luma weights, the ones the `image` crate itself uses for RGB → grayscale.
const LUMA_WEIGHTS: [f32; 3] = [0.2126, 0.7152, 0.0722];

/// Bytes per pixel of the widest format PNG/JPEG decode to (RGBA, 16 bits per channel), with
/// headroom for the decoders' scratch buffers; bounds `image`'s allocation limit.
const ALLOC_BYTES_PER_PIXEL: u64 = 16;

/// The width and height an image's header declares, checking `limits` in order of cost: byte
/// count, format signature, then the declared dimensions; no pixel is decoded. Lets a caller
/// budget a whole request's decoding before decoding any of it.
pub fn declared_size(bytes: &[u8], limits: &ImageLimits) -> Result<(u32, u32), ImageError> {
    header(bytes, limits).map(|(_, width, height)| (width, height))
}

/// Decodes untrusted PNG or JPEG bytes once their header has passed [`declared_size`]'s checks,
/// so only pictures within `limits` are ever allocated.
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<DynamicImage, ImageError> {
    let (format, width, height) = header(bytes, limits)?;
    let corrupt = |e: image::ImageError| ImageError::Corrupt {
        format: format_name(format),
        reason: e.to_string(),
    };
    let pixels = u64::from(width) * u64::from(height);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decode_limits = image::Limits::default();
    decode_limits.max_image_width = Some(width);
    decode_limits.max_image_height = Some(height);
    decode_limits.max_alloc = Some(pixels * ALLOC_BYTES_PER_PIXEL + (1 << 20));
    reader.limits(decode_limits);
    reader.decode().map_err(corrupt)
}

/// The format and declared dimensions of `bytes`, within `limits`.
fn header(bytes: &[u8], limits: &ImageLimits) -> Result<(ImageFormat, u32, u32), ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooManyBytes {
            bytes: bytes.len(),
            max_bytes: limits.max_bytes,
        });
    }
    let format = served_format(bytes)?;
    let corrupt = |e: image::ImageError| ImageError::Corrupt {
        format: format_name(format),
        reason: e.to_string(),
    };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // Reading a header allocates nothing, but the decoders refuse one whose picture would pass
    // their own memory limit before telling its size; the pixel limit below is the one that counts.
    reader.no_limits();
    let (width, height) = reader.into_dimensions().map_err(corrupt)?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 {
        return Err(ImageError::ZeroSize { width, height });
    }
    if pixels > limits.max_pixels {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            pixels,
            max_pixels: limits.max_pixels,
        });
    }
    Ok((format, width, height))
}

/// The format of `bytes` from its signature, if it is one we serve (only PNG and JPEG codecs are
/// compiled in, which keeps the attack surface small).
fn served_format(bytes: &[u8]) -> Result<ImageFormat, ImageError> {
    match image::guess_format(bytes) {
        Ok(format @ (ImageFormat::Png | ImageFormat::Jpeg)) => Ok(format),
        Ok(other) => Err(ImageError::UnsupportedFormat {
            found: format!("{other:?}"),
        }),
        Err(_) => Err(ImageError::UnsupportedFormat {
            found: "not a recognised image format".into(),
        }),
    }
}

fn format_name(format: ImageFormat) -> &'static str {
    if format == ImageFormat::Png {
        "PNG"
    } else {
        "JPEG"
    }
}

/// A single-channel f32 picture; one per network input channel.
type Plane = ImageBuffer<Luma<f32>, Vec<f32>>;

/// Converts a decoded image of any pixel format to the network input `spec` describes:
/// alpha composited onto white (a transparent background reads as paper), `spec.channels`
/// channels (1 = luma, 3 = RGB), resized to `spec.size`² with a triangle filter, scaled to
/// [0, 1], inverted if `spec.invert`, then `(v − mean[c]) / std[c]`.
///
/// Returns CHW row-major floats, `channels × size × size` of them.
///
/// # Panics
/// If `spec.channels` is not 1 or 3, or `mean`/`std` have fewer than `channels` entries;
/// model metadata is validated when it is loaded, so this is a programming error.
pub fn to_input(img: &DynamicImage, spec: &InputSpec) -> Vec<f32> {
    assert!(
        matches!(spec.channels, 1 | 3),
        "input channels must be 1 or 3, got {}",
        spec.channels
    );
    assert!(
        spec.mean.len() >= spec.channels && spec.std.len() >= spec.channels,
        "mean/std need one entry per channel"
    );
    let size = u32::try_from(spec.size).expect("input size fits in u32");
    let mut input = Vec::with_capacity(spec.channels * spec.size * spec.size);
    for (c, plane) in planes_on_white(img, spec.channels).iter().enumerate() {
        let resized = imageops::resize(plane, size, size, FilterType::Triangle);
        let (mean, std) = (spec.mean[c], spec.std[c]);
        input.extend(resized.into_raw().into_iter().map(|v| {
            let v = if spec.invert { 1.0 - v } else { v };
            (v - mean) / std
        }));
    }
    input
}

/// Splits `img` into `channels` planes in [0, 1] after compositing alpha onto white:
/// `c' = c·a + (1 − a)`. Converting through RGBA f32 makes every source format (1-bit, 8- or
/// 16-bit, with or without alpha) land on the same values for the same picture.
fn planes_on_white(img: &DynamicImage, channels: usize) -> Vec<Plane> {
    let rgba = img.to_rgba32f();
    let (width, height) = rgba.dimensions();
    let mut planes = vec![Plane::new(width, height); channels];
    for (x, y, pixel) in rgba.enumerate_pixels() {
        let [r, g, b, a] = pixel.0;
        let rgb = [r, g, b].map(|v| v * a + (1.0 - a));
        if channels == 1 {
            let luma = rgb
                .iter()
                .zip(LUMA_WEIGHTS)
                .map(|(v, w)| v * w)
                .sum::<f32>();
            planes[0].put_pixel(x, y, Luma([luma.clamp(0.0, 1.0)]));
        } else {
            for (plane, v) in planes.iter_mut().zip(rgb) {
                plane.put_pixel(x, y, Luma([v]));
            }
        }
    }
    planes
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::codecs::jpeg::JpegEncoder;
    use image::{GrayAlphaImage, GrayImage, ImageBuffer, LumaA, Rgb, RgbImage, Rgba, RgbaImage};
    use std::time::{Duration, Instant};

    fn gray_spec(size: usize) -> InputSpec {
        InputSpec {
            channels: 1,
            size,
            mean: vec![0.0],
            std: vec![1.0],
            invert: false,
        }
    }

    fn rgb_spec(size: usize) -> InputSpec {
        InputSpec {
            channels: 3,
            size,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
            invert: false,
        }
    }

    /// A 20×20 grayscale picture with smooth and sharp parts, as 8-bit values.
    fn picture(x: u32, y: u32) -> u8 {
        if (6..10).contains(&x) {
            0
        } else {
            ((x * 11 + y * 5) % 256) as u8
        }
    }

    fn png_bytes(img: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn jpeg_bytes(img: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_with_encoder(JpegEncoder::new_with_quality(&mut out, 100))
            .unwrap();
        out
    }

    /// The picture in every 8- and 16-bit layout PNG carries, opaque.
    fn every_png_format() -> Vec<(&'static str, DynamicImage)> {
        let g = |x, y| picture(x, y);
        let w = |x, y| u16::from(picture(x, y)) * 257;
        vec![
            (
                "L8",
                GrayImage::from_fn(20, 20, |x, y| Luma([g(x, y)])).into(),
            ),
            (
                "La8",
                GrayAlphaImage::from_fn(20, 20, |x, y| LumaA([g(x, y), 255])).into(),
            ),
            (
                "Rgb8",
                RgbImage::from_fn(20, 20, |x, y| Rgb([g(x, y); 3])).into(),
            ),
            (
                "Rgba8",
                RgbaImage::from_fn(20, 20, |x, y| Rgba([g(x, y), g(x, y), g(x, y), 255])).into(),
            ),
            (
                "L16",
                DynamicImage::ImageLuma16(ImageBuffer::from_fn(20, 20, |x, y| Luma([w(x, y)]))),
            ),
            (
                "La16",
                DynamicImage::ImageLumaA16(ImageBuffer::from_fn(20, 20, |x, y| {
                    LumaA([w(x, y), 65535])
                })),
            ),
            (
                "Rgb16",
                DynamicImage::ImageRgb16(ImageBuffer::from_fn(20, 20, |x, y| Rgb([w(x, y); 3]))),
            ),
            (
                "Rgba16",
                DynamicImage::ImageRgba16(ImageBuffer::from_fn(20, 20, |x, y| {
                    Rgba([w(x, y), w(x, y), w(x, y), 65535])
                })),
            ),
        ]
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn every_png_pixel_format_gives_the_same_input() {
        for spec in [gray_spec(8), rgb_spec(8)] {
            let formats = every_png_format();
            let reference = to_input(
                &decode(&png_bytes(&formats[0].1), &ImageLimits::default()).unwrap(),
                &spec,
            );
            assert_eq!(reference.len(), spec.channels * 64);
            for (name, img) in &formats {
                let decoded = decode(&png_bytes(img), &ImageLimits::default()).unwrap();
                let diff = max_abs_diff(&to_input(&decoded, &spec), &reference);
                assert!(
                    diff < 1e-5,
                    "{name} with {} channels differs by {diff}",
                    spec.channels
                );
            }
        }
    }

    #[test]
    fn one_bit_omniglot_png_matches_its_8_bit_copy() {
        let zip_path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/omniglot/images_background_small1.zip"
        );
        let mut archive = zip::ZipArchive::new(std::fs::File::open(zip_path).unwrap()).unwrap();
        let name = archive
            .file_names()
            .find(|n| n.ends_with(".png"))
            .unwrap()
            .to_owned();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut archive.by_name(&name).unwrap(), &mut bytes).unwrap();
        let one_bit = decode(&bytes, &ImageLimits::default()).unwrap();
        let eight_bit = decode(
            &png_bytes(&one_bit.to_luma8().into()),
            &ImageLimits::default(),
        )
        .unwrap();
        let spec = gray_spec(28);
        assert_eq!(to_input(&one_bit, &spec), to_input(&eight_bit, &spec));
    }

    #[test]
    fn jpeg_gives_nearly_the_same_input_as_png() {
        let spec = gray_spec(10);
        let smooth = GrayImage::from_fn(40, 40, |x, y| Luma([(x * 3 + y * 2) as u8]));
        let png = to_input(
            &decode(&png_bytes(&smooth.clone().into()), &ImageLimits::default()).unwrap(),
            &spec,
        );
        for img in [
            DynamicImage::from(smooth.clone()),
            DynamicImage::from(DynamicImage::from(smooth).to_rgb8()),
        ] {
            let jpeg = to_input(
                &decode(&jpeg_bytes(&img), &ImageLimits::default()).unwrap(),
                &spec,
            );
            assert!(max_abs_diff(&jpeg, &png) < 0.02);
        }
    }

    #[test]
    fn transparent_pixels_read_as_white() {
        let img: DynamicImage =
            RgbaImage::from_fn(4, 4, |x, _| Rgba([0, 0, 0, if x < 2 { 0 } else { 255 }])).into();
        let input = to_input(&img, &gray_spec(4));
        assert_eq!(&input[..4], &[1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn invert_mean_and_std_apply_per_channel_in_chw_order() {
        let img: DynamicImage = RgbImage::from_fn(2, 2, |x, _| {
            if x == 0 {
                Rgb([0, 51, 255])
            } else {
                Rgb([255, 204, 0])
            }
        })
        .into();
        let spec = InputSpec {
            channels: 3,
            size: 2,
            mean: vec![0.5, 0.1, 0.0],
            std: vec![0.5, 0.2, 2.0],
            invert: true,
        };
        let input = to_input(&img, &spec);
        let expect = |v: f32, c: usize| ((1.0 - v / 255.0) - spec.mean[c]) / spec.std[c];
        let rows = [[0.0, 255.0], [51.0, 204.0], [255.0, 0.0]];
        let expected: Vec<f32> = (0..3)
            .flat_map(|c| (0..4).map(move |i| expect(rows[c][i % 2], c)))
            .collect();
        assert!(
            max_abs_diff(&input, &expected) < 1e-6,
            "{input:?} vs {expected:?}"
        );
    }

    /// CRC-32 (IEEE), as PNG chunks use, so a test can forge a valid header.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// A tiny valid PNG whose IHDR is rewritten to declare `width` × `height`.
    fn png_declaring(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = png_bytes(&GrayImage::new(1, 1).into());
        assert_eq!(&bytes[12..16], b"IHDR");
        bytes[16..20].copy_from_slice(&width.to_be_bytes());
        bytes[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        bytes
    }

    #[test]
    fn decompression_bomb_is_refused_from_the_header() {
        let start = Instant::now();
        let err = decode(&png_declaring(100_000, 100_000), &ImageLimits::default()).unwrap_err();
        assert!(start.elapsed() < Duration::from_millis(500));
        assert_eq!(
            err,
            ImageError::TooManyPixels {
                width: 100_000,
                height: 100_000,
                pixels: 10_000_000_000,
                max_pixels: 2048 * 2048
            }
        );
        assert!(err.to_string().contains("downscale"));
    }

    #[test]
    fn a_header_over_the_decoders_own_memory_limit_is_too_many_pixels_not_corrupt() {
        let err = decode(&png_declaring(1 << 31, 1), &ImageLimits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::TooManyPixels {
                    width: 2_147_483_648,
                    height: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn pixel_limit_is_the_configured_one() {
        let img: DynamicImage = GrayImage::new(20, 20).into();
        let tight = ImageLimits {
            max_bytes: 1 << 20,
            max_pixels: 399,
        };
        assert!(matches!(
            decode(&png_bytes(&img), &tight),
            Err(ImageError::TooManyPixels { pixels: 400, .. })
        ));
        let exact = ImageLimits {
            max_pixels: 400,
            ..tight
        };
        assert_eq!(decode(&png_bytes(&img), &exact).unwrap().width(), 20);
    }

    #[test]
    fn zero_size_is_refused() {
        let err = decode(&png_declaring(0, 5), &ImageLimits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::ZeroSize { .. } | ImageError::Corrupt { .. }
            ),
            "{err}"
        );
    }

    #[test]
    fn truncated_png_is_refused() {
        let noisy: DynamicImage =
            GrayImage::from_fn(64, 64, |x, y| Luma([(x * 7919 + y * 104_729) as u8])).into();
        let bytes = png_bytes(&noisy);
        let err = decode(&bytes[..bytes.len() / 2], &ImageLimits::default()).unwrap_err();
        assert!(
            matches!(err, ImageError::Corrupt { format: "PNG", .. }),
            "{err}"
        );
    }

    #[test]
    fn non_images_empty_and_oversized_inputs_are_refused() {
        let limits = ImageLimits::default();
        assert!(matches!(
            decode(b"hello, this is not an image", &limits),
            Err(ImageError::UnsupportedFormat { .. })
        ));
        assert!(
            matches!(decode(b"GIF89a\x01\x00\x01\x00", &limits), Err(ImageError::UnsupportedFormat { found }) if found == "Gif")
        );
        assert_eq!(decode(&[], &limits), Err(ImageError::Empty));
        let small = ImageLimits {
            max_bytes: 10,
            ..limits
        };
        assert_eq!(
            decode(&[0u8; 11], &small),
            Err(ImageError::TooManyBytes {
                bytes: 11,
                max_bytes: 10
            })
        );
    }

    #[test]
    fn large_image_within_limits_decodes() {
        let img = DynamicImage::ImageRgba16(ImageBuffer::new(1024, 1024));
        let limits = ImageLimits {
            max_bytes: 64 << 20,
            max_pixels: 1024 * 1024,
        };
        assert_eq!(decode(&png_bytes(&img), &limits).unwrap().width(), 1024);
    }
}
