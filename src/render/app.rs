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

/// Values for nxs-universal-chart 2.8.x: the same release in the chart's own shape, so it
/// deploys what the first-party chart deploys: one Deployment, Service, Ingress, HPA and PDB,
/// all named after the App, the pods labelled `shapeblock.io/app` and running an `app`
/// container.
///
/// Facts about the chart (read from its 2.8.x templates, which CI cannot fetch) that decide
/// the shape:
/// - Objects are named `<releasePrefix>-<key>`, the prefix defaulting to the release name;
///   `releasePrefix: "-"` is the chart's way to drop it, so the key alone (the App) names them.
/// - `generic.labels` go on every object's metadata but not on pods; a Deployment's
///   `extraSelectorLabels` go on its selector and pod template. Setting the App label in both
///   (and not in `generic.extraSelectorLabels`, which the pdb template adds a second time, a
///   duplicate YAML key) labels the Deployment and its pods once each.
/// - Containers take `defaultImage:defaultImageTag` unless they name their own image.
/// - `replicas` is rendered through `| default 1`, which turns 0 into 1: zero goes as the
///   string `"0"`, which `default` keeps. The chart always renders a replica count, so with an
///   autoscaler the minimum goes in (each upgrade resets the Deployment to it, never below).
/// - HPAs default to `autoscaling/v2beta1`, removed in Kubernetes 1.26, and its `targetCPU`
///   renders the v2beta1 metric; so `apiVersion: autoscaling/v2` and v2 `metrics` instead.
/// - Ingress `certManager` would add TLS for every host of the Ingress (and
///   `kubernetes.io/tls-acme`); per-host TLS needs the issuer annotation and `extraTls`.
/// - Variables go in the container's own `env` list, not the chart's `envs`: `envs` become a
///   hook-managed ConfigMap that loses the order (`$(VAR)` references need `PORT` first),
///   base64-decodes values that start with `b64:` and, unchanged Deployment, rolls nothing
///   out when a value changes.
/// - Most values go through Helm's `tpl`, so the App's own strings are escaped (see
///   [`tpl_literal`]), and a host is given quoted, since `tpl` output lands unquoted in YAML
///   where `*.example.com` would read as an alias.
pub fn nxs_values(release: &Release, overrides: Option<&BTreeMap<String, Value>>) -> Value {
    let app = release.app.as_str();
    let app_label = json!({ APP_LABEL: app });
    let probe = release.probe();
    let container = tpl_literal(json!({
        "name": APP_CONTAINER,
        "command": release.command,
        "args": release.args,
        "ports": [{"name": "http", "containerPort": release.port, "protocol": "TCP"}],
        "env": release.env_json(),
        "envFrom": release.env_from_json(),
        "resources": release.resources_json(),
        "readinessProbe": probe,
        "livenessProbe": probe,
        // The restricted Pod Security Standard, as the first-party chart runs Apps.
        "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
    }));
    let replicas = match (release.replicas, release.autoscaling) {
        (Some(0), _) => json!("0"),
        (Some(n), _) => json!(n),
        (None, Some((min, _, _))) => json!(min),
        (None, None) => json!(1),
    };
    let mut values = json!({
        "releasePrefix": "-",
        "defaultImage": release.image.repository(),
        "defaultImageTag": tag_with_digest(&release.image),
        "generic": {
            "labels": app_label,
            "extraImagePullSecrets": [{"name": release.pull_secret}],
            // The chart's preset puts a soft pod affinity and a soft anti-affinity of equal
            // weight on the same pods; the first-party chart leaves scheduling alone.
            "usePredefinedAffinity": false,
        },
        "deployments": {app: {
            "replicas": replicas,
            "strategy": {"type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
            "extraSelectorLabels": app_label,
            "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
        }},
        "services": {app: {
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
            "extraSelectorLabels": app_label,
        }},
    });
    if !release.hosts.is_empty() {
        let tls: Vec<&str> = release
            .hosts
            .iter()
            .filter(|h| h.tls)
            .map(|h| h.host.as_str())
            .collect();
        let hosts: Vec<Value> = release
            .hosts
            .iter()
            .map(|h| {
                json!({"hostname": Value::String(h.host.clone()).to_string(), "paths": [{
                    "path": "/", "pathType": "Prefix", "serviceName": app, "servicePort": "http"}]})
            })
            .collect();
        let mut ingress = json!({ "hosts": hosts });
        if let Some(class) = &release.ingress_class {
            ingress["ingressClassName"] = json!(class);
        }
        if !tls.is_empty() {
            if let Some(issuer) = &release.tls_issuer {
                ingress["annotations"] = json!({"cert-manager.io/cluster-issuer": issuer});
            }
            ingress["extraTls"] = json!([{"hosts": tls, "secretName": format!("{app}-tls")}]);
        }
        values["ingresses"] = json!({ app: ingress });
    }
    if let Some((min, max, cpu)) = release.autoscaling {
        values["hpas"] = json!({app: {
            "apiVersion": "autoscaling/v2",
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": app},
            "minReplicas": min,
            "maxReplicas": max,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": cpu}}}],
        }});
    }
    if release.highly_available() {
        values["pdbs"] = json!({app: {"minAvailable": 1, "extraSelectorLabels": app_label}});
    }
    with_overrides(values, overrides)
}

/// nxs-universal-chart renders most values with Helm's `tpl`, which would run `{{ … }}` in an
/// App's variables or arguments as a template (failing the deploy, or worse). Every `{{` in
/// the strings of `value` becomes ``{{`{{`}}``, which `tpl` turns back into `{{`: a raw
/// string, so no YAML quoting style of `toYaml` can break it. Only the hub's own values are
/// escaped; `helmValues` keep templates on purpose.
fn tpl_literal(value: Value) -> Value {
    match value {
        Value::String(s) => Value::String(s.replace("{{", "{{`{{`}}")),
        Value::Array(items) => Value::Array(items.into_iter().map(tpl_literal).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(key, value)| (key.replace("{{", "{{`{{`}}"), tpl_literal(value)))
                .collect(),
        ),
        other => other,
    }
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

#[cfg(test)]
mod tests {
    //! The nxs-universal-chart values are checked for their shape only: CI has no network to
    //! fetch the chart, so what the chart makes of them was checked by hand with
    //! `helm template` against nxs-universal-chart v2.8.3 (the 2.8.x line), and these tests pin
    //! the keys its templates read.

    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn release(run: Value, settings: &AppSettings) -> Release {
        let run: RunSpec = serde_json::from_value(run).unwrap();
        let image = ImageRef::parse(&format!("registry.example.com/team/web:v1@{DIGEST}")).unwrap();
        Release::new("web", image, "registry-creds", Some(&run), settings)
    }

    fn plain(run: Value) -> Release {
        release(run, &AppSettings::default())
    }

    fn with_tls() -> AppSettings {
        AppSettings {
            tls_issuer: Some("letsencrypt".into()),
            ingress_class: Some("nginx".into()),
            ..AppSettings::default()
        }
    }

    fn container(values: &Value) -> &Value {
        &values["deployments"]["web"]["containers"][0]
    }

    #[test]
    fn nxs_defaults_name_everything_after_the_app() {
        let v = nxs_values(&plain(json!({})), None);
        assert_eq!(v["releasePrefix"], "-");
        assert_eq!(v["defaultImage"], "registry.example.com/team/web");
        assert_eq!(v["defaultImageTag"], format!("v1@{DIGEST}"));
        assert_eq!(
            v["generic"]["extraImagePullSecrets"],
            json!([{"name": "registry-creds"}])
        );
        assert_eq!(v["generic"]["usePredefinedAffinity"], false);
        let deployments = v["deployments"].as_object().unwrap();
        assert_eq!(deployments.keys().collect::<Vec<_>>(), ["web"]);
        let d = &v["deployments"]["web"];
        assert_eq!(d["replicas"], 1);
        assert_eq!(d["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
        assert_eq!(d["securityContext"]["runAsNonRoot"], true);
        assert_eq!(d["containers"].as_array().unwrap().len(), 1);
        let c = container(&v);
        assert_eq!(c["name"], APP_CONTAINER);
        assert!(
            c.get("image").is_none(),
            "the container falls back to defaultImage"
        );
        assert_eq!(
            c["ports"],
            json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}])
        );
        assert_eq!(c["env"], json!([{"name": "PORT", "value": "8080"}]));
        assert_eq!(c["envFrom"], json!([]));
        assert_eq!(c["command"], json!([]));
        assert_eq!(c["args"], json!([]));
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(
            v["services"]["web"]["ports"],
            json!([{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}])
        );
        for absent in ["ingresses", "hpas", "pdbs", "envs"] {
            assert!(v.get(absent).is_none(), "{absent} without a reason for it");
        }
    }

    #[test]
    fn nxs_labels_the_deployment_its_pods_and_selectors_with_the_app() {
        let v = nxs_values(&plain(json!({"replicas": 2})), None);
        let label = json!({APP_LABEL: "web"});
        // generic.labels: every object's metadata; a Deployment's extraSelectorLabels: its
        // selector and pod template.
        assert_eq!(v["generic"]["labels"], label);
        assert_eq!(v["deployments"]["web"]["extraSelectorLabels"], label);
        assert_eq!(v["services"]["web"]["extraSelectorLabels"], label);
        assert_eq!(v["pdbs"]["web"]["extraSelectorLabels"], label);
        // The pdb template adds generic.extraSelectorLabels after the selector labels that
        // already hold them: a duplicate key, so the label never goes there.
        assert!(v["generic"].get("extraSelectorLabels").is_none());
        assert!(v["generic"].get("podLabels").is_none());
    }

    #[test]
    fn nxs_replicas_fixed_zero_and_autoscaled() {
        let v = nxs_values(&plain(json!({"replicas": 3})), None);
        assert_eq!(v["deployments"]["web"]["replicas"], 3);
        assert!(v.get("hpas").is_none());
        // The chart's `| default 1` would make 0 one replica; the string "0" survives it.
        let v = nxs_values(&plain(json!({"replicas": 0})), None);
        assert_eq!(v["deployments"]["web"]["replicas"], "0");

        let scaled = plain(json!({"autoscaling": {"minReplicas": 2, "maxReplicas": 6,
            "targetCPUPercent": 70}}));
        assert_eq!(scaled.replicas, None);
        let v = nxs_values(&scaled, None);
        assert_eq!(
            v["deployments"]["web"]["replicas"], 2,
            "the autoscaler's minimum"
        );
        assert_eq!(
            v["hpas"],
            json!({"web": {
                "apiVersion": "autoscaling/v2",
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "minReplicas": 2, "maxReplicas": 6,
                "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 70}}}],
            }})
        );
        assert!(
            v["hpas"]["web"].get("targetCPU").is_none(),
            "targetCPU renders the v2beta1 metric"
        );
        let v = nxs_values(
            &plain(json!({"autoscaling": {"minReplicas": 1, "maxReplicas": 3}})),
            None,
        );
        assert_eq!(
            v["hpas"]["web"]["metrics"][0]["resource"]["target"]["averageUtilization"],
            80
        );
    }

    #[test]
    fn nxs_pdb_only_when_more_than_one_replica_runs() {
        let pdb = |run: Value| nxs_values(&plain(run), None).get("pdbs").cloned();
        assert_eq!(pdb(json!({})), None);
        assert_eq!(pdb(json!({"replicas": 1})), None);
        assert_eq!(
            pdb(json!({"replicas": 3})),
            Some(json!({"web": {"minAvailable": 1, "extraSelectorLabels": {APP_LABEL: "web"}}}))
        );
        assert_eq!(
            pdb(json!({"autoscaling": {"minReplicas": 1, "maxReplicas": 5}})),
            None
        );
        assert!(pdb(json!({"autoscaling": {"minReplicas": 2, "maxReplicas": 5}})).is_some());
    }

    #[test]
    fn nxs_command_args_env_and_env_from_go_on_the_container_in_order() {
        let v = nxs_values(
            &plain(
                json!({"port": 3000, "command": ["node"], "args": ["server.js", "--x"],
                "env": [{"name": "B", "value": "2"}, {"name": "PORT", "value": "1"},
                        {"name": "A", "value": "$(B)"}],
                "envFrom": [{"secret": "web-secrets"}, {"configMap": "web-config"}]}),
            ),
            None,
        );
        let c = container(&v);
        assert_eq!(c["command"], json!(["node"]));
        assert_eq!(c["args"], json!(["server.js", "--x"]));
        assert_eq!(
            c["env"],
            json!([{"name": "PORT", "value": "3000"}, {"name": "B", "value": "2"},
                {"name": "A", "value": "$(B)"}])
        );
        assert_eq!(
            c["envFrom"],
            json!([{"secretRef": {"name": "web-secrets"}},
                {"configMapRef": {"name": "web-config"}}])
        );
        assert_eq!(c["ports"][0]["containerPort"], 3000);
        // Not the chart's envs (a hook ConfigMap) nor envSecrets/envConfigmaps (which prefix
        // the names with the release).
        assert!(v.get("envs").is_none());
        assert!(c.get("envSecrets").is_none() && c.get("envConfigmaps").is_none());
    }

    #[test]
    fn nxs_escapes_template_braces_in_the_apps_strings() {
        let v = nxs_values(
            &plain(json!({"args": ["{{ .Release.Name }}"],
                "env": [{"name": "T", "value": "a{{b}}c{{"}]})),
            None,
        );
        let c = container(&v);
        assert_eq!(c["args"], json!(["{{`{{`}} .Release.Name }}"]));
        assert_eq!(c["env"][1]["value"], "a{{`{{`}}b}}c{{`{{`}}");
        assert_eq!(
            tpl_literal(json!({"k": [1, true, null]})),
            json!({"k": [1, true, null]})
        );
    }

    #[test]
    fn nxs_domains_with_tls_get_the_issuer_and_a_secret() {
        let v = nxs_values(
            &release(
                json!({"domains": [{"host": "shop.example.com"},
                    {"host": "*.example.com"}, {"host": "plain.example.com", "tls": false}]}),
                &with_tls(),
            ),
            None,
        );
        let ing = &v["ingresses"]["web"];
        assert_eq!(v["ingresses"].as_object().unwrap().len(), 1);
        assert_eq!(ing["ingressClassName"], "nginx");
        assert_eq!(
            ing["annotations"],
            json!({"cert-manager.io/cluster-issuer": "letsencrypt"})
        );
        assert_eq!(
            ing["extraTls"],
            json!([{"hosts": ["shop.example.com", "*.example.com"], "secretName": "web-tls"}])
        );
        assert!(
            ing.get("certManager").is_none(),
            "it would cover the plain host too"
        );
        // Quoted: the chart's tpl output lands unquoted, where `*` starts a YAML alias.
        let hosts: Vec<&str> = ing["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["hostname"].as_str().unwrap())
            .collect();
        assert_eq!(
            hosts,
            [
                "\"shop.example.com\"",
                "\"*.example.com\"",
                "\"plain.example.com\""
            ]
        );
        assert_eq!(
            ing["hosts"][0]["paths"],
            json!([{"path": "/", "pathType": "Prefix", "serviceName": "web",
                "servicePort": "http"}])
        );
    }

    #[test]
    fn nxs_domains_without_an_issuer_are_plain_http() {
        let v = nxs_values(
            &plain(json!({"domains": [{"host": "shop.example.com"}]})),
            None,
        );
        let ing = &v["ingresses"]["web"];
        assert_eq!(ing["hosts"][0]["hostname"], "\"shop.example.com\"");
        for absent in ["annotations", "extraTls", "ingressClassName"] {
            assert!(ing.get(absent).is_none(), "{absent}");
        }
        // With an issuer but every host opting out of TLS: no annotation, no secret.
        let v = nxs_values(
            &release(
                json!({"domains": [{"host": "a.example.com", "tls": false}]}),
                &with_tls(),
            ),
            None,
        );
        let ing = &v["ingresses"]["web"];
        assert_eq!(ing["ingressClassName"], "nginx");
        assert!(ing.get("annotations").is_none() && ing.get("extraTls").is_none());
    }

    #[test]
    fn nxs_health_check_http_or_tcp_on_both_probes() {
        let v = nxs_values(
            &plain(json!({"healthCheck": {"path": "/healthz", "initialDelaySeconds": 15}})),
            None,
        );
        let c = container(&v);
        assert_eq!(
            c["readinessProbe"],
            json!({"httpGet": {"path": "/healthz", "port": "http"},
                "initialDelaySeconds": 15, "periodSeconds": 10, "timeoutSeconds": 3,
                "failureThreshold": 3})
        );
        assert_eq!(c["livenessProbe"], c["readinessProbe"]);
        let v = nxs_values(&plain(json!({})), None);
        let c = container(&v);
        assert_eq!(c["readinessProbe"]["tcpSocket"], json!({"port": "http"}));
        assert!(c["readinessProbe"].get("httpGet").is_none());
        assert_eq!(c["livenessProbe"], c["readinessProbe"]);
    }

    #[test]
    fn nxs_resources_defaults_and_overrides() {
        let v = nxs_values(&plain(json!({})), None);
        assert_eq!(
            container(&v)["resources"],
            json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}})
        );
        let v = nxs_values(
            &plain(
                json!({"resources": {"cpuRequest": "1", "memoryRequest": "1Gi",
                "memoryLimit": "2Gi"}}),
            ),
            None,
        );
        assert_eq!(
            container(&v)["resources"],
            json!({"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}})
        );
    }

    #[test]
    fn nxs_helm_values_are_merged_last_and_win() {
        let overrides: BTreeMap<String, Value> = serde_json::from_value(json!({
            "defaultImageTag": "pinned",
            "deployments": {"web": {"replicas": 5, "nodeSelector": {"pool": "apps"}}},
            "generic": {"labels": {"team": "shop"}},
            "envs": {"EXTRA": "1"},
        }))
        .unwrap();
        let v = nxs_values(&plain(json!({"replicas": 2})), Some(&overrides));
        assert_eq!(v["defaultImageTag"], "pinned");
        assert_eq!(v["deployments"]["web"]["replicas"], 5);
        assert_eq!(v["deployments"]["web"]["nodeSelector"]["pool"], "apps");
        // Deep-merged: what the override does not name stays.
        assert_eq!(container(&v)["name"], APP_CONTAINER);
        assert_eq!(
            v["generic"]["labels"],
            json!({APP_LABEL: "web", "team": "shop"})
        );
        assert_eq!(v["envs"]["EXTRA"], "1");
        // The user's own templates are not escaped.
        let overrides: BTreeMap<String, Value> = serde_json::from_value(
            json!({"generic": {"podAnnotations": {"a": "{{ .Release.Name }}"}}}),
        )
        .unwrap();
        let v = nxs_values(&plain(json!({})), Some(&overrides));
        assert_eq!(v["generic"]["podAnnotations"]["a"], "{{ .Release.Name }}");
    }

    #[test]
    fn values_picks_the_renderer_of_the_configured_chart() {
        let r = plain(json!({}));
        assert_eq!(
            values(&ChartKind::NxsUniversalChart, &r, None),
            nxs_values(&r, None)
        );
        assert_eq!(
            values(&ChartKind::Builtin, &r, None),
            builtin_values(&r, None)
        );
        assert_eq!(
            values(&ChartKind::ImageOnly, &r, None),
            image_values(&r, None)
        );
    }

    #[test]
    fn builtin_values_shape() {
        let v = builtin_values(&plain(json!({})), None);
        assert_eq!(
            v,
            json!({
                "app": "web",
                "image": format!("registry.example.com/team/web:v1@{DIGEST}"),
                "imagePullSecrets": ["registry-creds"],
                "port": 8080,
                "replicas": 1,
                "command": [],
                "args": [],
                "env": [{"name": "PORT", "value": "8080"}],
                "envFrom": [],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                    "limits": {"memory": "512Mi"}},
                "probe": {"tcpSocket": {"port": "http"}, "initialDelaySeconds": 0,
                    "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3},
                "autoscaling": null,
                "podDisruptionBudget": false,
                "ingress": {"className": null, "tlsIssuer": null, "hosts": []},
            })
        );
    }

    #[test]
    fn builtin_values_full_run_spec() {
        let r = release(
            json!({"port": 3000, "command": ["node"], "args": ["s.js"],
                "env": [{"name": "A", "value": "1"}], "envFrom": [{"configMap": "cfg"}],
                "domains": [{"host": "shop.example.com"}, {"host": "p.example.com", "tls": false}],
                "healthCheck": {"path": "/up"},
                "autoscaling": {"minReplicas": 2, "maxReplicas": 4, "targetCPUPercent": 60}}),
            &with_tls(),
        );
        let v = builtin_values(&r, None);
        assert_eq!(v["replicas"], Value::Null);
        assert_eq!(
            v["autoscaling"],
            json!({"minReplicas": 2, "maxReplicas": 4, "targetCPUPercent": 60})
        );
        assert_eq!(v["podDisruptionBudget"], true);
        assert_eq!(
            v["env"],
            json!([{"name": "PORT", "value": "3000"}, {"name": "A", "value": "1"}])
        );
        assert_eq!(v["envFrom"], json!([{"configMapRef": {"name": "cfg"}}]));
        assert_eq!(
            v["probe"]["httpGet"],
            json!({"path": "/up", "port": "http"})
        );
        assert_eq!(
            v["ingress"],
            json!({"className": "nginx", "tlsIssuer": "letsencrypt", "hosts": [
                {"host": "shop.example.com", "tls": true}, {"host": "p.example.com", "tls": false}]})
        );
        let overrides: BTreeMap<String, Value> =
            serde_json::from_value(json!({"runAsUser": 1000, "probe": {"periodSeconds": 5}}))
                .unwrap();
        let v = builtin_values(&r, Some(&overrides));
        assert_eq!(v["runAsUser"], 1000);
        assert_eq!(v["probe"]["periodSeconds"], 5);
        assert_eq!(v["probe"]["httpGet"]["path"], "/up");
    }

    #[test]
    fn image_values_shape() {
        let v = image_values(&plain(json!({})), None);
        assert_eq!(
            v,
            json!({"image": {"repository": "registry.example.com/team/web",
                "tag": format!("v1@{DIGEST}")},
                "imagePullSecrets": [{"name": "registry-creds"}]})
        );
        let image = ImageRef::parse("team/web").unwrap();
        assert_eq!(tag_with_digest(&image), "latest");
    }

    #[test]
    fn release_resolves_urls_and_tls() {
        let r = release(
            json!({"domains": [{"host": "a.example.com"}, {"host": "b.example.com", "tls": false}]}),
            &with_tls(),
        );
        assert_eq!(r.urls(), ["https://a.example.com", "http://b.example.com"]);
        let r = plain(json!({"domains": [{"host": "a.example.com"}]}));
        assert_eq!(r.urls(), ["http://a.example.com"]);
    }
}
