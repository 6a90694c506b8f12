//! Logging set-up and signal handling shared by the hub and the agent: human-readable or
//! JSON lines on stderr, filtered by `RUST_LOG` (default `info`).
//!
//! Depends on: nothing of this crate.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, fmt};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global tracing subscriber. Calling it twice is harmless (the second call
/// keeps the first subscriber), so tests can start several components in one process.
///
/// `RUST_LOG` sets the verbosity: a default level and levels by target, such as
/// `warn,shapeblock::relay=debug` (default `info`). A value it cannot read is reported and
/// `info` used. (Targets only, without the span and field filters of `EnvFilter`, whose regex
/// engine was the agent's largest dependency after the kube client.)
pub fn init(format: LogFormat) {
    let spec = std::env::var("RUST_LOG").ok();
    let (filter, unreadable) = log_filter(spec.as_deref());
    // Colours only for a terminal: a file or a log collector would keep the escape codes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let layer = match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().boxed(),
    };
    if tracing_subscriber::registry()
        .with(layer.with_filter(filter))
        .try_init()
        .is_ok()
        && let Some(err) = unreadable
    {
        tracing::warn!(rust_log = spec.unwrap_or_default(), %err, "RUST_LOG not understood: logging at info");
    }
}

/// The filter `RUST_LOG` asks for (pure), and why it could not be read if it could not.
fn log_filter(spec: Option<&str>) -> (Targets, Option<String>) {
    let info = || Targets::new().with_default(tracing::Level::INFO);
    match spec.map(str::trim) {
        None | Some("") => (info(), None),
        Some(spec) => match spec.parse::<Targets>() {
            Ok(targets) => (targets, None),
            Err(err) => (info(), Some(err.to_string())),
        },
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use tracing::Level;
    use tracing_subscriber::filter::Targets;

    use super::log_filter;

    fn allows(filter: &Targets, target: &str, level: Level) -> bool {
        filter.would_enable(target, &level)
    }

    #[test]
    fn rust_log_sets_levels_by_target() {
        let (filter, err) = log_filter(None);
        assert!(err.is_none());
        assert!(allows(&filter, "shapeblock::hub", Level::INFO));
        assert!(!allows(&filter, "shapeblock::hub", Level::DEBUG));

        let (filter, err) = log_filter(Some("warn,shapeblock::relay=debug"));
        assert!(err.is_none());
        assert!(allows(&filter, "shapeblock::relay", Level::DEBUG));
        assert!(!allows(&filter, "shapeblock::hub", Level::INFO));
        assert!(allows(&filter, "h2", Level::WARN));
    }

    #[test]
    fn unreadable_rust_log_falls_back_to_info_and_says_why() {
        let (filter, err) = log_filter(Some("shapeblock=loud"));
        assert!(err.is_some_and(|e| !e.is_empty()));
        assert!(allows(&filter, "shapeblock", Level::INFO));
        assert!(!allows(&filter, "shapeblock", Level::DEBUG));
    }
}
