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

/// Publishes the Event for a step that happens once in an object's life (an AppBuild entering
/// a phase), under a name made of the object's name, `once` and its uid: publishing it again
/// (a reconcile retried before its status write landed) finds it there and succeeds. An
/// error is returned only when trying again may help (the tunnel or the apiserver failed);
/// a refusal is logged, as an Event never holds an object back.
pub async fn publish_once(
    client: &kube::Client,
    regarding: &ObjectReference,
    once: &str,
    event: Event,
) -> Result<(), kube::Error> {
    let mut object = object(&event, regarding, 0);
    object.metadata.name = Some(once_name(regarding, once));
    let events: Api<KubeEvent> = Api::namespaced(client.clone(), namespace_of(regarding));
    match events.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(kube::Error::Api(e)) if e.code != 429 && e.code < 500 => {
            tracing::warn!(error = %e, reason = %event.reason, "the apiserver refused an Event");
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// `<name>.<once>.<uid's first 8>`: the uid tells apart an object deleted and made again
/// under its name, whose Events of the last hour are still there.
fn once_name(regarding: &ObjectReference, once: &str) -> String {
    let name = regarding.name.as_deref().unwrap_or(REPORTER);
    let uid = regarding.uid.as_deref().unwrap_or("0");
    let uid = &uid[..uid.len().min(8)];
    // An Event's name is a DNS subdomain: 253 characters at most.
    let room = 253 - once.len() - uid.len() - 2;
    let mut end = name.len().min(room);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}.{once}.{uid}", name[..end].trim_end_matches('.'))
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
    fn an_event_published_once_is_named_by_its_object_step_and_uid() {
        let mut regarding = ObjectReference {
            name: Some("web-1".into()),
            uid: Some("0f3c9a2e-1111-2222-3333-444455556666".into()),
            ..Default::default()
        };
        assert_eq!(
            once_name(&regarding, "completed"),
            "web-1.completed.0f3c9a2e"
        );
        regarding.name = Some("a".repeat(253));
        let long = once_name(&regarding, "deploying");
        assert_eq!(long.len(), 253);
        assert!(long.ends_with(".deploying.0f3c9a2e"), "{long}");
    }

    #[test]
    fn warnings_carry_the_category() {
        let event = warning(ErrorCategory::Forbidden.event_reason(), "403".into());
        assert_eq!(event.reason, "Forbidden");
        assert!(matches!(event.type_, EventType::Warning));
    }
}
