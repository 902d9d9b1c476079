//! `sluice-operator`: thin entry point; the work lives in the library.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sluice-operator", version, about = "Reconciles sluice InferenceModels and RateLimitPolicies")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CRDs as YAML, or write one file per CRD into a directory.
    Crds {
        /// Write `inferencemodels.yaml` and `ratelimitpolicies.yaml` here instead of stdout.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds { out_dir } => {
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
        }
    }
    Ok(())
}
