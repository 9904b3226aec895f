//! End-to-end messaging over a [`Client`]: every message encrypted (Olm,
//! [`crate::e2e`]) for each current device of the recipient and each other
//! device of the sender, so the broker only ever holds ciphertext.
//!
//! A send fetches both device lists (cached), claims keys for the devices
//! it has no session with (or whose identity keys changed), encrypts one
//! envelope per device, saves the state, and sends them together with the
//! lists' versions. A broker that holds other lists refuses the send whole
//! (`DEVICES_CHANGED`); the lists are fetched again and the message is
//! encrypted anew, so no device is left unable to decrypt it.
//!
//! A delivery is decrypted with the session its sender started (checked
//! against the sender device's login key from its device list), recorded
//! as received and saved before the application sees it. One that cannot
//! be decrypted comes out as [`SecureIncoming::Failed`], and its sender is
//! asked, over a new session, to send it again (session recovery); the
//! resend comes out under the original id.
//!
//! The state lives in the profile directory ([`Vault`]): with
//! [`Persistence::Shared`] every step takes an exclusive lock on
//! `e2e.lock`, reads the state, and writes it back before the lock is let
//! go, so several processes (a `tern recv` and a `tern send` on one
//! profile) never overwrite each other's ratchets.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use rand::RngCore;
use tern_protocol::pb::{self, e2e_payload::Kind as P};
use tern_protocol::MessageId;

use crate::e2e::{recovery_request, DecryptError, E2e, E2eError, VerifiedKeys};
use crate::{Client, Incoming, Outgoing, SendError, SendOptions, SendReceipt};

/// How many times a send is encrypted again after `DEVICES_CHANGED`.
const MAX_ATTEMPTS: usize = 4;

/// The fallback key is replaced when older than this (checked whenever keys
/// are published: at open and when the broker says the stock is low).
const FALLBACK_MAX_AGE_MS: u64 = 7 * 24 * 3600 * 1000;

/// How the end-to-end state is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// On disk, re-read and written back under a file lock at every step:
    /// other processes may use the same profile.
    Shared,
    /// On disk, held by this process alone (written after every step).
    Exclusive,
    /// In memory only (load generation): lost when the process ends.
    Memory,
}

/// Why an end-to-end operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecureError {
    /// The broker refused or the client failed.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The end-to-end state or a key failed a check.
    #[error(transparent)]
    E2e(#[from] E2eError),
    /// Devices of the recipient (or of this user) have published no keys
    /// yet: nothing can be encrypted for them, so nothing was sent.
    #[error("{handle:?} devices {devices:?} have published no keys yet; they must log in once")]
    NoKeys {
        /// The user.
        handle: String,
        /// Its devices without keys.
        devices: Vec<u32>,
    },
    /// The claimed keys are signed by a login key other than the one the
    /// device list names.
    #[error("the keys claimed for {handle}/{device} are not signed by the key its device list names")]
    WrongDeviceKey {
        /// The user.
        handle: String,
        /// The device.
        device: u32,
    },
    /// The device lists changed at every attempt.
    #[error("the device lists kept changing; try again")]
    DevicesKeptChanging,
    /// The state file's lock could not be taken.
    #[error("cannot lock {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A decrypted delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SecureIncoming {
    /// A text message.
    Message {
        /// Sequence number to acknowledge ([`Secure::ack`]).
        seq: u64,
        /// The message's id as the application knows it (for a resend
        /// after a session recovery, the original's).
        id: MessageId,
        /// The sender (authenticated by the broker; the sender device's
        /// keys were checked against its login key).
        from: String,
        /// The sending device.
        from_device: u32,
        /// The recipient user (this user, or another for a copy of a
        /// message this user sent from another device).
        to: String,
        /// When the broker accepted it, ms since the Unix epoch.
        sent_at_ms: u64,
        /// The text.
        text: String,
    },
    /// The recipient read messages this user sent.
    Read {
        /// Sequence number to acknowledge.
        seq: u64,
        /// Who read them.
        from: String,
        /// On which device.
        from_device: u32,
        /// The messages read.
        message_ids: Vec<MessageId>,
        /// When, ms since the Unix epoch.
        read_at_ms: u64,
    },
    /// A delivered receipt from the broker, as [`Incoming::Receipt`].
    Receipt(Incoming),
    /// A message that could not be decrypted; its sender was asked to send
    /// it again (it then comes as a `Message` with this id).
    Failed {
        /// Sequence number to acknowledge.
        seq: u64,
        /// The message id.
        id: MessageId,
        /// The sender.
        from: String,
        /// The sending device.
        from_device: u32,
        /// Why.
        error: String,
    },
    /// Something handled here (a redelivery, a recovery request answered):
    /// acknowledge it, nothing to show.
    Handled {
        /// Sequence number to acknowledge.
        seq: u64,
    },
}

impl SecureIncoming {
    /// The sequence number to acknowledge.
    pub fn seq(&self) -> u64 {
        match self {
            Self::Message { seq, .. } | Self::Read { seq, .. } | Self::Failed { seq, .. } | Self::Handled { seq } => {
                *seq
            }
            Self::Receipt(item) => item.seq(),
        }
    }
}

/// The end-to-end state and how it is kept.
#[derive(Debug)]
struct Vault {
    dir: PathBuf,
    persistence: Persistence,
    state: E2e,
}

impl Vault {
    /// Runs `step` on the state, kept as the persistence says.
    fn with<T, E: From<E2eError> + From<SecureError>>(
        &mut self,
        step: impl FnOnce(&mut E2e) -> Result<T, E>,
    ) -> Result<T, E> {
        let _lock = match self.persistence {
            Persistence::Shared => {
                let lock = lock(&self.dir).map_err(E::from)?;
                self.state = E2e::open(&self.dir)?;
                Some(lock)
            }
            _ => None,
        };
        let out = step(&mut self.state)?;
        if self.persistence != Persistence::Memory {
            self.state.save()?;
        }
        Ok(out)
    }
}

fn lock(dir: &Path) -> Result<std::fs::File, SecureError> {
    let path = dir.join("e2e.lock");
    let locked = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .and_then(|f| f.lock().map(|()| f));
    locked.map_err(|source| SecureError::Lock { path, source })
}

/// A [`Client`] whose messages are encrypted end to end.
#[derive(Debug, Clone)]
pub struct Secure {
    client: Client,
    vault: Arc<Mutex<Vault>>,
    lists: Arc<Mutex<HashMap<String, pb::DeviceList>>>,
    /// The users this user's presence settings allow, as last seen.
    allowed: Arc<Mutex<Option<std::collections::HashSet<String>>>>,
    /// The delivery `recv` took from the client and has not handed out yet:
    /// a `recv` dropped while it waited leaves it here for the next.
    taken: Arc<Mutex<Option<Incoming>>>,
}

impl Secure {
    /// End-to-end messaging for `client`, with its state in `dir` (the
    /// profile directory). Publishes this device's keys if the broker's
    /// stock says so, and again whenever the broker says it runs low.
    pub async fn open(client: Client, dir: &Path, persistence: Persistence) -> Result<Self, SecureError> {
        let state = E2e::open(dir)?;
        let vault = Vault { dir: dir.to_owned(), persistence, state };
        let secure = Self {
            client,
            vault: Arc::new(Mutex::new(vault)),
            lists: Arc::default(),
            allowed: Arc::default(),
            taken: Arc::default(),
        };
        secure.publish_keys().await?;
        let watcher = secure.clone();
        let mut stock = secure.client.key_stock();
        tokio::spawn(async move {
            while stock.changed().await.is_ok() {
                if let Err(e) = watcher.publish_keys().await {
                    tracing::warn!(error = %e, "cannot publish one-time keys");
                }
            }
        });
        Ok(secure)
    }

    /// The client underneath (for acks, receipts, device lists).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn vault<T, E: From<E2eError> + From<SecureError>>(
        &self,
        step: impl FnOnce(&mut E2e) -> Result<T, E>,
    ) -> Result<T, E> {
        self.vault.lock().unwrap_or_else(PoisonError::into_inner).with(step)
    }

    /// Publishes keys when the broker's stock is below its low-water mark
    /// (or it has no identity or fallback key for this device).
    pub async fn publish_keys(&self) -> Result<(), SecureError> {
        let stock = *self.client.key_stock().borrow();
        let me = self.client.identity().clone();
        // Saved before it is sent: a crash after the send must not make
        // the same key ids again for other keys.
        let publish = self.vault(|e| {
            if stock.identity {
                e.rotate_fallback_if_older(crate::identity::now_ms(), FALLBACK_MAX_AGE_MS);
            }
            Ok::<_, SecureError>(e.keys_to_publish(&me, &stock))
        })?;
        let Some(publish) = publish else { return Ok(()) };
        self.client.publish_keys(publish).await?;
        self.vault(|e| {
            e.mark_published();
            Ok::<_, SecureError>(())
        })
    }

    /// Makes `peer` one of the users this user shares presence with (the
    /// two converse), if it is not yet: presence is shown only when both
    /// allow each other. Best effort.
    async fn converse_with(&self, peer: &str) {
        if peer == self.client.identity().handle {
            return;
        }
        let known = self.allowed.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map(|a| a.contains(peer));
        let allowed = match known {
            Some(true) => return,
            // Not read yet: an empty change reads the settings.
            None => self.client.set_presence(pb::SetPresence::default()).await,
            Some(false) => Ok(pb::PresenceSettings::default()),
        };
        let Ok(mut settings) = allowed else { return };
        if !settings.allowed.iter().any(|a| a == peer) {
            let update = pb::SetPresence { allow: vec![peer.to_owned()], ..Default::default() };
            match self.client.set_presence(update).await {
                Ok(after) => settings = after,
                Err(e) => return tracing::debug!(%peer, error = %e, "presence not shared"),
            }
        }
        let set = settings.allowed.into_iter().collect();
        *self.allowed.lock().unwrap_or_else(PoisonError::into_inner) = Some(set);
    }

    /// The device list of `handle`, from the cache unless `refresh`.
    async fn list(&self, handle: &str, refresh: bool) -> Result<pb::DeviceList, SecureError> {
        if !refresh {
            if let Some(list) = self.lists.lock().unwrap_or_else(PoisonError::into_inner).get(handle) {
                return Ok(list.clone());
            }
        }
        let list = self.client.devices(handle).await?;
        self.lists.lock().unwrap_or_else(PoisonError::into_inner).insert(handle.to_owned(), list.clone());
        Ok(list)
    }

    /// Sends `text` to every device of `to` and this user's other devices.
    pub async fn send_text(&self, to: &str, text: &str) -> Result<SendReceipt, SecureError> {
        let payload = pb::E2ePayload { kind: Some(P::Text(text.to_owned())), replaces: Bytes::new() };
        self.send_payload(to, &payload, random_id(), SendOptions::default()).await
    }

    /// Tells the devices of `to` (and this user's others) that the
    /// messages `ids` from `to` were read (end to end; no receipt).
    pub async fn send_read(&self, to: &str, ids: &[MessageId]) -> Result<SendReceipt, SecureError> {
        let read = pb::ReadReceipt {
            message_ids: ids.iter().map(|id| Bytes::copy_from_slice(&id.0)).collect(),
            read_at_ms: crate::identity::now_ms(),
        };
        let payload = pb::E2ePayload { kind: Some(P::Read(read)), replaces: Bytes::new() };
        self.send_payload(to, &payload, random_id(), SendOptions { receipt: false }).await
    }

    /// Encrypts `payload` for every current device of `to` and this user's
    /// other devices and sends it under `id`; again, for new lists, when
    /// the broker says they changed.
    pub async fn send_payload(
        &self,
        to: &str,
        payload: &pb::E2ePayload,
        id: MessageId,
        options: SendOptions,
    ) -> Result<SendReceipt, SecureError> {
        let me = self.client.identity().clone();
        for attempt in 0..MAX_ATTEMPTS {
            let refresh = attempt > 0;
            let to_list = self.list(to, refresh).await?;
            let own_list = if to == me.handle { to_list.clone() } else { self.list(&me.handle, refresh).await? };
            let targets = targets(&me, &to_list, &own_list);
            let claimed = self.claim_for(&targets).await?;
            let envelopes = self.vault(|e| {
                targets
                    .iter()
                    .map(|(handle, d)| {
                        if stale(e, handle, d) {
                            e.forget_sessions(handle, d.device_id);
                        }
                        let keys = claimed.get(&(handle.clone(), d.device_id));
                        let body = e.encrypt(&me, handle, d.device_id, keys, payload, id.0)?;
                        let identity_key = d.identity_key.clone();
                        Ok(pb::Envelope { handle: handle.clone(), device: d.device_id, identity_key, body })
                    })
                    .collect::<Result<Vec<_>, SecureError>>()
            })?;
            let out = Outgoing {
                envelopes,
                to_devices_version: to_list.version,
                own_devices_version: own_list.version,
                ..Outgoing::default()
            };
            match self.client.enqueue_outgoing(id, to, out, options).await?.await {
                Err(SendError::DevicesChanged(changed)) => {
                    tracing::debug!(?changed, "device lists changed; encrypting again");
                }
                result => {
                    let receipt = result?;
                    self.converse_with(to).await;
                    return Ok(receipt);
                }
            }
        }
        Err(SecureError::DevicesKeptChanging)
    }

    /// Claims keys of the targets this device has no usable session with.
    async fn claim_for(
        &self,
        targets: &[(String, pb::DeviceInfo)],
    ) -> Result<HashMap<(String, u32), VerifiedKeys>, SecureError> {
        let mut need: HashMap<&str, Vec<&pb::DeviceInfo>> = HashMap::new();
        self.vault(|e| {
            for (handle, d) in targets {
                if !e.has_session(handle, d.device_id) || stale(e, handle, d) {
                    need.entry(handle.as_str()).or_default().push(d);
                }
            }
            Ok::<_, SecureError>(())
        })?;
        let mut out = HashMap::new();
        for (handle, devices) in need {
            let ids: Vec<u32> = devices.iter().map(|d| d.device_id).collect();
            let answer = self.client.claim_keys(handle, &ids).await?;
            if !answer.without_keys.is_empty() {
                return Err(SecureError::NoKeys { handle: handle.to_owned(), devices: answer.without_keys });
            }
            for claimed in &answer.devices {
                let verified = E2e::verify_claimed(claimed, handle)?;
                let listed = devices.iter().find(|d| d.device_id == claimed.device_id);
                if listed.is_none_or(|d| d.public_key.as_ref() != verified.device_key) {
                    let device = claimed.device_id;
                    return Err(SecureError::WrongDeviceKey { handle: handle.to_owned(), device });
                }
                out.insert((handle.to_owned(), claimed.device_id), verified);
            }
        }
        Ok(out)
    }

    /// The next delivery, decrypted; `None` once the client has stopped.
    /// Acknowledge each with [`Secure::ack`] once processed, before the
    /// next `recv`.
    ///
    /// Cancel-safe: a `recv` dropped while it waits (for the sender's
    /// device list, say) keeps the delivery it took, and the next `recv`
    /// hands it out; so it may be raced in a `select!` against a timer.
    pub async fn recv(&self) -> Option<SecureIncoming> {
        let kept = self.taken.lock().unwrap_or_else(PoisonError::into_inner).take();
        let item = match kept {
            Some(item) => item,
            None => self.client.recv().await?,
        };
        *self.taken.lock().unwrap_or_else(PoisonError::into_inner) = Some(item.clone());
        let out = self.open_item(item).await;
        self.taken.lock().unwrap_or_else(PoisonError::into_inner).take();
        Some(out)
    }

    /// What a delivery comes out as.
    async fn open_item(&self, item: Incoming) -> SecureIncoming {
        let Incoming::Message { seq, id, from, from_device, to, sent_at_ms, body } = item else {
            return SecureIncoming::Receipt(item);
        };
        let opened = self.open_message(&from, from_device, id, &body).await;
        let failed = |error: String| SecureIncoming::Failed { seq, id, from: from.clone(), from_device, error };
        let payload = match opened {
            Ok(Some(payload)) => payload,
            Ok(None) => return SecureIncoming::Handled { seq },
            Err(error) => {
                tracing::warn!(%from, from_device, %id, %error, "cannot decrypt; asking the sender to send it again");
                if let Err(e) = self.ask_again(&from, from_device, id).await {
                    tracing::warn!(%from, from_device, error = %e, "cannot ask for the message again");
                }
                return failed(error);
            }
        };
        let app_id = MessageId::from_slice(&payload.replaces).unwrap_or(id);
        if matches!(payload.kind, Some(P::Text(_))) {
            // In the background: nothing may wait once the message is
            // recorded as received.
            let (me, peer) = (self.clone(), from.clone());
            tokio::spawn(async move { me.converse_with(&peer).await });
        }
        match payload.kind {
            Some(P::Text(text)) => SecureIncoming::Message { seq, id: app_id, from, from_device, to, sent_at_ms, text },
            Some(P::Read(read)) => SecureIncoming::Read {
                seq,
                from,
                from_device,
                message_ids: read.message_ids.iter().filter_map(|m| MessageId::from_slice(m).ok()).collect(),
                read_at_ms: read.read_at_ms,
            },
            Some(P::Recovery(r)) => {
                tracing::debug!(%from, from_device, "asked to send a message again");
                let me = self.clone();
                tokio::spawn(async move { me.send_again(&from, from_device, &r.message_id).await });
                SecureIncoming::Handled { seq }
            }
            None => failed("an empty payload".into()),
        }
    }

    /// Decrypts a message and records it as received; `None` for one
    /// received before (a redelivery).
    async fn open_message(
        &self,
        from: &str,
        device: u32,
        id: MessageId,
        body: &[u8],
    ) -> Result<Option<pb::E2ePayload>, String> {
        let mut key = self.login_key(from, device, false).await;
        if key.is_none() {
            key = self.login_key(from, device, true).await;
        }
        let key = key.ok_or_else(|| format!("{from}/{device} is not in its user's device list"))?;
        self.vault(|e| {
            if let Some(kept) = e.received_before(from, device, &id.0) {
                // Decrypted before and not acknowledged (a crash between):
                // shown again if kept, else dropped.
                return Ok(kept);
            }
            let payload = e.decrypt(from, device, &key, body).map_err(DecryptFailed)?;
            e.record_received(from, device, &id.0, &payload);
            Ok(Some(payload))
        })
        .map_err(|e: OpenError| e.to_string())
    }

    async fn login_key(&self, handle: &str, device: u32, refresh: bool) -> Option<[u8; 32]> {
        let list = self.list(handle, refresh).await.ok()?;
        let d = list.devices.iter().find(|d| d.device_id == device)?;
        d.public_key.as_ref().try_into().ok()
    }

    /// Asks `from`/`device` over a new session to send message `id` again.
    async fn ask_again(&self, from: &str, device: u32, id: MessageId) -> Result<(), SecureError> {
        let me = self.client.identity().clone();
        self.vault(|e| {
            e.forget_sessions(from, device);
            Ok::<_, SecureError>(())
        })?;
        let d = self.list(from, true).await?.devices.into_iter().find(|d| d.device_id == device);
        let Some(d) = d else { return Ok(()) };
        let claimed = self.claim_for(&[(from.to_owned(), d)]).await?;
        let keys = claimed.get(&(from.to_owned(), device));
        let request = recovery_request(id.0);
        let new_id = random_id();
        let body = self.vault(|e| Ok::<_, SecureError>(e.encrypt(&me, from, device, keys, &request, new_id.0)?))?;
        self.send_to_device(from, device, new_id, body).await
    }

    /// Answers a recovery request: sends message `id` again to `to`/`device`
    /// on the session the request came on, under a new id that `replaces` it.
    async fn send_again(&self, to: &str, device: u32, id: &[u8]) {
        let Ok(id) = <[u8; 16]>::try_from(id) else { return };
        let me = self.client.identity().clone();
        let new_id = random_id();
        let sealed = self.vault(|e| {
            let Some(mut payload) = e.sent_plaintext(to, device, &id) else { return Ok(None) };
            payload.replaces = Bytes::copy_from_slice(&id);
            Ok::<_, SecureError>(Some(e.encrypt(&me, to, device, None, &payload, new_id.0)?))
        });
        match sealed {
            Ok(Some(body)) => {
                tracing::debug!(%to, device, %new_id, "sending a message again");
                if let Err(e) = self.send_to_device(to, device, new_id, body).await {
                    tracing::warn!(%to, device, error = %e, "cannot send a message again");
                }
            }
            Ok(None) => tracing::info!(%to, device, "asked to send again a message no longer kept"),
            Err(e) => tracing::warn!(%to, device, error = %e, "cannot encrypt a message again"),
        }
    }

    async fn send_to_device(&self, to: &str, device: u32, id: MessageId, body: Bytes) -> Result<(), SecureError> {
        let out = Outgoing { body, to_device: device, ..Outgoing::default() };
        self.client.enqueue_outgoing(id, to, out, SendOptions { receipt: false }).await?.await?;
        Ok(())
    }

    /// Acknowledges the delivery `seq` (and those before it).
    pub async fn ack(&self, seq: u64) {
        self.client.ack(seq).await;
    }

    /// Closes the client.
    pub async fn close(&self) {
        self.client.close().await;
    }
}

/// A decryption failure inside a vault step.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct DecryptFailed(DecryptError);

/// Why [`Secure::open_message`]'s vault step failed.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error(transparent)]
    Decrypt(#[from] DecryptFailed),
    #[error(transparent)]
    State(#[from] E2eError),
    #[error(transparent)]
    Secure(#[from] SecureError),
}

/// Every device a send to `to` must reach: `to`'s, and this user's others.
fn targets(me: &crate::Identity, to: &pb::DeviceList, own: &pb::DeviceList) -> Vec<(String, pb::DeviceInfo)> {
    let not_me = |handle: &str, d: &pb::DeviceInfo| !(handle == me.handle && d.device_id == me.device_id);
    let mut out: Vec<(String, pb::DeviceInfo)> =
        to.devices.iter().filter(|d| not_me(&to.handle, d)).map(|d| (to.handle.clone(), d.clone())).collect();
    if to.handle != me.handle {
        out.extend(own.devices.iter().filter(|d| not_me(&own.handle, d)).map(|d| (own.handle.clone(), d.clone())));
    }
    out
}

/// True when the device's identity key on the list is not the one this
/// device has sessions for (it made a new end-to-end account).
fn stale(e: &E2e, handle: &str, d: &pb::DeviceInfo) -> bool {
    e.peer_identity(handle, d.device_id).is_some_and(|p| p.curve25519.as_slice() != d.identity_key.as_ref())
}

fn random_id() -> MessageId {
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    MessageId(id)
}
