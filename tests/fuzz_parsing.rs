//! Property tests (a short fuzz run in `make test`, a long one in `make fuzz`): request parsing
//! (JSON and multipart), validation against a model, and image decoding never panic, whatever
//! the bytes and settings, and always answer with a typed error.

mod common;

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart};
use clap::Parser;
use proptest::prelude::*;
use tnas::data::imaging::{decode, ImageLimits};
use tnas::model::metadata::{HeadSpec, InputSpec, ModelKind};
use tnas::model::settings::MAX_VIEWS;
use tnas::server::api::AdaptOptions;
use tnas::server::config::ServerConfig;
use tnas::server::task_request::TaskRequest;

/// A valid 2×2 grayscale PNG, mutated below so the decoder sees almost-valid files.
fn tiny_png() -> Vec<u8> {
    let mut bytes = Vec::new();
    image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(2, 2, image::Luma([7])))
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}

/// What a request's image may hold: a PNG, a damaged PNG, or not an image at all.
fn image_bytes(kind: u8) -> Bytes {
    let png = tiny_png();
    Bytes::from(match kind % 3 {
        0 => png,
        1 => png[..png.len() / 2].to_vec(),
        _ => b"not an image".to_vec(),
    })
}

/// Runs `parse` on a multipart body with boundary `B`.
fn parse_multipart(body: Vec<u8>) -> Result<TaskRequest, tnas::server::error::ApiError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let request = axum::http::Request::builder()
            .header("content-type", "multipart/form-data; boundary=B")
            .body(axum::body::Body::from(body))
            .unwrap();
        let multipart = Multipart::from_request(request, &())
            .await
            .expect("the content type is multipart");
        TaskRequest::from_multipart(multipart).await
    })
}

proptest! {
    #[test]
    fn validation_and_decoding_never_panic(
        labels in proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c"), Just(" "), Just("")], 0..6),
        images in proptest::collection::vec(any::<u8>(), 0..6),
        queries in proptest::collection::vec((prop_oneof![Just("q1"), Just("q2"), Just("q3")], any::<u8>()), 0..4),
        steps in proptest::option::of(0usize..300),
        finetune_steps in proptest::option::of(0usize..300),
        lr_w in proptest::option::of(prop_oneof![any::<f64>(), Just(f64::NAN), Just(f64::INFINITY), Just(-1.0), Just(0.1)]),
        lr_theta in proptest::option::of(any::<f64>()),
        views in proptest::option::of(0usize..20),
    ) {
        let input = InputSpec { channels: 1, size: 28, mean: vec![0.0], std: vec![1.0], invert: true };
        let meta = common::metadata("fixture", ModelKind::Supernet, None, input, HeadSpec::Proto { max_way: 2, learned_scale: false });
        let limits = ServerConfig::parse_from(["tnas-server"]).limits;
        let support: Vec<(String, Bytes)> = labels.iter().zip(images.iter().cycle()).map(|(l, &k)| (l.to_string(), image_bytes(k))).collect();
        let query: Vec<(String, Bytes)> = queries.iter().map(|(id, k)| (id.to_string(), image_bytes(*k))).collect();
        let options = AdaptOptions { steps, finetune_steps, lr_w, lr_theta, views, ..AdaptOptions::default() };
        let request = TaskRequest { support, query, options };
        if let Ok(resolved) = request.validate(&meta, &limits) {
            let (support_images, query_images) = (request.support.len(), request.query.len());
            if let Ok(task) = request.into_task_input(&meta, &limits, resolved, &|| true) {
                prop_assert_eq!(task.support.len(), support_images * 28 * 28);
                prop_assert_eq!(task.query.len(), query_images * 28 * 28);
                prop_assert!(task.support_labels.iter().all(|&l| (0..task.n_way as i64).contains(&l)));
                prop_assert!((1..=MAX_VIEWS).contains(&task.options.views));
            }
        }
    }

    #[test]
    fn multipart_parsing_never_panics(
        parts in proptest::collection::vec((prop_oneof![Just("support[a]"), Just("support[]"), Just("query"), Just("options"), Just("other"), Just("")], any::<u8>(), any::<bool>()), 0..5),
        cut in 0usize..400,
    ) {
        let mut body = Vec::new();
        for (name, kind, with_file_name) in &parts {
            let file_name = if *with_file_name { "; filename=\"x.png\"" } else { "" };
            body.extend(format!("--B\r\nContent-Disposition: form-data; name=\"{name}\"{file_name}\r\n\r\n").bytes());
            body.extend(if *name == "options" && kind % 2 == 0 { Bytes::from_static(b"{\"steps\": 2}") } else { image_bytes(*kind) });
            body.extend(b"\r\n");
        }
        body.extend(b"--B--\r\n");
        let whole = body.len();
        body.truncate(whole - cut.min(whole));
        let _ = parse_multipart(body);
    }


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
