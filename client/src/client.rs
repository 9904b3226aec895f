//! The public [`Client`] handle and the values it hands out.
//!
//! A `Client` is a cheap, cloneable handle: every call becomes a command on a
//! bounded channel to the [`Actor`](crate::actor) that owns the connection,
//! and requests that need an answer carry a oneshot for it. Deliveries come
//! back on a second bounded channel, read with [`Client::recv`] or
//! [`Client::incoming`].
//!
//! The first connection is made here, so `register`, `link_device` and
//! `connect` fail with a typed [`ClientError`] when no broker can be reached
//! or the broker refuses; later losses are the actor's to repair.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use rand::RngCore;
use tern_protocol::pb::{self, client_frame::Kind as C, server_frame::Kind as S};
use tern_protocol::{validate_handle, ErrorCode, MessageId};
use tokio::sync::{mpsc, oneshot, watch, Mutex};

use crate::actor::{Actor, Cmd};
use crate::conn::{Auth, Conn};
use crate::{ClientConfig, ClientError, Identity, SendError};

/// An item of this device's queue, handed to the application once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A message to this device's user (or a copy of one sent by another
    /// device of the same user).
    Message {
        /// Sequence number in this device's queue at the broker that
        /// delivered it; pass it to [`Client::ack`]. Each broker numbers its
        /// own queue, so after a reconnect seqs may start lower.
        seq: u64,
        /// The sender's message id.
        id: MessageId,
        /// Sender handle (authenticated by the broker).
        from: String,
        /// Sender device.
        from_device: u32,
        /// The recipient user.
        to: String,
        /// When the broker accepted it, ms since the Unix epoch.
        sent_at_ms: u64,
        /// The opaque body.
        body: Bytes,
    },
    /// A device acknowledged a message this device sent, or (with
    /// `failed`) the message will never reach that device.
    Receipt {
        /// Sequence number in this device's queue at the broker that
        /// delivered it, as for a message.
        seq: u64,
        /// The message that was delivered.
        message_id: MessageId,
        /// The receiving user.
        handle: String,
        /// The receiving device.
        device: u32,
        /// When, ms since the Unix epoch.
        delivered_at_ms: u64,
        /// `None`: delivered. `Some(PayloadTooLarge)`: the device's broker
        /// cannot deliver a message this large (its limits are smaller than
        /// those of the broker that accepted it); nothing was delivered.
        failed: Option<ErrorCode>,
    },
}

impl Incoming {
    /// The queue sequence number.
    pub fn seq(&self) -> u64 {
        match self {
            Self::Message { seq, .. } | Self::Receipt { seq, .. } => *seq,
        }
    }
}

/// How a message is sent ([`Client::enqueue_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendOptions {
    /// Ask for a delivered receipt ([`Incoming::Receipt`]) from each device
    /// that acknowledges the message (default). Off for messages whose
    /// delivery the application does not show (read receipts, control
    /// messages): each then costs the broker a store write and the sender a
    /// delivery and an ack less. A receipt saying the message can never be
    /// delivered still comes.
    pub receipt: bool,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self { receipt: true }
    }
}

/// What a send carries: one body for every device, or one per device (end
/// to end, see `tern_client::secure`), or one body for one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outgoing {
    /// The body every device gets (empty with `envelopes`).
    pub body: Bytes,
    /// One body per device of the recipient and of the sender's other
    /// devices (`Send.envelopes`).
    pub envelopes: Vec<pb::Envelope>,
    /// The recipient's `DeviceList.version` the envelopes were made for.
    pub to_devices_version: u64,
    /// The sender's own `DeviceList.version`.
    pub own_devices_version: u64,
    /// Nonzero: `body` goes to this device of the recipient only.
    pub to_device: u32,
}

impl Outgoing {
    /// The largest body it carries (what the broker's limit applies to).
    pub fn len(&self) -> usize {
        self.envelopes.iter().map(|e| e.body.len()).chain([self.body.len()]).max().unwrap_or(0)
    }

    /// True when it carries nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Bytes> for Outgoing {
    fn from(body: Bytes) -> Self {
        Self { body, ..Self::default() }
    }
}

/// A send's durable acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReceipt {
    /// The message id.
    pub message_id: MessageId,
    /// The broker had accepted this id before (a resend).
    pub duplicate: bool,
    /// When the broker first accepted it, ms since the Unix epoch.
    pub accepted_at_ms: u64,
    /// Device queues it went into.
    pub recipients: u32,
}

/// The durable ack of a send queued with [`Client::enqueue`]. Resolves like
/// [`Client::send_with_id`]: with the receipt, a refusal, or a timeout after
/// [`ClientConfig::request_timeout`].
#[must_use = "a send's outcome is only known by awaiting its ack"]
pub struct PendingAck(Pin<Box<dyn Future<Output = Result<SendReceipt, SendError>> + Send>>);

impl std::fmt::Debug for PendingAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingAck")
    }
}

impl Future for PendingAck {
    type Output = Result<SendReceipt, SendError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

/// A connected client. Cheap to clone: clones share the connection, and
/// [`Client::recv`] hands each delivery to one of them.
#[derive(Debug, Clone)]
pub struct Client {
    cmd: mpsc::Sender<Cmd>,
    incoming: Arc<Mutex<mpsc::Receiver<Incoming>>>,
    identity: Arc<Identity>,
    request_timeout: Duration,
    key_stock: watch::Receiver<pb::KeyStock>,
    ephemeral: Arc<Mutex<mpsc::Receiver<pb::Datagram>>>,
}

/// Connects to the configured brokers in order and authenticates on the
/// first that answers. A broker that refuses for a passing reason (it is
/// draining, overloaded) is skipped too; any other refusal is final.
async fn open_any(
    config: &ClientConfig,
    endpoint: &quinn::Endpoint,
    how: Auth<'_>,
) -> Result<(Conn, pb::LoginOk), ClientError> {
    let mut last = ClientError::NoBroker;
    for addr in &config.brokers {
        let attempt = async {
            let mut conn = Conn::open(endpoint, addr, config.server_name.as_deref(), config.connect_timeout).await?;
            let ok = conn.authenticate(how, &config.client_name).await?;
            Ok::<_, ClientError>((conn, ok))
        };
        match attempt.await {
            Ok(opened) => return Ok(opened),
            Err(e) if e.is_transient() => {
                tracing::debug!(%addr, error = %e, "broker unavailable; trying the next");
                last = e;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

fn make_endpoint(config: &ClientConfig) -> Result<quinn::Endpoint, ClientError> {
    config.validate()?;
    if let Some(shared) = &config.endpoint {
        return Ok(shared.0.clone());
    }
    let ipv6 = config.brokers.first().is_some_and(|b| b.starts_with('['));
    crate::tls::endpoint(&config.ca, config.idle_timeout, ipv6)
}

impl Client {
    /// Claims `handle` with a new device key; returns the client, logged in
    /// as device 1, and the identity to keep (its key is the only way back in).
    pub async fn register(
        config: ClientConfig,
        handle: &str,
        registration_token: Option<&str>,
    ) -> Result<(Self, Identity), ClientError> {
        validate_handle(handle).map_err(|e| ClientError::Invalid(e.to_string()))?;
        let key = crate::identity::generate_key();
        let endpoint = make_endpoint(&config)?;
        let (conn, ok) =
            open_any(&config, &endpoint, Auth::Register { handle, key: &key, token: registration_token }).await?;
        let identity = Identity { handle: ok.handle.clone(), device_id: ok.device_id, signing_key: key };
        Ok((Self::start(config, endpoint, conn, &ok, identity.clone()), identity))
    }

    /// Adds this device (`key`) to `handle` with an approval from one of its
    /// devices (see [`Identity::approve`]); returns the client logged in as
    /// the new device and its identity, with the device number the broker gave.
    pub async fn link_device(
        config: ClientConfig,
        handle: &str,
        key: ed25519_dalek::SigningKey,
        approval: &pb::DeviceApproval,
    ) -> Result<(Self, Identity), ClientError> {
        validate_handle(handle).map_err(|e| ClientError::Invalid(e.to_string()))?;
        let endpoint = make_endpoint(&config)?;
        let (conn, ok) = open_any(&config, &endpoint, Auth::Link { handle, key: &key, approval }).await?;
        let identity = Identity { handle: ok.handle.clone(), device_id: ok.device_id, signing_key: key };
        Ok((Self::start(config, endpoint, conn, &ok, identity.clone()), identity))
    }

    /// Logs in as `identity`. Fails if no broker can be reached or the login
    /// is refused; after that, connection losses are handled inside.
    pub async fn connect(config: ClientConfig, identity: Identity) -> Result<Self, ClientError> {
        let endpoint = make_endpoint(&config)?;
        let (conn, ok) = open_any(&config, &endpoint, Auth::Login { identity: &identity }).await?;
        Ok(Self::start(config, endpoint, conn, &ok, identity))
    }

    fn start(
        config: ClientConfig,
        endpoint: quinn::Endpoint,
        conn: Conn,
        ok: &pb::LoginOk,
        identity: Identity,
    ) -> Self {
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (in_tx, in_rx) = mpsc::channel(config.incoming_buffer.max(1));
        let request_timeout = config.request_timeout;
        let mut actor = Actor::new(config, endpoint, identity.clone(), conn, ok, cmd_rx, in_tx);
        let key_stock = actor.key_stock();
        let ephemeral = Arc::new(Mutex::new(actor.take_ephemeral().unwrap_or_else(|| mpsc::channel(1).1)));
        tokio::spawn(actor.run());
        let (incoming, identity) = (Arc::new(Mutex::new(in_rx)), Arc::new(identity));
        Self { cmd: cmd_tx, incoming, identity, request_timeout, key_stock, ephemeral }
    }

    /// This device's keys on record at the broker, as last told: at login,
    /// when claims take the one-time keys below the low-water mark (then
    /// [`watch::Receiver::changed`] fires: publish more), and after each
    /// [`Client::publish_keys`].
    pub fn key_stock(&self) -> watch::Receiver<pb::KeyStock> {
        self.key_stock.clone()
    }

    /// Publishes this device's end-to-end keys (see `tern_client::e2e` for
    /// making them); returns the stock on record after.
    pub async fn publish_keys(&self, publish: pb::PublishKeys) -> Result<pb::KeyStock, SendError> {
        match self.call(C::PublishKeys(publish)).await? {
            S::KeysPublished(p) => Ok(p.stock.unwrap_or_default()),
            other => Err(SendError::Closed(format!("unexpected answer {other:?}"))),
        }
    }

    /// Claims one key of each of `devices` of `handle` (empty: every current
    /// device, this one left out), to start end-to-end sessions with them.
    /// Each one-time key is handed out once; a device whose one-time keys
    /// ran out gives its fallback key (`ClaimedKeys.fallback`).
    pub async fn claim_keys(&self, handle: &str, devices: &[u32]) -> Result<pb::KeysClaimed, SendError> {
        let req = pb::ClaimKeys { handle: handle.to_owned(), devices: devices.to_vec() };
        match self.call(C::ClaimKeys(req)).await? {
            S::KeysClaimed(c) => Ok(c),
            other => Err(SendError::Closed(format!("unexpected answer {other:?}"))),
        }
    }

    /// Who this client is logged in as.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Sends `body` to every device of `to` with a fresh random id; resolves
    /// once the broker has it on disk.
    pub async fn send(&self, to: &str, body: impl Into<Bytes>) -> Result<SendReceipt, SendError> {
        self.send_with(to, body, SendOptions::default()).await
    }

    /// [`Client::send`] with [`SendOptions`].
    pub async fn send_with(
        &self,
        to: &str,
        body: impl Into<Bytes>,
        options: SendOptions,
    ) -> Result<SendReceipt, SendError> {
        let mut id = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut id);
        self.enqueue_with(MessageId(id), to, body, options).await?.await
    }

    /// Sends with a chosen id; resolves on the broker's durable ack. Across
    /// reconnects the client resends it with the same id, and sending the
    /// same id again (after a timeout, a crash) never stores it twice.
    pub async fn send_with_id(
        &self,
        id: MessageId,
        to: &str,
        body: impl Into<Bytes>,
    ) -> Result<SendReceipt, SendError> {
        self.enqueue(id, to, body).await?.await
    }

    /// The first half of [`Client::send_with_id`], for pipelining: resolves
    /// once the send is queued for the connection (sends queued one after
    /// another reach the broker, and the recipient, in that order), and
    /// returns a future of its durable ack. Waiting for the ack is then up to
    /// the caller, so one task can keep many sends in flight in order.
    pub async fn enqueue(&self, id: MessageId, to: &str, body: impl Into<Bytes>) -> Result<PendingAck, SendError> {
        self.enqueue_with(id, to, body, SendOptions::default()).await
    }

    /// [`Client::enqueue`] with [`SendOptions`].
    pub async fn enqueue_with(
        &self,
        id: MessageId,
        to: &str,
        body: impl Into<Bytes>,
        options: SendOptions,
    ) -> Result<PendingAck, SendError> {
        self.enqueue_outgoing(id, to, Outgoing::from(body.into()), options).await
    }

    /// [`Client::enqueue_with`] for any [`Outgoing`]: per-device envelopes,
    /// or a body for one device.
    pub async fn enqueue_outgoing(
        &self,
        id: MessageId,
        to: &str,
        body: Outgoing,
        options: SendOptions,
    ) -> Result<PendingAck, SendError> {
        validate_handle(to).map_err(|e| SendError::Invalid(format!("recipient: {e}")))?;
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Send { id, to: to.to_owned(), body, options, reply };
        self.cmd.send(cmd).await.map_err(|_| SendError::Closed("client stopped".into()))?;
        let timeout = self.request_timeout;
        Ok(PendingAck(Box::pin(async move {
            match tokio::time::timeout(timeout, rx).await {
                Err(_) => Err(SendError::Timeout(timeout)),
                Ok(Err(_)) => Err(SendError::Closed("client stopped".into())),
                Ok(Ok(result)) => result,
            }
        })))
    }

    /// The next message or receipt, in queue order; `None` once the client
    /// has stopped. Acknowledge it with [`Client::ack`] when processed.
    pub async fn recv(&self) -> Option<Incoming> {
        self.incoming.lock().await.recv().await
    }

    /// The deliveries as a [`Stream`](futures::Stream), for `while let
    /// Some(item) = stream.next().await` or stream combinators. Same items,
    /// same order as [`Client::recv`].
    pub fn incoming(&self) -> impl futures::Stream<Item = Incoming> + Send + 'static {
        let rx = self.incoming.clone();
        futures::stream::unfold(rx, |rx| async move {
            let item = rx.lock().await.recv().await?;
            Some((item, rx))
        })
    }

    /// Acknowledges the item received with `seq` and every item received
    /// before it (cumulative): the broker deletes them. Acknowledge only what
    /// has been processed, in the order received.
    ///
    /// Seqs belong to the connection that delivered them, and an item may
    /// come again after a reconnect (never to the application): the client
    /// translates, acknowledging on the current connection the seqs its
    /// broker gave the items processed, and only those.
    pub async fn ack(&self, seq: u64) {
        let _ = self.cmd.send(Cmd::Ack(seq)).await;
    }

    /// The devices of `handle` with their public keys.
    pub async fn devices(&self, handle: &str) -> Result<pb::DeviceList, SendError> {
        match self.call(C::ListDevices(pb::ListDevices { handle: handle.to_owned() })).await? {
            S::DeviceList(list) => Ok(list),
            other => Err(SendError::Closed(format!("unexpected answer {other:?}"))),
        }
    }

    /// Unlinks device `device` of this user (this device itself, or any
    /// other when this is the primary device); returns the list after.
    pub async fn unlink(&self, device: u32) -> Result<pb::DeviceList, SendError> {
        match self.call(C::UnlinkDevice(pb::UnlinkDevice { device_id: device })).await? {
            S::DeviceList(list) => Ok(list),
            other => Err(SendError::Closed(format!("unexpected answer {other:?}"))),
        }
    }

    /// Changes this user's profile: each `Some` field is set (`""` clears
    /// it), each `None` kept. Returns the profile after.
    pub async fn set_profile(&self, update: pb::SetProfile) -> Result<pb::Profile, SendError> {
        match self.call(C::SetProfile(update)).await? {
            S::Profile(p) => Ok(p),
            other => Err(SendError::Closed(format!("unexpected answer {other:?}"))),
        }
    }

    /// The profile of `handle` (display name, status, picture reference).
    pub async fn profile(&self, handle: &str) -> Result<pb::Profile, SendError> {
        match self.call(C::GetProfile(pb::GetProfile { handle: handle.to_owned() })).await? {
            S::Profile(p) => Ok(p),
            other => Err(SendError::Closed(format!("unexpected answer {other:?}"))),
        }
    }

    /// Tells `to`'s online devices that this user is typing (or stopped),
    /// if the two share presence. Ephemeral: a QUIC datagram, dropped when
    /// not connected or not allowed.
    pub async fn typing(&self, to: &str, typing: bool) {
        let t = pb::Typing { to: to.to_owned(), typing, ..Default::default() };
        let d = prost::Message::encode_to_vec(&pb::Datagram { kind: Some(pb::datagram::Kind::Typing(t)) });
        let _ = self.cmd.send(Cmd::Datagram(d.into())).await;
    }

    /// The next typing or presence datagram from the broker; `None` once the
    /// client has stopped.
    pub async fn next_ephemeral(&self) -> Option<pb::Datagram> {
        self.ephemeral.lock().await.recv().await
    }

    /// Changes who may see this user's presence (see
    /// [`pb::SetPresence`]); returns the settings after.
    pub async fn set_presence(&self, update: pb::SetPresence) -> Result<pb::PresenceSettings, SendError> {
        match self.call(C::SetPresence(update)).await? {
            S::PresenceSettings(s) => Ok(s),
            other => Err(SendError::Closed(format!("unexpected answer {other:?}"))),
        }
    }

    /// Watches `handles`' presence on this connection (replacing the last
    /// watch); returns their states now. Changes then come as datagrams
    /// ([`Client::next_ephemeral`]). A reconnect ends the watch: watch again.
    pub async fn watch_presence(&self, handles: &[String]) -> Result<pb::PresenceList, SendError> {
        match self.call(C::WatchPresence(pb::WatchPresence { handles: handles.to_vec() })).await? {
            S::PresenceList(l) => Ok(l),
            other => Err(SendError::Closed(format!("unexpected answer {other:?}"))),
        }
    }

    /// Registers this device's Web Push subscription: while it is not
    /// connected, queued entries send the endpoint content-free wake-ups.
    /// Returns the broker's VAPID public key (the subscription's
    /// `applicationServerKey` must be it).
    pub async fn register_push(&self, req: pb::RegisterPush) -> Result<pb::PushRegistered, SendError> {
        match self.call(C::RegisterPush(req)).await? {
            S::PushRegistered(r) => Ok(r),
            other => Err(SendError::Closed(format!("unexpected answer {other:?}"))),
        }
    }

    /// Stops push wake-ups for this device.
    pub async fn unregister_push(&self) -> Result<pb::PushRegistered, SendError> {
        match self.call(C::UnregisterPush(pb::UnregisterPush {})).await? {
            S::PushRegistered(r) => Ok(r),
            other => Err(SendError::Closed(format!("unexpected answer {other:?}"))),
        }
    }

    /// A round trip to the broker; returns how long it took.
    pub async fn ping(&self) -> Result<Duration, SendError> {
        let started = tokio::time::Instant::now();
        let nonce = rand::thread_rng().next_u64();
        match self.call(C::Ping(pb::Ping { nonce })).await? {
            S::Pong(pong) if pong.nonce == nonce => Ok(started.elapsed()),
            other => Err(SendError::Closed(format!("unexpected answer {other:?}"))),
        }
    }

    async fn call(&self, kind: C) -> Result<S, SendError> {
        let (reply, rx) = oneshot::channel();
        self.cmd.send(Cmd::Call(kind, reply)).await.map_err(|_| SendError::Closed("client stopped".into()))?;
        match tokio::time::timeout(self.request_timeout, rx).await {
            Err(_) => Err(SendError::Timeout(self.request_timeout)),
            Ok(Err(_)) => Err(SendError::Closed("client stopped".into())),
            Ok(Ok(result)) => result,
        }
    }

    /// Flushes pending acks, closes the connection and stops the client
    /// (for every clone); returns once the broker has read what was written
    /// (or after 2 s). Sends still waiting fail with [`SendError::Closed`].
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}
