//! A Tern user with several devices (`chat --devices N`), or whose messages
//! are encrypted end to end (`chat --e2e`), or both.
//!
//! Device 0 is the user's registered device (the broker's device 1); the
//! others are linked to it with an approval it signs. Device 0 sends;
//! every device receives, on a task of its own, and feeds the ledger as
//! that device (`Ledger::delivered_to`), so each delivery is accounted
//! and timed per receiving device.
//!
//! End to end, each device is a [`Secure`] over its client with its state
//! in memory (`Persistence::Memory`; the key files go to a directory of
//! its own under the run's temporary directory). A send goes through
//! [`Secure::send_payload`]: the device lists (cached after the first
//! send), keys claimed for devices without a session, one Olm ciphertext
//! per device, then the send and its durable ack. Because
//! `send_payload` only returns after the ack, and concurrent calls would
//! start sessions and step ratchets in an order other than the send
//! order, a user's sends go one at a time: `submit` returns once the send
//! is acknowledged. The text is the load generator's header in hex,
//! padded to the body size ([`Stamp::encode_text`]); the receiver decodes
//! it back and feeds the ledger the header, as for a plain body.
//!
//! These clients are not replaced when they stop for good (the plain
//! one-device path does that): an end-to-end state in memory cannot move
//! to a new client. A client that stops shows as lost deliveries.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::RngCore;
use tern_client::secure::{Persistence, Secure, SecureError, SecureIncoming};
use tern_client::{Client, MessageId, SendOptions};
use tern_protocol::pb::{self, e2e_payload::Kind as P};
use tokio::task::JoinHandle;

use super::{failure, receive, TernAdapter, ACK_EVERY, ACK_IDLE};
use crate::adapter::{user_name, AckFuture, Connection, SendFailure};
use crate::ledger::Ledger;
use crate::payload::Stamp;
use crate::LoadError;

/// How long a linking approval stays valid.
const APPROVAL_TTL: Duration = Duration::from_secs(600);

/// Logs in user `user`'s devices (registering and linking them the first
/// time) and starts a receive task for each.
pub(super) async fn connect(a: &TernAdapter, user: u32, ledger: Arc<Ledger>) -> Result<Box<dyn Connection>, LoadError> {
    let first = a.login(user).await?;
    let approver = first.identity().clone();
    let mut clients = vec![first];
    for _ in 1..a.devices {
        let key = tern_client::generate_key();
        let approval = approver.approve(&key.verifying_key().to_bytes(), APPROVAL_TTL);
        let (client, _) = Client::link_device(a.config(user), &approver.handle, key, &approval)
            .await
            .map_err(|e| a.setup_error(user, format!("linking a device: {e}")))?;
        clients.push(client);
    }
    let mut readers = Vec::with_capacity(clients.len());
    let mut sender = None;
    for (device, client) in clients.iter().enumerate() {
        let (device, ledger) = (device as u32, ledger.clone());
        if a.e2e {
            let dir = a.e2e_dir(user, device);
            let secure = Secure::open(client.clone(), &dir, Persistence::Memory)
                .await
                .map_err(|e| a.setup_error(user, format!("end-to-end set-up of device {device}: {e}")))?;
            sender.get_or_insert_with(|| secure.clone());
            readers.push(tokio::spawn(async move { receive_secure(&secure, user, device, &ledger).await }));
        } else {
            let client = client.clone();
            readers.push(tokio::spawn(async move { receive(&client, user, device, &ledger).await }));
        }
    }
    Ok(Box::new(DevicesConnection { clients, secure: sender, readers, run_id: a.run_id.clone(), send: a.send }))
}

/// Decrypts deliveries to device `device` of `user`, feeds them to the
/// ledger and acknowledges them as [`receive`] does, until the client stops.
///
/// Unlike `Client::recv`, `Secure::recv` is not cancel-safe: once it has
/// taken an item from the client it may wait on the broker (a device list,
/// a presence setting), and dropping it then loses the item (a later
/// cumulative ack deletes it at the broker). So the receive is never
/// raced against the ack timer and dropped: the same future is polled
/// until it completes.
async fn receive_secure(secure: &Secure, user: u32, device: u32, ledger: &Ledger) {
    let mut unacked: Option<u64> = None;
    let mut count = 0u64;
    let next = secure.recv();
    tokio::pin!(next);
    loop {
        let item = tokio::select! {
            item = &mut next => item,
            () = tokio::time::sleep(ACK_IDLE), if unacked.is_some() => {
                if let Some(seq) = unacked.take() {
                    secure.ack(seq).await;
                }
                continue;
            }
        };
        let Some(item) = item else { break };
        next.set(secure.recv());
        match &item {
            SecureIncoming::Message { text, .. } => match Stamp::decode_text(text) {
                Some(header) => ledger.delivered_to(user, device, &header),
                None => ledger.delivered_to(user, device, text.as_bytes()),
            },
            SecureIncoming::Failed { .. } => ledger.undecryptable(),
            _ => {}
        }
        unacked = Some(item.seq());
        count += 1;
        if count.is_multiple_of(ACK_EVERY) {
            secure.ack(item.seq()).await;
            unacked = None;
        }
    }
}

/// One user's devices: the first sends, all receive.
struct DevicesConnection {
    clients: Vec<Client>,
    /// With `--e2e`: the first device's end-to-end client.
    secure: Option<Secure>,
    readers: Vec<JoinHandle<()>>,
    run_id: String,
    send: SendOptions,
}

fn secure_failure(e: SecureError) -> SendFailure {
    let kind = match e {
        SecureError::Send(e) => return failure(e),
        SecureError::NoKeys { .. } => "NoKeys",
        SecureError::WrongDeviceKey { .. } => "WrongDeviceKey",
        SecureError::DevicesKeptChanging => "DevicesKeptChanging",
        _ => "E2e",
    };
    SendFailure::new(kind, e)
}

#[async_trait]
impl Connection for DevicesConnection {
    async fn submit(&self, to: u32, body: Bytes) -> Result<AckFuture, SendFailure> {
        let mut id = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut id);
        let to = user_name(&self.run_id, to);
        let Some(secure) = &self.secure else {
            let pending = self.clients[0].enqueue_with(MessageId(id), &to, body, self.send).await.map_err(failure)?;
            return Ok(Box::pin(async move { pending.await.map(|_| ()).map_err(failure) }));
        };
        let text = match Stamp::decode(&body) {
            Some(stamp) => stamp.encode_text(body.len()),
            None => hex::encode(&body),
        };
        let payload = pb::E2ePayload { kind: Some(P::Text(text)), replaces: Bytes::new() };
        secure.send_payload(&to, &payload, MessageId(id), self.send).await.map_err(secure_failure)?;
        Ok(Box::pin(async { Ok(()) }))
    }

    async fn ping(&self) -> Result<(), SendFailure> {
        self.clients[0].ping().await.map(|_| ()).map_err(failure)
    }

    async fn close(&self) {
        for client in &self.clients {
            client.close().await;
        }
        for reader in &self.readers {
            reader.abort();
        }
    }
}
