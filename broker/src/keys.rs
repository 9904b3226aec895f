//! The key service: devices publish the public keys of their end-to-end
//! accounts, and other devices claim them to start sessions.
//!
//! A request from a session goes to the broker that decides for the handle
//! (standalone: this one; in a mesh: the handle's primary, `mesh::keys`),
//! where [`KeyService`] checks it and runs it in the store's writer, one
//! request after another, so a one-time key is handed out once. The primary
//! then copies the changed records to the other members (so a new primary
//! has them), and tells a device whose stock a claim took below the
//! low-water mark (`KeyStock`, pushed wherever the device is connected).
//!
//! What is checked before anything is stored: the publishing device is a
//! current device of its account; its identity keys are signed by its login
//! key; every one-time and fallback key is signed by the identity's Ed25519
//! key, for this handle and device. The broker stores what devices sign
//! and never needs a private key.

use bytes::Bytes;
use ed25519_dalek::{Signature, VerifyingKey};
use tern_protocol::pb::{self, server_frame::Kind as S};
use tern_protocol::{auth, codec, ErrorCode};

use crate::mesh::Mesh;
use crate::router::Router;
use crate::store::{Account, KeyDone, KeyOp, KeyRecord, QueueKey, Store, StoreError};

/// What a refused key request is answered with.
pub(crate) type KeyRefusal = (ErrorCode, String);

fn refusal(e: &StoreError) -> KeyRefusal {
    crate::session::store_refusal(e)
}

fn invalid(text: impl Into<String>) -> KeyRefusal {
    (ErrorCode::InvalidArgument, text.into())
}

/// The key service of the broker that decides for a handle.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyService<'a> {
    pub(crate) store: &'a Store,
    pub(crate) router: &'a Router,
    pub(crate) mesh: Option<&'a Mesh>,
}

impl KeyService<'_> {
    async fn account(&self, handle: &str) -> Result<Option<std::sync::Arc<Account>>, KeyRefusal> {
        let found = match self.mesh {
            Some(mesh) => mesh.account(handle).await,
            None => self.store.account(handle),
        };
        found.map_err(|e| refusal(&e))
    }

    /// Checks and stores a publish of `queue`'s device.
    pub(crate) async fn publish_here(
        &self,
        queue: &QueueKey,
        publish: pb::PublishKeys,
    ) -> Result<pb::KeysPublished, KeyRefusal> {
        let (handle, device) = (queue.handle(), queue.device());
        let account = self.account(handle).await?;
        let login_key = account
            .as_ref()
            .and_then(|a| a.device(device))
            .map(|d| d.public_key)
            .ok_or_else(|| (ErrorCode::UnknownDevice, format!("no device {device} of {handle:?}")))?;
        let held = self.store.key_record(queue).map_err(|e| refusal(&e))?;
        verify_publish(handle, device, &login_key, held.as_ref().and_then(|r| r.identity.as_ref()), &publish)?;
        let done = self.store.keys(KeyOp::Publish { queue: queue.clone(), publish }).await;
        let KeyDone::Published(record, account) = done.map_err(|e| refusal(&e))? else {
            return Err((ErrorCode::Internal, "the store answered a publish with something else".into()));
        };
        metrics::counter!("tern_key_publishes_total").increment(1);
        if let Some(mesh) = self.mesh {
            if let Some(account) = &account {
                mesh.replicate(account).await;
            }
            mesh.copy_keys(queue, &record).await;
        }
        Ok(pb::KeysPublished { stock: Some(record.stock(self.store.config().keys)) })
    }

    /// Hands out one key of each requested device of `handle` (every
    /// current device but the requester's own when `devices` is empty).
    pub(crate) async fn claim_here(
        &self,
        requester: &QueueKey,
        handle: &str,
        devices: &[u32],
    ) -> Result<pb::KeysClaimed, KeyRefusal> {
        let account =
            self.account(handle).await?.ok_or_else(|| (ErrorCode::UnknownRecipient, format!("no user {handle:?}")))?;
        let targets = claim_targets(&account, requester, devices)?;
        let done = self.store.keys(KeyOp::Claim { targets }).await;
        let KeyDone::Claimed(claimed) = done.map_err(|e| refusal(&e))? else {
            return Err((ErrorCode::Internal, "the store answered a claim with something else".into()));
        };
        let limits = self.store.config().keys;
        let mut answer = pb::KeysClaimed { handle: handle.to_owned(), ..Default::default() };
        for (queue, outcome) in claimed {
            let device = queue.device();
            let Some((claimed, record)) = outcome.filter(|(_, r)| r.identity.is_some()) else {
                answer.without_keys.push(device);
                continue;
            };
            let label = if claimed.fallback { "fallback" } else { "one_time" };
            metrics::counter!("tern_key_claims_total", "key" => label).increment(1);
            if let Some(mesh) = self.mesh {
                mesh.copy_keys(&queue, &record).await;
            }
            if claimed.crossed_low {
                self.notify_stock(&queue, record.stock(limits));
            }
            answer.devices.push(pb::ClaimedKeys {
                device_id: device,
                device_key: account.device(device).map(|d| Bytes::copy_from_slice(&d.public_key)).unwrap_or_default(),
                identity: record.identity.clone(),
                one_time_key: claimed.key,
                fallback: claimed.fallback,
            });
        }
        Ok(answer)
    }

    /// Tells `queue`'s device, wherever it is connected, that its stock is
    /// low. Ephemeral: a device not connected learns it at its next login.
    fn notify_stock(&self, queue: &QueueKey, stock: pb::KeyStock) {
        metrics::counter!("tern_key_stock_low_total").increment(1);
        let frame = pb::ServerFrame { request_id: 0, kind: Some(S::KeyStock(stock)) };
        let mut bytes = bytes::BytesMut::new();
        if codec::encode(&frame, usize::MAX >> 1, &mut bytes).is_err() {
            return;
        }
        let bytes = bytes.freeze();
        if self.router.notify(queue, crate::router::Notice::Frame(bytes.clone())) {
            return;
        }
        if let Some(mesh) = self.mesh {
            mesh.notify_device(queue, bytes);
        }
    }
}

/// The device queues a claim takes keys of, in device order.
fn claim_targets(account: &Account, requester: &QueueKey, devices: &[u32]) -> Result<Vec<QueueKey>, KeyRefusal> {
    let handle = account.handle.as_str();
    if devices.is_empty() {
        let own = handle == requester.handle();
        let ids = account.devices.iter().map(|d| d.id).filter(|id| !(own && *id == requester.device()));
        return Ok(ids.map(|id| QueueKey::new(handle, id)).collect());
    }
    if devices.len() > tern_protocol::MAX_LISTED_DEVICES {
        return Err(invalid(format!("at most {} devices per claim", tern_protocol::MAX_LISTED_DEVICES)));
    }
    let mut ids = devices.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if let Some(unknown) = ids.iter().find(|id| account.device(**id).is_none()) {
        return Err((ErrorCode::UnknownDevice, format!("{handle:?} has no device {unknown}")));
    }
    Ok(ids.into_iter().map(|id| QueueKey::new(handle, id)).collect())
}

fn key32(bytes: &[u8], what: &str) -> Result<[u8; 32], KeyRefusal> {
    bytes.try_into().map_err(|_| invalid(format!("{what} is 32 bytes, got {}", bytes.len())))
}

fn verify(key: &[u8; 32], signed: &[u8], signature: &[u8], what: &str) -> Result<(), KeyRefusal> {
    let bad = || (ErrorCode::BadSignature, format!("the signature of {what} does not verify"));
    let key = VerifyingKey::from_bytes(key).map_err(|_| bad())?;
    let signature = Signature::from_slice(signature).map_err(|_| bad())?;
    key.verify_strict(signed, &signature).map_err(|_| bad())
}

/// Checks every signature of a publish by device `device` of `handle`,
/// whose login key is `login_key` and whose identity keys on record (if
/// any) are `held`.
pub(crate) fn verify_publish(
    handle: &str,
    device: u32,
    login_key: &[u8; 32],
    held: Option<&pb::IdentityKeys>,
    publish: &pb::PublishKeys,
) -> Result<(), KeyRefusal> {
    let identity = match (&publish.identity, held) {
        (Some(new), _) => {
            let curve = key32(&new.curve25519, "a Curve25519 identity key")?;
            let ed = key32(&new.ed25519, "an Ed25519 identity key")?;
            let signed = auth::identity_keys(handle, device, &curve, &ed);
            verify(login_key, &signed, &new.signature, "the identity keys")?;
            new
        }
        (None, Some(held)) => held,
        (None, None) => return Err(invalid("the first publish of a device must carry its identity keys")),
    };
    let signer = key32(&identity.ed25519, "an Ed25519 identity key")?;
    let keys = publish.one_time_keys.iter().map(|k| (k, false)).chain(publish.fallback_key.iter().map(|k| (k, true)));
    for (key, fallback) in keys {
        let public = key32(&key.public_key, "a one-time key")?;
        let signed = auth::one_time_key(handle, device, fallback, key.key_id, &public);
        let what = if fallback { "the fallback key" } else { "a one-time key" };
        verify(&signer, &signed, &key.signature, what)?;
    }
    Ok(())
}

/// Decodes a key service answer that came from another broker.
pub(crate) fn decode_answer<M: prost::Message + Default>(bytes: &[u8]) -> Result<M, KeyRefusal> {
    M::decode(bytes).map_err(|e| (ErrorCode::Internal, format!("an undecodable answer from the key service: {e}")))
}

/// The stock a device is told at login: what the record here says.
pub(crate) fn stock_at_login(store: &Store, queue: &QueueKey) -> pb::KeyStock {
    let limits = store.config().keys;
    match store.key_record(queue) {
        Ok(Some(record)) => record.stock(limits),
        _ => KeyRecord::default().stock(limits),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn signed_publish(login: &SigningKey, identity: &SigningKey, ids: &[u64]) -> pb::PublishKeys {
        let ed = identity.verifying_key().to_bytes();
        let curve = [5u8; 32];
        let id_sig = login.sign(&auth::identity_keys("alice", 2, &curve, &ed));
        let key = |id: u64, fallback: bool| {
            let public = [id as u8; 32];
            let sig = identity.sign(&auth::one_time_key("alice", 2, fallback, id, &public));
            pb::OneTimeKey {
                key_id: id,
                public_key: Bytes::copy_from_slice(&public),
                signature: Bytes::copy_from_slice(&sig.to_bytes()),
            }
        };
        pb::PublishKeys {
            identity: Some(pb::IdentityKeys {
                curve25519: Bytes::copy_from_slice(&curve),
                ed25519: Bytes::copy_from_slice(&ed),
                signature: Bytes::copy_from_slice(&id_sig.to_bytes()),
            }),
            one_time_keys: ids.iter().map(|id| key(*id, false)).collect(),
            fallback_key: Some(key(99, true)),
        }
    }

    #[test]
    fn a_publish_verifies_only_with_every_signature_right() {
        let (login, identity) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
        let login_key = login.verifying_key().to_bytes();
        let p = signed_publish(&login, &identity, &[1, 2, 3]);
        assert_eq!(verify_publish("alice", 2, &login_key, None, &p), Ok(()));
        let code = |r: Result<(), KeyRefusal>| r.map_err(|(c, _)| c);
        assert_eq!(
            code(verify_publish("alice", 3, &login_key, None, &p)),
            Err(ErrorCode::BadSignature),
            "another device"
        );
        assert_eq!(code(verify_publish("bob", 2, &login_key, None, &p)), Err(ErrorCode::BadSignature), "another user");
        let other = SigningKey::from_bytes(&[3; 32]).verifying_key().to_bytes();
        assert_eq!(
            code(verify_publish("alice", 2, &other, None, &p)),
            Err(ErrorCode::BadSignature),
            "another login key"
        );
        let mut swapped = p.clone();
        swapped.one_time_keys[0].public_key = Bytes::from(vec![9; 32]);
        assert_eq!(code(verify_publish("alice", 2, &login_key, None, &swapped)), Err(ErrorCode::BadSignature));
        let mut as_fallback = p.clone();
        as_fallback.fallback_key = Some(p.one_time_keys[0].clone());
        assert_eq!(
            code(verify_publish("alice", 2, &login_key, None, &as_fallback)),
            Err(ErrorCode::BadSignature),
            "a one-time key's signature does not pass as the fallback's"
        );
        let mut short = p.clone();
        short.one_time_keys[1].public_key = Bytes::from(vec![1; 31]);
        assert_eq!(code(verify_publish("alice", 2, &login_key, None, &short)), Err(ErrorCode::InvalidArgument));
    }

    #[test]
    fn later_publishes_are_checked_against_the_identity_on_record() {
        let (login, identity) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
        let login_key = login.verifying_key().to_bytes();
        let first = signed_publish(&login, &identity, &[1]);
        let held = first.identity.clone();
        let mut more = signed_publish(&login, &identity, &[2, 3]);
        more.identity = None;
        assert_eq!(verify_publish("alice", 2, &login_key, held.as_ref(), &more), Ok(()));
        assert_eq!(
            verify_publish("alice", 2, &login_key, None, &more).map_err(|(c, _)| c),
            Err(ErrorCode::InvalidArgument),
            "no identity on record or in the publish"
        );
        let mut forged = signed_publish(&login, &SigningKey::from_bytes(&[7; 32]), &[4]);
        forged.identity = None;
        assert_eq!(
            verify_publish("alice", 2, &login_key, held.as_ref(), &forged).map_err(|(c, _)| c),
            Err(ErrorCode::BadSignature),
            "keys signed by another identity"
        );
    }
}
