//! How an App runs, rendered for the chart that deploys it: [`Release`] resolves `spec.run`
//! with the hub's settings (defaults applied, URLs decided), then each chart gets its own value
//! shape — the first-party `shapeblock-app` chart ([`builtin_values`], shipped inside the hub
//! and handed to the deploy Job as a ConfigMap, so a deploy needs no network), or
//! nxs-universal-chart ([`nxs_values`]), or any chart with only the image ([`image_values`]).
//! The AppBuild's `helmValues` are deep-merged last in every case.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::build::deep_merge;
use super::image::ImageRef;
use crate::crd::{DEFAULT_PORT, RunSpec};

/// Label on every object of an App's release, and on its pods: the App's name.
pub const APP_LABEL: &str = "shapeblock.io/app";
/// Name of the container that runs the App in its pods.
pub const APP_CONTAINER: &str = "app";

/// Which chart deploys Apps, and in which value shape (`apps:` in the hub configuration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ChartKind {
    /// The first-party chart shipped with the hub (`charts/shapeblock-app`).
    #[default]
    Builtin,
    /// nxs-universal-chart 2.x, values rendered into its own shape.
    NxsUniversalChart,
    /// Any other chart: the hub sets only `image.repository`, `image.tag` and
    /// `imagePullSecrets`; the rest comes from `helmValues`.
    ImageOnly,
}

/// How Apps are deployed and reached (the `apps:` section of the hub configuration).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppSettings {
    /// `builtin`, `nxs-universal-chart` or `image-only`. For the last two, `jobs.app_chart`
    /// and `jobs.app_chart_version` name the chart.
    pub chart: ChartKind,
    /// cert-manager `ClusterIssuer` that signs the certificates of `spec.run.domains`. Without
    /// one, domains are served over plain HTTP.
    pub tls_issuer: Option<String>,
    /// `ingressClassName` of the Apps' Ingresses (the cluster's default class when unset).
    pub ingress_class: Option<String>,
    /// AppBuilds kept per App; older finished ones are deleted with their Jobs and Secrets
    /// (never the current or previous deploy, never one in progress).
    pub keep_builds: u32,
}

impl Default for AppSettings {
    fn default() -> Self {
        Self {
            chart: ChartKind::Builtin,
            tls_issuer: None,
            ingress_class: None,
            keep_builds: 20,
        }
    }
}

/// A domain as deployed: its host, and whether it gets a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub host: String,
    pub tls: bool,
}

/// Everything a chart needs to run one App, resolved (pure input of the value renderers).
#[derive(Clone, Debug, PartialEq)]
pub struct Release {
    /// App name: the Helm release name and the name of its Deployment and Service.
    pub app: String,
    pub image: ImageRef,
    /// dockerconfigjson Secret the pods pull with.
    pub pull_secret: String,
    pub port: i32,
    /// `None` when an autoscaler owns the replica count.
    pub replicas: Option<i32>,
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// `PORT` first, then the App's variables in order.
    pub env: Vec<(String, String)>,
    /// `(kind, name)`: `secret` or `configMap`.
    pub env_from: Vec<(&'static str, String)>,
    pub hosts: Vec<Host>,
    pub tls_issuer: Option<String>,
    pub ingress_class: Option<String>,
    pub cpu_request: String,
    pub memory_request: String,
    pub memory_limit: String,
    /// HTTP path of the health check; a TCP check on the port when `None`.
    pub health_path: Option<String>,
    pub health_initial_delay: i32,
    /// `(min, max, target CPU percent)`.
    pub autoscaling: Option<(i32, i32, i32)>,
}

impl Release {
    /// Resolves an App's run spec with the hub's settings (pure).
    pub fn new(
        app: &str,
        image: ImageRef,
        pull_secret: &str,
        run: Option<&RunSpec>,
        settings: &AppSettings,
    ) -> Self {
        let default = RunSpec::default();
        let run = run.unwrap_or(&default);
        let port = run.port.unwrap_or(DEFAULT_PORT);
        let mut env = vec![("PORT".to_string(), port.to_string())];
        env.extend(
            run.env
                .iter()
                .filter(|v| v.name != "PORT")
                .map(|v| (v.name.clone(), v.value.clone())),
        );
        let env_from = run
            .env_from
            .iter()
            .filter_map(|e| match (&e.secret, &e.config_map) {
                (Some(secret), _) => Some(("secret", secret.clone())),
                (None, Some(config_map)) => Some(("configMap", config_map.clone())),
                (None, None) => None,
            })
            .collect();
        let hosts = hosts(Some(run), settings);
        let resources = run.resources.clone().unwrap_or_default();
        let health = run.health_check.clone().unwrap_or_default();
        let autoscaling = run.autoscaling.as_ref().map(|a| {
            (
                a.min_replicas,
                a.max_replicas,
                a.target_cpu_percent.unwrap_or(80),
            )
        });
        Self {
            app: app.to_string(),
            image,
            pull_secret: pull_secret.to_string(),
            port,
            replicas: match autoscaling {
                Some(_) => None,
                None => Some(run.replicas.unwrap_or(1)),
            },
            command: run.command.clone(),
            args: run.args.clone(),
            env,
            env_from,
            hosts,
            tls_issuer: settings.tls_issuer.clone(),
            ingress_class: settings.ingress_class.clone(),
            cpu_request: resources.cpu_request.unwrap_or_else(|| "100m".into()),
            memory_request: resources.memory_request.unwrap_or_else(|| "128Mi".into()),
            memory_limit: resources.memory_limit.unwrap_or_else(|| "512Mi".into()),
            health_path: health.path,
            health_initial_delay: health.initial_delay_seconds.unwrap_or(0),
            autoscaling,
        }
    }

    /// Where the App answers: `https://host` for a domain with a certificate, else `http://`.
    pub fn urls(&self) -> Vec<String> {
        urls(&self.hosts)
    }

    /// Whether more than one replica should run at any time (then a PodDisruptionBudget keeps
    /// one up through node drains).
    pub fn highly_available(&self) -> bool {
        match self.autoscaling {
            Some((min, _, _)) => min > 1,
            None => self.replicas.unwrap_or(1) > 1,
        }
    }

    fn env_json(&self) -> Value {
        self.env
            .iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect()
    }

    fn env_from_json(&self) -> Value {
        self.env_from
            .iter()
            .map(|(kind, name)| match *kind {
                "secret" => json!({"secretRef": {"name": name}}),
                _ => json!({"configMapRef": {"name": name}}),
            })
            .collect()
    }

    fn probe(&self) -> Value {
        let check = match &self.health_path {
            Some(path) => json!({"httpGet": {"path": path, "port": "http"}}),
            None => json!({"tcpSocket": {"port": "http"}}),
        };
        let mut probe = json!({"initialDelaySeconds": self.health_initial_delay,
            "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3});
        deep_merge(&mut probe, &check);
        probe
    }

    fn resources_json(&self) -> Value {
        json!({"requests": {"cpu": self.cpu_request, "memory": self.memory_request},
            "limits": {"memory": self.memory_limit}})
    }
}

/// The hosts of an App's domains: a domain gets a certificate when it asks for one (the
/// default) and the hub has an issuer to sign it (pure).
pub fn hosts(run: Option<&RunSpec>, settings: &AppSettings) -> Vec<Host> {
    run.iter()
        .flat_map(|r| r.domains.iter())
        .map(|d| Host {
            host: d.host.clone(),
            tls: d.tls.unwrap_or(true) && settings.tls_issuer.is_some(),
        })
        .collect()
}

/// URLs of the App's hosts (pure).
pub fn urls(hosts: &[Host]) -> Vec<String> {
    hosts
        .iter()
        .map(|h| {
            let scheme = if h.tls { "https" } else { "http" };
            format!("{scheme}://{}", h.host)
        })
        .collect()
}

fn with_overrides(mut values: Value, overrides: Option<&BTreeMap<String, Value>>) -> Value {
    if let Some(overrides) = overrides {
        deep_merge(
            &mut values,
            &Value::Object(overrides.clone().into_iter().collect()),
        );
    }
    values
}

/// Values of the first-party chart (`charts/shapeblock-app/values.yaml` documents each key).
pub fn builtin_values(release: &Release, overrides: Option<&BTreeMap<String, Value>>) -> Value {
    let values = json!({
        "app": release.app,
        "image": release.image.to_string(),
        "imagePullSecrets": [release.pull_secret],
        "port": release.port,
        "replicas": release.replicas,
        "command": release.command,
        "args": release.args,
        "env": release.env_json(),
        "envFrom": release.env_from_json(),
        "resources": release.resources_json(),
        "probe": release.probe(),
        "autoscaling": release.autoscaling.map(|(min, max, cpu)| json!({
            "minReplicas": min, "maxReplicas": max, "targetCPUPercent": cpu})),
        "podDisruptionBudget": release.highly_available(),
        "ingress": {
            "className": release.ingress_class,
            "tlsIssuer": release.tls_issuer,
            "hosts": release.hosts.iter()
                .map(|h| json!({"host": h.host, "tls": h.tls}))
                .collect::<Vec<_>>(),
        },
    });
    with_overrides(values, overrides)
}

/// Values for a chart that takes only the image (`image.repository`, `image.tag`,
/// `imagePullSecrets`), the common Helm convention.
pub fn image_values(release: &Release, overrides: Option<&BTreeMap<String, Value>>) -> Value {
    let values = json!({
        "image": {"repository": release.image.repository(), "tag": tag_with_digest(&release.image)},
        "imagePullSecrets": [{"name": release.pull_secret}],
    });
    with_overrides(values, overrides)
}

/// nxs-universal-chart joins `repository:tag`; a digest rides on the tag, giving
/// `repo:tag@digest`, a valid reference in which the digest decides.
pub fn tag_with_digest(image: &ImageRef) -> String {
    let tag = image.tag.clone().unwrap_or_else(|| "latest".to_string());
    match &image.digest {
        Some(digest) => format!("{tag}@{digest}"),
        None => tag,
    }
}

/// Values for nxs-universal-chart 2.x: the same release in the chart's own shape.
pub fn nxs_values(release: &Release, overrides: Option<&BTreeMap<String, Value>>) -> Value {
    let values = json!({
        "defaultImage": release.image.repository(),
        "defaultImageTag": tag_with_digest(&release.image),
        "generic": {"extraImagePullSecrets": [{"name": release.pull_secret}]},
    });
    with_overrides(values, overrides)
}

/// The values for the configured chart (pure).
pub fn values(
    kind: &ChartKind,
    release: &Release,
    overrides: Option<&BTreeMap<String, Value>>,
) -> Value {
    match kind {
        ChartKind::Builtin => builtin_values(release, overrides),
        ChartKind::NxsUniversalChart => nxs_values(release, overrides),
        ChartKind::ImageOnly => image_values(release, overrides),
    }
}

/// The first-party chart's files, `(path inside the chart, content)`, compiled into the hub.
pub const CHART_FILES: &[(&str, &str)] = &[
    (
        "Chart.yaml",
        include_str!("../../charts/shapeblock-app/Chart.yaml"),
    ),
    (
        "values.yaml",
        include_str!("../../charts/shapeblock-app/values.yaml"),
    ),
    (
        "templates/_helpers.tpl",
        include_str!("../../charts/shapeblock-app/templates/_helpers.tpl"),
    ),
    (
        "templates/deployment.yaml",
        include_str!("../../charts/shapeblock-app/templates/deployment.yaml"),
    ),
    (
        "templates/service.yaml",
        include_str!("../../charts/shapeblock-app/templates/service.yaml"),
    ),
    (
        "templates/ingress.yaml",
        include_str!("../../charts/shapeblock-app/templates/ingress.yaml"),
    ),
    (
        "templates/hpa.yaml",
        include_str!("../../charts/shapeblock-app/templates/hpa.yaml"),
    ),
    (
        "templates/pdb.yaml",
        include_str!("../../charts/shapeblock-app/templates/pdb.yaml"),
    ),
];

/// The ConfigMap key of a chart file (keys cannot hold `/`; the volume maps them back).
pub fn chart_key(path: &str) -> String {
    path.replace('/', "__")
}

/// A ConfigMap holding the first-party chart, owned like the deploy Job (pure).
pub fn chart_config_map(name: &str, namespace: &str, labels: Value, owner: Option<Value>) -> Value {
    let data: serde_json::Map<String, Value> = CHART_FILES
        .iter()
        .map(|(path, content)| (chart_key(path), Value::String((*content).to_string())))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
            "ownerReferences": owner.into_iter().collect::<Vec<_>>()},
        "data": data,
    })
}

/// The volume that lays the chart ConfigMap out as a chart directory (pure).
pub fn chart_volume(volume: &str, config_map: &str) -> Value {
    let items: Vec<Value> = CHART_FILES
        .iter()
        .map(|(path, _)| json!({"key": chart_key(path), "path": path}))
        .collect();
    json!({"name": volume, "configMap": {"name": config_map, "items": items}})
}
