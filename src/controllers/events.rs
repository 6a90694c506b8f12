//! Kubernetes Events on the ShapeBlock objects, so that `kubectl describe appbuild` tells the
//! story a user of any operator expects: a Normal Event for each phase an object enters, a
//! Warning (reason: the failure's category) for each failure. Events are best effort: a
//! failure to publish one is logged and never fails a reconcile.
//!
//! Each Event is created once and nothing is kept: kube's `Recorder` caches every Event it
//! published for minutes to fold repeats into a series, which cost about 50 KiB per cluster of
//! 20 Apps in the load test (one phase Event per object), for repeats that hardly happen here:
//! a phase is entered once, and failures are retried with exponential backoff.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType};

/// The `reportingController` of every Event the hub publishes.
pub const REPORTER: &str = "shapeblock-hub";

/// A Warning for a failed reconcile (`reason`: see [`super::ReconcileError::event_reason`]).
pub fn warning(reason: &str, note: String) -> Event {
    Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(truncate(note)),
        action: "Reconcile".into(),
        secondary: None,
    }
}

/// A Normal Event for an object entering `phase` (`reason` is the phase, CamelCase).
pub fn phase(phase: &str, note: String) -> Event {
    Event {
        type_: EventType::Normal,
        reason: phase.into(),
        note: Some(truncate(note)),
        action: "Reconcile".into(),
        secondary: None,
    }
}

/// A Warning Event that is not a reconcile error: the object failed (a build that failed).
pub fn failed(reason: &str, note: String) -> Event {
    Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(truncate(note)),
        action: "Reconcile".into(),
        secondary: None,
    }
}

/// The Event object for `event` about `regarding` (pure; `nanos` makes its name unique).
pub fn object(event: &Event, regarding: &ObjectReference, nanos: i128) -> KubeEvent {
    let base = regarding.name.as_deref().unwrap_or(REPORTER);
    KubeEvent {
        metadata: ObjectMeta {
            name: Some(format!("{base}.{nanos:x}")),
            namespace: Some(namespace_of(regarding).to_string()),
            ..Default::default()
        },
        action: Some(event.action.clone()),
        reason: Some(event.reason.clone()),
        note: event.note.clone(),
        type_: Some(
            match event.type_ {
                EventType::Normal => "Normal",
                EventType::Warning => "Warning",
            }
            .into(),
        ),
        regarding: Some(regarding.clone()),
        related: event.secondary.clone(),
        reporting_controller: Some(REPORTER.into()),
        reporting_instance: Some(REPORTER.into()),
        event_time: Some(MicroTime(jiff::Timestamp::now())),
        ..Default::default()
    }
}

/// Events about cluster-scoped objects (Projects) go to `default`, as kubectl looks for them.
fn namespace_of(regarding: &ObjectReference) -> &str {
    regarding.namespace.as_deref().unwrap_or("default")
}

/// Publishes an Event, logging (not returning) a failure.
pub async fn publish(client: &kube::Client, regarding: &ObjectReference, event: Event) {
    let nanos = jiff::Timestamp::now().as_nanosecond();
    let object = object(&event, regarding, nanos);
    let events: Api<KubeEvent> = Api::namespaced(client.clone(), namespace_of(regarding));
    if let Err(error) = events.create(&PostParams::default(), &object).await {
        tracing::debug!(%error, reason = %event.reason, "publishing an Event failed");
    }
}

/// The apiserver refuses an Event note over 1 kB.
fn truncate(mut note: String) -> String {
    const MAX: usize = 1000;
    if note.len() > MAX {
        let mut end = MAX - '…'.len_utf8();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push('…');
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::ErrorCategory;

    #[test]
    fn notes_fit_the_apiservers_limit() {
        let short = truncate("built".into());
        assert_eq!(short, "built");
        let long = truncate("é".repeat(900));
        assert!(long.len() <= 1000, "{}", long.len());
        assert!(long.ends_with('…'));
    }

    #[test]
    fn events_name_their_object_and_reporter() {
        let regarding = ObjectReference {
            name: Some("web-1".into()),
            namespace: Some("shop".into()),
            kind: Some("AppBuild".into()),
            ..Default::default()
        };
        let event = object(&phase("Building", "building main".into()), &regarding, 255);
        assert_eq!(event.metadata.name.as_deref(), Some("web-1.ff"));
        assert_eq!(event.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(event.type_.as_deref(), Some("Normal"));
        assert_eq!(event.reporting_controller.as_deref(), Some(REPORTER));
        let project = ObjectReference {
            name: Some("shop".into()),
            kind: Some("Project".into()),
            ..Default::default()
        };
        let event = object(
            &warning(ErrorCategory::Forbidden.event_reason(), "403".into()),
            &project,
            1,
        );
        assert_eq!(event.metadata.namespace.as_deref(), Some("default"));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
    }

    #[test]
    fn warnings_carry_the_category() {
        let event = warning(ErrorCategory::Forbidden.event_reason(), "403".into());
        assert_eq!(event.reason, "Forbidden");
        assert!(matches!(event.type_, EventType::Warning));
    }
}
