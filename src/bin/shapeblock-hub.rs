//! `shapeblock-hub`: runs the hub (the default), or prints the ShapeBlock CRDs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shapeblock::hub::{Hub, HubConfig, TlsFiles};
use shapeblock::telemetry::{self, LogFormat};
use tokio_util::sync::CancellationToken;

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
    /// PEM certificate chain to serve TLS with (plain HTTP when absent, e.g. behind an ingress).
    #[arg(
        long,
        env = "SHAPEBLOCK_HUB_TLS_CERT_FILE",
        requires = "tls_key_file",
        global = true
    )]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of the TLS certificate.
    #[arg(
        long,
        env = "SHAPEBLOCK_HUB_TLS_KEY_FILE",
        requires = "tls_cert_file",
        global = true
    )]
    tls_key_file: Option<PathBuf>,
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
        Command::Serve => {
            let tls = match (cli.tls_cert_file, cli.tls_key_file) {
                (Some(cert_file), Some(key_file)) => Some(TlsFiles {
                    cert_file,
                    key_file,
                }),
                _ => None,
            };
            serve(
                HubConfig {
                    listen: cli.listen,
                    tls,
                    ..HubConfig::default()
                },
                cli.log_format,
            )
        }
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
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            telemetry::shutdown_signal().await;
            stop.cancel();
        });
        hub.serve(shutdown).await;
        Ok(())
    })
}
