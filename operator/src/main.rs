//! `sluice-operator`: thin entry point; the work lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use sluice_operator::app::{self, LeaseConfig, RunConfig};
use sluice_operator::desired::Settings;
use sluice_telemetry::LogFormat;

const DEFAULT_SIDECAR_IMAGE: &str = concat!(
    "ghcr.io/sluice-dev/sluice-sidecar:",
    env!("CARGO_PKG_VERSION")
);
const DEFAULT_SIDECAR_CUDA_IMAGE: &str = concat!(
    "ghcr.io/sluice-dev/sluice-sidecar-cuda:",
    env!("CARGO_PKG_VERSION")
);

#[derive(Parser)]
#[command(
    name = "sluice-operator",
    version,
    about = "Reconciles sluice InferenceModels and RateLimitPolicies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (in a cluster, or against the current kubeconfig).
    Run(RunArgs),
    /// Print, as YAML, every object the operator would apply for the InferenceModels in FILEs.
    Render {
        /// YAML files with InferenceModels, and the RateLimitPolicies and API-key Secrets their
        /// limits come from (other kinds are ignored); `-` reads stdin.
        #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Namespace for models that name none.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        images: ImageArgs,
    },
    /// Print the CRDs as YAML, or write one file per CRD into a directory.
    Crds {
        /// Write `inferencemodels.yaml` and `ratelimitpolicies.yaml` here instead of stdout.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ImageArgs {
    /// Sidecar image for CPU variants.
    #[arg(long, env = "SLUICE_SIDECAR_IMAGE", default_value = DEFAULT_SIDECAR_IMAGE)]
    sidecar_image: String,
    /// Sidecar image for variants with `gpu.count > 0`.
    #[arg(long, env = "SLUICE_SIDECAR_CUDA_IMAGE", default_value = DEFAULT_SIDECAR_CUDA_IMAGE)]
    sidecar_cuda_image: String,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    images: ImageArgs,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, env = "SLUICE_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    admin_listen: SocketAddr,
    /// Compete for a Lease so only one replica writes.
    #[arg(long, env = "SLUICE_LEADER_ELECTION")]
    leader_election: bool,
    /// The Lease's name (in POD_NAMESPACE).
    #[arg(long, env = "SLUICE_LEASE_NAME", default_value = "sluice-operator")]
    lease_name: String,
    /// Namespace of the Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
    /// This replica's name: Lease holder and Events' reporting instance.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// At most this many reconciles run at once (InferenceModels; RateLimitPolicies likewise);
    /// 0 is unbounded. Bounds memory and API-server load on a cold start with many models, when
    /// every model is queued at once and each reconcile holds what it listed and its desired
    /// state until it is done.
    #[arg(
        long,
        env = "SLUICE_RECONCILE_CONCURRENCY",
        default_value_t = sluice_operator::controller::DEFAULT_RECONCILE_CONCURRENCY
    )]
    reconcile_concurrency: u16,
    /// Log format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
}

impl ImageArgs {
    fn settings(self) -> Settings {
        Settings {
            sidecar_image: self.sidecar_image,
            sidecar_cuda_image: self.sidecar_cuda_image,
            tracing_env: sluice_telemetry::passed_on(),
        }
    }
}

fn main() -> ExitCode {
    // kube's TLS (ring) and the model download's (aws-lc-rs) are both in this build, so rustls
    // cannot choose a provider on its own and the first HTTPS connection (the API server's)
    // would panic. An Err means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match Cli::parse().command {
        Command::Run(args) => run(args),
        Command::Render {
            files,
            namespace,
            images,
        } => render(&files, &namespace, &images.settings()),
        Command::Crds { out_dir } => crds(out_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, for humans and for the pod's termination message.
            eprintln!("sluice-operator: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each cause once: kube's errors repeat their source's
/// text in their own, which `{:#}` would print three or four times over.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let instance = args
        .pod_name
        .clone()
        .unwrap_or_else(|| "sluice-operator".to_owned());
    let leader_election = if args.leader_election {
        let namespace = args
            .pod_namespace
            .clone()
            .context("--leader-election needs the operator's namespace: set POD_NAMESPACE (or --pod-namespace)")?;
        anyhow::ensure!(
            args.pod_name.is_some(),
            "--leader-election needs a unique holder name: set POD_NAME (or --pod-name)"
        );
        Some(LeaseConfig {
            namespace,
            name: args.lease_name.clone(),
        })
    } else {
        None
    };
    let config = RunConfig {
        settings: args.images.settings(),
        admin_listen: args.admin_listen,
        leader_election,
        instance,
        reconcile_concurrency: args.reconcile_concurrency,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let telemetry = sluice_telemetry::init(args.log_format, "sluice-operator");
        let ran = app::run(config).await;
        telemetry.shutdown().await;
        ran
    })?;
    Ok(())
}

fn render(files: &[PathBuf], namespace: &str, settings: &Settings) -> anyhow::Result<()> {
    // Every file first: a policy or Secret may come after the models it applies to.
    let mut inputs = Vec::new();
    let mut all = sluice_operator::Manifests::default();
    for file in files {
        let text = if file.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading stdin")?
        } else {
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
        };
        let manifests = sluice_operator::manifests_from_yaml(&text)
            .with_context(|| format!("parsing {}", file.display()))?;
        all.policies.extend(manifests.policies);
        all.secrets.extend(manifests.secrets);
        inputs.push((file, manifests.models));
    }
    // Every model of every file is in the namespace the others render for (one endpoint for
    // all models).
    let every_model: Vec<_> = inputs.iter().flat_map(|(_, m)| m.iter().cloned()).collect();
    let mut out = String::new();
    for (file, models) in inputs {
        for model in models {
            let name = model.metadata.name.as_deref().unwrap_or("<unnamed>");
            let desired = sluice_operator::controller::render(
                &model,
                namespace,
                settings,
                &all.policies,
                &all.secrets,
                &every_model,
            )
            .with_context(|| format!("{}: InferenceModel {name}", file.display()))?;
            let ns = model.metadata.namespace.as_deref().unwrap_or(namespace);
            // Its value is random and made once, in the cluster: never rendered.
            out.push_str(&format!(
                "# Secret {ns}/{} (entry `{}`, mounted by every variant) is created by the \
                 operator with a random token; not rendered.\n",
                sluice_operator::names::forwarding_secret_name(name),
                sluice_operator::names::FORWARDING_KEY,
            ));
            out.push_str(&desired.to_yaml()?);
        }
    }
    print!("{out}");
    Ok(())
}

fn crds(out_dir: Option<PathBuf>) -> anyhow::Result<()> {
    for (file, crd) in sluice_crds::crds() {
        let yaml = sluice_crds::crd_yaml(&crd)?;
        match &out_dir {
            Some(dir) => {
                let path = dir.join(file);
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            None => print!("---\n{yaml}"),
        }
    }
    Ok(())
}
