//! The agent's one upstream: its own cluster's kube-apiserver, reached with the agent's own
//! credentials. In a pod it uses the mounted ServiceAccount (`KUBERNETES_SERVICE_HOST` and
//! `_PORT`, `ca.crt`, and the projected token, re-read as the kubelet rotates it); elsewhere a
//! kubeconfig whose user holds a bearer token, a token file or a client certificate.
//!
//! It is an HTTP/1.1 client with a connection pool, not a Kubernetes client: the agent only
//! forwards bytes, so it needs no API types, discovery, watchers or exec plugins (leaving the
//! kube client out is most of what keeps the agent's binary and memory small).
//!
//! Depends on: tunnel (TLS set-up).

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::proxy::{BoxError, ProxyBody};

/// What [`Upstream::send`] returns.
pub type UpstreamFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, BoxError>> + Send + 'a>>;

/// Where the agent sends the requests it forwards: its apiserver ([`Apiserver`]), or in the
/// load test a simulated cluster.
pub trait Upstream: Send + Sync + 'static {
    /// Sends `request` (its URI is a path and query) and returns the response as it streams.
    fn send(&self, request: Request<Full<Bytes>>) -> UpstreamFuture<'_>;
}

/// Where a pod's ServiceAccount is mounted.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// How long a token read from a file is used before the file is read again. The kubelet
/// rewrites a projected token when 80 % of its life (at least an hour) has passed.
const TOKEN_REREAD: Duration = Duration::from_secs(60);
/// How long opening a connection to the apiserver (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive on apiserver connections: probes after 30 s without traffic, every 10 s,
/// and the connection is dropped after 3 unanswered (a dead apiserver found within 60 s).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;
/// How long an unused pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// Why the agent cannot talk to its apiserver.
#[derive(Debug, thiserror::Error)]
pub enum ApiserverError {
    #[error(
        "not in a pod (KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are unset): give --kubeconfig"
    )]
    NotInCluster,
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("kubeconfig {}: {message}", path.display())]
    Kubeconfig { path: PathBuf, message: String },
    #[error("the apiserver's address {server:?}: {reason}")]
    Server {
        server: String,
        reason: &'static str,
    },
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
}

/// A client of this cluster's kube-apiserver.
pub struct Apiserver {
    scheme: Scheme,
    authority: Authority,
    /// A path the server URL has (a proxied apiserver), without its trailing slash.
    base_path: String,
    auth: Auth,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// How the agent proves who it is, besides a client certificate.
enum Auth {
    None,
    Bearer(HeaderValue),
    TokenFile(TokenFile),
}

impl Apiserver {
    /// The apiserver of the pod the agent runs in, with the pod's ServiceAccount.
    pub fn in_cluster() -> Result<Self, ApiserverError> {
        let (Ok(host), Ok(port)) = (
            std::env::var("KUBERNETES_SERVICE_HOST"),
            std::env::var("KUBERNETES_SERVICE_PORT"),
        ) else {
            return Err(ApiserverError::NotInCluster);
        };
        let host = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(_)) => format!("[{host}]"),
            _ => host,
        };
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        let ca = read(&dir.join("ca.crt"))?;
        let tls = tls_config(&dir.join("ca.crt"), Some(&ca), None)?;
        let token = TokenFile::open(dir.join("token"))?;
        Self::new(
            &format!("https://{host}:{port}"),
            tls,
            None,
            Auth::TokenFile(token),
        )
    }

    /// The apiserver of the current context of the kubeconfig at `path`.
    pub fn from_kubeconfig(path: &Path) -> Result<Self, ApiserverError> {
        let bad = |message: String| ApiserverError::Kubeconfig {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let config: Kubeconfig = serde_saphyr::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let (cluster, user) = config.current().map_err(bad)?;
        let anonymous = User::default();
        let user = user.unwrap_or(&anonymous);
        // Relative file names in a kubeconfig are relative to the kubeconfig (as kubectl reads them).
        let dir = path.parent().unwrap_or(Path::new("."));
        let resolve = |file: &PathBuf| dir.join(file);
        if cluster.insecure_skip_tls_verify == Some(true) {
            return Err(bad(
                "insecure-skip-tls-verify is refused: give the apiserver's certificate-authority"
                    .into(),
            ));
        }
        if cluster.proxy_url.is_some() {
            return Err(bad("proxy-url is not supported".into()));
        }
        if user.exec.is_some() || user.auth_provider.is_some() {
            return Err(bad(
                "exec and auth-provider credentials are not supported: give the agent a \
                 ServiceAccount token (token or tokenFile) or a client certificate"
                    .into(),
            ));
        }
        if user.username.is_some() || user.password.is_some() {
            return Err(bad("basic authentication is not supported".into()));
        }
        // A PEM given inline (base64 `<what>-data`, which wins) or as a file.
        let pem = |data: &Option<String>,
                   file: &Option<PathBuf>,
                   what: &str|
         -> Result<Option<Vec<u8>>, ApiserverError> {
            match (data, file) {
                (Some(data), _) => decode(data)
                    .map(Some)
                    .map_err(|e| bad(format!("{what}-data: {e}"))),
                (None, Some(file)) => read(&resolve(file)).map(Some),
                (None, None) => Ok(None),
            }
        };
        let ca = pem(
            &cluster.certificate_authority_data,
            &cluster.certificate_authority,
            "certificate-authority",
        )?;
        let cert = pem(
            &user.client_certificate_data,
            &user.client_certificate,
            "client-certificate",
        )?;
        let key = pem(&user.client_key_data, &user.client_key, "client-key")?;
        let identity = match (&cert, &key) {
            (Some(cert), Some(key)) => Some((cert.as_slice(), key.as_slice())),
            (None, None) => None,
            _ => {
                return Err(bad(
                    "a client certificate needs both its certificate and its key".into(),
                ));
            }
        };
        let tls = tls_config(path, ca.as_deref(), identity)?;
        let auth = match (&user.token, &user.token_file) {
            (Some(token), _) => Auth::Bearer(bearer(token.trim()).map_err(bad)?),
            (None, Some(file)) => Auth::TokenFile(TokenFile::open(resolve(file))?),
            (None, None) => Auth::None,
        };
        Self::new(&cluster.server, tls, cluster.tls_server_name.clone(), auth)
    }

    fn new(
        server: &str,
        tls: rustls::ClientConfig,
        server_name: Option<String>,
        auth: Auth,
    ) -> Result<Self, ApiserverError> {
        let refused = |reason| ApiserverError::Server {
            server: server.to_string(),
            reason,
        };
        let uri: Uri = server.parse().map_err(|_| refused("not a URL"))?;
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned())
        else {
            return Err(refused("not a URL with a scheme and a host"));
        };
        // Plain HTTP would show the agent's token to the network: only to this machine.
        let loopback = matches!(authority.host(), "localhost" | "127.0.0.1" | "[::1]");
        if scheme != Scheme::HTTPS && !(scheme == Scheme::HTTP && loopback) {
            return Err(refused(
                "the apiserver is reached over https (plain http only on loopback)",
            ));
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        // A watch waits on its connection for minutes: an apiserver that vanished without
        // closing it (a crashed node, a partition) is found by TCP keepalive within a minute,
        // and the watch ends with an error the hub's watcher re-lists after (the kube client's
        // 295 s read timeout did this before).
        http.set_keepalive(Some(KEEPALIVE_IDLE));
        http.set_keepalive_interval(Some(KEEPALIVE_INTERVAL));
        http.set_keepalive_retries(Some(KEEPALIVE_RETRIES));
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let builder = match server_name {
            Some(name) => {
                let name = ServerName::try_from(name)
                    .map_err(|_| refused("its tls-server-name is not a DNS name or IP address"))?;
                builder.with_server_name_resolver(move |_: &Uri| {
                    Ok::<_, std::convert::Infallible>(name.clone())
                })
            }
            None => builder,
        };
        let connector = builder.enable_http1().wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector);
        Ok(Self {
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_string(),
            auth,
            client,
        })
    }

    fn authorization(&self) -> Result<Option<HeaderValue>, BoxError> {
        Ok(match &self.auth {
            Auth::None => None,
            Auth::Bearer(value) => Some(value.clone()),
            Auth::TokenFile(file) => Some(file.header()?),
        })
    }
}

impl Upstream for Apiserver {
    fn send(&self, request: Request<Full<Bytes>>) -> UpstreamFuture<'_> {
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let path_and_query: PathAndQuery = if self.base_path.is_empty() {
                path_and_query.parse()?
            } else {
                format!("{}{path_and_query}", self.base_path).parse()?
            };
            parts.uri = Uri::builder()
                .scheme(self.scheme.clone())
                .authority(self.authority.clone())
                .path_and_query(path_and_query)
                .build()?;
            if let Some(value) = self.authorization()? {
                parts.headers.insert(header::AUTHORIZATION, value);
            }
            let response = self
                .client
                .request(Request::from_parts(parts, body))
                .await
                .map_err(|e| chain(&e))?;
            Ok(response.map(|body| body.map_err(|e| Box::new(e) as BoxError).boxed_unsync()))
        })
    }
}

/// An error with its causes, as one message (hyper's top-level messages say little alone).
fn chain(err: &(dyn std::error::Error + 'static)) -> BoxError {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message.into()
}

/// A token file, read again every [`TOKEN_REREAD`] so that a rotated token takes over.
struct TokenFile {
    path: PathBuf,
    current: Mutex<(Instant, HeaderValue)>,
}

impl TokenFile {
    fn open(path: PathBuf) -> Result<Self, ApiserverError> {
        let value = Self::read(&path)?;
        Ok(Self {
            path,
            current: Mutex::new((Instant::now(), value)),
        })
    }

    fn read(path: &Path) -> Result<HeaderValue, ApiserverError> {
        let token = std::fs::read_to_string(path).map_err(|e| ApiserverError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        bearer(token.trim()).map_err(|message| ApiserverError::File {
            path: path.to_path_buf(),
            message,
        })
    }

    /// The `Authorization` value, from a read at most [`TOKEN_REREAD`] old. A file that cannot
    /// be read again leaves the last token in use (and says so): the kubelet swaps it atomically.
    fn header(&self) -> Result<HeaderValue, BoxError> {
        let mut current = self.current.lock().map_err(|_| "token lock poisoned")?;
        if current.0.elapsed() >= TOKEN_REREAD {
            match Self::read(&self.path) {
                Ok(value) => *current = (Instant::now(), value),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot re-read the apiserver token; keeping the last one");
                    current.0 = Instant::now();
                }
            }
        }
        Ok(current.1.clone())
    }
}

fn bearer(token: &str) -> Result<HeaderValue, String> {
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    let mut value = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| "the token holds characters a header cannot carry".to_string())?;
    value.set_sensitive(true);
    Ok(value)
}

fn read(path: &Path) -> Result<Vec<u8>, ApiserverError> {
    std::fs::read(path).map_err(|e| ApiserverError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn decode(data: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::STANDARD.decode(data.trim())
}

/// TLS to the apiserver: trusting the CA certificates in `ca` (PEM) or, without one, the web
/// PKI roots (a managed apiserver with a public certificate); presenting `identity` (the PEM
/// certificate chain and key) if given. `source` names where they came from, for errors.
fn tls_config(
    source: &Path,
    ca: Option<&[u8]>,
    identity: Option<(&[u8], &[u8])>,
) -> Result<rustls::ClientConfig, ApiserverError> {
    let bad = |message: String| ApiserverError::File {
        path: source.to_path_buf(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| bad(format!("certificate authority: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("certificate authority: {e}")))?;
            }
            if roots.is_empty() {
                return Err(bad("the certificate authority holds no certificate".into()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(crate::tunnel::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("client certificate: {e}")))?;
            if chain.is_empty() {
                return Err(bad("the client certificate holds no certificate".into()));
            }
            let key =
                PrivateKeyDer::from_pem_slice(key).map_err(|e| bad(format!("client key: {e}")))?;
            builder.with_client_auth_cert(chain, key)?
        }
    })
}

/// The parts of a kubeconfig the agent reads (everything else is ignored).
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Kubeconfig {
    current_context: Option<String>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    users: Vec<NamedUser>,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    context: Context,
}

#[derive(Deserialize)]
struct Context {
    cluster: String,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Cluster {
    server: String,
    certificate_authority: Option<PathBuf>,
    certificate_authority_data: Option<String>,
    insecure_skip_tls_verify: Option<bool>,
    tls_server_name: Option<String>,
    proxy_url: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    user: User,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct User {
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<PathBuf>,
    client_certificate: Option<PathBuf>,
    client_certificate_data: Option<String>,
    client_key: Option<PathBuf>,
    client_key_data: Option<String>,
    exec: Option<IgnoredAny>,
    auth_provider: Option<IgnoredAny>,
    username: Option<IgnoredAny>,
    password: Option<IgnoredAny>,
}

impl Kubeconfig {
    /// The cluster and user of the current context (or of the only context there is).
    fn current(&self) -> Result<(&Cluster, Option<&User>), String> {
        // An empty current-context is none, as kubectl reads it.
        let context = match self
            .current_context
            .as_ref()
            .filter(|name| !name.is_empty())
        {
            Some(name) => self
                .contexts
                .iter()
                .find(|c| &c.name == name)
                .ok_or_else(|| format!("current-context {name:?} is not among its contexts"))?,
            None => match self.contexts.as_slice() {
                [only] => only,
                _ => return Err("no current-context".into()),
            },
        };
        let cluster = self
            .clusters
            .iter()
            .find(|c| c.name == context.context.cluster)
            .map(|c| &c.cluster)
            .ok_or_else(|| {
                format!(
                    "cluster {:?} is not among its clusters",
                    context.context.cluster
                )
            })?;
        let user = match &context.context.user {
            None => None,
            Some(name) => Some(
                self.users
                    .iter()
                    .find(|u| &u.name == name)
                    .map(|u| &u.user)
                    .ok_or_else(|| format!("user {name:?} is not among its users"))?,
            ),
        };
        Ok((cluster, user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::tunnel::tls::tests::{temp_dir, write};

    const CONTEXTS: &str = "contexts:\n- name: a\n  context:\n    cluster: one\n    user: u\n\
                            - name: b\n  context:\n    cluster: two\n";

    #[test]
    fn the_current_context_names_cluster_and_user() {
        let text = format!(
            "current-context: a\n{CONTEXTS}clusters:\n- name: one\n  cluster:\n    server: https://one:6443\n\
             - name: two\n  cluster:\n    server: https://two\nusers:\n- name: u\n  user:\n    tokenFile: t\n"
        );
        let config: Kubeconfig = serde_saphyr::from_str(&text).unwrap();
        let (cluster, user) = config.current().unwrap();
        assert_eq!(cluster.server, "https://one:6443");
        assert_eq!(user.unwrap().token_file, Some(PathBuf::from("t")));

        let config: Kubeconfig =
            serde_saphyr::from_str(&text.replace("current-context: a", "current-context: b"))
                .unwrap();
        let (cluster, user) = config.current().unwrap();
        assert_eq!(cluster.server, "https://two");
        assert!(user.is_none());

        let config: Kubeconfig =
            serde_saphyr::from_str(&text.replace("current-context: a", "current-context: c"))
                .unwrap();
        assert!(config.current().err().unwrap().contains("\"c\""));
    }

    /// Each credential the agent cannot use or must not use is refused at start-up, by name.
    #[test]
    fn unsupported_or_unsafe_kubeconfigs_are_refused_with_the_reason() {
        let dir = temp_dir("apiserver-kubeconfigs");
        let cases = [
            (
                "    insecure-skip-tls-verify: true\n",
                "",
                "insecure-skip-tls-verify",
            ),
            (
                "",
                "    exec:\n      command: aws\n",
                "exec and auth-provider",
            ),
            (
                "",
                "    auth-provider:\n      name: gcp\n",
                "exec and auth-provider",
            ),
            (
                "",
                "    username: a\n    password: b\n",
                "basic authentication",
            ),
            (
                "",
                "    client-certificate-data: eA==\n",
                "both its certificate and its key",
            ),
            ("    proxy-url: http://proxy\n", "", "proxy-url"),
        ];
        for (cluster_extra, user_extra, expected) in cases {
            let path = write(
                &dir,
                "kubeconfig",
                &format!(
                    "current-context: a\n{CONTEXTS}clusters:\n- name: one\n  cluster:\n    server: https://one\n{cluster_extra}\
                     users:\n- name: u\n  user:\n    token: abc\n{user_extra}"
                ),
            );
            let err = Apiserver::from_kubeconfig(&path)
                .err()
                .expect(expected)
                .to_string();
            assert!(err.contains(expected), "{err}");
            assert!(err.contains("kubeconfig"), "{err}");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn plain_http_only_to_loopback() {
        let tls = || tls_config(Path::new("x"), None, None).unwrap();
        assert!(Apiserver::new("http://127.0.0.1:8080", tls(), None, Auth::None).is_ok());
        assert!(Apiserver::new("http://localhost:8080", tls(), None, Auth::None).is_ok());
        assert!(Apiserver::new("https://10.0.0.1:6443/", tls(), None, Auth::None).is_ok());
        for refused in [
            "http://10.0.0.1:8080",
            "http://kubernetes.default",
            "ftp://x",
            "/just/a/path",
        ] {
            assert!(
                matches!(
                    Apiserver::new(refused, tls(), None, Auth::None),
                    Err(ApiserverError::Server { .. })
                ),
                "{refused}"
            );
        }
    }

    #[tokio::test]
    async fn a_proxied_apiserver_keeps_its_path_prefix() {
        let server = Apiserver::new(
            "http://127.0.0.1:1/k8s/clusters/c-1/",
            tls_config(Path::new("x"), None, None).unwrap(),
            None,
            Auth::None,
        )
        .unwrap();
        assert_eq!(server.base_path, "/k8s/clusters/c-1");
        // Nothing listens on port 1: the error names the connection failure, with its cause.
        let err = server
            .send(
                Request::get("/api/v1/pods?limit=1")
                    .body(Full::default())
                    .unwrap(),
            )
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("onnect"), "{err}");
    }

    #[test]
    fn a_token_file_is_read_again_after_its_interval() {
        let dir = temp_dir("apiserver-token-file");
        let path = write(&dir, "token", "first\n");
        let file = TokenFile::open(path.clone()).unwrap();
        assert_eq!(file.header().unwrap(), "Bearer first");
        assert!(file.header().unwrap().is_sensitive());
        write(&dir, "token", "second");
        // Within the interval the token read last is used...
        assert_eq!(file.header().unwrap(), "Bearer first");
        // ...after it, the file is read again; a file that is gone keeps the last token.
        file.current.lock().unwrap().0 -= TOKEN_REREAD;
        assert_eq!(file.header().unwrap(), "Bearer second");
        std::fs::remove_file(&path).unwrap();
        file.current.lock().unwrap().0 -= TOKEN_REREAD;
        assert_eq!(file.header().unwrap(), "Bearer second");
        assert!(TokenFile::open(path).is_err());
        write(&dir, "empty", " \n");
        assert!(
            TokenFile::open(dir.join("empty"))
                .err()
                .unwrap()
                .to_string()
                .contains("empty")
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
