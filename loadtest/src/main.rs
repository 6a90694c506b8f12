//! Load test of the hub with simulated clusters: prints figures, asserts nothing about speed.
//! See the README ("Load test") for the commands and the latest figures.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clap::Parser;
use dashmap::DashMap;
use futures_util::StreamExt;
use shapeblock_loadtest::fleet::{self, AgentProcess, Member};
use shapeblock_loadtest::report::Figures;
use shapeblock_loadtest::sim::JobTimings;
use shapeblock_loadtest::{WATCHES_PER_CLUSTER, relay};
use shapeblock_test_support::figures::{mib, percentile};
use shapeblock_test_support::hub_process::{HubProcess, HubSettings, Pki};
use shapeblock_test_support::process::{self, ProcSample};
use tokio_util::sync::CancellationToken;

/// Connects simulated clusters to a real hub process and measures it.
#[derive(Parser, Debug)]
#[command(name = "shapeblock-loadtest")]
struct Args {
    /// Fleet sizes to run, one fresh hub each.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,2000")]
    clusters: Vec<usize>,
    /// Apps per cluster (in one Project).
    #[arg(long, default_value_t = 20)]
    apps: usize,
    /// AppBuilds created per second across the fleet during the build phase.
    #[arg(long, default_value_t = 5.0)]
    build_rate: f64,
    /// How long builds are created for.
    #[arg(long, default_value_t = 60)]
    build_seconds: u64,
    /// How long a simulated build Job runs (ms); deploy Jobs run a third of it.
    #[arg(long, default_value_t = 3000)]
    build_ms: u64,
    /// Restart the hub under the fleet of this size (0: never).
    #[arg(long, default_value_t = 1000)]
    restart_at: usize,
    /// Clusters served by real `shapeblock-agent` processes (their RSS is reported).
    #[arg(long, default_value_t = 2)]
    agent_processes: usize,
    /// Seconds over which idle memory and CPU are sampled.
    #[arg(long, default_value_t = 20)]
    sample_seconds: u64,
    /// The hub binary (default: `shapeblock-hub` next to this one).
    #[arg(long)]
    hub_binary: Option<std::path::PathBuf>,
    /// The agent binary (default: the size-optimised `target/agent/shapeblock-agent` when
    /// built, else `shapeblock-agent` next to this one).
    #[arg(long)]
    agent_binary: Option<std::path::PathBuf>,
    /// Where configuration, data and logs go (default: a new temporary directory).
    #[arg(long)]
    work_dir: Option<std::path::PathBuf>,
}

const ADMIN_TOKEN: &str = "loadtest-admin-token-0123456789";
/// Extra hub configuration: every agent of the load test dials from 127.0.0.1, so the
/// per-address handshake limit (meant for one NAT'd site) is raised to the global one.
const HUB_EXTRA: &str = "handshakes_per_second_per_ip: 200\n";

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(args));
    // Thousands of agent tasks: do not wait for each to wind down.
    runtime.shutdown_background();
}

async fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl AsyncFnMut() -> Option<String>,
) -> Duration {
    let started = Instant::now();
    loop {
        let last = match done().await {
            None => return started.elapsed(),
            Some(progress) => progress,
        };
        if started.elapsed() > timeout {
            panic!("{what}: not done within {timeout:?} ({last})");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn run(args: Args) {
    let work = args.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("shapeblock-loadtest-{}", std::process::id()))
    });
    std::fs::create_dir_all(&work).expect("work directory");
    let hub_binary = args
        .hub_binary
        .clone()
        .unwrap_or_else(|| process::sibling_binary("shapeblock-hub"));
    let agent_binary = args.agent_binary.clone().unwrap_or_else(|| {
        let sized = process::sibling_binary("shapeblock-loadtest")
            .with_file_name("../agent/shapeblock-agent");
        if sized.exists() {
            sized
        } else {
            process::sibling_binary("shapeblock-agent")
        }
    });
    let pki = Pki::create(&work);
    println!(
        "# ShapeBlock hub load test: {} CPUs, {} MiB RAM, hub {}, agent {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        total_memory_mib(),
        hub_binary.display(),
        agent_binary.display()
    );
    println!("# work directory: {}", work.display());
    let mut all = vec![];
    for &n in &args.clusters {
        let figures = scenario(
            &args,
            n,
            &work.join(format!("n{n}")),
            &pki,
            &hub_binary,
            &agent_binary,
        )
        .await;
        figures.print();
        all.push(figures);
    }
    println!("\n# summary");
    for figures in &all {
        figures.print_summary();
    }
    for figures in &all {
        figures.print_targets();
    }
}

fn total_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                })
        })
        .map_or(0, |kib| kib / 1024)
}

/// Samples the hub over `seconds`: (last sample, CPU cores used over the window). Prints the
/// reconciles that ran in the window (none, when the fleet is really idle).
async fn window(hub: &HubProcess, seconds: u64) -> (ProcSample, f64) {
    let counts = hub.api.reconciles().await;
    let before = process::sample(hub.pid);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let after = process::sample(hub.pid);
    let ran: Vec<String> = hub
        .api
        .reconciles()
        .await
        .into_iter()
        .filter_map(|(labels, value)| {
            let delta = value - counts.get(&labels).copied().unwrap_or(0.0);
            (delta > 0.0).then(|| format!("{labels}: {delta}"))
        })
        .collect();
    if !ran.is_empty() {
        println!("  reconciles in the {seconds} s window: {}", ran.join("; "));
    }
    (after, process::cores(&before, &after))
}

async fn scenario(
    args: &Args,
    n: usize,
    dir: &std::path::Path,
    pki: &Pki,
    hub_binary: &std::path::Path,
    agent_binary: &std::path::Path,
) -> Figures {
    std::fs::create_dir_all(dir).expect("scenario directory");
    println!("\n## {n} clusters × {} Apps", args.apps);
    let mut figures = Figures {
        clusters: n,
        apps: args.apps,
        ..Default::default()
    };
    let phases: Arc<DashMap<String, Instant>> = Arc::default();
    let received = Arc::new(relay::Received::default());
    let relay_url = relay::start(phases.clone(), received.clone()).await;
    let settings = HubSettings {
        binary: hub_binary.to_path_buf(),
        dir: dir.to_path_buf(),
        port: process::free_port(),
        relay_url,
        admin_token: ADMIN_TOKEN.into(),
        extra: HUB_EXTRA.into(),
    };
    let hub = HubProcess::start(&settings, pki).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    figures.baseline_kib = process::sample(hub.pid).rss_kib;
    println!("hub started: RSS {}", mib(figures.baseline_kib));

    // Register the fleet through the API, 16 at a time.
    let started = Instant::now();
    let registered: Vec<(String, String)> = futures_util::stream::iter(0..n)
        .map(|i| {
            let api = hub.api.clone();
            async move { api.register(&format!("sim-{i:04}")).await }
        })
        .buffered(16)
        .collect()
        .await;
    println!(
        "registered {n} clusters in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let timings = JobTimings {
        start: Duration::from_millis(100),
        build: Duration::from_millis(args.build_ms),
        other: Duration::from_millis(args.build_ms / 3),
    };
    let members = fleet::clusters(registered, timings, &phases);
    let hub_url = format!("wss://127.0.0.1:{}", settings.port);
    let agents = CancellationToken::new();
    let mut processes = vec![];
    for (i, member) in members.iter().enumerate() {
        if i < args.agent_processes {
            processes.push(
                AgentProcess::start(
                    member,
                    agent_binary,
                    &hub_url,
                    &pki.ca_file,
                    dir,
                    agents.child_token(),
                )
                .await,
            );
        } else {
            fleet::start_agent(member, &hub_url, &pki.ca_file, agents.child_token());
        }
    }
    let api = hub.api.clone();
    let connected = wait_until(
        "all agents connected",
        Duration::from_secs(300),
        async || {
            let c = api.connected().await;
            (c < n).then(|| format!("{c}/{n} connected"))
        },
    )
    .await;
    let watching = wait_until(
        "controllers watching in every cluster",
        Duration::from_secs(600),
        async || {
            let w = fleet::watching(&members, WATCHES_PER_CLUSTER);
            (w < n).then(|| format!("{w}/{n} clusters with {WATCHES_PER_CLUSTER} watches"))
        },
    )
    .await;
    figures.connect_seconds = connected.as_secs_f64();
    figures.watch_seconds = (connected + watching).as_secs_f64();
    println!(
        "connected in {:.1} s; controllers watching everywhere after {:.1} s",
        figures.connect_seconds, figures.watch_seconds
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (idle, idle_cores) = window(&hub, args.sample_seconds).await;
    figures.idle_kib = idle.rss_kib;
    figures.idle_cores = idle_cores;
    figures.agent_idle_kib = processes
        .iter()
        .map(|p| process::sample(p.pid).rss_kib)
        .max()
        .unwrap_or(0);
    println!(
        "idle: hub RSS {} ({} per cluster), CPU {:.3} cores; agent process RSS {}",
        mib(idle.rss_kib),
        per_cluster(idle.rss_kib, figures.baseline_kib, n),
        idle_cores,
        mib(figures.agent_idle_kib)
    );

    // Every cluster gets a Project and its Apps; their phase changes are relayed while the
    // hub works through all of them.
    received.measuring.store(true, Ordering::Relaxed);
    for member in &members {
        fleet::add_apps(&member.cluster, args.apps);
    }
    let expected = n * args.apps;
    // 200,000 Apps (10,000 clusters) took 875 s on two cores shared with the simulation.
    let ready_within = Duration::from_secs((expected as u64 / 100).max(900));
    let ready = wait_until("every App Ready", ready_within, async || {
        let r = fleet::ready_apps(&members);
        (r < expected).then(|| format!("{r}/{expected} Apps Ready"))
    })
    .await;
    figures.ready_seconds = ready.as_secs_f64();
    println!("{expected} Apps Ready in {:.1} s", figures.ready_seconds);
    let quiet = hub.api.until_quiet().await;
    println!("reconciles done {:.1} s later", quiet.as_secs_f64());
    received.measuring.store(false, Ordering::Relaxed);
    let mut storm = received.take_latencies("App");
    if !storm.is_empty() {
        figures.storm_p50 = percentile(&mut storm, 0.50);
        figures.storm_p99 = percentile(&mut storm, 0.99);
    }
    println!(
        "relay during the App storm: {} App phase changes: p50 {:.1} ms, p99 {:.1} ms",
        storm.len(),
        ms(figures.storm_p50),
        ms(figures.storm_p99)
    );
    let (apps, apps_cores) = window(&hub, args.sample_seconds).await;
    figures.apps_kib = apps.rss_kib;
    figures.apps_cores = apps_cores;
    println!(
        "with Apps: hub RSS {} ({} per cluster), CPU {:.3} cores",
        mib(apps.rss_kib),
        per_cluster(apps.rss_kib, figures.baseline_kib, n),
        apps_cores
    );

    // A steady rate of builds across the fleet.
    received.measuring.store(true, Ordering::Relaxed);
    let before = process::sample(hub.pid);
    let interval = Duration::from_secs_f64(1.0 / args.build_rate.max(0.01));
    let mut ticker = tokio::time::interval(interval);
    let deadline = Instant::now() + Duration::from_secs(args.build_seconds);
    let mut created = 0usize;
    let mut peak = 0u64;
    let mut agent_peak = 0u64;
    while Instant::now() < deadline {
        ticker.tick().await;
        let member = &members[rand::random_range(0..n)];
        let app = fleet::app_name(rand::random_range(0..args.apps));
        if fleet::add_build(&member.cluster, &app, &format!("build-{created}")).is_ok() {
            created += 1;
        }
        if created.is_multiple_of(10) {
            peak = peak.max(process::sample(hub.pid).rss_kib);
            agent_peak = agent_peak.max(
                processes
                    .iter()
                    .map(|p| process::sample(p.pid).rss_kib)
                    .max()
                    .unwrap_or(0),
            );
        }
    }
    let drain = wait_until(
        "every build finished",
        Duration::from_secs(300),
        async || {
            let (done, failed) = fleet::finished_builds(&members);
            (done + failed < created)
                .then(|| format!("{done} completed, {failed} failed of {created}"))
        },
    )
    .await;
    let after = process::sample(hub.pid);
    received.measuring.store(false, Ordering::Relaxed);
    let (done, failed) = fleet::finished_builds(&members);
    for (reason, (count, message)) in fleet::failure_reasons(&members) {
        println!("  failed builds: {count} {reason}, e.g. {message}");
    }
    let mut latencies = received.take_latencies("AppBuild");
    let mut health = received.take_latencies(shapeblock_loadtest::sim::HEALTH_KIND);
    figures.health_samples = health.len();
    if !health.is_empty() {
        figures.health_p50 = percentile(&mut health, 0.50);
        figures.health_p99 = percentile(&mut health, 0.99);
    }
    figures.builds = created;
    figures.builds_failed = failed;
    figures.build_cores = process::cores(&before, &after);
    figures.build_peak_kib = peak.max(after.rss_kib);
    figures.agent_busy_kib = agent_peak;
    figures.relay_samples = latencies.len();
    if !latencies.is_empty() {
        figures.relay_p50 = percentile(&mut latencies, 0.50);
        figures.relay_p99 = percentile(&mut latencies, 0.99);
        figures.relay_max = percentile(&mut latencies, 1.0);
    }
    println!(
        "builds: {created} created at {:.1}/s, {done} completed, {failed} failed (drained {:.1} s after the last); \
         hub RSS peak {}, CPU {:.3} cores; agent process RSS peak {}",
        args.build_rate,
        drain.as_secs_f64(),
        mib(figures.build_peak_kib),
        figures.build_cores,
        mib(agent_peak)
    );
    println!(
        "relay: {} App health events (Deployment rolled out -> runtime Running at the server): p50 {:.1} ms, p99 {:.1} ms",
        figures.health_samples,
        ms(figures.health_p50),
        ms(figures.health_p99)
    );
    println!(
        "relay: {} AppBuild phase changes measured: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} events, {} log lines",
        figures.relay_samples,
        ms(figures.relay_p50),
        ms(figures.relay_p99),
        ms(figures.relay_max),
        received.events.load(Ordering::Relaxed),
        received.log_lines.load(Ordering::Relaxed)
    );

    let hub = if n == args.restart_at {
        restart(
            hub,
            &settings,
            pki,
            &members,
            args.apps,
            &received,
            &mut figures,
        )
        .await
    } else {
        hub
    };
    tokio::task::spawn_blocking(move || hub.stop())
        .await
        .expect("stopping the hub");
    agents.cancel();
    drop(processes);
    figures
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn per_cluster(rss: u64, baseline: u64, n: usize) -> String {
    format!(
        "{:.0} KiB",
        rss.saturating_sub(baseline) as f64 / n.max(1) as f64
    )
}

/// Stops the hub under the fleet and starts it again: how long until every agent is back, every
/// cluster's controllers watch again, and the relay has every Project and App again.
async fn restart(
    hub: HubProcess,
    settings: &HubSettings,
    pki: &Pki,
    members: &[Member],
    apps: usize,
    received: &relay::Received,
    figures: &mut Figures,
) -> HubProcess {
    let n = members.len();
    println!("restarting the hub under {n} clusters");
    // Measured from the moment the old process is asked to stop.
    let stopped = Instant::now();
    tokio::task::spawn_blocking(move || hub.stop())
        .await
        .expect("stopping the hub");
    received.reset_seen();
    let hub = HubProcess::start(settings, pki).await;
    let expected = n * (1 + apps);
    let pid = hub.pid;
    let api = hub.api.clone();
    let (mut connected, mut watching, mut relayed) = (None, None, None);
    let within = Duration::from_secs((n as u64 / 10).max(600));
    let mut last = String::new();
    while connected.is_none() || watching.is_none() || relayed.is_none() {
        assert!(
            stopped.elapsed() < within,
            "restart not complete within {within:?}: {last}"
        );
        // Listing every cluster costs the hub CPU (10,000 at once): only until all are back.
        let c = match connected {
            None => api.connected().await,
            Some(_) => n,
        };
        let w = fleet::watching(members, WATCHES_PER_CLUSTER);
        let r = received.seen();
        last = format!("{c}/{n} connected, {w}/{n} watching, {r}/{expected} relayed");
        if connected.is_none() && c >= n {
            connected = Some(stopped.elapsed());
        }
        if watching.is_none() && w >= n {
            watching = Some(stopped.elapsed());
        }
        if relayed.is_none() && r >= expected {
            relayed = Some(stopped.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let storm = process::sample(pid);
    figures.restart = Some((
        connected.unwrap_or_default().as_secs_f64(),
        watching.unwrap_or_default().as_secs_f64(),
        relayed.unwrap_or_default().as_secs_f64(),
        storm.hwm_kib,
    ));
    tokio::time::sleep(Duration::from_secs(10)).await;
    figures.restart_settled_kib = process::sample(pid).rss_kib;
    println!(
        "restart: all {n} reconnected after {:.1} s, all watching after {:.1} s, all {expected} Projects/Apps relayed after {:.1} s; \
         peak hub RSS {} during the storm, {} 10 s later",
        connected.unwrap_or_default().as_secs_f64(),
        watching.unwrap_or_default().as_secs_f64(),
        relayed.unwrap_or_default().as_secs_f64(),
        mib(storm.hwm_kib),
        mib(figures.restart_settled_kib)
    );
    hub
}
