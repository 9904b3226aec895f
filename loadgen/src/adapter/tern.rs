//! Tern through `tern-client`: each user is a handle with one device,
//! registered on first use (its key kept in memory for later logins) at
//! its own target, the only broker its config lists (so a slow broker is not
//! hidden by failing over to another), unless `--failover` lists the other
//! targets after it (the client then moves to the next when its broker
//! fails, as an application given several brokers would). All connections
//! share a few UDP sockets per CA file. Deliveries are acknowledged
//! cumulatively every 64 items, or when none arrived for 5 ms.
//!
//! The client reconnects by itself and keeps its sends and its dedup
//! state across reconnects. Should it stop for good (a login refused after
//! a reconnect, a broker ending the session as replaced), the connection
//! logs in again with a new client so the user keeps sending and receiving;
//! such restarts are counted (`Ledger::client_restarts`), since a new
//! client no longer knows what the old one had delivered.
//!
//! With `--devices N` or `--e2e` (`chat`), a user is several clients, one
//! per device, or end-to-end clients: see [`devices`].

use std::collections::hash_map::{Entry, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::RngCore;
use tern_client::{
    Backoff, Client, ClientConfig, ClientError, Identity, Incoming, MessageId, SendError, SendOptions, SharedEndpoint,
};
use tokio::task::JoinHandle;

use super::{user_name, AckFuture, Adapter, Connection, Options, SendFailure};
use crate::ledger::Ledger;
use crate::target::Targets;
use crate::LoadError;

mod devices;

/// Deliveries acknowledged together.
const ACK_EVERY: u64 = 64;
/// Acknowledge what arrived once the queue has been quiet this long.
const ACK_IDLE: Duration = Duration::from_millis(5);

pub(crate) struct TernAdapter {
    targets: Targets,
    run_id: String,
    /// Per target, one config per shared endpoint; each lists only its target.
    configs: Vec<Vec<ClientConfig>>,
    identities: Vec<Mutex<Option<Identity>>>,
    send: SendOptions,
    /// Devices per user (`--devices`).
    devices: u32,
    /// Messages encrypted end to end (`--e2e`).
    e2e: bool,
    /// Where the end-to-end clients keep their key files (one directory
    /// per device; the state itself stays in memory). Removed at cleanup.
    e2e_dir: PathBuf,
}

impl TernAdapter {
    pub(crate) async fn open(targets: &Targets, opts: &Options, users: u32) -> Result<Self, LoadError> {
        let cas = ca_per_target(targets, &opts.ca)?;
        // Endpoints are shared by the targets that trust the same file (and
        // use the same address family): `--endpoints` sockets for each.
        let mut endpoints: HashMap<(PathBuf, bool), Vec<SharedEndpoint>> = HashMap::new();
        let mut configs = Vec::with_capacity(targets.len());
        for (t, ca) in cas.into_iter().enumerate() {
            let base = base_config(&brokers_of(targets, t, opts.failover), ca.clone(), opts)?;
            let shared = match endpoints.entry((ca, targets.all()[t].addr.starts_with('['))) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => {
                    e.insert((0..opts.endpoints.max(1)).map(|_| shared_endpoint(&base)).collect::<Result<_, _>>()?)
                }
            };
            configs.push(shared.iter().map(|e| ClientConfig { endpoint: Some(e.clone()), ..base.clone() }).collect());
        }
        let adapter = Self {
            targets: targets.clone(),
            run_id: opts.run_id.clone(),
            configs,
            identities: (0..users).map(|_| Mutex::new(None)).collect(),
            send: SendOptions { receipt: opts.receipts },
            devices: opts.devices.max(1),
            e2e: opts.e2e,
            e2e_dir: std::env::temp_dir().join(format!("tern-loadgen-{}", opts.run_id)),
        };
        for t in 0..targets.len() {
            adapter.probe(t).await?;
        }
        Ok(adapter)
    }

    /// Checks broker `t` answers a QUIC handshake with our trust settings.
    async fn probe(&self, t: usize) -> Result<(), LoadError> {
        let key = tern_client::generate_key();
        let probe = Identity { handle: format!("lg-{}-probe", self.run_id), device_id: 1, signing_key: key };
        // Only this target, even with failover.
        let config = ClientConfig { brokers: vec![self.targets.all()[t].addr.clone()], ..self.configs[t][0].clone() };
        match Client::connect(config, probe).await {
            // Reachable: the login is refused (unknown handle), which is fine.
            Ok(c) => {
                c.close().await;
                Ok(())
            }
            Err(e @ (ClientError::Connect { .. } | ClientError::Resolve { .. } | ClientError::NoBroker)) => {
                Err(LoadError::Unreachable {
                    target: self.targets.all()[t].to_string(),
                    reason: e.to_string(),
                    hint: "is tern-broker listening there (`tern-broker --listen HOST:PORT --data-dir DIR`)? \
                           A certificate error means --ca is not the broker's certificate (DATA_DIR/tls/cert.pem)."
                        .into(),
                })
            }
            Err(_) => Ok(()),
        }
    }

    /// User `user`'s config: its target, and one of that target's endpoints.
    pub(crate) fn config(&self, user: u32) -> ClientConfig {
        let per_target = &self.configs[self.targets.index_of(user)];
        let round = user as usize / self.targets.len();
        per_target[round % per_target.len()].clone()
    }

    fn setup_error(&self, user: u32, e: impl std::fmt::Display) -> LoadError {
        LoadError::Setup {
            target: self.targets.of_user(user).to_string(),
            what: format!("user {user}"),
            reason: e.to_string(),
        }
    }

    /// The target user `user` connects to.
    pub(crate) fn target_of(&self, user: u32) -> String {
        self.targets.of_user(user).to_string()
    }

    /// User `user`'s handle.
    pub(crate) fn handle(&self, user: u32) -> String {
        user_name(&self.run_id, user)
    }

    /// The directory for the end-to-end files of `device` of `user`.
    pub(crate) fn e2e_dir(&self, user: u32, device: u32) -> PathBuf {
        self.e2e_dir.join(format!("{user}-{device}"))
    }

    /// Logs user `user` in (its first device), registering it the first time.
    pub(crate) async fn login(&self, user: u32) -> Result<Client, LoadError> {
        let known = self.identities[user as usize].lock().expect("identity lock").clone();
        match known {
            Some(identity) => Client::connect(self.config(user), identity).await.map_err(|e| self.setup_error(user, e)),
            None => {
                let handle = user_name(&self.run_id, user);
                let (client, identity) =
                    Client::register(self.config(user), &handle, None).await.map_err(|e| self.setup_error(user, e))?;
                *self.identities[user as usize].lock().expect("identity lock") = Some(identity);
                Ok(client)
            }
        }
    }
}

#[async_trait]
impl Adapter for TernAdapter {
    async fn prepare(&self, user: u32) -> Result<(), LoadError> {
        if self.identities[user as usize].lock().expect("identity lock").is_none() {
            self.login(user).await?.close().await;
        }
        Ok(())
    }

    async fn connect(&self, user: u32, ledger: Arc<Ledger>) -> Result<Box<dyn Connection>, LoadError> {
        if self.devices > 1 || self.e2e {
            return devices::connect(self, user, ledger).await;
        }
        let client = self.login(user).await?;
        let identity = client.identity().clone();
        let slot = Arc::new(Mutex::new(client));
        let closing = Arc::new(AtomicBool::new(false));
        let relogin = Relogin { config: self.config(user), identity, closing: closing.clone() };
        let reader = tokio::spawn(serve(slot.clone(), user, ledger, relogin));
        Ok(Box::new(TernConnection { client: slot, run_id: self.run_id.clone(), reader, closing, send: self.send }))
    }

    async fn cleanup(&self) {
        // Made by `--e2e` and `keys`; absent otherwise.
        let _ = std::fs::remove_dir_all(&self.e2e_dir);
    }

    fn tern(&self) -> Option<&TernAdapter> {
        Some(self)
    }
}

/// What a connection needs to replace a client that stopped.
struct Relogin {
    config: ClientConfig,
    identity: Identity,
    /// Set by [`Connection::close`]: a stop is then expected.
    closing: Arc<AtomicBool>,
}

/// Receives for the client in `slot`; when it stops without being closed,
/// logs in again and puts the new client in the slot.
async fn serve(slot: Arc<Mutex<Client>>, user: u32, ledger: Arc<Ledger>, relogin: Relogin) {
    loop {
        let client = slot.lock().expect("client slot").clone();
        receive(&client, user, 0, &ledger).await;
        if relogin.closing.load(Ordering::Relaxed) {
            return;
        }
        tracing::warn!(user, "the client stopped for good; logging in again with a new one");
        ledger.client_restarted();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let fresh = loop {
            match Client::connect(relogin.config.clone(), relogin.identity.clone()).await {
                Ok(c) => break c,
                Err(e) => tracing::warn!(user, error = %e, "login of a replacement client failed; retrying"),
            }
            tokio::time::sleep(backoff.next_delay()).await;
            if relogin.closing.load(Ordering::Relaxed) {
                return;
            }
        };
        *slot.lock().expect("client slot") = fresh;
    }
}

/// Feeds deliveries to device `device` of `user` to the ledger and
/// acknowledges them, until the client stops.
async fn receive(client: &Client, user: u32, device: u32, ledger: &Ledger) {
    let mut unacked: Option<u64> = None;
    let mut count = 0u64;
    loop {
        // The timer runs only while an ack is owed, so an idle connection
        // waits without waking: a 5 ms timeout on every wait woke each idle
        // connection 200 times a second, and at 50,000 connections that
        // took both CPUs of the load generator's machine.
        let next = match unacked {
            Some(_) => tokio::time::timeout(ACK_IDLE, client.recv()).await,
            None => Ok(client.recv().await),
        };
        let item = match next {
            Ok(Some(item)) => item,
            Ok(None) => break,
            Err(_) => {
                if let Some(seq) = unacked.take() {
                    client.ack(seq).await;
                }
                continue;
            }
        };
        if let Incoming::Message { body, .. } = &item {
            ledger.delivered_to(user, device, body);
        }
        unacked = Some(item.seq());
        count += 1;
        if count.is_multiple_of(ACK_EVERY) {
            client.ack(item.seq()).await;
            unacked = None;
        }
    }
}

/// The CA file of each target: `--ca` given once serves all of them, or
/// once per target in order.
fn ca_per_target(targets: &Targets, cas: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    match cas {
        [] => Err(LoadError::Args(format!(
            "{targets} needs --ca FILE: the broker's certificate (DATA_DIR/tls/cert.pem for a self-signed one)"
        ))),
        [one] => Ok(vec![one.clone(); targets.len()]),
        many if many.len() == targets.len() => Ok(many.to_vec()),
        many => Err(LoadError::Args(format!(
            "{} --ca files for {} --target URLs: give --ca once (a PEM file holding every broker's \
             certificate) or once per --target, in the same order",
            many.len(),
            targets.len()
        ))),
    }
}

/// The brokers the users of target `t` list: that target, and with
/// `failover` the others after it, in rotation (so the users of a failed
/// broker spread over the rest).
fn brokers_of(targets: &Targets, t: usize, failover: bool) -> Vec<String> {
    let all = targets.all();
    let n = if failover { all.len() } else { 1 };
    (0..n).map(|i| all[(t + i) % all.len()].addr.clone()).collect()
}

/// The client settings for the users of one target, checked.
fn base_config(brokers: &[String], ca: PathBuf, opts: &Options) -> Result<ClientConfig, LoadError> {
    let mut base = ClientConfig::new(brokers.to_vec(), ca);
    base.client_name = concat!("tern-loadgen/", env!("CARGO_PKG_VERSION")).into();
    base.connect_timeout = opts.connect_timeout;
    base.request_timeout = opts.request_timeout;
    base.idle_timeout = opts.idle_timeout;
    base.reconnect_to_last = !opts.move_on_reconnect;
    base.incoming_buffer = 4096;
    base.validate().map_err(|e| LoadError::Args(e.to_string()))?;
    Ok(base)
}

/// A UDP socket trusting `base.ca`; an unreadable CA file is a bad argument.
fn shared_endpoint(base: &ClientConfig) -> Result<SharedEndpoint, LoadError> {
    SharedEndpoint::new(base).map_err(|e| match e {
        ClientError::Ca { .. } => LoadError::Args(e.to_string()),
        e => LoadError::Io(e.to_string()),
    })
}

struct TernConnection {
    /// The current client (replaced if one stops for good).
    client: Arc<Mutex<Client>>,
    run_id: String,
    reader: JoinHandle<()>,
    closing: Arc<AtomicBool>,
    send: SendOptions,
}

impl TernConnection {
    fn client(&self) -> Client {
        self.client.lock().expect("client slot").clone()
    }
}

fn failure(e: SendError) -> SendFailure {
    let kind = match &e {
        SendError::Refused { code, .. } => format!("{code:?}"),
        SendError::Timeout(_) => "Timeout".into(),
        SendError::Closed(_) => "Closed".into(),
        SendError::TooLarge { .. } => "TooLarge".into(),
        _ => "Invalid".into(),
    };
    SendFailure::new(kind, e)
}

#[async_trait]
impl Connection for TernConnection {
    async fn submit(&self, to: u32, body: Bytes) -> Result<AckFuture, SendFailure> {
        let mut id = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut id);
        let to = user_name(&self.run_id, to);
        let pending = self.client().enqueue_with(MessageId(id), &to, body, self.send).await.map_err(failure)?;
        Ok(Box::pin(async move { pending.await.map(|_| ()).map_err(failure) }))
    }

    async fn ping(&self) -> Result<(), SendFailure> {
        self.client().ping().await.map(|_| ()).map_err(failure)
    }

    async fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
        self.client().close().await;
        self.reader.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(n: u16) -> Targets {
        Targets::new((1..=n).map(|p| format!("tern://127.0.0.1:{p}").parse().unwrap()).collect()).unwrap()
    }

    #[test]
    fn one_ca_serves_every_target_or_one_per_target() {
        let (a, b, c) = (PathBuf::from("a.pem"), PathBuf::from("b.pem"), PathBuf::from("c.pem"));
        assert_eq!(
            ca_per_target(&targets(3), std::slice::from_ref(&a)).unwrap(),
            vec![a.clone(), a.clone(), a.clone()]
        );
        let each = vec![a.clone(), b.clone(), c];
        assert_eq!(ca_per_target(&targets(3), &each).unwrap(), each);
        assert_eq!(ca_per_target(&targets(1), std::slice::from_ref(&b)).unwrap(), vec![b.clone()]);
        let err = ca_per_target(&targets(3), &[a, b]).unwrap_err().to_string();
        assert!(err.contains("2 --ca files for 3 --target"), "{err}");
        assert!(ca_per_target(&targets(2), &[]).unwrap_err().to_string().contains("needs --ca"));
    }

    #[test]
    fn failover_lists_every_target_starting_with_the_users_own() {
        let t = targets(3);
        assert_eq!(brokers_of(&t, 1, false), vec!["127.0.0.1:2"]);
        assert_eq!(brokers_of(&t, 1, true), vec!["127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:1"]);
        assert_eq!(brokers_of(&targets(1), 0, true), vec!["127.0.0.1:1"]);
    }
}
