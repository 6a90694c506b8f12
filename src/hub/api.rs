//! HTTP routes of the hub API.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use axum::{Json, Router, routing::get};
use http::header;
use serde::Serialize;

/// Body of `GET /healthz`.
#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
}

/// The hub's HTTP API routes (the gateway adds its own).
pub fn router(metrics: Arc<prometheus_client::registry::Registry>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(prometheus))
        .with_state(metrics)
}

/// Liveness: the process is up and serving HTTP.
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Prometheus text exposition.
async fn prometheus(
    State(registry): State<Arc<prometheus_client::registry::Registry>>,
) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => (http::StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}
