//! The task behind a [`Client`](crate::Client): it owns the connection.
//!
//! Commands from the application (send, ack, call, close) arrive on a bounded
//! channel; frames from the broker arrive from the connection's reader task.
//! Sends are written as they come (pipelined) and each `SendAck` or `Error`
//! is matched to its caller by request id. Deliveries go through
//! [`Dedup`] and then to the application's buffer, without ever waiting on
//! it: a full buffer makes the client discard (unacked) and later log in
//! again to have them pushed again, so a reader that is slow or absent never
//! stalls sends.
//!
//! When the connection drops the actor reconnects with jittered exponential
//! backoff, trying the brokers a `Redirect` named first and then rotating
//! through the configured ones, logs in again, and resends every send still
//! awaiting its ack with the same message id (the broker stores it once), in
//! the order first sent. Each delay is drawn once and runs to its end while
//! the application keeps sending: sends made meanwhile wait for the
//! reconnect, up to [`ClientConfig::max_offline_sends`] of them; beyond that
//! a send fails at once with [`SendError::Backlogged`]. Acks are per
//! connection (see [`Dedup`]): nothing acknowledged on an earlier connection
//! is repeated on the new one, whose seqs are its broker's own.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use tern_protocol::pb::{self, client_frame::Kind as C, server_frame::Kind as S};
use tern_protocol::{ErrorCode, MessageId};
use tokio::sync::{mpsc, oneshot, watch};

use crate::backoff::Backoff;
use crate::conn::{Auth, Conn};
use crate::dedup::{Dedup, ItemKey, Verdict};
use crate::{ClientConfig, ClientError, Identity, Incoming, Outgoing, SendError, SendOptions, SendReceipt};

/// Where a send's outcome goes.
pub(crate) type SendReply = oneshot::Sender<Result<SendReceipt, SendError>>;

/// A request from a [`Client`](crate::Client) handle to the actor.
pub(crate) enum Cmd {
    Send {
        id: MessageId,
        to: String,
        body: Outgoing,
        options: SendOptions,
        reply: SendReply,
    },
    Ack(u64),
    Call(C, oneshot::Sender<Result<S, SendError>>),
    /// An encoded `Datagram` to send (ephemeral: dropped when offline).
    Datagram(Bytes),
    Close(oneshot::Sender<()>),
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Send { id, to, body, .. } => write!(f, "Send({id} to {to}, {} bytes)", body.len()),
            Self::Ack(seq) => write!(f, "Ack({seq})"),
            Self::Call(kind, _) => write!(f, "Call({kind:?})"),
            Self::Datagram(d) => write!(f, "Datagram({} bytes)", d.len()),
            Self::Close(_) => f.write_str("Close"),
        }
    }
}

#[derive(Debug)]
struct PendingSend {
    to: String,
    body: Outgoing,
    options: SendOptions,
    reply: SendReply,
    /// Position in the order of first sending; resends keep it.
    order: u64,
}

#[derive(Debug)]
pub(crate) struct Actor {
    config: ClientConfig,
    endpoint: quinn::Endpoint,
    identity: Identity,
    conn: Option<Conn>,
    cmds: mpsc::Receiver<Cmd>,
    incoming: mpsc::Sender<Incoming>,
    /// Sends awaiting their ack, by message id.
    pending: HashMap<MessageId, PendingSend>,
    /// Request id on the current connection -> pending send.
    in_flight: HashMap<u64, MessageId>,
    next_order: u64,
    /// Other requests (`ListDevices`, `Ping`) on the current connection.
    calls: HashMap<u64, oneshot::Sender<Result<S, SendError>>>,
    dedup: Dedup,
    backoff: Backoff,
    /// Brokers named by the last `Redirect`, tried before the configured ones.
    redirect: VecDeque<String>,
    next_broker: usize,
    /// Largest body the broker accepts, as last announced.
    max_body_len: usize,
    /// Told once the connection has been closed gracefully.
    closed: Option<oneshot::Sender<()>>,
    /// While deliveries are discarded for lack of room: when to look next
    /// whether the application has made room.
    room_check: tokio::time::Instant,
    /// This device's keys on record at the broker, as last told (at login,
    /// by a `KeyStock` push, in a `KeysPublished` answer).
    key_stock: watch::Sender<pb::KeyStock>,
    /// Datagrams from the broker (typing, presence), for the application.
    ephemeral: mpsc::Sender<pb::Datagram>,
    /// Their receiving end, until the client takes it.
    ephemeral_rx: Option<mpsc::Receiver<pb::Datagram>>,
}

enum Step {
    Continue,
    Disconnected(String),
    Stop,
}

impl Actor {
    /// The datagrams from the broker (taken once).
    pub(crate) fn take_ephemeral(&mut self) -> Option<mpsc::Receiver<pb::Datagram>> {
        self.ephemeral_rx.take()
    }

    /// The key stock as the actor learns it.
    pub(crate) fn key_stock(&self) -> watch::Receiver<pb::KeyStock> {
        self.key_stock.subscribe()
    }

    pub(crate) fn new(
        config: ClientConfig,
        endpoint: quinn::Endpoint,
        identity: Identity,
        conn: Conn,
        login: &pb::LoginOk,
        cmds: mpsc::Receiver<Cmd>,
        incoming: mpsc::Sender<Incoming>,
    ) -> Self {
        let home = conn.addr.clone();
        let (ephemeral_tx, ephemeral_rx) = mpsc::channel(256);
        let mut actor = Self {
            backoff: Backoff::new(config.backoff_min, config.backoff_max),
            dedup: Dedup::new(config.dedup_window, login.acked_seq),
            max_body_len: conn.max_body_len,
            config,
            endpoint,
            identity,
            conn: Some(conn),
            cmds,
            incoming,
            pending: HashMap::new(),
            in_flight: HashMap::new(),
            next_order: 0,
            calls: HashMap::new(),
            redirect: VecDeque::new(),
            next_broker: 0,
            closed: None,
            room_check: tokio::time::Instant::now(),
            key_stock: watch::Sender::new(login.key_stock.unwrap_or_default()),
            ephemeral: ephemeral_tx,
            ephemeral_rx: Some(ephemeral_rx),
        };
        actor.stay_at(&home);
        actor
    }

    pub(crate) async fn run(mut self) {
        loop {
            if self.conn.is_none() && !self.reconnect().await {
                break;
            }
            match self.step().await {
                Step::Continue => {}
                Step::Disconnected(reason) => {
                    tracing::info!(%reason, "connection lost; reconnecting");
                    self.drop_connection();
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
        if let Some(done) = self.closed.take() {
            let _ = done.send(());
        }
    }

    /// Forgets the connection and what was in flight on it (request ids
    /// start again on the next one); pending sends stay for the resend.
    fn drop_connection(&mut self) {
        if let Some(c) = self.conn.take() {
            c.close();
        }
        self.in_flight.clear();
        for (_, reply) in self.calls.drain() {
            let _ = reply.send(Err(SendError::Closed("connection lost; try again".into())));
        }
    }

    async fn step(&mut self) -> Step {
        let Some(conn) = self.conn.as_mut() else { return Step::Continue };
        let holding = self.dedup.holding();
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
            datagram = conn.conn.read_datagram() => match datagram {
                Ok(bytes) => {
                    if let Ok(d) = <pb::Datagram as prost::Message>::decode(bytes) {
                        // Ephemeral: dropped when the application does not keep up.
                        let _ = self.ephemeral.try_send(d);
                    }
                    Step::Continue
                }
                // Lost: this would come back at once, every time.
                Err(e) => Step::Disconnected(e.to_string()),
            },
            () = tokio::time::sleep_until(self.room_check), if holding => {
                // Discarded deliveries come back with a fresh login, once
                // the application has made room for them.
                self.room_check = tokio::time::Instant::now() + Duration::from_millis(100);
                if self.incoming.capacity() * 2 >= self.incoming.max_capacity() {
                    Step::Disconnected("the application caught up; fetching the deliveries it had no room for".into())
                } else {
                    Step::Continue
                }
            }
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
            Cmd::Send { id, to, body, options, reply } => match self.enqueue(id, to, body, options, reply) {
                Some(id) => self.transmit(id).await,
                None => Step::Continue,
            },
            Cmd::Ack(seq) => match self.dedup.handle_app_ack(seq) {
                Some(up_to) => self.write(0, C::Ack(pb::Ack { up_to_seq: up_to })).await,
                None => Step::Continue,
            },
            Cmd::Call(kind, reply) => {
                let Some(conn) = self.conn.as_mut() else { return Step::Continue };
                match conn.request(kind).await {
                    Ok(id) => {
                        self.calls.insert(id, reply);
                        Step::Continue
                    }
                    Err(ClientError::Invalid(e)) => {
                        let _ = reply.send(Err(SendError::Invalid(e)));
                        Step::Continue
                    }
                    Err(e) => Step::Disconnected(e.to_string()),
                }
            }
            Cmd::Datagram(d) => {
                if let Some(conn) = self.conn.as_ref() {
                    let _ = conn.conn.send_datagram(d);
                }
                Step::Continue
            }
            Cmd::Close(done) => {
                self.closed = Some(done);
                Step::Stop
            }
        }
    }

    /// Records a new send; returns its id if it should be written now. A
    /// send whose id is already pending takes over the earlier caller's
    /// place (that caller gave up waiting) and is not written again.
    fn enqueue(
        &mut self,
        id: MessageId,
        to: String,
        body: Outgoing,
        options: SendOptions,
        reply: SendReply,
    ) -> Option<MessageId> {
        if body.len() > self.max_body_len {
            let _ = reply.send(Err(SendError::TooLarge { len: body.len(), max: self.max_body_len }));
            return None;
        }
        if let Some(p) = self.pending.get_mut(&id) {
            let earlier = std::mem::replace(&mut p.reply, reply);
            let _ = earlier.send(Err(SendError::Closed(format!("superseded by a resend of {id}"))));
            return None;
        }
        let max = self.config.max_offline_sends;
        if self.conn.is_none() && self.pending.len() >= max {
            let _ = reply.send(Err(SendError::Backlogged { max }));
            return None;
        }
        let order = self.next_order;
        self.next_order += 1;
        self.pending.insert(id, PendingSend { to, body, options, reply, order });
        Some(id)
    }

    /// Writes pending send `id` on the current connection.
    async fn transmit(&mut self, id: MessageId) -> Step {
        let Some(conn) = self.conn.as_mut() else { return Step::Continue };
        let Some(p) = self.pending.get(&id) else { return Step::Continue };
        let kind = C::Send(pb::Send {
            message_id: Bytes::copy_from_slice(&id.0),
            to: p.to.clone(),
            body: p.body.body.clone(),
            no_receipt: !p.options.receipt,
            envelopes: p.body.envelopes.clone(),
            to_devices_version: p.body.to_devices_version,
            own_devices_version: p.body.own_devices_version,
            to_device: p.body.to_device,
        });
        match conn.request(kind).await {
            Ok(request_id) => {
                self.in_flight.insert(request_id, id);
                Step::Continue
            }
            Err(ClientError::Invalid(e)) => {
                self.finish_send(id, Err(SendError::Invalid(e)));
                Step::Continue
            }
            Err(e) => Step::Disconnected(e.to_string()),
        }
    }

    fn finish_send(&mut self, id: MessageId, result: Result<SendReceipt, SendError>) {
        if let Some(p) = self.pending.remove(&id) {
            let _ = p.reply.send(result);
        }
    }

    async fn frame(&mut self, frame: pb::ServerFrame) -> Step {
        let request_id = frame.request_id;
        match frame.kind {
            Some(S::SendAck(ack)) => {
                let Some(id) = self.in_flight.remove(&request_id) else { return Step::Continue };
                if ack.message_id.as_ref() != id.0.as_slice() {
                    tracing::warn!(%id, request_id, "SendAck names another message id");
                }
                let receipt = SendReceipt {
                    message_id: id,
                    duplicate: ack.duplicate,
                    accepted_at_ms: ack.accepted_at_ms,
                    recipients: ack.recipients,
                };
                self.finish_send(id, Ok(receipt));
                Step::Continue
            }
            Some(S::Deliver(d)) => self.deliver(d).await,
            Some(S::Error(e)) if request_id == 0 => {
                let code = e.code();
                tracing::warn!(?code, message = %e.message, "broker ends the connection");
                match code {
                    ErrorCode::PermissionDenied
                    | ErrorCode::Unauthenticated
                    | ErrorCode::BadSignature
                    | ErrorCode::UnknownDevice
                    | ErrorCode::HandleLost => Step::Stop,
                    _ => Step::Disconnected(format!("{code:?}: {}", e.message)),
                }
            }
            Some(S::Error(e)) if e.code() == ErrorCode::DevicesChanged && self.in_flight.contains_key(&request_id) => {
                if let Some(id) = self.in_flight.remove(&request_id) {
                    self.finish_send(id, Err(SendError::DevicesChanged(e.devices)));
                }
                Step::Continue
            }
            Some(S::Error(e)) => {
                if let Some(reply) = self.calls.remove(&request_id) {
                    let _ = reply.send(Err(SendError::Refused { code: e.code(), message: e.message }));
                } else if let Some(id) = self.in_flight.remove(&request_id) {
                    if e.code() == ErrorCode::ShuttingDown {
                        // Nothing stored; resent to the next broker after the reconnect.
                        tracing::debug!(%id, "send refused by a draining broker; will resend");
                    } else {
                        self.finish_send(id, Err(SendError::Refused { code: e.code(), message: e.message }));
                    }
                }
                Step::Continue
            }
            Some(S::KeyStock(stock)) => {
                self.key_stock.send_replace(stock);
                Step::Continue
            }
            Some(S::KeysPublished(published)) => {
                if let Some(stock) = &published.stock {
                    self.key_stock.send_replace(*stock);
                }
                if let Some(reply) = self.calls.remove(&request_id) {
                    let _ = reply.send(Ok(S::KeysPublished(published)));
                }
                Step::Continue
            }
            Some(S::Redirect(r)) => {
                tracing::info!(brokers = ?r.brokers, reason = %r.reason, "broker redirects");
                self.redirect = r.brokers.into_iter().filter(|b| !b.is_empty()).collect();
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
        let Some((key, item)) = incoming_item(d) else { return Step::Continue };
        let room = self.incoming.capacity() > 0;
        match self.dedup.handle_delivery(item.seq(), key, room) {
            Verdict::Deliver => {
                // Only this task sends on the channel, so the room seen above
                // is still there; a closed channel means nobody reads.
                let _ = self.incoming.try_send(item);
                Step::Continue
            }
            Verdict::DropAndAck(seq) => self.write(0, C::Ack(pb::Ack { up_to_seq: seq })).await,
            Verdict::Drop | Verdict::Discard => Step::Continue,
        }
    }

    /// Reconnects with backoff until logged in again; false if the client
    /// should stop (the login itself was refused, or the app closed it).
    async fn reconnect(&mut self) -> bool {
        loop {
            // Drawn once per attempt: commands arriving meanwhile do not
            // push the attempt back.
            let deadline = tokio::time::Instant::now() + self.backoff.next_delay();
            if !self.wait_offline(deadline).await {
                return false;
            }
            match self.login().await {
                Ok(()) => return true,
                Err(e) if e.is_transient() => tracing::debug!(error = %e, "reconnect failed"),
                Err(e) => {
                    tracing::error!(error = %e, "login refused after reconnect; stopping");
                    return false;
                }
            }
        }
    }

    /// Serves commands while disconnected until `deadline`: sends wait for
    /// the reconnect (within `max_offline_sends`), acks are recorded, calls
    /// fail at once. False if the application closed the client.
    async fn wait_offline(&mut self, deadline: tokio::time::Instant) -> bool {
        loop {
            let cmd = tokio::select! {
                () = tokio::time::sleep_until(deadline) => return true,
                cmd = self.cmds.recv() => cmd,
            };
            match cmd {
                None => return false,
                Some(Cmd::Close(done)) => {
                    self.closed = Some(done);
                    return false;
                }
                Some(Cmd::Send { id, to, body, options, reply }) => {
                    // Written after the login, with every other pending send.
                    self.enqueue(id, to, body, options, reply);
                }
                Some(Cmd::Ack(seq)) => {
                    // Retires what the application processed. Nothing is sent:
                    // the next connection's seqs are its own, and its
                    // redeliveries of these items are acknowledged there.
                    self.dedup.handle_app_ack(seq);
                }
                Some(Cmd::Call(_, reply)) => {
                    let _ = reply.send(Err(SendError::Closed("not connected; reconnecting".into())));
                }
                Some(Cmd::Datagram(_)) => {}
            }
        }
    }

    /// One attempt: connect to the next broker, log in, start the new
    /// connection's ack state, resend what is pending.
    async fn login(&mut self) -> Result<(), ClientError> {
        let addr = self.pick_broker();
        let server_name = self.config.server_name.as_deref();
        let mut conn = Conn::open(&self.endpoint, &addr, server_name, self.config.connect_timeout).await?;
        let ok = conn.authenticate(Auth::Login { identity: &self.identity }, &self.config.client_name).await?;
        tracing::info!(%addr, pending = ok.pending, resending = self.pending.len(), "reconnected");
        self.backoff.reset();
        self.stay_at(&addr);
        self.max_body_len = conn.max_body_len;
        self.conn = Some(conn);
        // The new broker's seqs; no ack of the old connection is repeated.
        self.dedup.handle_login(ok.acked_seq);
        if let Some(stock) = ok.key_stock {
            self.key_stock.send_replace(stock);
        }
        // Callers that gave up waiting were told resending is safe; drop theirs.
        self.pending.retain(|_, p| !p.reply.is_closed());
        let mut ids: Vec<(u64, MessageId)> = self.pending.iter().map(|(id, p)| (p.order, *id)).collect();
        ids.sort_unstable();
        for (_, id) in ids {
            if let Some(p) = self.pending.get(&id) {
                if p.body.len() > self.max_body_len {
                    let err = SendError::TooLarge { len: p.body.len(), max: self.max_body_len };
                    self.finish_send(id, Err(err));
                    continue;
                }
            }
            if let Step::Disconnected(reason) = self.transmit(id).await {
                self.drop_connection();
                return Err(ClientError::ConnectionLost(reason));
            }
        }
        Ok(())
    }

    /// The broker for the next attempt: a redirect's, else the one in the
    /// list the client was last logged in at, and the next one in the list
    /// after each attempt that failed. A broker that restarted is tried
    /// again first, so its devices stay where their queues are and do not
    /// move broker at every reconnect.
    fn pick_broker(&mut self) -> String {
        if let Some(addr) = self.redirect.pop_front() {
            return addr;
        }
        let list = &self.config.brokers;
        let addr = list.get(self.next_broker % list.len().max(1)).cloned().unwrap_or_default();
        self.next_broker = self.next_broker.wrapping_add(1);
        addr
    }

    /// After a login at `addr`: the next reconnect tries it first (unless
    /// `reconnect_to_last` is off).
    fn stay_at(&mut self, addr: &str) {
        if let Some(i) = first_after_login(&self.config.brokers, addr, self.config.reconnect_to_last) {
            self.next_broker = i;
        }
    }
}

/// The index in `brokers` the reconnect after a login at `addr` tries
/// first: that broker's, or with `stay` off the next one (`None`: `addr`
/// came from a redirect, not the list).
fn first_after_login(brokers: &[String], addr: &str, stay: bool) -> Option<usize> {
    let i = brokers.iter().position(|b| b == addr)?;
    Some(if stay { i } else { (i + 1) % brokers.len() })
}

/// The application's view of a `Deliver`, and its dedup identity; `None`
/// for an item this client cannot read (skipped, acked with the next ack).
fn incoming_item(d: pb::Deliver) -> Option<(ItemKey, Incoming)> {
    let seq = d.seq;
    match d.item? {
        pb::deliver::Item::Message(m) => {
            let id = MessageId::from_slice(&m.message_id).ok()?;
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
            Some((key, item))
        }
        pb::deliver::Item::Receipt(r) => {
            let id = MessageId::from_slice(&r.message_id).ok()?;
            let key = ItemKey::Receipt { id: id.0, handle: r.handle.clone(), device: r.device };
            let item = Incoming::Receipt {
                seq,
                message_id: id,
                handle: r.handle,
                device: r.device,
                delivered_at_ms: r.delivered_at_ms,
                failed: match r.error {
                    0 => None,
                    code => Some(ErrorCode::try_from(code).unwrap_or(ErrorCode::Internal)),
                },
            };
            Some((key, item))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11: after every reconnect the client moved to the next broker
    /// of its list (round-robin), so a broker restart moved every device,
    /// and each move costs the mesh a handoff. It now tries the broker it
    /// was at first, and moves on only when an attempt fails.
    #[test]
    fn a_reconnect_tries_the_broker_the_client_was_at_first() {
        let brokers: Vec<String> = ["a:1", "b:1", "c:1"].iter().map(|s| s.to_string()).collect();
        assert_eq!(first_after_login(&brokers, "b:1", true), Some(1));
        assert_eq!(first_after_login(&brokers, "c:1", true), Some(2));
        assert_eq!(first_after_login(&brokers, "c:1", false), Some(0), "spreading: the next one, wrapping");
        assert_eq!(first_after_login(&brokers, "elsewhere:1", true), None, "a redirect's broker is not in the list");
    }
}
