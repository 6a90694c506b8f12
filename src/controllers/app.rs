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
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::service::FINALIZER;
use super::{Context, MANAGED_BY, ReconcileError};
use crate::crd::{App, AppPhase, FIELD_MANAGER, GitSource};

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

/// What a successful check found.
struct Checked {
    deploy_key: Option<String>,
}

async fn check(app: &App, ctx: &Context) -> Result<Checked, ReconcileError> {
    let ns = app.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);

    let registry_secret = app
        .spec
        .registry
        .secret_name
        .clone()
        .unwrap_or_else(|| "registry-creds".into());
    match secrets.get_opt(&registry_secret).await? {
        None => {
            return Err(ReconcileError::Missing(format!(
                "registry secret {ns}/{registry_secret} not found (Projects copy registry-creds into their namespace)"
            )));
        }
        Some(s) if s.type_.as_deref() != Some("kubernetes.io/dockerconfigjson") => {
            return Err(ReconcileError::Invalid(format!(
                "registry secret {ns}/{registry_secret} must be of type kubernetes.io/dockerconfigjson"
            )));
        }
        Some(_) => {}
    }

    let Some(git) = &app.spec.git else {
        return Ok(Checked { deploy_key: None });
    };
    let remote = git_remote(&git.url);
    let private = git.is_private.unwrap_or(false);
    if let GitRemote::Ssh { host, port } = &remote {
        let hosts = known_hosts(git);
        if !has_host_key(&hosts, host, *port) {
            return Err(ReconcileError::Invalid(format!(
                "no known host key for {host}; add its key to spec.git.knownHosts (host keys are never accepted on first use)"
            )));
        }
        let config_map = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": owned_metadata(app, &known_hosts_config_map(&app.name_any())),
            "data": {"known_hosts": hosts},
        });
        Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
            .patch(
                &known_hosts_config_map(&app.name_any()),
                &apply_params(),
                &Patch::Apply(&config_map),
            )
            .await?;
    }
    match (&git.secret_name, &remote) {
        (Some(name), _) => {
            let secret = secrets.get_opt(name).await?.ok_or_else(|| {
                ReconcileError::Missing(format!("git secret {ns}/{name} (spec.git.secretName) not found"))
            })?;
            let data = secret.data.unwrap_or_default();
            let usable = match remote {
                GitRemote::Ssh { .. } => data.contains_key("ssh-privatekey"),
                GitRemote::Other => data.contains_key("password") || data.contains_key("token"),
            };
            if !usable {
                return Err(ReconcileError::Invalid(format!(
                    "git secret {ns}/{name} needs the key {}",
                    if matches!(remote, GitRemote::Ssh { .. }) { "ssh-privatekey" } else { "password or token" }
                )));
            }
            Ok(Checked { deploy_key: None })
        }
        (None, GitRemote::Ssh { .. }) => Ok(Checked { deploy_key: Some(ensure_deploy_key(app, &secrets).await?) }),
        (None, GitRemote::Other) if private => Err(ReconcileError::Invalid(
            "a private https repository needs spec.git.secretName (a Secret with username and password or token), or an SSH URL to use a generated deploy key".into(),
        )),
        (None, GitRemote::Other) => Ok(Checked { deploy_key: None }),
    }
}

/// Returns the App's deploy key, generating it once. An existing key is never replaced:
/// users register its public half with their repository.
async fn ensure_deploy_key(app: &App, secrets: &Api<Secret>) -> Result<String, ReconcileError> {
    let name = deploy_key_secret(&app.name_any());
    let public = |secret: &Secret| -> Option<String> {
        let bytes = secret.data.as_ref()?.get("ssh-publickey")?;
        String::from_utf8(bytes.0.clone()).ok()
    };
    if let Some(existing) = secrets.get_opt(&name).await? {
        return public(&existing).ok_or_else(|| {
            ReconcileError::Invalid(format!("deploy key secret {name} has no ssh-publickey"))
        });
    }
    let comment = format!(
        "shapeblock {}/{}",
        app.namespace().unwrap_or_default(),
        app.name_any()
    );
    let (private_key, public_key) = generate_deploy_key(&comment)
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
                    ByteString(public_key.clone().into_bytes()),
                ),
            ]
            .into(),
        ),
        ..secret
    };
    // Create, never apply: if another reconcile created it first, keep that key.
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
        Ok(_) => Ok(public_key),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = secrets.get(&name).await?;
            public(&existing).ok_or_else(|| {
                ReconcileError::Invalid(format!("deploy key secret {name} has no ssh-publickey"))
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Uninstalls the App's Helm release before the App goes (its AppBuilds, Jobs and Secrets
/// follow through owner references).
async fn delete(app: &App, ctx: &Context) -> Result<Action, ReconcileError> {
    use super::jobs::{self, Uninstall};
    let ns = app.namespace().unwrap_or_default();
    let name = app.name_any();
    let apps: Api<App> = Api::namespaced(ctx.client.clone(), &ns);
    if !app.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let deployed = app
        .status
        .as_ref()
        .is_some_and(|s| s.current_image.is_some())
        || jobs::release_exists(&ctx.client, &ns, &name).await?;
    if !deployed || jobs::namespace_terminating(&ctx.client, &ns).await? {
        jobs::remove_finalizer(&apps, app, FINALIZER).await?;
        return Ok(Action::await_change());
    }
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
    let (message, retry) = match jobs::uninstall(&ctx.client, &job, &job_name, &ns).await? {
        Uninstall::Done => {
            jobs::remove_finalizer(&apps, app, FINALIZER).await?;
            return Ok(Action::await_change());
        }
        // The Job's end is a watched event.
        Uninstall::Running => (format!("uninstalling release {name}"), false),
        // The failed Job was deleted: nothing will change by itself, so try again later.
        Uninstall::Failed(output) => (format!("helm uninstall failed; retrying\n{output}"), true),
    };
    if app.status.as_ref().and_then(|s| s.message.as_deref()) != Some(message.as_str()) {
        let patch = json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App",
            "status": {"phase": AppPhase::Initializing, "message": message,
                "lastUpdated": Time(jiff::Timestamp::now())}});
        apps.patch_status(&name, &apply_params(), &Patch::Apply(&patch))
            .await?;
    }
    Ok(if retry {
        Action::requeue(std::time::Duration::from_secs(30))
    } else {
        Action::await_change()
    })
}

/// Name of the Job that uninstalls the App's release.
pub fn uninstall_job_name(app: &str) -> String {
    crate::render::build::child_name(app, "uninstall")
}

async fn reconcile(app: Arc<App>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    if app.metadata.deletion_timestamp.is_some() {
        return delete(&app, &ctx).await;
    }
    let ns = app.namespace().unwrap_or_default();
    let apps: Api<App> = Api::namespaced(ctx.client.clone(), &ns);
    if !app.finalizers().iter().any(|f| f == FINALIZER) {
        super::jobs::add_finalizer(&apps, &app, FINALIZER).await?;
        return Ok(Action::await_change());
    }
    let result = check(&app, &ctx).await;
    let (phase, message, deploy_key) = match &result {
        Ok(checked) => (
            AppPhase::Ready,
            "ready to build".to_string(),
            checked.deploy_key.clone(),
        ),
        Err(err) => (AppPhase::Failed, err.to_string(), None),
    };
    let current = app.status.as_ref();
    let unchanged = current.and_then(|s| s.phase) == Some(phase)
        && current.and_then(|s| s.message.as_deref()) == Some(message.as_str())
        && (deploy_key.is_none() || current.and_then(|s| s.deploy_key.clone()) == deploy_key)
        && current.and_then(|s| s.observed_generation) == app.metadata.generation;
    if !unchanged {
        let mut status = json!({
            "phase": phase, "message": message,
            "observedGeneration": app.metadata.generation,
            "lastUpdated": Time(jiff::Timestamp::now()),
        });
        if let Some(key) = deploy_key {
            status["deployKey"] = Value::String(key);
        }
        let patch =
            json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "status": status});
        apps.patch_status(&app.name_any(), &apply_params(), &Patch::Apply(&patch))
            .await?;
    }
    result.map(|_| Action::await_change())
}

/// Runs the App controller; stop it by dropping the future.
pub async fn run(ctx: Arc<Context>) {
    let client = ctx.client.clone();
    let metrics = ctx.metrics.clone();
    let managed = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    let (store, stream) = super::trimmed_reflector(Api::<App>::all(client.clone()), &ctx);
    Controller::for_stream(stream, store.clone())
        .with_config(super::controller_config())
        // Children (deploy key, known_hosts, the uninstall Job), metadata only.
        .owns_stream(
            watcher(
                Api::<PartialObjectMeta<Secret>>::all(client.clone()),
                watcher::Config::default().labels(&managed),
            )
            .touched_objects(),
        )
        .owns_stream(
            watcher(
                Api::<PartialObjectMeta<ConfigMap>>::all(client.clone()),
                watcher::Config::default().labels(&managed),
            )
            .touched_objects(),
        )
        .owns_stream(
            watcher(
                Api::<PartialObjectMeta<k8s_openapi::api::batch::v1::Job>>::all(client.clone()),
                watcher::Config::default().labels(&managed),
            )
            .touched_objects(),
        )
        // Registry copies made by the Project controller: a new or changed one re-checks the
        // Apps of its namespace.
        .watches_stream(
            watcher(
                Api::<PartialObjectMeta<Secret>>::all(client),
                watcher::Config::default().labels(crate::controllers::project::PROJECT_LABEL),
            )
            .touched_objects(),
            move |secret| {
                let ns = secret.namespace();
                store
                    .state()
                    .iter()
                    .filter(|app| app.namespace() == ns)
                    .map(|app| ObjectRef::from_obj(app.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
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
}
