//! Test support for the hub's integration tests, benchmarks and load test: a real Kubernetes
//! control plane (this file), its certificates ([`pki`]), hubs in this process and agents as
//! real processes ([`hub`]), a hub with controllers and one connected cluster ([`cluster`]),
//! the hub binary in its own process with an API client ([`hub_process`]), and what every
//! harness needs of processes: free ports, memory and CPU samples, logs ([`process`]), and a
//! TCP forwarder that records what moves on a tunnel's socket ([`tap`]).
//! Depends on the hub's library; nothing in the product depends on it.
//!
//! Each test binary starts its own etcd + kube-apiserver on free loopback ports, with
//! certificates generated for the run, the first time a test asks for it; later tests in the
//! same binary reuse it. [`jobs`] additionally starts kube-controller-manager, kube-scheduler
//! and kwok with one fake node, for tests that need Jobs and Pods to run to completion.
//!
//! The processes are spawned by one supervisor thread that lives as long as the test binary,
//! with `PR_SET_PDEATHSIG`, so they die with the test binary however it ends. Logs live in
//! `target/tmp/control-plane/<binary>-<pid>/logs`; a run directory is removed by the next run
//! unless a test failed in it, in which case its logs are kept (and their path printed).
//!
//! A test binary that starts with [`real_node::node`] talks to a real single-node cluster
//! instead (kubelet, containerd, a registry; see that module).
//!
//! With `SHAPEBLOCK_TEST_KUBECONFIG=<path>` the same tests run against that cluster instead:
//! nothing is started, and [`jobs`] assumes the cluster runs Jobs itself.
//!
//! The binaries come from `tests/control-plane/build.sh` (or the directory named by
//! `SHAPEBLOCK_TEST_BINS`). Nothing here skips: a control plane that cannot start fails the
//! test with the reason and the tail of the component's log.

// Test code: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cluster;
pub mod figures;
pub mod hub;
pub mod hub_process;
pub mod pki;
pub mod process;
pub mod real_node;
pub mod tap;

pub use process::rss_kib;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The shared control plane of this test binary.
struct Shared {
    config: Config,
    /// Path of an admin kubeconfig for the control plane.
    kubeconfig: PathBuf,
    /// Run directory (None when running against `SHAPEBLOCK_TEST_KUBECONFIG`).
    run_dir: Option<PathBuf>,
    requests: Mutex<mpsc::Sender<Request>>,
}

enum Request {
    StartJobs(mpsc::Sender<Result<(), String>>),
    StartExtra(String, mpsc::Sender<Result<(Config, PathBuf), String>>),
}

static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();
static JOBS: OnceLock<Result<(), String>> = OnceLock::new();

fn shared() -> &'static Shared {
    match SHARED.get_or_init(|| {
        // Any failing test of this binary keeps the control plane's logs, not only those that
        // hold a TestNamespace (libtest names each test's thread after the test).
        keep_logs_on_panic();
        start()
    }) {
        Ok(shared) => shared,
        Err(reason) => panic!("the test control plane is not available: {reason}"),
    }
}

/// Any failing test of this binary keeps the logs of its cluster, not only those that hold a
/// TestNamespace (libtest names each test's thread after the test).
fn keep_logs_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let test = thread.name().unwrap_or("a test");
        keep_logs(test);
        real_node::keep_logs(test);
        previous(info);
    }));
}

/// Makes `config` (a cluster started by this binary, the real node) the cluster every helper
/// of this crate talks to. Fails when the built-in control plane was already started.
fn use_cluster(config: Config, kubeconfig: PathBuf) -> Result<(), String> {
    let mut used = false;
    SHARED.get_or_init(|| {
        used = true;
        keep_logs_on_panic();
        let (tx, _rx) = mpsc::channel();
        Ok(Shared {
            config,
            kubeconfig,
            run_dir: None,
            requests: Mutex::new(tx),
        })
    });
    if used {
        Ok(())
    } else {
        Err(
            "this test binary already started the built-in control plane; \
             start the real node before any other cluster helper"
                .into(),
        )
    }
}

/// Admin configuration for the test control plane (started on first use).
pub async fn config() -> Config {
    tokio::task::spawn_blocking(|| shared().config.clone())
        .await
        .expect("control plane start")
}

/// A client with admin rights on the test control plane (started on first use).
pub async fn client() -> Client {
    Client::try_from(config().await).expect("client from test config")
}

/// Path of an admin kubeconfig file for the test control plane, for processes under test.
pub async fn kubeconfig_path() -> PathBuf {
    tokio::task::spawn_blocking(|| shared().kubeconfig.clone())
        .await
        .expect("control plane start")
}

/// Ensures Jobs run to completion: kube-controller-manager, kube-scheduler and kwok with a
/// ready fake node. Started once per test binary.
pub async fn jobs() {
    let result = tokio::task::spawn_blocking(|| {
        JOBS.get_or_init(|| {
            let shared = shared();
            if shared.run_dir.is_none() {
                return Ok(()); // an existing cluster runs its own controllers and nodes
            }
            let (tx, rx) = mpsc::channel();
            shared
                .requests
                .lock()
                .map_err(|_| "supervisor lock poisoned".to_string())?
                .send(Request::StartJobs(tx))
                .map_err(|_| "the control plane supervisor is gone".to_string())?;
            rx.recv()
                .map_err(|_| "the control plane supervisor is gone".to_string())?
        })
        .clone()
    })
    .await
    .expect("jobs start");
    if let Err(reason) = result {
        panic!("kube-controller-manager + kwok are not available: {reason}");
    }
}

/// Starts another etcd + kube-apiserver pair (a second "cluster", for benchmarks that need
/// several) and returns its admin configuration and kubeconfig path. Lives as long as the
/// test binary, like the first.
pub async fn extra_control_plane(name: &str) -> (Config, PathBuf) {
    let name = name.to_string();
    let result = tokio::task::spawn_blocking(move || {
        let shared = shared();
        if shared.run_dir.is_none() {
            return Err(
                "extra control planes need the built-in one, not SHAPEBLOCK_TEST_KUBECONFIG"
                    .to_string(),
            );
        }
        let (tx, rx) = mpsc::channel();
        shared
            .requests
            .lock()
            .map_err(|_| "supervisor lock poisoned".to_string())?
            .send(Request::StartExtra(name, tx))
            .map_err(|_| "the control plane supervisor is gone".to_string())?;
        rx.recv()
            .map_err(|_| "the control plane supervisor is gone".to_string())?
    })
    .await
    .expect("extra control plane start");
    result.unwrap_or_else(|reason| panic!("extra control plane not available: {reason}"))
}

/// A namespace created for one test and deleted when the test ends. When the test fails,
/// the control plane's logs are kept and their location printed.
pub struct TestNamespace {
    pub name: String,
    config: Config,
}

impl TestNamespace {
    /// Creates a fresh namespace named `<prefix>-<random>`.
    pub async fn new(prefix: &str) -> Self {
        let config = config().await;
        let client = Client::try_from(config.clone()).expect("client");
        let name = format!("{}-{}", prefix, random_suffix());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"shapeblock.io/test": "true"}}
        }))
        .expect("namespace object");
        Api::<Namespace>::all(client)
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create test namespace {name}: {e}"));
        Self { name, config }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Drop cannot await, and the test's runtime is going away: delete from a thread with
        // its own runtime and client. Best effort; a control plane started for this binary
        // dies with it anyway.
        let config = self.config.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(client) = Client::try_from(config) {
                    let _ = Api::<Namespace>::all(client)
                        .delete(&name, &DeleteParams::background())
                        .await;
                }
            });
        })
        .join();
    }
}

/// Marks the run directory so the next run keeps its logs, and says where they are.
pub fn keep_logs(test: &str) {
    if let Some(Ok(Shared {
        run_dir: Some(dir), ..
    })) = SHARED.get()
    {
        let _ = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("KEEP"))
            .and_then(|mut f| writeln!(f, "{test}"));
        eprintln!(
            "test {test} failed: control plane logs kept in {}",
            dir.join("logs").display()
        );
    }
}

/// Server-side applies one object given as JSON (any kind the apiserver serves), with strict
/// field validation; namespaced objects without a namespace go to `default_namespace`.
pub async fn apply_object(
    client: &Client,
    object: &serde_json::Value,
    default_namespace: &str,
    dry_run: bool,
) {
    use kube::api::DynamicObject;
    use kube::core::GroupVersionKind;
    let api_version = object["apiVersion"].as_str().expect("apiVersion");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, object["kind"].as_str().expect("kind"));
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .expect("discovery");
    let name = object["metadata"]["name"].as_str().expect("metadata.name");
    let api: Api<DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or(default_namespace);
        Api::namespaced_with(client.clone(), namespace, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    };
    let mut params = PatchParams::apply("shapeblock-tests")
        .force()
        .validation_strict();
    params.dry_run = dry_run;
    let dynamic: DynamicObject = serde_json::from_value(object.clone()).expect("object");
    api.patch(name, &params, &Patch::Apply(&dynamic))
        .await
        .unwrap_or_else(|e| panic!("{} {name} rejected by the apiserver: {e}", gvk.kind));
}

/// Runs the cached `helm` (`SHAPEBLOCK_TEST_BINS`) against the cluster of `kubeconfig`; fails
/// the test with helm's output unless it succeeds. Returns stdout.
pub fn helm(kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let bins = std::env::var("SHAPEBLOCK_TEST_BINS").expect(
        "SHAPEBLOCK_TEST_BINS (the control-plane cache with helm; .ci/run sets it) is not set",
    );
    let out = std::process::Command::new(std::path::PathBuf::from(bins).join("helm"))
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    format!("{:08x}", h.finish() as u32)
}

// ---------------------------------------------------------------------------------------------
// Start-up

fn start() -> Result<Shared, String> {
    if let Ok(path) = std::env::var("SHAPEBLOCK_TEST_KUBECONFIG") {
        return external(PathBuf::from(path));
    }
    let bins = binaries()?;
    let run_dir = run_dir()?;
    let (ready_tx, ready_rx) = mpsc::channel();
    let (req_tx, req_rx) = mpsc::channel();
    let dir = run_dir.clone();
    std::thread::Builder::new()
        .name("control-plane".into())
        .spawn(move || supervise(bins, dir, ready_tx, req_rx))
        .map_err(|e| format!("spawn supervisor thread: {e}"))?;
    let (config, kubeconfig) = ready_rx
        .recv()
        .map_err(|_| "the control plane supervisor died during start-up".to_string())??;
    Ok(Shared {
        config,
        kubeconfig,
        run_dir: Some(run_dir),
        requests: Mutex::new(req_tx),
    })
}

fn external(path: PathBuf) -> Result<Shared, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let kubeconfig = Kubeconfig::read_from(&path)
        .map_err(|e| format!("SHAPEBLOCK_TEST_KUBECONFIG={}: {e}", path.display()))?;
    let config = rt
        .block_on(Config::from_custom_kubeconfig(
            kubeconfig,
            &KubeConfigOptions::default(),
        ))
        .map_err(|e| format!("SHAPEBLOCK_TEST_KUBECONFIG={}: {e}", path.display()))?;
    let (tx, _rx) = mpsc::channel();
    Ok(Shared {
        config,
        kubeconfig: path,
        run_dir: None,
        requests: Mutex::new(tx),
    })
}

/// Locates the control plane binaries, building them with the repository's script when no
/// directory is given.
fn binaries() -> Result<PathBuf, String> {
    match std::env::var("SHAPEBLOCK_TEST_BINS") {
        Ok(dir) => Ok(PathBuf::from(dir)),
        Err(_) => script_output_dir("tests/control-plane/build.sh"),
    }
}

/// Runs one of the repository's build scripts (which build once, then reuse their cache) and
/// returns the directory it prints on its last line.
fn script_output_dir(script: &str) -> Result<PathBuf, String> {
    let script = process::repository().join(script);
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}); see its output above",
            script.display(),
            out.status
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .last()
        .map(PathBuf::from)
        .ok_or_else(|| format!("{} printed no directory", script.display()))
}

/// Creates this run's directory and removes earlier runs whose process is gone, keeping
/// only the logs of runs in which a test failed.
fn run_dir() -> Result<PathBuf, String> {
    let root = process::target_tmp().join("control-plane");
    fs::create_dir_all(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
    if let Ok(entries) = fs::read_dir(&root) {
        for entry in entries.flatten() {
            let path = entry.path();
            let pid = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.rsplit('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
            if alive {
                continue;
            }
            if path.join("KEEP").exists() {
                let _ = fs::remove_dir_all(path.join("etcd-data"));
                let _ = fs::remove_dir_all(path.join("pki"));
            } else {
                let _ = fs::remove_dir_all(&path);
            }
        }
    }
    let exe = std::env::current_exe().ok();
    let binary = exe
        .as_deref()
        .and_then(|p| p.file_stem())
        .and_then(|s| s.to_str())
        .map(|s| {
            s.rsplit_once('-')
                .map_or(s, |(name, _hash)| name)
                .to_string()
        })
        .unwrap_or_else(|| "test".into());
    let dir = root.join(format!("{binary}-{}", std::process::id()));
    for sub in ["logs", "pki", "etcd-data"] {
        fs::create_dir_all(dir.join(sub)).map_err(|e| format!("create {}: {e}", dir.display()))?;
    }
    Ok(dir)
}

/// Owns the control plane processes for the life of the test binary.
fn supervise(
    bins: PathBuf,
    dir: PathBuf,
    ready: mpsc::Sender<Result<(Config, PathBuf), String>>,
    requests: mpsc::Receiver<Request>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("supervisor runtime: {e}")));
            return;
        }
    };
    let mut children: Vec<Child> = Vec::new();
    let started = rt.block_on(start_apiserver(&bins, &dir, &mut children));
    let kubeconfig = dir.join("admin.kubeconfig");
    let config = match started {
        Ok(config) => config,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok((config.clone(), kubeconfig.clone())));
    // Serve requests until the test binary exits; this thread must outlive every child,
    // because PR_SET_PDEATHSIG fires when the spawning thread ends.
    while let Ok(request) = requests.recv() {
        match request {
            Request::StartJobs(reply) => {
                let result =
                    rt.block_on(start_jobs(&bins, &dir, &kubeconfig, &config, &mut children));
                let _ = reply.send(result);
            }
            Request::StartExtra(name, reply) => {
                let extra = dir.join(&name);
                let result = ["logs", "pki", "etcd-data"]
                    .iter()
                    .try_for_each(|sub| fs::create_dir_all(extra.join(sub)))
                    .map_err(|e| format!("create {}: {e}", extra.display()));
                let result = match result {
                    Ok(()) => rt
                        .block_on(start_apiserver(&bins, &extra, &mut children))
                        .map(|config| (config, extra.join("admin.kubeconfig"))),
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
        }
    }
    loop {
        std::thread::park();
    }
}

fn free_port() -> Result<u16, String> {
    process::try_free_port().map_err(|e| format!("free port: {e}"))
}

/// Spawns a component with its output in `logs/<name>.log`, killed when this thread dies.
fn spawn(dir: &Path, bin: &Path, name: &str, args: &[String]) -> Result<Child, String> {
    let log = fs::File::create(dir.join("logs").join(format!("{name}.log")))
        .map_err(|e| format!("create {name} log: {e}"))?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(log).stderr(err);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("start {}: {e}", bin.display()))
}

fn log_tail(dir: &Path, name: &str) -> String {
    process::log_tail(&dir.join("logs").join(format!("{name}.log")), 30)
}

fn check_alive(child: &mut Child, dir: &Path, name: &str) -> Result<(), String> {
    match child.try_wait() {
        Ok(Some(status)) => Err(format!(
            "{name} exited ({status}); last log lines:\n{}",
            log_tail(dir, name)
        )),
        _ => Ok(()),
    }
}

/// Polls `ready` every `interval_ms` until it passes. Fails as soon as one of the `watched`
/// components exits, or after [`START_TIMEOUT`] with the last reason `ready` gave and the tail
/// of the last watched component's log.
async fn wait_ready(
    dir: &Path,
    watched: &mut [(&mut Child, &str)],
    what: &str,
    interval_ms: u64,
    mut ready: impl AsyncFnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        for (child, name) in watched.iter_mut() {
            check_alive(child, dir, name)?;
        }
        let last_error = match ready().await {
            Ok(()) => return Ok(()),
            Err(reason) => reason,
        };
        if Instant::now() > deadline {
            let log = watched.last().map_or("", |(_, name)| *name);
            return Err(format!(
                "{what} after {START_TIMEOUT:?} ({last_error}):\n{}",
                log_tail(dir, log)
            ));
        }
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    }
}

async fn start_apiserver(
    bins: &Path,
    dir: &Path,
    children: &mut Vec<Child>,
) -> Result<Config, String> {
    let pki = pki::generate(&dir.join("pki")).map_err(|e| format!("generate certificates: {e}"))?;

    let etcd_port = free_port()?;
    let peer_port = free_port()?;
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut etcd = spawn(
        dir,
        &bins.join("etcd"),
        "etcd",
        &[
            "--name=test".into(),
            format!("--data-dir={}", dir.join("etcd-data").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=test={peer_url}"),
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ],
    )?;
    wait_ready(
        dir,
        &mut [(&mut etcd, "etcd")],
        "etcd not healthy",
        100,
        async || {
            http_get_contains(etcd_port, "/health", "\"health\":\"true\"")
                .then_some(())
                .ok_or_else(|| "/health does not say so".to_string())
        },
    )
    .await?;
    children.push(etcd);

    let api_port = free_port()?;
    let p = |f: &str| dir.join("pki").join(f).display().to_string();
    let mut apiserver = spawn(
        dir,
        &bins.join("kube-apiserver"),
        "kube-apiserver",
        &[
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", dir.join("pki").display()),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--service-account-issuer=https://127.0.0.1:{api_port}"),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--authorization-mode=RBAC".into(),
            "--allow-privileged=true".into(),
            "--disable-admission-plugins=ServiceAccount".into(),
            "--profiling=false".into(),
        ],
    )?;

    let kubeconfig_path = dir.join("admin.kubeconfig");
    fs::write(&kubeconfig_path, pki.kubeconfig(api_port))
        .map_err(|e| format!("write kubeconfig: {e}"))?;
    let kubeconfig =
        Kubeconfig::read_from(&kubeconfig_path).map_err(|e| format!("read kubeconfig: {e}"))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("kubeconfig: {e}"))?;
    let client = Client::try_from(config.clone()).map_err(|e| format!("client: {e}"))?;

    // Ready means /readyz passes and the bootstrap controllers created `default`.
    let ready = async || {
        let readyz = http::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        client
            .request_text(readyz)
            .await
            .map_err(|e| e.to_string())?;
        match Api::<Namespace>::all(client.clone())
            .get_opt("default")
            .await
        {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err("namespace default not created yet".to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    wait_ready(
        dir,
        &mut [(&mut apiserver, "kube-apiserver")],
        "kube-apiserver not ready",
        200,
        ready,
    )
    .await?;
    children.push(apiserver);
    Ok(config)
}

async fn start_jobs(
    bins: &Path,
    dir: &Path,
    kubeconfig: &Path,
    config: &Config,
    children: &mut Vec<Child>,
) -> Result<(), String> {
    let kc = kubeconfig.display().to_string();
    let p = |f: &str| dir.join("pki").join(f).display().to_string();
    // What kube-controller-manager and kube-scheduler share: the admin kubeconfig for
    // everything, their own endpoint on a free loopback port, no leader election.
    let controller = |name: &str, extra: &[String]| -> Result<Child, String> {
        let mut args = vec![
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()?),
            "--leader-elect=false".into(),
        ];
        args.extend_from_slice(extra);
        spawn(dir, &bins.join(name), name, &args)
    };
    let mut kcm = controller(
        "kube-controller-manager",
        &[
            format!("--root-ca-file={}", p("ca.crt")),
            format!("--service-account-private-key-file={}", p("sa.key")),
            "--use-service-account-credentials=false".into(),
            "--kube-api-qps=500".into(),
            "--kube-api-burst=1000".into(),
        ],
    )?;
    let mut scheduler = controller("kube-scheduler", &[])?;
    let stages = hub_pods_wait_for_the_test(&bins.join("kwok-stages.yaml"), dir)?;
    let kwok_port = free_port()?;
    let mut kwok = spawn(
        dir,
        &bins.join("kwok"),
        "kwok",
        &[
            format!("--kubeconfig={kc}"),
            format!("--config={}", stages.display()),
            "--manage-all-nodes=false".into(),
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
            "--node-lease-duration-seconds=40".into(),
            "--cidr=10.244.0.0/16".into(),
            "--node-ip=127.0.0.1".into(),
            // The kubelet API (container logs) on the node's port, with the apiserver's
            // serving certificate (valid for 127.0.0.1); the apiserver reaches it there.
            format!("--server-address=127.0.0.1:{kwok_port}"),
            format!("--node-port={kwok_port}"),
            format!(
                "--tls-cert-file={}",
                dir.join("pki/apiserver.crt").display()
            ),
            format!(
                "--tls-private-key-file={}",
                dir.join("pki/apiserver.key").display()
            ),
        ],
    )?;

    let client = Client::try_from(config.clone()).map_err(|e| e.to_string())?;
    let nodes: Api<Node> = Api::all(client);
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "kwok-node-0",
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                       "kubernetes.io/hostname": "kwok-node-0", "type": "kwok"}
        },
        "status": {
            "allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
            "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"}
        }
    }))
    .map_err(|e| e.to_string())?;
    nodes
        .patch(
            "kwok-node-0",
            &PatchParams::apply("shapeblock-tests").force(),
            &Patch::Apply(&node),
        )
        .await
        .map_err(|e| format!("create fake node: {e}"))?;

    let node_ready = async || {
        let node = nodes.get("kwok-node-0").await.map_err(|e| e.to_string())?;
        let ready = node.status.and_then(|s| s.conditions).is_some_and(|conds| {
            conds
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        ready
            .then_some(())
            .ok_or_else(|| "no Ready condition".to_string())
    };
    wait_ready(
        dir,
        &mut [
            (&mut kcm, "kube-controller-manager"),
            (&mut scheduler, "kube-scheduler"),
            (&mut kwok, "kwok"),
        ],
        "fake node not Ready",
        200,
        node_ready,
    )
    .await?;
    children.extend([kcm, scheduler, kwok]);
    Ok(())
}

/// kwok's stages with one change: pods of the hub's Jobs (label
/// `app.kubernetes.io/managed-by=shapeblock-hub`) become Running but never finish on their
/// own. A test finishes them with [`finish_job_pod`], playing the kubelet: it writes the exit
/// codes and termination messages (commit SHA, image digest, git or helm output) that the real
/// containers would, and kube-controller-manager's Job controller takes it from there.
/// Label of pods kwok leaves alone, for the test to write their status as their kubelet.
pub const TEST_KUBELET_LABEL: &str = "shapeblock.io/kubelet";

fn hub_pods_wait_for_the_test(stages: &Path, dir: &Path) -> Result<PathBuf, String> {
    let text = std::fs::read_to_string(stages).map_err(|e| format!("{}: {e}", stages.display()))?;
    let anchor = "    - key: '.metadata.ownerReferences.[].kind'";
    if text.matches(anchor).count() != 1 {
        return Err(format!(
            "kwok pod-complete stage not recognised in {}",
            stages.display()
        ));
    }
    let patched = text.replace(
        anchor,
        &format!(
            "    - key: '.metadata.labels[\"app.kubernetes.io/managed-by\"]'\n      operator: 'DoesNotExist'\n{anchor}"
        ),
    );
    // Pods labelled `shapeblock.io/kubelet: test` are never started by kwok: the test plays
    // their kubelet (an App's pod that crashes during a rollout, say).
    let ready_stage = patched
        .find("  name: pod-ready\n")
        .ok_or_else(|| format!("kwok pod-ready stage not found in {}", stages.display()))?;
    let expressions = "    matchExpressions:\n";
    let at = ready_stage
        + patched[ready_stage..]
            .find(expressions)
            .ok_or_else(|| "kwok pod-ready stage has no matchExpressions".to_string())?
        + expressions.len();
    let mut patched = patched;
    patched.insert_str(
        at,
        &format!("    - key: '.metadata.labels[\"{TEST_KUBELET_LABEL}\"]'\n      operator: 'DoesNotExist'\n"),
    );
    // Container logs: each container name of the hub's pods (and `app`, the container of an
    // App's pods) reads its own file, which a test fills with `write_container_log` (CRI log
    // format, as a kubelet keeps it).
    let logs = dir.join("container-logs");
    std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
    let mut documents = patched;
    documents.push_str("\n---\napiVersion: kwok.x-k8s.io/v1alpha1\nkind: ClusterLogs\nmetadata:\n  name: hub-pods\nspec:\n  logs:\n");
    for container in [
        "git-init", "clone", "checkout", "commit", "prepare", "build", "helm", "app",
    ] {
        let file = logs.join(format!("{container}.log"));
        std::fs::write(&file, "").map_err(|e| e.to_string())?;
        documents.push_str(&format!(
            "  - containers: [{container}]\n    logsFile: {}\n    follow: false\n",
            file.display()
        ));
    }
    let out = dir.join("kwok-stages.yaml");
    std::fs::write(&out, documents).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Sets the log kwok serves for every hub pod's container of that name (`clone`, `build`, …):
/// lines in the CRI format a kubelet stores them in.
pub fn write_container_log(container: &str, lines: &[&str]) {
    let dir = shared()
        .run_dir
        .as_ref()
        .expect("container logs need the built-in control plane");
    let now = "2026-11-26T12:00:00.000000000Z";
    let text: String = lines
        .iter()
        .map(|line| format!("{now} stdout F {line}\n"))
        .collect();
    std::fs::write(dir.join(format!("container-logs/{container}.log")), text)
        .expect("writing a container log");
}

/// How a test ends a hub Job's pod (see [`hub_pods_wait_for_the_test`]).
pub struct PodEnd<'a> {
    /// Pod phase: `Succeeded` or `Failed`.
    pub phase: &'a str,
    /// Init containers: (name, exit code, termination message), in order.
    pub init: Vec<(&'a str, i32, &'a str)>,
    /// Containers: (name, exit code, reason, termination message).
    pub containers: Vec<(&'a str, i32, &'a str, &'a str)>,
}

/// Waits (60 s at most) for a pod of `job` that kwok runs.
async fn running_job_pod(
    client: &Client,
    namespace: &str,
    job: &str,
) -> k8s_openapi::api::core::v1::Pod {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    let selector = format!("batch.kubernetes.io/job-name={job}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = pods
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
            .expect("listing job pods");
        if let Some(pod) = list
            .items
            .into_iter()
            .find(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        {
            break pod;
        }
        assert!(
            Instant::now() < deadline,
            "no running pod of Job {namespace}/{job} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The image of a pod's container (init or regular).
fn container_image(pod: &k8s_openapi::api::core::v1::Pod, name: &str) -> String {
    let spec = pod.spec.as_ref().expect("pod spec");
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == name)
        .and_then(|c| c.image.clone())
        .unwrap_or_else(|| panic!("pod {:?} has no container {name}", pod.metadata.name))
}

/// One container status, as the kubelet writes it for a terminated container.
fn terminated_status(
    pod: &k8s_openapi::api::core::v1::Pod,
    name: &str,
    code: i32,
    reason: &str,
    message: &str,
) -> serde_json::Value {
    let now = jiff::Timestamp::now().to_string();
    serde_json::json!({"name": name, "image": container_image(pod, name), "imageID": "",
        "ready": false, "restartCount": 0, "state": {"terminated": {"exitCode": code,
        "reason": reason, "message": message, "startedAt": now, "finishedAt": now}}})
}

/// Writes a pod's status as its kubelet; returns the pod's name.
async fn write_pod_status(
    client: &Client,
    pod: &k8s_openapi::api::core::v1::Pod,
    status: serde_json::Value,
) -> String {
    use kube::ResourceExt;
    let namespace = pod.namespace().expect("pod namespace");
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &namespace)
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"status": status})),
        )
        .await
        .unwrap_or_else(|e| panic!("writing the status of pod {}: {e}", pod.name_any()));
    pod.name_any()
}

/// Waits for the pod of `job` to run, then writes, as the kubelet would, that its init
/// containers `done` have succeeded and that `container` waits with `reason` and `message`
/// (`ErrImagePull`, say). The pod's phase stays `Running`: kwok would start a `Pending` pod
/// again, and the hub judges a waiting container by its state, not by the phase.
pub async fn job_pod_waits(
    client: &Client,
    namespace: &str,
    job: &str,
    done: &[&str],
    container: &str,
    reason: &str,
    message: &str,
) -> String {
    let pod = running_job_pod(client, namespace, job).await;
    let mut init: Vec<_> = done
        .iter()
        .map(|name| terminated_status(&pod, name, 0, "Completed", ""))
        .collect();
    let waiting = serde_json::json!({"name": container, "image": container_image(&pod, container),
        "imageID": "", "ready": false, "restartCount": 0,
        "state": {"waiting": {"reason": reason, "message": message}}});
    let is_init = pod
        .spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .any(|c| c.name == container);
    let status = if is_init {
        init.push(waiting);
        serde_json::json!({"initContainerStatuses": init})
    } else {
        serde_json::json!({"initContainerStatuses": init, "containerStatuses": [waiting]})
    };
    write_pod_status(client, &pod, status).await
}

/// Waits for the pod of `job` to run, then writes its end as the kubelet would.
pub async fn finish_job_pod(
    client: &Client,
    namespace: &str,
    job: &str,
    end: PodEnd<'_>,
) -> String {
    let pod = running_job_pod(client, namespace, job).await;
    let init: Vec<_> = end
        .init
        .iter()
        .map(|(name, code, message)| {
            let reason = if *code == 0 { "Completed" } else { "Error" };
            terminated_status(&pod, name, *code, reason, message)
        })
        .collect();
    let containers: Vec<_> = end
        .containers
        .iter()
        .map(|(name, code, reason, message)| terminated_status(&pod, name, *code, reason, message))
        .collect();
    let mut status = serde_json::json!({"phase": end.phase, "initContainerStatuses": init});
    if !containers.is_empty() {
        status["containerStatuses"] = containers.into();
    }
    write_pod_status(client, &pod, status).await
}

/// Runs a hub helm Job's pod for real: the pod's own helm argv, with the chart and values
/// laid out from the ConfigMap and Secret the pod mounts, run by the real helm binary as the
/// pod's ServiceAccount against the test apiserver; then writes the pod's end (exit code and
/// helm's output as the termination message) as the kubelet would. Returns helm's output.
pub async fn run_helm_job(client: &Client, namespace: &str, job: &str) -> (bool, String) {
    use k8s_openapi::api::batch::v1::Job;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let job_object = jobs.get(job).await.expect("reading the helm Job");
    let pod_spec = job_object
        .spec
        .and_then(|s| s.template.spec)
        .expect("helm Job pod spec");
    let container = pod_spec
        .containers
        .iter()
        .find(|c| c.name == "helm")
        .expect("helm container");
    let work = hub::scratch_dir(&format!("helm-{namespace}-{job}"));
    let mut mounts: Vec<(String, PathBuf)> = vec![];
    for mount in container.volume_mounts.iter().flatten() {
        let volume = pod_spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .expect("mounted volume");
        let local = work.join(&mount.name);
        std::fs::create_dir_all(&local).expect("volume dir");
        if let Some(secret) = &volume.secret {
            let name = secret.secret_name.clone().expect("secret name");
            let secret = Api::<Secret>::namespaced(client.clone(), namespace)
                .get(&name)
                .await
                .expect("reading a mounted Secret");
            for (key, value) in secret.data.unwrap_or_default() {
                std::fs::write(local.join(key), value.0).expect("writing a Secret key");
            }
        } else if let Some(config_map) = &volume.config_map {
            let data = Api::<ConfigMap>::namespaced(client.clone(), namespace)
                .get(&config_map.name)
                .await
                .expect("reading a mounted ConfigMap")
                .data
                .unwrap_or_default();
            for item in config_map.items.iter().flatten() {
                let path = local.join(&item.path);
                std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
                std::fs::write(&path, &data[&item.key]).expect("writing a ConfigMap key");
            }
        }
        mounts.push((mount.mount_path.clone(), local));
    }
    let args: Vec<String> = container
        .args
        .iter()
        .flatten()
        .map(|arg| {
            mounts
                .iter()
                .find_map(|(path, local)| {
                    arg.strip_prefix(path.as_str())
                        .map(|rest| format!("{}{rest}", local.display()))
                })
                .unwrap_or_else(|| arg.clone())
        })
        .collect();
    let service_account = pod_spec
        .service_account_name
        .clone()
        .unwrap_or_else(|| "default".into());
    let kubeconfig = kubeconfig_path().await;
    let helm = binaries().expect("test binaries").join("helm");
    let home = work.join("home");
    let output = tokio::process::Command::new(&helm)
        .args(&args)
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg(format!(
            "--kube-as-user=system:serviceaccount:{namespace}:{service_account}"
        ))
        .env("HOME", &home)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {}: {e}", helm.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let ok = output.status.success();
    let code = output.status.code().unwrap_or(1);
    let (phase, reason) = if ok {
        ("Succeeded", "Completed")
    } else {
        ("Failed", "Error")
    };
    // FallbackToLogsOnError: a failed container's message is the tail of its output.
    let message = if ok { String::new() } else { text.clone() };
    finish_job_pod(
        client,
        namespace,
        job,
        PodEnd {
            phase,
            init: vec![],
            containers: vec![("helm", code, reason, &message)],
        },
    )
    .await;
    (ok, text)
}

/// Long-running `pods/log` requests the apiserver is serving now (its own metric): how a test
/// sees that a log follower's request through the tunnel has ended.
pub async fn apiserver_log_requests(admin: &Client) -> u64 {
    let metrics = admin
        .request_text(
            http::Request::get("/metrics")
                .body(vec![])
                .expect("request"),
        )
        .await
        .expect("apiserver metrics");
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_longrunning_requests{")
                && l.contains("resource=\"pods\"")
                && l.contains("subresource=\"log\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Plain HTTP/1.0 GET on loopback; true when the body contains `needle`.
fn http_get_contains(port: u16, path: &str, needle: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body.contains(needle)
}

#[cfg(test)]
mod tests {
    /// The product never depends on the test support or the load test: only the hub package's
    /// dev-dependencies and the load test name them.
    #[test]
    fn the_product_does_not_depend_on_test_code() {
        let manifest = std::fs::read_to_string(super::process::repository().join("Cargo.toml"))
            .expect("the hub's Cargo.toml");
        let mut section = "";
        for line in manifest.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                section = line;
                continue;
            }
            if section != "[dev-dependencies]" && section != "[workspace]" {
                for crate_name in ["shapeblock-test-support", "shapeblock-loadtest"] {
                    assert!(
                        !line.starts_with(crate_name),
                        "{section} of the hub names {crate_name}: {line}"
                    );
                }
            }
        }
    }
}
