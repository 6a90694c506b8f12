//! The ShapeBlock CRDs against a real kube-apiserver: they install and become Established,
//! the seed document's samples are accepted, every validation rule rejects a matching invalid
//! object with its message, and server-side apply round-trips each kind with no field lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, CustomResourceExt};
use serde_json::{Value, json};
use shapeblock::crd::{self, App, AppBuild, Project, Service};
use support::TestNamespace;

async fn client_with_crds() -> Client {
    let client = support::client().await;
    crd::install(client.clone(), Duration::from_secs(60))
        .await
        .expect("install CRDs");
    client
}

fn api_for(client: &Client, kind: &str, namespace: Option<&str>) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(crd::GROUP, crd::VERSION, kind);
    let plural = match kind {
        "Project" => "projects",
        "App" => "apps",
        "AppBuild" => "appbuilds",
        "Service" => "services",
        "Team" => "teams",
        other => panic!("unknown kind {other}"),
    };
    let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

fn object(value: Value) -> DynamicObject {
    serde_json::from_value(value).expect("valid object JSON")
}

#[test]
fn committed_crds_match_the_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    for crd in crd::all() {
        let path = dir.join(crd::file_name(&crd));
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `cargo run -- crds --out crds`",
                path.display()
            )
        });
        assert_eq!(
            committed,
            crd::to_yaml(&crd).unwrap(),
            "{} differs from the Rust types; run `cargo run -- crds --out crds`",
            path.display()
        );
    }
}

#[tokio::test]
async fn crds_install_and_become_established() {
    let client = client_with_crds().await;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    for expected in crd::all() {
        let name = expected.metadata.name.clone().unwrap();
        let got = crds.get(&name).await.unwrap();
        let conditions = got.status.and_then(|s| s.conditions).unwrap_or_default();
        for ty in ["Established", "NamesAccepted"] {
            assert!(
                conditions
                    .iter()
                    .any(|c| c.type_ == ty && c.status == "True"),
                "{name}: condition {ty} not True: {conditions:?}"
            );
        }
        assert_eq!(got.spec.names.kind, expected.spec.names.kind);
    }
    // Installing again (an upgrade with the same field manager) is a no-op that succeeds.
    crd::install(client.clone(), Duration::from_secs(30))
        .await
        .expect("re-install CRDs");
    // The discovery document lists every kind, so clients can use them.
    let discovery = kube::discovery::group(&client, crd::GROUP).await.unwrap();
    let mut kinds: Vec<String> = discovery
        .recommended_resources()
        .into_iter()
        .map(|(ar, _)| ar.kind)
        .collect();
    kinds.sort();
    assert_eq!(kinds, ["App", "AppBuild", "Project", "Service", "Team"]);
    assert_eq!(Project::crd().spec.scope, "Cluster");
    assert_eq!(shapeblock::crd::Team::crd().spec.scope, "Cluster");
    for namespaced in [App::crd(), AppBuild::crd(), Service::crd()] {
        assert_eq!(namespaced.spec.scope, "Namespaced");
    }
}

/// The samples of the seed design note, translated: Project is cluster-scoped (its name is the
/// namespace) and lost `spec.name`; Service lost `appName`/`image` and gained `repoURL`.
#[tokio::test]
async fn seed_samples_are_accepted() {
    let client = client_with_crds().await;
    let ns = TestNamespace::new("seed").await;
    let project_name = format!("my-project-{}", support::random_suffix());
    let project = api_for(&client, "Project", None)
        .create(
            &PostParams::default(),
            &object(json!({
                "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
                "metadata": {"name": project_name},
                "spec": {"displayName": "My Project", "description": "A sample project"}
            })),
        )
        .await
        .expect("seed Project accepted");
    assert_eq!(project.data["spec"]["displayName"], "My Project");
    api_for(&client, "Project", None)
        .delete(&project_name, &Default::default())
        .await
        .unwrap();

    let registry = json!({"url": "registry.shapeblock.io", "secretName": "registry-credentials"});
    let apps = [
        json!({"name": "sample-app", "spec": {
            "displayName": "Sample Application",
            "description": "A sample application to demonstrate the App CR",
            "git": {"url": "https://github.com/example/sample-app.git", "branch": "main",
                    "secretName": "git-credentials", "isPrivate": true},
            "registry": registry, "build": {"type": "dockerfile"}}}),
        json!({"name": "dockerfile-app", "spec": {
            "displayName": "Dockerfile App", "description": "App built using Dockerfile",
            "git": {"url": "https://github.com/example/app.git", "branch": "main"},
            "registry": registry, "build": {"type": "dockerfile"}}}),
        json!({"name": "buildpack-app", "spec": {
            "displayName": "Buildpack App", "description": "App built using Cloud Native Buildpacks",
            "git": {"url": "https://github.com/example/app.git", "branch": "main"},
            "registry": registry,
            "build": {"type": "buildpack", "builderImage": "paketobuildpacks/builder:base"}}}),
        json!({"name": "prebuilt-app", "spec": {
            "displayName": "Pre-built App", "description": "App using existing container image",
            "git": {"url": "https://github.com/example/app.git", "branch": "main"},
            "registry": registry,
            "build": {"type": "image", "image": "registry.shapeblock.io/my-project/sample-app:v1.0.0"}}}),
    ];
    let app_api = api_for(&client, "App", Some(&ns.name));
    for app in apps {
        let name = app["name"].as_str().unwrap().to_string();
        app_api
            .create(
                &PostParams::default(),
                &object(json!({
                    "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App",
                    "metadata": {"name": name}, "spec": app["spec"]
                })),
            )
            .await
            .unwrap_or_else(|e| panic!("seed App {name} rejected: {e}"));
    }

    api_for(&client, "AppBuild", Some(&ns.name))
        .create(
            &PostParams::default(),
            &object(json!({
                "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
                "metadata": {"name": "sample-app-build-1"},
                "spec": {
                    "appName": "sample-app", "gitRef": "main", "imageTag": "v1.0.0",
                    "buildVars": [{"key": "NODE_ENV", "value": "production"},
                                  {"key": "BUILD_FLAG", "value": "true"}],
                    "helmValues": {"replicaCount": 2, "env": {"NODE_ENV": "production"},
                                   "ingress": {"enabled": true, "hosts": ["myapp.example.com"]}}
                }
            })),
        )
        .await
        .expect("seed AppBuild accepted");

    api_for(&client, "Service", Some(&ns.name))
        .create(
            &PostParams::default(),
            &object(json!({
                "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Service",
                "metadata": {"name": "redis"},
                "spec": {"chart": {"name": "redis", "version": "17.15.4",
                                   "repoURL": "https://charts.bitnami.com/bitnami"},
                         "helmValues": {"architecture": "standalone", "auth": {"enabled": false}}}
            })),
        )
        .await
        .expect("seed Service accepted");
}

/// Deep-merges `patch` into `base` (objects merge, anything else replaces; null removes).
fn merged(base: &Value, patch: &Value) -> Value {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            let mut out = b.clone();
            for (k, v) in p {
                if v.is_null() {
                    out.remove(k);
                } else {
                    let next = out.get(k).map_or_else(|| v.clone(), |old| merged(old, v));
                    out.insert(k.clone(), next);
                }
            }
            Value::Object(out)
        }
        _ => patch.clone(),
    }
}

fn valid(kind: &str, name: &str) -> Value {
    let spec = match kind {
        "Project" => json!({"displayName": "Valid"}),
        "App" => json!({
            "displayName": "Valid",
            "git": {"url": "git@github.com:example/app.git", "branch": "main"},
            "registry": {"url": "registry.example.com:5000/team"},
            "build": {"type": "dockerfile"}
        }),
        "AppBuild" => json!({"appName": "valid-app", "gitRef": "main", "imageTag": "v1"}),
        "Service" => json!({"chart": {"name": "postgresql", "version": "15.5.2",
                                      "repoURL": "oci://registry-1.docker.io/bitnamicharts"}}),
        other => panic!("unknown kind {other}"),
    };
    json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec})
}

/// Creates `object` and expects a 422 whose message contains each of `fragments`.
async fn expect_rejected(
    client: &Client,
    ns: &str,
    case: &str,
    object_json: Value,
    fragments: &[&str],
) {
    let kind = object_json["kind"].as_str().unwrap().to_string();
    let namespace = (kind != "Project").then_some(ns);
    let result = api_for(client, &kind, namespace)
        .create(&PostParams::default(), &object(object_json))
        .await;
    match result {
        Err(kube::Error::Api(status)) => {
            assert_eq!(
                status.code, 422,
                "{case}: expected 422 Invalid, got {status:?}"
            );
            for fragment in fragments {
                assert!(
                    status.message.contains(fragment),
                    "{case}: message {:?} does not contain {fragment:?}",
                    status.message
                );
            }
        }
        Ok(obj) => panic!("{case}: invalid {kind} was accepted: {:?}", obj.data),
        Err(other) => panic!("{case}: unexpected error {other}"),
    }
}

#[tokio::test]
async fn every_validation_rule_rejects_with_its_message() {
    let client = client_with_crds().await;
    let ns = TestNamespace::new("validation").await;
    let long = "a".repeat(54);
    let digest = "a".repeat(64);
    let cases: Vec<(&str, Value, &str)> = vec![
        // App: what each build type requires, and what it must not carry.
        (
            "image build without image",
            merged(
                &valid("App", "a1"),
                &json!({"spec": {"build": {"type": "image"}}}),
            ),
            "spec.build.image is required when spec.build.type is 'image'",
        ),
        (
            "dockerfile build without git",
            merged(&valid("App", "a2"), &json!({"spec": {"git": null}})),
            "spec.git is required when spec.build.type is 'dockerfile' or 'buildpack'",
        ),
        (
            "buildpack build without registry url",
            merged(
                &valid("App", "a3"),
                &json!({"spec": {"registry": {"url": null}, "build": {"type": "buildpack"}}}),
            ),
            "spec.registry.url is required when spec.build.type is 'dockerfile' or 'buildpack'",
        ),
        (
            "builder image on a dockerfile build",
            merged(
                &valid("App", "a4"),
                &json!({"spec": {"build": {"builderImage": "paketobuildpacks/builder:base"}}}),
            ),
            "spec.build.builderImage is only used when spec.build.type is 'buildpack'",
        ),
        (
            "context dir on an image build",
            merged(
                &valid("App", "a5"),
                &json!({"spec": {"build": {"type": "image", "image": "nginx:1.27", "contextDir": "app"}}}),
            ),
            "spec.build.contextDir is only used",
        ),
        (
            "dockerfile path on a buildpack build",
            merged(
                &valid("App", "a6"),
                &json!({"spec": {"build": {"type": "buildpack", "dockerfilePath": "Dockerfile"}}}),
            ),
            "spec.build.dockerfilePath is only used when spec.build.type is 'dockerfile'",
        ),
        (
            "image on a dockerfile build",
            merged(
                &valid("App", "a7"),
                &json!({"spec": {"build": {"image": "nginx:1.27"}}}),
            ),
            "spec.build.image is only used when spec.build.type is 'image'",
        ),
        (
            "option-like git url",
            merged(
                &valid("App", "a8"),
                &json!({"spec": {"git": {"url": "--upload-pack=touch /tmp/pwned"}}}),
            ),
            "spec.git.url must be an https://",
        ),
        (
            "git url with a newline",
            merged(
                &valid("App", "a9"),
                &json!({"spec": {"git": {"url": "https://example.com/a.git\nrm -rf /"}}}),
            ),
            "spec.git.url must be an https://",
        ),
        (
            "option-like branch",
            merged(
                &valid("App", "a10"),
                &json!({"spec": {"git": {"branch": "-b"}}}),
            ),
            "spec.git.branch must be a git branch name",
        ),
        (
            "registry url with a scheme",
            merged(
                &valid("App", "a11"),
                &json!({"spec": {"registry": {"url": "https://registry.example.com"}}}),
            ),
            "spec.registry.url must be a registry host",
        ),
        (
            "malformed builder image",
            merged(
                &valid("App", "a12"),
                &json!({"spec": {"build": {"type": "buildpack", "builderImage": "Paketo Builder"}}}),
            ),
            "spec.build.builderImage must be an image reference",
        ),
        (
            "uppercase image repository",
            merged(
                &valid("App", "a13"),
                &json!({"spec": {"build": {"type": "image", "image": "registry:5000/Team/app:1"}}}),
            ),
            "spec.build.image must be an image reference",
        ),
        (
            "short digest",
            merged(
                &valid("App", "a14"),
                &json!({"spec": {"build": {"type": "image", "image": "nginx@sha256:abc"}}}),
            ),
            "spec.build.image must be an image reference",
        ),
        (
            "dockerfile path escaping the repository",
            merged(
                &valid("App", "a15"),
                &json!({"spec": {"build": {"dockerfilePath": "../../etc/passwd"}}}),
            ),
            "spec.build.dockerfilePath must be a relative path",
        ),
        (
            "absolute context dir",
            merged(
                &valid("App", "a16"),
                &json!({"spec": {"build": {"contextDir": "/src"}}}),
            ),
            "spec.build.contextDir must be a relative path",
        ),
        (
            "App name longer than a release name",
            valid("App", &long),
            "the App name is its Helm release name",
        ),
        (
            "App name that is not a DNS label",
            valid("App", "my.app"),
            "the App name is its Helm release name",
        ),
        // Project names become namespace names.
        (
            "Project name that is not a DNS label",
            valid(
                "Project",
                &format!("my.project-{}", support::random_suffix()),
            ),
            "the Project name becomes a namespace name",
        ),
        (
            "reserved Project name",
            valid("Project", &format!("kube-{}", support::random_suffix())),
            "the Project name is reserved",
        ),
        // AppBuild.
        (
            "option-like gitRef",
            merged(
                &valid("AppBuild", "b1"),
                &json!({"spec": {"gitRef": "--upload-pack=touch /tmp/pwned"}}),
            ),
            "spec.gitRef must be a git branch, tag or commit",
        ),
        (
            "gitRef with a newline and a command",
            merged(
                &valid("AppBuild", "b2"),
                &json!({"spec": {"gitRef": "main\nrm -rf /"}}),
            ),
            "spec.gitRef must be a git branch, tag or commit",
        ),
        (
            "gitRef with shell metacharacters",
            merged(
                &valid("AppBuild", "b3"),
                &json!({"spec": {"gitRef": "main;$(reboot)"}}),
            ),
            "spec.gitRef must be a git branch, tag or commit",
        ),
        (
            "image tag starting with a dash",
            merged(
                &valid("AppBuild", "b4"),
                &json!({"spec": {"imageTag": "-latest"}}),
            ),
            "spec.imageTag must be an image tag",
        ),
        (
            "build var named like a number",
            merged(
                &valid("AppBuild", "b5"),
                &json!({"spec": {"buildVars": [{"key": "1BAD", "value": "x"}]}}),
            ),
            "buildVars key must be a variable name",
        ),
        (
            "appName that is not an App name",
            merged(
                &valid("AppBuild", "b6"),
                &json!({"spec": {"appName": "Bad_App"}}),
            ),
            "spec.appName must be the name of an App",
        ),
        (
            "duplicate build var keys",
            merged(
                &valid("AppBuild", "b7"),
                &json!({"spec": {"buildVars": [{"key": "A", "value": "1"}, {"key": "A", "value": "2"}]}}),
            ),
            "Duplicate value",
        ),
        (
            "AppBuild name that is not a DNS label",
            valid("AppBuild", "build.1"),
            "the AppBuild name labels its Jobs",
        ),
        // Service.
        (
            "chart without a repository",
            merged(
                &valid("Service", "s1"),
                &json!({"spec": {"chart": {"repoURL": null}}}),
            ),
            "spec.chart.repoURL is required",
        ),
        (
            "chart repository with another scheme",
            merged(
                &valid("Service", "s2"),
                &json!({"spec": {"chart": {"repoURL": "ftp://charts.example.com"}}}),
            ),
            "spec.chart.repoURL must be an https:// or http:// Helm repository URL, or an oci:// registry path",
        ),
        (
            "option-like chart name",
            merged(
                &valid("Service", "s3"),
                &json!({"spec": {"chart": {"name": "--post-renderer=/bin/sh"}}}),
            ),
            "spec.chart.name must be a chart name",
        ),
        (
            "chart version with a newline",
            merged(
                &valid("Service", "s4"),
                &json!({"spec": {"chart": {"version": "1.0\n--devel"}}}),
            ),
            "spec.chart.version must be a chart version",
        ),
        (
            "Service name longer than a release name",
            valid("Service", &long),
            "the Service name is its Helm release name",
        ),
    ];
    for (case, object_json, message) in cases {
        expect_rejected(&client, &ns.name, case, object_json, &[message]).await;
    }

    // The valid objects the cases were derived from are accepted, including the image
    // reference forms the parser must allow: registry with port, IPv6 host, digest, both.
    let accepted = [
        valid("AppBuild", "ok-build"),
        valid("Service", "ok-service"),
        valid("App", "ok-app"),
        merged(
            &valid("App", "ok-port"),
            &json!({"spec": {"build": {"type": "image", "image": "registry.example.com:5000/team/app:1.2.3"}}}),
        ),
        merged(
            &valid("App", "ok-digest"),
            &json!({"spec": {"build": {"type": "image", "image": format!("nginx@sha256:{digest}")}}}),
        ),
        merged(
            &valid("App", "ok-both"),
            &json!({"spec": {"build": {"type": "image", "image": format!("localhost:5000/a/b_c:v1@sha256:{digest}")}}}),
        ),
        merged(
            &valid("App", "ok-ipv6"),
            &json!({"spec": {"build": {"type": "image", "image": "[::1]:5000/app"}}}),
        ),
        merged(
            &valid("App", "ok-buildpack"),
            &json!({"spec": {"build": {"type": "buildpack", "builderImage": "paketobuildpacks/builder-jammy-base:0.4.1", "contextDir": "services/web"}}}),
        ),
        merged(
            &valid("App", "ok-https"),
            &json!({"spec": {"git": {"url": "https://gitlab.com/group/sub/app.git", "branch": "release/1.2"}, "build": {"dockerfilePath": "docker/Dockerfile.prod", "contextDir": "."}}}),
        ),
    ];
    for object_json in accepted {
        let kind = object_json["kind"].as_str().unwrap().to_string();
        api_for(&client, &kind, Some(&ns.name))
            .create(&PostParams::default(), &object(object_json.clone()))
            .await
            .unwrap_or_else(|e| panic!("valid {kind} rejected: {e}: {object_json}"));
    }
}

/// The schema's structural rules (patterns, enums, required fields, lengths) are enforced by
/// the apiserver's OpenAPI validation with its own messages; each names the field.
#[tokio::test]
async fn schema_rules_reject_with_the_field_they_concern() {
    let client = client_with_crds().await;
    let ns = TestNamespace::new("schema").await;
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "registry secret that is not a DNS name",
            merged(
                &valid("Project", "schema-p1"),
                &json!({"spec": {"registrySecret": "Bad_Secret"}}),
            ),
            &["spec.registrySecret", "should match"],
        ),
        (
            "git secret that is not a DNS name",
            merged(
                &valid("App", "s1"),
                &json!({"spec": {"git": {"secretName": "../etc"}}}),
            ),
            &["spec.git.secretName", "should match"],
        ),
        (
            "registry secret of an App that is not a DNS name",
            merged(
                &valid("App", "s2"),
                &json!({"spec": {"registry": {"secretName": "UPPER"}}}),
            ),
            &["spec.registry.secretName", "should match"],
        ),
        (
            "unknown build type",
            merged(
                &valid("App", "s3"),
                &json!({"spec": {"build": {"type": "docker"}}}),
            ),
            &["spec.build.type", "Unsupported value", "\"dockerfile\""],
        ),
        (
            "App without a build",
            merged(&valid("App", "s4"), &json!({"spec": {"build": null}})),
            &["spec.build", "Required value"],
        ),
        (
            "AppBuild without an app",
            merged(
                &valid("AppBuild", "s5"),
                &json!({"spec": {"appName": null}}),
            ),
            &["spec.appName", "Required value"],
        ),
        (
            "AppBuild app name longer than a release name may be",
            merged(
                &valid("AppBuild", "s6"),
                &json!({"spec": {"appName": "a".repeat(54)}}),
            ),
            &["spec.appName", "Too long"],
        ),
        (
            "empty AppBuild app name",
            merged(&valid("AppBuild", "s7"), &json!({"spec": {"appName": ""}})),
            &["spec.appName", "at least 1"],
        ),
        (
            "Service chart without a name",
            merged(
                &valid("Service", "s8"),
                &json!({"spec": {"chart": {"name": null}}}),
            ),
            &["spec.chart.name", "Required value"],
        ),
        (
            "display name longer than 253 characters",
            merged(
                &valid("Project", "schema-p2"),
                &json!({"spec": {"displayName": "x".repeat(254)}}),
            ),
            &["spec.displayName", "Too long"],
        ),
    ];
    for (case, object_json, fragments) in cases {
        expect_rejected(&client, &ns.name, case, object_json, fragments).await;
    }
}

#[tokio::test]
async fn appbuild_spec_is_immutable() {
    let client = client_with_crds().await;
    let ns = TestNamespace::new("immutable").await;
    let api = api_for(&client, "AppBuild", Some(&ns.name));
    api.create(&PostParams::default(), &object(valid("AppBuild", "frozen")))
        .await
        .unwrap();
    let change = json!({"spec": {"gitRef": "other-branch"}});
    match api
        .patch("frozen", &PatchParams::default(), &Patch::Merge(&change))
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.contains("AppBuild spec is immutable"),
                "{}",
                status.message
            );
        }
        other => panic!("changing an AppBuild spec was not refused: {other:?}"),
    }
    let got = api.get("frozen").await.unwrap();
    assert_eq!(
        got.data["spec"]["gitRef"], "main",
        "the refused change must not be stored"
    );
    // Metadata and status stay writable: the hub records progress on the same object.
    let labels = json!({"metadata": {"labels": {"shapeblock.io/app": "valid-app"}}});
    api.patch("frozen", &PatchParams::default(), &Patch::Merge(&labels))
        .await
        .expect("labels stay mutable");
    let status = json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
                        "status": {"phase": "Building", "jobName": "frozen-build"}});
    api.patch_status(
        "frozen",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&status),
    )
    .await
    .expect("status stays writable");
}

/// Applies a fully populated object of each kind (spec and status) with server-side apply and
/// reads it back: every field must survive, with its value.
#[tokio::test]
async fn server_side_apply_round_trips_every_kind() {
    let client = client_with_crds().await;
    let ns = TestNamespace::new("roundtrip").await;
    let time = "2026-11-26T10:00:00Z";
    let condition = json!([{"type": "Ready", "status": "True", "reason": "Reconciled",
                            "message": "all good", "lastTransitionTime": time, "observedGeneration": 1}]);
    let project_name = format!("rt-{}", support::random_suffix());
    let digest = "b".repeat(64);
    let objects = [
        (
            "Project",
            json!({
                "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
                "metadata": {"name": project_name},
                "spec": {"displayName": "Round trip", "description": "every field", "registrySecret": "my-registry"},
                "status": {"phase": "Active", "message": "Project setup completed", "namespace": project_name,
                           "observedGeneration": 1, "lastUpdated": time, "conditions": condition}
            }),
        ),
        (
            "App",
            json!({
                "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App",
                "metadata": {"name": "rt-app", "namespace": ns.name},
                "spec": {
                    "displayName": "Round trip", "description": "every field",
                    "git": {"url": "ssh://git@git.example.com:2222/team/app.git", "branch": "main",
                            "secretName": "rt-app-git", "isPrivate": true,
                            "knownHosts": "git.example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"},
                    "registry": {"url": "registry.example.com:5000", "secretName": "registry-creds"},
                    "build": {"type": "dockerfile", "dockerfilePath": "build/Dockerfile", "contextDir": "src"}
                },
                "status": {"phase": "Ready", "message": "ok", "latestBuild": "rt-build",
                           "currentImage": format!("registry.example.com:5000/{}/rt-app:v2", ns.name),
                           "previousImage": format!("registry.example.com:5000/{}/rt-app:v1", ns.name),
                           "deployKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl shapeblock",
                           "observedGeneration": 1, "lastUpdated": time, "conditions": condition}
            }),
        ),
        (
            "AppBuild",
            json!({
                "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
                "metadata": {"name": "rt-build", "namespace": ns.name},
                "spec": {
                    "appName": "rt-app", "gitRef": "0123456789abcdef0123456789abcdef01234567", "imageTag": "v2",
                    "buildVars": [{"key": "NODE_ENV", "value": "production"},
                                  {"key": "MULTILINE", "value": "line one\nline two; $(not a command)"}],
                    "helmValues": {"replicaCount": 2, "nested": {"list": [1, "two", {"three": 3.5}], "flag": false, "none": null}},
                    "buildNodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "node-role", "operator": "In", "values": ["build"]}]}]}}
                },
                "status": {"phase": "Completed", "message": "Application deployed", "reason": "Deployed",
                           "jobName": "rt-build-build", "podName": "rt-build-build-abcde", "helmJobName": "rt-build-deploy",
                           "failedHelmJobName": "rt-build-deploy-old",
                           "image": format!("registry.example.com:5000/{}/rt-app:v2@sha256:{digest}", ns.name),
                           "imageTag": "v2", "gitCommit": "0123456789abcdef0123456789abcdef01234567",
                           "startTime": time, "buildStartTime": time, "buildEndTime": time, "completionTime": time,
                           "observedGeneration": 1, "conditions": condition}
            }),
        ),
        (
            "Service",
            json!({
                "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Service",
                "metadata": {"name": "rt-db", "namespace": ns.name},
                "spec": {"chart": {"name": "postgresql", "version": "^15.5", "repo": "bitnami",
                                   "repoURL": "https://charts.bitnami.com/bitnami"},
                         "helmValues": {"auth": {"database": "app"}, "primary": {"persistence": {"size": "1Gi"}}}},
                "status": {"phase": "Deployed", "message": "installed", "helmRelease": "rt-db",
                           "url": "postgres://rt-db-postgresql:5432", "appliedHash": "abc123",
                           "observedGeneration": 1, "lastUpdated": time, "conditions": condition}
            }),
        ),
    ];
    let params = PatchParams::apply("shapeblock-roundtrip").force();
    for (kind, full) in objects {
        let name = full["metadata"]["name"].as_str().unwrap().to_string();
        let namespace = (kind != "Project").then_some(ns.name.as_str());
        let api = api_for(&client, kind, namespace);
        let mut spec_only = full.clone();
        spec_only.as_object_mut().unwrap().remove("status");
        api.patch(&name, &params, &Patch::Apply(&spec_only))
            .await
            .unwrap_or_else(|e| panic!("apply {kind}: {e}"));
        api.patch_status(&name, &params, &Patch::Apply(&full))
            .await
            .unwrap_or_else(|e| panic!("apply {kind} status: {e}"));
        let got = api.get(&name).await.unwrap();
        assert_eq!(
            got.data["spec"], full["spec"],
            "{kind}: spec changed in the round trip"
        );
        assert_eq!(
            got.data["status"], full["status"],
            "{kind}: status changed in the round trip"
        );

        // The typed Rust structs read the same object and write back exactly what they read.
        let typed_spec = match kind {
            "Project" => {
                serde_json::to_value(serde_json::from_value::<Project>(got_json(&got)).unwrap())
                    .unwrap()
            }
            "App" => serde_json::to_value(serde_json::from_value::<App>(got_json(&got)).unwrap())
                .unwrap(),
            "AppBuild" => {
                serde_json::to_value(serde_json::from_value::<AppBuild>(got_json(&got)).unwrap())
                    .unwrap()
            }
            _ => serde_json::to_value(serde_json::from_value::<Service>(got_json(&got)).unwrap())
                .unwrap(),
        };
        assert_eq!(
            typed_spec["spec"], full["spec"],
            "{kind}: the Rust type lost a spec field"
        );
        assert_eq!(
            typed_spec["status"], full["status"],
            "{kind}: the Rust type lost a status field"
        );
    }
    api_for(&client, "Project", None)
        .delete(&project_name, &Default::default())
        .await
        .unwrap();
}

fn got_json(obj: &DynamicObject) -> Value {
    serde_json::to_value(obj).unwrap()
}

/// `spec.run`: each rule rejects with a message naming the field; the README's example and
/// a full run spec are accepted.
#[tokio::test]
async fn the_run_spec_is_validated_with_messages_naming_the_field() {
    let client = client_with_crds().await;
    let ns = TestNamespace::new("run-spec").await;
    let run = |name: &str, run: Value| merged(&valid("App", name), &json!({"spec": {"run": run}}));
    let cases: Vec<(&str, Value, &[&str])> = vec![
        ("port 0", run("r1", json!({"port": 0})), &["spec.run.port"]),
        (
            "port too high",
            run("r2", json!({"port": 70000})),
            &["spec.run.port"],
        ),
        (
            "negative replicas",
            run("r3", json!({"replicas": -1})),
            &["spec.run.replicas"],
        ),
        (
            "env name",
            run("r4", json!({"env": [{"name": "1BAD", "value": "x"}]})),
            &["spec.run.env name must be a variable name"],
        ),
        (
            "envFrom with both",
            run(
                "r5",
                json!({"envFrom": [{"secret": "a", "configMap": "b"}]}),
            ),
            &["spec.run.envFrom entries name exactly one of secret or configMap"],
        ),
        (
            "envFrom with neither",
            run("r6", json!({"envFrom": [{}]})),
            &["exactly one of secret or configMap"],
        ),
        (
            "domain with a scheme",
            run(
                "r7",
                json!({"domains": [{"host": "https://shop.example.com"}]}),
            ),
            &["spec.run.domains host must be a lowercase DNS name"],
        ),
        (
            "quantity",
            run("r8", json!({"resources": {"memoryLimit": "lots"}})),
            &["spec.run.resources.memoryLimit must be a quantity"],
        ),
        (
            "health path",
            run("r9", json!({"healthCheck": {"path": "healthz"}})),
            &["spec.run.healthCheck.path must be an absolute HTTP path"],
        ),
        (
            "autoscaling bounds",
            run(
                "r10",
                json!({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}),
            ),
            &["spec.run.autoscaling.minReplicas must not exceed maxReplicas"],
        ),
        (
            "replicas outside autoscaling",
            run(
                "r11",
                json!({"replicas": 20, "autoscaling": {"minReplicas": 1, "maxReplicas": 3}}),
            ),
            &["spec.run.replicas must lie between"],
        ),
        (
            "cpu target",
            run(
                "r12",
                json!({"autoscaling": {"minReplicas": 1, "maxReplicas": 3, "targetCPUPercent": 0}}),
            ),
            &["targetCPUPercent"],
        ),
        (
            "rollback with a ref",
            merged(
                &valid("AppBuild", "r13"),
                &json!({"spec": {"rollbackTo": "web-1"}}),
            ),
            &["spec.rollbackTo redeploys an earlier build as it was"],
        ),
    ];
    for (case, object_json, fragments) in cases {
        expect_rejected(&client, &ns.name, case, object_json, fragments).await;
    }

    // The README's App, and a rollback AppBuild, are accepted as written.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme.find("## Apps that run").expect("README section")..];
    let start = section.find("```yaml\n").unwrap() + "```yaml\n".len();
    let end = start + section[start..].find("```").unwrap();
    let example: Value = serde_saphyr::from_str(&section[start..end]).unwrap();
    let mut example = example;
    example["metadata"]["namespace"] = Value::String(ns.name.clone());
    api_for(&client, "App", Some(&ns.name))
        .create(&PostParams::default(), &object(example.clone()))
        .await
        .unwrap_or_else(|e| panic!("the README's App is rejected: {e}"));
    let stored = api_for(&client, "App", Some(&ns.name))
        .get("shop")
        .await
        .unwrap();
    assert_eq!(
        stored.data["spec"]["run"], example["spec"]["run"],
        "no field of the README's run spec is pruned"
    );
    let rollback = json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
        "metadata": {"name": "shop-rollback"}, "spec": {"appName": "shop", "rollbackTo": "shop-1"}});
    api_for(&client, "AppBuild", Some(&ns.name))
        .create(&PostParams::default(), &object(rollback))
        .await
        .unwrap();
}

/// A Team names ShapeBlock user ids once each, each project once, with one of the three roles.
#[tokio::test]
async fn invalid_teams_are_rejected_with_the_field_named() {
    let client = client_with_crds().await;
    let teams = api_for(&client, "Team", None);
    let team = |name: &str, spec: Value| {
        object(
            json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Team",
            "metadata": {"name": name}, "spec": spec}),
        )
    };
    let suffix = support::random_suffix();
    let ok = format!("web-{suffix}");
    teams
        .create(
            &PostParams::default(),
            &team(
                &ok,
                json!({"members": ["dev", "alice@example.com", "u-42"],
                       "projects": [{"project": "shop", "role": "developer"}]}),
            ),
        )
        .await
        .expect("a valid Team");
    for (spec, field) in [
        (json!({"members": ["system:admin"]}), "spec.members[0]"),
        (json!({"members": [""]}), "spec.members[0]"),
        (json!({"members": ["dev", "dev"]}), "spec.members[1]"),
        (
            json!({"projects": [{"project": "a", "role": "owner"}]}),
            "spec.projects[0].role",
        ),
        (
            json!({"projects": [{"project": "a", "role": "viewer"}, {"project": "a", "role": "admin"}]}),
            "spec.projects[1]",
        ),
        (
            json!({"projects": [{"project": "Not_A_Name", "role": "viewer"}]}),
            "spec.projects[0].project",
        ),
    ] {
        let name = format!("bad-{}", support::random_suffix());
        match teams
            .create(&PostParams::default(), &team(&name, spec.clone()))
            .await
        {
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{spec}: {e:?}");
                assert!(e.message.contains(field), "{spec}: {}", e.message);
            }
            other => panic!("{spec} accepted: {other:?}"),
        }
    }
    match teams
        .create(&PostParams::default(), &team("Bad_Name", json!({})))
        .await
    {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 422, "{e:?}"),
        other => panic!("a Team named Bad_Name accepted: {other:?}"),
    }
    teams.delete(&ok, &Default::default()).await.unwrap();
}
