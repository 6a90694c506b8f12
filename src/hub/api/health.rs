//! Liveness, readiness and the Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};
use serde::Serialize;
use serde_json::Value;

use super::{ApiError, Shared};

#[derive(Serialize)]
pub(super) struct Health {
    status: &'static str,
    version: &'static str,
}

/// Liveness: the process is up and serving HTTP.
pub(super) async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// Readiness: the registry is loaded and the listener serves (both hold once the hub runs).
pub(super) async fn readyz(State(state): Shared) -> Json<Value> {
    Json(serde_json::json!({
        "status": "ok",
        "clusters": state.registry.list().len(),
        "connected": state.gateway.connected_count(),
    }))
}

/// Prometheus text exposition.
pub(super) async fn prometheus(State(state): Shared) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.metrics) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal",
            err.to_string(),
        )
        .into_response(),
    }
}
