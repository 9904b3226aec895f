//! One client connection: the session stream's frames in, answers and
//! deliveries out.
//!
//! A session starts unauthenticated: `Hello` gets a `Challenge`, then
//! `Register`, `Login` or `LinkDevice` proves the device's key. From then on
//! the connection acts only as that device: `Send` goes to the store (the
//! answer waits, without blocking the session, until the batch is durable),
//! `Ack` deletes from its own queue (never beyond what this session pushed:
//! seqs mean something only on the connection that delivered them), and the
//! [`delivery`] state pushes its queue in order. Everything happens in one
//! task: a `select!` over the stream, finished sends, handed-over entries,
//! the end of a sender flush and shutdown, then one write of everything
//! produced. A device that just moved has its `Send`s wait in the session
//! until its previous broker has moved on what it sent there (the mesh's
//! sender flush); meanwhile the session goes on answering and pushing, and
//! the waiting sends are taken in the order they came once the flush ends.
//!
//! Until the login, a session costs little and can make the broker do
//! little: frames of at most `limits.max_frame_len_before_login`, one login
//! attempt per challenge, each counted by the rate limits of its source
//! address, and account lookups at other members shared and remembered
//! ([`lookup`]). Logged in, a device's sends and lookups have their own
//! rate limits.

mod auth;
mod delivery;
mod keys;
mod lookup;
mod presence;
mod profile;
mod push;

pub(crate) use lookup::AccountLookups;

use std::collections::VecDeque;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt};
use rand::RngCore;
use tern_protocol::pb::{self, client_frame::Kind as C, server_frame::Kind as S};
use tern_protocol::{codec, DecodeError, ErrorCode, MessageId};
use tokio::io::AsyncReadExt;

use crate::ratelimit::{self, RateLimited};
use crate::router::Attachment;
use crate::store::{Enqueued, QueueKey, StoreError};
use crate::Context;
use auth::{Accounts, Challenge, Refusal};
use delivery::Delivery;

type SendDone = Pin<Box<dyn Future<Output = (u64, MessageId, Instant, Result<Enqueued, StoreError>)> + Send>>;

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// The client closed the stream or the connection.
    Closed,
    /// A fatal error was sent; close the connection with it.
    Fatal(ErrorCode, String),
}

struct LoggedIn {
    delivery: Delivery,
    attachment: Attachment,
    /// The epoch of this login in the mesh's directory.
    epoch: Option<u64>,
    /// Set while the device's previous broker moves on what it sent there:
    /// its sends here wait for that (see `mesh::flush`), queued in
    /// `Session::waiting_sends`, while everything else goes on.
    sends_ready: Option<crate::mesh::SendsReady>,
}

pub(crate) struct Session {
    ctx: Context,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    inbuf: BytesMut,
    out: BytesMut,
    challenge: Option<Challenge>,
    failed_logins: u32,
    /// The rate limits' key for the client's address; `None` when exempt.
    source: Option<IpAddr>,
    device: Option<LoggedIn>,
    inbox: Option<tokio::sync::mpsc::Receiver<crate::router::Pushed>>,
    /// Frames and datagrams the router hands over to send as they are.
    notices: Option<tokio::sync::mpsc::Receiver<crate::router::Notice>>,
    /// Set while the device's queue waits for its previous broker to hand
    /// back what it held (`Mesh::hold_for_handback`): nothing is pushed
    /// until it resolves to the queue's head.
    held: Option<tokio::sync::oneshot::Receiver<Option<u64>>>,
    pending: FuturesUnordered<SendDone>,
    /// Sends that came while `LoggedIn::sends_ready` was set, in the order
    /// they came: taken once it resolves. They count against
    /// `limits.max_pending_sends` like the pending ones.
    waiting_sends: VecDeque<(u64, pb::Send)>,
    deadline: tokio::time::Instant,
}

impl Session {
    pub(crate) fn new(ctx: Context, conn: quinn::Connection, send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(ctx.config.limits.handshake_timeout_secs);
        let ip = conn.remote_address().ip();
        let source = ctx.rate.source(ip);
        Self {
            ctx,
            conn,
            send,
            recv,
            // Small until used: an idle connection should cost little.
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            challenge: None,
            failed_logins: 0,
            source,
            device: None,
            inbox: None,
            notices: None,
            held: None,
            pending: FuturesUnordered::new(),
            waiting_sends: VecDeque::new(),
            deadline,
        }
    }

    /// Runs the session until the client leaves, a fatal error, or shutdown.
    pub(crate) async fn run(mut self: Box<Self>) {
        let end = self.serve().await;
        if let Some(d) = self.device.take() {
            d.attachment.record_pushed(d.delivery.last_pushed());
            let LoggedIn { delivery, attachment, epoch, .. } = d;
            // Detach from the router before leaving the directory: from
            // here on, entries for the device go to the ship actor, and a
            // `Moved` notice never finds the device both gone from the
            // directory's view here and still attached.
            drop(attachment);
            if let (Some(mesh), Some(epoch)) = (&self.ctx.mesh, epoch) {
                mesh.device_offline(&delivery.queue, epoch);
            }
            self.ctx.presence.unwatch(&delivery.queue);
            crate::presence::changed(&self.ctx, &delivery.queue, false);
        }
        match end {
            End::Closed => self.conn.close(0u32.into(), b"bye"),
            End::Fatal(code, text) => {
                tracing::debug!(?code, %text, remote = %self.conn.remote_address(), "closing session");
                self.write_error(0, code, &text);
                // Best effort: let the error frame go out before the close,
                // which also carries the code and text.
                let _ = tokio::time::timeout(Duration::from_millis(200), self.flush()).await;
                let _ = self.send.finish();
                let _ = tokio::time::timeout(Duration::from_millis(200), self.send.stopped()).await;
                self.conn.close((code as u32).into(), text.as_bytes());
            }
        }
    }

    async fn serve(&mut self) -> End {
        let max_pending = self.ctx.config.limits.max_pending_sends;
        loop {
            let can_read = self.pending.len() + self.waiting_sends.len() < max_pending;
            let sends_wait = self.device.as_ref().is_some_and(|d| d.sends_ready.is_some());
            let logged_in = self.device.is_some();
            let max_frame = self.max_frame_len();
            tokio::select! {
                biased;
                () = self.ctx.cancel.cancelled() => {
                    self.redirect();
                    return End::Fatal(ErrorCode::ShuttingDown, "the broker is shutting down; reconnect".into());
                }
                () = replaced(&self.device) => {
                    return End::Fatal(ErrorCode::PermissionDenied, "this device logged in on another connection".into());
                }
                () = unlinked(&self.device) => {
                    return End::Fatal(ErrorCode::UnknownDevice, "this device was unlinked from its user".into());
                }
                () = lost(&self.device) => {
                    let text = "this device's account lost to another claim made while the mesh was partitioned; register again";
                    return End::Fatal(ErrorCode::HandleLost, text.into());
                }
                () = tokio::time::sleep_until(self.deadline), if !logged_in => {
                    return End::Fatal(ErrorCode::Unauthenticated, "no login within the handshake timeout".into());
                }
                Some((request_id, id, started, result)) = self.pending.next(), if !self.pending.is_empty() => {
                    self.send_done(request_id, id, started, result);
                }
                () = sends_ready(&self.device), if sends_wait => {
                    if let Err(end) = Box::pin(self.take_waiting_sends()).await {
                        return end;
                    }
                }
                head = handed_back(&mut self.held), if self.held.is_some() => {
                    self.held = None;
                    self.handed_back(head);
                }
                Some((seq, value)) = handed(&mut self.inbox), if self.held.is_none() => {
                    if let Some(d) = &mut self.device {
                        d.delivery.on_handed(seq, &value, &mut self.out);
                    }
                }
                Some(notice) = notice(&mut self.notices) => match notice {
                    crate::router::Notice::Frame(frame) => self.out.extend_from_slice(&frame),
                    // Ephemeral: one the connection cannot carry is dropped.
                    crate::router::Notice::Datagram(d) => { let _ = self.conn.send_datagram(d); }
                },
                datagram = self.conn.read_datagram(), if logged_in => match datagram {
                    Ok(d) => self.on_datagram(&d),
                    // The connection is gone (this would come back at once,
                    // every time: the session must end here).
                    Err(_) => return End::Closed,
                },
                () = lagged(&self.device) => {
                    if let Some(d) = &mut self.device {
                        d.delivery.mark_lagged();
                    }
                }
                read = self.recv.read_buf(reserve(&mut self.inbuf, max_frame)), if can_read => {
                    match read {
                        Ok(0) | Err(_) => return End::Closed,
                        Ok(_) => {
                            // Boxed: handling a frame (a login, a send)
                            // needs far more state than waiting does, and
                            // an idle session should not carry it.
                            if let Err(end) = Box::pin(self.handle_frames()).await {
                                return end;
                            }
                        }
                    }
                }
            }
            self.drain_ready();
            if let Err(e) = self.fill() {
                return End::Fatal(ErrorCode::StorageError, e.to_string());
            }
            if self.flush().await.is_err() {
                return End::Closed;
            }
        }
    }

    /// The queue is in order: push from its head (it moved if entries were
    /// put behind what came back), reading the store for what the router
    /// handed over meanwhile.
    fn handed_back(&mut self, head: Option<u64>) {
        let Some(d) = &mut self.device else { return };
        if let Some(inbox) = &mut self.inbox {
            while inbox.try_recv().is_ok() {}
        }
        if let Some(head) = head {
            let window = self.ctx.config.limits.max_inflight;
            let queue = d.delivery.queue.clone();
            d.delivery = Delivery::new(queue, head, window, d.attachment.previously_pushed);
        }
        d.delivery.mark_lagged();
    }

    /// Takes whatever else is ready without waiting, so one write carries it.
    fn drain_ready(&mut self) {
        if self.held.is_some() {
            return;
        }
        if let (Some(d), Some(inbox)) = (&mut self.device, &mut self.inbox) {
            while let Ok((seq, value)) = inbox.try_recv() {
                d.delivery.on_handed(seq, &value, &mut self.out);
            }
        }
    }

    fn fill(&mut self) -> Result<(), StoreError> {
        if self.held.is_some() {
            return Ok(());
        }
        let max_bytes = self.ctx.config.limits.max_frame_len;
        match &mut self.device {
            Some(d) => d.delivery.fill(&self.ctx.store, &mut self.out, max_bytes),
            None => Ok(()),
        }
    }

    async fn flush(&mut self) -> Result<(), quinn::WriteError> {
        if !self.out.is_empty() {
            let data = self.out.split().freeze();
            self.send.write_chunk(data).await?;
        }
        Ok(())
    }

    fn write(&mut self, request_id: u64, kind: S) {
        let frame = pb::ServerFrame { request_id, kind: Some(kind) };
        if let Err(e) = codec::encode(&frame, usize::MAX >> 1, &mut self.out) {
            tracing::error!(error = %e, "cannot encode a server frame");
        }
    }

    /// Names the other live members of the mesh, for the client to
    /// reconnect to while this broker drains.
    fn redirect(&mut self) {
        let Some(mesh) = &self.ctx.mesh else { return };
        let brokers: Vec<String> =
            mesh.members().values().take(tern_protocol::MAX_REDIRECT_BROKERS).map(|m| m.addr.to_string()).collect();
        if !brokers.is_empty() {
            let reason = "this broker is shutting down".to_owned();
            self.write(0, S::Redirect(pb::Redirect { brokers, reason }));
        }
    }

    fn write_error(&mut self, request_id: u64, code: ErrorCode, text: &str) {
        self.refuse(request_id, Refusal::from((code, text.to_owned())));
    }

    fn refuse(&mut self, request_id: u64, refusal: Refusal) {
        let retry_after_ms = refusal.retry_after.map_or(0, ratelimit::retry_after_ms);
        let error = pb::Error { code: refusal.code as i32, message: refusal.text, retry_after_ms, devices: Vec::new() };
        self.write(request_id, S::Error(error));
    }

    /// Largest frame accepted now: small until the login.
    fn max_frame_len(&self) -> usize {
        let limits = &self.ctx.config.limits;
        if self.device.is_some() {
            limits.max_frame_len
        } else {
            limits.max_frame_len_before_login
        }
    }

    /// Takes a request from the bucket `limiter` keeps for `key`, unless
    /// the client's address is exempt from rate limits.
    fn limit<K>(&self, limiter: &ratelimit::Limiter<K>, key: impl FnOnce() -> K) -> Result<(), RateLimited>
    where
        K: std::hash::Hash + Eq + Send + Sync + 'static,
    {
        match self.source {
            Some(_) => limiter.take(key(), Instant::now()),
            None => Ok(()),
        }
    }

    /// Decodes and handles every whole frame in the input buffer.
    async fn handle_frames(&mut self) -> Result<(), End> {
        loop {
            // Read again for each frame: a login raises it.
            let max = self.max_frame_len();
            let frame = match codec::decode_client_frame(&mut self.inbuf, max) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(DecodeError::TooLarge { len, max }) => {
                    metrics::counter!("tern_bad_frames_total", "reason" => "too_large").increment(1);
                    return Err(End::Fatal(ErrorCode::FrameTooLarge, format!("frame of {len} bytes exceeds {max}")));
                }
                Err(e @ (DecodeError::Malformed(_) | DecodeError::TooManyEntries { .. })) => {
                    metrics::counter!("tern_bad_frames_total", "reason" => "malformed").increment(1);
                    return Err(End::Fatal(ErrorCode::MalformedFrame, format!("undecodable frame: {e}")));
                }
            };
            self.handle(frame).await?;
        }
    }

    async fn handle(&mut self, frame: pb::ClientFrame) -> Result<(), End> {
        let id = frame.request_id;
        let logged_in = self.device.is_some();
        match frame.kind {
            None => {
                metrics::counter!("tern_bad_frames_total", "reason" => "unknown").increment(1);
                Err(End::Fatal(ErrorCode::UnknownFrame, "frame without a known kind".into()))
            }
            Some(C::Hello(_) | C::Register(_) | C::Login(_) | C::LinkDevice(_)) if logged_in => {
                Err(End::Fatal(ErrorCode::ProtocolViolation, "already logged in".into()))
            }
            Some(C::Hello(hello)) => self.hello(id, &hello),
            Some(C::Register(req)) => {
                let token = self.ctx.config.registration.token.clone();
                let challenge = self.challenge.take();
                let limited = self.source.map_or(Ok(()), |ip| self.ctx.rate.register.take(ip, Instant::now()));
                let result = match limited {
                    Ok(()) => auth::register(self.accounts(), challenge.as_ref(), token.as_deref(), &req).await,
                    Err(limited) => Err(limited.into()),
                };
                self.logged_in(id, result).await
            }
            Some(C::Login(req)) => {
                let challenge = self.challenge.take();
                let login = |accounts| auth::login(accounts, challenge.as_ref(), &req);
                let result = attempt(&self.ctx, self.source, &req.handle, login).await;
                self.logged_in(id, result).await
            }
            Some(C::LinkDevice(req)) => {
                let challenge = self.challenge.take();
                let link = |accounts| auth::link_device(accounts, challenge.as_ref(), &req);
                let result = attempt(&self.ctx, self.source, &req.handle, link).await;
                self.logged_in(id, result).await
            }
            Some(_) if !logged_in => {
                self.write_error(id, ErrorCode::Unauthenticated, "log in first");
                Ok(())
            }
            Some(C::Send(req)) if self.device.as_ref().is_some_and(|d| d.sends_ready.is_some()) => {
                self.waiting_sends.push_back((id, req));
                Ok(())
            }
            Some(C::Send(req)) => self.start_send(id, req).await,
            Some(C::Ack(ack)) => {
                self.ack(ack.up_to_seq).await;
                Ok(())
            }
            Some(C::Ping(p)) => {
                self.write(id, S::Pong(pb::Pong { nonce: p.nonce }));
                Ok(())
            }
            Some(C::ListDevices(req)) => {
                self.list_devices(id, &req.handle).await;
                Ok(())
            }
            Some(C::PublishKeys(req)) => {
                self.publish_keys(id, req).await;
                Ok(())
            }
            Some(C::ClaimKeys(req)) => {
                self.claim_keys(id, req).await;
                Ok(())
            }
            Some(C::UnlinkDevice(req)) => {
                self.unlink_device(id, req.device_id).await;
                Ok(())
            }
            Some(C::SetProfile(req)) => {
                self.set_profile(id, req).await;
                Ok(())
            }
            Some(C::GetProfile(req)) => {
                self.get_profile(id, &req.handle).await;
                Ok(())
            }
            Some(C::SetPresence(req)) => {
                self.set_presence(id, req).await;
                Ok(())
            }
            Some(C::WatchPresence(req)) => {
                self.watch_presence(id, req.handles).await;
                Ok(())
            }
            Some(C::RegisterPush(req)) => {
                self.register_push(id, Some(req)).await;
                Ok(())
            }
            Some(C::UnregisterPush(_)) => {
                self.register_push(id, None).await;
                Ok(())
            }
        }
    }

    fn accounts(&self) -> Accounts<'_> {
        accounts(&self.ctx)
    }

    fn hello(&mut self, request_id: u64, hello: &pb::Hello) -> Result<(), End> {
        if hello.version != tern_protocol::PROTOCOL_VERSION {
            return Err(End::Fatal(
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {} is not supported; this broker speaks {}",
                    hello.version,
                    tern_protocol::PROTOCOL_VERSION
                ),
            ));
        }
        let mut nonce = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut nonce);
        let mut exporter = [0u8; 32];
        if self.conn.export_keying_material(&mut exporter, tern_protocol::auth::EXPORTER_LABEL, b"").is_err() {
            return Err(End::Fatal(ErrorCode::Internal, "TLS exporter unavailable".into()));
        }
        self.challenge = Some(Challenge { nonce, exporter });
        let limits = &self.ctx.config.limits;
        let challenge = pb::Challenge {
            nonce: Bytes::copy_from_slice(&nonce),
            version: tern_protocol::PROTOCOL_VERSION,
            broker_id: self.ctx.config.node.clone(),
            max_frame_len: limits.max_frame_len as u32,
            max_body_len: limits.max_body_len as u32,
        };
        self.write(request_id, S::Challenge(challenge));
        Ok(())
    }

    async fn logged_in(&mut self, request_id: u64, result: Result<(String, u32), Refusal>) -> Result<(), End> {
        let (handle, device) = match result {
            Ok(ok) => ok,
            Err(refusal) => {
                metrics::counter!("tern_logins_total", "result" => "refused").increment(1);
                tracing::debug!(code = ?refusal.code, reason = %refusal.text, "login refused");
                self.refuse(request_id, refusal);
                self.failed_logins += 1;
                if self.failed_logins >= self.ctx.config.limits.max_login_attempts {
                    return Err(End::Fatal(ErrorCode::Unauthenticated, "too many failed login attempts".into()));
                }
                return Ok(());
            }
        };
        let queue = QueueKey::new(&handle, device);
        // Attach before reading the bounds: an entry stored in between is
        // both handed over and read, and pushed once.
        let key = match self.ctx.store.account(&handle) {
            Ok(account) => account.and_then(|a| a.device(device).map(|d| d.public_key)).unwrap_or_default(),
            Err(e) => return Err(End::Fatal(auth::store_refusal(&e).0, e.to_string())),
        };
        let (mut attachment, inbox) =
            self.ctx.router.attach_as(queue.clone(), key, self.ctx.config.limits.max_inflight);
        self.notices = attachment.notices.take();
        let bounds = match self.ctx.store.bounds(queue.clone()).await {
            Ok(b) => b,
            Err(e) => return Err(End::Fatal(auth::store_refusal(&e).0, e.to_string())),
        };
        metrics::counter!("tern_logins_total", "result" => "ok").increment(1);
        tracing::debug!(%queue, pending = bounds.depth(), "logged in");
        let window = self.ctx.config.limits.max_inflight;
        let mesh = self.ctx.mesh.clone();
        let (epoch, sends_ready) = match mesh {
            Some(mesh) => {
                let (epoch, previous) = mesh.device_online(&queue).await;
                let sends_ready = (!previous.is_empty()).then(|| mesh.flush_sender(&queue, previous.clone()));
                self.held = Some(mesh.hold_for_handback(&queue, epoch, previous));
                (Some(epoch), sends_ready)
            }
            None => (None, None),
        };
        let key_stock = Some(crate::keys::stock_at_login(&self.ctx.store, &queue));
        let delivery = Delivery::new(queue, bounds.head, window, attachment.previously_pushed);
        self.device = Some(LoggedIn { delivery, attachment, epoch, sends_ready });
        crate::presence::changed(&self.ctx, &QueueKey::new(&handle, device), true);
        if let Some(push) = &self.ctx.push {
            push.online(&QueueKey::new(&handle, device));
        }
        self.inbox = Some(inbox);
        let ok = pb::LoginOk { handle, device_id: device, acked_seq: bounds.head, pending: bounds.depth(), key_stock };
        self.write(request_id, S::LoginOk(ok));
        Ok(())
    }

    /// What the device sent through its previous broker has moved on: takes
    /// the sends that waited for it, in the order they came.
    async fn take_waiting_sends(&mut self) -> Result<(), End> {
        if let Some(d) = &mut self.device {
            d.sends_ready = None;
        }
        while let Some((request_id, req)) = self.waiting_sends.pop_front() {
            self.start_send(request_id, req).await?;
        }
        Ok(())
    }

    /// Validates a `Send` and queues it for the store before the next frame
    /// is read, so one device's sends get their seqs in the order it sent
    /// them; the durable outcome is awaited with the other pending sends.
    async fn start_send(&mut self, request_id: u64, mut req: pb::Send) -> Result<(), End> {
        let Some(d) = &self.device else { return Ok(()) };
        if let Err(limited) = self.limit(&self.ctx.rate.sends, || d.delivery.queue.clone()) {
            metrics::counter!("tern_sends_total", "result" => ErrorCode::RateLimited.as_str_name()).increment(1);
            self.refuse(request_id, limited.into());
            return Ok(());
        }
        let limits = &self.ctx.config.limits;
        let id = match MessageId::from_slice(&req.message_id) {
            Ok(id) => id,
            Err(e) => {
                self.write_error(request_id, ErrorCode::InvalidArgument, &e.to_string());
                return Ok(());
            }
        };
        if let Err(e) = tern_protocol::validate_handle(&req.to) {
            self.write_error(request_id, ErrorCode::InvalidHandle, &format!("recipient: {e}"));
            return Ok(());
        }
        let longest = req.envelopes.iter().map(|e| e.body.len()).chain([req.body.len()]).max().unwrap_or(0);
        if longest > limits.max_body_len {
            let text = format!("body of {longest} bytes exceeds the maximum of {}", limits.max_body_len);
            self.write_error(request_id, ErrorCode::PayloadTooLarge, &text);
            return Ok(());
        }
        if !req.envelopes.is_empty() && (!req.body.is_empty() || req.to_device != 0) {
            let text = "a send has a body (for every device, or for `to_device`) or envelopes, not both";
            self.write_error(request_id, ErrorCode::InvalidArgument, text);
            return Ok(());
        }
        let sender = d.delivery.queue.clone();
        let started = Instant::now();
        if self.ctx.mesh.is_some() {
            // A recipient registered at another broker: fetch the record
            // (and keep it) before the store looks for its devices.
            if let Err(e) = self.accounts().account(&req.to).await {
                self.send_done(request_id, id, started, Err(e));
                return Ok(());
            }
        }
        let body = send_body(&mut req);
        let outcome = tokio::select! {
            biased;
            () = self.ctx.cancel.cancelled() => {
                return Err(End::Fatal(ErrorCode::ShuttingDown, "the broker is shutting down; reconnect".into()));
            }
            submitted = self.ctx.store.submit_enqueue(sender, id.0, req.to, body, !req.no_receipt) => submitted,
        };
        match outcome {
            Ok(outcome) => self.pending.push(Box::pin(async move { (request_id, id, started, outcome.await) })),
            Err(e) => self.send_done(request_id, id, started, Err(e)),
        }
        Ok(())
    }

    fn send_done(&mut self, request_id: u64, id: MessageId, started: Instant, result: Result<Enqueued, StoreError>) {
        metrics::histogram!("tern_send_ack_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(done) => {
                let label = if done.duplicate { "duplicate" } else { "ok" };
                metrics::counter!("tern_sends_total", "result" => label).increment(1);
                let ack = pb::SendAck {
                    message_id: Bytes::copy_from_slice(&id.0),
                    duplicate: done.duplicate,
                    accepted_at_ms: done.accepted_at_ms,
                    recipients: done.recipients,
                };
                self.write(request_id, S::SendAck(ack));
            }
            Err(StoreError::DevicesChanged(devices)) => {
                let code = ErrorCode::DevicesChanged;
                metrics::counter!("tern_sends_total", "result" => code.as_str_name()).increment(1);
                let message = StoreError::DevicesChanged(devices.clone()).to_string();
                self.write(request_id, S::Error(pb::Error { code: code as i32, message, retry_after_ms: 0, devices }));
            }
            Err(e) => {
                let refusal = auth::store_refusal(&e);
                metrics::counter!("tern_sends_total", "result" => refusal.0.as_str_name()).increment(1);
                self.refuse(request_id, refusal.into());
            }
        }
    }

    async fn ack(&mut self, up_to: u64) {
        let Some(d) = &mut self.device else { return };
        if up_to > d.delivery.last_pushed() {
            // A seq this session never pushed: the client acks from another
            // connection's (or broker's) seq space. Clamped, see `on_ack`.
            metrics::counter!("tern_acks_clamped_total").increment(1);
            let pushed = d.delivery.last_pushed();
            tracing::debug!(queue = %d.delivery.queue, up_to, pushed, "ack beyond what this session pushed; clamped");
        }
        let Some(up_to) = d.delivery.on_ack(up_to) else { return };
        metrics::counter!("tern_acks_total").increment(1);
        if let Err(e) = self.ctx.store.ack_detached(d.delivery.queue.clone(), up_to).await {
            tracing::warn!(queue = %d.delivery.queue, up_to, error = %e, "ack not stored; the entries will be delivered again");
        }
    }

    /// Unlinks a device of this device's user (at the handle's primary in
    /// a mesh), then answers with the list after.
    async fn unlink_device(&mut self, request_id: u64, device: u32) {
        let Some(d) = &self.device else { return };
        let me = d.delivery.queue.clone();
        let result = match &self.ctx.mesh {
            Some(mesh) => mesh.unlink(me.handle(), device, me.device()).await,
            None => self.ctx.store.unlink(me.handle(), device, me.device()).await,
        };
        match result {
            Ok(_) => {
                metrics::counter!("tern_devices_unlinked_total").increment(1);
                tracing::info!(handle = %me.handle(), device, by = me.device(), "device unlinked");
                self.ctx.router.unlink(&QueueKey::new(me.handle(), device));
                let handle = me.handle().to_owned();
                self.list_devices(request_id, &handle).await;
            }
            Err(e) => self.refuse(request_id, auth::store_refusal(&e).into()),
        }
    }

    /// The account of `handle` for a lookup request (`ListDevices`,
    /// `GetProfile`): counted by the lookup rate limit, the handle checked;
    /// `None` once the refusal is written.
    pub(super) async fn looked_up(
        &mut self,
        request_id: u64,
        handle: &str,
    ) -> Option<std::sync::Arc<crate::store::Account>> {
        if let Some(d) = &self.device {
            if let Err(limited) = self.limit(&self.ctx.rate.lookups, || d.delivery.queue.clone()) {
                self.refuse(request_id, limited.into());
                return None;
            }
        }
        if let Err(e) = tern_protocol::validate_handle(handle) {
            self.write_error(request_id, ErrorCode::InvalidHandle, &e.to_string());
            return None;
        }
        match self.accounts().account(handle).await {
            Ok(Some(account)) => Some(account),
            Ok(None) => {
                self.write_error(request_id, ErrorCode::UnknownRecipient, &format!("no user {handle:?}"));
                None
            }
            Err(e) => {
                self.refuse(request_id, auth::store_refusal(&e).into());
                None
            }
        }
    }

    async fn list_devices(&mut self, request_id: u64, handle: &str) {
        let Some(account) = self.looked_up(request_id, handle).await else { return };
        let devices = account
            .devices
            .iter()
            // A client refuses a longer list (`codec::decode_server_frame`).
            .take(tern_protocol::MAX_LISTED_DEVICES)
            .map(|d| pb::DeviceInfo {
                device_id: d.id,
                public_key: Bytes::copy_from_slice(&d.public_key),
                added_at_ms: d.added_at_ms,
                identity_key: d.identity_key.map(|k| Bytes::copy_from_slice(&k)).unwrap_or_default(),
            })
            .collect();
        let version = account.devices_version();
        let list = pb::DeviceList { handle: handle.to_owned(), devices, version };
        self.write(request_id, S::DeviceList(list));
    }
}

/// What a `Send` puts in each queue: its body, or its envelopes.
fn send_body(req: &mut pb::Send) -> crate::store::SendBody {
    if req.to_device != 0 {
        return crate::store::SendBody::ToDevice { device: req.to_device, body: std::mem::take(&mut req.body) };
    }
    if req.envelopes.is_empty() {
        return std::mem::take(&mut req.body).into();
    }
    crate::store::SendBody::PerDevice {
        envelopes: std::mem::take(&mut req.envelopes),
        to_version: req.to_devices_version,
        own_version: req.own_devices_version,
    }
}

fn accounts(ctx: &Context) -> Accounts<'_> {
    Accounts { store: &ctx.store, mesh: ctx.mesh.as_ref(), lookups: &ctx.lookups, local_only: false }
}

/// A `Login` or `LinkDevice` for `handle` from `source` (the rate limits'
/// key, `None` when exempt): one attempt of the source address's, and a
/// failure one of the handle's. While the handle's failures are used up,
/// only records held here are consulted and a failure is answered
/// `RATE_LIMITED`; a signature that verifies always logs in, so nobody can
/// lock a user out.
async fn attempt<'a, F, Fut>(
    ctx: &'a Context,
    source: Option<IpAddr>,
    handle: &str,
    check: F,
) -> Result<(String, u32), Refusal>
where
    F: FnOnce(Accounts<'a>) -> Fut,
    Fut: Future<Output = Result<(String, u32), Refusal>>,
{
    let Some(ip) = source else { return check(accounts(ctx)).await };
    ctx.rate.login.take(ip, Instant::now())?;
    let failures = &ctx.rate.login_failures;
    let cooling = failures.is_empty(&handle.to_owned(), Instant::now());
    match check(Accounts { local_only: cooling, ..accounts(ctx) }).await {
        Err(refusal) if refusal.is_auth_failure() => match failures.take(handle.to_owned(), Instant::now()) {
            Ok(()) => Err(refusal),
            Err(limited) => Err(limited.into()),
        },
        result => result,
    }
}

/// The error code a store failure is reported with.
pub(crate) fn store_error_code(e: &StoreError) -> ErrorCode {
    auth::store_refusal(e).0
}

/// Checks a profile change (lengths, no control characters).
pub(crate) fn check_profile(update: &pb::SetProfile) -> Result<(), String> {
    profile::check(update)
}

/// The error code and text a store failure is reported with.
pub(crate) fn store_refusal(e: &StoreError) -> (ErrorCode, String) {
    auth::store_refusal(e)
}

/// Makes room for the next read: enough for the frame being received (as its
/// prefix announces, within the maximum), never more than 64 KiB at a time;
/// 1 KiB between frames (most chat frames are smaller), so an idle
/// connection holds little.
fn reserve(buf: &mut BytesMut, max_frame: usize) -> &mut BytesMut {
    let want = match codec::peek_len(buf, max_frame) {
        Ok(Some(len)) => (len + codec::LEN_PREFIX).saturating_sub(buf.len()).clamp(512, 64 * 1024),
        _ => 1024,
    };
    if buf.capacity() - buf.len() < want {
        buf.reserve(want);
    }
    buf
}

async fn replaced(device: &Option<LoggedIn>) {
    match device {
        Some(d) => d.attachment.replaced.cancelled().await,
        None => std::future::pending().await,
    }
}

async fn unlinked(device: &Option<LoggedIn>) {
    match device {
        Some(d) => d.attachment.unlinked.cancelled().await,
        None => std::future::pending().await,
    }
}

async fn lost(device: &Option<LoggedIn>) {
    match device {
        Some(d) => d.attachment.lost.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Resolves once the device's sends may be taken (see `LoggedIn::sends_ready`).
async fn sends_ready(device: &Option<LoggedIn>) {
    match device.as_ref().and_then(|d| d.sends_ready.clone()) {
        Some(mut ready) => ready.wait().await,
        None => std::future::pending().await,
    }
}

/// The queue's head once it is in order (see `Session::held`).
async fn handed_back(held: &mut Option<tokio::sync::oneshot::Receiver<Option<u64>>>) -> Option<u64> {
    match held {
        Some(rx) => rx.await.ok().flatten(),
        None => std::future::pending().await,
    }
}

async fn handed(inbox: &mut Option<tokio::sync::mpsc::Receiver<crate::router::Pushed>>) -> Option<(u64, Bytes)> {
    match inbox {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn notice(
    notices: &mut Option<tokio::sync::mpsc::Receiver<crate::router::Notice>>,
) -> Option<crate::router::Notice> {
    match notices {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn lagged(device: &Option<LoggedIn>) {
    match device {
        Some(d) => loop {
            d.attachment.lag.wake.notified().await;
            if d.attachment.lag.lagged.swap(false, Ordering::AcqRel) {
                return;
            }
        },
        None => std::future::pending().await,
    }
}
