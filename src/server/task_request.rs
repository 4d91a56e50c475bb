//! Where an HTTP request becomes a task: JSON or multipart bodies parsed into a [`TaskRequest`],
//! checked against the model and the limits, and its images decoded into network input.

use super::api::{AdaptOptions, AdaptRequest, PredictRequest, QueryImage};
use super::compute::TaskInput;
use super::config::Limits;
use super::error::ApiError;
use crate::adapt::Adaptation;
use crate::data::imaging::{self, ImageLimits};
use crate::model::metadata::{InputSpec, ModelMeta, MAX_LEARNING_RATE};
use crate::model::settings::MAX_VIEWS;
use axum::body::Bytes;
use axum::extract::Multipart;
use base64::Engine;

/// A request in plain data, before images are decoded.
#[derive(Debug)]
pub struct TaskRequest {
    pub support: Vec<(String, Bytes)>,
    pub query: Vec<(String, Bytes)>,
    pub options: AdaptOptions,
}

/// Decodes a base64 image, alone or as a `data:` URL; line breaks and spaces inside it (MIME
/// encoders wrap at 76 columns) are skipped.
fn decode_base64(what: &str, text: &str) -> Result<Bytes, ApiError> {
    let payload = text.split_once("base64,").map_or(text, |(_, data)| data);
    let unwrapped: String;
    let payload = if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        unwrapped = payload
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        unwrapped.as_str()
    } else {
        payload
    };
    base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map(Bytes::from)
        .map_err(|e| {
            ApiError::bad_request(
                "invalid_base64",
                format!(
                    "{what}: image is not valid base64 ({e}); send the file's bytes base64-encoded"
                ),
            )
        })
}

/// The query images of a JSON body, base64-decoded, with their ids.
fn queries(query: &[QueryImage]) -> Result<Vec<(String, Bytes)>, ApiError> {
    query
        .iter()
        .enumerate()
        .map(|(i, q)| {
            Ok((
                q.id.clone(),
                decode_base64(&format!("query[{i}] ({})", q.id), &q.image)?,
            ))
        })
        .collect()
}

fn image_limits(limits: &Limits) -> ImageLimits {
    ImageLimits {
        max_bytes: limits.max_image_bytes,
        max_pixels: limits.max_image_pixels,
    }
}

/// A refused image as the request's error: too large is 413, anything else malformed.
fn image_error(what: &str, error: imaging::ImageError) -> ApiError {
    match error {
        imaging::ImageError::TooManyBytes { .. } | imaging::ImageError::TooManyPixels { .. } => {
            ApiError::PayloadTooLarge(format!("{what}: {error}"))
        }
        _ => ApiError::bad_request("invalid_image", format!("{what}: {error}")),
    }
}

/// A JSON body as `T`, or a 400 that says what is wrong with it as a `what` request.
fn from_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let code = if e.is_data() {
            "invalid_field"
        } else {
            "invalid_json"
        };
        ApiError::bad_request(
            code,
            format!("request body is not a valid {what} request: {e}"),
        )
    })
}

impl TaskRequest {
    /// Parses a JSON body (docs/HTTP_API.md). Unknown fields are refused so typos do not pass silently.
    pub fn from_json(body: &[u8]) -> Result<TaskRequest, ApiError> {
        let request: AdaptRequest = from_json(body, "adapt")?;
        let support = request
            .support
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Ok((
                    s.label.clone(),
                    decode_base64(&format!("support[{i}]"), &s.image)?,
                ))
            })
            .collect::<Result<_, ApiError>>()?;
        Ok(TaskRequest {
            support,
            query: queries(&request.query)?,
            options: request.options,
        })
    }

    /// Parses a JSON prediction body (query images only, and optionally the model to check).
    pub fn from_predict_json(body: &[u8]) -> Result<TaskRequest, ApiError> {
        let request: PredictRequest = from_json(body, "predict")?;
        Ok(TaskRequest {
            support: Vec::new(),
            query: queries(&request.query)?,
            options: AdaptOptions {
                model: request.model,
                ..AdaptOptions::default()
            },
        })
    }

    /// Parses multipart/form-data: `support[<label>]` files, `query` files (id = filename) and an
    /// optional `options` JSON part.
    pub async fn from_multipart(mut multipart: Multipart) -> Result<TaskRequest, ApiError> {
        let broken = |e: axum::extract::multipart::MultipartError| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(format!("multipart body too large: {}", e.body_text()))
            } else {
                ApiError::bad_request(
                    "invalid_multipart",
                    format!("multipart body is malformed: {}", e.body_text()),
                )
            }
        };
        let mut request = TaskRequest {
            support: Vec::new(),
            query: Vec::new(),
            options: AdaptOptions::default(),
        };
        let mut options_seen = false;
        while let Some(field) = multipart.next_field().await.map_err(broken)? {
            let Some(name) = field.name().map(str::to_string) else {
                return Err(ApiError::bad_request("invalid_multipart", "a multipart part has no name; name every part support[<label>], query or options"));
            };
            let file_name = field.file_name().map(str::to_string);
            let data = field.bytes().await.map_err(broken)?;
            if let Some(label) = name
                .strip_prefix("support[")
                .and_then(|rest| rest.strip_suffix(']'))
            {
                request.support.push((label.to_string(), data));
            } else if name == "query" {
                let id = file_name.unwrap_or_else(|| format!("q{}", request.query.len()));
                request.query.push((id, data));
            } else if name == "options" {
                if options_seen {
                    return Err(ApiError::bad_request("duplicate_part", "the options part appears twice; send one options part holding every option"));
                }
                options_seen = true;
                request.options = serde_json::from_slice(&data).map_err(|e| {
                    ApiError::bad_request(
                        "invalid_options",
                        format!("the options part is not valid JSON options: {e}"),
                    )
                })?;
            } else {
                return Err(ApiError::bad_request(
                    "unknown_part",
                    format!(
                        "unknown multipart part '{name}'; use support[<label>], query and options"
                    ),
                ));
            }
        }
        Ok(request)
    }

    /// Distinct labels in order of first appearance (class i = labels[i]) and each support image's class.
    pub fn classes(&self) -> (Vec<String>, Vec<i64>) {
        let mut labels: Vec<String> = Vec::new();
        let indices = self
            .support
            .iter()
            .map(|(label, _)| match labels.iter().position(|l| l == label) {
                Some(i) => i as i64,
                None => {
                    labels.push(label.clone());
                    (labels.len() - 1) as i64
                }
            })
            .collect();
        (labels, indices)
    }

    /// Checks counts, ids and options against the model and limits; returns the merged options.
    pub fn validate(&self, meta: &ModelMeta, limits: &Limits) -> Result<Adaptation, ApiError> {
        let invalid = |code: &'static str, message: String| ApiError::unprocessable(code, message);
        if self.support.is_empty() {
            return Err(invalid(
                "empty_support",
                "the support set is empty; send at least one labelled image per class".into(),
            ));
        }
        self.check_image_count(limits, 1)?;
        if let Some((label, _)) = self.support.iter().find(|(l, _)| l.trim().is_empty()) {
            return Err(invalid(
                "invalid_label",
                format!("support label '{label}' is empty; give every support image a class label"),
            ));
        }
        self.check_name_lengths(limits)?;
        let (labels, _) = self.classes();
        meta.head
            .accepts(labels.len())
            .map_err(|m| invalid("wrong_class_count", m))?;
        self.check_unique_ids()?;
        let options = self.resolve_options(meta, limits)?;
        self.check_declared_pixels(limits)?;
        Ok(options)
    }

    /// Checks a prediction's queries against the limits as [`TaskRequest::validate`] checks an
    /// adaptation's: it has queries only, and its options name at most the model. `views`: the
    /// kept task model's, each a forward pass of every query.
    pub fn validate_queries(&self, limits: &Limits, views: usize) -> Result<(), ApiError> {
        if !self.support.is_empty() {
            return Err(ApiError::unprocessable("support_in_prediction", "a prediction takes query images only: the kept task model already holds its support set; POST /adapt to adapt to a new one"));
        }
        let o = &self.options;
        if o.steps.is_some()
            || o.lr_w.is_some()
            || o.lr_theta.is_some()
            || o.bn.is_some()
            || o.predict_with.is_some()
            || o.finetune_steps.is_some()
            || o.views.is_some()
            || o.keep.is_some()
        {
            return Err(ApiError::unprocessable("options_in_prediction", "a prediction adapts nothing, so its options may only name the model; the kept task model answers as it was adapted (POST /adapt again for other settings)"));
        }
        self.check_image_count(limits, views)?;
        self.check_name_lengths(limits)?;
        self.check_unique_ids()?;
        self.check_declared_pixels(limits)
    }

    /// At least one query, and at most `--max-images` images in all, each counted once per
    /// test-time view (each view is an image forwarded).
    fn check_image_count(&self, limits: &Limits, views: usize) -> Result<(), ApiError> {
        if self.query.is_empty() {
            return Err(ApiError::unprocessable(
                "empty_query",
                "no query images; send at least one image to classify",
            ));
        }
        let images = self.support.len() + self.query.len();
        if images * views > limits.max_images {
            let counted = match views {
                1 => format!("{images} images"),
                _ => format!("{images} images × {views} views"),
            };
            return Err(ApiError::PayloadTooLarge(format!(
                "{counted} in one request, over the limit of {}; split the request{}",
                limits.max_images,
                if views > 1 {
                    " or ask for fewer views"
                } else {
                    ""
                }
            )));
        }
        Ok(())
    }

    fn check_unique_ids(&self) -> Result<(), ApiError> {
        let mut ids = std::collections::HashSet::new();
        match self.query.iter().find(|(id, _)| !ids.insert(id.as_str())) {
            Some((id, _)) => Err(ApiError::unprocessable(
                "duplicate_query_id",
                format!("query id '{id}' appears twice; query ids must be unique"),
            )),
            None => Ok(()),
        }
    }

    /// Labels and ids within `--max-label-bytes`: they are echoed back, and labels are kept in the
    /// genotype store, so their size must not be the client's choice.
    fn check_name_lengths(&self, limits: &Limits) -> Result<(), ApiError> {
        let max = limits.max_label_bytes;
        let labels = self
            .support
            .iter()
            .enumerate()
            .map(|(i, (label, _))| (format!("support label {i}"), label));
        let ids = self
            .query
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (format!("query id {i}"), id));
        let too_long = labels.chain(ids).find(|(_, name)| name.len() > max);
        match too_long {
            Some((what, name)) => Err(ApiError::unprocessable(
                "name_too_long",
                format!("{what} is {} bytes, over the limit of {max} (--max-label-bytes); use shorter labels and ids", name.len()),
            )),
            None => Ok(()),
        }
    }

    /// Reads every image's header (no pixels) and refuses the request when the pixels they declare
    /// together are over `--max-request-pixels`, before any decoding slot is taken.
    fn check_declared_pixels(&self, limits: &Limits) -> Result<(), ApiError> {
        let image_limits = image_limits(limits);
        let mut total: u64 = 0;
        for (what, bytes) in self.images() {
            let (width, height) =
                imaging::declared_size(bytes, &image_limits).map_err(|e| image_error(&what, e))?;
            total += u64::from(width) * u64::from(height);
        }
        if total > limits.max_request_pixels {
            return Err(ApiError::PayloadTooLarge(format!(
                "the request's images declare {total} pixels in all, over the per-request decoding budget of {} (--max-request-pixels); \
                 send fewer or smaller images, or split the request",
                limits.max_request_pixels
            )));
        }
        Ok(())
    }

    /// Every image with how an error names it, support images first.
    fn images(&self) -> impl Iterator<Item = (String, &Bytes)> {
        let support = self
            .support
            .iter()
            .enumerate()
            .map(|(i, (label, bytes))| (format!("support image {i} (label '{label}')"), bytes));
        support.chain(
            self.query
                .iter()
                .map(|(id, bytes)| (format!("query '{id}'"), bytes)),
        )
    }

    fn resolve_options(&self, meta: &ModelMeta, limits: &Limits) -> Result<Adaptation, ApiError> {
        let o = &self.options;
        let d = meta.adaptation;
        let steps = o.steps.unwrap_or(d.steps);
        let finetune_steps = o.finetune_steps.unwrap_or(d.finetune_steps);
        for (name, value) in [("steps", steps), ("finetune_steps", finetune_steps)] {
            if value > limits.max_steps {
                return Err(ApiError::unprocessable(
                    "steps_over_limit",
                    format!(
                        "{name} = {value} is over this server's limit of {}",
                        limits.max_steps
                    ),
                ));
            }
        }
        let rate = |name: &str, value: Option<f64>, default: f64| -> Result<f64, ApiError> {
            match value {
                Some(v) if !v.is_finite() || !(0.0..=MAX_LEARNING_RATE).contains(&v) => {
                    Err(ApiError::unprocessable(
                        "invalid_learning_rate",
                        format!("{name} = {v} must be a finite number in [0, {MAX_LEARNING_RATE}]"),
                    ))
                }
                Some(v) => Ok(v),
                None => Ok(default),
            }
        };
        let views = o.views.unwrap_or(d.views);
        if !(1..=MAX_VIEWS).contains(&views) {
            return Err(ApiError::unprocessable(
                "invalid_views",
                format!("views = {views} must be from 1 to {MAX_VIEWS}: 1 for the images as sent, more for them and their one-pixel shifts"),
            ));
        }
        self.check_image_count(limits, views)?;
        Ok(Adaptation {
            views,
            steps,
            lr_w: rate("lr_w", o.lr_w, d.lr_w)?,
            lr_theta: rate("lr_theta", o.lr_theta, d.lr_theta)?,
            bn: o.bn.unwrap_or(d.bn),
            predict_with: o.predict_with.unwrap_or(d.predict_with),
            finetune_steps,
            learned_rates: d.learned_rates && o.lr_w.is_none() && o.lr_theta.is_none(),
        })
    }

    /// Decodes every image into the model's input (CPU work, run off the async runtime), stopping
    /// between images with a 504 once `keep_going` says the request's time is up or it was abandoned.
    pub fn into_task_input(
        self,
        meta: &ModelMeta,
        limits: &Limits,
        options: Adaptation,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<TaskInput, ApiError> {
        let mut values = self.decoded(&meta.input, limits, keep_going)?;
        let (labels, support_labels) = self.classes();
        let query = values.split_off(
            self.support.len() * meta.input.channels * meta.input.size * meta.input.size,
        );
        let support = values;
        Ok(TaskInput {
            model: meta.name.clone(),
            support,
            support_labels,
            n_way: labels.len(),
            query,
            options,
            // No store, nothing to keep: the task batches (and, on a GPU, replays) as any other.
            keep: self.options.keep.unwrap_or(true) && limits.task_store_bytes > 0,
        })
    }

    /// Every image, support first, decoded into network input as `input` describes it (CPU work,
    /// run off the async runtime), stopping between images with a 504 once `keep_going` says the
    /// request's time is up or it was abandoned.
    pub fn decoded(
        &self,
        input: &InputSpec,
        limits: &Limits,
        keep_going: &dyn Fn() -> bool,
    ) -> Result<Vec<f32>, ApiError> {
        let image_limits = image_limits(limits);
        let mut values = Vec::new();
        for (what, bytes) in self.images() {
            if !keep_going() {
                return Err(ApiError::Timeout(limits.request_timeout_ms));
            }
            let image = imaging::decode(bytes, &image_limits).map_err(|e| image_error(&what, e))?;
            values.extend(imaging::to_input(&image, input));
        }
        metrics::counter!("tnas_images_decoded_total")
            .increment((self.support.len() + self.query.len()) as u64);
        Ok(values)
    }
}
