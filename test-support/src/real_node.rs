//! A real node for the end-to-end tier: `tests/real-node/node.sh` starts a whole single-node
//! cluster (control plane, kube-proxy, containerd + runc, the kubelet, a TLS registry, a git
//! daemon) inside private network and mount namespaces, and tears it down when this test
//! binary ends, however it ends: the script waits on a pipe that only this process holds, so
//! its end (even by SIGKILL) closes the pipe and starts the teardown.
//!
//! The test binary and the processes it starts (the hub, the agent) stay in the host's
//! namespaces. They reach the node's apiserver through a loopback port this module forwards
//! into the node's network namespace; apps answer through the apiserver's service proxy,
//! which is inside, next to the pods. After [`node`], [`super::client`], [`super::config`],
//! [`super::kubeconfig_path`] and [`super::TestNamespace`] talk to the node's apiserver.
//!
//! Every test binary that uses it runs alone: the script takes a machine-wide lock (the
//! kubelet owns its cgroups and kills containers it does not know).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use super::process;

/// Address of the node inside its namespaces: pods reach the registry and git here.
pub const NODE_ADDRESS: &str = "10.250.0.1";
/// The node's registry, as Apps name it (TLS with the test CA every image trusts).
pub const REGISTRY: &str = "10.250.0.1:5000";
/// Base image of the test apps, in the node's registry.
pub const BASE_IMAGE: &str = "10.250.0.1:5000/base/busybox:1";

/// The running node.
pub struct RealNode {
    /// Admin kubeconfig for the node's apiserver through the forwarded loopback port.
    pub kubeconfig: PathBuf,
    pub config: Config,
    /// The run directory: logs, the git repositories the daemon serves.
    pub dir: PathBuf,
    /// What `tests/real-node/build.sh` made: images, the registry's CA.
    pub images: PathBuf,
    /// The process holding the node's namespaces.
    holder: u32,
    /// Opens connections from inside the node's network namespace.
    dial: Dial,
    /// Held until the process ends; closing it tears the node down.
    _janitor: Mutex<ChildStdin>,
}

static NODE: OnceLock<Result<RealNode, String>> = OnceLock::new();

/// The real node of this test binary, started on first use (about 15 s, plus the image
/// build when it is not cached). Fails the test with the reason when it cannot start.
pub async fn node() -> &'static RealNode {
    let node = tokio::task::spawn_blocking(|| {
        NODE.get_or_init(|| {
            let node = start()?;
            super::use_cluster(node.config.clone(), node.kubeconfig.clone())?;
            Ok(node)
        })
        .as_ref()
        .map_err(Clone::clone)
    })
    .await
    .expect("real node start");
    node.unwrap_or_else(|reason| panic!("the real node is not available: {reason}"))
}

fn start() -> Result<RealNode, String> {
    let bins = super::binaries()?;
    let images = images()?;
    let dir = run_dir()?;
    let script = process::repository().join("tests/real-node/node.sh");
    let log_path = dir.join("node.log");
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let mut command = Command::new("bash");
    command
        .arg(&script)
        .arg("run")
        .arg(&dir)
        .arg(&bins)
        .arg(&images)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(log);
    // Its own session: a terminal's Ctrl-C reaches this binary, not the teardown.
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = command
        .spawn()
        .map_err(|e| format!("start {}: {e}", script.display()))?;
    let stdin = child.stdin.take().ok_or("no stdin pipe")?;
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let mut holder = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if let Some(pid) = line.strip_prefix("READY ") {
            holder = pid.trim().parse::<u32>().ok();
            break;
        }
    }
    let Some(holder) = holder else {
        let _ = child.wait();
        return Err(format!(
            "{} did not start the node; its log ({}):\n{}",
            script.display(),
            log_path.display(),
            process::log_tail(&log_path, 40)
        ));
    };
    super::figures::report(&format!(
        "real node ready after {:.1} s (logs in {})",
        started.elapsed().as_secs_f64(),
        dir.join("logs").display()
    ));
    let dial = netns_dialer(holder)?;
    let port = forward_apiserver(dial.clone())?;
    let pki = dir.join("pki");
    let kubeconfig = dir.join("admin-forwarded.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: node, cluster: {{server: \"https://127.0.0.1:{port}\", certificate-authority: \"{ca}\"}}}}]\n\
             users: [{{name: admin, user: {{client-certificate: \"{crt}\", client-key: \"{key}\"}}}}]\n\
             contexts: [{{name: node, context: {{cluster: node, user: admin}}}}]\n\
             current-context: node\n",
            ca = pki.join("ca.crt").display(),
            crt = pki.join("admin.crt").display(),
            key = pki.join("admin.key").display(),
        ),
    )
    .map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let parsed = Kubeconfig::read_from(&kubeconfig).map_err(|e| e.to_string())?;
    let config = rt
        .block_on(Config::from_custom_kubeconfig(
            parsed,
            &KubeConfigOptions::default(),
        ))
        .map_err(|e| e.to_string())?;
    // The child is left to run: it ends after the teardown, once this process has gone.
    std::mem::forget(child);
    Ok(RealNode {
        kubeconfig,
        config,
        dir,
        images,
        holder,
        dial,
        _janitor: Mutex::new(stdin),
    })
}

/// The image directory: `SHAPEBLOCK_REAL_NODE_IMAGES`, else what `tests/real-node/build.sh`
/// prints (it builds once, then reuses its cache).
fn images() -> Result<PathBuf, String> {
    match std::env::var("SHAPEBLOCK_REAL_NODE_IMAGES") {
        Ok(dir) => Ok(PathBuf::from(dir)),
        Err(_) => super::script_output_dir("tests/real-node/build.sh"),
    }
}

/// `target/tmp/real-node/<pid>`; earlier runs' directories go, except the logs of a run in
/// which a test failed (marked `KEEP`).
fn run_dir() -> Result<PathBuf, String> {
    let root = process::target_tmp().join("real-node");
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        let path = entry.path();
        let alive = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive && !path.join("KEEP").exists() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
    let dir = root.join(std::process::id().to_string());
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// Marks the run directory's logs to be kept (a failed test calls it through the panic hook).
pub(crate) fn keep_logs(test: &str) {
    if let Some(Ok(node)) = NODE.get() {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("KEEP"))
            .and_then(|mut f| writeln!(f, "{test}"));
        eprintln!(
            "test {test} failed: real node logs kept in {}",
            node.dir.join("logs").display()
        );
    }
}

/// Listens on a free loopback port of the host and forwards every connection to the
/// apiserver at 127.0.0.1:6443 inside the node's network namespace; returns the port.
fn forward_apiserver(dial: Dial) -> Result<u16, String> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("forwarder: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("real-node-forwarder".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                while let Ok((mut client, _)) = listener.accept().await {
                    let dial = dial.clone();
                    tokio::spawn(async move {
                        let Ok(upstream) =
                            tokio::task::spawn_blocking(move || dial("127.0.0.1:6443")).await
                        else {
                            return;
                        };
                        let Ok(upstream) = upstream else { return };
                        if upstream.set_nonblocking(true).is_err() {
                            return;
                        }
                        let Ok(mut upstream) = tokio::net::TcpStream::from_std(upstream) else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    });
                }
            });
        })
        .map_err(|e| e.to_string())?;
    Ok(port)
}

type Dial = std::sync::Arc<dyn Fn(&str) -> std::io::Result<std::net::TcpStream> + Send + Sync>;

/// A function that opens TCP connections from inside the node's network namespace: one
/// thread joins it (network namespaces are per thread) and dials on request.
fn netns_dialer(holder: u32) -> Result<Dial, String> {
    let netns = std::fs::File::open(format!("/proc/{holder}/ns/net"))
        .map_err(|e| format!("the node's network namespace: {e}"))?;
    type Reply = mpsc::Sender<std::io::Result<std::net::TcpStream>>;
    let (tx, rx) = mpsc::channel::<(String, Reply)>();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("real-node-dialer".into())
        .spawn(move || {
            // SAFETY: setns on this thread only, with a namespace file we hold open.
            let joined = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
            let _ = ready_tx.send(if joined == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error().to_string())
            });
            for (addr, reply) in rx {
                let _ = reply.send(std::net::TcpStream::connect_timeout(
                    &addr.parse().expect("socket address"),
                    Duration::from_secs(5),
                ));
            }
        })
        .map_err(|e| e.to_string())?;
    ready_rx
        .recv()
        .map_err(|_| "the dialer thread died".to_string())?
        .map_err(|e| format!("joining the node's network namespace: {e}"))?;
    let tx = Mutex::new(tx);
    Ok(std::sync::Arc::new(move |addr: &str| {
        let (reply_tx, reply_rx) = mpsc::channel();
        tx.lock()
            .map_err(|_| std::io::Error::other("dialer lock"))?
            .send((addr.to_string(), reply_tx))
            .map_err(|_| std::io::Error::other("the dialer thread is gone"))?;
        reply_rx
            .recv()
            .map_err(|_| std::io::Error::other("the dialer thread is gone"))?
    }))
}

impl RealNode {
    /// A git repository the node's daemon serves at `git://10.250.0.1/<name>`, created empty.
    pub fn git_repo(&self, name: &str) -> GitRepo {
        let dir = self.dir.join("git").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("git repository directory");
        let repo = GitRepo {
            dir,
            url: format!("git://{NODE_ADDRESS}/{name}"),
        };
        repo.git(&["init", "-q", "-b", "main"]);
        repo
    }

    /// Runs `program` with `args` on the host's filesystem but in the node's network
    /// namespace (where 10.250.0.1 is); fails the test unless it succeeds. Returns stdout.
    pub fn run_in_node(&self, program: &Path, args: &[&str]) -> String {
        succeeds(
            &mut self.in_node(program, args),
            &format!("{} {args:?} in the node", program.display()),
        )
    }

    /// Like [`RealNode::run_in_node`], for a command that may fail (a server not up yet):
    /// its stdout, or its exit status and stderr.
    pub fn try_run_in_node(&self, program: &Path, args: &[&str]) -> Result<String, String> {
        let out = self
            .in_node(program, args)
            .output()
            .map_err(|e| format!("running {}: {e}", program.display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn in_node(&self, program: &Path, args: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg("-t")
            .arg(self.holder.to_string())
            .arg("--net")
            .arg("--")
            .arg(program)
            .args(args);
        command
    }

    /// Starts `program` with `args` in the node's network and mount namespaces (a server
    /// the pods reach at 10.250.0.1), its output in the run's `logs/<name>.log`. It is killed
    /// when the returned handle drops, and by the teardown in any case.
    pub fn spawn_in_node(&self, name: &str, program: &Path, args: &[&str]) -> NodeProcess {
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let out = process::append_log(&log);
        let mut command = Command::new("nsenter");
        command
            .arg("-t")
            .arg(self.holder.to_string())
            .arg("--net")
            .arg("--mount")
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out);
        let child = process::spawn_tied(command)
            .unwrap_or_else(|e| panic!("starting {} in the node: {e}", program.display()));
        NodeProcess { child, log }
    }

    /// Waits up to 30 s until something accepts TCP connections at `addr` inside the node.
    pub async fn wait_listening(&self, addr: &str, what: &NodeProcess) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let dial = self.dial.clone();
            let target = addr.to_string();
            let connected = tokio::task::spawn_blocking(move || dial(&target).is_ok())
                .await
                .unwrap_or(false);
            if connected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nothing listens at {addr} inside the node after 30 s; {}:\n{}",
                what.log.display(),
                process::log_tail(&what.log, 30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Packages the chart in `chart_dir` with helm and pushes it to the node's registry at
    /// `oci://10.250.0.1:5000/charts`; returns that repository URL.
    pub fn push_chart(&self, chart_dir: &Path) -> String {
        let helm = super::binaries().expect("test binaries").join("helm");
        let out_dir = chart_dir.with_extension("packaged");
        std::fs::create_dir_all(&out_dir).expect("chart package directory");
        succeeds(
            Command::new(&helm)
                .arg("package")
                .arg(chart_dir)
                .arg("--destination")
                .arg(&out_dir),
            "helm package",
        );
        let tgz = std::fs::read_dir(&out_dir)
            .expect("packaged chart")
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "tgz"))
            .expect("a .tgz from helm package");
        let repository = format!("oci://{REGISTRY}/charts");
        let home = self.dir.join("helm-home");
        let _ = std::fs::create_dir_all(&home);
        let tgz = tgz.display().to_string();
        let ca = self.images.join("ca.crt").display().to_string();
        let config = format!("--registry-config={}/registry.json", home.display());
        self.run_in_node(
            &helm,
            &["push", &tgz, &repository, "--ca-file", &ca, &config],
        );
        repository
    }

    /// An HTTP GET to a Service of the node through the apiserver's service proxy (which
    /// reaches the pods from inside the node): (status, body).
    pub async fn http_get(
        &self,
        client: &Client,
        namespace: &str,
        service: &str,
        path: &str,
    ) -> Result<(u16, String), String> {
        self.http_get_port(client, namespace, &format!("{service}:http"), path)
            .await
    }

    /// Like [`RealNode::http_get`] for `service` given as `<name>:<port name or number>`.
    pub async fn http_get_port(
        &self,
        client: &Client,
        namespace: &str,
        service: &str,
        path: &str,
    ) -> Result<(u16, String), String> {
        let request = http::Request::get(format!(
            "/api/v1/namespaces/{namespace}/services/{service}/proxy{path}"
        ))
        .body(Vec::new())
        .map_err(|e| e.to_string())?;
        match client.request_text(request).await {
            Ok(body) => Ok((200, body)),
            Err(kube::Error::Api(status)) => {
                Err(format!("HTTP {}: {}", status.code, status.message))
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// A git working tree the node serves; commits are made with the host's git.
pub struct GitRepo {
    pub dir: PathBuf,
    pub url: String,
}

impl GitRepo {
    fn git(&self, args: &[&str]) -> String {
        let mut command = Command::new("git");
        command
            .arg("-C")
            .arg(&self.dir)
            .args([
                "-c",
                "user.name=test",
                "-c",
                "user.email=test@example.invalid",
            ])
            .args(args);
        succeeds(&mut command, &format!("git {args:?}"))
            .trim()
            .to_string()
    }

    /// Writes `files` (path, content), commits them all, returns the commit SHA.
    pub fn commit(&self, message: &str, files: &[(&str, &[u8])]) -> String {
        for (path, content) in files {
            let file = self.dir.join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("directory");
            std::fs::write(&file, content).expect("writing a file");
        }
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "-m", message]);
        self.git(&["rev-parse", "HEAD"])
    }
}

/// Runs `command` to its end and returns its stdout; fails the test, with its output, unless
/// it succeeds (`what` names it in the failure).
fn succeeds(command: &mut Command, what: &str) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A process a test started inside the node ([`RealNode::spawn_in_node`]).
pub struct NodeProcess {
    child: std::process::Child,
    pub log: PathBuf,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
