//! Errors of the end-to-end layer: [`E2eError`] for opening, saving, key
//! checks and encrypting; [`DecryptError`] for decrypting a peer's message,
//! whose causes a caller branches on (drop, ask for recovery, warn).

use std::path::PathBuf;

/// Why opening or saving the state, checking claimed keys or encrypting
/// failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum E2eError {
    /// A file or directory of the state could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// `e2e.key` is not 64 hex digits.
    #[error("{0}: not a key (expected 64 hex digits)")]
    BadKeyFile(PathBuf),
    /// `e2e.state` exists but `e2e.key` does not: the state cannot be
    /// decrypted, and making a new account would silently replace it.
    #[error("{0} exists but its key file is missing")]
    MissingKey(PathBuf),
    /// `e2e.state` does not decrypt under the key or does not parse.
    #[error("{path} is corrupt: {reason}")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The state could not be serialised for saving.
    #[error("cannot serialise the end-to-end state: {0}")]
    Serialize(String),
    /// Claimed keys lack identity keys or a one-time key.
    #[error("claimed keys of {handle} device {device}: no {what}")]
    MissingKeys {
        /// The peer's handle.
        handle: String,
        /// The peer's device.
        device: u32,
        /// What is missing.
        what: &'static str,
    },
    /// A key in claimed keys has the wrong length or is not a valid key.
    #[error("claimed keys of {handle} device {device}: bad {what}")]
    BadKey {
        /// The peer's handle.
        handle: String,
        /// The peer's device.
        device: u32,
        /// Which key.
        what: &'static str,
    },
    /// A signature in claimed keys does not verify.
    #[error("claimed keys of {handle} device {device}: bad signature on the {what}")]
    BadSignature {
        /// The peer's handle.
        handle: String,
        /// The peer's device.
        device: u32,
        /// Which signature: "identity keys" or "one-time key".
        what: &'static str,
    },
    /// Keys given to `encrypt` are for another handle or device.
    #[error("keys are for {got_handle} device {got_device}, not {handle} device {device}")]
    WrongPeer {
        /// The peer encrypted to.
        handle: String,
        /// Its device.
        device: u32,
        /// The handle the keys are for.
        got_handle: String,
        /// The device the keys are for.
        got_device: u32,
    },
    /// No session with the peer device and no claimed keys to start one.
    #[error("no session with {handle} device {device}: claim its keys first")]
    NoSession {
        /// The peer's handle.
        handle: String,
        /// The peer's device.
        device: u32,
    },
    /// vodozemac refused to start a session with the claimed keys.
    #[error("cannot start a session: {0}")]
    Session(#[from] vodozemac::olm::SessionCreationError),
    /// vodozemac refused to encrypt.
    #[error("cannot encrypt: {0}")]
    Encrypt(#[from] vodozemac::olm::EncryptionError),
}

/// Why a peer's message could not be decrypted. The state is unchanged by
/// a failure (vodozemac commits a ratchet step only when it decrypts).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecryptError {
    /// The body is not an `OlmEnvelope`, or its Olm message does not parse.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// The envelope's version is not 1.
    #[error("unsupported envelope version {0}")]
    UnsupportedVersion(u32),
    /// A normal message that no session with the sender decrypts (the
    /// session was lost or is out of step): ask for recovery.
    #[error("no session with {handle} device {device} decrypts this message")]
    UnknownSession {
        /// The sender.
        handle: String,
        /// Its device.
        device: u32,
    },
    /// A pre-key message without `sender_identity`.
    #[error("pre-key message from {handle} device {device} without sender identity")]
    MissingIdentity {
        /// The sender.
        handle: String,
        /// Its device.
        device: u32,
    },
    /// `sender_identity` is not signed by the sender device's login key, or
    /// does not match the keys of the pre-key message.
    #[error("bad sender identity from {handle} device {device}: {reason}")]
    BadIdentity {
        /// The sender.
        handle: String,
        /// Its device.
        device: u32,
        /// What did not match.
        reason: &'static str,
    },
    /// The pre-key message names a one-time key this account does not have
    /// (never had, or already used: a replayed or reused key).
    #[error("pre-key message from {handle} device {device} uses an unknown or used one-time key")]
    UnknownOneTimeKey {
        /// The sender.
        handle: String,
        /// Its device.
        device: u32,
    },
    /// vodozemac could not start a session from the pre-key message.
    #[error("cannot start a session: {0}")]
    Session(vodozemac::olm::SessionCreationError),
    /// The session the message belongs to could not decrypt it (tampered,
    /// replayed, or too far out of order).
    #[error("cannot decrypt: {0}")]
    Olm(#[from] vodozemac::olm::DecryptionError),
    /// The plaintext is not an `E2ePayload`.
    #[error("decrypted payload does not parse: {0}")]
    BadPayload(String),
}
