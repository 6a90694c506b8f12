//! The agent's configuration: a YAML file, environment variables and flags, in rising
//! precedence; unknown file keys are rejected and everything is validated once at start-up.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use crate::config::ConfigError;
use crate::config::read_yaml;
use crate::secret::Secret;
use crate::telemetry::LogFormat;

/// Flags and environment variables of `shapeblock-agent`.
#[derive(clap::Parser, Debug, Default)]
#[command(
    name = "shapeblock-agent",
    version,
    about = "ShapeBlock tunnel agent: connects this cluster to a ShapeBlock hub"
)]
pub struct AgentArgs {
    /// YAML configuration file; flags and environment variables override its keys.
    #[arg(long, env = "SHAPEBLOCK_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Hub URL to dial, e.g. `wss://hub.example.com` (the path /agent/v1/connect is added).
    #[arg(long, env = "SHAPEBLOCK_AGENT_HUB_URL")]
    pub hub_url: Option<String>,
    /// Cluster token. Prefer --token-file: a value here is visible in the process list.
    #[arg(long, env = "SHAPEBLOCK_AGENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the cluster token (re-read on every connect, so it can be rotated).
    #[arg(long, env = "SHAPEBLOCK_AGENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for the hub instead of the public web roots.
    #[arg(long, env = "SHAPEBLOCK_AGENT_HUB_CA_FILE")]
    pub hub_ca_file: Option<PathBuf>,
    /// Kubeconfig for the cluster's apiserver; the in-cluster ServiceAccount when absent.
    #[arg(long, env = "SHAPEBLOCK_AGENT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Largest request body forwarded to the apiserver, in bytes.
    #[arg(long, env = "SHAPEBLOCK_AGENT_MAX_REQUEST_BODY_BYTES")]
    pub max_request_body_bytes: Option<usize>,
    /// Subresources to allow although refused by default (exec, attach, portforward, proxy).
    #[arg(
        long,
        env = "SHAPEBLOCK_AGENT_ALLOWED_SUBRESOURCES",
        value_delimiter = ','
    )]
    pub allowed_subresources: Option<Vec<String>>,
    /// First reconnect delay bound, in milliseconds.
    #[arg(long, env = "SHAPEBLOCK_AGENT_RECONNECT_MIN_MS")]
    pub reconnect_min_ms: Option<u64>,
    /// Largest reconnect delay, in milliseconds.
    #[arg(long, env = "SHAPEBLOCK_AGENT_RECONNECT_MAX_MS")]
    pub reconnect_max_ms: Option<u64>,
    /// Allow a plain `ws://` hub URL (only for a hub on a trusted network or loopback).
    #[arg(long, env = "SHAPEBLOCK_AGENT_ALLOW_PLAINTEXT")]
    pub allow_plaintext: Option<bool>,
    /// Log format: text or json.
    #[arg(long, env = "SHAPEBLOCK_AGENT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The configuration file, every key optional.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct AgentFile {
    hub_url: Option<String>,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    hub_ca_file: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    max_request_body_bytes: Option<usize>,
    allowed_subresources: Option<Vec<String>>,
    reconnect_min_ms: Option<u64>,
    reconnect_max_ms: Option<u64>,
    allow_plaintext: Option<bool>,
    log_format: Option<LogFormat>,
}

/// Where the cluster token comes from.
#[derive(Clone, Debug)]
pub enum TokenSource {
    Inline(Secret),
    /// Re-read at every connect.
    File(PathBuf),
}

impl TokenSource {
    pub fn read(&self) -> Result<Secret, ConfigError> {
        match self {
            TokenSource::Inline(token) => Ok(token.clone()),
            TokenSource::File(path) => std::fs::read_to_string(path)
                .map(|s| Secret::new(s.trim()))
                .map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                }),
        }
    }
}

/// The validated agent configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Full websocket URL of the hub's connect endpoint.
    pub connect_url: String,
    pub token: TokenSource,
    pub hub_ca_file: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub max_request_body_bytes: usize,
    pub allowed_subresources: Vec<String>,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub log_format: LogFormat,
}

/// Subresources refused unless listed in `allowed_subresources`: each gives interactive or
/// network access into the cluster, which reconciling ShapeBlock resources never needs.
pub const REFUSED_SUBRESOURCES: [&str; 4] = ["exec", "attach", "portforward", "proxy"];
/// Default cap on forwarded request bodies: the apiserver's own limit for most requests.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 3 * 1024 * 1024;

impl AgentConfig {
    /// Merges file, environment and flags (flags win) and validates the result.
    pub fn load(args: AgentArgs) -> Result<Self, ConfigError> {
        let file: AgentFile = read_yaml(args.config.as_deref())?;
        let hub_url = args.hub_url.or(file.hub_url).ok_or_else(|| {
            ConfigError::Invalid(
                "hub_url is required (--hub-url or SHAPEBLOCK_AGENT_HUB_URL)".into(),
            )
        })?;
        let allow_plaintext = args
            .allow_plaintext
            .or(file.allow_plaintext)
            .unwrap_or(false);
        let connect_url = connect_url(&hub_url, allow_plaintext)?;
        let token = match (
            args.token.map(Secret::new).or(file.token),
            args.token_file.or(file.token_file),
        ) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "give either token or token_file, not both".into(),
                ));
            }
            (Some(token), None) => TokenSource::Inline(token),
            (None, Some(path)) => TokenSource::File(path),
            (None, None) => {
                return Err(ConfigError::Invalid(
                    "a cluster token is required (--token-file or SHAPEBLOCK_AGENT_TOKEN)".into(),
                ));
            }
        };
        if token.read()?.expose().is_empty() {
            return Err(ConfigError::Invalid("the cluster token is empty".into()));
        }
        let reconnect_min = Duration::from_millis(
            args.reconnect_min_ms
                .or(file.reconnect_min_ms)
                .unwrap_or(1000),
        );
        let reconnect_max = Duration::from_millis(
            args.reconnect_max_ms
                .or(file.reconnect_max_ms)
                .unwrap_or(60_000),
        );
        if reconnect_min.is_zero() || reconnect_max < reconnect_min {
            return Err(ConfigError::Invalid(
                "reconnect_min_ms must be positive and at most reconnect_max_ms".into(),
            ));
        }
        let max_request_body_bytes = args
            .max_request_body_bytes
            .or(file.max_request_body_bytes)
            .unwrap_or(DEFAULT_MAX_REQUEST_BODY);
        if max_request_body_bytes == 0 {
            return Err(ConfigError::Invalid(
                "max_request_body_bytes must be positive".into(),
            ));
        }
        let allowed_subresources = args
            .allowed_subresources
            .or(file.allowed_subresources)
            .unwrap_or_default();
        if let Some(unknown) = allowed_subresources
            .iter()
            .find(|s| !REFUSED_SUBRESOURCES.contains(&s.as_str()))
        {
            return Err(ConfigError::Invalid(format!(
                "allowed_subresources: {unknown:?} is not one of {REFUSED_SUBRESOURCES:?}"
            )));
        }
        Ok(Self {
            connect_url,
            token,
            hub_ca_file: args.hub_ca_file.or(file.hub_ca_file),
            kubeconfig: args.kubeconfig.or(file.kubeconfig),
            max_request_body_bytes,
            allowed_subresources,
            reconnect_min,
            reconnect_max,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
        })
    }
}

/// `wss://host[:port][/prefix]` → `wss://host[:port][/prefix]/agent/v1/connect`.
fn connect_url(hub_url: &str, allow_plaintext: bool) -> Result<String, ConfigError> {
    let uri: http::Uri = hub_url
        .parse()
        .map_err(|e| ConfigError::Invalid(format!("hub_url {hub_url:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("wss") | Some("https") => {}
        Some("ws") | Some("http") if allow_plaintext => {}
        Some("ws") | Some("http") => {
            return Err(ConfigError::Invalid(format!(
                "hub_url {hub_url:?} is not encrypted; use wss:// (or set allow_plaintext for a trusted network)"
            )));
        }
        _ => {
            return Err(ConfigError::Invalid(format!(
                "hub_url {hub_url:?} must start with wss://"
            )));
        }
    }
    let authority = uri
        .authority()
        .ok_or_else(|| ConfigError::Invalid(format!("hub_url {hub_url:?} has no host")))?;
    if uri.query().is_some() {
        return Err(ConfigError::Invalid(format!(
            "hub_url {hub_url:?} must not have a query"
        )));
    }
    let scheme = if matches!(uri.scheme_str(), Some("wss" | "https")) {
        "wss"
    } else {
        "ws"
    };
    let prefix = uri.path().trim_end_matches('/');
    Ok(format!(
        "{scheme}://{authority}{prefix}{}",
        crate::tunnel::CONNECT_PATH
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(hub: &str) -> AgentArgs {
        AgentArgs {
            hub_url: Some(hub.into()),
            token: Some("t".into()),
            ..Default::default()
        }
    }

    #[test]
    fn connect_url_is_derived_from_the_hub_url() {
        let c = AgentConfig::load(args("wss://hub.example.com/")).unwrap();
        assert_eq!(c.connect_url, "wss://hub.example.com/agent/v1/connect");
        let c = AgentConfig::load(args("https://hub.example.com:8443/sb")).unwrap();
        assert_eq!(
            c.connect_url,
            "wss://hub.example.com:8443/sb/agent/v1/connect"
        );
    }

    #[test]
    fn plaintext_needs_an_explicit_opt_in() {
        let err = AgentConfig::load(args("ws://hub:8080"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not encrypted"), "{err}");
        let mut a = args("ws://127.0.0.1:8080");
        a.allow_plaintext = Some(true);
        assert_eq!(
            AgentConfig::load(a).unwrap().connect_url,
            "ws://127.0.0.1:8080/agent/v1/connect"
        );
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_rejected() {
        let dir = std::env::temp_dir().join(format!("sb-agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.yaml");
        std::fs::write(&path, "hub_url: wss://hub\ntoken: abc\nhub_uri: typo\n").unwrap();
        let err = AgentConfig::load(AgentArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("hub_uri"), "{err}");
        std::fs::write(
            &path,
            "hub_url: wss://hub\ntoken: abc\nallowed_subresources: [exec, logs]\n",
        )
        .unwrap();
        let err = AgentConfig::load(AgentArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("\"logs\""), "{err}");
        std::fs::write(&path, "hub_url: wss://file-hub\ntoken: abc\n").unwrap();
        let cfg = AgentConfig::load(AgentArgs {
            config: Some(path),
            hub_url: Some("wss://flag-hub".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            cfg.connect_url, "wss://flag-hub/agent/v1/connect",
            "flags override the file"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_token_is_never_printed() {
        let mut a = args("wss://hub");
        a.token = Some("super-secret-token".into());
        let cfg = AgentConfig::load(a).unwrap();
        assert!(!format!("{cfg:?}").contains("super-secret-token"));
    }
}
