//! The OpenAPI 3 document, generated from the handlers' annotations, and the vendored Swagger UI.

use super::api::*;
use super::routes;
use super::state::SharedState;
use axum::Router;
use utoipa::openapi::content::Content;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{AdditionalProperties, Object, Ref, Schema};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::RefOr;
use utoipa::{Modify, OpenApi};
use utoipa_swagger_ui::SwaggerUi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tnas",
        description = "Fast adaptation of neural architectures (T-NAS): POST a few-shot task, get its DARTS genotype and query predictions; classify later queries with the kept task model, or download it."
    ),
    paths(
        routes::adapt::adapt,
        routes::tasks::predict,
        routes::tasks::download_model,
        routes::genotypes::get_genotype,
        routes::genotypes::get_genotype_svg,
        routes::genotypes::list_genotypes,
        routes::models::list_models,
        routes::models::get_model,
        routes::health::healthz,
        routes::health::readyz,
        routes::health::metrics,
    ),
    components(schemas(
        AdaptRequest,
        AdaptResponse,
        SupportImage,
        QueryImage,
        Prediction,
        TimingMs,
        AlphaWeights,
        GenotypeRecord,
        PredictRequest,
        PredictResponse,
        PredictTimingMs,
        ErrorBody,
        ErrorDetail,
        HealthStatus,
        crate::nn::genotype::Genotype,
        crate::model::metadata::ModelMeta
    )),
    modifiers(&FlatAdaptRequest, &OptionalBearer)
)]
pub struct ApiDoc;

/// The bearer token `--api-key` asks for on every route but the health ones: optional, since a
/// server may run without one, and answered by 401 when missing or wrong.
struct OptionalBearer;

/// The routes `--api-key` leaves open ([`super::router`]).
const OPEN_ROUTES: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

impl Modify for OptionalBearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "api_key",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        }
        let unauthorized = ResponseBuilder::new()
            .description("Missing or wrong API key (a server started with --api-key)")
            .content(
                "application/json",
                Content::new(Some(Ref::from_schema_name("ErrorBody"))),
            )
            .build();
        for (path, item) in openapi.paths.paths.iter_mut() {
            if OPEN_ROUTES.contains(&path.as_str()) {
                continue;
            }
            for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
                operation.security = Some(vec![
                    SecurityRequirement::default(),
                    SecurityRequirement::new("api_key", Vec::<String>::new()),
                ]);
                operation
                    .responses
                    .responses
                    .insert("401".into(), RefOr::T(unauthorized.clone()));
            }
        }
    }
}

/// `AdaptRequest` takes its options flattened into the body. Generated, that is an `allOf` whose
/// options part allows no other properties, which a JSON Schema validator reads as refusing every
/// body that has images; one object with all the properties, and no others, is what the server
/// accepts.
struct FlatAdaptRequest;

impl Modify for FlatAdaptRequest {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let Some(schemas) = openapi.components.as_mut().map(|c| &mut c.schemas) else {
            return;
        };
        let Some(RefOr::T(Schema::AllOf(all_of))) = schemas.get("AdaptRequest") else {
            return;
        };
        let mut flat = Object::new();
        flat.description = all_of.description.clone();
        for part in &all_of.items {
            if let RefOr::T(Schema::Object(object)) = part {
                flat.properties.extend(object.properties.clone());
                flat.required.extend(object.required.iter().cloned());
            }
        }
        flat.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
        schemas.insert("AdaptRequest".into(), RefOr::T(Schema::Object(flat)));
    }
}

/// The document as served at `/openapi.json` and committed at `openapi/openapi.json`.
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises")
}

/// `/docs` (Swagger UI, vendored) and `/openapi.json`.
pub fn docs() -> Router<SharedState> {
    Router::new().merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
}
