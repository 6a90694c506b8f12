//! HTTP routes of the hub API.

use axum::{Json, Router, routing::get};
use serde::Serialize;

/// Body of `GET /healthz`.
#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
}

/// The hub's HTTP routes.
pub fn router() -> Router {
    Router::new().route("/healthz", get(healthz))
}

/// Liveness: the process is up and serving HTTP.
async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}
