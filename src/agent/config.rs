//! The agent's configuration: a YAML file, environment variables and flags, in rising
//! precedence (flag > environment > file > default); unknown file keys are rejected and
//! everything is validated once, here, at start-up, with errors that name the key. The
//! `Default` of the file's struct is the one place the defaults are written. The cluster
//! token is a [`Secret`] from the flag parser and the file on, so no `Debug` output shows it.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use crate::config::ConfigError;
use crate::config::{check, read_yaml};
use crate::secret::Secret;
use crate::telemetry::LogFormat;

/// Flags and environment variables of `shapeblock-agent`; each overrides the file key of the
/// same name.
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
    pub token: Option<Secret>,
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
    /// Wait of a tunnel the hub replaced by a newer one with the same token, in milliseconds
    /// (doubling with each replacement in a row, up to 16×).
    #[arg(long, env = "SHAPEBLOCK_AGENT_REPLACED_BACKOFF_MS")]
    pub replaced_backoff_ms: Option<u64>,
    /// Allow a plain `ws://` hub URL (only for a hub on a trusted network or loopback).
    /// `--allow-plaintext` alone means `true`.
    #[arg(
        long,
        env = "SHAPEBLOCK_AGENT_ALLOW_PLAINTEXT",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub allow_plaintext: Option<bool>,
    /// Log format: text or json.
    #[arg(long, env = "SHAPEBLOCK_AGENT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The configuration file; its `Default` is the agent's defaults.
#[derive(Deserialize, Debug)]
#[serde(default, deny_unknown_fields)]
struct AgentFile {
    hub_url: Option<String>,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    hub_ca_file: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    max_request_body_bytes: usize,
    allowed_subresources: Vec<String>,
    #[serde(
        rename = "reconnect_min_ms",
        deserialize_with = "crate::config::millis"
    )]
    reconnect_min: Duration,
    #[serde(
        rename = "reconnect_max_ms",
        deserialize_with = "crate::config::millis"
    )]
    reconnect_max: Duration,
    #[serde(
        rename = "replaced_backoff_ms",
        deserialize_with = "crate::config::millis"
    )]
    replaced_backoff: Duration,
    allow_plaintext: bool,
    log_format: LogFormat,
}

impl Default for AgentFile {
    fn default() -> Self {
        Self {
            hub_url: None,
            token: None,
            token_file: None,
            hub_ca_file: None,
            kubeconfig: None,
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY,
            allowed_subresources: Vec::new(),
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            replaced_backoff: Duration::from_secs(30),
            allow_plaintext: false,
            log_format: LogFormat::default(),
        }
    }
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

    /// Where the token comes from, for log lines (never the token).
    pub fn describe(&self) -> String {
        match self {
            TokenSource::Inline(_) => "the token flag or environment variable".into(),
            TokenSource::File(path) => format!("token file {}", path.display()),
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
    pub replaced_backoff: Duration,
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
        // Destructured so that a new flag cannot be left out of the merge unnoticed.
        let AgentArgs {
            config,
            hub_url,
            token,
            token_file,
            hub_ca_file,
            kubeconfig,
            max_request_body_bytes,
            allowed_subresources,
            reconnect_min_ms,
            reconnect_max_ms,
            replaced_backoff_ms,
            allow_plaintext,
            log_format,
        } = args;
        let file: AgentFile = read_yaml(config.as_deref())?;
        let hub_url = hub_url.or(file.hub_url).ok_or_else(|| {
            ConfigError::key(
                "hub_url",
                "required (--hub-url or SHAPEBLOCK_AGENT_HUB_URL)",
            )
        })?;
        let allow_plaintext = allow_plaintext.unwrap_or(file.allow_plaintext);
        let token = match (token.or(file.token), token_file.or(file.token_file)) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::key(
                    "token",
                    "give either token or token_file, not both",
                ));
            }
            (Some(token), None) => TokenSource::Inline(token),
            (None, Some(path)) => TokenSource::File(path),
            (None, None) => {
                return Err(ConfigError::key(
                    "token",
                    "a cluster token is required (--token-file or SHAPEBLOCK_AGENT_TOKEN)",
                ));
            }
        };
        let config = Self {
            connect_url: connect_url(&hub_url, allow_plaintext)?,
            token,
            hub_ca_file: hub_ca_file.or(file.hub_ca_file),
            kubeconfig: kubeconfig.or(file.kubeconfig),
            max_request_body_bytes: max_request_body_bytes.unwrap_or(file.max_request_body_bytes),
            allowed_subresources: allowed_subresources.unwrap_or(file.allowed_subresources),
            reconnect_min: reconnect_min_ms.map_or(file.reconnect_min, Duration::from_millis),
            reconnect_max: reconnect_max_ms.map_or(file.reconnect_max, Duration::from_millis),
            replaced_backoff: replaced_backoff_ms
                .map_or(file.replaced_backoff, Duration::from_millis),
            log_format: log_format.unwrap_or(file.log_format),
        };
        config.validate()?;
        Ok(config)
    }

    /// The checks a merged configuration must pass, each naming its key as in the file.
    fn validate(&self) -> Result<(), ConfigError> {
        let Self {
            connect_url: _,
            token,
            hub_ca_file: _,
            kubeconfig: _,
            max_request_body_bytes,
            allowed_subresources,
            reconnect_min,
            reconnect_max,
            replaced_backoff,
            log_format: _,
        } = self;
        check(
            !token.read()?.expose().is_empty(),
            "token",
            "the cluster token is empty",
        )?;
        check(
            !reconnect_min.is_zero(),
            "reconnect_min_ms",
            "must be positive",
        )?;
        check(
            reconnect_max >= reconnect_min,
            "reconnect_max_ms",
            "must be at least reconnect_min_ms",
        )?;
        check(
            !replaced_backoff.is_zero(),
            "replaced_backoff_ms",
            "must be positive",
        )?;
        check(
            *max_request_body_bytes > 0,
            "max_request_body_bytes",
            "must be positive",
        )?;
        if let Some(unknown) = allowed_subresources
            .iter()
            .find(|s| !REFUSED_SUBRESOURCES.contains(&s.as_str()))
        {
            return Err(ConfigError::key(
                "allowed_subresources",
                format!("{unknown:?} is not one of {REFUSED_SUBRESOURCES:?}"),
            ));
        }
        Ok(())
    }
}

/// `wss://host[:port][/prefix]` → `wss://host[:port][/prefix]/agent/v1/connect`.
fn connect_url(hub_url: &str, allow_plaintext: bool) -> Result<String, ConfigError> {
    let uri: http::Uri = hub_url
        .parse()
        .map_err(|e| ConfigError::key("hub_url", format!("{hub_url:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("wss") | Some("https") => {}
        Some("ws") | Some("http") if allow_plaintext => {}
        Some("ws") | Some("http") => {
            return Err(ConfigError::key(
                "hub_url",
                format!(
                    "{hub_url:?} is not encrypted; use wss:// (or set allow_plaintext for a trusted network)"
                ),
            ));
        }
        _ => {
            return Err(ConfigError::key(
                "hub_url",
                format!("{hub_url:?} must start with wss://"),
            ));
        }
    }
    let authority = uri
        .authority()
        .ok_or_else(|| ConfigError::key("hub_url", format!("{hub_url:?} has no host")))?;
    if uri.query().is_some() {
        return Err(ConfigError::key(
            "hub_url",
            format!("{hub_url:?} must not have a query"),
        ));
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

    fn file(name: &str, body: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("sb-agent-{}-{name}.yaml", std::process::id()));
        std::fs::write(&path, body).unwrap();
        path
    }

    fn parse(flags: &[&str]) -> AgentArgs {
        use clap::Parser;
        AgentArgs::try_parse_from(std::iter::once("shapeblock-agent").chain(flags.iter().copied()))
            .unwrap()
    }

    #[test]
    fn defaults_fill_what_is_not_given() {
        let c = AgentConfig::load(args("wss://hub")).unwrap();
        assert!(c.hub_ca_file.is_none() && c.kubeconfig.is_none());
        assert_eq!(c.max_request_body_bytes, DEFAULT_MAX_REQUEST_BODY);
        assert!(c.allowed_subresources.is_empty());
        assert_eq!(c.reconnect_min, Duration::from_millis(1000));
        assert_eq!(c.reconnect_max, Duration::from_millis(60_000));
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let path = file(
            "precedence",
            "hub_url: ws://file-hub\ntoken: file-token\nhub_ca_file: /file/ca.pem\n\
             kubeconfig: /file/kubeconfig\nmax_request_body_bytes: 100\n\
             allowed_subresources: [exec]\nreconnect_min_ms: 10\nreconnect_max_ms: 20\n\
             allow_plaintext: true\nlog_format: json\n",
        );
        let c = AgentConfig::load(AgentArgs {
            config: Some(path.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.connect_url, "ws://file-hub/agent/v1/connect");
        assert_eq!(c.token.read().unwrap().expose(), "file-token");
        assert_eq!(c.hub_ca_file, Some("/file/ca.pem".into()));
        assert_eq!(c.kubeconfig, Some("/file/kubeconfig".into()));
        assert_eq!(c.max_request_body_bytes, 100);
        assert_eq!(c.allowed_subresources, ["exec"]);
        assert_eq!(c.reconnect_min, Duration::from_millis(10));
        assert_eq!(c.reconnect_max, Duration::from_millis(20));
        assert_eq!(c.log_format, LogFormat::Json);

        let mut flags = parse(&[
            "--hub-url=wss://flag-hub",
            "--token=flag-token",
            "--hub-ca-file=/flag/ca.pem",
            "--kubeconfig=/flag/kubeconfig",
            "--max-request-body-bytes=200",
            "--allowed-subresources=attach,proxy",
            "--reconnect-min-ms=30",
            "--reconnect-max-ms=40",
            "--allow-plaintext=false",
            "--log-format=text",
        ]);
        flags.config = Some(path.clone());
        let c = AgentConfig::load(flags).unwrap();
        assert_eq!(c.connect_url, "wss://flag-hub/agent/v1/connect");
        assert_eq!(c.token.read().unwrap().expose(), "flag-token");
        assert_eq!(c.hub_ca_file, Some("/flag/ca.pem".into()));
        assert_eq!(c.kubeconfig, Some("/flag/kubeconfig".into()));
        assert_eq!(c.max_request_body_bytes, 200);
        assert_eq!(c.allowed_subresources, ["attach", "proxy"]);
        assert_eq!(c.reconnect_min, Duration::from_millis(30));
        assert_eq!(c.reconnect_max, Duration::from_millis(40));
        assert_eq!(c.log_format, LogFormat::Text);

        // The flag alone means true, before another flag or at the end.
        for flags in [
            &["--allow-plaintext", "--hub-url=ws://hub"][..],
            &["--hub-url=ws://hub", "--allow-plaintext"],
            &["--allow-plaintext", "true", "--hub-url=ws://hub"],
        ] {
            let mut args = parse(flags);
            args.token = Some("t".into());
            let c = AgentConfig::load(args).unwrap();
            assert_eq!(c.connect_url, "ws://hub/agent/v1/connect", "{flags:?}");
        }

        // --allow-plaintext=false over the file's true refuses the file's ws:// URL.
        let mut flags = parse(&["--allow-plaintext=false"]);
        flags.config = Some(path);
        let err = AgentConfig::load(flags).unwrap_err().to_string();
        assert!(err.contains("not encrypted"), "{err}");
    }

    #[test]
    fn environment_sits_between_flags_and_file() {
        let test = concat!(module_path!(), "::environment_sits_between_flags_and_file");
        let test = test.split_once("::").map_or(test, |(_, t)| t);
        let path = file(
            "env",
            "hub_url: wss://file-hub\nkubeconfig: /file/kubeconfig\nreconnect_max_ms: 50\n",
        );
        let env = [
            ("SHAPEBLOCK_AGENT_CONFIG", path.display().to_string()),
            ("SHAPEBLOCK_AGENT_HUB_URL", "ws://env-hub".into()),
            ("SHAPEBLOCK_AGENT_TOKEN", "env-secret-token".into()),
            ("SHAPEBLOCK_AGENT_HUB_CA_FILE", "/env/ca.pem".into()),
            ("SHAPEBLOCK_AGENT_MAX_REQUEST_BODY_BYTES", "300".into()),
            (
                "SHAPEBLOCK_AGENT_ALLOWED_SUBRESOURCES",
                "exec,attach".into(),
            ),
            ("SHAPEBLOCK_AGENT_RECONNECT_MIN_MS", "5".into()),
            ("SHAPEBLOCK_AGENT_RECONNECT_MAX_MS", "60".into()),
            ("SHAPEBLOCK_AGENT_ALLOW_PLAINTEXT", "true".into()),
            ("SHAPEBLOCK_AGENT_LOG_FORMAT", "json".into()),
        ];
        crate::config::in_child_with_env(test, &env, || {
            let args = parse(&["--reconnect-max-ms=70"]);
            assert!(!format!("{args:?}").contains("env-secret-token"));
            let c = AgentConfig::load(args).unwrap();
            assert_eq!(c.connect_url, "ws://env-hub/agent/v1/connect");
            assert_eq!(c.token.read().unwrap().expose(), "env-secret-token");
            assert_eq!(c.hub_ca_file, Some("/env/ca.pem".into()));
            assert_eq!(
                c.kubeconfig,
                Some("/file/kubeconfig".into()),
                "the file beats the default"
            );
            assert_eq!(c.max_request_body_bytes, 300);
            assert_eq!(c.allowed_subresources, ["exec", "attach"]);
            assert_eq!(c.reconnect_min, Duration::from_millis(5));
            assert_eq!(
                c.reconnect_max,
                Duration::from_millis(70),
                "the flag beats the environment"
            );
            assert_eq!(c.log_format, LogFormat::Json);
        });
    }

    #[test]
    fn the_token_never_prints_from_flags_or_file() {
        let args = parse(&["--hub-url=wss://hub", "--token=flag-secret-token"]);
        let flags = format!("{args:?}");
        let from_flags = format!("{:?}", AgentConfig::load(args).unwrap());
        let path = file("secret", "hub_url: wss://hub\ntoken: file-secret-token\n");
        let from_file = format!(
            "{:?}",
            AgentConfig::load(AgentArgs {
                config: Some(path.clone()),
                ..Default::default()
            })
            .unwrap()
        );
        let file_contents = format!("{:?}", read_yaml::<AgentFile>(Some(&path)).unwrap());
        assert!(
            flags.contains("***") && file_contents.contains("***"),
            "{flags}"
        );
        for debug in [flags, from_flags, from_file, file_contents] {
            assert!(
                !debug.contains("flag-secret-token") && !debug.contains("file-secret-token"),
                "{debug}"
            );
        }
    }

    #[test]
    fn every_check_names_its_key() {
        for (extra, key) in [
            (&["--reconnect-min-ms=0"][..], "reconnect_min_ms"),
            (
                &["--reconnect-min-ms=10", "--reconnect-max-ms=5"],
                "reconnect_max_ms",
            ),
            (&["--max-request-body-bytes=0"], "max_request_body_bytes"),
            (&["--allowed-subresources=logs"], "allowed_subresources"),
            (&["--token="], "token"),
            (
                &["--token-file=/nonexistent/token"],
                "cannot read /nonexistent/token",
            ),
        ] {
            let mut flags = vec!["--hub-url=wss://hub"];
            if !extra.iter().any(|f| f.starts_with("--token")) {
                flags.push("--token=t");
            }
            flags.extend_from_slice(extra);
            let err = AgentConfig::load(parse(&flags)).unwrap_err().to_string();
            assert!(err.starts_with(key), "{flags:?}: {err}");
        }
        let err = AgentConfig::load(parse(&["--token=t"]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("hub_url: "), "{err}");
        let err = AgentConfig::load(parse(&["--hub-url=hub.example.com", "--token=t"]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("hub_url: "), "{err}");
    }
}
