//! The hub's configuration: a YAML file, environment variables and flags, in rising
//! precedence. Unknown file keys are rejected; everything is validated once at start-up.
//! `config/hub.example.yaml` documents every key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::gateway::GatewayConfig;
pub use crate::config::ConfigError;
use crate::config::read_yaml;
use crate::secret::Secret;
use crate::telemetry::LogFormat;

/// Flags and environment variables of `shapeblock-hub serve`.
#[derive(clap::Args, Debug, Default)]
pub struct HubArgs {
    /// YAML configuration file; flags and environment variables override its keys.
    #[arg(long, env = "SHAPEBLOCK_HUB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address the API and the agent gateway listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "SHAPEBLOCK_HUB_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the cluster registry [default: ./shapeblock-data].
    #[arg(long, env = "SHAPEBLOCK_HUB_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// PEM certificate chain to serve TLS with (plain HTTP when absent, e.g. behind an ingress).
    #[arg(long, env = "SHAPEBLOCK_HUB_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of the TLS certificate.
    #[arg(long, env = "SHAPEBLOCK_HUB_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// URL agents dial, written into install manifests, e.g. wss://hub.example.com.
    #[arg(long, env = "SHAPEBLOCK_HUB_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Agent image used in install manifests.
    #[arg(long, env = "SHAPEBLOCK_HUB_AGENT_IMAGE")]
    pub agent_image: Option<String>,
    /// Admin API tokens, comma-separated: plain tokens or `sha256:<hex>` hashes.
    #[arg(
        long,
        env = "SHAPEBLOCK_HUB_ADMIN_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub admin_tokens: Option<Vec<String>>,
    /// Read-only API tokens, comma-separated: plain tokens or `sha256:<hex>` hashes.
    #[arg(
        long,
        env = "SHAPEBLOCK_HUB_VIEWER_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub viewer_tokens: Option<Vec<String>>,
    /// Log format: text or json.
    #[arg(long, env = "SHAPEBLOCK_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// ShapeBlock server websocket the hub relays status events and build logs to.
    #[arg(long, env = "SHAPEBLOCK_HUB_RELAY_URL")]
    pub relay_url: Option<String>,
    /// API key for the relay.
    #[arg(long, env = "SHAPEBLOCK_HUB_RELAY_API_KEY", hide_env_values = true)]
    pub relay_api_key: Option<String>,
}

/// The configuration file, every key optional.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct HubFile {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    public_url: Option<String>,
    agent_image: Option<String>,
    admin_tokens: Option<Vec<Secret>>,
    viewer_tokens: Option<Vec<Secret>>,
    log_format: Option<LogFormat>,
    max_request_body_bytes: Option<usize>,
    handshake_timeout_seconds: Option<u64>,
    handshakes_per_second: Option<u32>,
    handshakes_per_second_per_ip: Option<u32>,
    trust_forwarded_for: Option<bool>,
    ping_interval_seconds: Option<u64>,
    ping_timeout_seconds: Option<u64>,
    api_qps_per_cluster: Option<u32>,
    controllers: Option<bool>,
    max_concurrent_initial_syncs: Option<usize>,
    registry_source_namespace: Option<String>,
    default_registry_secret: Option<String>,
    jobs: Option<crate::render::jobs::JobSettings>,
    shards: Option<usize>,
    relay: Option<RelayFile>,
    events_capacity: Option<usize>,
}

/// The `relay:` section.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RelayFile {
    url: Option<String>,
    api_key: Option<Secret>,
    buffer: Option<usize>,
    ping_interval_seconds: Option<u64>,
    write_timeout_seconds: Option<u64>,
    ca_file: Option<PathBuf>,
}

/// An API token as configured: the hub keeps only its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenHash(pub String);

impl TokenHash {
    fn parse(value: &str, key: &str) -> Result<Self, ConfigError> {
        if let Some(hex) = value.strip_prefix("sha256:") {
            if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ConfigError::Invalid(format!(
                    "{key}: a sha256: hash needs 64 hex digits"
                )));
            }
            return Ok(Self(format!("sha256:{}", hex.to_ascii_lowercase())));
        }
        if value.len() < 16 {
            return Err(ConfigError::Invalid(format!(
                "{key}: tokens must be at least 16 characters"
            )));
        }
        Ok(Self(hash_token(value)))
    }
}

pub use crate::secret::hash_token;

/// The validated hub configuration.
#[derive(Clone, Debug)]
pub struct HubConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls: Option<super::TlsFiles>,
    pub public_url: Option<String>,
    pub agent_image: String,
    pub admin_tokens: Vec<TokenHash>,
    pub viewer_tokens: Vec<TokenHash>,
    pub log_format: LogFormat,
    pub max_request_body_bytes: usize,
    pub gateway: GatewayConfig,
    /// Run the controllers for connected clusters (off only for tunnel-only set-ups and tests).
    pub controllers: bool,
    pub runtime: super::runtime::RuntimeConfig,
    /// The outbound relay to the ShapeBlock server (off when no URL is configured).
    pub relay: Option<crate::relay::outbound::RelayConfig>,
    /// Status events kept for `/api/v1/events` consumers resuming from a cursor.
    pub events_capacity: usize,
}

/// Default agent image: the one released with this hub.
pub fn default_agent_image() -> String {
    format!(
        "ghcr.io/shapeblock/shapeblock-agent:{}",
        env!("CARGO_PKG_VERSION")
    )
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("shapeblock-data"),
            tls: None,
            public_url: None,
            agent_image: default_agent_image(),
            admin_tokens: Vec::new(),
            viewer_tokens: Vec::new(),
            log_format: LogFormat::default(),
            max_request_body_bytes: 1024 * 1024,
            gateway: GatewayConfig::default(),
            controllers: true,
            runtime: super::runtime::RuntimeConfig::default(),
            relay: None,
            events_capacity: 10_000,
        }
    }
}

impl HubConfig {
    /// Merges file, environment and flags (flags and environment win) and validates.
    pub fn load(args: HubArgs) -> Result<Self, ConfigError> {
        let file: HubFile = read_yaml(args.config.as_deref())?;
        let tls = match (
            args.tls_cert_file.or(file.tls_cert_file),
            args.tls_key_file.or(file.tls_key_file),
        ) {
            (Some(cert_file), Some(key_file)) => Some(super::TlsFiles {
                cert_file,
                key_file,
            }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "tls_cert_file and tls_key_file go together".into(),
                ));
            }
        };
        let public_url = args.public_url.or(file.public_url);
        if let Some(url) = &public_url {
            let ok = url.parse::<http::Uri>().ok().is_some_and(|u| {
                matches!(u.scheme_str(), Some("wss" | "ws" | "https" | "http"))
                    && u.authority().is_some()
            });
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "public_url {url:?} must be a wss:// (or https://) URL with a host"
                )));
            }
        }
        let tokens = |cli: Option<Vec<String>>, file: Option<Vec<Secret>>, key: &str| {
            let values: Vec<String> = match cli {
                Some(values) => values,
                None => file
                    .unwrap_or_default()
                    .iter()
                    .map(|s| s.expose().to_string())
                    .collect(),
            };
            values
                .iter()
                .filter(|v| !v.trim().is_empty())
                .map(|v| TokenHash::parse(v.trim(), key))
                .collect::<Result<Vec<_>, _>>()
        };
        let admin_tokens = tokens(args.admin_tokens, file.admin_tokens, "admin_tokens")?;
        let viewer_tokens = tokens(args.viewer_tokens, file.viewer_tokens, "viewer_tokens")?;
        let seconds = |v: Option<u64>, default: u64, key: &str| -> Result<Duration, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(ConfigError::Invalid(format!("{key} must be positive"))),
                n => Ok(Duration::from_secs(n)),
            }
        };
        let defaults = GatewayConfig::default();
        let gateway = GatewayConfig {
            handshake_timeout: seconds(
                file.handshake_timeout_seconds,
                defaults.handshake_timeout.as_secs(),
                "handshake_timeout_seconds",
            )?,
            handshakes_per_second: file
                .handshakes_per_second
                .unwrap_or(defaults.handshakes_per_second),
            handshakes_per_second_per_ip: file
                .handshakes_per_second_per_ip
                .unwrap_or(defaults.handshakes_per_second_per_ip),
            ping_interval: seconds(
                file.ping_interval_seconds,
                defaults.ping_interval.as_secs(),
                "ping_interval_seconds",
            )?,
            api_qps: file.api_qps_per_cluster.unwrap_or(defaults.api_qps),
            trust_forwarded_for: file
                .trust_forwarded_for
                .unwrap_or(defaults.trust_forwarded_for),
            ping_timeout: seconds(
                file.ping_timeout_seconds,
                defaults.ping_timeout.as_secs(),
                "ping_timeout_seconds",
            )?,
        };
        if gateway.handshakes_per_second == 0
            || gateway.handshakes_per_second_per_ip == 0
            || gateway.api_qps == 0
        {
            return Err(ConfigError::Invalid(
                "handshake and API rates must be positive".into(),
            ));
        }
        let runtime_defaults = super::runtime::RuntimeConfig::default();
        let runtime = super::runtime::RuntimeConfig {
            max_concurrent_initial_syncs: file
                .max_concurrent_initial_syncs
                .unwrap_or(runtime_defaults.max_concurrent_initial_syncs),
            controllers: crate::controllers::ControllerConfig {
                registry_source_namespace: file
                    .registry_source_namespace
                    .unwrap_or(runtime_defaults.controllers.registry_source_namespace),
                default_registry_secret: file
                    .default_registry_secret
                    .unwrap_or(runtime_defaults.controllers.default_registry_secret),
                jobs: file.jobs.unwrap_or_default(),
            },
            shards: file.shards.unwrap_or(runtime_defaults.shards),
        };
        validate_jobs(&runtime.controllers.jobs)?;
        if runtime.shards == 0 || runtime.shards > 256 {
            return Err(ConfigError::Invalid(
                "shards must be between 1 and 256".into(),
            ));
        }
        if runtime.max_concurrent_initial_syncs == 0 {
            return Err(ConfigError::Invalid(
                "max_concurrent_initial_syncs must be positive".into(),
            ));
        }
        let relay_file = file.relay.unwrap_or_default();
        let relay = match (
            args.relay_url.or(relay_file.url),
            args.relay_api_key.map(Secret::new).or(relay_file.api_key),
        ) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(ConfigError::Invalid(
                    "relay.url needs relay.api_key (or SHAPEBLOCK_HUB_RELAY_API_KEY)".into(),
                ));
            }
            (Some(url), Some(api_key)) => {
                if !(url.starts_with("wss://") || url.starts_with("ws://"))
                    || url
                        .parse::<http::Uri>()
                        .ok()
                        .and_then(|u| u.host().map(str::to_owned))
                        .is_none()
                {
                    return Err(ConfigError::Invalid(format!(
                        "relay.url {url:?} must be a wss:// (or ws://) URL with a host"
                    )));
                }
                Some(crate::relay::outbound::RelayConfig {
                    url,
                    api_key,
                    buffer: relay_file.buffer.unwrap_or(1024).max(1),
                    ping_interval: seconds(
                        relay_file.ping_interval_seconds,
                        20,
                        "relay.ping_interval_seconds",
                    )?,
                    write_timeout: seconds(
                        relay_file.write_timeout_seconds,
                        60,
                        "relay.write_timeout_seconds",
                    )?,
                    ca_file: relay_file.ca_file,
                })
            }
        };
        let events_capacity = file.events_capacity.unwrap_or(10_000);
        if events_capacity == 0 {
            return Err(ConfigError::Invalid(
                "events_capacity must be positive".into(),
            ));
        }
        let max_request_body_bytes = file.max_request_body_bytes.unwrap_or(1024 * 1024);
        if max_request_body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "max_request_body_bytes must be at least 1024".into(),
            ));
        }
        Ok(Self {
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("shapeblock-data")),
            tls,
            public_url,
            agent_image: args
                .agent_image
                .or(file.agent_image)
                .unwrap_or_else(default_agent_image),
            admin_tokens,
            viewer_tokens,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            max_request_body_bytes,
            gateway,
            controllers: file.controllers.unwrap_or(true),
            runtime,
            relay,
            events_capacity,
        })
    }
}

/// Checks the `jobs:` section: images parse, the chart is a reference, durations are positive.
fn validate_jobs(jobs: &crate::render::jobs::JobSettings) -> Result<(), ConfigError> {
    use crate::render::image::ImageRef;
    for (key, image) in [
        ("jobs.git_image", &jobs.git_image),
        ("jobs.kaniko_image", &jobs.kaniko_image),
        ("jobs.builder_image", &jobs.builder_image),
        ("jobs.helm_image", &jobs.helm_image),
    ] {
        ImageRef::parse(image).map_err(|e| ConfigError::Invalid(format!("{key}: {e}")))?;
    }
    if crate::render::jobs::Chart::parse(&jobs.app_chart).is_none() {
        return Err(ConfigError::Invalid(format!(
            "jobs.app_chart {:?} must be oci://… or <https repository URL>#<chart name>",
            jobs.app_chart
        )));
    }
    if jobs.build_deadline_seconds <= 0
        || jobs.helm_timeout_seconds <= 0
        || jobs.ttl_seconds_after_finished <= 0
    {
        return Err(ConfigError::Invalid(
            "jobs.build_deadline_seconds, helm_timeout_seconds and ttl_seconds_after_finished must be positive".into(),
        ));
    }
    Ok(())
}

/// With no admin token configured, the hub uses the one in `<data_dir>/admin-token`, creating
/// it (mode 0600) on first start, so a hub started with no configuration is usable and safe.
pub fn bootstrap_admin_token(data_dir: &std::path::Path) -> Result<TokenHash, ConfigError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("admin-token");
    let io = |source| ConfigError::Read {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(token) => TokenHash::parse(token.trim(), "admin-token file"),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir).map_err(io)?;
            let token: String = (0..32)
                .map(|_| format!("{:02x}", rand::random::<u8>()))
                .collect();
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io)?;
            file.write_all(token.as_bytes())
                .and_then(|_| file.sync_all())
                .map_err(io)?;
            tracing::warn!(path = %path.display(), "no admin token configured: generated one; read it from this file");
            Ok(TokenHash(hash_token(&token)))
        }
        Err(source) => Err(ConfigError::Read { path, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, body: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("sb-hub-{}-{name}.yaml", std::process::id()));
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn the_example_configuration_is_valid() {
        let path = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/hub.example.yaml"
        ));
        let settings = HubConfig::load(HubArgs {
            config: Some(path),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            settings.public_url.as_deref(),
            Some("wss://hub.example.com")
        );
        assert_eq!(settings.admin_tokens.len(), 1);
        assert_eq!(settings.runtime.shards, 2);
        let relay = settings.relay.expect("the example configures the relay");
        assert_eq!(relay.buffer, 1024);
        assert_eq!(relay.ping_interval, Duration::from_secs(20));
        assert_eq!(settings.events_capacity, 10_000);
        assert_eq!(
            settings.runtime.controllers.jobs,
            crate::render::jobs::JobSettings::default(),
            "the example lists the defaults"
        );
    }

    #[test]
    fn job_settings_are_checked() {
        for (body, expected) in [
            ("jobs: {kaniko_image: 'Bad Image'}\n", "jobs.kaniko_image"),
            (
                "jobs: {app_chart: 'https://x.example.com'}\n",
                "jobs.app_chart",
            ),
            ("jobs: {build_deadline_seconds: 0}\n", "must be positive"),
            ("jobs: {gitimage: x}\n", "gitimage"),
            ("shards: 0\n", "shards"),
        ] {
            let err = HubConfig::load(HubArgs {
                config: Some(write("jobs", body)),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains(expected), "{body}: {err}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        let err = HubConfig::load(HubArgs {
            config: Some(write("typo", "listne: 0.0.0.0:1\n")),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("listne"), "{err}");
        let err = HubConfig::load(HubArgs {
            config: Some(write("short", "admin_tokens: [short]\n")),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("at least 16"), "{err}");
        let err = HubConfig::load(HubArgs {
            config: Some(write("url", "public_url: hub.example.com\n")),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("public_url"), "{err}");
        let err = HubConfig::load(HubArgs {
            tls_cert_file: Some("c.pem".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("go together"), "{err}");
    }

    #[test]
    fn flags_override_the_file_and_tokens_are_kept_hashed() {
        let path = write(
            "override",
            "listen: 0.0.0.0:9000\nadmin_tokens: [file-token-0123456789]\n",
        );
        let settings = HubConfig::load(HubArgs {
            config: Some(path),
            listen: Some("127.0.0.1:7000".parse().unwrap()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(settings.listen.port(), 7000);
        assert_eq!(
            settings.admin_tokens[0].0,
            hash_token("file-token-0123456789")
        );
        assert!(!format!("{settings:?}").contains("file-token-0123456789"));
    }
}
