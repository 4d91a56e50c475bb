//! The OpenAPI 3 document, generated from the handlers' annotations, and the vendored Swagger UI.

use super::api::*;
use super::routes;
use super::state::SharedState;
use axum::Router;
use utoipa::OpenApi;
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
    ))
)]
pub struct ApiDoc;

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
