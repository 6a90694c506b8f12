//! What both binaries' configurations share: the error type, reading the YAML file and the
//! serde helpers for its duration keys. Each binary's own keys live beside it
//! ([`crate::agent::config`], [`crate::hub::config`]); the runtime types that a file section
//! deserializes into straight away (`GatewayConfig`, `RuntimeConfig`, `ControllerConfig`,
//! `JobSettings`) use the helpers here for their `_seconds` keys.
//!
//! Depends on: nothing of this crate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// A configuration that cannot be used, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A key's value is out of range or malformed; `key` is spelled as in the file.
    #[error("{key}: {reason}")]
    Key { key: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl ConfigError {
    pub fn key(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Key {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// `Ok` when `ok`, otherwise the error that says what is wrong with `key`.
pub fn check(ok: bool, key: &str, reason: impl Into<String>) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::key(key, reason))
    }
}

/// Reads a YAML configuration file into `T` (whose unknown keys the caller's type rejects),
/// or `T::default()` when no file is given.
pub fn read_yaml<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_saphyr::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// `deserialize_with` for the `…_seconds` keys: whole seconds into a `Duration`.
pub fn seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    u64::deserialize(deserializer).map(Duration::from_secs)
}

/// `deserialize_with` for the `…_ms` keys: milliseconds into a `Duration`.
pub fn millis<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    u64::deserialize(deserializer).map(Duration::from_millis)
}

/// Runs `body` in a child process of this test binary, running only the test `test`, with
/// `env` set: clap reads the environment itself, and setting variables in this process would
/// race the tests running beside it.
#[cfg(test)]
pub(crate) fn in_child_with_env(test: &str, env: &[(&str, String)], body: impl FnOnce()) {
    const CHILD: &str = "SHAPEBLOCK_CONFIG_TEST_CHILD";
    if std::env::var_os(CHILD).is_some() {
        body();
        return;
    }
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    command
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SHAPEBLOCK_") {
            command.env_remove(name);
        }
    }
    command.env(CHILD, "1");
    for (name, value) in env {
        command.env(name, value);
    }
    let out = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{test} in a child process:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
