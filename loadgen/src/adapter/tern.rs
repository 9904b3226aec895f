//! Tern through `tern-client`: each user is a handle with one device,
//! registered on first use (its key kept in memory for later logins). All
//! connections share a few UDP sockets. Deliveries are acknowledged
//! cumulatively every 64 items, or when none arrived for 5 ms.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::RngCore;
use tern_client::{Client, ClientConfig, ClientError, Identity, Incoming, MessageId, SendError, SharedEndpoint};
use tokio::task::JoinHandle;

use super::{user_name, AckFuture, Adapter, Connection, Options, SendFailure};
use crate::ledger::Ledger;
use crate::target::Target;
use crate::LoadError;

/// Deliveries acknowledged together.
const ACK_EVERY: u64 = 64;
/// Acknowledge what arrived once the queue has been quiet this long.
const ACK_IDLE: Duration = Duration::from_millis(5);

pub(crate) struct TernAdapter {
    target: String,
    run_id: String,
    configs: Vec<ClientConfig>,
    identities: Vec<Mutex<Option<Identity>>>,
}

impl TernAdapter {
    pub(crate) async fn open(target: &Target, opts: &Options, users: u32) -> Result<Self, LoadError> {
        let ca = opts.ca.clone().ok_or_else(|| {
            LoadError::Args(format!(
                "{target} needs --ca FILE: the broker's certificate (DATA_DIR/tls/cert.pem for a self-signed one)"
            ))
        })?;
        let mut base = ClientConfig::new(vec![target.addr.clone()], ca);
        base.client_name = concat!("tern-loadgen/", env!("CARGO_PKG_VERSION")).into();
        base.connect_timeout = opts.connect_timeout;
        base.request_timeout = opts.request_timeout;
        base.idle_timeout = opts.idle_timeout;
        base.incoming_buffer = 4096;
        base.validate().map_err(|e| LoadError::Args(e.to_string()))?;
        let mut configs = Vec::new();
        for _ in 0..opts.endpoints.max(1) {
            let endpoint = SharedEndpoint::new(&base).map_err(|e| match e {
                ClientError::Ca { .. } => LoadError::Args(e.to_string()),
                e => LoadError::Io(e.to_string()),
            })?;
            configs.push(ClientConfig { endpoint: Some(endpoint), ..base.clone() });
        }
        let adapter = Self {
            target: target.to_string(),
            run_id: opts.run_id.clone(),
            configs,
            identities: (0..users).map(|_| Mutex::new(None)).collect(),
        };
        adapter.probe().await?;
        Ok(adapter)
    }

    /// Checks the broker answers a QUIC handshake with our trust settings.
    async fn probe(&self) -> Result<(), LoadError> {
        let key = tern_client::generate_key();
        let probe = Identity { handle: format!("lg-{}-probe", self.run_id), device_id: 1, signing_key: key };
        match Client::connect(self.configs[0].clone(), probe).await {
            // Reachable: the login is refused (unknown handle), which is fine.
            Ok(c) => {
                c.close().await;
                Ok(())
            }
            Err(e @ (ClientError::Connect { .. } | ClientError::Resolve { .. } | ClientError::NoBroker)) => {
                Err(LoadError::Unreachable {
                    target: self.target.clone(),
                    reason: e.to_string(),
                    hint: "is tern-broker listening there (`tern-broker --listen HOST:PORT --data-dir DIR`)? \
                           A certificate error means --ca is not the broker's certificate (DATA_DIR/tls/cert.pem)."
                        .into(),
                })
            }
            Err(_) => Ok(()),
        }
    }

    fn config(&self, user: u32) -> ClientConfig {
        self.configs[user as usize % self.configs.len()].clone()
    }

    fn setup_error(&self, user: u32, e: impl std::fmt::Display) -> LoadError {
        LoadError::Setup { target: self.target.clone(), what: format!("user {user}"), reason: e.to_string() }
    }

    async fn login(&self, user: u32) -> Result<Client, LoadError> {
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
        let client = self.login(user).await?;
        let reader = tokio::spawn(receive(client.clone(), user, ledger));
        Ok(Box::new(TernConnection { client, run_id: self.run_id.clone(), reader }))
    }
}

/// Feeds deliveries to the ledger and acknowledges them.
async fn receive(client: Client, user: u32, ledger: Arc<Ledger>) {
    let mut unacked: Option<u64> = None;
    let mut count = 0u64;
    loop {
        let item = match tokio::time::timeout(ACK_IDLE, client.recv()).await {
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
            ledger.delivered(user, body);
        }
        unacked = Some(item.seq());
        count += 1;
        if count % ACK_EVERY == 0 {
            client.ack(item.seq()).await;
            unacked = None;
        }
    }
}

struct TernConnection {
    client: Client,
    run_id: String,
    reader: JoinHandle<()>,
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
        let pending = self.client.enqueue(MessageId(id), &user_name(&self.run_id, to), body).await.map_err(failure)?;
        Ok(Box::pin(async move { pending.await.map(|_| ()).map_err(failure) }))
    }

    async fn ping(&self) -> Result<(), SendFailure> {
        self.client.ping().await.map(|_| ()).map_err(failure)
    }

    async fn close(&self) {
        self.client.close().await;
        self.reader.abort();
    }
}
