//! Progress on a terminal (hidden with `--quiet` or when stderr is not one).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar (known length) or a spinner, drawn on stderr.
#[derive(Debug, Clone)]
pub(crate) struct Progress(ProgressBar);

impl Progress {
    /// A bar of `len` steps with `prefix` in front.
    pub(crate) fn bar(quiet: bool, len: u64, prefix: &str) -> Self {
        let pb = ProgressBar::with_draw_target(Some(len), target(quiet));
        pb.set_style(
            ProgressStyle::with_template("{prefix:>12.bold} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        pb.set_prefix(prefix.to_owned());
        pb.enable_steady_tick(Duration::from_millis(200));
        Self(pb)
    }

    pub(crate) fn inc(&self, n: u64) {
        self.0.inc(n);
    }

    pub(crate) fn set_position(&self, n: u64) {
        self.0.set_position(n);
    }

    pub(crate) fn set_message(&self, msg: String) {
        self.0.set_message(msg);
    }

    /// Prints a line above the bar (nothing when the bar is hidden).
    pub(crate) fn println(&self, line: &str) {
        if self.0.is_hidden() {
            return;
        }
        self.0.println(line);
    }

    /// Prints a line above the bar, or on stderr when the bar is hidden
    /// but the run is not `--quiet` (output to a file or a CI log).
    pub(crate) fn log(&self, quiet: bool, line: &str) {
        if !self.0.is_hidden() {
            self.0.println(line);
        } else if !quiet {
            eprintln!("{line}");
        }
    }

    /// Whether nothing is drawn (quiet, or stderr is not a terminal).
    pub(crate) fn is_hidden(&self) -> bool {
        self.0.is_hidden()
    }

    pub(crate) fn finish(&self) {
        self.0.finish_and_clear();
    }
}

fn target(quiet: bool) -> ProgressDrawTarget {
    if quiet || !std::io::stderr().is_terminal() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr_with_hz(5)
    }
}
