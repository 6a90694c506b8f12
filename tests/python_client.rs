//! The API as the ShapeBlock server codes against it: a Python client generated from the
//! committed `openapi.json` by openapi-python-client (a pinned version, installed with pip into
//! a venv cached outside the repository), driving a real hub with controllers and a connected
//! cluster the way the FastAPI server does (`tests/python-client/drive.py`): register a cluster,
//! create a project, an app and a build, read its status and logs, roll back. The test plays
//! the cluster's side: it starts the agent with the token the script registered, finishes the
//! build's pods and plays helm's Deployment. Nothing skips: no python3, pip or generator fails
//! the test with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shapeblock_test_support as support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::Api;
use shapeblock::crd::AppBuild;
use shapeblock::hub::Registry;
use support::hub::{ADMIN_TOKEN, TestHub, scratch_dir};
use support::{PodEnd, finish_job_pod};
use tokio::io::{AsyncBufReadExt, BufReader};

/// The generator's version: the venv is keyed by it, so changing it installs afresh.
const GENERATOR_VERSION: &str = "0.29.1";

fn run(command: &mut std::process::Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A venv with openapi-python-client (and with it httpx and attrs, which the generated client
/// needs), under `~/.cache/shapeblock-test-bins`, made once per generator version.
fn generator_venv() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is not set: the venv lives under ~/.cache");
    let venv = Path::new(&home)
        .join(".cache/shapeblock-test-bins")
        .join(format!("python-client-venv-{GENERATOR_VERSION}"));
    let generator = venv.join("bin/openapi-python-client");
    if generator.exists() {
        return venv;
    }
    // Built beside, then renamed: a run interrupted mid-install leaves no half venv behind.
    let partial = venv.with_extension(format!("partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    run(
        std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&partial),
        "creating a Python venv (python3 with the venv module is required)",
    );
    run(
        std::process::Command::new(partial.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("openapi-python-client=={GENERATOR_VERSION}")),
        "installing openapi-python-client from PyPI",
    );
    match std::fs::rename(&partial, &venv) {
        Ok(()) => {}
        // Another test run got there first.
        Err(_) if generator.exists() => {
            let _ = std::fs::remove_dir_all(&partial);
        }
        Err(e) => panic!("renaming {} to {}: {e}", partial.display(), venv.display()),
    }
    // A venv's scripts name its path: recreate the entry points for the final path.
    run(
        std::process::Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--force-reinstall")
            .arg("--no-deps")
            .arg(format!("openapi-python-client=={GENERATOR_VERSION}")),
        "reinstalling openapi-python-client's entry point in the final venv",
    );
    venv
}

/// Generates the client package `sbhub` from the committed document into `dir`.
fn generate_client(venv: &Path, dir: &Path) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let _ = std::fs::remove_dir_all(dir.join("sbhub"));
    run(
        std::process::Command::new(venv.join("bin/openapi-python-client"))
            .arg("generate")
            .arg("--path")
            .arg(repo.join("openapi.json"))
            .arg("--config")
            .arg(repo.join("tests/python-client/config.yaml"))
            .args(["--meta", "none", "--output-path"])
            .arg(dir.join("sbhub"))
            .current_dir(dir),
        "generating the Python client from openapi.json",
    );
}

#[tokio::test]
async fn a_generated_python_client_registers_builds_and_reads_logs() {
    let venv = tokio::task::spawn_blocking(generator_venv).await.unwrap();
    let dir = scratch_dir("python-client");
    {
        let (venv, dir) = (venv.clone(), dir.clone());
        tokio::task::spawn_blocking(move || generate_client(&venv, &dir))
            .await
            .unwrap();
    }

    support::jobs().await;
    support::write_container_log("clone", &["Cloning into '/workspace/source'..."]);
    support::write_container_log("commit", &[]);
    support::write_container_log("build", &["INFO[0042] Pushed registry.example.com/web"]);
    support::write_container_log("app", &["listening on :8080"]);
    let admin = support::client().await;
    let hub = TestHub::builder()
        .tls(&dir)
        .registry(Arc::new(Registry::in_memory()))
        .controllers()
        .start()
        .await;
    let namespace = format!("py-{}", support::random_suffix());

    let mut script = tokio::process::Command::new(venv.join("bin/python"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python-client/drive.py"))
        .arg(format!("https://127.0.0.1:{}", hub.addr.port()))
        .arg(ADMIN_TOKEN)
        .arg(hub.ca_file.as_ref().unwrap())
        .arg(&namespace)
        .env("PYTHONPATH", &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("running the Python driver");
    let mut stdout = BufReader::new(script.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut agent = None;
    let mut cluster_side = None;
    while let Some(line) = tokio::time::timeout_at(deadline.into(), stdout.next_line())
        .await
        .unwrap_or_else(|_| panic!("the Python driver hung; it printed {printed:?}"))
        .unwrap()
    {
        eprintln!("drive.py: {line}");
        if let Some(rest) = line.strip_prefix("REGISTERED ") {
            let (cluster, token) = rest.split_once(' ').unwrap();
            agent = Some(support::cluster::connect_agent(&admin, &dir, &hub, cluster, token).await);
            cluster_side = Some(tokio::spawn(play_the_cluster(
                admin.clone(),
                namespace.clone(),
            )));
        }
        printed.push(line);
    }
    let output = script.wait_with_output().await.unwrap();
    assert!(
        output.status.success() && printed.last().is_some_and(|l| l == "DONE"),
        "the Python driver failed ({}); it printed {printed:?}:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    cluster_side.unwrap().await.unwrap();
    assert!(
        printed.contains(&"PHASES Pending Building Deploying Completed".to_string())
            || printed.contains(&"PHASES Building Deploying Completed".to_string()),
        "{printed:?}"
    );
    drop(agent);
    hub.stop().await;
}

/// What the cluster does for the build `web-1` that the script creates: its build pod
/// succeeds, then the deploy pod's helm runs for real and the Deployment rolls out.
async fn play_the_cluster(admin: kube::Client, namespace: String) {
    let sha = "4b825dc642cb6eb9a060e54bf8d69288fbee4904\n";
    let end = PodEnd {
        phase: "Succeeded",
        init: vec![("clone", 0, ""), ("commit", 0, sha)],
        containers: vec![("build", 0, "Completed", "")],
    };
    // The script needs a moment to create the project, app and build.
    let builds: Api<AppBuild> = Api::namespaced(admin.clone(), &namespace);
    let deadline = Instant::now() + Duration::from_secs(120);
    while builds.get_opt("web-1").await.ok().flatten().is_none() {
        assert!(
            Instant::now() < deadline,
            "the script created no AppBuild web-1"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    finish_job_pod(&admin, &namespace, "web-1-build", end).await;
    // helm installs the shipped chart for real; the Deployment rolls out on the kwok node.
    support::cluster::helm_runs(&admin, &namespace, "web-1-deploy").await;
}
