//! The Jobs the hub runs in managed clusters, as pure functions: an AppBuild's build Job
//! (git clone, then kaniko or the buildpacks `creator`), and Helm Jobs that install, upgrade
//! or uninstall a release (an App's deploy, a Service). Every user string becomes one argv
//! element, an environment variable or a file; no container runs a shell over user input.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::image::ImageRef;
use crate::crd::{BuildType, MANAGED_BY_LABEL, MANAGED_BY_VALUE};

/// Images, chart and limits of the Jobs (the `jobs:` section of the hub configuration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobSettings {
    /// Image with git (any version since 2.18: a commit is fetched by SHA over protocol v2)
    /// and ssh; also runs `chown`.
    pub git_image: String,
    /// kaniko executor image for `dockerfile` builds (the maintained fork).
    pub kaniko_image: String,
    /// Builder image for `buildpack` builds when an App names none.
    pub builder_image: String,
    /// Buildpacks Platform API the `creator` is run with.
    pub platform_api: String,
    /// Image with the helm CLI, for deploys and Services.
    pub helm_image: String,
    /// Chart Apps are deployed with when `apps.chart` is not `builtin`: `oci://…` or
    /// `<repo URL>#<name>`.
    pub app_chart: String,
    /// Version of that chart.
    pub app_chart_version: String,
    /// Whether the helm Job logs in to an OCI chart registry with the App's registry Secret
    /// (a dockerconfigjson, which may hold the chart registry's credentials beside the image
    /// registry's).
    pub app_chart_registry_auth: bool,
    /// A build Job running longer than this fails with `BuildTimedOut`.
    pub build_deadline_seconds: i64,
    /// `helm --timeout` for deploys, upgrades and uninstalls.
    pub helm_timeout_seconds: i64,
    /// Finished Jobs (and their pods and logs) are removed after this.
    pub ttl_seconds_after_finished: i32,
    /// Requests and limits of the build container.
    pub build_cpu_request: String,
    pub build_memory_request: String,
    pub build_cpu_limit: String,
    pub build_memory_limit: String,
}

impl Default for JobSettings {
    fn default() -> Self {
        Self {
            git_image: "alpine/git:v2.49.1".into(),
            kaniko_image: "ghcr.io/osscontainertools/kaniko:v1.28.0".into(),
            builder_image: "paketobuildpacks/builder-jammy-base:latest".into(),
            platform_api: "0.12".into(),
            helm_image: "alpine/helm:3.19.0".into(),
            app_chart: "https://registry.nixys.io/chartrepo/public#nxs-universal-chart".into(),
            app_chart_version: "2.8.1".into(),
            app_chart_registry_auth: false,
            build_deadline_seconds: 3600,
            helm_timeout_seconds: 600,
            ttl_seconds_after_finished: 86_400,
            build_cpu_request: "250m".into(),
            build_memory_request: "512Mi".into(),
            build_cpu_limit: "2".into(),
            build_memory_limit: "2Gi".into(),
        }
    }
}

/// Label naming the AppBuild a Job and its pod belong to.
pub const BUILD_LABEL: &str = "shapeblock.io/build";
/// Label naming the App.
pub const APP_LABEL: &str = "shapeblock.io/app";
/// Label naming the Service.
pub const SERVICE_LABEL: &str = "shapeblock.io/service";
/// Label telling the Job's role: `build`, `deploy`, `install` or `uninstall`.
pub const STEP_LABEL: &str = "shapeblock.io/step";

/// Container names, which the controllers read termination messages from.
pub const GIT_INIT_CONTAINER: &str = "git-init";
pub const CLONE_CONTAINER: &str = "clone";
pub const CHECKOUT_CONTAINER: &str = "checkout";
pub const COMMIT_CONTAINER: &str = "commit";
pub const PREPARE_CONTAINER: &str = "prepare";
pub const BUILD_CONTAINER: &str = "build";
pub const HELM_CONTAINER: &str = "helm";

const SOURCE: &str = "/workspace/source";
/// Where the kaniko container mounts the source volume. kaniko leaves every mount point and
/// everything under `/kaniko` out of the image it snapshots, so the source mounted at
/// `/workspace` would drop what a Dockerfile puts there (`WORKDIR /workspace` + `COPY . .`);
/// `/kaniko/buildcontext` is kaniko's own build-context directory, never part of an image.
const KANIKO_CONTEXT_MOUNT: &str = "/kaniko/buildcontext";
const KANIKO_SOURCE: &str = "/kaniko/buildcontext/source";
/// The kaniko container's registry credentials, under `/kaniko` for the same reason (and the
/// directory kaniko's image points `DOCKER_CONFIG` at).
const KANIKO_DOCKER_CONFIG_DIR: &str = "/kaniko/.docker";
const KNOWN_HOSTS_DIR: &str = "/etc/shapeblock/known-hosts";
const SSH_KEY_DIR: &str = "/etc/shapeblock/git-ssh";
const DOCKER_CONFIG_DIR: &str = "/etc/shapeblock/docker";
const VALUES_DIR: &str = "/etc/shapeblock/values";
const CHART_DIR: &str = "/etc/shapeblock/chart";
const HELM_REGISTRY_DIR: &str = "/etc/shapeblock/helm-registry";

/// How the clone authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GitAuth {
    /// Public repository.
    None,
    /// SSH with the key in this Secret (`ssh-privatekey`), host keys from this ConfigMap.
    Ssh {
        secret: String,
        known_hosts_config_map: String,
    },
    /// HTTPS with `username` and `password` or `token` from this Secret, sent only to the
    /// host in its `host` key.
    Https { secret: String },
    /// SSH to a public repository: host keys checked, no key.
    SshAnonymous { known_hosts_config_map: String },
}

/// Everything a build Job depends on, decided by the controller.
#[derive(Clone, Debug)]
pub struct BuildJob<'a> {
    /// Job name (see [`super::build::child_name`]).
    pub name: &'a str,
    pub namespace: &'a str,
    pub build: &'a str,
    pub app: &'a str,
    pub build_type: BuildType,
    pub git_url: &'a str,
    /// Branch, tag or full commit SHA.
    pub git_ref: &'a str,
    pub git_auth: GitAuth,
    pub context_dir: Option<&'a str>,
    pub dockerfile_path: Option<&'a str>,
    pub builder_image: Option<&'a str>,
    pub image: &'a ImageRef,
    pub cache: &'a ImageRef,
    /// kaniko `--build-arg` argv (see [`super::build::build_args`]).
    pub build_args: Vec<String>,
    /// Secret with the buildpack platform env files, when there are build vars.
    pub platform_env_secret: Option<&'a str>,
    /// dockerconfigjson Secret with push credentials.
    pub registry_secret: &'a str,
    /// Controller owner reference (the AppBuild).
    pub owner: Value,
    pub node_affinity: Option<Value>,
}

/// Whether a git ref names a commit: a full SHA-1 or SHA-256 object name.
pub fn is_commit_sha(git_ref: &str) -> bool {
    matches!(git_ref.len(), 40 | 64) && git_ref.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The labels of a hub-made object: managed-by plus `pairs` (pure).
pub fn labels(pairs: &[(&str, &str)]) -> Value {
    let mut map = serde_json::Map::new();
    map.insert(MANAGED_BY_LABEL.into(), MANAGED_BY_VALUE.into());
    for (k, v) in pairs {
        map.insert((*k).into(), (*v).into());
    }
    Value::Object(map)
}

fn restricted(run_as: Option<(i64, i64)>, add: &[&str]) -> Value {
    let mut ctx = json!({
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"], "add": add},
        "seccompProfile": {"type": "RuntimeDefault"},
    });
    if let Some((uid, gid)) = run_as {
        ctx["runAsUser"] = uid.into();
        ctx["runAsGroup"] = gid.into();
    }
    ctx
}

fn join(base: &str, rel: Option<&str>) -> String {
    match rel
        .map(|r| r.trim_matches('/'))
        .filter(|r| !r.is_empty() && *r != ".")
    {
        Some(rel) => format!("{base}/{rel}"),
        None => base.to_string(),
    }
}

/// The git steps that lay out the source, as (container name, argv): for a branch or tag one
/// shallow `git clone --branch`; for a commit SHA `git init`, a shallow `git fetch` of that
/// commit and a detached checkout of it (`git clone --revision` would do it in one, but needs
/// git ≥ 2.49). The step that talks to the git host is always [`CLONE_CONTAINER`], whose
/// output explains a failure. `--` ends the options, so the URL is never read as one.
pub fn clone_steps(git_url: &str, git_ref: &str) -> Vec<(&'static str, Vec<String>)> {
    let argv = |args: &[&str]| args.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    if !is_commit_sha(git_ref) {
        let branch = format!("--branch={git_ref}");
        return vec![(
            CLONE_CONTAINER,
            argv(&[
                "clone",
                "--depth=1",
                "--single-branch",
                "--no-tags",
                &branch,
                "--",
                git_url,
                SOURCE,
            ]),
        )];
    }
    vec![
        (GIT_INIT_CONTAINER, argv(&["init", "-q", SOURCE])),
        (
            CLONE_CONTAINER,
            argv(&[
                "-C",
                SOURCE,
                "fetch",
                "--depth=1",
                "--no-tags",
                "--",
                git_url,
                git_ref,
            ]),
        ),
        (
            CHECKOUT_CONTAINER,
            argv(&["-C", SOURCE, "checkout", "-q", "--detach", "FETCH_HEAD"]),
        ),
    ]
}

/// Variable holding the host an HTTPS git Secret is bound to (its `host` key).
pub const GIT_CREDENTIAL_HOST_ENV: &str = "SHAPEBLOCK_GIT_HOST";

/// git's credential helper for HTTPS Secrets. A fixed script: git's request is read as data
/// (`protocol=`, `host=` lines on stdin), the credentials are printed as data by printf, and
/// nothing from a user is ever parsed as code. It answers only a `get` for exactly the bound
/// host over https; for any other host or scheme (a redirect, a submodule, an App pointing
/// its URL elsewhere) it prints nothing, so git has no credentials to send.
pub const GIT_CREDENTIAL_HELPER: &str = r#"!f() { test "$1" = get || exit 0; protocol=; host=; while IFS= read -r line; do case "$line" in protocol=*) protocol=${line#protocol=} ;; host=*) host=${line#host=} ;; esac; done; test "$protocol" = https || exit 0; test -n "$SHAPEBLOCK_GIT_HOST" && test "$host" = "$SHAPEBLOCK_GIT_HOST" || exit 0; printf 'username=%s\npassword=%s\n' "${GIT_USERNAME:-x-access-token}" "${GIT_PASSWORD:-$GIT_TOKEN}"; }; f"#;

/// Environment of the git containers: constant settings only; credentials come from the
/// Secret as variables that git's credential helper prints (never interpolated as code).
fn git_env(auth: &GitAuth) -> Vec<Value> {
    let mut env = vec![
        json!({"name": "GIT_TERMINAL_PROMPT", "value": "0"}),
        json!({"name": "HOME", "value": "/tmp"}),
    ];
    let ssh = |key: bool| {
        let identity = if key {
            format!("-i {SSH_KEY_DIR}/ssh-privatekey -o IdentitiesOnly=yes ")
        } else {
            String::new()
        };
        json!({"name": "GIT_SSH_COMMAND", "value": format!(
            "ssh {identity}-o StrictHostKeyChecking=yes -o UserKnownHostsFile={KNOWN_HOSTS_DIR}/known_hosts -o BatchMode=yes"
        )})
    };
    match auth {
        GitAuth::None => {}
        GitAuth::Ssh { .. } => env.push(ssh(true)),
        GitAuth::SshAnonymous { .. } => env.push(ssh(false)),
        GitAuth::Https { secret } => {
            for (name, key) in [
                ("GIT_USERNAME", "username"),
                ("GIT_PASSWORD", "password"),
                ("GIT_TOKEN", "token"),
            ] {
                env.push(json!({"name": name, "valueFrom": {"secretKeyRef": {
                    "name": secret, "key": key, "optional": true}}}));
            }
            // The host the Secret is bound to, from the Secret itself (not optional: without it
            // the container does not start, rather than send the credentials anywhere).
            env.push(
                json!({"name": GIT_CREDENTIAL_HOST_ENV, "valueFrom": {"secretKeyRef": {
                "name": secret, "key": "host"}}}),
            );
            env.extend([
                json!({"name": "GIT_CONFIG_COUNT", "value": "1"}),
                json!({"name": "GIT_CONFIG_KEY_0", "value": "credential.helper"}),
                json!({"name": "GIT_CONFIG_VALUE_0", "value": GIT_CREDENTIAL_HELPER}),
            ]);
        }
    }
    env
}

/// The build Job of an AppBuild (pure).
pub fn build_job(job: &BuildJob<'_>, settings: &JobSettings) -> Value {
    let job_labels = labels(&[
        (APP_LABEL, job.app),
        (BUILD_LABEL, job.build),
        (STEP_LABEL, "build"),
    ]);
    let mut volumes = vec![
        json!({"name": "source", "emptyDir": {}}),
        json!({"name": "tmp", "emptyDir": {}}),
        json!({"name": "docker-config", "secret": {"secretName": job.registry_secret,
            "items": [{"key": ".dockerconfigjson", "path": "config.json"}]}}),
    ];
    let mut git_mounts = vec![
        json!({"name": "source", "mountPath": "/workspace"}),
        json!({"name": "tmp", "mountPath": "/tmp"}),
    ];
    match &job.git_auth {
        GitAuth::Ssh {
            secret,
            known_hosts_config_map,
        } => {
            volumes.push(json!({"name": "git-ssh", "secret": {"secretName": secret,
                "defaultMode": 0o400, "items": [{"key": "ssh-privatekey", "path": "ssh-privatekey"}]}}));
            volumes.push(
                json!({"name": "known-hosts", "configMap": {"name": known_hosts_config_map}}),
            );
            git_mounts.push(json!({"name": "git-ssh", "mountPath": SSH_KEY_DIR, "readOnly": true}));
            git_mounts.push(
                json!({"name": "known-hosts", "mountPath": KNOWN_HOSTS_DIR, "readOnly": true}),
            );
        }
        GitAuth::SshAnonymous {
            known_hosts_config_map,
        } => {
            volumes.push(
                json!({"name": "known-hosts", "configMap": {"name": known_hosts_config_map}}),
            );
            git_mounts.push(
                json!({"name": "known-hosts", "mountPath": KNOWN_HOSTS_DIR, "readOnly": true}),
            );
        }
        GitAuth::None | GitAuth::Https { .. } => {}
    }
    let git_container = |name: &str, args: Vec<String>| {
        json!({
            "name": name, "image": settings.git_image, "command": ["git"], "args": args,
            "env": git_env(&job.git_auth), "volumeMounts": git_mounts.clone(),
            "terminationMessagePolicy": "FallbackToLogsOnError",
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
            "securityContext": restricted(Some((0, 0)), &[]),
        })
    };
    let mut init: Vec<Value> = clone_steps(job.git_url, job.git_ref)
        .into_iter()
        .map(|(name, args)| git_container(name, args))
        .collect();
    init.push(
        // The resolved commit, as the container's termination message.
        git_container(
            COMMIT_CONTAINER,
            [
                "-C",
                SOURCE,
                "log",
                "-1",
                "--format=%H",
                "--output=/dev/termination-log",
            ]
            .map(String::from)
            .to_vec(),
        ),
    );
    let resources = json!({
        "requests": {"cpu": settings.build_cpu_request, "memory": settings.build_memory_request},
        "limits": {"cpu": settings.build_cpu_limit, "memory": settings.build_memory_limit},
    });
    let build = match job.build_type {
        BuildType::Dockerfile | BuildType::Image => {
            let context = join(KANIKO_SOURCE, job.context_dir);
            let dockerfile = match job.dockerfile_path {
                Some(path) => join(KANIKO_SOURCE, Some(path)),
                None => format!("{context}/Dockerfile"),
            };
            let mut args = vec![
                format!("--context=dir://{context}"),
                format!("--dockerfile={dockerfile}"),
                format!("--destination={}", job.image),
                "--cache=true".to_string(),
                format!("--cache-repo={}", job.cache.repository()),
                "--digest-file=/dev/termination-log".to_string(),
                // Plain lines: the log reaches people through the API and the relay, where
                // kaniko's default colour codes would be noise.
                "--log-format=text".to_string(),
            ];
            args.extend(job.build_args.iter().cloned());
            json!({
                "name": BUILD_CONTAINER, "image": settings.kaniko_image, "args": args,
                "env": [{"name": "DOCKER_CONFIG", "value": KANIKO_DOCKER_CONFIG_DIR}],
                "volumeMounts": [
                    {"name": "source", "mountPath": KANIKO_CONTEXT_MOUNT},
                    {"name": "docker-config", "mountPath": KANIKO_DOCKER_CONFIG_DIR, "readOnly": true},
                ],
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "resources": resources,
                // kaniko unpacks images as root inside its container; it needs no privilege.
                "securityContext": {"runAsUser": 0, "allowPrivilegeEscalation": false},
            })
        }
        BuildType::Buildpack => {
            let context = join(SOURCE, job.context_dir);
            // The lifecycle builds as the builder image's own user (its CNB_USER_ID and
            // CNB_GROUP_ID, which the hub does not know: 1001 for Paketo, 1002 for Heroku),
            // and never takes ownership of the app directory itself: the source (cloned as
            // root) is made writable by any user. The files keep their owner root here; the
            // exporter writes the app layer with the CNB user as owner.
            init.push(json!({
                "name": PREPARE_CONTAINER, "image": settings.git_image, "command": ["chmod"],
                "args": ["-R", "a+rwX", SOURCE],
                "volumeMounts": [{"name": "source", "mountPath": "/workspace"}],
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                // The files are root's, so root changes their mode without any capability.
                "securityContext": restricted(Some((0, 0)), &[]),
            }));
            volumes.push(json!({"name": "layers", "emptyDir": {}}));
            volumes.push(json!({"name": "platform", "emptyDir": {}}));
            let mut mounts = vec![
                json!({"name": "source", "mountPath": "/workspace"}),
                json!({"name": "layers", "mountPath": "/layers"}),
                json!({"name": "platform", "mountPath": "/platform"}),
                json!({"name": "docker-config", "mountPath": DOCKER_CONFIG_DIR, "readOnly": true}),
            ];
            if let Some(secret) = job.platform_env_secret {
                volumes.push(json!({"name": "platform-env", "secret": {"secretName": secret}}));
                mounts.push(
                    json!({"name": "platform-env", "mountPath": "/platform/env", "readOnly": true}),
                );
            }
            json!({
                "name": BUILD_CONTAINER,
                "image": job.builder_image.unwrap_or(&settings.builder_image),
                "command": ["/cnb/lifecycle/creator"],
                "args": [
                    format!("-app={context}"),
                    format!("-cache-image={}", job.cache.repository()),
                    "-layers=/layers", "-platform=/platform",
                    // The report (TOML, with the pushed digest) as the termination message,
                    // which the kubelet creates with mode 0666: the lifecycle writes it (one
                    // os.Create, no rename) after dropping to the builder's user.
                    "-report=/dev/termination-log",
                    job.image.to_string(),
                ],
                "env": [
                    {"name": "CNB_PLATFORM_API", "value": settings.platform_api},
                    {"name": "DOCKER_CONFIG", "value": DOCKER_CONFIG_DIR},
                ],
                "volumeMounts": mounts,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "resources": resources,
                // The creator starts as root and drops to CNB_USER_ID:CNB_GROUP_ID from the
                // builder image's environment itself (lifecycle `priv.RunAs`: setresgid, then
                // setresuid: SETGID, SETUID), after taking ownership of the layers directory
                // when that user cannot write it (`priv.EnsureOwner`: CHOWN). All three are
                // in the baseline Pod Security level; nothing else is kept, and no privilege
                // can be gained after the drop.
                "securityContext": restricted(Some((0, 0)), &["CHOWN", "SETGID", "SETUID"]),
            })
        }
    };
    let mut pod_spec = json!({
        "restartPolicy": "Never",
        "automountServiceAccountToken": false,
        "enableServiceLinks": false,
        // The registry Secret also pulls the build's own images (a private builder image or
        // a mirror of the git, kaniko or lifecycle images).
        "imagePullSecrets": [{"name": job.registry_secret}],
        "initContainers": init,
        "containers": [build],
        "volumes": volumes,
    });
    if let Some(affinity) = &job.node_affinity {
        pod_spec["affinity"] = json!({"nodeAffinity": affinity});
    }
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job.name, "namespace": job.namespace, "labels": job_labels,
            "ownerReferences": [job.owner]},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": settings.build_deadline_seconds,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": job_labels}, "spec": pod_spec},
        }
    })
}

/// A Helm chart reference: `oci://registry/path/chart`, chart `name` in the HTTP(S)
/// repository `repo`, or a chart shipped in a ConfigMap that the Job lays out as a directory
/// (no network needed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chart {
    Oci(String),
    Repo { repo: String, name: String },
    Shipped { config_map: String },
}

impl Chart {
    /// From the configuration form: `oci://…` or `<repo URL>#<chart name>`.
    pub fn parse(value: &str) -> Option<Self> {
        if value.starts_with("oci://") {
            return Some(Chart::Oci(value.to_string()));
        }
        let (repo, name) = value.split_once('#')?;
        (repo.starts_with("https://") || repo.starts_with("http://"))
            .then(|| Chart::Repo {
                repo: repo.to_string(),
                name: name.to_string(),
            })
            .filter(|_| !name.is_empty())
    }
}

/// What a Helm Job does.
#[derive(Clone, Debug)]
pub enum HelmAction<'a> {
    /// `helm upgrade --install` with values from the Secret `values_secret` (`values.yaml`).
    Upgrade {
        chart: &'a Chart,
        version: Option<&'a str>,
        values_secret: &'a str,
        /// dockerconfigjson Secret helm logs in to an OCI chart registry with.
        registry_secret: Option<&'a str>,
        /// `--wait` for the release's resources to be ready. App deploys do not: the hub
        /// follows the rollout itself and fails early when the new pods cannot run.
        wait: bool,
    },
    /// `helm uninstall --ignore-not-found`.
    Uninstall,
}

/// A Helm Job: metadata and what it runs.
#[derive(Clone, Debug)]
pub struct HelmJob<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub release: &'a str,
    pub action: HelmAction<'a>,
    /// Labels besides managed-by (app or service, build, step).
    pub labels: Vec<(&'a str, &'a str)>,
    pub owner: Option<Value>,
    /// ServiceAccount the helm CLI acts as (the project's deployer).
    pub service_account: &'a str,
}

/// The helm argv (pure).
pub fn helm_args(job: &HelmJob<'_>, settings: &JobSettings) -> Vec<String> {
    let timeout = format!("{}s", settings.helm_timeout_seconds);
    let mut args: Vec<String> = match &job.action {
        HelmAction::Upgrade { chart, version, .. } => {
            let mut args = vec!["upgrade".into(), "--install".into(), job.release.into()];
            match chart {
                Chart::Oci(reference) => args.push(reference.clone()),
                Chart::Repo { repo, name } => {
                    args.extend([name.clone(), "--repo".into(), repo.clone()])
                }
                Chart::Shipped { .. } => args.push(CHART_DIR.into()),
            }
            if let (Some(version), false) = (version, matches!(chart, Chart::Shipped { .. })) {
                args.extend(["--version".into(), (*version).into()]);
            }
            args.extend([
                "--values".into(),
                format!("{VALUES_DIR}/values.yaml"),
                "--history-max".into(),
                "10".into(),
            ]);
            args
        }
        HelmAction::Uninstall => vec![
            "uninstall".into(),
            job.release.into(),
            "--ignore-not-found".into(),
        ],
    };
    args.extend(["--namespace".into(), job.namespace.into()]);
    if !matches!(job.action, HelmAction::Upgrade { wait: false, .. }) {
        args.push("--wait".into());
    }
    args.extend(["--timeout".into(), timeout]);
    args
}

/// A Helm Job (pure).
pub fn helm_job(job: &HelmJob<'_>, settings: &JobSettings) -> Value {
    let job_labels = labels(&job.labels);
    let mut volumes = vec![json!({"name": "tmp", "emptyDir": {}})];
    let mut mounts = vec![json!({"name": "tmp", "mountPath": "/tmp"})];
    let mut env = vec![
        json!({"name": "HOME", "value": "/tmp"}),
        json!({"name": "HELM_CACHE_HOME", "value": "/tmp/helm/cache"}),
        json!({"name": "HELM_CONFIG_HOME", "value": "/tmp/helm/config"}),
        json!({"name": "HELM_DATA_HOME", "value": "/tmp/helm/data"}),
    ];
    if let HelmAction::Upgrade {
        values_secret,
        chart,
        registry_secret,
        ..
    } = &job.action
    {
        volumes.push(json!({"name": "values", "secret": {"secretName": values_secret}}));
        mounts.push(json!({"name": "values", "mountPath": VALUES_DIR, "readOnly": true}));
        if let Chart::Shipped { config_map } = chart {
            volumes.push(super::app::chart_volume("chart", config_map));
            mounts.push(json!({"name": "chart", "mountPath": CHART_DIR, "readOnly": true}));
        }
        if let (Chart::Oci(_), Some(secret)) = (chart, registry_secret) {
            volumes.push(json!({"name": "helm-registry", "secret": {"secretName": secret}}));
            mounts.push(
                json!({"name": "helm-registry", "mountPath": HELM_REGISTRY_DIR, "readOnly": true}),
            );
            env.push(json!({"name": "HELM_REGISTRY_CONFIG",
                "value": format!("{HELM_REGISTRY_DIR}/.dockerconfigjson")}));
        }
    }
    json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": job.name, "namespace": job.namespace, "labels": job_labels,
            "ownerReferences": job.owner.iter().collect::<Vec<_>>()},
        "spec": {
            "backoffLimit": 0,
            // helm gives up at its own timeout; the deadline only catches a pod that never ran.
            "activeDeadlineSeconds": settings.helm_timeout_seconds + 300,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": job_labels}, "spec": {
                "restartPolicy": "Never",
                "serviceAccountName": job.service_account,
                "enableServiceLinks": false,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65534, "runAsGroup": 65534,
                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{
                    "name": HELM_CONTAINER, "image": settings.helm_image,
                    "command": ["helm"], "args": helm_args(job, settings),
                    "env": env,
                    "volumeMounts": mounts,
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                        "limits": {"memory": "512Mi"}},
                    "securityContext": {"allowPrivilegeEscalation": false,
                        "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                }],
                "volumes": volumes,
            }},
        }
    })
}

/// A Secret holding Helm values as `values.yaml` (JSON is YAML), owned like its Job (pure).
pub fn values_secret(
    name: &str,
    namespace: &str,
    values: &Value,
    labels_: &[(&str, &str)],
    owner: Option<Value>,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(labels_),
            "ownerReferences": owner.into_iter().collect::<Vec<_>>()},
        "type": "Opaque",
        "stringData": {"values.yaml": serde_json::to_string_pretty(values).unwrap_or_default()},
    })
}

/// A Secret of buildpack platform env files, one key per variable (pure).
pub fn platform_env_secret(
    name: &str,
    namespace: &str,
    vars: &std::collections::BTreeMap<String, String>,
    labels_: &[(&str, &str)],
    owner: Value,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": labels(labels_),
            "ownerReferences": [owner]},
        "type": "Opaque",
        "stringData": vars,
    })
}

/// Human meaning of a buildpacks lifecycle exit code (the platform spec's bands).
pub fn lifecycle_exit(code: i32) -> Option<&'static str> {
    Some(match code {
        20 => "no buildpack detected the application (detect phase)",
        21..=29 => "buildpack detection failed (detect phase)",
        30..=39 => "reading the previous image failed (analyze phase)",
        40..=49 => "restoring the build cache failed (restore phase)",
        50..=59 => "a buildpack failed while building (build phase)",
        60..=69 => "exporting the image failed (export phase: registry push or credentials)",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Value {
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild", "name": "web-1",
            "uid": "u1", "controller": true, "blockOwnerDeletion": true})
    }

    fn job<'a>(
        build_type: BuildType,
        git_ref: &'a str,
        image: &'a ImageRef,
        cache: &'a ImageRef,
    ) -> BuildJob<'a> {
        BuildJob {
            name: "web-1-build",
            namespace: "shop",
            build: "web-1",
            app: "web",
            build_type,
            git_url: "git@github.com:org/web.git",
            git_ref,
            git_auth: GitAuth::Ssh {
                secret: "web-deploy-key".into(),
                known_hosts_config_map: "web-git-known-hosts".into(),
            },
            context_dir: Some("services/web/"),
            dockerfile_path: None,
            builder_image: None,
            image,
            cache,
            build_args: vec!["--build-arg".into(), "A=$(id) ; `x`\nnext".into()],
            platform_env_secret: Some("web-1-env"),
            registry_secret: "registry-creds",
            owner: owner(),
            node_affinity: None,
        }
    }

    fn container<'a>(job: &'a Value, list: &str, name: &str) -> &'a Value {
        job["spec"]["template"]["spec"][list]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no {list} {name}"))
    }

    fn args(c: &Value) -> Vec<&str> {
        c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect()
    }

    #[test]
    fn commit_shas_are_recognised() {
        assert!(is_commit_sha(&"a".repeat(40)));
        assert!(is_commit_sha(&"0".repeat(64)));
        assert!(!is_commit_sha("abc1234"));
        assert!(!is_commit_sha(&"g".repeat(40)));
        assert!(!is_commit_sha("main"));
    }

    #[test]
    fn clone_is_shallow_for_branches_and_exact_for_commits() {
        assert_eq!(
            clone_steps("https://x/r.git", "release/1.2"),
            [(
                CLONE_CONTAINER,
                [
                    "clone",
                    "--depth=1",
                    "--single-branch",
                    "--no-tags",
                    "--branch=release/1.2",
                    "--",
                    "https://x/r.git",
                    SOURCE
                ]
                .map(String::from)
                .to_vec()
            )]
        );
        // A commit: no `git clone --revision` (git ≥ 2.49); init, fetch the one commit, check
        // it out detached. The fetch, which talks to the git host, is the `clone` step.
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let steps = clone_steps("-u evil", sha);
        let names: Vec<&str> = steps.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [GIT_INIT_CONTAINER, CLONE_CONTAINER, CHECKOUT_CONTAINER]
        );
        assert_eq!(steps[0].1, ["init", "-q", SOURCE]);
        assert_eq!(
            steps[1].1,
            [
                "-C",
                SOURCE,
                "fetch",
                "--depth=1",
                "--no-tags",
                "--",
                "-u evil",
                sha
            ]
        );
        assert_eq!(
            steps[2].1,
            ["-C", SOURCE, "checkout", "-q", "--detach", "FETCH_HEAD"]
        );
        assert!(
            !steps
                .iter()
                .any(|(_, a)| a.iter().any(|a| a.starts_with("--revision"))),
            "no option of git ≥ 2.49"
        );
    }

    #[test]
    fn a_commit_build_runs_the_git_steps_in_order_before_the_commit_step() {
        let image = ImageRef::parse("r.example.com/shop/web:t").unwrap();
        let cache = ImageRef::parse("r.example.com/shop/web-cache").unwrap();
        let sha = "0123456789abcdef0123456789abcdef01234567";
        let settings = JobSettings::default();
        for build_type in [BuildType::Dockerfile, BuildType::Buildpack] {
            let rendered = build_job(&job(build_type, sha, &image, &cache), &settings);
            let init = rendered["spec"]["template"]["spec"]["initContainers"]
                .as_array()
                .unwrap();
            let names: Vec<&str> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
            let mut expected = vec![
                GIT_INIT_CONTAINER,
                CLONE_CONTAINER,
                CHECKOUT_CONTAINER,
                COMMIT_CONTAINER,
            ];
            if build_type == BuildType::Buildpack {
                expected.push(PREPARE_CONTAINER);
            }
            assert_eq!(names, expected);
            for git in &init[..4] {
                assert_eq!(git["image"], settings.git_image);
                assert_eq!(git["command"], json!(["git"]), "one argv, no shell");
                assert!(
                    git["env"].to_string().contains("GIT_SSH_COMMAND"),
                    "every git step has the credentials"
                );
            }
        }
    }

    #[test]
    fn kaniko_job_shape() {
        let image = ImageRef::parse("registry.example.com:5000/shop/web:web-1").unwrap();
        let cache = ImageRef::parse("registry.example.com:5000/shop/web-cache").unwrap();
        let spec = job(BuildType::Dockerfile, "main", &image, &cache);
        let rendered = build_job(&spec, &JobSettings::default());
        assert_eq!(rendered["metadata"]["name"], "web-1-build");
        assert_eq!(
            rendered["metadata"]["ownerReferences"][0]["kind"],
            "AppBuild"
        );
        assert_eq!(rendered["spec"]["backoffLimit"], 0);
        assert_eq!(rendered["spec"]["activeDeadlineSeconds"], 3600);
        assert_eq!(rendered["spec"]["ttlSecondsAfterFinished"], 86_400);
        let pod_labels = &rendered["spec"]["template"]["metadata"]["labels"];
        assert_eq!(pod_labels[BUILD_LABEL], "web-1");
        assert_eq!(pod_labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
        let pod = &rendered["spec"]["template"]["spec"];
        assert_eq!(pod["restartPolicy"], "Never");
        assert_eq!(pod["automountServiceAccountToken"], false);

        let clone = container(&rendered, "initContainers", CLONE_CONTAINER);
        assert_eq!(clone["command"], json!(["git"]));
        let ssh = clone["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "GIT_SSH_COMMAND")
            .unwrap()["value"]
            .as_str()
            .unwrap();
        assert!(ssh.contains("StrictHostKeyChecking=yes"), "{ssh}");
        assert!(ssh.contains(&format!("UserKnownHostsFile={KNOWN_HOSTS_DIR}/known_hosts")));
        let commit = container(&rendered, "initContainers", COMMIT_CONTAINER);
        assert!(args(commit).contains(&"--output=/dev/termination-log"));

        let build = container(&rendered, "containers", BUILD_CONTAINER);
        let a = args(build);
        assert_eq!(
            a[0],
            "--context=dir:///kaniko/buildcontext/source/services/web"
        );
        assert_eq!(
            a[1],
            "--dockerfile=/kaniko/buildcontext/source/services/web/Dockerfile"
        );
        // Nothing is mounted where a Dockerfile could put files: kaniko leaves mount points
        // out of the image, so every mount of its container is under /kaniko.
        let mounts: Vec<&str> = build["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["mountPath"].as_str().unwrap())
            .collect();
        assert_eq!(mounts, ["/kaniko/buildcontext", "/kaniko/.docker"]);
        assert_eq!(
            build["env"],
            json!([{"name": "DOCKER_CONFIG", "value": "/kaniko/.docker"}])
        );
        // The git steps still lay the source out under /workspace, in the same volume.
        let clone_source = clone["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "source")
            .unwrap();
        assert_eq!(clone_source["mountPath"], "/workspace");
        assert_eq!(pod["imagePullSecrets"], json!([{"name": "registry-creds"}]));
        assert!(a.contains(&"--destination=registry.example.com:5000/shop/web:web-1"));
        assert!(a.contains(&"--cache-repo=registry.example.com:5000/shop/web-cache"));
        assert!(a.contains(&"--digest-file=/dev/termination-log"));
        assert!(a.contains(&"--log-format=text"));
        assert_eq!(&a[a.len() - 2..], ["--build-arg", "A=$(id) ; `x`\nnext"]);
        assert!(build.get("command").is_none(), "kaniko's entrypoint runs");
        // The key is mounted read-only with mode 0400; no container starts a shell.
        let volumes = pod["volumes"].as_array().unwrap();
        let key = volumes.iter().find(|v| v["name"] == "git-ssh").unwrap();
        assert_eq!(key["secret"]["defaultMode"], 0o400);
        for c in pod["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(pod["containers"].as_array().unwrap())
        {
            let cmd = c["command"].to_string();
            assert!(!cmd.contains("sh\""), "a shell in {c}");
        }
    }

    #[test]
    fn dockerfile_path_is_relative_to_the_repository() {
        let image = ImageRef::parse("r.example.com/shop/web:t").unwrap();
        let cache = ImageRef::parse("r.example.com/shop/web-cache").unwrap();
        let mut spec = job(BuildType::Dockerfile, "main", &image, &cache);
        spec.dockerfile_path = Some("docker/web.Dockerfile");
        spec.context_dir = None;
        let rendered = build_job(&spec, &JobSettings::default());
        let a = args(container(&rendered, "containers", BUILD_CONTAINER)).join(" ");
        assert!(
            a.contains("--context=dir:///kaniko/buildcontext/source "),
            "{a}"
        );
        assert!(
            a.contains("--dockerfile=/kaniko/buildcontext/source/docker/web.Dockerfile"),
            "{a}"
        );
    }

    #[test]
    fn buildpack_job_shape() {
        let image = ImageRef::parse("r.example.com/shop/web:t").unwrap();
        let cache = ImageRef::parse("r.example.com/shop/web-cache").unwrap();
        let mut spec = job(BuildType::Buildpack, "main", &image, &cache);
        spec.git_auth = GitAuth::None;
        spec.builder_image = Some("heroku/builder:24");
        let rendered = build_job(&spec, &JobSettings::default());
        let build = container(&rendered, "containers", BUILD_CONTAINER);
        assert_eq!(build["image"], "heroku/builder:24");
        assert_eq!(build["command"], json!(["/cnb/lifecycle/creator"]));
        let a = args(build);
        assert_eq!(a[0], "-app=/workspace/source/services/web");
        assert!(a.contains(&"-cache-image=r.example.com/shop/web-cache"));
        assert!(a.contains(&"-report=/dev/termination-log"));
        assert_eq!(*a.last().unwrap(), "r.example.com/shop/web:t");
        // Root, to drop to the builder's own user (whichever it is), with the capabilities
        // that takes and no other.
        let context = &build["securityContext"];
        assert_eq!(context["runAsUser"], 0);
        assert_eq!(context["allowPrivilegeEscalation"], false);
        assert_eq!(
            context["capabilities"],
            json!({"drop": ["ALL"], "add": ["CHOWN", "SETGID", "SETUID"]})
        );
        let prepare = container(&rendered, "initContainers", PREPARE_CONTAINER);
        assert_eq!(prepare["command"], json!(["chmod"]));
        assert_eq!(args(prepare), ["-R", "a+rwX", SOURCE]);
        assert_eq!(
            prepare["securityContext"]["capabilities"],
            json!({"drop": ["ALL"], "add": []})
        );
        let env_mount = build["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == "/platform/env")
            .unwrap();
        assert_eq!(env_mount["name"], "platform-env");
        let clone = container(&rendered, "initContainers", CLONE_CONTAINER);
        assert!(
            !clone["env"].to_string().contains("GIT_SSH_COMMAND"),
            "public https clone needs no ssh"
        );
    }

    #[test]
    fn https_credentials_are_variables_not_code() {
        let env = git_env(&GitAuth::Https {
            secret: "git-creds".into(),
        });
        let helper = env
            .iter()
            .find(|e| e["name"] == "GIT_CONFIG_VALUE_0")
            .unwrap()["value"]
            .as_str()
            .unwrap();
        assert!(helper.starts_with("!f() {"));
        assert!(helper.contains("\"${GIT_PASSWORD:-$GIT_TOKEN}\""));
        let password = env.iter().find(|e| e["name"] == "GIT_PASSWORD").unwrap();
        assert_eq!(
            password["valueFrom"]["secretKeyRef"],
            json!({"name": "git-creds", "key": "password", "optional": true})
        );
        // The bound host comes from the Secret, and is required.
        let host = env
            .iter()
            .find(|e| e["name"] == GIT_CREDENTIAL_HOST_ENV)
            .unwrap();
        assert_eq!(
            host["valueFrom"]["secretKeyRef"],
            json!({"name": "git-creds", "key": "host"})
        );
    }

    /// What the helper prints for git's request `input`, run by `sh` as git runs a `!` helper
    /// (the command, then its action), with the Secret's values in its environment.
    fn helper_answer(action: &str, input: &str, bound_host: &str) -> String {
        use std::io::Write;
        let helper = GIT_CREDENTIAL_HELPER.strip_prefix('!').unwrap();
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{helper} {action}"))
            .env_clear()
            .env(GIT_CREDENTIAL_HOST_ENV, bound_host)
            .env("GIT_USERNAME", "deployer")
            .env("GIT_TOKEN", "s3cret")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The helper may exit before reading git's request (it answers nothing to `store`, or
        // to a host it refuses early); git ignores the broken pipe, so does this.
        let written = child.stdin.take().unwrap().write_all(input.as_bytes());
        if let Err(err) = written {
            assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe, "{err}");
        }
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    }

    #[test]
    fn the_credential_helper_answers_only_its_host_over_https() {
        let answer = "username=deployer\npassword=s3cret\n";
        let ask = |protocol: &str, host: &str| {
            format!("protocol={protocol}\nhost={host}\npath=org/web.git\n")
        };
        assert_eq!(
            helper_answer("get", &ask("https", "git.example.com"), "git.example.com"),
            answer
        );
        assert_eq!(
            helper_answer(
                "get",
                &ask("https", "git.example.com:8443"),
                "git.example.com:8443"
            ),
            answer
        );
        for (protocol, host) in [
            ("https", "evil.example.com"),
            ("https", "git.example.com.evil.example.com"),
            ("https", "git.example.com:8443"),
            ("https", "GIT.example.com"),
            ("https", ""),
            ("http", "git.example.com"),
        ] {
            assert_eq!(
                helper_answer("get", &ask(protocol, host), "git.example.com"),
                "",
                "{protocol}://{host}"
            );
        }
        // No bound host (an empty key): nothing for anyone, not even a request without a host.
        assert_eq!(helper_answer("get", "protocol=https\n", ""), "");
        // A host that looks like shell is compared as data.
        assert_eq!(
            helper_answer("get", &ask("https", "$(touch /tmp/x)"), "$(touch /tmp/x)"),
            answer
        );
        assert_eq!(
            helper_answer("store", &ask("https", "git.example.com"), "git.example.com"),
            ""
        );
    }

    #[test]
    fn helm_jobs() {
        let settings = JobSettings::default();
        let chart = Chart::parse("oci://ghcr.io/shapeblock/charts/universal-chart").unwrap();
        let deploy = HelmJob {
            name: "web-1-deploy",
            namespace: "shop",
            release: "web",
            action: HelmAction::Upgrade {
                chart: &chart,
                version: Some("2.8.1"),
                values_secret: "web-1-values",
                registry_secret: None,
                wait: true,
            },
            labels: vec![(APP_LABEL, "web"), (STEP_LABEL, "deploy")],
            owner: Some(owner()),
            service_account: "deployer",
        };
        assert_eq!(
            helm_args(&deploy, &settings),
            [
                "upgrade",
                "--install",
                "web",
                "oci://ghcr.io/shapeblock/charts/universal-chart",
                "--version",
                "2.8.1",
                "--values",
                "/etc/shapeblock/values/values.yaml",
                "--history-max",
                "10",
                "--namespace",
                "shop",
                "--wait",
                "--timeout",
                "600s"
            ]
        );
        let rendered = helm_job(&deploy, &settings);
        let pod = &rendered["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "deployer");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(
            pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"],
            true
        );
        assert_eq!(pod["volumes"][1]["secret"]["secretName"], "web-1-values");

        // An OCI chart registry with credentials: helm reads them from the mounted Secret.
        let with_auth = HelmJob {
            action: HelmAction::Upgrade {
                chart: &chart,
                version: Some("2.8.1"),
                values_secret: "web-1-values",
                registry_secret: Some("registry-creds"),
                wait: false,
            },
            ..deploy.clone()
        };
        let pod = helm_job(&with_auth, &settings)["spec"]["template"]["spec"].clone();
        assert_eq!(pod["volumes"][2]["secret"]["secretName"], "registry-creds");
        assert!(
            pod["containers"][0]["env"]
                .as_array()
                .unwrap()
                .contains(&json!({"name": "HELM_REGISTRY_CONFIG",
                    "value": "/etc/shapeblock/helm-registry/.dockerconfigjson"}))
        );

        // The shipped chart: a directory laid out from its ConfigMap, no version, no network.
        let shipped = Chart::Shipped {
            config_map: "web-1-chart".into(),
        };
        let local = HelmJob {
            action: HelmAction::Upgrade {
                chart: &shipped,
                version: Some("0.1.0"),
                values_secret: "web-1-values",
                registry_secret: Some("registry-creds"),
                wait: false,
            },
            ..deploy.clone()
        };
        let a = helm_args(&local, &settings);
        assert_eq!(
            &a[..5],
            [
                "upgrade",
                "--install",
                "web",
                "/etc/shapeblock/chart",
                "--values"
            ]
        );
        assert!(
            !a.contains(&"--wait".to_string()),
            "the hub follows an App's rollout itself"
        );
        let pod = helm_job(&local, &settings)["spec"]["template"]["spec"].clone();
        assert_eq!(pod["volumes"][2]["configMap"]["name"], "web-1-chart");
        assert!(
            pod["volumes"][2]["configMap"]["items"]
                .as_array()
                .unwrap()
                .contains(&json!({"key": "templates__deployment.yaml", "path": "templates/deployment.yaml"}))
        );
        assert_eq!(
            pod["volumes"].as_array().unwrap().len(),
            3,
            "no registry login for a shipped chart"
        );

        let repo = Chart::parse("https://charts.bitnami.com/bitnami#postgresql").unwrap();
        let service = HelmJob {
            action: HelmAction::Upgrade {
                chart: &repo,
                version: None,
                values_secret: "db-values",
                registry_secret: None,
                wait: true,
            },
            ..deploy.clone()
        };
        let a = helm_args(&service, &settings);
        assert_eq!(
            &a[..6],
            [
                "upgrade",
                "--install",
                "web",
                "postgresql",
                "--repo",
                "https://charts.bitnami.com/bitnami"
            ]
        );
        assert!(!a.contains(&"--version".to_string()));
        let uninstall = HelmJob {
            action: HelmAction::Uninstall,
            ..deploy
        };
        assert_eq!(
            &helm_args(&uninstall, &settings)[..3],
            ["uninstall", "web", "--ignore-not-found"]
        );
        assert_eq!(
            helm_job(&uninstall, &settings)["spec"]["template"]["spec"]["volumes"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(Chart::parse("https://example.com/charts"), None);
        assert_eq!(Chart::parse("ftp://x#y"), None);
    }

    #[test]
    fn values_are_data() {
        let values = json!({"envs": {"X": "$(reboot)\n---\nkind: Evil"}});
        let secret = values_secret("web-1-values", "shop", &values, &[], None);
        let text = secret["stringData"]["values.yaml"].as_str().unwrap();
        let back: Value = serde_json::from_str(text).unwrap();
        assert_eq!(back, values, "round-trips exactly");
    }

    #[test]
    fn lifecycle_exit_bands() {
        assert!(lifecycle_exit(20).unwrap().contains("detect"));
        assert!(lifecycle_exit(51).unwrap().contains("build phase"));
        assert!(lifecycle_exit(62).unwrap().contains("export"));
        assert_eq!(lifecycle_exit(1), None);
    }
}
