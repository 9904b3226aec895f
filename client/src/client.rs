//! The public [`Client`] and the actor behind it.
//!
//! The actor owns the connection. It writes sends as they come (pipelined),
//! matches each `SendAck` to its caller, filters deliveries through
//! [`Dedup`](crate::dedup) and passes them to the application, and forwards
//! the application's acks. When the connection drops it reconnects with
//! jittered exponential backoff, rotating through the configured brokers (or
//! those a `Redirect` named), logs in again, resends every send still
//! awaiting its ack with the same message id (the broker stores it once), and
//! repeats the application's last ack.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use rand::RngCore;
use tern_protocol::pb::{self, client_frame::Kind as C, server_frame::Kind as S};
use tern_protocol::{validate_handle, ErrorCode, MessageId};
use tokio::sync::{mpsc, oneshot};

use crate::backoff::Backoff;
use crate::conn::{Auth, Conn};
use crate::dedup::{Dedup, ItemKey, Verdict};
use crate::{ClientError, Identity, SendError};

/// How to reach brokers and how patient to be.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Broker addresses (`host:port`); the client uses the first that answers
    /// and moves on to the next when it fails.
    pub brokers: Vec<String>,
    /// PEM file with the certificate(s) to trust.
    pub ca: PathBuf,
    /// TLS server name; defaults to the host part of the broker address.
    pub server_name: Option<String>,
    /// Sent in `Hello`, for the broker's logs.
    pub client_name: String,
    /// Limit for the QUIC handshake with one broker.
    pub connect_timeout: Duration,
    /// Limit for a send's durable ack (it may still land later; resending
    /// with the same id is safe).
    pub request_timeout: Duration,
    /// Shortest reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// How many delivered ids to remember for dropping redeliveries.
    pub dedup_window: usize,
    /// Deliveries buffered for the application before the client stops reading.
    pub incoming_buffer: usize,
}

impl ClientConfig {
    /// Defaults for `brokers`, trusting `ca`.
    pub fn new(brokers: Vec<String>, ca: impl Into<PathBuf>) -> Self {
        Self {
            brokers,
            ca: ca.into(),
            server_name: None,
            client_name: concat!("tern-client/", env!("CARGO_PKG_VERSION")).into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            dedup_window: 65_536,
            incoming_buffer: 1024,
        }
    }
}

/// An item of this device's queue, handed to the application once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A message to this device's user (or a copy of one sent by another
    /// device of the same user).
    Message {
        /// Sequence number in this device's queue; pass it to [`Client::ack`].
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
    /// A device acknowledged a message this device sent.
    Receipt {
        /// Sequence number in this device's queue.
        seq: u64,
        /// The message that was delivered.
        message_id: MessageId,
        /// The receiving user.
        handle: String,
        /// The receiving device.
        device: u32,
        /// When, ms since the Unix epoch.
        delivered_at_ms: u64,
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

type SendReply = oneshot::Sender<Result<SendReceipt, SendError>>;

enum Cmd {
    Send { id: MessageId, to: String, body: Bytes, reply: SendReply },
    Ack(u64),
    Call(C, oneshot::Sender<Result<S, SendError>>),
    Close(oneshot::Sender<()>),
}

/// A connected client. Cheap to clone: clones share the connection, and
/// [`Client::recv`] hands each delivery to one of them.
#[derive(Debug, Clone)]
pub struct Client {
    cmd: mpsc::Sender<Cmd>,
    incoming: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Incoming>>>,
    identity: std::sync::Arc<Identity>,
    request_timeout: Duration,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

async fn open_any(
    config: &ClientConfig,
    endpoint: &quinn::Endpoint,
    how: Auth<'_>,
) -> Result<(Conn, pb::LoginOk), ClientError> {
    let mut last = ClientError::NoBroker;
    for addr in &config.brokers {
        match Conn::open(endpoint, addr, config.server_name.as_deref(), config.connect_timeout).await {
            Ok(mut conn) => {
                let how = match &how {
                    Auth::Register { handle, key, token } => Auth::Register { handle, key, token: *token },
                    Auth::Login { identity } => Auth::Login { identity },
                    Auth::Link { handle, key, approval } => Auth::Link { handle, key, approval },
                };
                let ok = conn.authenticate(how, &config.client_name).await?;
                return Ok((conn, ok));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn make_endpoint(config: &ClientConfig) -> Result<quinn::Endpoint, ClientError> {
    let ipv6 = config.brokers.first().is_some_and(|b| b.starts_with('['));
    crate::tls::endpoint(&config.ca, Duration::from_secs(30), ipv6)
}

impl Client {
    /// Claims `handle` with a new device key; returns the client, logged in
    /// as device 1, and the identity to keep.
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
        Ok((Self::start(config, endpoint, conn, ok, identity.clone()), identity))
    }

    /// Adds this device (`key`) to `handle` with an approval from one of its
    /// devices; returns the client logged in as the new device.
    pub async fn link_device(
        config: ClientConfig,
        handle: &str,
        key: ed25519_dalek::SigningKey,
        approval: &pb::DeviceApproval,
    ) -> Result<(Self, Identity), ClientError> {
        let endpoint = make_endpoint(&config)?;
        let (conn, ok) = open_any(&config, &endpoint, Auth::Link { handle, key: &key, approval }).await?;
        let identity = Identity { handle: ok.handle.clone(), device_id: ok.device_id, signing_key: key };
        Ok((Self::start(config, endpoint, conn, ok, identity.clone()), identity))
    }

    /// Logs in as `identity`. Fails if no broker can be reached or the login
    /// is refused; after that, connection losses are handled inside.
    pub async fn connect(config: ClientConfig, identity: Identity) -> Result<Self, ClientError> {
        let endpoint = make_endpoint(&config)?;
        let (conn, ok) = open_any(&config, &endpoint, Auth::Login { identity: &identity }).await?;
        Ok(Self::start(config, endpoint, conn, ok, identity))
    }

    fn start(config: ClientConfig, endpoint: quinn::Endpoint, conn: Conn, ok: pb::LoginOk, identity: Identity) -> Self {
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        let (in_tx, in_rx) = mpsc::channel(config.incoming_buffer.max(1));
        let request_timeout = config.request_timeout;
        let actor = Actor {
            backoff: Backoff::new(config.backoff_min, config.backoff_max),
            dedup: Dedup::new(config.dedup_window),
            config,
            endpoint,
            identity: identity.clone(),
            conn: Some(conn),
            cmds: cmd_rx,
            incoming: in_tx,
            pending: HashMap::new(),
            order: VecDeque::new(),
            calls: HashMap::new(),
            app_acked: ok.acked_seq,
            redirect: Vec::new(),
            next_broker: 0,
        };
        tokio::spawn(actor.run());
        Self {
            cmd: cmd_tx,
            incoming: std::sync::Arc::new(tokio::sync::Mutex::new(in_rx)),
            identity: std::sync::Arc::new(identity),
            request_timeout,
        }
    }

    /// Who this client is logged in as.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Sends `body` to every device of `to` with a fresh random id; resolves
    /// once the broker has it on disk.
    pub async fn send(&self, to: &str, body: impl Into<Bytes>) -> Result<SendReceipt, SendError> {
        let mut id = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut id);
        self.send_with_id(MessageId(id), to, body).await
    }

    /// Sends with a chosen id. Sending the same id again (after a timeout, a
    /// crash) never stores the message twice.
    pub async fn send_with_id(
        &self,
        id: MessageId,
        to: &str,
        body: impl Into<Bytes>,
    ) -> Result<SendReceipt, SendError> {
        validate_handle(to).map_err(|e| SendError::Invalid(format!("recipient: {e}")))?;
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Send { id, to: to.to_owned(), body: body.into(), reply };
        self.cmd.send(cmd).await.map_err(|_| SendError::Closed("client stopped".into()))?;
        match tokio::time::timeout(self.request_timeout, rx).await {
            Err(_) => Err(SendError::Timeout(self.request_timeout)),
            Ok(Err(_)) => Err(SendError::Closed("client stopped".into())),
            Ok(Ok(result)) => result,
        }
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

    /// Acknowledges every delivered item up to `seq` (cumulative).
    pub async fn ack(&self, seq: u64) {
        let _ = self.cmd.send(Cmd::Ack(seq)).await;
    }

    /// The devices of `handle` with their public keys.
    pub async fn devices(&self, handle: &str) -> Result<pb::DeviceList, SendError> {
        let (reply, rx) = oneshot::channel();
        let cmd = Cmd::Call(C::ListDevices(pb::ListDevices { handle: handle.to_owned() }), reply);
        self.cmd.send(cmd).await.map_err(|_| SendError::Closed("client stopped".into()))?;
        match tokio::time::timeout(self.request_timeout, rx).await {
            Err(_) => Err(SendError::Timeout(self.request_timeout)),
            Ok(Err(_)) => Err(SendError::Closed("client stopped".into())),
            Ok(Ok(Ok(S::DeviceList(list)))) => Ok(list),
            Ok(Ok(Ok(other))) => Err(SendError::Closed(format!("unexpected answer {other:?}"))),
            Ok(Ok(Err(e))) => Err(e),
        }
    }

    /// Flushes pending acks and closes the connection.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct PendingSend {
    to: String,
    body: Bytes,
    reply: SendReply,
    request_id: Option<u64>,
}

struct Actor {
    config: ClientConfig,
    endpoint: quinn::Endpoint,
    identity: Identity,
    conn: Option<Conn>,
    cmds: mpsc::Receiver<Cmd>,
    incoming: mpsc::Sender<Incoming>,
    /// Sends awaiting their ack, by message id.
    pending: HashMap<MessageId, PendingSend>,
    /// Message ids in the order they were sent, for resending in order.
    order: VecDeque<MessageId>,
    calls: HashMap<u64, oneshot::Sender<Result<S, SendError>>>,
    dedup: Dedup,
    app_acked: u64,
    backoff: Backoff,
    redirect: Vec<String>,
    next_broker: usize,
}

enum Step {
    Continue,
    Disconnected(String),
    Stop,
}

impl Actor {
    async fn run(mut self) {
        loop {
            if self.conn.is_none() && !self.reconnect().await {
                break;
            }
            let step = self.step().await;
            match step {
                Step::Continue => {}
                Step::Disconnected(reason) => {
                    tracing::info!(%reason, "connection lost; reconnecting");
                    if let Some(c) = self.conn.take() {
                        c.close();
                    }
                    self.dedup.reconnected();
                }
                Step::Stop => break,
            }
        }
        if let Some(c) = self.conn.take() {
            c.close_gracefully(Duration::from_secs(2)).await;
        }
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(SendError::Closed("client stopped".into())));
        }
    }

    async fn step(&mut self) -> Step {
        let Some(conn) = self.conn.as_mut() else { return Step::Continue };
        tokio::select! {
            cmd = self.cmds.recv() => match cmd {
                Some(cmd) => self.command(cmd).await,
                None => Step::Stop,
            },
            frame = conn.frames.recv() => match frame {
                Some(Ok(frame)) => self.frame(frame).await,
                Some(Err(reason)) => Step::Disconnected(reason),
                None => Step::Disconnected("reader stopped".into()),
            },
        }
    }

    async fn write(&mut self, request_id: u64, kind: C) -> Step {
        let Some(conn) = self.conn.as_mut() else { return Step::Continue };
        match conn.write(request_id, kind).await {
            Ok(()) => Step::Continue,
            Err(e) => Step::Disconnected(e.to_string()),
        }
    }

    async fn command(&mut self, cmd: Cmd) -> Step {
        match cmd {
            Cmd::Send { id, to, body, reply } => {
                if self.pending.contains_key(&id) {
                    let _ = reply.send(Err(SendError::Invalid(format!("message {id} is already being sent"))));
                    return Step::Continue;
                }
                self.pending.insert(id, PendingSend { to, body, reply, request_id: None });
                self.order.push_back(id);
                self.transmit(id).await
            }
            Cmd::Ack(seq) => {
                self.dedup.acked(seq);
                if seq > self.app_acked {
                    self.app_acked = seq;
                    return self.write(0, C::Ack(pb::Ack { up_to_seq: seq })).await;
                }
                Step::Continue
            }
            Cmd::Call(kind, reply) => {
                let Some(conn) = self.conn.as_mut() else { return Step::Continue };
                match conn.request(kind).await {
                    Ok(id) => {
                        self.calls.insert(id, reply);
                        Step::Continue
                    }
                    Err(e) => Step::Disconnected(e.to_string()),
                }
            }
            Cmd::Close(done) => {
                let _ = done.send(());
                Step::Stop
            }
        }
    }

    /// Writes pending send `id` on the current connection.
    async fn transmit(&mut self, id: MessageId) -> Step {
        let Some(conn) = self.conn.as_mut() else { return Step::Continue };
        let Some(p) = self.pending.get_mut(&id) else { return Step::Continue };
        let kind =
            C::Send(pb::Send { message_id: Bytes::copy_from_slice(&id.0), to: p.to.clone(), body: p.body.clone() });
        match conn.request(kind).await {
            Ok(request_id) => {
                p.request_id = Some(request_id);
                Step::Continue
            }
            Err(e) => Step::Disconnected(e.to_string()),
        }
    }

    fn finish_send(&mut self, request_id: u64, result: Result<SendReceipt, SendError>) {
        let Some(id) = self.pending.iter().find(|(_, p)| p.request_id == Some(request_id)).map(|(id, _)| *id) else {
            return;
        };
        if let Some(p) = self.pending.remove(&id) {
            let _ = p.reply.send(result);
        }
        self.order.retain(|o| *o != id);
    }

    async fn frame(&mut self, frame: pb::ServerFrame) -> Step {
        let request_id = frame.request_id;
        match frame.kind {
            Some(S::SendAck(ack)) => {
                let Ok(id) = MessageId::from_slice(&ack.message_id) else { return Step::Continue };
                let receipt = SendReceipt {
                    message_id: id,
                    duplicate: ack.duplicate,
                    accepted_at_ms: ack.accepted_at_ms,
                    recipients: ack.recipients,
                };
                self.finish_send(request_id, Ok(receipt));
                Step::Continue
            }
            Some(S::Deliver(d)) => self.deliver(d).await,
            Some(S::Error(e)) if request_id == 0 => {
                let code = e.code();
                tracing::warn!(?code, message = %e.message, "broker closed the connection");
                match code {
                    ErrorCode::PermissionDenied | ErrorCode::Unauthenticated => Step::Stop,
                    _ => Step::Disconnected(format!("{code:?}: {}", e.message)),
                }
            }
            Some(S::Error(e)) => {
                if let Some(reply) = self.calls.remove(&request_id) {
                    let _ = reply.send(Err(SendError::Refused { code: e.code(), message: e.message }));
                } else {
                    self.finish_send(request_id, Err(SendError::Refused { code: e.code(), message: e.message }));
                }
                Step::Continue
            }
            Some(S::Redirect(r)) => {
                self.redirect = r.brokers;
                Step::Continue
            }
            Some(kind) => {
                if let Some(reply) = self.calls.remove(&request_id) {
                    let _ = reply.send(Ok(kind));
                }
                Step::Continue
            }
            None => Step::Continue,
        }
    }

    async fn deliver(&mut self, d: pb::Deliver) -> Step {
        let seq = d.seq;
        let (key, item) = match d.item {
            Some(pb::deliver::Item::Message(m)) => {
                let Ok(id) = MessageId::from_slice(&m.message_id) else { return Step::Continue };
                let key = ItemKey::Message { from: m.from.clone(), from_device: m.from_device, id: id.0 };
                let item = Incoming::Message {
                    seq,
                    id,
                    from: m.from,
                    from_device: m.from_device,
                    to: m.to,
                    sent_at_ms: m.sent_at_ms,
                    body: m.body,
                };
                (key, item)
            }
            Some(pb::deliver::Item::Receipt(r)) => {
                let Ok(id) = MessageId::from_slice(&r.message_id) else { return Step::Continue };
                let key = ItemKey::Receipt { id: id.0, handle: r.handle.clone(), device: r.device };
                let item = Incoming::Receipt {
                    seq,
                    message_id: id,
                    handle: r.handle,
                    device: r.device,
                    delivered_at_ms: r.delivered_at_ms,
                };
                (key, item)
            }
            None => return Step::Continue,
        };
        match self.dedup.check(seq, key) {
            Verdict::Deliver => {
                if self.incoming.send(item).await.is_err() {
                    // Nobody reads any more; keep serving sends.
                }
                Step::Continue
            }
            Verdict::DropAndAck(seq) => {
                self.app_acked = self.app_acked.max(seq);
                self.write(0, C::Ack(pb::Ack { up_to_seq: seq })).await
            }
            Verdict::Drop => Step::Continue,
        }
    }

    /// Reconnects with backoff until logged in again; false if the client
    /// should stop (the login itself was refused, or the app closed it).
    async fn reconnect(&mut self) -> bool {
        loop {
            let delay = self.backoff.next_delay();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                cmd = self.cmds.recv() => match cmd {
                    None | Some(Cmd::Close(_)) => return false,
                    Some(Cmd::Send { id, to, body, reply }) => {
                        self.pending.insert(id, PendingSend { to, body, reply, request_id: None });
                        self.order.push_back(id);
                        continue;
                    }
                    Some(Cmd::Ack(seq)) => {
                        self.dedup.acked(seq);
                        self.app_acked = self.app_acked.max(seq);
                        continue;
                    }
                    Some(Cmd::Call(_, reply)) => {
                        let _ = reply.send(Err(SendError::Closed("not connected".into())));
                        continue;
                    }
                },
            }
            let addr = self.pick_broker();
            let opened =
                Conn::open(&self.endpoint, &addr, self.config.server_name.as_deref(), self.config.connect_timeout)
                    .await;
            let mut conn = match opened {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "reconnect failed");
                    continue;
                }
            };
            let ok = match conn.authenticate(Auth::Login { identity: &self.identity }, &self.config.client_name).await {
                Ok(ok) => ok,
                Err(e) if e.is_transient() => continue,
                Err(e) => {
                    tracing::error!(error = %e, "login refused after reconnect; stopping");
                    return false;
                }
            };
            tracing::info!(%addr, pending = ok.pending, "reconnected");
            self.backoff.reset();
            self.conn = Some(conn);
            if self.app_acked > ok.acked_seq {
                let seq = self.app_acked;
                if let Step::Disconnected(_) = self.write(0, C::Ack(pb::Ack { up_to_seq: seq })).await {
                    self.conn = None;
                    continue;
                }
            }
            let ids: Vec<MessageId> = self.order.iter().copied().collect();
            for id in ids {
                if let Step::Disconnected(_) = self.transmit(id).await {
                    self.conn = None;
                    break;
                }
            }
            if self.conn.is_some() {
                return true;
            }
        }
    }

    fn pick_broker(&mut self) -> String {
        let list = if self.redirect.is_empty() { &self.config.brokers } else { &self.redirect };
        let addr = list.get(self.next_broker % list.len().max(1)).cloned().unwrap_or_default();
        self.next_broker = self.next_broker.wrapping_add(1);
        addr
    }
}
