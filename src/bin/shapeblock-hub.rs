//! `shapeblock-hub`: runs the hub (the default), or prints the ShapeBlock CRDs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shapeblock::hub::{Hub, HubConfig};
use shapeblock::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "shapeblock-hub",
    version,
    about = "ShapeBlock hub: reconciles every managed cluster through agent tunnels"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address the HTTP API listens on.
    #[arg(
        long,
        env = "SHAPEBLOCK_HUB_LISTEN",
        default_value = "127.0.0.1:8080",
        global = true
    )]
    listen: SocketAddr,
    /// Log format.
    #[arg(long, env = "SHAPEBLOCK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub (the default when no command is given).
    Serve,
    /// Print the ShapeBlock CRDs as YAML, or write one file per CRD into a directory.
    Crds {
        /// Directory to write `<crd-name>.yaml` files into; prints to stdout when absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Crds { out } => print_crds(out),
        Command::Serve => serve(HubConfig { listen: cli.listen }, cli.log_format),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("shapeblock-hub: {err}");
            ExitCode::FAILURE
        }
    }
}

fn print_crds(out: Option<PathBuf>) -> Result<(), Box<dyn std::error::Error>> {
    let crds = shapeblock::crd::all();
    match out {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            for crd in &crds {
                let path = dir.join(shapeblock::crd::file_name(crd));
                std::fs::write(&path, shapeblock::crd::to_yaml(crd)?)?;
                eprintln!("wrote {}", path.display());
            }
        }
        None => {
            for crd in &crds {
                print!("---\n{}", shapeblock::crd::to_yaml(crd)?);
            }
        }
    }
    Ok(())
}

fn serve(config: HubConfig, log_format: LogFormat) -> Result<(), Box<dyn std::error::Error>> {
    telemetry::init(log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let hub = Hub::bind(&config).await?;
        hub.serve(shutdown_signal()).await?;
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM so the hub stops accepting and drains in-flight requests.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::warn!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
