//! `tern-loadgen`: drives a broker with a workload and accounts for every
//! acknowledged message. See `tern-loadgen --help` and docs/bench/README.md.

mod adapter;
mod cli;
mod error;
mod ledger;
mod payload;
mod procfs;
mod progress;
mod report;
mod run;
mod scenario;
mod target;

use std::process::ExitCode;

use clap::Parser;

pub(crate) use error::LoadError;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERN_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(cli.threads()).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(4);
        }
    };
    match runtime.block_on(scenario::run(cli)) {
        Ok(report) => {
            if report.accounting.lost > 0 {
                eprintln!(
                    "error: {} acknowledged message(s) were never delivered (see `lost` above)",
                    report.accounting.lost
                );
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
