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
fn charts_lint() {
    run_helm(&[
        "lint",
        "--strict",
        repo().join("charts/shapeblock-hub").to_str().unwrap(),
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
    });
    from_hub.sort_by_key(key);
    assert_eq!(from_chart.len(), 7);
    assert_eq!(
        from_chart, from_hub,
        "the agent chart and the hub's install manifest differ"
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
        std::fs::write(&file, config_map["data"]["hub.yaml"].as_str().unwrap()).unwrap();
        let config = shapeblock::hub::HubConfig::load(shapeblock::hub::HubArgs {
            config: Some(file),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("the chart's hub.yaml is refused by the hub: {e}"));
        assert_eq!(config.listen.port(), 8080);
        // Behind the chart's Ingress the handshake limit keys on the address nginx saw.
        assert_eq!(config.gateway.trust_forwarded_for, i == 0);
        if i == 1 {
            assert_eq!(
                config.public_url.as_deref(),
                Some("wss://hub.internal:8443")
            );
            assert_eq!(config.gateway.handshakes_per_second, 50);
        } else {
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
