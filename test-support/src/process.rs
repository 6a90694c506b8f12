//! What every harness needs of processes: free loopback ports, where the built binaries and
//! the scratch space are, memory and CPU samples from `/proc`, log files, and the command line
//! of a real agent.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The repository's root (the hub package's directory).
pub fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support lives in the repository")
        .to_path_buf()
}

/// The directory of the running executable's build profile (`target/<profile>`): tests and
/// benches run from its `deps/`, binaries from the profile directory itself.
fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    Some(if dir.ends_with("deps") {
        dir.parent()?.to_path_buf()
    } else {
        dir.to_path_buf()
    })
}

/// Scratch space under the target directory (`target/tmp`, Cargo's `CARGO_TARGET_TMPDIR`,
/// which only test and bench crates are given at build time).
pub fn target_tmp() -> PathBuf {
    profile_dir()
        .and_then(|profile| profile.parent().map(|target| target.join("tmp")))
        .unwrap_or_else(std::env::temp_dir)
}

/// A free loopback port (bound, then released for a process to take).
pub fn try_free_port() -> std::io::Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
}

/// Like [`try_free_port`], failing the test when there is none.
pub fn free_port() -> u16 {
    try_free_port().expect("a free port")
}

/// A binary built beside the running executable (Cargo builds a package's binaries before its
/// tests and benches; `cargo build --release` builds the hub's and the load test's together).
pub fn sibling_binary(name: &str) -> PathBuf {
    let path = profile_dir()
        .expect("the running executable's directory")
        .join(name);
    assert!(
        path.exists(),
        "{} not found: build it first (cargo build -p shapeblock-hub, with the same profile)",
        path.display()
    );
    path
}

/// The agent binary that tests start: `SHAPEBLOCK_AGENT_BIN` (the benchmark runs the
/// size-optimised `agent` profile that the images ship), else the one built beside the test.
pub fn agent_binary() -> PathBuf {
    std::env::var_os("SHAPEBLOCK_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| sibling_binary("shapeblock-agent"))
}

/// The command line of a real agent: the hub at `hub_url` (its certificate pinned to
/// `ca_file`, or plain `ws://` without one), the token read from `token_file`, the cluster of
/// `kubeconfig`.
pub fn agent_command(
    binary: &Path,
    hub_url: &str,
    ca_file: Option<&Path>,
    token_file: &Path,
    kubeconfig: &Path,
) -> Command {
    agent_command_via(None, binary, hub_url, ca_file, token_file, kubeconfig)
}

/// [`agent_command`] run by `launcher` when given: an emulator such as
/// `qemu-aarch64-static`, so a binary built for another architecture runs here as one process
/// (killing the launcher kills the agent).
pub fn agent_command_via(
    launcher: Option<&Path>,
    binary: &Path,
    hub_url: &str,
    ca_file: Option<&Path>,
    token_file: &Path,
    kubeconfig: &Path,
) -> Command {
    let mut cmd = match launcher {
        Some(launcher) => {
            let mut cmd = Command::new(launcher);
            cmd.arg(binary);
            cmd
        }
        None => Command::new(binary),
    };
    cmd.arg("--hub-url")
        .arg(hub_url)
        .arg("--token-file")
        .arg(token_file)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .stdin(std::process::Stdio::null());
    match ca_file {
        Some(ca) => cmd.arg("--hub-ca-file").arg(ca),
        None => cmd.arg("--allow-plaintext=true"),
    };
    cmd
}

/// `path` opened for a child process's output, appended to (restarts keep earlier logs).
pub fn append_log(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// The last `lines` lines of a log file (empty when it cannot be read).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Memory and CPU of a process, from `/proc`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub rss_kib: u64,
    /// Peak RSS since the process started.
    pub hwm_kib: u64,
    /// User + system CPU time.
    pub cpu: Duration,
    pub at: Option<Instant>,
}

/// Samples a process (zeros for what cannot be read).
pub fn sample(pid: u32) -> ProcSample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 14th field overall.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let cpu_ticks = ticks(11) + ticks(12);
    ProcSample {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        cpu: Duration::from_millis(cpu_ticks * 1000 / hz),
        at: Some(Instant::now()),
    }
}

/// Resident memory of a process, in KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    sample(pid).rss_kib
}

/// CPU used between two samples, in cores (1.0 = one core busy).
pub fn cores(before: &ProcSample, after: &ProcSample) -> f64 {
    let wall = match (before.at, after.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => return 0.0,
    };
    (after.cpu.saturating_sub(before.cpu)).as_secs_f64() / wall.max(1e-3)
}

/// Spawns `command` so that it dies with this test binary, however the binary ends: the
/// child gets `PR_SET_PDEATHSIG`, which fires when the thread that spawned it ends, so every
/// such child is spawned by one thread that lives as long as the process. (A hub or agent
/// kept in a `static`, whose `Drop` never runs, would otherwise outlive the tests.)
pub fn spawn_tied(mut command: std::process::Command) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    use std::sync::{Mutex, OnceLock, mpsc};
    type Reply = mpsc::Sender<std::io::Result<std::process::Child>>;
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<(std::process::Command, Reply)>>> = OnceLock::new();
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<(std::process::Command, Reply)>();
        let _ = std::thread::Builder::new()
            .name("tied-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
                // Every sender gone (never, it is a static): keep the children alive.
                loop {
                    std::thread::park();
                }
            });
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner
        .lock()
        .map_err(|_| std::io::Error::other("spawner lock poisoned"))?
        .send((command, reply_tx))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}
