//! Kubernetes Events on the ShapeBlock objects, so that `kubectl describe appbuild` tells the
//! story a user of any operator expects: a Normal Event for each phase an object enters, a
//! Warning (reason: the failure's category) for each failure. Events are best effort: a
//! failure to publish one is logged and never fails a reconcile.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use super::ErrorCategory;

/// The `reportingController` of every Event the hub publishes.
pub const REPORTER: &str = "shapeblock-hub";

/// A recorder for one cluster (its cache folds repeats of an Event into a series).
pub fn recorder(client: kube::Client) -> Recorder {
    Recorder::new(
        client,
        Reporter {
            controller: REPORTER.into(),
            instance: None,
        },
    )
}

/// A Warning for a failed reconcile.
pub fn warning(category: ErrorCategory, note: String) -> Event {
    Event {
        type_: EventType::Warning,
        reason: category.event_reason().into(),
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

/// Publishes an Event, logging (not returning) a failure.
pub async fn publish(recorder: &Recorder, reference: &ObjectReference, event: Event) {
    if let Err(error) = recorder.publish(&event, reference).await {
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

    #[test]
    fn notes_fit_the_apiservers_limit() {
        let short = truncate("built".into());
        assert_eq!(short, "built");
        let long = truncate("é".repeat(900));
        assert!(long.len() <= 1000, "{}", long.len());
        assert!(long.ends_with('…'));
    }

    #[test]
    fn warnings_carry_the_category() {
        let event = warning(ErrorCategory::Forbidden, "403".into());
        assert_eq!(event.reason, "Forbidden");
        assert!(matches!(event.type_, EventType::Warning));
    }
}
