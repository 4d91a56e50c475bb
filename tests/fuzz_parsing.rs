//! Property tests (a short fuzz run in `make test`, a long one in `make fuzz`): request parsing
//! and image decoding never panic, whatever the bytes, and always answer with a typed error.

use proptest::prelude::*;
use tnas::imaging::{decode, ImageLimits};
use tnas::server::task_request::TaskRequest;

/// A valid 2×2 grayscale PNG, mutated below so the decoder sees almost-valid files.
fn tiny_png() -> Vec<u8> {
    let mut bytes = Vec::new();
    image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(2, 2, image::Luma([7]))).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    bytes
}

proptest! {
    #[test]
    fn json_parsing_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = TaskRequest::from_json(&body);
    }

    #[test]
    fn json_like_bodies_never_panic(support in "[a-z]{0,3}", image in "[A-Za-z0-9+/=%]{0,40}", steps in any::<i64>()) {
        let body = format!(r#"{{"support": [{{"label": "{support}", "image": "{image}"}}], "query": [{{"id": "q", "image": "{image}"}}], "steps": {steps}}}"#);
        let _ = TaskRequest::from_json(body.as_bytes());
    }

    #[test]
    fn image_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&bytes, &ImageLimits::default());
    }

    #[test]
    fn mutated_pngs_never_panic(position in 0usize..200, value in any::<u8>(), cut in 0usize..200) {
        let mut bytes = tiny_png();
        let len = bytes.len();
        bytes[position % len] = value;
        bytes.truncate(len - cut % len);
        let _ = decode(&bytes, &ImageLimits::default());
    }
}
