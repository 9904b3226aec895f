//! Client errors: one enum for connecting and logging in, one for sends.

use tern_protocol::ErrorCode;

/// Why connecting, registering or logging in failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No broker address was given.
    #[error("no broker address given (use --broker HOST:PORT)")]
    NoBroker,
    /// A broker address did not resolve.
    #[error("cannot resolve broker address {addr}: {reason}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The CA file could not be read or holds no certificate.
    #[error("CA certificate {path}: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The QUIC or TLS handshake failed or timed out.
    #[error("cannot reach broker {addr}: {reason}")]
    Connect {
        /// The broker.
        addr: String,
        /// Why (timeout, TLS failure, refused).
        reason: String,
    },
    /// The connection broke during the login exchange.
    #[error("connection to the broker lost: {0}")]
    ConnectionLost(String),
    /// The broker refused the request.
    #[error("broker refused: {code:?}: {message}")]
    Refused {
        /// The typed code.
        code: ErrorCode,
        /// The broker's text.
        message: String,
    },
    /// The broker sent something this client does not expect.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Bad input on this side (handle syntax, key length).
    #[error("{0}")]
    Invalid(String),
    /// A [`ClientConfig`](crate::ClientConfig) field is invalid; the text
    /// names the field.
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// The broker's error code, when the broker refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True for failures a reconnect may cure (network, broker draining).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::ConnectionLost(_) | Self::Resolve { .. } => true,
            Self::Refused { code, .. } => code.is_retryable(),
            _ => false,
        }
    }
}

/// Why a send failed. Nothing was stored unless the variant says otherwise.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The broker refused the message (unknown recipient, queue full, ...).
    #[error("send refused: {code:?}: {message}")]
    Refused {
        /// The typed code.
        code: ErrorCode,
        /// The broker's text.
        message: String,
    },
    /// No durable ack within the request timeout. The message may still be
    /// stored: resending with the same id is safe.
    #[error("no acknowledgement within {0:?}; resending with the same id is safe")]
    Timeout(std::time::Duration),
    /// The client was closed or failed for good.
    #[error("client closed: {0}")]
    Closed(String),
    /// Bad input on this side.
    #[error("{0}")]
    Invalid(String),
    /// The client is reconnecting and already holds `max` sends waiting for
    /// a broker ([`ClientConfig::max_offline_sends`](crate::ClientConfig::max_offline_sends));
    /// nothing was queued. Send again once the client is connected.
    #[error("not connected and {max} sends already wait for the reconnect; nothing was queued")]
    Backlogged {
        /// The configured maximum.
        max: usize,
    },
    /// A per-device send was made for device lists that are not current;
    /// nothing was stored. Each entry names a user's missing, extra and
    /// stale devices and its list's current version: claim keys for the
    /// new ones, encrypt again and resend.
    #[error("the device lists changed: {0:?}")]
    DevicesChanged(Vec<tern_protocol::pb::DeviceMismatch>),
    /// The body is larger than the broker accepts (`Challenge.max_body_len`);
    /// nothing was sent.
    #[error("message body of {len} bytes exceeds the broker's maximum of {max}")]
    TooLarge {
        /// The body's length.
        len: usize,
        /// The broker's maximum.
        max: usize,
    },
}

impl SendError {
    /// The broker's error code, when the broker refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}
