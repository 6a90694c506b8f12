//! The Helm charts: lint, render with default and non-default values, and prove the rendered
//! objects against the real test apiserver (strict server-side validation, and the agent
//! chart applied for real). The agent chart must render exactly the hub's install manifest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};
use shapeblock::render::agent::{AgentManifestParams, agent_manifest, helm_template};
use support::TestNamespace;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The helm binary built by tests/control-plane/build.sh.
fn helm() -> PathBuf {
    let dir = std::env::var("SHAPEBLOCK_TEST_BINS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let out = Command::new("bash")
                .arg(repo().join("tests/control-plane/build.sh"))
                .output()
                .expect("run build.sh");
            assert!(
                out.status.success(),
                "build.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .last()
                    .expect("bin dir")
                    .to_string(),
            )
        });
    let helm = dir.join("helm");
    assert!(
        helm.exists(),
        "helm not found at {} (tests/control-plane/build.sh builds it)",
        helm.display()
    );
    helm
}

fn run_helm(args: &[&str]) -> String {
    let out = Command::new(helm()).args(args).output().expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn documents(yaml: &str) -> Vec<Value> {
    yaml.split("\n---")
        .map(|d| d.trim_start_matches("---"))
        .filter_map(|doc| {
            let value: Value = serde_saphyr::from_str(doc).ok()?;
            (!value.is_null()).then_some(value)
        })
        .collect()
}

#[test]
fn agent_chart_template_matches_the_renderer() {
    let path = repo().join("charts/shapeblock-agent/templates/agent.yaml");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        committed,
        helm_template().unwrap(),
        "{} is stale: run `cargo run -- agent-chart --out charts/shapeblock-agent`",
        path.display()
    );
}

#[test]
fn the_hub_charts_local_cluster_template_matches_the_renderer() {
    let path = repo().join("charts/shapeblock-hub/templates/local-cluster.yaml");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        committed,
        shapeblock::render::agent::local_cluster_template().unwrap(),
        "{} is stale: run `cargo run -- agent-chart --out charts/shapeblock-agent --hub-chart charts/shapeblock-hub`",
        path.display()
    );
}

#[test]
fn charts_lint() {
    run_helm(&[
        "lint",
        "--strict",
        repo().join("charts/shapeblock-hub").to_str().unwrap(),
    ]);
    run_helm(&[
        "lint",
        "--strict",
        repo().join("charts/shapeblock-hub").to_str().unwrap(),
        "--set",
        "localCluster.enabled=true",
    ]);
    run_helm(&[
        "lint",
        "--strict",
        repo().join("charts/shapeblock-agent").to_str().unwrap(),
        "--set",
        "clusterId=c0123456789abcdef,hubUrl=wss://hub.example.com,token=sbt_x_y",
    ]);
}

#[tokio::test]
async fn the_agent_chart_renders_the_install_manifest_and_installs() {
    let rendered = run_helm(&[
        "template",
        "agent",
        repo().join("charts/shapeblock-agent").to_str().unwrap(),
        "--set",
        "clusterId=c0123456789abcdef,hubUrl=wss://hub.example.com:8443,token=sbt_c0123456789abcdef_abc,image.tag=1.2.3",
    ]);
    // helm orders documents by kind for installation; compare the objects, not the order.
    let key = |o: &Value| format!("{}/{}", o["kind"], o["metadata"]["name"]);
    let install_order = documents(&rendered);
    let mut from_chart = install_order.clone();
    from_chart.sort_by_key(key);
    let mut from_hub = agent_manifest(&AgentManifestParams {
        cluster_id: "c0123456789abcdef".into(),
        hub_url: "wss://hub.example.com:8443".into(),
        image: "ghcr.io/shapeblock/shapeblock-agent:1.2.3".into(),
        token: "sbt_c0123456789abcdef_abc".into(),
        registry_namespace: "shapeblock".into(),
        registry_secret: "registry-creds".into(),
        hub_ca: None,
    });
    from_hub.sort_by_key(key);
    assert_eq!(from_chart.len(), 20);
    assert_eq!(
        from_chart, from_hub,
        "the agent chart and the hub's install manifest differ"
    );
    // With the hub's private CA: the ConfigMap, its mount and the agent's flag, as the hub
    // renders them.
    let ca = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n";
    let ca_file = std::env::temp_dir().join(format!("hub-ca-{}.crt", support::random_suffix()));
    std::fs::write(&ca_file, ca).unwrap();
    let mut with_ca = documents(&run_helm(&[
        "template",
        "agent",
        repo().join("charts/shapeblock-agent").to_str().unwrap(),
        "--set",
        "clusterId=c0123456789abcdef,hubUrl=wss://hub.example.com:8443,token=sbt_c0123456789abcdef_abc,image.tag=1.2.3",
        "--set-file",
        &format!("hubCA={}", ca_file.display()),
    ]));
    with_ca.sort_by_key(key);
    let mut from_hub_with_ca = agent_manifest(&AgentManifestParams {
        cluster_id: "c0123456789abcdef".into(),
        hub_url: "wss://hub.example.com:8443".into(),
        image: "ghcr.io/shapeblock/shapeblock-agent:1.2.3".into(),
        token: "sbt_c0123456789abcdef_abc".into(),
        registry_namespace: "shapeblock".into(),
        registry_secret: "registry-creds".into(),
        hub_ca: Some(ca.into()),
    });
    from_hub_with_ca.sort_by_key(key);
    assert_eq!(with_ca.len(), 21);
    assert_eq!(
        with_ca, from_hub_with_ca,
        "the agent chart with hubCA and the hub's install manifest with its CA differ"
    );
    // Missing values are refused, not rendered empty.
    let out = Command::new(helm())
        .args([
            "template",
            "agent",
            repo().join("charts/shapeblock-agent").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is required"));

    let client = support::client().await;
    for object in &install_order {
        support::apply_object(&client, object, "default", false).await;
    }
}

#[tokio::test]
async fn the_hub_chart_renders_valid_objects_with_default_and_custom_values() {
    let client = support::client().await;
    let ns = TestNamespace::new("hub-chart").await;
    let chart = repo().join("charts/shapeblock-hub");
    // A private CA for agents to trust (agentHubCA), which the hub checks at start-up.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let ca_file = support::hub::scratch_dir("hub-chart-ca").join("ca.crt");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let set_ca = format!("agentHubCA={}", ca_file.display());
    let variants: [&[&str]; 2] = [
        &[],
        &[
            "--set",
            "ingress.enabled=false,persistence.enabled=false,adminToken.value=0123456789abcdef0123",
            "--set",
            "publicUrl=wss://hub.internal:8443,agentImage=registry.example.com/agent:1,logFormat=text",
            "--set",
            "config.handshakes_per_second=50,config.ping_interval_seconds=15",
            "--set",
            "resources.requests.memory=128Mi,image.tag=9.9.9",
            "--set-file",
            &set_ca,
        ],
    ];
    for (i, extra) in variants.iter().enumerate() {
        let mut args = vec![
            "template",
            "hub",
            chart.to_str().unwrap(),
            "--namespace",
            ns.name.as_str(),
        ];
        args.extend_from_slice(extra);
        let objects = documents(&run_helm(&args));
        let kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        assert!(
            kinds.contains(&"Deployment")
                && kinds.contains(&"Service")
                && kinds.contains(&"ConfigMap"),
            "{kinds:?}"
        );
        assert_eq!(kinds.contains(&"Ingress"), i == 0);
        assert_eq!(kinds.contains(&"PersistentVolumeClaim"), i == 0);
        assert!(
            kinds.contains(&"Secret"),
            "the admin token Secret is always rendered"
        );
        for object in &objects {
            support::apply_object(&client, object, &ns.name, true).await;
        }
        // The rendered configuration file is one the hub accepts (unknown keys would fail).
        let config_map = objects.iter().find(|o| o["kind"] == "ConfigMap").unwrap();
        let dir = support::hub::scratch_dir("hub-chart-config");
        let file = dir.join("hub.yaml");
        // The CA is the ConfigMap's other key, mounted beside hub.yaml in the pod.
        let mounted_ca = dir.join("agent-hub-ca.crt");
        if let Some(ca) = config_map["data"]["agent-hub-ca.crt"].as_str() {
            std::fs::write(&mounted_ca, ca).unwrap();
        }
        let hub_yaml = config_map["data"]["hub.yaml"].as_str().unwrap().replace(
            "/etc/shapeblock-hub/agent-hub-ca.crt",
            mounted_ca.to_str().unwrap(),
        );
        std::fs::write(&file, hub_yaml).unwrap();
        let config = shapeblock::hub::HubConfig::load(shapeblock::hub::HubArgs {
            config: Some(file),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("the chart's hub.yaml is refused by the hub: {e}"));
        assert_eq!(config.listen.port(), 8080);
        assert_eq!(config.metrics_listen.map(|a| a.port()), Some(9180));
        if i == 0 {
            // The Ingress routes the tunnel, the API and kubectl, nothing else (not /metrics).
            let ingress = objects.iter().find(|o| o["kind"] == "Ingress").unwrap();
            let paths: Vec<(&str, &str)> = ingress["spec"]["rules"][0]["http"]["paths"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p["path"].as_str().unwrap(), p["pathType"].as_str().unwrap()))
                .collect();
            assert_eq!(
                paths,
                [
                    (shapeblock::tunnel::CONNECT_PATH, "Exact"),
                    ("/api/v1", "Prefix"),
                    ("/k8s/clusters", "Prefix")
                ]
            );
        }
        // Behind the chart's Ingress the handshake limit keys on the address nginx saw.
        assert_eq!(config.gateway.trust_forwarded_for, i == 0);
        if i == 1 {
            assert_eq!(
                config.public_url.as_deref(),
                Some("wss://hub.internal:8443")
            );
            assert_eq!(config.gateway.handshakes_per_second, 50);
            assert_eq!(config.agent_hub_ca.as_deref(), Some(ca_pem.as_str()));
        } else {
            assert_eq!(config.agent_hub_ca, None);
            assert_eq!(config.public_url.as_deref(), Some("wss://hub.example.com"));
        }
        let deployment = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            container["securityContext"]["readOnlyRootFilesystem"],
            json!(true)
        );
    }
}

/// Minimal CustomResourceDefinitions of the Prometheus Operator's ServiceMonitor and
/// PrometheusRule: structural schemas of exactly the fields the hub chart writes, with the
/// types and required fields of the operator's own CRDs (monitoring.coreos.com/v1), so strict
/// server-side validation rejects a misspelt or misplaced field.
fn monitoring_crds() -> Vec<Value> {
    let string = json!({"type": "string"});
    let string_map = json!({"type": "object", "additionalProperties": {"type": "string"}});
    let crd = |kind: &str, plural: &str, spec: Value| {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
            "spec": {
                "group": "monitoring.coreos.com", "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(),
                          "listKind": format!("{kind}List")},
                "versions": [{"name": "v1", "served": true, "storage": true, "schema": {
                    "openAPIV3Schema": {"type": "object", "required": ["spec"], "properties": {
                        "apiVersion": string, "kind": string, "metadata": {"type": "object"},
                        "spec": spec}}}}]
            }
        })
    };
    let service_monitor = json!({"type": "object", "required": ["selector"], "properties": {
        "selector": {"type": "object", "properties": {"matchLabels": string_map}},
        "endpoints": {"type": "array", "items": {"type": "object", "properties": {
            "port": string, "path": string, "interval": string, "scrapeTimeout": string}}}
    }});
    let prometheus_rule = json!({"type": "object", "properties": {
        "groups": {"type": "array", "items": {"type": "object", "required": ["name", "rules"],
            "properties": {"name": string, "rules": {"type": "array", "items": {
                "type": "object", "required": ["expr"], "properties": {
                    "alert": string, "record": string, "for": string,
                    "expr": {"x-kubernetes-int-or-string": true},
                    "labels": string_map, "annotations": string_map}}}}}}
    }});
    vec![
        crd("ServiceMonitor", "servicemonitors", service_monitor),
        crd("PrometheusRule", "prometheusrules", prometheus_rule),
    ]
}

/// The metric names a hub exposes, from its real `/metrics`: every sample's name, and every
/// declared metric's as Prometheus stores it (a counter's as `<name>_total`).
fn exposed_metric_names(exposition: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in exposition.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            names.insert(match kind {
                "counter" => format!("{name}_total"),
                _ => name.to_string(),
            });
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// The hub's metric names a PromQL expression reads.
fn metric_names_in(expr: &str) -> Vec<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("shapeblock_"))
        .collect()
}

#[tokio::test]
async fn the_hub_chart_monitoring_is_off_by_default_and_valid_when_on() {
    let chart = repo().join("charts/shapeblock-hub");
    let default_kinds: Vec<String> =
        documents(&run_helm(&["template", "hub", chart.to_str().unwrap()]))
            .iter()
            .map(|o| o["kind"].as_str().unwrap().to_string())
            .collect();
    assert!(
        !default_kinds
            .iter()
            .any(|k| k == "ServiceMonitor" || k == "PrometheusRule"),
        "{default_kinds:?}"
    );

    let client = support::client().await;
    let ns = TestNamespace::new("hub-chart-monitoring").await;
    let objects = documents(&run_helm(&[
        "template",
        "hub",
        chart.to_str().unwrap(),
        "--namespace",
        ns.name.as_str(),
        "--set",
        "metrics.serviceMonitor.enabled=true,metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.dashboard.enabled=true,metrics.serviceMonitor.labels.release=prometheus",
    ]));
    let find = |kind: &str, name: &str| {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
    };
    let service_monitor = find("ServiceMonitor", "hub");
    let rule = find("PrometheusRule", "hub");
    let dashboard = find("ConfigMap", "hub-dashboard");
    assert_eq!(
        service_monitor["metadata"]["labels"]["release"],
        "prometheus"
    );
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");

    // The ServiceMonitor selects the chart's Service and scrapes a port it has.
    let service = objects.iter().find(|o| o["kind"] == "Service").unwrap();
    let selector = service_monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    for (key, value) in selector {
        assert_eq!(&service["metadata"]["labels"][key], value, "selector {key}");
    }
    let port = service_monitor["spec"]["endpoints"][0]["port"]
        .as_str()
        .unwrap();
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == port),
        "the Service has no port {port}"
    );
    assert_eq!(service_monitor["spec"]["endpoints"][0]["path"], "/metrics");

    // Every object is accepted by the apiserver, the monitoring ones against the operator's
    // schema (CRDs installed first).
    for crd in monitoring_crds() {
        support::apply_object(&client, &crd, "default", false).await;
    }
    let crds: kube::Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        kube::Api::all(client.clone());
    for name in [
        "servicemonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
    ] {
        support::cluster::wait_for(
            &format!("CRD {name} Established"),
            std::time::Duration::from_secs(30),
            async || {
                let crd = crds.get(name).await.ok()?;
                let established = crd
                    .status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                established.then_some(())
            },
        )
        .await;
    }
    for object in &objects {
        support::apply_object(&client, object, &ns.name, true).await;
    }

    // Every metric an alert or a dashboard panel reads is one the hub really exposes (a
    // labelled family without series is not exposed at all).
    // The per-cluster and per-controller series appear with what they count: a connected
    // cluster, a reconciled Project, a refused handshake, a lost tunnel.
    let mut cluster = support::cluster::connected_cluster("chart-metrics").await;
    support::cluster::active_project(&cluster.admin, "metrics").await;
    let hub = cluster.hub.as_ref().unwrap();
    let refused = hub.api_raw(None, "GET", "/agent/v1/connect", None).await;
    assert!(refused.status >= 400, "{}", refused.status);
    cluster.kill_agent().await;
    let metrics = cluster
        .hub
        .as_ref()
        .unwrap()
        .api("GET", "/metrics", None)
        .await;
    assert_eq!(metrics.status, 200);
    let exposed = exposed_metric_names(&metrics.text());
    drop(cluster);
    let mut expressions: Vec<(String, String)> = Vec::new();
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let alert = rule["alert"].as_str().unwrap().to_string();
            expressions.push((alert, rule["expr"].as_str().unwrap().to_string()));
        }
    }
    let alerts: Vec<&str> = expressions.iter().map(|(a, _)| a.as_str()).collect();
    for wanted in [
        "ShapeBlockClusterDisconnected",
        "ShapeBlockReconcileFailures",
        "ShapeBlockRelayBacklog",
    ] {
        assert!(alerts.contains(&wanted), "no alert {wanted}: {alerts:?}");
    }
    let board: Value =
        serde_json::from_str(dashboard["data"]["shapeblock-hub.json"].as_str().unwrap())
            .expect("the dashboard is JSON");
    assert_eq!(board["uid"], "shapeblock-hub");
    for panel in board["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            expressions.push((
                format!("panel {}", panel["title"]),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    for variable in board["templating"]["list"].as_array().unwrap() {
        if let Some(query) = variable["definition"].as_str() {
            expressions.push((format!("variable {}", variable["name"]), query.to_string()));
        }
    }
    for (what, expr) in &expressions {
        let names = metric_names_in(expr);
        assert!(!names.is_empty(), "{what} reads no hub metric: {expr}");
        for name in names {
            assert!(
                exposed.contains(name),
                "{what} reads {name}, which the hub does not expose: {expr}\nexposed: {exposed:?}"
            );
        }
    }
}

/// The first-party app chart: every file of `charts/shapeblock-app` is compiled into the hub
/// (a template left out would silently never deploy), and it is versioned with the hub.
#[test]
fn the_app_chart_ships_whole_and_is_versioned_with_the_hub() {
    let root = repo().join("charts/shapeblock-app");
    let mut on_disk = vec![];
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                on_disk.push(path.strip_prefix(&root).unwrap().display().to_string());
            }
        }
    }
    on_disk.sort();
    let mut shipped: Vec<String> = shapeblock::render::app::CHART_FILES
        .iter()
        .map(|(path, content)| {
            let file = std::fs::read_to_string(root.join(path)).unwrap();
            assert_eq!(&file, content, "{path} differs from the compiled copy");
            path.to_string()
        })
        .collect();
    shipped.sort();
    assert_eq!(
        on_disk, shipped,
        "render::app::CHART_FILES must list every chart file"
    );
    let chart = std::fs::read_to_string(root.join("Chart.yaml")).unwrap();
    let version = format!("version: {}", env!("CARGO_PKG_VERSION"));
    assert!(chart.contains(&version), "Chart.yaml must say {version}");
}

/// Values the hub renders for an App named `web` with this run spec.
fn app_values(run: Value, settings: shapeblock::render::app::AppSettings) -> Value {
    use shapeblock::render::app::{Release, builtin_values};
    use shapeblock::render::image::ImageRef;
    let run: shapeblock::crd::RunSpec = serde_json::from_value(run).unwrap();
    let image = ImageRef::parse(&format!(
        "registry.example.com:5000/shop/web:v3@sha256:{}",
        "c".repeat(64)
    ))
    .unwrap();
    builtin_values(
        &Release::new("web", image, "registry-creds", Some(&run), &settings),
        None,
    )
}

#[tokio::test]
async fn the_app_chart_renders_each_run_spec_feature_into_objects_the_apiserver_accepts() {
    use shapeblock::render::app::AppSettings;
    let client = support::client().await;
    let ns = TestNamespace::new("app-chart").await;
    // Pods of the rendered Deployment are checked against the restricted Pod Security
    // Standard, enforced by the apiserver in this namespace.
    let restricted = TestNamespace::new("app-chart-restricted").await;
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
        kube::Api::all(client.clone());
    namespaces
        .patch(
            &restricted.name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest"}}})),
        )
        .await
        .unwrap();
    let chart = repo().join("charts/shapeblock-app");
    let with_issuer = AppSettings {
        tls_issuer: Some("letsencrypt-prod".into()),
        ingress_class: Some("nginx".into()),
        ..Default::default()
    };
    let variants: Vec<(&str, Value, AppSettings)> = vec![
        ("defaults", json!({}), AppSettings::default()),
        (
            "replicas, domains with TLS, command, env",
            json!({"replicas": 3, "port": 3000, "command": ["node"], "args": ["server.js", "--port=$(PORT)"],
                "env": [{"name": "NODE_ENV", "value": "production"}],
                "envFrom": [{"secret": "web-secrets"}, {"configMap": "web-config"}],
                "domains": [{"host": "shop.example.com"}, {"host": "*.shop.example.com"}, {"host": "plain.example.com", "tls": false}],
                "resources": {"cpuRequest": "250m", "memoryRequest": "256Mi", "memoryLimit": "1Gi"},
                "healthCheck": {"path": "/healthz", "initialDelaySeconds": 5}}),
            with_issuer.clone(),
        ),
        (
            "autoscaling",
            json!({"autoscaling": {"minReplicas": 2, "maxReplicas": 10, "targetCPUPercent": 60}}),
            AppSettings::default(),
        ),
        (
            "domains without an issuer",
            json!({"domains": [{"host": "shop.example.com"}]}),
            AppSettings::default(),
        ),
    ];
    let dir = support::hub::scratch_dir("app-chart");
    for (name, run, settings) in variants {
        let values = app_values(run, settings);
        let file = dir.join(format!("{}.json", name.replace([' ', ','], "-")));
        std::fs::write(&file, values.to_string()).unwrap();
        run_helm(&[
            "lint",
            "--strict",
            chart.to_str().unwrap(),
            "-f",
            file.to_str().unwrap(),
        ]);
        let objects = documents(&run_helm(&[
            "template",
            "web",
            chart.to_str().unwrap(),
            "--namespace",
            ns.name.as_str(),
            "-f",
            file.to_str().unwrap(),
        ]));
        let find = |kind: &str| objects.iter().find(|o| o["kind"] == kind);
        let kinds: Vec<&str> = objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap())
            .collect();
        for object in &objects {
            assert_eq!(object["metadata"]["name"], "web", "{name}: {object}");
            assert_eq!(
                object["metadata"]["labels"]["shapeblock.io/app"], "web",
                "{name}"
            );
            support::apply_object(&client, object, &ns.name, true).await;
        }
        let deployment = find("Deployment").unwrap_or_else(|| panic!("{name}: no Deployment"));
        let pod = &deployment["spec"]["template"];
        assert_eq!(pod["metadata"]["labels"]["shapeblock.io/app"], "web");
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["name"], "app");
        assert_eq!(container["image"], values["image"]);
        assert_eq!(container["env"][0]["name"], "PORT");
        // The pod as the ReplicaSet would create it passes the restricted standard.
        let pod_object = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-probe", "labels": pod["metadata"]["labels"]},
            "spec": pod["spec"]});
        support::apply_object(&client, &pod_object, &restricted.name, true).await;
        match name {
            "defaults" => {
                assert_eq!(kinds, ["Service", "Deployment"], "{name}");
                assert_eq!(deployment["spec"]["replicas"], 1);
                assert_eq!(container["readinessProbe"]["tcpSocket"]["port"], "http");
                assert!(container["readinessProbe"]["httpGet"].is_null());
            }
            "replicas, domains with TLS, command, env" => {
                assert_eq!(deployment["spec"]["replicas"], 3);
                assert_eq!(container["command"], json!(["node"]));
                assert_eq!(container["args"], json!(["server.js", "--port=$(PORT)"]));
                assert_eq!(container["ports"][0]["containerPort"], 3000);
                assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/healthz");
                assert!(
                    container["readinessProbe"]["tcpSocket"].is_null(),
                    "one handler"
                );
                assert_eq!(container["resources"]["limits"]["memory"], "1Gi");
                assert_eq!(container["envFrom"][0]["secretRef"]["name"], "web-secrets");
                let ingress = find("Ingress").unwrap();
                assert_eq!(ingress["spec"]["ingressClassName"], "nginx");
                assert_eq!(
                    ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"],
                    "letsencrypt-prod"
                );
                assert_eq!(
                    ingress["spec"]["tls"][0]["hosts"],
                    json!(["shop.example.com", "*.shop.example.com"]),
                    "only hosts with tls"
                );
                assert_eq!(ingress["spec"]["rules"].as_array().unwrap().len(), 3);
                assert!(
                    find("PodDisruptionBudget").is_some(),
                    "more than one replica"
                );
                assert!(find("HorizontalPodAutoscaler").is_none());
            }
            "autoscaling" => {
                let hpa = find("HorizontalPodAutoscaler").unwrap();
                assert_eq!(hpa["apiVersion"], "autoscaling/v2");
                assert_eq!(hpa["spec"]["minReplicas"], 2);
                assert_eq!(hpa["spec"]["maxReplicas"], 10);
                assert_eq!(
                    hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
                    60
                );
                assert!(
                    deployment["spec"]["replicas"].is_null(),
                    "the HPA owns the count"
                );
                assert!(
                    find("PodDisruptionBudget").is_some(),
                    "at least two replicas"
                );
            }
            "domains without an issuer" => {
                let ingress = find("Ingress").unwrap();
                assert!(
                    ingress["spec"]["tls"].is_null(),
                    "no issuer, no certificate"
                );
                assert!(ingress["metadata"]["annotations"].is_null());
            }
            other => unreachable!("{other}"),
        }
    }
}
