//! Liveness, readiness and the Prometheus metrics.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};
use serde::Serialize;

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

/// Readiness: the registry can be written, the listener accepts connections and every
/// controller shard runs. 503 names what is not ready.
pub(super) async fn readyz(State(state): Shared) -> Response {
    let mut not_ready = Vec::new();
    if !state.registry.writable() {
        not_ready.push("registry: the last write to the store failed");
    }
    if !state.serving.load(std::sync::atomic::Ordering::SeqCst) {
        not_ready.push("listener: not accepting connections yet");
    }
    if state
        .runtimes
        .as_ref()
        .is_some_and(|runtimes| !runtimes.shards_running())
    {
        not_ready.push("controllers: a shard thread has stopped");
    }
    let body = serde_json::json!({
        "status": if not_ready.is_empty() { "ok" } else { "not ready" },
        "notReady": not_ready,
        "clusters": state.registry.list().len(),
        "connected": state.gateway.connected_count(),
    });
    let code = if not_ready.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
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
