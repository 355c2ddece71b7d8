//! The `mirrorlet` binary: the node agent (`run`), containerd mirror configuration
//! (`configure`, `cleanup`) and `version`. It only assembles the library crates.

mod cli;
mod health;
mod hosts;
mod run;
mod telemetry;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, &cli.log_level);
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run::run(*args))),
        Command::Configure(args) => hosts::configure(&args.options())
            .map(|files| {
                for f in files {
                    tracing::info!(file = %f.display(), "configured");
                }
            })
            .map_err(anyhow::Error::from),
        Command::Cleanup(args) => hosts::cleanup(&args.config_path)
            .map(|dirs| {
                for d in &dirs {
                    tracing::info!(dir = %d.display(), "restored");
                }
                if dirs.is_empty() {
                    tracing::info!(config_path = %args.config_path.display(), "nothing to restore");
                }
            })
            .map_err(anyhow::Error::from),
        Command::Version => {
            println!("mirrorlet {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
