//! `sluice-sidecar`: thin entry point; the work is in the library.

use std::{process::ExitCode, time::Instant};

use clap::{Parser, Subcommand};
use sluice_sidecar::{
    activate::{self, ActivateArgs},
    cli::ServeArgs,
    model::{
        convert::{self, Quant},
        fetch::{self, FetchArgs},
    },
    preflight,
};
use sluice_telemetry::LogFormat;

/// The `service.name` of the sidecar's traces (unless `OTEL_SERVICE_NAME` says otherwise).
const SERVICE: &str = "sluice-sidecar";

/// The sluice data plane.
#[derive(Debug, Parser)]
#[command(name = "sluice-sidecar", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a GGUF model over the OpenAI API.
    Serve(Box<ServeArgs>),
    /// Answer for a model scaled to zero: hold requests, wake its Deployments, send the requests
    /// on to the first pod ready (the operator runs it for `autoscaling.minReplicas: 0`).
    Activate(Box<ActivateArgs>),
    /// Download a model's weights (resuming, verified) before `serve` starts: the init container.
    Fetch(Box<FetchArgs>),
    /// List the devices this build computes on (cpu, cuda) and which of them this machine has.
    Devices,
    /// Convert a GGUF model's weights to Q4_0 or Q8_0 (fast CPU kernels) and write a new file.
    Convert {
        /// Source GGUF.
        #[arg(long, env = "SLUICE_MODEL")]
        model: std::path::PathBuf,
        /// Target quantization.
        #[arg(long, value_enum)]
        to: Quant,
        /// Output file.
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    // kube's TLS (ring) and the model download's (aws-lc-rs) are both in this build, so rustls
    // cannot choose a provider on its own and the first HTTPS connection (the API server's)
    // would panic. An Err means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match run(cli, process_start) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, for humans and for pod status.
            eprintln!("sluice-sidecar: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli, process_start: Instant) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            preflight::check_cpu()?;
            let config = args.validate()?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let telemetry = sluice_telemetry::init(config.log_format, SERVICE);
                let served = sluice_sidecar::serve(config, process_start).await;
                telemetry.shutdown().await;
                served
            })?;
            Ok(())
        }
        Command::Activate(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let telemetry = sluice_telemetry::init(args.log_format, SERVICE);
                let served = activate::activate(*args).await;
                telemetry.shutdown().await;
                served
            })
        }
        Command::Fetch(args) => {
            let config = args.validate()?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let telemetry = sluice_telemetry::init(config.log_format, SERVICE);
                let fetched = fetch::fetch(&config).await;
                telemetry.shutdown().await;
                fetched
            })?;
            Ok(())
        }
        Command::Devices => {
            println!("{}", sluice_sidecar::engine::device::report());
            Ok(())
        }
        Command::Convert { model, to, out } => {
            sluice_telemetry::init(LogFormat::Text, SERVICE);
            preflight::check_gguf(&model)?;
            convert::convert(&model, &out, to)?;
            Ok(())
        }
    }
}
