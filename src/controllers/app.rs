//! App: checks what a build will need — the registry Secret, and for a git source its
//! credentials and pinned host keys — and generates an ed25519 deploy key when a private
//! SSH repository names no Secret, showing its public key in `status.deployKey`. Host keys
//! of github.com, gitlab.com and bitbucket.org ship with the hub; others come from
//! `spec.git.knownHosts`. Host keys are never taken on first use.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::jobs;
use super::service::FINALIZER;
use super::{Context, MANAGED_BY, ReconcileError};
use crate::crd::{App, AppPhase, FIELD_MANAGER, GitSource, Project};
use crate::observed::{self, Outcome};

/// Host keys shipped with the hub (ed25519 and ECDSA; fingerprints checked against each
/// provider's published ones).
pub const SHIPPED_KNOWN_HOSTS: &str = "\
github.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl
github.com ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEmKSENjQEezOmxkZMy7opKgwFB9nkt5YRrYMjNuG5N87uRgg6CLrbo5wAdT/y6v0mKV0U2w0WZ2YB/++Tpockg=
gitlab.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAfuCHKVTjquxvt6CM6tdG4SLp1Btn/nOeHHE5UOzRdf
gitlab.com ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBFSMqzJeV9rUzU4kWitGjeR4PWSa29SPqJ1fVkhtj3Hw9xjLVXVYrU9QlYWrOLXBpQ6KWjbjTDTdDkoohFzgbEY=
bitbucket.org ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIazEu89wgQZ4bqs3d63QSMzYVa0MuJ2e2gKTKqu+UUO
";

/// Where a git remote is, as far as SSH is concerned.
#[derive(Debug, PartialEq, Eq)]
pub enum GitRemote {
    /// `ssh://[user@]host[:port]/path` or scp-like `user@host:path`.
    Ssh { host: String, port: Option<u16> },
    /// `https://…`, `http://…` or `git://…`.
    Other,
}

/// Classifies a git URL (pure).
pub fn git_remote(url: &str) -> GitRemote {
    if let Some(rest) = url.strip_prefix("ssh://") {
        let authority = rest.split('/').next().unwrap_or_default();
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = match host_port.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()),
            None => (host_port, None),
        };
        return GitRemote::Ssh {
            host: host.to_ascii_lowercase(),
            port,
        };
    }
    if url.contains("://") {
        return GitRemote::Other;
    }
    // scp-like: user@host:path
    match url
        .split_once(':')
        .and_then(|(user_host, _)| user_host.rsplit_once('@'))
    {
        Some((_, host)) => GitRemote::Ssh {
            host: host.to_ascii_lowercase(),
            port: None,
        },
        None => GitRemote::Other,
    }
}

/// The known_hosts the clone will trust: the shipped keys plus the App's own (pure).
pub fn known_hosts(git: &GitSource) -> String {
    let mut hosts = SHIPPED_KNOWN_HOSTS.to_string();
    if let Some(extra) = &git.known_hosts {
        for line in extra
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            hosts.push_str(line);
            hosts.push('\n');
        }
    }
    hosts
}

/// Whether `known_hosts` has a key for the host (as `host` or `[host]:port`) (pure).
pub fn has_host_key(known_hosts: &str, host: &str, port: Option<u16>) -> bool {
    let wanted = match port {
        Some(p) if p != 22 => format!("[{host}]:{p}"),
        _ => host.to_string(),
    };
    known_hosts.lines().any(|line| {
        line.split_whitespace()
            .next()
            .is_some_and(|names| names.split(',').any(|n| n.eq_ignore_ascii_case(&wanted)))
    })
}

/// A new ed25519 deploy key: (OpenSSH private key, public key line).
pub fn generate_deploy_key(comment: &str) -> Result<(String, String), ssh_key::Error> {
    let seed: [u8; 32] = rand::random();
    let keypair = ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let key = ssh_key::PrivateKey::new(ssh_key::private::KeypairData::Ed25519(keypair), comment)?;
    let private = key.to_openssh(ssh_key::LineEnding::LF)?.to_string();
    let public = key.public_key().to_openssh()?;
    Ok((private, public))
}

/// Name of the generated deploy key Secret.
pub fn deploy_key_secret(app: &str) -> String {
    format!("{app}-deploy-key")
}

/// Name of the ConfigMap holding the App's known_hosts.
pub fn known_hosts_config_map(app: &str) -> String {
    format!("{app}-git-known-hosts")
}

fn owned_metadata(app: &App, name: &str) -> Value {
    let owner = app
        .controller_owner_ref(&())
        .map(|o| serde_json::to_value(o).unwrap_or(Value::Null));
    json!({
        "name": name,
        "namespace": app.namespace(),
        "labels": { "shapeblock.io/app": app.name_any(), MANAGED_BY.0: MANAGED_BY.1 },
        "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
    })
}

fn apply_params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// What the cluster holds for one App, read before anything is decided.
#[derive(Default)]
pub struct Observed {
    /// The registry Secret the App names (or the Project's copy).
    pub registry_secret: Option<Secret>,
    /// The Secret of `spec.git.secretName`, when it names one.
    pub git_secret: Option<Secret>,
    /// The generated deploy key, for an SSH remote without `spec.git.secretName`.
    pub deploy_key: Option<Secret>,
    /// Deletion only: the release may exist (the App had an image, or Helm's storage holds it).
    pub maybe_deployed: bool,
    /// Deletion only: the namespace is going away (it takes the release with it).
    pub namespace_terminating: bool,
    /// Deletion only: the uninstall Job, and its helm output when it failed.
    pub uninstall: Option<k8s_openapi::api::batch::v1::Job>,
    pub uninstall_output: Option<String>,
    /// Why the App's namespace is not a project's, when it is not (see [`super::tenancy`]).
    pub not_in_project: Option<super::tenancy::NotInProject>,
}

/// The deploy key a Ready App shows in `status.deployKey`.
#[derive(Clone, Debug, PartialEq)]
pub enum DeployKey {
    /// Not an SSH remote, or the App brings its own key.
    None,
    /// Generated before: its public half.
    Existing(String),
    /// To be generated (once: an existing key is never replaced).
    Generate,
}

/// The one thing to do next for an App.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Deleted without our finalizer.
    Nothing,
    AddFinalizer,
    /// The release is gone (or never was): let the App go.
    RemoveFinalizer {
        uninstall_job: Option<String>,
    },
    StartUninstall,
    Uninstalling,
    /// The uninstall failed: delete its Job and try again later.
    UninstallFailed {
        output: String,
    },
    /// The App can be built: write its known_hosts (SSH remotes) and show its deploy key.
    Ready {
        known_hosts: Option<String>,
        deploy_key: DeployKey,
    },
    /// The App's namespace is not a project's: nothing is created for it (no finalizer
    /// either); retried, as its Project may come.
    NotInProject(super::tenancy::NotInProject),
    /// The App cannot be built as it stands: `reason` (CamelCase) says why for a program;
    /// `retry` when the fix may come from another object (a Secret) without a change to the
    /// App, otherwise it waits for a change.
    Failed {
        reason: &'static str,
        retry: bool,
        message: String,
    },
}

/// Reasons of a Failed App (its `Ready` condition, its Warning Event).
pub const REGISTRY_SECRET_MISSING: &str = "RegistrySecretMissing";
pub const REGISTRY_SECRET_INVALID: &str = "RegistrySecretNotDockerConfigJson";
pub const UNKNOWN_HOST_KEY: &str = "UnknownHostKey";
pub const GIT_SECRET_MISSING: &str = "GitSecretMissing";
/// The git Secret lacks what its remote needs, or its `host` key is not a host.
pub const GIT_SECRET_INVALID: &str = "GitSecretInvalid";
/// An HTTPS git Secret without a `host` key: bound to no host, it is sent to none.
pub const GIT_SECRET_UNBOUND: &str = "GitSecretUnbound";
/// An HTTPS git Secret bound to a host other than the App's repository's (or the URL is not
/// https: credentials are sent only over TLS).
pub const GIT_SECRET_HOST_MISMATCH: &str = "GitSecretHostMismatch";
pub const GIT_SECRET_REQUIRED: &str = "GitSecretRequired";
pub const DEPLOY_KEY_INVALID: &str = "DeployKeyInvalid";

fn failed(reason: &'static str, retry: bool, message: String) -> Step {
    Step::Failed {
        reason,
        retry,
        message,
    }
}

/// The host (and port, as git names it to its credential helper) of an `https://` URL, or
/// None for any other scheme (pure).
pub fn https_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host.is_empty()).then(|| host.to_string())
}

/// Whether a git Secret's `host` is a host name or address with an optional port, nothing
/// else (no scheme, path, whitespace or newline) (pure).
pub fn valid_host(host: &str) -> bool {
    let port_ok = |port: Option<&str>| {
        port.is_none_or(|p| {
            !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
        })
    };
    if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 address: `[::1]` or `[::1]:8443`.
        let Some((address, after)) = rest.split_once(']') else {
            return false;
        };
        let port = match after {
            "" => None,
            after => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return false,
            },
        };
        return !address.is_empty()
            && address
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            && port_ok(port);
    }
    let (name, port) = match host.split_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && port_ok(port)
}

/// Whether an HTTPS git Secret may be sent to the App's repository: it names the host it was
/// made for in its `host` key, and that is the URL's host (pure).
fn check_git_host(ns: &str, name: &str, url: &str, secret: &Secret) -> Option<Step> {
    let Some(bytes) = secret.data.as_ref().and_then(|d| d.get("host")) else {
        return Some(failed(
            GIT_SECRET_UNBOUND,
            true,
            format!(
                "git secret {ns}/{name} has no key host: an https git Secret names the host it was made for (e.g. host=github.com), and is sent to that host only"
            ),
        ));
    };
    let Some(bound) = std::str::from_utf8(&bytes.0).ok().filter(|h| valid_host(h)) else {
        return Some(failed(
            GIT_SECRET_INVALID,
            true,
            format!(
                "git secret {ns}/{name}: its key host must be a host name with an optional port, such as github.com or git.example.com:8443 (no scheme, path, whitespace or newline)"
            ),
        ));
    };
    match https_host(url) {
        None => Some(failed(
            GIT_SECRET_HOST_MISMATCH,
            false,
            format!(
                "git secret {ns}/{name} is bound to https://{bound}, and spec.git.url is not an https:// URL: credentials are sent only over https"
            ),
        )),
        Some(host) if host != bound => Some(failed(
            GIT_SECRET_HOST_MISMATCH,
            true,
            format!(
                "git secret {ns}/{name} is bound to host {bound}, not {host} (the host of spec.git.url): credentials go only to the host they were made for"
            ),
        )),
        Some(_) => None,
    }
}

/// Name of the registry Secret an App's builds use.
pub fn registry_secret_name(app: &App) -> String {
    app.spec
        .registry
        .secret_name
        .clone()
        .unwrap_or_else(|| super::project::REGISTRY_SECRET.into())
}

/// Decides the next step (pure).
pub fn decide(app: &App, o: &Observed) -> Step {
    let has_finalizer = app.finalizers().iter().any(|f| f == FINALIZER);
    if app.metadata.deletion_timestamp.is_some() {
        if !has_finalizer {
            return Step::Nothing;
        }
        // Outside a project nothing was ever deployed by the hub (its Jobs run as the
        // project's deployer), and nothing is created now: let the App go.
        if o.not_in_project.is_some() {
            return Step::RemoveFinalizer {
                uninstall_job: None,
            };
        }
        let uninstall_job = o.uninstall.as_ref().map(|j| j.name_any());
        if o.namespace_terminating || (!o.maybe_deployed && o.uninstall.is_none()) {
            return Step::RemoveFinalizer { uninstall_job };
        }
        return match o.uninstall.as_ref().map(observed::outcome) {
            None => Step::StartUninstall,
            Some(Outcome::Running) => Step::Uninstalling,
            Some(Outcome::Succeeded) => Step::RemoveFinalizer { uninstall_job },
            Some(Outcome::Failed { message, .. }) => Step::UninstallFailed {
                output: o.uninstall_output.clone().unwrap_or(message),
            },
        };
    }
    if let Some(reason) = &o.not_in_project {
        return Step::NotInProject(reason.clone());
    }
    if !has_finalizer {
        return Step::AddFinalizer;
    }
    check(app, o)
}

/// Whether the App can be built: registry Secret, git credentials, pinned host keys (pure).
fn check(app: &App, o: &Observed) -> Step {
    let ns = app.namespace().unwrap_or_default();
    let registry_secret = registry_secret_name(app);
    match &o.registry_secret {
        None => {
            return failed(
                REGISTRY_SECRET_MISSING,
                true,
                format!(
                    "registry secret {ns}/{registry_secret} not found (Projects copy registry-creds into their namespace)"
                ),
            );
        }
        Some(s) if s.type_.as_deref() != Some("kubernetes.io/dockerconfigjson") => {
            return failed(
                REGISTRY_SECRET_INVALID,
                false,
                format!(
                    "registry secret {ns}/{registry_secret} must be of type kubernetes.io/dockerconfigjson"
                ),
            );
        }
        Some(_) => {}
    }
    let Some(git) = &app.spec.git else {
        return Step::Ready {
            known_hosts: None,
            deploy_key: DeployKey::None,
        };
    };
    let remote = git_remote(&git.url);
    let mut known = None;
    if let GitRemote::Ssh { host, port } = &remote {
        let hosts = known_hosts(git);
        if !has_host_key(&hosts, host, *port) {
            return failed(
                UNKNOWN_HOST_KEY,
                false,
                format!(
                    "no known host key for {host}; add its key to spec.git.knownHosts (host keys are never accepted on first use)"
                ),
            );
        }
        known = Some(hosts);
    }
    let ready = |deploy_key| Step::Ready {
        known_hosts: known.clone(),
        deploy_key,
    };
    match (&git.secret_name, &remote) {
        (Some(name), _) => {
            let Some(secret) = &o.git_secret else {
                return failed(
                    GIT_SECRET_MISSING,
                    true,
                    format!("git secret {ns}/{name} (spec.git.secretName) not found"),
                );
            };
            let data = secret.data.clone().unwrap_or_default();
            let (usable, needed) = match remote {
                GitRemote::Ssh { .. } => (data.contains_key("ssh-privatekey"), "ssh-privatekey"),
                GitRemote::Other => (
                    data.contains_key("password") || data.contains_key("token"),
                    "password or token",
                ),
            };
            if !usable {
                return failed(
                    GIT_SECRET_INVALID,
                    true,
                    format!("git secret {ns}/{name} needs the key {needed}"),
                );
            }
            // An SSH key signs and never travels, and host keys are pinned; a password or token
            // is sent to the server, so it goes only to the host it is bound to.
            if remote == GitRemote::Other
                && let Some(refused) = check_git_host(&ns, name, &git.url, secret)
            {
                return refused;
            }
            ready(DeployKey::None)
        }
        (None, GitRemote::Ssh { .. }) => match &o.deploy_key {
            None => ready(DeployKey::Generate),
            Some(secret) => match public_key(secret) {
                Some(public) => ready(DeployKey::Existing(public)),
                None => failed(
                    DEPLOY_KEY_INVALID,
                    false,
                    format!(
                        "deploy key secret {} has no ssh-publickey",
                        deploy_key_secret(&app.name_any())
                    ),
                ),
            },
        },
        (None, GitRemote::Other) if git.is_private.unwrap_or(false) => failed(
            GIT_SECRET_REQUIRED,
            false,
            "a private https repository needs spec.git.secretName (a Secret with username, password or token, and host), or an SSH URL to use a generated deploy key".into(),
        ),
        (None, GitRemote::Other) => ready(DeployKey::None),
    }
}

fn public_key(secret: &Secret) -> Option<String> {
    let bytes = secret.data.as_ref()?.get("ssh-publickey")?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// Reads what the next decision needs.
async fn read(app: &App, ctx: &Context) -> Result<Observed, ReconcileError> {
    let ns = app.namespace().unwrap_or_default();
    let name = app.name_any();
    let mut o = Observed::default();
    let has_finalizer = app.finalizers().iter().any(|f| f == FINALIZER);
    let deleting = app.metadata.deletion_timestamp.is_some();
    if deleting && !has_finalizer {
        return Ok(o);
    }
    // Before anything else: outside a project nothing more is read, nothing is created.
    o.not_in_project =
        super::tenancy::read(&ctx.client, &ns, &ctx.config.registry_source_namespace)
            .await?
            .err();
    if o.not_in_project.is_some() || !has_finalizer {
        return Ok(o);
    }
    if deleting {
        o.namespace_terminating = jobs::namespace_terminating(&ctx.client, &ns).await?;
        if o.namespace_terminating {
            return Ok(o);
        }
        let job_name = uninstall_job_name(&name);
        let jobs_api: Api<k8s_openapi::api::batch::v1::Job> =
            Api::namespaced(ctx.client.clone(), &ns);
        o.uninstall = jobs_api.get_opt(&job_name).await?;
        if let Some(Outcome::Failed { message, .. }) = o.uninstall.as_ref().map(observed::outcome) {
            let pods: Api<k8s_openapi::api::core::v1::Pod> =
                Api::namespaced(ctx.client.clone(), &ns);
            o.uninstall_output = Some(jobs::helm_failure(&pods, &job_name, &message).await?);
        }
        o.maybe_deployed = app
            .status
            .as_ref()
            .is_some_and(|s| s.current_image.is_some())
            || jobs::release_exists(&ctx.client, &ns, &name).await?;
        return Ok(o);
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    o.registry_secret = secrets.get_opt(&registry_secret_name(app)).await?;
    if let Some(git) = &app.spec.git {
        match (&git.secret_name, git_remote(&git.url)) {
            (Some(name), _) => o.git_secret = secrets.get_opt(name).await?,
            (None, GitRemote::Ssh { .. }) => {
                o.deploy_key = secrets.get_opt(&deploy_key_secret(&name)).await?;
            }
            (None, GitRemote::Other) => {}
        }
    }
    Ok(o)
}

/// Carries out a step; returns the deploy key's public half when the step makes one known.
async fn apply(app: &App, step: &Step, ctx: &Context) -> Result<Option<String>, ReconcileError> {
    let ns = app.namespace().unwrap_or_default();
    let name = app.name_any();
    let apps: Api<App> = Api::namespaced(ctx.client.clone(), &ns);
    let jobs_api: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(ctx.client.clone(), &ns);
    match step {
        Step::Nothing | Step::Uninstalling | Step::Failed { .. } | Step::NotInProject(_) => {}
        Step::AddFinalizer => jobs::add_finalizer(&apps, app, FINALIZER).await?,
        Step::RemoveFinalizer { uninstall_job } => {
            if let Some(job) = uninstall_job {
                jobs_api.delete(job, &DeleteParams::background()).await.ok();
            }
            jobs::remove_finalizer(&apps, app, FINALIZER).await?;
        }
        Step::StartUninstall => {
            let job_name = uninstall_job_name(&name);
            let owner = app
                .controller_owner_ref(&())
                .and_then(|o| serde_json::to_value(o).ok());
            let job = crate::render::jobs::helm_job(
                &crate::render::jobs::HelmJob {
                    name: &job_name,
                    namespace: &ns,
                    release: &name,
                    action: crate::render::jobs::HelmAction::Uninstall,
                    labels: vec![
                        (crate::render::jobs::APP_LABEL, &name),
                        (crate::render::jobs::STEP_LABEL, "uninstall"),
                    ],
                    owner,
                    service_account: super::project::DEPLOYER,
                },
                &ctx.config.jobs,
            );
            jobs::create_once(&jobs_api, &job).await?;
        }
        // A retry starts afresh with a new Job.
        Step::UninstallFailed { .. } => {
            jobs_api
                .delete(&uninstall_job_name(&name), &DeleteParams::background())
                .await?;
        }
        Step::Ready {
            known_hosts,
            deploy_key,
        } => {
            if let Some(hosts) = known_hosts {
                let config_map = json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": owned_metadata(app, &known_hosts_config_map(&name)),
                    "data": {"known_hosts": hosts},
                });
                Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
                    .patch(
                        &known_hosts_config_map(&name),
                        &apply_params(),
                        &Patch::Apply(&config_map),
                    )
                    .await?;
            }
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
            return Ok(match deploy_key {
                DeployKey::None => None,
                DeployKey::Existing(public) => Some(public.clone()),
                DeployKey::Generate => Some(generate_deploy_key_secret(app, &secrets).await?),
            });
        }
    }
    Ok(None)
}

/// Creates the App's deploy key Secret, unless another reconcile created it first: then that
/// key is kept (users register its public half with their repository).
async fn generate_deploy_key_secret(
    app: &App,
    secrets: &Api<Secret>,
) -> Result<String, ReconcileError> {
    let name = deploy_key_secret(&app.name_any());
    let comment = format!(
        "shapeblock {}/{}",
        app.namespace().unwrap_or_default(),
        app.name_any()
    );
    let (private_key, public) = generate_deploy_key(&comment)
        .map_err(|e| ReconcileError::Internal(format!("generating a deploy key: {e}")))?;
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": owned_metadata(app, &name),
        "type": "kubernetes.io/ssh-auth",
    }))
    .map_err(|e| ReconcileError::Internal(e.to_string()))?;
    let secret = Secret {
        data: Some(
            [
                (
                    "ssh-privatekey".to_string(),
                    ByteString(private_key.into_bytes()),
                ),
                (
                    "ssh-publickey".to_string(),
                    ByteString(public.clone().into_bytes()),
                ),
            ]
            .into(),
        ),
        ..secret
    };
    // Create, never apply.
    match secrets
        .create(
            &PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &secret,
        )
        .await
    {
        Ok(_) => Ok(public),
        Err(kube::Error::Api(e)) if e.code == 409 => public_key(&secrets.get(&name).await?)
            .ok_or_else(|| {
                ReconcileError::Invalid(format!("deploy key secret {name} has no ssh-publickey"))
            }),
        Err(e) => Err(e.into()),
    }
}

/// Hash of an App's `spec.run` (pure): what a release is made of besides the image.
pub fn run_hash(app: &App) -> String {
    use sha2::Digest;
    let text = serde_json::to_string(&app.spec.run).unwrap_or_default();
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Whether `spec.run` changed since it was last recorded while the App has an image: then
/// the current image is released again with the new settings (pure).
pub fn needs_release(app: &App) -> bool {
    let status = app.status.as_ref();
    let recorded = status.and_then(|s| s.run_hash.as_deref());
    let deployed = status.is_some_and(|s| s.current_image.is_some());
    recorded.is_some_and(|h| h != run_hash(app)) && deployed
}

/// Name of the AppBuild that releases generation `generation` of an App's run spec.
pub fn release_build_name(app: &str, generation: i64) -> String {
    crate::render::build::child_name(app, &format!("release-{generation}"))
}

/// Creates the AppBuild that redeploys the App's current image with its new `spec.run` (no
/// gitRef, no imageTag: a redeploy), carrying the `helmValues` of the latest deploy so an
/// override made there survives a settings change. Created once per generation.
async fn release(app: &App, ctx: &Context) -> Result<(), ReconcileError> {
    let ns = app.namespace().unwrap_or_default();
    let name = app.name_any();
    let builds: Api<crate::crd::AppBuild> = Api::namespaced(ctx.client.clone(), &ns);
    let latest = app.status.as_ref().and_then(|s| s.latest_build.clone());
    let helm_values = match latest {
        Some(latest) => builds
            .get_opt(&latest)
            .await?
            .and_then(|b| b.spec.helm_values),
        None => None,
    };
    let build_name = release_build_name(&name, app.metadata.generation.unwrap_or_default());
    let build = json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
        "metadata": {"name": build_name, "namespace": ns,
            "labels": {crate::render::jobs::APP_LABEL: name, "shapeblock.io/release": "run"}},
        "spec": {"appName": name, "helmValues": helm_values},
    });
    jobs::create_once(&builds, &build).await?;
    tracing::info!(namespace = %ns, app = %name, build = %build_name, "spec.run changed: releasing the current image again");
    Ok(())
}

/// Name of the Job that uninstalls the App's release.
pub fn uninstall_job_name(app: &str) -> String {
    crate::render::build::child_name(app, "uninstall")
}

async fn reconcile(app: Arc<App>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let observed = read(&app, &ctx).await?;
    let step = decide(&app, &observed);
    let deploy_key = apply(&app, &step, &ctx).await?;
    if matches!(step, Step::Ready { .. }) && needs_release(&app) {
        release(&app, &ctx).await?;
    }
    let name = app.name_any();
    let (phase, reason, message) = match &step {
        Step::Ready { .. } => (AppPhase::Ready, "Ready", "ready to build".to_string()),
        Step::Failed {
            reason, message, ..
        } => (AppPhase::Failed, *reason, message.clone()),
        Step::NotInProject(why) => (
            AppPhase::Failed,
            super::tenancy::NOT_IN_PROJECT,
            why.to_string(),
        ),
        Step::Uninstalling => (
            AppPhase::Initializing,
            "Uninstalling",
            format!("uninstalling release {name}"),
        ),
        Step::UninstallFailed { output } => (
            AppPhase::Initializing,
            "UninstallFailed",
            format!("helm uninstall failed; retrying\n{output}"),
        ),
        _ => return Ok(Action::await_change()),
    };
    report(&app, phase, reason, &message, deploy_key, &ctx).await?;
    match step {
        Step::NotInProject(why) => Err(why.into()),
        Step::Failed {
            reason,
            retry: true,
            message,
        } => Err(ReconcileError::Refused { reason, message }),
        Step::Failed {
            retry: false,
            message,
            ..
        } => Err(ReconcileError::Invalid(message)),
        // The failed uninstall Job was deleted: nothing changes by itself, so try again later.
        Step::UninstallFailed { .. } => Ok(Action::requeue(std::time::Duration::from_secs(30))),
        _ => Ok(Action::await_change()),
    }
}

/// The type of the condition an App carries: it can be built and deployed.
pub const READY: &str = "Ready";

/// Writes the status unless unchanged, with a Normal Event when the App becomes Ready. The
/// `Ready` condition carries `reason` for a program (`NotInProject`, `GitSecretHostMismatch`…).
async fn report(
    app: &App,
    phase: AppPhase,
    reason: &str,
    message: &str,
    deploy_key: Option<String>,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let apps: Api<App> = Api::namespaced(ctx.client.clone(), &app.namespace().unwrap_or_default());
    let current = app.status.as_ref();
    // The run spec counts as released once the App is Ready (a release was started if one
    // was needed); a change made while it is not Ready is released when it becomes Ready.
    let run_hash = match phase {
        AppPhase::Ready => Some(run_hash(app)),
        _ => current.and_then(|s| s.run_hash.clone()),
    };
    let now = Time(jiff::Timestamp::now());
    let mut conditions = current.map(|s| s.conditions.clone()).unwrap_or_default();
    super::set_condition(
        &mut conditions,
        READY,
        phase == AppPhase::Ready,
        reason,
        message,
        app.metadata.generation,
        &now,
    );
    let unchanged = current.and_then(|s| s.phase) == Some(phase)
        && current.and_then(|s| s.message.as_deref()) == Some(message)
        && current.map(|s| &s.conditions) == Some(&conditions)
        && current.and_then(|s| s.run_hash.clone()) == run_hash
        && (deploy_key.is_none() || current.and_then(|s| s.deploy_key.clone()) == deploy_key)
        && current.and_then(|s| s.observed_generation) == app.metadata.generation;
    if unchanged {
        return Ok(());
    }
    // Only the condition this controller owns: others' stay theirs under server-side apply.
    let ready: Vec<_> = conditions.iter().filter(|c| c.type_ == READY).collect();
    let mut status = json!({
        "phase": phase, "message": message,
        "observedGeneration": app.metadata.generation,
        "lastUpdated": now,
        "conditions": ready,
    });
    if let Some(key) = deploy_key {
        status["deployKey"] = Value::String(key);
    }
    if let Some(hash) = run_hash {
        status["runHash"] = Value::String(hash);
    }
    let patch =
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "status": status});
    apps.patch_status(&app.name_any(), &apply_params(), &Patch::Apply(&patch))
        .await?;
    if phase == AppPhase::Ready && current.and_then(|s| s.phase) != Some(AppPhase::Ready) {
        let event = super::events::phase("Ready", message.to_string());
        super::events::publish(&ctx.client, &app.object_ref(&()), event).await;
    }
    Ok(())
}

/// Runs the App controller on the cluster's shared watches; stop it by dropping the future.
pub async fn run(ctx: Arc<Context>, watches: &super::shared::Watches) {
    let metrics = ctx.metrics.clone();
    let store = watches.apps.store();
    Controller::for_shared_stream(watches.apps.applied(), store.clone())
        .with_config(super::controller_config())
        // The uninstall Job, metadata only. The other children (deploy key, known_hosts) are
        // not watched: the agent may not list Secrets or ConfigMaps across namespaces; they
        // are read by name in the App's namespace at each reconcile.
        .owns_shared_stream(watches.jobs.touched())
        // A Project turns Active once its registry copy is in place: that re-checks the Apps
        // of its namespace (which has the Project's name) that waited for it.
        .watches_shared_stream(watches.projects.touched(), move |project: Arc<Project>| {
            let ns = Some(project.name_any());
            store
                .state()
                .iter()
                .filter(|app| app.namespace() == ns)
                .map(|app| ObjectRef::from_obj(app.as_ref()))
                .collect::<Vec<_>>()
        })
        .run(
            super::bounded("app", reconcile),
            |object, error, ctx| super::on_error("app", object, error, ctx),
            ctx,
        )
        .for_each(|result| {
            metrics.record("app", &result);
            async {}
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_remotes_are_classified() {
        assert_eq!(
            git_remote("git@github.com:org/app.git"),
            GitRemote::Ssh {
                host: "github.com".into(),
                port: None
            }
        );
        assert_eq!(
            git_remote("ssh://git@git.example.com:2222/team/app.git"),
            GitRemote::Ssh {
                host: "git.example.com".into(),
                port: Some(2222)
            }
        );
        assert_eq!(
            git_remote("ssh://GitLab.com/org/app"),
            GitRemote::Ssh {
                host: "gitlab.com".into(),
                port: None
            }
        );
        assert_eq!(
            git_remote("https://github.com/org/app.git"),
            GitRemote::Other
        );
        assert_eq!(
            git_remote("https://user@github.com/org/app.git"),
            GitRemote::Other
        );
    }

    #[test]
    fn host_keys_are_matched_by_host_and_port() {
        let git = GitSource {
            url: "ssh://git@git.example.com:2222/x".into(),
            known_hosts: Some("# comment\n[git.example.com]:2222 ssh-ed25519 AAAAkey\n".into()),
            ..Default::default()
        };
        let hosts = known_hosts(&git);
        for shipped in ["github.com", "gitlab.com", "bitbucket.org"] {
            assert!(has_host_key(&hosts, shipped, None), "{shipped}");
        }
        assert!(has_host_key(&hosts, "git.example.com", Some(2222)));
        assert!(!has_host_key(&hosts, "git.example.com", None));
        assert!(!has_host_key(&hosts, "evil.example.com", None));
        assert!(!hosts.contains("# comment"));
    }

    #[test]
    fn deploy_keys_are_fresh_ed25519_openssh_keys() {
        let (private_a, public_a) = generate_deploy_key("shapeblock ns/app").unwrap();
        let (_, public_b) = generate_deploy_key("shapeblock ns/app").unwrap();
        assert_ne!(public_a, public_b);
        assert!(
            public_a.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"),
            "{public_a}"
        );
        assert!(public_a.ends_with("shapeblock ns/app"));
        let parsed = ssh_key::PrivateKey::from_openssh(&private_a).unwrap();
        assert_eq!(parsed.public_key().to_openssh().unwrap(), public_a);
    }
    fn app(git: Value, finalizer: bool, deleting: bool) -> App {
        let mut app: App = serde_json::from_value(json!({
            "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App",
            "metadata": {"name": "web", "namespace": "p"},
            "spec": {"displayName": "Web", "git": git, "registry": {"url": "r.example.com"},
                "build": {"type": "dockerfile"}}}))
        .unwrap();
        if finalizer {
            app.metadata.finalizers = Some(vec![FINALIZER.into()]);
        }
        if deleting {
            app.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        }
        app
    }

    fn secret(type_: &str, keys: &[&str]) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: Some(
                keys.iter()
                    .map(|k| (k.to_string(), ByteString(b"x".to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    fn with_registry() -> Observed {
        Observed {
            registry_secret: Some(secret(
                "kubernetes.io/dockerconfigjson",
                &[".dockerconfigjson"],
            )),
            ..Default::default()
        }
    }

    fn failure(step: Step) -> (bool, String) {
        match step {
            Step::Failed { retry, message, .. } => (retry, message),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    const HTTPS: &str = "https://git.example.com/org/web.git";

    #[test]
    fn an_app_gets_its_finalizer_then_is_checked() {
        let new = app(json!({"url": HTTPS}), false, false);
        assert_eq!(decide(&new, &with_registry()), Step::AddFinalizer);
        let public = app(json!({"url": HTTPS}), true, false);
        assert_eq!(
            decide(&public, &with_registry()),
            Step::Ready {
                known_hosts: None,
                deploy_key: DeployKey::None
            }
        );
    }

    #[test]
    fn the_registry_secret_must_exist_and_be_a_dockerconfigjson() {
        let a = app(json!({"url": HTTPS}), true, false);
        let (missing, message) = failure(decide(&a, &Observed::default()));
        assert!(missing && message.contains("registry secret p/registry-creds not found"));
        let opaque = Observed {
            registry_secret: Some(secret("Opaque", &["x"])),
            ..Default::default()
        };
        let (missing, message) = failure(decide(&a, &opaque));
        assert!(!missing && message.contains("must be of type kubernetes.io/dockerconfigjson"));
    }

    #[test]
    fn https_credentials_need_a_password_or_token_and_private_repos_need_them() {
        let named = app(json!({"url": HTTPS, "secretName": "creds"}), true, false);
        let (missing, _) = failure(decide(&named, &with_registry()));
        assert!(
            missing,
            "a named Secret that does not exist yet is waited for"
        );
        let mut o = with_registry();
        o.git_secret = Some(secret("Opaque", &["username"]));
        let (retried, message) = failure(decide(&named, &o));
        assert!(
            retried && message.ends_with("needs the key password or token"),
            "a fix to the Secret is picked up: {message}"
        );
        o.git_secret = Some(bound_secret(&["username", "token"], "git.example.com"));
        assert!(matches!(decide(&named, &o), Step::Ready { .. }));
        let private = app(json!({"url": HTTPS, "isPrivate": true}), true, false);
        let (missing, message) = failure(decide(&private, &with_registry()));
        assert!(
            !missing && message.contains("needs spec.git.secretName"),
            "{message}"
        );
    }

    fn bound_secret(keys: &[&str], host: &str) -> Secret {
        let mut secret = secret("Opaque", keys);
        secret
            .data
            .as_mut()
            .unwrap()
            .insert("host".into(), ByteString(host.as_bytes().to_vec()));
        secret
    }

    fn reason(step: &Step) -> &'static str {
        match step {
            Step::Failed { reason, .. } => reason,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn https_credentials_go_only_to_the_host_they_are_bound_to() {
        let named = app(json!({"url": HTTPS, "secretName": "creds"}), true, false);
        let mut o = with_registry();
        o.git_secret = Some(secret("Opaque", &["username", "token"]));
        let step = decide(&named, &o);
        assert_eq!(reason(&step), GIT_SECRET_UNBOUND);
        assert!(failure(step).1.contains("has no key host"));
        for malformed in [
            "",
            "https://git.example.com",
            "git.example.com/org",
            "git.example.com\n",
            " git.example.com",
            "git.example.com:http",
            "git.example.com:99999",
        ] {
            o.git_secret = Some(bound_secret(&["token"], malformed));
            assert_eq!(
                reason(&decide(&named, &o)),
                GIT_SECRET_INVALID,
                "{malformed:?}"
            );
        }
        for other in ["evil.example.com", "git.example.com:8443", "example.com"] {
            o.git_secret = Some(bound_secret(&["token"], other));
            let step = decide(&named, &o);
            assert_eq!(reason(&step), GIT_SECRET_HOST_MISMATCH, "{other}");
            assert!(failure(step).1.contains("not git.example.com"), "{other}");
        }
        o.git_secret = Some(bound_secret(&["token"], "git.example.com"));
        assert!(matches!(decide(&named, &o), Step::Ready { .. }));
        // The host git names to its helper: with the port, without the user.
        let with_port = app(
            json!({"url": "https://ci@git.example.com:8443/org/web.git", "secretName": "creds"}),
            true,
            false,
        );
        assert_eq!(reason(&decide(&with_port, &o)), GIT_SECRET_HOST_MISMATCH);
        o.git_secret = Some(bound_secret(&["token"], "git.example.com:8443"));
        assert!(matches!(decide(&with_port, &o), Step::Ready { .. }));
        // Never over plain http (nor git://), whatever the host.
        o.git_secret = Some(bound_secret(&["token"], "git.example.com"));
        for url in [
            "http://git.example.com/org/web.git",
            "git://git.example.com/org/web.git",
        ] {
            let plain = app(json!({"url": url, "secretName": "creds"}), true, false);
            let step = decide(&plain, &o);
            assert_eq!(reason(&step), GIT_SECRET_HOST_MISMATCH, "{url}");
            assert!(failure(step).1.contains("only over https"), "{url}");
        }
        assert!(valid_host("[::1]:8443") && valid_host("10.0.0.1:8443"));
        assert!(!valid_host("[::1]x") && !valid_host("a:b:c"));
    }

    #[test]
    fn outside_a_project_nothing_is_done_not_even_a_finalizer() {
        let why = crate::controllers::tenancy::NotInProject::Reserved("shapeblock".into());
        let o = Observed {
            not_in_project: Some(why.clone()),
            ..with_registry()
        };
        let new = app(json!({"url": HTTPS}), false, false);
        assert_eq!(decide(&new, &o), Step::NotInProject(why.clone()));
        let ready = app(json!({"url": HTTPS}), true, false);
        assert_eq!(decide(&ready, &o), Step::NotInProject(why));
        // Deleted: let go at once, without an uninstall Job.
        let deleting = app(json!({"url": HTTPS}), true, true);
        let o = Observed {
            maybe_deployed: true,
            ..o
        };
        assert_eq!(
            decide(&deleting, &o),
            Step::RemoveFinalizer {
                uninstall_job: None
            }
        );
    }

    #[test]
    fn ssh_remotes_need_a_pinned_host_key_and_get_a_deploy_key_once() {
        let unknown = app(
            json!({"url": "git@git.example.com:org/web.git"}),
            true,
            false,
        );
        let (missing, message) = failure(decide(&unknown, &with_registry()));
        assert!(!missing && message.contains("no known host key for git.example.com"));
        let github = app(json!({"url": "git@github.com:org/web.git"}), true, false);
        match decide(&github, &with_registry()) {
            Step::Ready {
                known_hosts: Some(hosts),
                deploy_key: DeployKey::Generate,
            } => assert!(hosts.contains("github.com ssh-ed25519")),
            other => panic!("{other:?}"),
        }
        let mut o = with_registry();
        let mut key = secret("kubernetes.io/ssh-auth", &["ssh-privatekey"]);
        o.deploy_key = Some(key.clone());
        let (_, message) = failure(decide(&github, &o));
        assert!(message.contains("has no ssh-publickey"), "{message}");
        key.data.as_mut().unwrap().insert(
            "ssh-publickey".into(),
            ByteString(b"ssh-ed25519 AAAA shapeblock".to_vec()),
        );
        o.deploy_key = Some(key);
        assert!(matches!(
            decide(&github, &o),
            Step::Ready { deploy_key: DeployKey::Existing(k), .. } if k == "ssh-ed25519 AAAA shapeblock"
        ));
        // The App's own key: needs ssh-privatekey, and no deploy key is shown.
        let own = app(
            json!({"url": "git@github.com:org/web.git", "secretName": "mine"}),
            true,
            false,
        );
        let mut o = with_registry();
        o.git_secret = Some(secret("Opaque", &["password"]));
        assert!(
            failure(decide(&own, &o))
                .1
                .ends_with("needs the key ssh-privatekey")
        );
        o.git_secret = Some(secret("kubernetes.io/ssh-auth", &["ssh-privatekey"]));
        assert!(matches!(
            decide(&own, &o),
            Step::Ready {
                deploy_key: DeployKey::None,
                ..
            }
        ));
    }

    #[test]
    fn deletion_uninstalls_a_deployed_release_then_lets_go() {
        let job = |conditions: Value| -> k8s_openapi::api::batch::v1::Job {
            serde_json::from_value(json!({"metadata": {"name": "web-uninstall"},
                "status": {"conditions": conditions}}))
            .unwrap()
        };
        assert_eq!(
            decide(
                &app(json!({"url": HTTPS}), false, true),
                &Observed::default()
            ),
            Step::Nothing
        );
        let deleting = app(json!({"url": HTTPS}), true, true);
        assert_eq!(
            decide(&deleting, &Observed::default()),
            Step::RemoveFinalizer {
                uninstall_job: None
            }
        );
        let mut o = Observed {
            maybe_deployed: true,
            ..Default::default()
        };
        assert_eq!(decide(&deleting, &o), Step::StartUninstall);
        o.uninstall = Some(job(json!([])));
        assert_eq!(decide(&deleting, &o), Step::Uninstalling);
        o.uninstall = Some(job(
            json!([{"type": "Failed", "status": "True", "message": "m"}]),
        ));
        assert_eq!(
            decide(&deleting, &o),
            Step::UninstallFailed { output: "m".into() }
        );
        o.uninstall = Some(job(json!([{"type": "Complete", "status": "True"}])));
        assert_eq!(
            decide(&deleting, &o),
            Step::RemoveFinalizer {
                uninstall_job: Some("web-uninstall".into())
            }
        );
        o.namespace_terminating = true;
        o.uninstall = None;
        assert_eq!(
            decide(&deleting, &o),
            Step::RemoveFinalizer {
                uninstall_job: None
            }
        );
    }
}
