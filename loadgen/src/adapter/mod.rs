//! One interface over the brokers a workload can run against. An [`Adapter`]
//! knows how to make a user known to its broker (so messages to it are kept
//! while it is offline) and how to connect a user; a [`Connection`] sends
//! with a durable acknowledgement and feeds what it receives into the
//! [`Ledger`], acknowledging it to its broker the way that broker expects.
//!
//! Each user is one device / session / consumer named after the run id, so
//! runs against a long-lived broker do not collide:
//!
//! | target | user `i` | a send to user `i` | durable ack |
//! |---|---|---|---|
//! | `tern://` | handle `lg-RUN-i`, one device | `Send` to that handle | `SendAck` (after the broker's WAL sync, by default) |
//! | `nats://` | durable pull consumer `lg-RUN-i` on stream `TERNLG_RUN` | JetStream publish to `tern.lg.RUN.i` | the stream's `PubAck` |
//! | `mqtt://` | client id `lg-RUN-i`, persistent session (clean session off) | QoS 1 publish to `tern/lg/RUN/i` | `PUBACK` |
//!
//! With several targets (a Tern mesh, a NATS cluster) user `i` connects to
//! target `i % n` ([`Targets::of_user`]); run-wide set-up (the NATS stream)
//! goes through the first. MQTT takes one target.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::ledger::Ledger;
use crate::target::{Scheme, Targets};
use crate::LoadError;

mod mqtt;
mod nats;
mod tern;

pub(crate) use tern::TernAdapter;

/// Resolves when the broker has acknowledged a send as durable (its own
/// definition of durable; see the table above).
pub(crate) type AckFuture = Pin<Box<dyn Future<Output = Result<(), SendFailure>> + Send>>;

/// Why a send failed, by kind (the key in the report's `errors`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {detail}")]
pub(crate) struct SendFailure {
    /// Short stable name: `Timeout`, `QueueFull`, `Closed`, ...
    pub(crate) kind: String,
    pub(crate) detail: String,
}

impl SendFailure {
    pub(crate) fn new(kind: impl Into<String>, detail: impl std::fmt::Display) -> Self {
        Self { kind: kind.into(), detail: detail.to_string() }
    }
}

/// Settings every adapter uses.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// PEM files to trust (Tern; NATS/MQTT over TLS are not supported):
    /// none, one for every target, or one per target in order.
    pub(crate) ca: Vec<PathBuf>,
    /// Distinguishes this run's users, subjects and topics from other runs'.
    pub(crate) run_id: String,
    /// How long to wait for one durable ack.
    pub(crate) request_timeout: Duration,
    /// How long to wait for one connection to be established.
    pub(crate) connect_timeout: Duration,
    /// UDP sockets shared by all Tern connections (spread round-robin).
    pub(crate) endpoints: usize,
    /// Idle timeout for connections (keep-alives go at a third of it).
    pub(crate) idle_timeout: Duration,
    /// Tern: each user's client lists every target (its own first) and
    /// moves to the next when its broker fails; otherwise only its own.
    pub(crate) failover: bool,
    /// Tern: after a connection loss, go on to the next broker of the list
    /// instead of the one the user was at (`ClientConfig::reconnect_to_last`
    /// off).
    pub(crate) move_on_reconnect: bool,
    /// Tern: ask for a delivered receipt of each message.
    pub(crate) receipts: bool,
    /// Tern: devices per user (1: one client per user, as always).
    pub(crate) devices: u32,
    /// Tern: messages encrypted end to end (`tern_client::secure`).
    pub(crate) e2e: bool,
}

/// A broker the workload runs against.
#[async_trait]
pub(crate) trait Adapter: Send + Sync {
    /// Makes user `user` known so that messages to it are kept while it is
    /// offline (registers it, creates its consumer or persistent session).
    /// `connect` does this itself for a user not prepared yet.
    async fn prepare(&self, user: u32) -> Result<(), LoadError>;

    /// Connects user `user`: from now on its deliveries go to `ledger`.
    async fn connect(&self, user: u32, ledger: Arc<Ledger>) -> Result<Box<dyn Connection>, LoadError>;

    /// Removes what the run created on the broker, where that is possible.
    async fn cleanup(&self) {}

    /// The Tern adapter, for scenarios that use the client directly (`keys`).
    fn tern(&self) -> Option<&TernAdapter> {
        None
    }
}

/// One connected user.
#[async_trait]
pub(crate) trait Connection: Send + Sync {
    /// Queues a message to user `to`. Messages submitted one after another
    /// from one task are sent in that order; the returned future resolves
    /// on the durable ack.
    async fn submit(&self, to: u32, body: Bytes) -> Result<AckFuture, SendFailure>;

    /// A round trip to the broker: proves the connection is served.
    async fn ping(&self) -> Result<(), SendFailure>;

    /// Closes the connection (the user goes offline; its queue stays) and
    /// stops its receive task. Later calls on it fail.
    async fn close(&self);
}

/// The user name for index `i` in run `run_id`.
pub(crate) fn user_name(run_id: &str, i: u32) -> String {
    format!("lg-{run_id}-{i}")
}

/// Opens the adapter for `targets`, checking that every broker answers.
pub(crate) async fn open(targets: &Targets, opts: &Options, users: u32) -> Result<Arc<dyn Adapter>, LoadError> {
    Ok(match targets.scheme() {
        Scheme::Tern => Arc::new(tern::TernAdapter::open(targets, opts, users).await?),
        Scheme::Nats => Arc::new(nats::NatsAdapter::open(targets, opts, users).await?),
        Scheme::Mqtt => match targets.all() {
            [target] => Arc::new(mqtt::MqttAdapter::open(target, opts, users).await?),
            all => {
                return Err(LoadError::Args(format!(
                    "mqtt:// takes one --target (the MQTT adapter loads a single broker), not {}: {targets}",
                    all.len()
                )))
            }
        },
    })
}
