//! The `mirrorlet` binary: the node agent (`run`), containerd mirror configuration
//! (`configure`, `cleanup`), the chart's uninstall wait (`wait-daemonset`), a running
//! agent's status (`status`), pulling images ahead of need (`preheat`) and `version`.
//! It only assembles the library crates.

mod cli;
mod health;
mod hosts;
mod kube;
mod memory;
mod preheat;
mod run;
mod status;
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
        Command::WaitDaemonset(args) => small_runtime().and_then(|rt| rt.block_on(wait(args))),
        Command::Status(args) => small_runtime().and_then(|rt| rt.block_on(status::print(&args))),
        Command::Preheat(args) => small_runtime().and_then(|rt| {
            rt.block_on(async {
                if !args.hold {
                    return preheat::run(&args).await;
                }
                // Held (beside the agent, as PID 1 of its container): SIGTERM ends it at
                // any point, and a failure is logged while the pod stays.
                let stop = terminated();
                tokio::pin!(stop);
                tokio::select! {
                    result = preheat::run(&args) => {
                        if let Err(e) = &result {
                            tracing::error!("{e:#}");
                        }
                        tracing::info!("preheat done; holding until terminated");
                    }
                    r = &mut stop => return r,
                }
                stop.await
            })
        }),
        Command::Configure(args) => {
            report(hosts::configure(&args.options()), "configured").map(drop)
        }
        Command::Cleanup(args) => report(hosts::cleanup(&args.config_path), "restored")
            .map(|done| {
                if done == 0 {
                    tracing::info!(config_path = %args.config_path.display(), "nothing to restore");
                }
            })
            .and_then(|()| {
                if !args.hold {
                    return Ok(());
                }
                tracing::info!("restored; holding until terminated");
                small_runtime().and_then(|rt| rt.block_on(terminated()))
            }),
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

/// Logs each path `configure` or `cleanup` handled and each failure (with its causes);
/// an error naming how many failed if any did. Returns how many were handled.
fn report(
    result: Result<Vec<std::path::PathBuf>, hosts::Failed>,
    did: &'static str,
) -> anyhow::Result<usize> {
    let (done, errors) = match result {
        Ok(done) => (done, Vec::new()),
        Err(failed) => (failed.done, failed.errors),
    };
    for path in &done {
        tracing::info!(path = %path.display(), "{did}");
    }
    let failed = errors.len();
    for e in errors {
        tracing::error!("{:#}", anyhow::Error::from(e));
    }
    if failed > 0 {
        anyhow::bail!("{failed} registry directories could not be {did} (each logged above)");
    }
    Ok(done.len())
}

fn small_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Returns on SIGTERM or SIGINT.
async fn terminated() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

async fn wait(args: cli::WaitDaemonsetArgs) -> anyhow::Result<()> {
    let config = kube::ApiConfig {
        server: args.api_server,
        service_account_dir: args.service_account_dir,
    };
    let namespace = match args.namespace {
        ns if ns.is_empty() => config.own_namespace()?,
        ns => ns,
    };
    let api = kube::Api::new(&config)?;
    let poll = std::time::Duration::from_secs(2);
    kube::wait_daemonset(&api, &namespace, &args.daemonset, args.timeout, poll).await?;
    tracing::info!(daemonset = %args.daemonset, %namespace, "done on every node");
    Ok(())
}
