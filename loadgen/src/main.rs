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
    let filter = match log_filter(std::env::var("TERN_LOG")) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(cli.threads()).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(4);
        }
    };
    match runtime.block_on(scenario::run(cli)) {
        Ok(report) => match report.failure() {
            Some(why) => {
                eprintln!("error: {why}");
                ExitCode::from(1)
            }
            None => ExitCode::SUCCESS,
        },
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The log filter from `TERN_LOG` (`warn` when unset). A value that does
/// not parse is an error naming the variable, not a silent `warn`.
fn log_filter(var: Result<String, std::env::VarError>) -> Result<tracing_subscriber::EnvFilter, String> {
    let text = match var {
        Ok(text) => text,
        Err(std::env::VarError::NotPresent) => return Ok("warn".into()),
        Err(std::env::VarError::NotUnicode(_)) => return Err("TERN_LOG: not valid UTF-8".into()),
    };
    tracing_subscriber::EnvFilter::try_new(&text)
        .map_err(|e| format!("TERN_LOG={text:?} is not a log filter ({e}); examples: `warn`, `info,tern_client=debug`"))
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use std::env::VarError;

    #[test]
    fn a_bad_tern_log_is_an_error_naming_it() {
        let e = log_filter(Ok("tern_loadgen=loud".into())).unwrap_err();
        assert!(e.contains("TERN_LOG") && e.contains("tern_loadgen=loud"), "{e}");
        assert_eq!(log_filter(Err(VarError::NotPresent)).unwrap().to_string(), "warn");
        assert!(log_filter(Ok("info,tern_client=debug".into())).is_ok());
    }
}
