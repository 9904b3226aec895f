//! The Tern wire protocol, sans-IO.
//!
//! This crate owns everything two Tern endpoints must agree on and nothing that
//! touches a socket:
//!
//! - [`pb`]: the protobuf schema (`proto/tern.proto`) compiled by prost;
//! - [`codec`]: length-prefixed framing over [`bytes`], checking the length
//!   against a maximum before anything is allocated;
//! - [`auth`]: the exact bytes a device signs to log in, register or approve a
//!   new device, bound to the TLS session through an exporter value;
//! - [`handle`] and [`MessageId`]: validated identifiers;
//! - [`ErrorCode`]: the typed error codes every failure is reported with;
//! - [`shipping`]: the rule by which a broker admits entries shipped to it by
//!   another broker (gaps refused, order kept across brokers).
//!
//! Data flows one way through it: bytes from a QUIC stream go into
//! [`codec::decode`], which yields a [`pb::ClientFrame`] or [`pb::ServerFrame`];
//! frames to send go through [`codec::encode`].
#![warn(missing_docs)]

pub mod auth;
pub mod codec;
pub mod handle;
mod message_id;
pub mod shipping;

/// Generated protobuf types for `tern.v1` (see `proto/tern.proto`).
#[allow(missing_docs, clippy::all, unreachable_pub, missing_debug_implementations)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/tern.v1.rs"));
}

/// Generated protobuf types for `tern.peer.v1`, the broker-to-broker protocol
/// (see `proto/peer.proto`).
#[allow(missing_docs, clippy::all, unreachable_pub, missing_debug_implementations)]
pub mod peer {
    include!(concat!(env!("OUT_DIR"), "/tern.peer.v1.rs"));
}

pub use codec::{
    decode, decode_client_frame, decode_peer_frame, decode_server_frame, encode, DecodeError, EncodeError,
    MAX_ENVELOPES, MAX_LISTED_DEVICES, MAX_PUBLISHED_KEYS, MAX_REDIRECT_BROKERS, MAX_SHIP_ENTRIES,
};
pub use handle::{validate_handle, HandleError};
pub use message_id::{MessageId, MessageIdError};
pub use pb::ErrorCode;

/// ALPN protocol identifier for client connections.
pub const ALPN: &[u8] = b"tern/1";

/// ALPN protocol identifier for broker-to-broker links (mutual TLS under the
/// cluster CA).
pub const ALPN_PEER: &[u8] = b"tern-peer/1";

/// Protocol version spoken by this crate (`Hello.version`, `Challenge.version`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Default maximum frame length in bytes (length prefix excluded).
pub const DEFAULT_MAX_FRAME_LEN: usize = 256 * 1024;

/// Default maximum `Send.body` length in bytes.
pub const DEFAULT_MAX_BODY_LEN: usize = 128 * 1024;

/// Room a frame needs beyond its body for the other fields of a `Send` or
/// `Deliver` (ids, handles, timestamps, protobuf tags).
pub const FRAME_OVERHEAD: usize = 1024;

impl ErrorCode {
    /// True when the broker closes the connection after sending this error:
    /// the byte stream can no longer be trusted.
    pub fn is_connection_fatal(self) -> bool {
        matches!(self, Self::MalformedFrame | Self::FrameTooLarge | Self::UnknownFrame | Self::ProtocolViolation)
    }

    /// True when retrying the same request later may succeed. Resend with
    /// the same message id: it is never stored twice. (`tern-client` retries
    /// `SHUTTING_DOWN` itself after reconnecting and returns the others.)
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::QueueFull
                | Self::StorageFull
                | Self::StorageError
                | Self::ShuttingDown
                | Self::RateLimited
                | Self::MeshUnavailable
                | Self::Internal
        )
    }
}

impl pb::ServerFrame {
    /// An error answer to request `request_id` (zero: a connection-level error).
    pub fn error(request_id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            request_id,
            kind: Some(pb::server_frame::Kind::Error(pb::Error {
                code: code as i32,
                message: message.into(),
                retry_after_ms: 0,
                devices: Vec::new(),
            })),
        }
    }
}
