//! What stops a run, with what to do about it.

/// A run could not start or continue. Exit codes: see [`LoadError::exit_code`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    /// A flag or combination of flags makes no sense.
    #[error("bad arguments: {0}")]
    Args(String),
    /// The broker did not answer.
    #[error("cannot reach {target}: {reason}\nhint: {hint}")]
    Unreachable { target: String, reason: String, hint: String },
    /// The broker answered but refused to set up a user, stream or session.
    #[error("setting up {what} on {target} failed: {reason}")]
    Setup { target: String, what: String, reason: String },
    /// Reading /proc or writing the report failed.
    #[error("{0}")]
    Io(String),
    /// SIGINT or SIGTERM arrived (what the run had started is stopped).
    #[error("interrupted by {0}")]
    Interrupted(&'static str),
}

impl LoadError {
    /// 2: bad arguments; 3: broker unreachable; 4: set-up refused or I/O;
    /// 130: interrupted. (1 is a run that lost acknowledged messages.)
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            Self::Args(_) => 2,
            Self::Unreachable { .. } => 3,
            Self::Setup { .. } | Self::Io(_) => 4,
            Self::Interrupted(_) => 130,
        }
    }
}
