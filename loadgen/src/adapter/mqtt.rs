//! MQTT 3.1.1 through `rumqttc`. User `i` is client id `lg-RUN-i` with a
//! persistent session (clean session off) subscribed at QoS 1 to
//! `tern/lg/RUN/i`; a send is a QoS 1 publish to the recipient's topic and
//! its ack is the broker's `PUBACK`. [`MqttAdapter::open`] probes the broker
//! with one connection; `prepare` connects a user, subscribes, waits for the
//! `SUBACK` and disconnects cleanly, so the broker queues the user's QoS 1
//! messages while it is offline; `cleanup` connects each known user once
//! more with clean session on, which discards its session.
//!
//! Each connection's task polls its `rumqttc` event loop: incoming publishes
//! go to the [`Ledger`], and `rumqttc` writes their `PUBACK` as it reads them
//! (before the ledger sees them, but the task hands every event on before it
//! polls again, and stops at its own `DISCONNECT`, so only a crash of the
//! load generator loses one). `rumqttc` 0.25's `publish` resolves when the
//! request is queued, not acked, so [`AckMatcher`] pairs each publish with
//! the packet id `rumqttc` gives it (`Outgoing::Publish(pkid)`, in the order
//! the publishes were queued) and resolves it on the `PUBACK` of that id.
//!
//! Limits of a comparison with Tern:
//!
//! - Mosquitto acks a QoS 1 publish once the message is in memory; with
//!   `persistence true` it writes its whole state every `autosave_interval`
//!   (30 min by default), so a `PUBACK` is not durable the way Tern's
//!   synced `SendAck` is.
//! - Mosquitto queues at most `max_queued_messages` (default 1000) QoS 1
//!   messages per client beyond the `max_inflight_messages` (default 20) in
//!   flight, online or offline, and drops the rest after acking them: they
//!   show as lost. For a benchmark raise `max_queued_messages` (0: no
//!   limit) and set `max_inflight_messages 512`, Tern's default push window
//!   (`limits.max_inflight`). A connection here has at most 256 publishes
//!   awaiting their `PUBACK` (Tern's `limits.max_pending_sends`).
//! - Mosquitto leaves Nagle's algorithm on unless `set_tcp_nodelay true`:
//!   without it deliveries at a few hundred messages per second took about
//!   10 ms instead of 1 ms on loopback.
//! - A connection is not re-established after an error: its sends fail as
//!   `Closed` and its deliveries stop (Tern's client reconnects).
//! - Every delivery gets its own `PUBACK` (MQTT has no cumulative ack).
//!
//! Credentials: by default a `CONNECT` carries none (mosquitto with
//! `allow_anonymous true`; RabbitMQ's MQTT plugin then logs the client in
//! as its `mqtt.default_user`). With `TERN_LOADGEN_MQTT_PASSWORD` set, every
//! connection (probe and clean-up included) sends its client id as the user
//! name and that password: ejabberd's `mod_mqtt` refuses a `CONNECT` without
//! a password unless it comes with a TLS client certificate, and checks the
//! pair against ejabberd's own authentication (benches/compare runs it with
//! anonymous login, which accepts any pair).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS,
    SubscribeReasonCode,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{user_name, AckFuture, Adapter, Connection, Options, SendFailure};
use crate::ledger::Ledger;
use crate::target::Target;
use crate::LoadError;

/// Requests (publishes, acks) a connection can queue for its event loop.
const REQUEST_CAPACITY: usize = 1024;
/// Publishes a connection may have waiting for their `PUBACK` before the
/// next one waits (packet ids run from 1 to this): Tern's default
/// `limits.max_pending_sends`. `rumqttc` keeps a slot per id, so this is
/// also most of a connection's memory.
const INFLIGHT: u16 = 256;
/// Largest packet sent or accepted: room for the largest body the CLI allows (1 MiB).
const MAX_PACKET: usize = 2 << 20;
/// Users whose sessions `cleanup` discards at once.
const CLEANUP_CONCURRENCY: usize = 64;
/// When set (and not empty), the password every connection logs in with,
/// its client id being the user name; unset, connections send no credentials.
const PASSWORD_ENV: &str = "TERN_LOADGEN_MQTT_PASSWORD";

type AckSender = oneshot::Sender<Result<(), SendFailure>>;

#[derive(Debug)]
pub(crate) struct MqttAdapter {
    target: String,
    /// Host as `rumqttc` wants it (IPv6 in brackets).
    host: String,
    port: u16,
    run_id: String,
    opts: Options,
    /// From `TERN_LOADGEN_MQTT_PASSWORD`: sent with the client id as the user name.
    password: Option<String>,
    /// Users with a persistent session on the broker.
    known: Vec<AtomicBool>,
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error(transparent)]
    Connection(#[from] ConnectionError),
    #[error("no CONNACK/SUBACK within {0:?}")]
    Timeout(Duration),
    #[error("subscription refused by the broker")]
    SubscribeRefused,
    #[error("the event loop stopped taking requests")]
    Stopped,
}

impl MqttAdapter {
    pub(crate) async fn open(target: &Target, opts: &Options, users: u32) -> Result<Self, LoadError> {
        let host = target.host();
        let adapter = Self {
            target: target.to_string(),
            host: if host.contains(':') { format!("[{host}]") } else { host.to_owned() },
            port: target.port(),
            run_id: token(&opts.run_id),
            opts: opts.clone(),
            password: std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty()),
            known: (0..users).map(|_| AtomicBool::new(false)).collect(),
        };
        adapter.probe().await?;
        Ok(adapter)
    }

    /// Connects once with a throw-away clean session.
    async fn probe(&self) -> Result<(), LoadError> {
        let id = format!("lg-{}-probe", self.run_id);
        match self.dial(&id, true, None, |_| {}).await {
            Ok((client, mut eventloop)) => {
                hang_up(&client, &mut eventloop, self.opts.connect_timeout).await;
                Ok(())
            }
            Err(DialError::Connection(ConnectionError::ConnectionRefused(code))) => Err(LoadError::Setup {
                target: self.target.clone(),
                what: "the probe connection".into(),
                reason: format!(
                    "the broker refused it ({code:?}); mosquitto 2 refuses anonymous clients unless the \
                     listener's config says `allow_anonymous true`, and ejabberd's mod_mqtt refuses a \
                     client without a password (set {PASSWORD_ENV})"
                ),
            }),
            Err(e) => Err(LoadError::Unreachable {
                target: self.target.clone(),
                reason: e.to_string(),
                hint: "is an MQTT broker listening there? Start mosquitto with a config file holding \
                       `listener PORT HOST` and `allow_anonymous true` (`mosquitto -c FILE`)."
                    .into(),
            }),
        }
    }

    fn setup_error(&self, user: u32, e: impl std::fmt::Display) -> LoadError {
        LoadError::Setup { target: self.target.clone(), what: format!("session of user {user}"), reason: e.to_string() }
    }

    fn topic(&self, user: u32) -> String {
        format!("tern/lg/{}/{user}", self.run_id)
    }

    fn options(&self, client_id: &str, clean_session: bool) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, self.host.clone(), self.port);
        let keep_alive = (self.opts.idle_timeout / 3).as_secs().max(1);
        o.set_clean_session(clean_session)
            .set_keep_alive(Duration::from_secs(keep_alive))
            .set_inflight(INFLIGHT)
            .set_request_channel_capacity(REQUEST_CAPACITY)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        if let Some(password) = &self.password {
            o.set_credentials(client_id, password.as_str());
        }
        o
    }

    /// Connects `client_id`; with `subscribe`, subscribes to that topic at
    /// QoS 1 unless the broker kept the session. Publishes that arrive
    /// meanwhile (queued while offline) go to `deliver`.
    async fn dial(
        &self,
        client_id: &str,
        clean_session: bool,
        subscribe: Option<String>,
        mut deliver: impl FnMut(&[u8]),
    ) -> Result<(AsyncClient, EventLoop), DialError> {
        let (client, mut eventloop) = AsyncClient::new(self.options(client_id, clean_session), REQUEST_CAPACITY);
        let mut net = NetworkOptions::new();
        net.set_tcp_nodelay(true);
        net.set_connection_timeout(self.opts.connect_timeout.as_secs().max(1));
        eventloop.set_network_options(net);
        let limit = self.opts.connect_timeout;
        let handshake = async {
            let session_present = loop {
                if let Event::Incoming(Packet::ConnAck(ack)) = eventloop.poll().await? {
                    break ack.session_present;
                }
            };
            let Some(topic) = subscribe.filter(|_| !session_present) else { return Ok(()) };
            client.subscribe(topic, QoS::AtLeastOnce).await.map_err(|_| DialError::Stopped)?;
            loop {
                match eventloop.poll().await? {
                    Event::Incoming(Packet::SubAck(ack)) => {
                        return match ack.return_codes.first() {
                            Some(SubscribeReasonCode::Success(_)) => Ok(()),
                            _ => Err(DialError::SubscribeRefused),
                        };
                    }
                    Event::Incoming(Packet::Publish(p)) => deliver(&p.payload),
                    _ => {}
                }
            }
        };
        match tokio::time::timeout(limit, handshake).await {
            Ok(Ok(())) => Ok((client, eventloop)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DialError::Timeout(limit)),
        }
    }
}

/// Disconnects cleanly: returns once the `DISCONNECT` is written (or the
/// connection failed, or `limit` passed).
async fn hang_up(client: &AsyncClient, eventloop: &mut EventLoop, limit: Duration) {
    let done = async {
        if client.disconnect().await.is_err() {
            return;
        }
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(limit, done).await;
}

#[async_trait]
impl Adapter for MqttAdapter {
    async fn prepare(&self, user: u32) -> Result<(), LoadError> {
        if self.known[user as usize].load(Relaxed) {
            return Ok(());
        }
        let id = user_name(&self.run_id, user);
        let (client, mut eventloop) =
            self.dial(&id, false, Some(self.topic(user)), |_| {}).await.map_err(|e| self.setup_error(user, e))?;
        self.known[user as usize].store(true, Relaxed);
        hang_up(&client, &mut eventloop, self.opts.connect_timeout).await;
        Ok(())
    }

    async fn connect(&self, user: u32, ledger: Arc<Ledger>) -> Result<Box<dyn Connection>, LoadError> {
        let id = user_name(&self.run_id, user);
        let (client, eventloop) = self
            .dial(&id, false, Some(self.topic(user)), |body| ledger.delivered(user, body))
            .await
            .map_err(|e| self.setup_error(user, e))?;
        self.known[user as usize].store(true, Relaxed);
        let acks = Arc::new(Mutex::new(AckMatcher::default()));
        let driver = tokio::spawn(drive(eventloop, user, ledger, acks.clone()));
        Ok(Box::new(MqttConnection {
            client,
            acks,
            order: tokio::sync::Mutex::new(()),
            topic_prefix: format!("tern/lg/{}/", self.run_id),
            ping_topic: format!("tern/lg/{}/ping", self.run_id),
            timeout: self.opts.request_timeout,
            close_timeout: self.opts.connect_timeout,
            driver: Mutex::new(Some(driver)),
        }))
    }

    /// Discards the sessions of the users this run created.
    async fn cleanup(&self) {
        let users = (0..self.known.len() as u32).filter(|&u| self.known[u as usize].load(Relaxed));
        let mut discarding = futures::stream::iter(users.map(|u| async move {
            let (client, mut eventloop) = self.dial(&user_name(&self.run_id, u), true, None, |_| {}).await?;
            hang_up(&client, &mut eventloop, self.opts.connect_timeout).await;
            Ok::<_, DialError>(())
        }))
        .buffer_unordered(CLEANUP_CONCURRENCY);
        let mut failed = 0u32;
        while let Some(res) = discarding.next().await {
            if let Err(e) = res {
                failed += 1;
                tracing::debug!(error = %e, "session not discarded");
            }
        }
        if failed > 0 {
            tracing::warn!(failed, "some persistent sessions of this run were not discarded");
        }
    }
}

/// Polls the event loop: deliveries to the ledger, packet ids and `PUBACK`s
/// to the matcher, until the connection ends.
async fn drive(mut eventloop: EventLoop, user: u32, ledger: Arc<Ledger>, acks: Arc<Mutex<AckMatcher>>) {
    let reason = loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => ledger.delivered(user, &p.payload),
            Ok(Event::Incoming(Packet::PubAck(ack))) => lock(&acks).acked(ack.pkid),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => lock(&acks).published(pkid),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break "connection closed".to_owned(),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(user, error = %e, "MQTT connection failed");
                break e.to_string();
            }
        }
    };
    lock(&acks).close(SendFailure::new("Closed", reason));
}

fn lock(acks: &Mutex<AckMatcher>) -> std::sync::MutexGuard<'_, AckMatcher> {
    acks.lock().expect("ack matcher lock")
}

/// Pairs queued publishes with their packet ids and `PUBACK`s. Publishes
/// are queued in order and `rumqttc` numbers them in that order, but either
/// side may be seen first.
#[derive(Debug, Default)]
struct AckMatcher {
    /// Queued publishes not numbered yet, oldest first.
    unnumbered: VecDeque<AckSender>,
    /// Packet ids not paired with a publish yet, oldest first, and whether
    /// their `PUBACK` already came.
    unpaired: VecDeque<(u16, bool)>,
    /// Publishes waiting for their `PUBACK`, by packet id.
    in_flight: HashMap<u16, AckSender>,
    /// Set once the connection ended: everything fails with it.
    closed: Option<SendFailure>,
}

impl AckMatcher {
    /// A publish was queued.
    fn queued(&mut self, ack: AckSender) {
        if let Some(failure) = &self.closed {
            let _ = ack.send(Err(failure.clone()));
        } else if let Some((pkid, acked)) = self.unpaired.pop_front() {
            if acked {
                let _ = ack.send(Ok(()));
            } else {
                self.in_flight.insert(pkid, ack);
            }
        } else {
            self.unnumbered.push_back(ack);
        }
    }

    /// The next queued publish went out as `pkid`.
    fn published(&mut self, pkid: u16) {
        if let Some(ack) = self.unnumbered.pop_front() {
            self.in_flight.insert(pkid, ack);
        } else {
            self.unpaired.push_back((pkid, false));
        }
    }

    /// The broker acked `pkid`.
    fn acked(&mut self, pkid: u16) {
        if let Some(ack) = self.in_flight.remove(&pkid) {
            let _ = ack.send(Ok(()));
        } else if let Some(entry) = self.unpaired.iter_mut().find(|(id, acked)| *id == pkid && !acked) {
            entry.1 = true;
        }
    }

    /// The connection ended: what waits fails, and so will later publishes.
    fn close(&mut self, failure: SendFailure) {
        for ack in self.unnumbered.drain(..).chain(self.in_flight.drain().map(|(_, ack)| ack)) {
            let _ = ack.send(Err(failure.clone()));
        }
        self.unpaired.clear();
        self.closed = Some(failure);
    }
}

#[derive(Debug)]
struct MqttConnection {
    client: AsyncClient,
    acks: Arc<Mutex<AckMatcher>>,
    /// Held while a publish is queued and registered, so the two orders agree.
    order: tokio::sync::Mutex<()>,
    topic_prefix: String,
    /// Publishing here (no subscribers) and getting the `PUBACK` is a ping.
    ping_topic: String,
    timeout: Duration,
    close_timeout: Duration,
    /// The event loop's task; taken by `close`.
    driver: Mutex<Option<JoinHandle<()>>>,
}

impl MqttConnection {
    async fn publish(&self, topic: String, body: Bytes) -> Result<AckFuture, SendFailure> {
        let (tx, rx) = oneshot::channel();
        {
            let _order = self.order.lock().await;
            self.client
                .publish_bytes(topic, QoS::AtLeastOnce, false, body)
                .await
                .map_err(|_| SendFailure::new("Closed", "the connection is closed"))?;
            lock(&self.acks).queued(tx);
        }
        let timeout = self.timeout;
        Ok(Box::pin(async move {
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(SendFailure::new("Closed", "the connection task ended")),
                Err(_) => Err(SendFailure::new("Timeout", format!("no PUBACK within {timeout:?}"))),
            }
        }))
    }
}

#[async_trait]
impl Connection for MqttConnection {
    async fn submit(&self, to: u32, body: Bytes) -> Result<AckFuture, SendFailure> {
        self.publish(format!("{}{to}", self.topic_prefix), body).await
    }

    async fn ping(&self) -> Result<(), SendFailure> {
        self.publish(self.ping_topic.clone(), Bytes::new()).await?.await
    }

    async fn close(&self) {
        let Some(mut driver) = self.driver.lock().expect("driver lock").take() else { return };
        let closed = async {
            if self.client.disconnect().await.is_ok() {
                let _ = (&mut driver).await;
            }
        };
        if tokio::time::timeout(self.close_timeout, closed).await.is_err() {
            tracing::debug!("MQTT disconnect timed out");
        }
        driver.abort();
    }
}

/// `s` as one topic level: anything but letters, digits, `-` and `_` becomes `_`.
fn token(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender() -> (AckSender, oneshot::Receiver<Result<(), SendFailure>>) {
        oneshot::channel()
    }

    #[test]
    fn pairs_publishes_with_packet_ids_in_order() {
        let mut m = AckMatcher::default();
        let (a, mut ra) = sender();
        let (b, mut rb) = sender();
        m.queued(a);
        m.queued(b);
        m.published(7);
        m.published(8);
        m.acked(8);
        assert_eq!(rb.try_recv(), Ok(Ok(())));
        assert!(ra.try_recv().is_err(), "7 is not acked yet");
        m.acked(7);
        assert_eq!(ra.try_recv(), Ok(Ok(())));
    }

    #[test]
    fn packet_id_and_ack_may_come_before_the_publish_is_registered() {
        let mut m = AckMatcher::default();
        m.published(1);
        m.published(2);
        m.acked(1);
        let (a, mut ra) = sender();
        let (b, mut rb) = sender();
        m.queued(a);
        m.queued(b);
        assert_eq!(ra.try_recv(), Ok(Ok(())));
        assert!(rb.try_recv().is_err());
        m.acked(2);
        assert_eq!(rb.try_recv(), Ok(Ok(())));
    }

    #[test]
    fn reused_packet_ids_and_unsolicited_acks() {
        let mut m = AckMatcher::default();
        let (a, mut ra) = sender();
        m.queued(a);
        m.acked(1); // nothing numbered yet: ignored
        m.published(1);
        assert!(ra.try_recv().is_err());
        m.acked(1);
        assert_eq!(ra.try_recv(), Ok(Ok(())));
        let (b, mut rb) = sender();
        m.queued(b);
        m.published(1);
        m.acked(1);
        assert_eq!(rb.try_recv(), Ok(Ok(())));
    }

    #[test]
    fn closing_fails_waiting_and_later_publishes() {
        let mut m = AckMatcher::default();
        let (a, mut ra) = sender();
        let (b, mut rb) = sender();
        m.queued(a);
        m.queued(b);
        m.published(1);
        m.close(SendFailure::new("Closed", "gone"));
        assert_eq!(ra.try_recv().unwrap().unwrap_err().kind, "Closed");
        assert_eq!(rb.try_recv().unwrap().unwrap_err().kind, "Closed");
        let (c, mut rc) = sender();
        m.queued(c);
        assert_eq!(rc.try_recv().unwrap().unwrap_err().kind, "Closed");
    }

    fn adapter(password: Option<&str>) -> MqttAdapter {
        let opts = Options {
            ca: Vec::new(),
            run_id: "r1".into(),
            request_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            endpoints: 1,
            idle_timeout: Duration::from_secs(30),
            failover: false,
            move_on_reconnect: false,
            receipts: false,
            devices: 1,
            e2e: false,
        };
        MqttAdapter {
            target: "mqtt://127.0.0.1:1883".into(),
            host: "127.0.0.1".into(),
            port: 1883,
            run_id: "r1".into(),
            opts,
            password: password.map(str::to_owned),
            known: Vec::new(),
        }
    }

    #[test]
    fn credentials_only_with_a_password() {
        assert!(adapter(None).options("lg-r1-3", false).credentials().is_none());
        let login = adapter(Some("pw")).options("lg-r1-3", false).credentials().expect("credentials");
        assert_eq!((login.username.as_str(), login.password.as_str()), ("lg-r1-3", "pw"));
    }

    #[test]
    fn tokens_are_topic_safe() {
        assert_eq!(token("ab12"), "ab12");
        assert_eq!(token("a/b+#"), "a_b__");
    }
}
