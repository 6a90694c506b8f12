//! What the ShapeBlock server does to an App beyond reading and writing it: stream the logs of
//! its pods, and roll it back to an earlier build in one call.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ObjectMeta, PostParams};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::{ApiError, ApiState, check_name};
use crate::crd::{App, AppBuild, AppBuildPhase, AppBuildSpec};
use crate::relay::logs::{PodsLogs, follow_pods};
use crate::render::app::{APP_CONTAINER, APP_LABEL};

/// Lines from the end of each pod's log when `tail` is not given.
const DEFAULT_TAIL: u32 = 100;
/// The most lines `tail` may ask for, per pod.
const MAX_TAIL: u32 = 10_000;
/// Lines buffered per log stream between the pods and a slow client.
const LINES_BUFFERED: usize = 64;

/// How to read an App's logs.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AppLogsQuery {
    /// Keep the response open: stream new lines, and the logs of pods that start later, until
    /// the client disconnects.
    #[serde(default)]
    pub follow: bool,
    /// Lines from the end of the log of each pod running when the request arrives (default
    /// 100, at most 10000). Pods that start later are streamed from their first line.
    pub tail: Option<u32>,
}

/// The logs of an App: container `app` of each of its pods (label `shapeblock.io/app`), every
/// line prefixed with its pod's name (`[web-7d9f-x2] listening on :8080`), as plain text
/// streamed through the tunnel. With `follow=true` new pods are picked up as they start, and
/// the stream lasts until the client disconnects; without it, the tail of each current pod.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/namespaces/{namespace}/apps/{name}/logs",
    tag = "resources", operation_id = "app_logs",
    params(("cluster" = String, Path), ("namespace" = String, Path), ("name" = String, Path), AppLogsQuery),
    responses((status = 200, description = "the App's log lines, each prefixed with `[pod] `", content_type = "text/plain", body = String),
              (status = 400, body = ApiError), (status = 404, body = ApiError),
              (status = 429, body = ApiError)))]
pub(super) async fn app_logs(
    State(state): State<Arc<ApiState>>,
    axum::Extension(caller): axum::Extension<super::Caller>,
    Path((cluster, namespace, name)): Path<(String, String, String)>,
    query: Result<Query<AppLogsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    check_name("namespace", &namespace)?;
    check_name("App", &name)?;
    let tail = query.tail.unwrap_or(DEFAULT_TAIL);
    if tail > MAX_TAIL {
        return Err(ApiError::bad_request(format!(
            "tail {tail} is more than {MAX_TAIL} lines"
        )));
    }
    let client = cluster_client(&state, &cluster)?;
    // Counted from here until the stream ends (the client went, or every log did).
    let long_running = state.gateway.long_running(&cluster, &caller.0)?;
    Api::<App>::namespaced(client.clone(), &namespace)
        .get(&name)
        .await?;
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    let what = PodsLogs {
        selector: format!("{APP_LABEL}={name}"),
        container: APP_CONTAINER.to_string(),
        tail_lines: Some(i64::from(tail)),
        follow: query.follow,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(LINES_BUFFERED);
    tokio::spawn(async move {
        let _long_running = long_running;
        let errors = tx.clone();
        // The client may go while every pod is quiet: then no send fails, so watch for it, and
        // end the followers (and their requests through the tunnel) at once.
        let result = tokio::select! {
            result = follow_pods(&pods, &what, tx) => result,
            _ = errors.closed() => return,
        };
        if let Err(err) = result {
            let _ = errors
                .send(format!("[shapeblock-hub] error reading the logs: {err}\n"))
                .await;
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| {
            (
                Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line)),
                rx,
            )
        })
    });
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// Body of a rollback.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    /// Name of the earlier Completed AppBuild of this App whose image and Helm values to
    /// redeploy.
    pub to: String,
}

/// Roll an App back to an earlier build: creates an AppBuild `{appName, rollbackTo}` named
/// `<app>-rollback-<5 random characters>`, which redeploys that build's image and Helm
/// values without building. Answers with the AppBuild created; follow it like any other.
#[utoipa::path(post, path = "/api/v1/clusters/{cluster}/namespaces/{namespace}/apps/{name}/rollback",
    tag = "resources", operation_id = "rollback_app",
    params(("cluster" = String, Path), ("namespace" = String, Path), ("name" = String, Path)),
    request_body = Rollback,
    responses((status = 201, body = AppBuild, description = "the rollback AppBuild, created"),
              (status = 400, body = ApiError), (status = 404, body = ApiError, description = "no such cluster, App or AppBuild"),
              (status = 413, body = ApiError), (status = 415, body = ApiError),
              (status = 422, body = ApiError, description = "the AppBuild is not Completed, or belongs to another App")))]
pub(super) async fn rollback_app(
    State(state): State<Arc<ApiState>>,
    Path((cluster, namespace, name)): Path<(String, String, String)>,
    body: Result<Json<Rollback>, JsonRejection>,
) -> Result<(StatusCode, Json<AppBuild>), ApiError> {
    let Json(Rollback { to }) = body?;
    check_name("namespace", &namespace)?;
    check_name("App", &name)?;
    check_name("AppBuild", &to)?;
    let client = cluster_client(&state, &cluster)?;
    Api::<App>::namespaced(client.clone(), &namespace)
        .get(&name)
        .await?;
    let builds: Api<AppBuild> = Api::namespaced(client, &namespace);
    let target = builds.get(&to).await?;
    usable_target(&target, &name)?;
    let mut rollback = AppBuild::new(
        "",
        AppBuildSpec {
            app_name: name.clone(),
            rollback_to: Some(to),
            ..Default::default()
        },
    );
    // The apiserver picks the suffix, so two rollbacks in the same second never collide.
    rollback.metadata = ObjectMeta {
        generate_name: Some(format!("{name}-rollback-")),
        ..Default::default()
    };
    let params = PostParams {
        field_manager: Some(super::resources::FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    let created = builds.create(&params, &rollback).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Refuses a rollback target the controller would fail on (pure): another App's build, or one
/// that did not deploy.
fn usable_target(target: &AppBuild, app: &str) -> Result<(), ApiError> {
    let invalid = |message: String| {
        Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            message,
        ))
    };
    let to = target.metadata.name.as_deref().unwrap_or_default();
    if target.spec.app_name != app {
        return invalid(format!(
            "AppBuild {to} belongs to App {}, not {app}",
            target.spec.app_name
        ));
    }
    let phase = target
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .unwrap_or_default();
    if phase != AppBuildPhase::Completed {
        return invalid(format!(
            "AppBuild {to} is {phase:?}, not Completed: only a build that deployed can be rolled back to"
        ));
    }
    Ok(())
}

/// The kube client of a registered cluster, through its tunnel.
fn cluster_client(state: &ApiState, cluster: &str) -> Result<kube::Client, ApiError> {
    state
        .registry
        .get(cluster)
        .ok_or_else(|| ApiError::not_found(format!("cluster {cluster}")))?;
    Ok(state.gateway.caller_client(cluster))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(app: &str, phase: Option<AppBuildPhase>) -> AppBuild {
        let mut build = AppBuild::new(
            "web-1",
            AppBuildSpec {
                app_name: app.into(),
                ..Default::default()
            },
        );
        build.status = Some(crate::crd::AppBuildStatus {
            phase,
            ..Default::default()
        });
        build
    }

    #[test]
    fn only_a_completed_build_of_the_same_app_is_a_target() {
        assert!(usable_target(&build("web", Some(AppBuildPhase::Completed)), "web").is_ok());
        let other = usable_target(&build("api", Some(AppBuildPhase::Completed)), "web");
        let other = other.unwrap_err();
        assert_eq!((other.code, other.reason.as_str()), (422, "Invalid"));
        assert!(other.message.contains("belongs to App api"), "{other:?}");
        let failed = usable_target(&build("web", Some(AppBuildPhase::Failed)), "web");
        assert!(failed.unwrap_err().message.contains("is Failed"));
        let new = usable_target(&build("web", None), "web");
        assert!(new.unwrap_err().message.contains("is Pending"));
    }
}
