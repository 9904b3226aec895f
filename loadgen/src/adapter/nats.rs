//! NATS JetStream through `async-nats`. [`NatsAdapter::open`] checks every
//! target answers, keeps one admin connection to the first, checks
//! JetStream is enabled and creates the run's stream `TERNLG_RUN` over the
//! subjects `tern.lg.RUN.>` through it; each user is a durable pull
//! consumer `lg-RUN-i` filtered on `tern.lg.RUN.i`, and each connected user
//! has its own NATS connection, as a chat app's device would, to target
//! `i % n` (the servers of one cluster: the stream has one replica, on
//! the server JetStream places it, and the cluster routes the rest).
//! There is no pool: a connection costs the load generator about 50 KB (a
//! socket, two tasks, a 16 KiB read buffer; 2000 users ran in 110 MB), and
//! nats-server about 75 KB with its consumer.
//!
//! A send is a JetStream publish to the recipient's subject; its ack is the
//! stream's `PubAck`. A connection's receive task pulls from the user's
//! consumer in batches of [`PULL_BATCH`], hands each message's payload to
//! the [`Ledger`] and acks it.
//!
//! Choices that bear on a comparison with Tern:
//!
//! - The stream has `WorkQueue` retention, so a message is deleted once its
//!   recipient acks it (as Tern deletes a queue entry on ack) and is kept
//!   while the recipient has no consumer yet. Work-queue streams require
//!   `AckPolicy::Explicit`, so every delivery is acked on its own (the acks
//!   are pipelined, not awaited), where Tern acks cumulatively every 64
//!   deliveries or after 5 ms idle. `AckPolicy::All` would need a `Limits`
//!   stream (nothing ever deleted) or an `Interest` one (a message sent
//!   before its recipient's consumer exists is dropped), and a later ack
//!   would also ack messages a closed connection never read: so it is not
//!   offered.
//! - A consumer has at most 512 deliveries unacked, Tern's default push
//!   window (`limits.max_inflight`). Publishes are not windowed: Tern's
//!   broker stops reading a connection with 256 sends awaiting their ack
//!   (`limits.max_pending_sends`); nats-server has no such limit.
//! - Storage is `file` unless the environment variable
//!   `TERN_LOADGEN_NATS_STORAGE=memory` (values `file`, `memory`) says
//!   otherwise. How durable a `PubAck` is with file storage is the server's
//!   setting: JetStream writes each message before acking it but fsyncs
//!   only every `sync_interval` (2 min by default; `sync_interval: always`
//!   in the server config fsyncs before every ack, like Tern's default).
//! - Connections reconnect on their own (`async-nats`' default, as
//!   `tern-client` does); a send in flight across a reconnect may time out.
//! - A connection checks that its first pull request reached the consumer
//!   and pulls again if not ([`NatsAdapter::start_pull`]): in a cluster,
//!   nats-server sometimes drops the first pull request of a connection to
//!   a server other than the consumer's, and the user's messages would wait
//!   for the request's expiry (30 s).
//! - Messages the server pushed towards a connection that closes before
//!   reading them are redelivered after the consumer's `AckWait` (30 s):
//!   they show as reordered, or as lost if the drain is shorter than that.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::context::{CreateStreamErrorKind, PublishError, PublishErrorKind};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, Context};
use async_nats::{Client, ConnectOptions};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{user_name, AckFuture, Adapter, Connection, Options, SendFailure};
use crate::ledger::Ledger;
use crate::target::{Target, Targets};
use crate::LoadError;

/// Environment variable choosing the stream's storage: `file` (default) or `memory`.
const STORAGE_ENV: &str = "TERN_LOADGEN_NATS_STORAGE";
/// Messages asked for by one pull request (the next is sent at half).
const PULL_BATCH: usize = 512;
/// Deliveries a consumer may have pushed and not acked: Tern's default
/// `limits.max_inflight`.
const MAX_ACK_PENDING: i64 = 512;
/// Publishes a connection may have waiting for their `PubAck`; more fail
/// as `QueueFull`. Only a ceiling: the scenarios bound what is in flight.
/// (Waiting for room instead would deadlock: `async-nats` frees a place
/// only when the `PubAck` future is polled, and a sender task polls its
/// acks only between submits.)
const MAX_ACK_INFLIGHT: usize = 1 << 20;
/// How long a started pull may take to show at its consumer.
const PULL_CHECK: Duration = Duration::from_millis(500);
/// Pulls started for one user before its set-up fails.
const PULL_ATTEMPTS: u32 = 5;
/// Read buffer of each user's connection.
const READ_BUFFER: u16 = 16 * 1024;

#[derive(Debug)]
pub(crate) struct NatsAdapter {
    targets: Targets,
    /// `nats://HOST:PORT` of each target: user `i` dials the `i % n`-th.
    urls: Vec<String>,
    run_id: String,
    stream: String,
    storage: StorageType,
    /// One consumer each.
    users: u32,
    opts: Options,
    /// The admin connection: creates the stream and consumers.
    js: Context,
}

impl NatsAdapter {
    pub(crate) async fn open(targets: &Targets, opts: &Options, users: u32) -> Result<Self, LoadError> {
        let storage = storage_from(std::env::var(STORAGE_ENV).ok().as_deref()).map_err(LoadError::Args)?;
        let urls: Vec<String> = targets.all().iter().map(|t| format!("nats://{}", t.addr)).collect();
        let mut admin = None;
        // Every server must answer; the first one's connection stays as the admin.
        for (target, url) in targets.all().iter().zip(&urls) {
            let client =
                dial(url, &format!("lg-{}-admin", opts.run_id), opts).await.map_err(|e| unreachable(target, e))?;
            if admin.is_none() {
                admin = Some(client);
            } else {
                let _ = client.drain().await;
            }
        }
        let client = admin.ok_or_else(|| LoadError::Args("no --target given".into()))?;
        let js = context(client, opts);
        let adapter = Self {
            targets: targets.clone(),
            urls,
            run_id: token(&opts.run_id),
            stream: stream_name(&opts.run_id),
            storage,
            users,
            opts: opts.clone(),
            js,
        };
        adapter.create_stream().await?;
        Ok(adapter)
    }

    /// A set-up failure at `target` (the first for run-wide set-up).
    fn setup_error_at(&self, target: &Target, what: impl Into<String>, reason: impl std::fmt::Display) -> LoadError {
        LoadError::Setup { target: target.to_string(), what: what.into(), reason: reason.to_string() }
    }

    fn setup_error(&self, what: impl Into<String>, reason: impl std::fmt::Display) -> LoadError {
        self.setup_error_at(self.targets.first(), what, reason)
    }

    /// Creates the run's stream; a server without JetStream is named as such.
    async fn create_stream(&self) -> Result<(), LoadError> {
        let config = stream::Config {
            name: self.stream.clone(),
            subjects: vec![format!("tern.lg.{}.>", self.run_id)],
            retention: RetentionPolicy::WorkQueue,
            storage: self.storage,
            // One consumer per user. Stated, because nats-server 2.15 caps a
            // stream that states no limit at 1000 consumers.
            max_consumers: i32::try_from(self.users).unwrap_or(i32::MAX).max(1),
            ..Default::default()
        };
        match self.js.create_stream(config).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == CreateStreamErrorKind::JetStreamUnavailable => Err(self.setup_error(
                "JetStream",
                "the server runs without JetStream (no responder for the JetStream API); \
                 start nats-server with -js (and -sd STORE_DIR)",
            )),
            Err(e) => Err(self.setup_error(format!("stream {}", self.stream), e)),
        }
    }

    fn subject(&self, user: u32) -> String {
        format!("tern.lg.{}.{user}", self.run_id)
    }

    fn consumer_config(&self, user: u32) -> pull::Config {
        pull::Config {
            durable_name: Some(user_name(&self.run_id, user)),
            filter_subject: self.subject(user),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: MAX_ACK_PENDING,
            ..Default::default()
        }
    }

    /// Creates user `user`'s consumer through `js` (the same config again
    /// is a no-op), returning a handle that pulls over `js`'s connection.
    async fn consumer(&self, js: &Context, user: u32) -> Result<PullConsumer, LoadError> {
        js.create_consumer_on_stream(self.consumer_config(user), &self.stream)
            .await
            .map_err(|e| self.setup_error_at(self.targets.of_user(user), format!("consumer of user {user}"), e))
    }

    /// Starts user `user`'s pull and its receive task, and checks that the
    /// consumer got the pull request. In a cluster, when the user's server
    /// is not the one holding the consumer, nats-server (2.15) sometimes
    /// drops the first pull request after the connection's consumer create
    /// (seen as consumers with no waiting request), and `async-nats` asks
    /// again only when the request expires (30 s), holding the user's
    /// messages back that long. So a pull the consumer does not show within
    /// [`PULL_CHECK`] is stopped and started again. (Reading the consumer's
    /// info first, as done here for `before`, made the drops rare.)
    async fn start_pull(
        &self,
        consumer: &PullConsumer,
        user: u32,
        ledger: Arc<Ledger>,
    ) -> Result<(oneshot::Sender<()>, JoinHandle<()>), LoadError> {
        let target = self.targets.of_user(user);
        let error = |e: &dyn std::fmt::Display| self.setup_error_at(target, format!("pull of user {user}"), e);
        let heartbeat = (self.opts.idle_timeout / 3).max(Duration::from_secs(1));
        for _ in 0..PULL_ATTEMPTS {
            let before = consumer.get_info().await.map_err(|e| error(&e))?.delivered.consumer_sequence;
            let messages = consumer
                .stream()
                .max_messages_per_batch(PULL_BATCH)
                .heartbeat(heartbeat)
                .expires(heartbeat * 3)
                .messages()
                .await
                .map_err(|e| error(&e))?;
            let (stop, stopped) = oneshot::channel();
            // The pull request goes out when the task first polls the stream.
            let reader = tokio::spawn(receive(messages, user, ledger.clone(), stopped));
            if pull_registered(consumer, before).await {
                return Ok((stop, reader));
            }
            tracing::debug!(user, "pull request not registered at the consumer; pulling again");
            let _ = stop.send(());
            let _ = tokio::time::timeout(self.opts.connect_timeout, reader).await;
        }
        Err(error(&format!("the consumer never showed the pull request ({PULL_ATTEMPTS} attempts)")))
    }
}

/// Whether `consumer` has a waiting pull request, or has delivered past
/// `before` (a pull that is already served), within [`PULL_CHECK`].
async fn pull_registered(consumer: &PullConsumer, before: u64) -> bool {
    let deadline = tokio::time::Instant::now() + PULL_CHECK;
    loop {
        if let Ok(info) = consumer.get_info().await {
            if info.num_waiting > 0 || info.delivered.consumer_sequence > before {
                return true;
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[async_trait]
impl Adapter for NatsAdapter {
    async fn prepare(&self, user: u32) -> Result<(), LoadError> {
        self.consumer(&self.js, user).await.map(drop)
    }

    async fn connect(&self, user: u32, ledger: Arc<Ledger>) -> Result<Box<dyn Connection>, LoadError> {
        let target = self.targets.of_user(user);
        let client = dial(&self.urls[self.targets.index_of(user)], &user_name(&self.run_id, user), &self.opts)
            .await
            .map_err(|e| self.setup_error_at(target, format!("connection of user {user}"), e))?;
        let js = context(client.clone(), &self.opts);
        let consumer = self.consumer(&js, user).await?;
        let (stop, reader) = self.start_pull(&consumer, user, ledger).await?;
        Ok(Box::new(NatsConnection {
            client,
            js,
            subject_prefix: format!("tern.lg.{}.", self.run_id),
            timeout: self.opts.request_timeout,
            close_timeout: self.opts.connect_timeout,
            reader: Mutex::new(Some((stop, reader))),
        }))
    }

    async fn cleanup(&self) {
        if let Err(e) = self.js.delete_stream(&self.stream).await {
            tracing::warn!(stream = %self.stream, error = %e, "could not delete the run's stream");
        }
    }
}

/// A server that did not take the admin connection.
fn unreachable(target: &Target, e: async_nats::ConnectError) -> LoadError {
    LoadError::Unreachable {
        target: target.to_string(),
        reason: e.to_string(),
        hint: "is nats-server listening there, with JetStream on? \
               Start it with `nats-server -js -sd STORE_DIR -a HOST -p PORT`."
            .into(),
    }
}

/// Connects to `url` as `name`.
async fn dial(url: &str, name: &str, opts: &Options) -> Result<Client, async_nats::ConnectError> {
    ConnectOptions::new()
        .name(name)
        .connection_timeout(opts.connect_timeout)
        .ping_interval((opts.idle_timeout / 3).max(Duration::from_secs(1)))
        .read_buffer_capacity(READ_BUFFER)
        .connect(url)
        .await
}

/// A JetStream context over `client` whose requests and `PubAck`s wait up to the request timeout.
fn context(client: Client, opts: &Options) -> Context {
    jetstream::ContextBuilder::new()
        .timeout(opts.request_timeout)
        .max_ack_inflight(MAX_ACK_INFLIGHT)
        .backpressure_on_inflight(false)
        .build(client)
}

/// Feeds the user's deliveries to the ledger and acks each, until `stop`;
/// then takes what has already arrived, so it is acked before the close.
async fn receive(mut messages: pull::Stream, user: u32, ledger: Arc<Ledger>, mut stop: oneshot::Receiver<()>) {
    loop {
        let next = tokio::select! {
            _ = &mut stop => break,
            next = messages.next() => next,
        };
        if !handle(next, user, &ledger).await {
            return;
        }
    }
    while let Some(next) = messages.next().now_or_never() {
        if !handle(next, user, &ledger).await {
            return;
        }
    }
}

/// Handles one item of the pull stream; false once the stream is over.
async fn handle(next: Option<Result<jetstream::Message, pull::MessagesError>>, user: u32, ledger: &Ledger) -> bool {
    match next {
        Some(Ok(message)) => {
            ledger.delivered(user, &message.payload);
            if let Err(e) = message.ack().await {
                tracing::debug!(user, error = %e, "ack not sent");
            }
            true
        }
        Some(Err(e))
            if matches!(e.kind(), MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::PushBasedConsumer) =>
        {
            tracing::warn!(user, error = %e, "pull stopped");
            false
        }
        // Missed heartbeats and failed pulls (e.g. while reconnecting): the stream retries.
        Some(Err(e)) => {
            tracing::debug!(user, error = %e, "pull error");
            true
        }
        None => false,
    }
}

#[derive(Debug)]
struct NatsConnection {
    client: Client,
    js: Context,
    subject_prefix: String,
    timeout: Duration,
    close_timeout: Duration,
    /// Stops the receive task, and the task; taken by `close`.
    reader: Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

/// The report's error kind for a failed publish.
fn publish_failure(e: PublishError) -> SendFailure {
    let kind = match e.kind() {
        PublishErrorKind::TimedOut => "Timeout",
        PublishErrorKind::StreamNotFound => "NoResponders",
        PublishErrorKind::BrokenPipe => "Closed",
        PublishErrorKind::MaxAckPending => "QueueFull",
        PublishErrorKind::WrongLastMessageId | PublishErrorKind::WrongLastSequence | PublishErrorKind::Other => {
            "Publish"
        }
    };
    SendFailure::new(kind, e)
}

#[async_trait]
impl Connection for NatsConnection {
    async fn submit(&self, to: u32, body: Bytes) -> Result<AckFuture, SendFailure> {
        let ack = self.js.publish(format!("{}{to}", self.subject_prefix), body).await.map_err(publish_failure)?;
        Ok(Box::pin(async move { ack.await.map(drop).map_err(publish_failure) }))
    }

    async fn ping(&self) -> Result<(), SendFailure> {
        match tokio::time::timeout(self.timeout, self.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SendFailure::new("Closed", e)),
            Err(_) => Err(SendFailure::new("Timeout", "no PONG in time")),
        }
    }

    async fn close(&self) {
        let reader = self.reader.lock().expect("reader lock").take();
        if let Some((stop, mut reader)) = reader {
            let _ = stop.send(());
            if tokio::time::timeout(self.close_timeout, &mut reader).await.is_err() {
                reader.abort();
            }
        }
        // The acks are written before the connection goes.
        let _ = tokio::time::timeout(self.close_timeout, self.client.flush()).await;
        let _ = self.client.drain().await;
    }
}

/// The stream's storage from the value of [`STORAGE_ENV`] (unset: file).
fn storage_from(value: Option<&str>) -> Result<StorageType, String> {
    match value.map(str::trim) {
        None | Some("" | "file") => Ok(StorageType::File),
        Some("memory") => Ok(StorageType::Memory),
        Some(other) => Err(format!("{STORAGE_ENV}={other:?}: expected `file` or `memory`")),
    }
}

/// `s` as one subject token or name part: anything but letters, digits,
/// `-` and `_` becomes `_`.
fn token(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// The run's stream name.
fn stream_name(run_id: &str) -> String {
    format!("TERNLG_{}", token(run_id).to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_defaults_to_file() {
        assert_eq!(storage_from(None), Ok(StorageType::File));
        assert_eq!(storage_from(Some("file")), Ok(StorageType::File));
        assert_eq!(storage_from(Some(" memory ")), Ok(StorageType::Memory));
        assert!(storage_from(Some("disk")).unwrap_err().contains(STORAGE_ENV));
    }

    #[test]
    fn names_are_valid_tokens() {
        assert_eq!(stream_name("a1b2c3"), "TERNLG_A1B2C3");
        assert_eq!(stream_name("x.y*z>"), "TERNLG_X_Y_Z_");
        assert_eq!(token("run 1.>"), "run_1__");
    }
}
