//! The hub's configuration: a YAML file, environment variables and flags, in rising
//! precedence (flag > environment > file > default). Unknown file keys are rejected;
//! everything is validated once, here, at start-up, and errors name the key.
//! `config/hub.example.yaml` and the README's Configuration table document every key.
//!
//! The file's sections deserialize straight into the runtime types ([`GatewayConfig`],
//! [`RuntimeConfig`], [`ControllerConfig`], [`JobSettings`]), whose `Default` is the only
//! place their defaults are written; the hub's own top-level defaults are
//! [`HubConfig::default`], the relay's the `Default` of the private `relay:` section. Secrets
//! are [`Secret`] from the flag parser and the file on, so neither `HubArgs` nor `HubConfig`
//! can print one.
//!
//! [`RuntimeConfig`]: super::runtime::RuntimeConfig
//! [`ControllerConfig`]: crate::controllers::ControllerConfig
//! [`JobSettings`]: crate::render::jobs::JobSettings

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::TlsFiles;
use super::gateway::GatewayConfig;
use super::runtime::RuntimeConfig;
pub use crate::config::ConfigError;
use crate::config::{check, read_yaml};
use crate::controllers::ControllerConfig;
use crate::relay::outbound::RelayConfig;
use crate::secret::Secret;
use crate::telemetry::LogFormat;

/// Flags and environment variables of `shapeblock-hub serve`; each overrides the file key of
/// the same name. Secrets are parsed into [`Secret`], so `Debug` prints them as `***`.
#[derive(clap::Args, Debug, Default)]
pub struct HubArgs {
    /// YAML configuration file; flags and environment variables override its keys.
    #[arg(long, env = "SHAPEBLOCK_HUB_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address the API and the agent gateway listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "SHAPEBLOCK_HUB_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of a second, plain-HTTP listener serving only /metrics without a token, for a
    /// Prometheus inside the host's network [default: none; /metrics on the API listener
    /// needs an API token].
    #[arg(long, env = "SHAPEBLOCK_HUB_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
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
    /// PEM file of the CA certificate(s) that signed the hub's TLS certificate, when it is a
    /// private CA: embedded into install manifests (a ConfigMap the agent trusts instead of
    /// the web's roots) [default: none; agents trust the web's roots].
    #[arg(long, env = "SHAPEBLOCK_HUB_AGENT_HUB_CA_FILE")]
    pub agent_hub_ca_file: Option<PathBuf>,
    /// Render install manifests whose hub URL is loopback or plaintext (`ws://`), for a hub and
    /// agents on one machine or a trusted network. `--allow-insecure-hub-url` alone means true.
    #[arg(
        long,
        env = "SHAPEBLOCK_HUB_ALLOW_INSECURE_HUB_URL",
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub allow_insecure_hub_url: Option<bool>,
    /// Admin API tokens, comma-separated: plain tokens or `sha256:<hex>` hashes.
    #[arg(
        long,
        env = "SHAPEBLOCK_HUB_ADMIN_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub admin_tokens: Option<Vec<Secret>>,
    /// Read-only API tokens, comma-separated: plain tokens or `sha256:<hex>` hashes.
    #[arg(
        long,
        env = "SHAPEBLOCK_HUB_VIEWER_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub viewer_tokens: Option<Vec<Secret>>,
    /// Log format: text or json.
    #[arg(long, env = "SHAPEBLOCK_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// ShapeBlock server websocket the hub relays status events and build logs to.
    #[arg(long, env = "SHAPEBLOCK_HUB_RELAY_URL")]
    pub relay_url: Option<String>,
    /// API key for the relay.
    #[arg(long, env = "SHAPEBLOCK_HUB_RELAY_API_KEY", hide_env_values = true)]
    pub relay_api_key: Option<Secret>,
    /// File holding the token of the hub's own cluster (`local_cluster.token_file`): the hub
    /// registers that cluster under the token's id and manages it like any other, through the
    /// agent given the same token [default: none, no local cluster].
    #[arg(long, env = "SHAPEBLOCK_HUB_LOCAL_CLUSTER_TOKEN_FILE")]
    pub local_cluster_token_file: Option<PathBuf>,
}

/// The configuration file. Keys that a flag can override are `Option` (absent: the flag or
/// [`HubConfig::default`] decides); the flattened sections are the runtime types themselves.
/// (serde's `deny_unknown_fields` beside `flatten` works one level deep, which is why
/// `ControllerConfig` is flattened here rather than inside `RuntimeConfig`; the tests pin it.)
#[derive(Deserialize, Debug, Default)]
#[serde(default, deny_unknown_fields)]
struct HubFile {
    listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    public_url: Option<String>,
    agent_image: Option<String>,
    agent_hub_ca_file: Option<PathBuf>,
    allow_insecure_hub_url: Option<bool>,
    admin_tokens: Option<Vec<Secret>>,
    viewer_tokens: Option<Vec<Secret>>,
    log_format: Option<LogFormat>,
    max_request_body_bytes: Option<usize>,
    controllers: Option<bool>,
    events_capacity: Option<usize>,
    #[serde(flatten)]
    gateway: GatewayConfig,
    #[serde(flatten)]
    runtime: RuntimeConfig,
    /// `registry_source_namespace`, `default_registry_secret` and the `jobs:` section.
    #[serde(flatten)]
    controller_settings: ControllerConfig,
    relay: RelayFile,
    local_cluster: LocalClusterFile,
    agent_upgrades: crate::hub::upgrades::UpgradeConfig,
    kubectl: crate::hub::kubectl::KubectlConfig,
}

/// The `local_cluster:` section: the cluster the hub runs in, registered from here rather than
/// through the API (single tenant: one `helm install` deploys the hub and an agent beside it,
/// both given one token).
#[derive(Deserialize, Debug, Default)]
#[serde(default, deny_unknown_fields)]
struct LocalClusterFile {
    name: Option<String>,
    token_file: Option<PathBuf>,
}

/// The hub's own cluster, when configured.
#[derive(Clone, Debug)]
pub struct LocalCluster {
    /// Its name in the API (`local_cluster.name`, default `local`).
    pub name: String,
    /// The token its agent holds, read from `local_cluster.token_file` at start-up.
    pub token: Secret,
}

/// The local cluster of the file's section and the flag's token file (the flag wins); none
/// without a token file. The token is read and checked here, so a hub that could never accept
/// its own agent does not start.
fn local_cluster(
    file: LocalClusterFile,
    token_file: Option<PathBuf>,
) -> Result<Option<LocalCluster>, ConfigError> {
    let LocalClusterFile {
        name,
        token_file: file_token_file,
    } = file;
    let key = "local_cluster.token_file";
    let Some(path) = token_file.or(file_token_file) else {
        if name.is_some() {
            return Err(ConfigError::key(
                "local_cluster.name",
                "needs local_cluster.token_file (or --local-cluster-token-file)",
            ));
        }
        return Ok(None);
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| ConfigError::key(key, format!("cannot read {}: {e}", path.display())))?;
    let token = Secret::new(text.trim());
    check(
        crate::hub::registry::well_formed_token(token.expose()),
        key,
        format!(
            "{} does not hold a cluster token (sbt_c<16 hex digits>_<64 hex digits>)",
            path.display()
        ),
    )?;
    let name = name.unwrap_or_else(|| "local".to_string());
    if let Some(problem) = crate::hub::registry::name_problem(&name) {
        return Err(ConfigError::key("local_cluster.name", problem));
    }
    Ok(Some(LocalCluster { name, token }))
}

/// The `relay:` section. Its URL and key may come from flags, and the relay is off without a
/// URL, so it is not a [`RelayConfig`] until merged; its `Default` is the relay's defaults.
#[derive(Deserialize, Debug)]
#[serde(default, deny_unknown_fields)]
struct RelayFile {
    url: Option<String>,
    api_key: Option<Secret>,
    buffer: usize,
    #[serde(
        rename = "ping_interval_seconds",
        deserialize_with = "crate::config::seconds"
    )]
    ping_interval: Duration,
    #[serde(
        rename = "write_timeout_seconds",
        deserialize_with = "crate::config::seconds"
    )]
    write_timeout: Duration,
    ca_file: Option<PathBuf>,
    /// `ws://` URLs are refused unless this is set (a trusted network, or a test).
    allow_plaintext: bool,
    /// Also send the key as `api_key` in the URL's query, for a server that reads it there.
    api_key_in_query: bool,
}

impl Default for RelayFile {
    fn default() -> Self {
        Self {
            url: None,
            api_key: None,
            buffer: 1024,
            ping_interval: Duration::from_secs(20),
            write_timeout: Duration::from_secs(60),
            ca_file: None,
            allow_plaintext: false,
            api_key_in_query: false,
        }
    }
}

impl RelayFile {
    /// The relay with the flags' URL and key over the file's; `None` (off) without a URL.
    fn merge(
        self,
        url: Option<String>,
        api_key: Option<Secret>,
    ) -> Result<Option<RelayConfig>, ConfigError> {
        let Self {
            url: file_url,
            api_key: file_api_key,
            buffer,
            ping_interval,
            write_timeout,
            ca_file,
            allow_plaintext,
            api_key_in_query,
        } = self;
        let Some(url) = url.or(file_url) else {
            return Ok(None);
        };
        let api_key = api_key.or(file_api_key).ok_or_else(|| {
            ConfigError::key(
                "relay.api_key",
                "required with relay.url (or --relay-api-key / SHAPEBLOCK_HUB_RELAY_API_KEY)",
            )
        })?;
        // One check of the URL, here where relay.allow_plaintext is still known.
        let scheme_ok = url.starts_with("wss://") || (allow_plaintext && url.starts_with("ws://"));
        let has_host = url
            .parse::<http::Uri>()
            .ok()
            .is_some_and(|u| u.host().is_some());
        check(
            scheme_ok && has_host,
            "relay.url",
            if !scheme_ok && url.starts_with("ws://") {
                format!(
                    "{url:?} is not encrypted and would carry the API key in clear: use wss:// \
                     (or set relay.allow_plaintext: true on a trusted network)"
                )
            } else {
                format!("{url:?} must be a wss:// URL with a host")
            },
        )?;
        Ok(Some(RelayConfig {
            url,
            api_key_in_query,
            api_key,
            // An empty queue could never hand an event over: the smallest that works.
            buffer: buffer.max(1),
            ping_interval,
            write_timeout,
            ca_file,
        }))
    }
}

/// An API token as configured: the hub keeps only its hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenHash(pub String);

impl TokenHash {
    fn parse(value: &str, key: &str) -> Result<Self, ConfigError> {
        if let Some(hex) = value.strip_prefix("sha256:") {
            check(
                hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()),
                key,
                "a sha256: hash needs 64 hex digits",
            )?;
            return Ok(Self(format!("sha256:{}", hex.to_ascii_lowercase())));
        }
        check(
            value.len() >= 16,
            key,
            "tokens must be at least 16 characters",
        )?;
        Ok(Self(hash_token(value)))
    }
}

/// The hashes of a token list; blank entries (a trailing comma in the environment) are skipped.
fn token_hashes(key: &str, tokens: Option<Vec<Secret>>) -> Result<Vec<TokenHash>, ConfigError> {
    tokens
        .unwrap_or_default()
        .iter()
        .map(|token| token.expose().trim())
        .filter(|token| !token.is_empty())
        .map(|token| TokenHash::parse(token, key))
        .collect()
}

pub use crate::secret::hash_token;

/// The validated hub configuration.
#[derive(Clone, Debug)]
pub struct HubConfig {
    pub listen: SocketAddr,
    /// Where `/metrics` is also served, unauthenticated (never the Ingress' port).
    pub metrics_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub tls: Option<TlsFiles>,
    pub public_url: Option<String>,
    pub agent_image: String,
    /// The CA certificates (PEM, checked at start-up) install manifests tell agents to trust
    /// for the hub (`agent_hub_ca_file`).
    pub agent_hub_ca: Option<String>,
    /// Install manifests may tell agents to dial a loopback or `ws://` URL.
    pub allow_insecure_hub_url: bool,
    pub admin_tokens: Vec<TokenHash>,
    pub viewer_tokens: Vec<TokenHash>,
    pub log_format: LogFormat,
    pub max_request_body_bytes: usize,
    pub gateway: GatewayConfig,
    /// Run the controllers for connected clusters (off only for tunnel-only set-ups and tests).
    pub controllers: bool,
    pub runtime: RuntimeConfig,
    /// The outbound relay to the ShapeBlock server (off when no URL is configured).
    pub relay: Option<RelayConfig>,
    /// Status events kept for `/api/v1/events` consumers resuming from a cursor.
    pub events_capacity: usize,
    /// The hub's own cluster (`local_cluster`), registered at start-up.
    pub local_cluster: Option<LocalCluster>,
    /// Fleet upgrades of agents to `agent_image` (`agent_upgrades`).
    pub agent_upgrades: crate::hub::upgrades::UpgradeConfig,
    /// kubectl through the hub: token lifetimes, audit records kept (`kubectl`).
    pub kubectl: crate::hub::kubectl::KubectlConfig,
}

/// Default agent image: the one released with this hub.
pub fn default_agent_image() -> String {
    format!(
        "ghcr.io/shapeblock/shapeblock-agent:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// The embedded defaults: what the hub runs on with no file, flag or environment variable.
impl Default for HubConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_listen: None,
            data_dir: PathBuf::from("shapeblock-data"),
            tls: None,
            public_url: None,
            agent_image: default_agent_image(),
            agent_hub_ca: None,
            allow_insecure_hub_url: false,
            admin_tokens: Vec::new(),
            viewer_tokens: Vec::new(),
            log_format: LogFormat::default(),
            max_request_body_bytes: 1024 * 1024,
            gateway: GatewayConfig::default(),
            controllers: true,
            runtime: RuntimeConfig::default(),
            relay: None,
            events_capacity: 10_000,
            local_cluster: None,
            agent_upgrades: Default::default(),
            kubectl: Default::default(),
        }
    }
}

impl HubConfig {
    /// Merges file, environment and flags (flags and environment win) and validates.
    pub fn load(args: HubArgs) -> Result<Self, ConfigError> {
        // Destructured so that a new flag cannot be left out of the merge unnoticed.
        let HubArgs {
            config,
            listen,
            metrics_listen,
            data_dir,
            tls_cert_file,
            tls_key_file,
            public_url,
            agent_image,
            agent_hub_ca_file,
            allow_insecure_hub_url,
            admin_tokens,
            viewer_tokens,
            log_format,
            relay_url,
            relay_api_key,
            local_cluster_token_file,
        } = args;
        let file: HubFile = read_yaml(config.as_deref())?;
        let defaults = Self::default();
        let config = Self {
            listen: listen.or(file.listen).unwrap_or(defaults.listen),
            metrics_listen: metrics_listen.or(file.metrics_listen),
            data_dir: data_dir.or(file.data_dir).unwrap_or(defaults.data_dir),
            tls: tls_files(
                tls_cert_file.or(file.tls_cert_file),
                tls_key_file.or(file.tls_key_file),
            )?,
            public_url: public_url.or(file.public_url),
            agent_image: agent_image
                .or(file.agent_image)
                .unwrap_or(defaults.agent_image),
            agent_hub_ca: agent_hub_ca_file
                .or(file.agent_hub_ca_file)
                .map(|path| read_ca_file(&path))
                .transpose()?,
            allow_insecure_hub_url: allow_insecure_hub_url
                .or(file.allow_insecure_hub_url)
                .unwrap_or(defaults.allow_insecure_hub_url),
            admin_tokens: token_hashes("admin_tokens", admin_tokens.or(file.admin_tokens))?,
            viewer_tokens: token_hashes("viewer_tokens", viewer_tokens.or(file.viewer_tokens))?,
            log_format: log_format
                .or(file.log_format)
                .unwrap_or(defaults.log_format),
            max_request_body_bytes: file
                .max_request_body_bytes
                .unwrap_or(defaults.max_request_body_bytes),
            gateway: file.gateway,
            controllers: file.controllers.unwrap_or(defaults.controllers),
            runtime: RuntimeConfig {
                controllers: file.controller_settings,
                ..file.runtime
            },
            relay: file.relay.merge(relay_url, relay_api_key)?,
            events_capacity: file.events_capacity.unwrap_or(defaults.events_capacity),
            local_cluster: local_cluster(file.local_cluster, local_cluster_token_file)?,
            agent_upgrades: file.agent_upgrades,
            kubectl: file.kubectl,
        };
        config.validate()?;
        Ok(config)
    }

    /// The checks a merged configuration must pass, each naming its key as in the file.
    fn validate(&self) -> Result<(), ConfigError> {
        let Self {
            listen,
            metrics_listen,
            data_dir: _,
            tls: _,
            public_url,
            agent_image: _,
            agent_hub_ca: _,
            allow_insecure_hub_url: _,
            admin_tokens: _,
            viewer_tokens: _,
            log_format: _,
            max_request_body_bytes,
            gateway,
            controllers: _,
            runtime,
            relay,
            events_capacity,
            local_cluster: _,
            agent_upgrades,
            kubectl,
        } = self;
        check(
            *metrics_listen != Some(*listen),
            "metrics_listen",
            "must differ from listen (the API port serves /metrics behind a token)",
        )?;
        if let Some(url) = public_url {
            let ok = url.parse::<http::Uri>().ok().is_some_and(|u| {
                matches!(u.scheme_str(), Some("wss" | "ws" | "https" | "http"))
                    && u.authority().is_some()
            });
            check(
                ok,
                "public_url",
                format!("{url:?} must be a wss:// (or https://) URL with a host"),
            )?;
        }
        check(
            *max_request_body_bytes >= 1024,
            "max_request_body_bytes",
            "must be at least 1024",
        )?;
        for (key, duration) in [
            ("handshake_timeout_seconds", gateway.handshake_timeout),
            ("ping_interval_seconds", gateway.ping_interval),
            ("ping_timeout_seconds", gateway.ping_timeout),
        ] {
            check(!duration.is_zero(), key, "must be positive")?;
        }
        for (key, rate) in [
            ("handshakes_per_second", gateway.handshakes_per_second),
            (
                "handshakes_per_second_per_ip",
                gateway.handshakes_per_second_per_ip,
            ),
            ("api_qps_per_cluster", gateway.api_qps),
        ] {
            check(rate > 0, key, "must be positive")?;
        }
        for (key, limit) in [
            (
                "long_running_requests_per_cluster",
                gateway.long_running_requests_per_cluster,
            ),
            (
                "long_running_requests_per_token",
                gateway.long_running_requests_per_token,
            ),
        ] {
            check(limit > 0, key, "must be positive")?;
        }
        check(
            runtime.max_concurrent_initial_syncs > 0,
            "max_concurrent_initial_syncs",
            "must be positive",
        )?;
        check(
            (1..=256).contains(&runtime.shards),
            "shards",
            "must be between 1 and 256",
        )?;
        validate_jobs(&runtime.controllers.jobs)?;
        validate_apps(&runtime.controllers.apps)?;
        if let Some(relay) = relay {
            check(
                !relay.ping_interval.is_zero(),
                "relay.ping_interval_seconds",
                "must be positive",
            )?;
            check(
                !relay.write_timeout.is_zero(),
                "relay.write_timeout_seconds",
                "must be positive",
            )?;
        }
        check(
            agent_upgrades.max_concurrent > 0,
            "agent_upgrades.max_concurrent",
            "must be positive",
        )?;
        check(
            agent_upgrades.max_failures > 0,
            "agent_upgrades.max_failures",
            "must be positive",
        )?;
        check(
            !agent_upgrades.timeout.is_zero(),
            "agent_upgrades.timeout_seconds",
            "must be positive",
        )?;
        check(
            !kubectl.token_ttl.is_zero() && kubectl.token_ttl <= kubectl.max_token_ttl,
            "kubectl.token_ttl_seconds",
            "must be positive and at most kubectl.max_token_ttl_seconds",
        )?;
        check(
            kubectl.audit_capacity > 0,
            "kubectl.audit_capacity",
            "must be positive",
        )?;
        check(*events_capacity > 0, "events_capacity", "must be positive")
    }
}

/// TLS from the certificate and key, which go together.
/// The text of `agent_hub_ca_file`, once it is known to hold only PEM certificates that are
/// usable as trust anchors: an agent handed anything else (a key, a truncated file) would
/// fail every connection, far from this mistake.
pub fn read_ca_file(path: &std::path::Path) -> Result<String, ConfigError> {
    let key = "agent_hub_ca_file";
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::key(key, format!("cannot read {}: {e}", path.display())))?;
    check_ca_pem(&text)
        .map_err(|reason| ConfigError::key(key, format!("{}: {reason}", path.display())))?;
    Ok(text)
}

/// Whether `text` is one or more PEM certificates, each a valid trust anchor (pure).
pub fn check_ca_pem(text: &str) -> Result<(), String> {
    use rustls_pki_types::pem::{PemObject, SectionKind};
    let mut roots = rustls::RootCertStore::empty();
    let mut count = 0;
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(text.as_bytes()) {
        let (kind, der) = section.map_err(|e| format!("not PEM: {e}"))?;
        if kind != SectionKind::Certificate {
            return Err(format!(
                "holds a {kind:?} section; only CERTIFICATE sections are allowed (never a key)"
            ));
        }
        roots
            .add(rustls_pki_types::CertificateDer::from(der))
            .map_err(|e| format!("certificate {} is not usable as a CA: {e}", count + 1))?;
        count += 1;
    }
    if count == 0 {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(())
}

fn tls_files(
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert_file, key_file) {
        (Some(cert_file), Some(key_file)) => Ok(Some(TlsFiles {
            cert_file,
            key_file,
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::key(
            "tls_key_file",
            "missing: tls_cert_file and tls_key_file go together",
        )),
        (None, Some(_)) => Err(ConfigError::key(
            "tls_cert_file",
            "missing: tls_cert_file and tls_key_file go together",
        )),
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
        ImageRef::parse(image).map_err(|e| ConfigError::key(key, e.to_string()))?;
    }
    check(
        crate::render::jobs::Chart::parse(&jobs.app_chart).is_some(),
        "jobs.app_chart",
        format!(
            "{:?} must be oci://… or <https repository URL>#<chart name>",
            jobs.app_chart
        ),
    )?;
    for (key, seconds) in [
        ("jobs.build_deadline_seconds", jobs.build_deadline_seconds),
        ("jobs.helm_timeout_seconds", jobs.helm_timeout_seconds),
        (
            "jobs.ttl_seconds_after_finished",
            i64::from(jobs.ttl_seconds_after_finished),
        ),
    ] {
        check(seconds > 0, key, "must be positive")?;
    }
    Ok(())
}

/// Checks the `apps:` section: issuer and class are Kubernetes object names, builds are kept.
fn validate_apps(apps: &crate::render::app::AppSettings) -> Result<(), ConfigError> {
    let is_name = |n: &str| {
        !n.is_empty()
            && n.len() <= 253
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !n.starts_with(['-', '.'])
            && !n.ends_with(['-', '.'])
    };
    for (key, value) in [
        ("apps.tls_issuer", &apps.tls_issuer),
        ("apps.ingress_class", &apps.ingress_class),
    ] {
        if let Some(value) = value {
            check(
                is_name(value),
                key,
                format!(
                    "{value:?} must be a Kubernetes object name (lowercase letters, digits, '-' and '.')"
                ),
            )?;
        }
    }
    check(
        apps.keep_builds >= 1,
        "apps.keep_builds",
        "must be at least 1",
    )
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
        Ok(token) => TokenHash::parse(token.trim(), &path.display().to_string()),
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

    /// A file of its own for each call: the tests run in parallel.
    fn write(name: &str, body: &str) -> PathBuf {
        static FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("sb-hub-{}-{name}-{n}.yaml", std::process::id()));
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
        assert_eq!(settings.kubectl.token_ttl, Duration::from_secs(3600));
        assert_eq!(settings.kubectl.max_token_ttl, Duration::from_secs(86_400));
        assert_eq!(settings.kubectl.audit_capacity, 10_000);
        assert_eq!(
            settings.runtime.controllers.jobs,
            crate::render::jobs::JobSettings::default(),
            "the example lists the defaults"
        );
        assert_eq!(
            settings.runtime.controllers.apps,
            crate::render::app::AppSettings::default(),
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
            ("apps: {tls_issuer: 'Lets Encrypt'}\n", "apps.tls_issuer"),
            ("apps: {keep_builds: 0}\n", "apps.keep_builds"),
            ("apps: {chart: helm}\n", "chart"),
            ("jobs: {gitimage: x}\n", "gitimage"),
            // Removed keys are unknown keys: the creator now drops to the builder image's
            // own user, so a configured one would be ignored silently otherwise.
            ("jobs: {builder_uid: 1001}\n", "unknown field `builder_uid`"),
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

    #[test]
    fn the_local_cluster_comes_from_its_token_file() {
        let token = format!("sbt_c0123456789abcdef_{}", "ab".repeat(32));
        // A Secret's file may end in a newline; the token is the trimmed text.
        let file = write("local-token", &format!("{token}\n"));
        let config = load(&format!(
            "local_cluster: {{name: home, token_file: {}}}\n",
            file.display()
        ))
        .unwrap();
        let local = config.local_cluster.as_ref().unwrap();
        assert_eq!(
            (local.name.as_str(), local.token.expose()),
            ("home", token.as_str())
        );
        assert!(!format!("{config:?}").contains(&token));
        // The flag alone, with the default name.
        let config = HubConfig::load(parse(&[
            "--local-cluster-token-file",
            file.to_str().unwrap(),
        ]))
        .unwrap();
        assert_eq!(config.local_cluster.unwrap().name, "local");
        assert!(
            HubConfig::load(HubArgs::default())
                .unwrap()
                .local_cluster
                .is_none()
        );
        for (body, expected) in [
            (
                "local_cluster: {name: home}\n".to_string(),
                "needs local_cluster.token_file",
            ),
            (
                "local_cluster: {token_file: /nonexistent/token}\n".to_string(),
                "cannot read /nonexistent/token",
            ),
            (
                format!(
                    "local_cluster: {{token_file: {}}}\n",
                    write("local-bad", "sbt_short_token").display()
                ),
                "does not hold a cluster token",
            ),
        ] {
            let err = load(&body).unwrap_err().to_string();
            assert!(err.contains(expected), "{body}: {err}");
            assert!(err.contains("local_cluster"), "{err}");
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: HubArgs,
    }

    fn parse(flags: &[&str]) -> HubArgs {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("shapeblock-hub").chain(flags.iter().copied()))
            .unwrap()
            .args
    }

    fn load(body: &str) -> Result<HubConfig, ConfigError> {
        HubConfig::load(HubArgs {
            config: Some(write("load", body)),
            ..Default::default()
        })
    }

    #[test]
    fn no_configuration_is_the_embedded_defaults() {
        let config = HubConfig::load(HubArgs::default()).unwrap();
        let defaults = HubConfig::default();
        assert_eq!(config.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.data_dir, PathBuf::from("shapeblock-data"));
        assert!(config.tls.is_none() && config.public_url.is_none() && config.relay.is_none());
        assert_eq!(config.agent_image, default_agent_image());
        assert!(config.admin_tokens.is_empty() && config.viewer_tokens.is_empty());
        assert_eq!(config.log_format, LogFormat::Text);
        assert_eq!(config.max_request_body_bytes, 1024 * 1024);
        assert!(config.controllers);
        assert_eq!(config.events_capacity, 10_000);
        assert_eq!(
            format!("{:?}", config.gateway),
            format!("{:?}", defaults.gateway)
        );
        assert_eq!(config.gateway.handshake_timeout, Duration::from_secs(10));
        assert_eq!(config.gateway.api_qps, 50);
        assert_eq!(
            format!("{:?}", config.runtime),
            format!("{:?}", defaults.runtime)
        );
        // An empty file is no file.
        assert_eq!(format!("{:?}", load("").unwrap()), format!("{config:?}"));
    }

    #[test]
    fn a_plaintext_relay_needs_allow_plaintext_and_the_key_stays_out_of_the_query() {
        let relay = "relay: {url: 'ws://s.example.com/ws', api_key: k}\n";
        let err = load(relay).unwrap_err().to_string();
        assert!(
            err.contains("relay.url") && err.contains("relay.allow_plaintext"),
            "{err}"
        );
        let relay =
            load("relay: {url: 'ws://s.example.com/ws', api_key: k, allow_plaintext: true}\n")
                .unwrap()
                .relay
                .unwrap();
        assert_eq!(relay.url, "ws://s.example.com/ws");
        assert!(
            !relay.api_key_in_query,
            "the key is in the query only when asked for"
        );
        let relay =
            load("relay: {url: 'wss://s.example.com/ws', api_key: k, api_key_in_query: true}\n")
                .unwrap()
                .relay
                .unwrap();
        assert!(relay.api_key_in_query);
        let err = load("relay: {url: 'https://s.example.com/ws', api_key: k}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("must be a wss:// URL"), "{err}");
    }

    #[test]
    fn file_sections_fill_the_runtime_types() {
        let config = load(
            "handshake_timeout_seconds: 3\nhandshakes_per_second: 7\n\
             handshakes_per_second_per_ip: 2\ntrust_forwarded_for: true\n\
             ping_interval_seconds: 4\nping_timeout_seconds: 5\napi_qps_per_cluster: 9\n\
             controllers: false\nmax_concurrent_initial_syncs: 3\nshards: 5\n\
             registry_source_namespace: regs\ndefault_registry_secret: creds\n\
             jobs: {helm_image: 'alpine/helm:3.20.0'}\nevents_capacity: 12\n\
             max_request_body_bytes: 2048\n\
             relay: {url: 'wss://s.example.com/ws', api_key: k, buffer: 0, \
             ping_interval_seconds: 6, write_timeout_seconds: 8, ca_file: /ca.pem}\n",
        )
        .unwrap();
        let gateway = &config.gateway;
        assert_eq!(gateway.handshake_timeout, Duration::from_secs(3));
        assert_eq!(gateway.handshakes_per_second, 7);
        assert_eq!(gateway.handshakes_per_second_per_ip, 2);
        assert!(gateway.trust_forwarded_for);
        assert_eq!(gateway.ping_interval, Duration::from_secs(4));
        assert_eq!(gateway.ping_timeout, Duration::from_secs(5));
        assert_eq!(gateway.api_qps, 9);
        assert!(!config.controllers);
        assert_eq!(config.runtime.max_concurrent_initial_syncs, 3);
        assert_eq!(config.runtime.shards, 5);
        let controllers = &config.runtime.controllers;
        assert_eq!(controllers.registry_source_namespace, "regs");
        assert_eq!(controllers.default_registry_secret, "creds");
        assert_eq!(controllers.jobs.helm_image, "alpine/helm:3.20.0");
        assert_eq!(
            controllers.jobs.git_image,
            crate::render::jobs::JobSettings::default().git_image,
            "a key left out of jobs: keeps its default"
        );
        assert_eq!(config.events_capacity, 12);
        assert_eq!(config.max_request_body_bytes, 2048);
        let relay = config.relay.unwrap();
        assert_eq!(relay.url, "wss://s.example.com/ws");
        assert_eq!(relay.api_key.expose(), "k");
        assert_eq!(relay.buffer, 1, "an empty relay buffer is raised to one");
        assert_eq!(relay.ping_interval, Duration::from_secs(6));
        assert_eq!(relay.write_timeout, Duration::from_secs(8));
        assert_eq!(relay.ca_file, Some(PathBuf::from("/ca.pem")));
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file = write(
            "precedence",
            "listen: 0.0.0.0:9000\ndata_dir: /file/data\ntls_cert_file: /file/c.pem\n\
             tls_key_file: /file/k.pem\npublic_url: wss://file.example.com\n\
             agent_image: file/agent:1\nadmin_tokens: [file-admin-0123456789]\n\
             viewer_tokens: [file-viewer-0123456789]\nlog_format: json\n\
             relay: {url: 'wss://file.example.com/ws', api_key: file-relay-key}\n",
        );
        let from_file = HubConfig::load(HubArgs {
            config: Some(file.clone()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(from_file.listen.port(), 9000);
        assert_eq!(from_file.data_dir, PathBuf::from("/file/data"));
        let tls = from_file.tls.unwrap();
        assert_eq!(
            (tls.cert_file, tls.key_file),
            ("/file/c.pem".into(), "/file/k.pem".into())
        );
        assert_eq!(
            from_file.public_url.as_deref(),
            Some("wss://file.example.com")
        );
        assert_eq!(from_file.agent_image, "file/agent:1");
        assert_eq!(
            from_file.admin_tokens,
            [TokenHash(hash_token("file-admin-0123456789"))]
        );
        assert_eq!(
            from_file.viewer_tokens,
            [TokenHash(hash_token("file-viewer-0123456789"))]
        );
        assert_eq!(from_file.log_format, LogFormat::Json);
        let relay = from_file.relay.unwrap();
        assert_eq!(relay.url, "wss://file.example.com/ws");
        assert_eq!(relay.api_key.expose(), "file-relay-key");

        let mut args = parse(&[
            "--listen=127.0.0.1:7000",
            "--data-dir=/flag/data",
            "--tls-cert-file=/flag/c.pem",
            "--public-url=wss://flag.example.com",
            "--agent-image=flag/agent:2",
            "--admin-tokens=flag-admin-0123456789,,",
            "--viewer-tokens=",
            "--log-format=text",
            "--relay-url=wss://flag.example.com/ws",
            "--relay-api-key=flag-relay-key",
        ]);
        args.config = Some(file);
        let from_flags = HubConfig::load(args).unwrap();
        assert_eq!(from_flags.listen.port(), 7000);
        assert_eq!(from_flags.data_dir, PathBuf::from("/flag/data"));
        let tls = from_flags.tls.unwrap();
        assert_eq!(
            (tls.cert_file, tls.key_file),
            ("/flag/c.pem".into(), "/file/k.pem".into()),
            "each of the pair is merged on its own"
        );
        assert_eq!(
            from_flags.public_url.as_deref(),
            Some("wss://flag.example.com")
        );
        assert_eq!(from_flags.agent_image, "flag/agent:2");
        assert_eq!(
            from_flags.admin_tokens,
            [TokenHash(hash_token("flag-admin-0123456789"))],
            "a flag's list replaces the file's; blank entries are skipped"
        );
        assert!(
            from_flags.viewer_tokens.is_empty(),
            "an empty flag empties the list"
        );
        assert_eq!(from_flags.log_format, LogFormat::Text);
        let relay = from_flags.relay.unwrap();
        assert_eq!(relay.url, "wss://flag.example.com/ws");
        assert_eq!(relay.api_key.expose(), "flag-relay-key");

        // The relay's URL and key may come from different places.
        let config = HubConfig::load(HubArgs {
            config: Some(write("relay-url", "relay: {url: 'wss://s.example.com'}\n")),
            relay_api_key: Some(Secret::new("flag-relay-key")),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(config.relay.unwrap().api_key.expose(), "flag-relay-key");
        let err = HubConfig::load(HubArgs {
            relay_url: Some("wss://s.example.com".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("relay.api_key"), "{err}");
    }

    #[test]
    fn environment_sits_between_flags_and_file() {
        let test = concat!(module_path!(), "::environment_sits_between_flags_and_file");
        let test = test.split_once("::").map_or(test, |(_, t)| t);
        let file = write(
            "env",
            "listen: 0.0.0.0:9000\ndata_dir: /file/data\nagent_image: file/agent:1\n\
             relay: {url: 'wss://file.example.com/ws', api_key: file-relay-key}\n",
        );
        let env = [
            ("SHAPEBLOCK_HUB_CONFIG", file.display().to_string()),
            ("SHAPEBLOCK_HUB_LISTEN", "127.0.0.1:7001".into()),
            ("SHAPEBLOCK_HUB_DATA_DIR", "/env/data".into()),
            ("SHAPEBLOCK_HUB_TLS_CERT_FILE", "/env/c.pem".into()),
            ("SHAPEBLOCK_HUB_TLS_KEY_FILE", "/env/k.pem".into()),
            ("SHAPEBLOCK_HUB_PUBLIC_URL", "wss://env.example.com".into()),
            (
                "SHAPEBLOCK_HUB_ADMIN_TOKENS",
                "env-admin-0123456789,env-admin-9876543210".into(),
            ),
            (
                "SHAPEBLOCK_HUB_VIEWER_TOKENS",
                "env-viewer-0123456789".into(),
            ),
            ("SHAPEBLOCK_LOG_FORMAT", "json".into()),
            (
                "SHAPEBLOCK_HUB_RELAY_URL",
                "wss://env.example.com/ws".into(),
            ),
            ("SHAPEBLOCK_HUB_RELAY_API_KEY", "env-relay-key".into()),
        ];
        crate::config::in_child_with_env(test, &env, || {
            let args = parse(&["--listen=127.0.0.1:7002"]);
            let debug = format!("{args:?}");
            for secret in ["env-admin", "env-viewer", "env-relay-key"] {
                assert!(!debug.contains(secret), "{debug}");
            }
            let config = HubConfig::load(args).unwrap();
            assert_eq!(config.listen.port(), 7002, "the flag beats the environment");
            assert_eq!(config.data_dir, PathBuf::from("/env/data"));
            assert_eq!(
                config.agent_image, "file/agent:1",
                "the file beats the default"
            );
            let tls = config.tls.unwrap();
            assert_eq!(
                (tls.cert_file, tls.key_file),
                ("/env/c.pem".into(), "/env/k.pem".into())
            );
            assert_eq!(config.public_url.as_deref(), Some("wss://env.example.com"));
            assert_eq!(
                config.admin_tokens,
                [
                    TokenHash(hash_token("env-admin-0123456789")),
                    TokenHash(hash_token("env-admin-9876543210"))
                ]
            );
            assert_eq!(
                config.viewer_tokens,
                [TokenHash(hash_token("env-viewer-0123456789"))]
            );
            assert_eq!(config.log_format, LogFormat::Json);
            let relay = config.relay.unwrap();
            assert_eq!(relay.url, "wss://env.example.com/ws");
            assert_eq!(relay.api_key.expose(), "env-relay-key");
        });
    }

    #[test]
    fn secrets_never_print() {
        let secrets = [
            "flag-admin-0123456789",
            "flag-viewer-0123456789",
            "flag-relay-key",
            "file-admin-0123456789",
            "file-viewer-0123456789",
            "file-relay-key",
        ];
        let args = parse(&[
            "--admin-tokens=flag-admin-0123456789",
            "--viewer-tokens=flag-viewer-0123456789",
            "--relay-url=wss://s.example.com/ws",
            "--relay-api-key=flag-relay-key",
        ]);
        let flags = format!("{args:?}");
        let from_flags = format!("{:?}", HubConfig::load(args).unwrap());
        let file = write(
            "secrets",
            "admin_tokens: [file-admin-0123456789]\nviewer_tokens: [file-viewer-0123456789]\n\
             relay: {url: 'wss://s.example.com/ws', api_key: file-relay-key}\n",
        );
        let from_file = format!(
            "{:?}",
            HubConfig::load(HubArgs {
                config: Some(file.clone()),
                ..Default::default()
            })
            .unwrap()
        );
        let file_contents = format!("{:?}", read_yaml::<HubFile>(Some(&file)).unwrap());
        assert!(
            flags.contains("***") && from_file.contains("***"),
            "{flags}"
        );
        for debug in [flags, from_flags, from_file, file_contents] {
            for secret in secrets {
                assert!(!debug.contains(secret), "{secret} in {debug}");
            }
        }
        // Nor do errors about a secret show it.
        let err = HubConfig::load(parse(&["--viewer-tokens=short-secret"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("viewer_tokens") && !err.contains("short-secret"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_in_every_section() {
        for (body, unknown) in [
            ("handshake_timeout: 3\n", "handshake_timeout"),
            ("api_qps: 3\n", "api_qps"),
            ("gateway: {}\n", "gateway"),
            ("runtime: {}\n", "runtime"),
            ("jobs: {helm: x}\n", "helm"),
            ("relay: {url: 'wss://s', apikey: k}\n", "apikey"),
        ] {
            let err = load(body).unwrap_err().to_string();
            assert!(err.contains(unknown), "{body}: {err}");
        }
    }

    #[test]
    fn every_check_names_its_key() {
        for (body, key) in [
            ("max_request_body_bytes: 10\n", "max_request_body_bytes"),
            (
                "handshake_timeout_seconds: 0\n",
                "handshake_timeout_seconds",
            ),
            ("ping_interval_seconds: 0\n", "ping_interval_seconds"),
            ("ping_timeout_seconds: 0\n", "ping_timeout_seconds"),
            ("handshakes_per_second: 0\n", "handshakes_per_second"),
            (
                "handshakes_per_second_per_ip: 0\n",
                "handshakes_per_second_per_ip",
            ),
            ("api_qps_per_cluster: 0\n", "api_qps_per_cluster"),
            (
                "max_concurrent_initial_syncs: 0\n",
                "max_concurrent_initial_syncs",
            ),
            ("shards: 257\n", "shards"),
            ("events_capacity: 0\n", "events_capacity"),
            (
                "jobs: {helm_timeout_seconds: 0}\n",
                "jobs.helm_timeout_seconds",
            ),
            (
                "jobs: {ttl_seconds_after_finished: 0}\n",
                "jobs.ttl_seconds_after_finished",
            ),
            ("tls_key_file: k.pem\n", "tls_cert_file"),
            ("admin_tokens: ['sha256:abc']\n", "admin_tokens"),
            ("relay: {url: 'https://s', api_key: k}\n", "relay.url"),
            (
                "relay: {url: 'wss://s', api_key: k, ping_interval_seconds: 0}\n",
                "relay.ping_interval_seconds",
            ),
            (
                "relay: {url: 'wss://s', api_key: k, write_timeout_seconds: 0}\n",
                "relay.write_timeout_seconds",
            ),
        ] {
            let err = load(body).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{key}: ")), "{body}: {err}");
        }
        // Relay timings matter only with a relay.
        assert!(load("relay: {ping_interval_seconds: 0}\n").is_ok());
    }

    #[test]
    fn agent_hub_ca_file_must_hold_pem_certificates_only() {
        let dir = std::env::temp_dir().join(format!("hub-ca-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let good = dir.join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        assert_eq!(read_ca_file(&good).unwrap(), ca.pem());
        for (name, text, expected) in [
            ("empty.pem", String::new(), "no PEM certificate"),
            ("text.pem", "hello".to_string(), "no PEM certificate"),
            (
                "key.pem",
                format!("{}{}", ca.pem(), key.serialize_pem()),
                "only CERTIFICATE sections",
            ),
            (
                "broken.pem",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_string(),
                "not usable as a CA",
            ),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            let err = read_ca_file(&path).unwrap_err().to_string();
            assert!(
                err.starts_with("agent_hub_ca_file:") && err.contains(expected),
                "{name}: {err}"
            );
        }
        let missing = read_ca_file(&dir.join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("cannot read"), "{missing}");
    }
}
