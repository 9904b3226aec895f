//! The workloads. Each returns a [`Report`]; `run` prints and writes it.

use crate::cli::{Cli, Scenario};
use crate::report::Report;
use crate::LoadError;

mod chaos;
mod chat;
mod connections;
mod keys;
mod max;
mod offline;
mod storm;

/// Runs the scenario `cli` names, prints the summary and writes the JSON.
pub(crate) async fn run(cli: Cli) -> Result<Report, LoadError> {
    let (quiet, json) = cli.output();
    let report = match cli.scenario {
        Scenario::Chat(a) => chat::run(a).await?,
        Scenario::Max(a) => max::run(a).await?,
        Scenario::Offline(a) => offline::run(a).await?,
        Scenario::Connections(a) => connections::run(a).await?,
        Scenario::Storm(a) => storm::run(a).await?,
        Scenario::Keys(a) => keys::run(a).await?,
        Scenario::Chaos(a) => chaos::run(a).await?,
    };
    if !quiet {
        eprint!("{}", report.table());
    }
    if let Some(path) = json {
        report.write_json(&path)?;
    }
    Ok(report)
}

/// Checks a seconds flag.
pub(crate) fn positive(name: &str, v: f64) -> Result<f64, LoadError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(LoadError::Args(format!("--{name} must be a positive number, not {v}")))
    }
}
