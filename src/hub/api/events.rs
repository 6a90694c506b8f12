//! `GET /api/v1/events`: the relay's events as a websocket for the UI, the CLI or anything
//! else. `?cursor=<id>` resumes after that event; without one the stream starts with a
//! snapshot of every resource's current status (events marked `resync`). A consumer that falls
//! too far behind, or whose cursor is older than the events kept, gets a `RESET` message and a
//! fresh snapshot, never a silent gap. `?cluster=<id>` keeps one cluster's events.

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use http::header;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use utoipa::IntoParams;

use super::{ApiError, ApiState};
use crate::relay::{Event, Journal};

/// Where an event stream starts.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Resume after this event id (from a previous stream).
    pub cursor: Option<u64>,
    /// Only this cluster's events.
    pub cluster: Option<String>,
}

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Stream status events and build log lines (websocket, text frames of JSON events).
#[utoipa::path(get, path = "/api/v1/events", tag = "events", params(EventsQuery),
    responses((status = 101, description = "websocket of events"), (status = 400, body = ApiError)))]
pub async fn events(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
    request: Request,
) -> Response {
    // A bad query gets the API's JSON error, like every other route.
    let query = match query {
        Ok(Query(query)) => query,
        Err(rejection) => return ApiError::from(rejection).into_response(),
    };
    let headers = request.headers();
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|_| upgrade)
        .cloned()
    else {
        return ApiError::bad_request("GET /api/v1/events is a websocket: send an upgrade request")
            .into_response();
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(request);
    let journal = state.journal.clone();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        if let Err(reason) = stream(ws, &journal, query).await {
            tracing::debug!(%reason, "event stream ended");
        }
    });
    crate::tunnel::switching_protocols(&accept)
}

async fn send(ws: &mut Ws, event: &Event, cluster: Option<&str>) -> Result<(), String> {
    if cluster.is_some_and(|c| c != event.cluster) {
        return Ok(());
    }
    let text = serde_json::to_string(event).map_err(|e| e.to_string())?;
    ws.send(Message::text(text))
        .await
        .map_err(|e| e.to_string())
}

/// Sends a RESET notice and a snapshot; returns the last id the snapshot covers.
async fn reset(
    ws: &mut Ws,
    journal: &Journal,
    cluster: Option<&str>,
    why: &str,
) -> Result<u64, String> {
    let notice = serde_json::json!({"type": "RESET", "message": why});
    ws.send(Message::text(notice.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    snapshot(ws, journal, cluster).await
}

async fn snapshot(ws: &mut Ws, journal: &Journal, cluster: Option<&str>) -> Result<u64, String> {
    let (events, mark) = journal.snapshot().await;
    for event in &events {
        send(ws, event, cluster).await?;
    }
    let end = serde_json::json!({"type": "SNAPSHOT_END", "id": mark});
    ws.send(Message::text(end.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    Ok(mark)
}

async fn stream(mut ws: Ws, journal: &Journal, query: EventsQuery) -> Result<(), String> {
    let cluster = query.cluster.as_deref();
    // Subscribe first, then read what is kept: nothing falls between the two.
    let mut live = journal.subscribe();
    let mut last = match query.cursor {
        None => snapshot(&mut ws, journal, cluster).await?,
        Some(cursor) => match journal.since(cursor).await {
            Ok((events, last)) => {
                for event in &events {
                    send(&mut ws, event, cluster).await?;
                }
                last.max(cursor)
            }
            Err(unusable) => reset(&mut ws, journal, cluster, &unusable.to_string()).await?,
        },
    };
    loop {
        tokio::select! {
            event = live.recv() => match event {
                Ok(event) if event.id > last => {
                    last = event.id;
                    send(&mut ws, &event, cluster).await?;
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => {
                    // Catch up from what is kept, or start over from a snapshot.
                    live = journal.subscribe();
                    last = match journal.since(last).await {
                        Ok((events, newest)) => {
                            for event in &events {
                                send(&mut ws, event, cluster).await?;
                            }
                            newest.max(last)
                        }
                        Err(unusable) => reset(&mut ws, journal, cluster, &unusable.to_string()).await?,
                    };
                }
                Err(RecvError::Closed) => return Ok(()),
            },
            frame = ws.next() => match frame {
                Some(Ok(Message::Close(_))) | None => return Ok(()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(_)) => {}
            },
        }
    }
}

/// How to read a build log.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Keep the response open and stream lines as the build writes them.
    #[serde(default)]
    pub follow: bool,
}

/// An AppBuild's log: its build pod's containers (clone, commit, prepare, build) in order, as
/// plain text, streamed through the tunnel; with `follow=true` until the build ends.
#[utoipa::path(get, path = "/api/v1/clusters/{cluster}/namespaces/{namespace}/appbuilds/{name}/logs",
    tag = "resources",
    params(("cluster" = String, Path), ("namespace" = String, Path), ("name" = String, Path), LogsQuery),
    responses((status = 200, description = "the build log", content_type = "text/plain", body = String),
              (status = 400, body = ApiError),
              (status = 404, body = ApiError), (status = 429, body = ApiError),
              (status = 503, body = ApiError)))]
pub async fn build_logs(
    State(state): State<Arc<ApiState>>,
    axum::Extension(caller): axum::Extension<super::Caller>,
    axum::extract::Path((cluster, namespace, name)): axum::extract::Path<(String, String, String)>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, ListParams};
    super::check_name("namespace", &namespace)?;
    super::check_name("AppBuild", &name)?;
    state
        .registry
        .get(&cluster)
        .ok_or_else(|| ApiError::not_found(format!("cluster {cluster}")))?;
    // Counted from here until the stream ends (the client went, or the log did).
    let long_running = state.gateway.long_running(&cluster, &caller.0)?;
    let client = state.gateway.caller_client(&cluster);
    let build: crate::crd::AppBuild = Api::namespaced(client.clone(), &namespace)
        .get(&name)
        .await?;
    let pods: Api<Pod> = Api::namespaced(client, &namespace);
    let status = build.status.unwrap_or_default();
    let pod = match status.pod_name {
        Some(pod) => Some(pod),
        None => match &status.job_name {
            Some(job) => pods
                .list(&ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}")))
                .await?
                .items
                .into_iter()
                .next()
                .and_then(|p| p.metadata.name),
            None => None,
        },
    };
    let Some(pod) = pod else {
        return Err(ApiError::not_found(format!(
            "a build pod of AppBuild {namespace}/{name} (it has none yet, or builds nothing)"
        )));
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
    tokio::spawn(async move {
        let _long_running = long_running;
        let lines = tx.clone();
        let follow = crate::relay::logs::follow_pod(&pods, &pod, query.follow, |_, line| {
            let tx = lines.clone();
            async move { tx.send(line.into()).await.is_ok() }
        });
        // The client may go while the pod is quiet: then no send fails, so watch for it, and
        // end the follow (and its requests through the tunnel) at once.
        let result = tokio::select! {
            result = follow => result,
            _ = tx.closed() => return,
        };
        if let Err(err) = result {
            let _ = tx
                .send(format!("error reading the log: {err}\n").into())
                .await;
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::convert::Infallible>(chunk), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}
