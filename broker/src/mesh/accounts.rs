//! Accounts across the mesh.
//!
//! Each handle has a primary: the rendezvous winner for the handle among the
//! live members. Claims and new devices are decided there (so a handle is
//! claimed once while the member list is stable), and the primary copies
//! the record to every other live member before it answers, so any broker
//! can log the user in and route to their devices, and losing one broker
//! locks nobody out. Before it lets a handle be claimed, the primary asks
//! the other members whether one of them holds it already (it may have been
//! down when the handle was registered). A broker that misses a record (it
//! was down, or joined later) fetches it from the others on first use.
//!
//! A partition splits the members, and each side has a primary for every
//! handle: a handle can be claimed on both sides, or get a device numbered
//! the same on both. Every broker logs the account records it changes, and
//! when a link to a peer comes up it sends the peer every record changed
//! since the peer last acknowledged one ([`Mesh::sync_accounts_with`]).
//! Copies that meet are merged ([`Account::merge`]), to the same record at
//! every broker: the earlier claim keeps the handle, and the losing devices
//! are told `HANDLE_LOST` at their next login (their sessions are ended now).

use std::sync::Arc;

use prost::Message as _;
use tern_protocol::peer::{self as pp, reply, request};
use tern_protocol::{pb, ErrorCode};

use super::{failure, lock, Mesh, REQUEST_TIMEOUT};
use crate::store::{Account, QueueKey, StoreError};

/// A change of an account record decided at the handle's primary.
#[derive(Debug)]
pub(crate) enum AccountChange {
    /// Its profile.
    Profile(pb::SetProfile),
    /// Who may see its presence.
    Presence(pb::SetPresence),
    /// A device's push subscription (an empty endpoint clears it).
    Push(u32, crate::store::PushSubscription),
}

impl AccountChange {
    /// A profile change from another member, checked again here.
    pub(super) fn profile(update: &[u8]) -> Result<Self, String> {
        let update = pb::SetProfile::decode(update).map_err(|_| "not a profile change".to_owned())?;
        crate::session::check_profile(&update)?;
        Ok(Self::Profile(update))
    }

    /// A push subscription change from another member.
    pub(super) fn push(device: u32, subscription: &[u8]) -> Result<Self, String> {
        let sub = serde_json::from_slice(subscription).map_err(|_| "not a push subscription".to_owned())?;
        Ok(Self::Push(device, sub))
    }

    /// A presence settings change from another member.
    pub(super) fn presence(update: &[u8]) -> Result<Self, String> {
        let update = pb::SetPresence::decode(update).map_err(|_| "not a presence change".to_owned())?;
        if update.allow.iter().any(|h| tern_protocol::validate_handle(h).is_err()) {
            return Err("an allowed user is not a handle".into());
        }
        Ok(Self::Presence(update))
    }
}

/// Account changes sent to a peer per round of [`Mesh::sync_accounts_with`].
const SYNC_CHUNK: usize = 64;

fn account_key(handle: &str) -> Vec<u8> {
    let mut key = b"account\0".to_vec();
    key.extend_from_slice(handle.as_bytes());
    key
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("account service: {e}; retry"))
}

fn store_code(e: &StoreError) -> ErrorCode {
    crate::session::store_error_code(e)
}

fn from_failure(code: ErrorCode, message: String, handle: &str) -> StoreError {
    match code {
        ErrorCode::HandleTaken => StoreError::HandleTaken(handle.to_owned()),
        ErrorCode::UnknownRecipient | ErrorCode::UnknownDevice => StoreError::UnknownUser(handle.to_owned()),
        ErrorCode::TooManyDevices => StoreError::TooManyDevices(handle.to_owned(), 0),
        ErrorCode::StorageFull => StoreError::Full(message),
        _ => StoreError::Unavailable(message),
    }
}

impl Mesh {
    pub(super) fn account_primary(&self, handle: &str) -> String {
        self.owner_of(&account_key(handle))
    }

    /// Claims `handle` with its first device, at the handle's primary.
    pub(crate) async fn register(&self, handle: &str, public_key: [u8; 32]) -> Result<Account, StoreError> {
        self.account_write(handle, public_key, false).await.map(|(account, _)| account)
    }

    /// Adds a device to `handle`, at the handle's primary; returns its number.
    pub(crate) async fn add_device(&self, handle: &str, public_key: [u8; 32]) -> Result<u32, StoreError> {
        self.account_write(handle, public_key, true).await.map(|(_, device)| device)
    }

    async fn account_write(
        &self,
        handle: &str,
        public_key: [u8; 32],
        add_device: bool,
    ) -> Result<(Account, u32), StoreError> {
        let primary = self.account_primary(handle);
        if primary == self.node() {
            return self.write_as_primary(handle, public_key, add_device).await;
        }
        let link = self.link(&primary).ok_or_else(|| unavailable(format!("no link to broker {primary}")))?;
        let write = pp::AccountWrite {
            handle: handle.to_owned(),
            public_key: bytes::Bytes::copy_from_slice(&public_key),
            add_device,
        };
        match link.request(request::Kind::AccountWrite(write), REQUEST_TIMEOUT).await {
            Ok(reply::Kind::Account(a)) => {
                let account = Account::from_json(&a.account)
                    .map_err(|e| StoreError::Corrupt(format!("account from {primary}: {e}")))?;
                let account = self.inner.store.put_account(account).await?;
                Ok((account, a.device))
            }
            Ok(_) => Err(unavailable(format!("broker {primary} answered something else"))),
            Err(super::PeerError::Failure { code, message, .. }) => Err(from_failure(code, message, handle)),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Unlinks `device` of `handle` (asked by its device `by`) at the
    /// handle's primary, which copies the record to every live member:
    /// each ends the device's session there and drops its queue.
    pub(crate) async fn unlink(&self, handle: &str, device: u32, by: u32) -> Result<Account, StoreError> {
        let primary = self.account_primary(handle);
        if primary == self.node() {
            return self.unlink_as_primary(handle, device, by).await;
        }
        let link = self.link(&primary).ok_or_else(|| unavailable(format!("no link to broker {primary}")))?;
        let unlink = pp::AccountUnlink { handle: handle.to_owned(), device, by };
        match link.request(request::Kind::AccountUnlink(unlink), REQUEST_TIMEOUT).await {
            Ok(reply::Kind::Account(a)) => {
                let account = Account::from_json(&a.account)
                    .map_err(|e| StoreError::Corrupt(format!("account from {primary}: {e}")))?;
                self.inner.store.put_account(account).await
            }
            Ok(_) => Err(unavailable(format!("broker {primary} answered something else"))),
            Err(super::PeerError::Failure { code: ErrorCode::PermissionDenied, message, .. }) => {
                Err(StoreError::Denied(message))
            }
            Err(super::PeerError::Failure { code, message, .. }) => Err(from_failure(code, message, handle)),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Changes `handle`'s profile at the handle's primary, which copies the
    /// record to every live member (their cached copies change with it).
    pub(crate) async fn set_profile(&self, handle: &str, update: pb::SetProfile) -> Result<Account, StoreError> {
        self.change_account(handle, AccountChange::Profile(update)).await
    }

    /// Sets or clears a device's push subscription, at the handle's primary.
    pub(crate) async fn set_push(
        &self,
        handle: &str,
        device: u32,
        subscription: crate::store::PushSubscription,
    ) -> Result<Account, StoreError> {
        self.change_account(handle, AccountChange::Push(device, subscription)).await
    }

    /// Changes who may see `handle`'s presence, at the handle's primary.
    pub(crate) async fn set_presence(&self, handle: &str, update: pb::SetPresence) -> Result<Account, StoreError> {
        self.change_account(handle, AccountChange::Presence(update)).await
    }

    async fn change_account(&self, handle: &str, change: AccountChange) -> Result<Account, StoreError> {
        let primary = self.account_primary(handle);
        if primary == self.node() {
            return self.change_as_primary(handle, change).await;
        }
        let link = self.link(&primary).ok_or_else(|| unavailable(format!("no link to broker {primary}")))?;
        let handle_owned = handle.to_owned();
        let kind = match change {
            AccountChange::Profile(u) => request::Kind::AccountProfile(pp::AccountProfile {
                handle: handle_owned,
                update: u.encode_to_vec().into(),
            }),
            AccountChange::Presence(u) => request::Kind::AccountPresence(pp::AccountPresence {
                handle: handle_owned,
                update: u.encode_to_vec().into(),
            }),
            AccountChange::Push(device, sub) => request::Kind::AccountPush(pp::AccountPush {
                handle: handle_owned,
                device,
                subscription: serde_json::to_vec(&sub).unwrap_or_default().into(),
            }),
        };
        match link.request(kind, REQUEST_TIMEOUT).await {
            Ok(reply::Kind::Account(a)) => {
                let account = Account::from_json(&a.account)
                    .map_err(|e| StoreError::Corrupt(format!("account from {primary}: {e}")))?;
                self.inner.store.put_account(account).await
            }
            Ok(_) => Err(unavailable(format!("broker {primary} answered something else"))),
            Err(super::PeerError::Failure { code: ErrorCode::InvalidArgument, message, .. }) => {
                Err(StoreError::Invalid(message))
            }
            Err(super::PeerError::Failure { code, message, .. }) => Err(from_failure(code, message, handle)),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn change_as_primary(&self, handle: &str, change: AccountChange) -> Result<Account, StoreError> {
        let account = match change {
            AccountChange::Profile(u) => self.inner.store.set_profile(handle, u).await?,
            AccountChange::Presence(u) => self.inner.store.set_presence(handle, u).await?,
            AccountChange::Push(device, sub) => self.inner.store.set_push(handle, device, sub).await?,
        };
        self.replicate(&account).await;
        Ok(account)
    }

    pub(super) async fn serve_account_change(
        &self,
        handle: &str,
        change: Result<AccountChange, String>,
    ) -> reply::Kind {
        if tern_protocol::validate_handle(handle).is_err() {
            return reply::Kind::Failure(failure(ErrorCode::InvalidHandle, "invalid handle"));
        }
        let change = match change {
            Ok(c) => c,
            Err(text) => return reply::Kind::Failure(failure(ErrorCode::InvalidArgument, text)),
        };
        match self.change_as_primary(handle, change).await {
            Ok(account) => reply::Kind::Account(pp::AccountReply { account: account.to_json().into(), device: 0 }),
            Err(e) => reply::Kind::Failure(failure(store_code(&e), e.to_string())),
        }
    }

    async fn unlink_as_primary(&self, handle: &str, device: u32, by: u32) -> Result<Account, StoreError> {
        let account = self.inner.store.unlink(handle, device, by).await?;
        self.inner.router.unlink(&QueueKey::new(handle, device));
        self.replicate(&account).await;
        Ok(account)
    }

    pub(super) async fn serve_account_unlink(&self, u: pp::AccountUnlink) -> reply::Kind {
        if tern_protocol::validate_handle(&u.handle).is_err() {
            return reply::Kind::Failure(failure(ErrorCode::InvalidHandle, "invalid handle"));
        }
        match self.unlink_as_primary(&u.handle, u.device, u.by).await {
            Ok(account) => reply::Kind::Account(pp::AccountReply { account: account.to_json().into(), device: 0 }),
            Err(e) => reply::Kind::Failure(failure(store_code(&e), e.to_string())),
        }
    }

    /// As primary: checks the other members for an existing claim, writes,
    /// and copies the record to every live member before answering.
    async fn write_as_primary(
        &self,
        handle: &str,
        public_key: [u8; 32],
        add_device: bool,
    ) -> Result<(Account, u32), StoreError> {
        if self.inner.store.account(handle)?.is_none() {
            if let Some(found) = self.fetch_account(handle).await? {
                self.inner.store.put_account(Account::clone(&found)).await?;
            }
        }
        let (account, device) = if add_device {
            let device = self.inner.store.add_device(handle, public_key).await?;
            let account =
                self.inner.store.account(handle)?.ok_or_else(|| StoreError::UnknownUser(handle.to_owned()))?;
            (Account::clone(&account), device)
        } else {
            (self.inner.store.register(handle, public_key).await?, 1)
        };
        self.replicate(&account).await;
        Ok((account, device))
    }

    /// Copies `account` to every live member (waiting for each, briefly).
    pub(crate) async fn replicate(&self, account: &Account) {
        let json = bytes::Bytes::from(account.to_json());
        let links: Vec<_> = self.members().keys().filter_map(|m| self.link(m)).collect();
        let puts = links.iter().map(|link| {
            let put = pp::AccountPut { account: json.clone() };
            link.request(request::Kind::AccountPut(put), REQUEST_TIMEOUT)
        });
        for (link, result) in links.iter().zip(futures::future::join_all(puts).await) {
            if let Err(e) = result {
                tracing::warn!(handle = %account.handle, peer = %link.peer.name, error = %e, "account not copied; the member will fetch it on first use");
            }
        }
    }

    /// The account of `handle`: the copy held here, else fetched from the
    /// other members (and kept).
    pub(crate) async fn account(&self, handle: &str) -> Result<Option<Arc<Account>>, StoreError> {
        if let Some(a) = self.inner.store.account(handle)? {
            return Ok(Some(a));
        }
        self.refresh_account(handle).await
    }

    /// Fetches the newest record of `handle` from the other members and
    /// keeps it here (when the copy here is missing or stale).
    pub(crate) async fn refresh_account(&self, handle: &str) -> Result<Option<Arc<Account>>, StoreError> {
        match self.fetch_account(handle).await? {
            Some(found) => Ok(Some(Arc::new(self.inner.store.put_account(Account::clone(&found)).await?))),
            None => self.inner.store.account(handle),
        }
    }

    /// Asks every live member for `handle`; returns their records merged.
    async fn fetch_account(&self, handle: &str) -> Result<Option<Arc<Account>>, StoreError> {
        let links: Vec<_> = self.members().keys().filter_map(|m| self.link(m)).collect();
        let gets = links.iter().map(|link| {
            let get = pp::AccountGet { handle: handle.to_owned() };
            link.request(request::Kind::AccountGet(get), REQUEST_TIMEOUT)
        });
        let mut merged: Option<Account> = None;
        for result in futures::future::join_all(gets).await {
            if let Ok(reply::Kind::Account(a)) = result {
                if a.account.is_empty() {
                    continue;
                }
                if let Ok(account) = Account::from_json(&a.account) {
                    if account.handle == handle {
                        merged = Some(match merged {
                            Some(m) => m.merge(&account),
                            None => account,
                        });
                    }
                }
            }
        }
        Ok(merged.map(Arc::new))
    }

    /// A link to `node` came up: sends it, in the background, every account
    /// record changed here since it last acknowledged a change (after a
    /// restart here: the whole change log). Stops at the first failure; the
    /// next link-up goes on from there.
    pub(super) fn sync_accounts_with(&self, node: &str) {
        let (mesh, node) = (self.clone(), node.to_owned());
        self.inner.tasks.spawn(async move {
            tokio::select! {
                () = mesh.inner.cancel.cancelled() => {}
                () = mesh.sync_accounts(&node) => {}
            }
        });
    }

    async fn sync_accounts(&self, node: &str) {
        let mut after = lock(&self.inner.account_sync).get(node).copied().unwrap_or(0);
        loop {
            let changes = match self.inner.store.account_changes(after, SYNC_CHUNK) {
                Ok(changes) => changes,
                Err(e) => {
                    tracing::warn!(peer = %node, error = %e, "cannot read the account change log");
                    return;
                }
            };
            let Some(&(last, _)) = changes.last() else { return };
            let Some(link) = self.link(node) else { return };
            let mut handles: Vec<String> = changes.into_iter().map(|(_, handle)| handle).collect();
            handles.sort_unstable();
            handles.dedup();
            let records: Vec<Arc<Account>> =
                handles.iter().filter_map(|h| self.inner.store.account(h).ok().flatten()).collect();
            let puts = records.iter().map(|account| {
                let put = pp::AccountPut { account: account.to_json().into() };
                link.request(request::Kind::AccountPut(put), REQUEST_TIMEOUT)
            });
            let failed = futures::future::join_all(puts).await.into_iter().filter(Result::is_err).count();
            if failed > 0 {
                tracing::debug!(peer = %node, failed, "account records not sent; sent again at the next link-up");
                return;
            }
            metrics::counter!("tern_mesh_accounts_synced_total").increment(records.len() as u64);
            after = last;
            let mut acked = lock(&self.inner.account_sync);
            let known = acked.entry(node.to_owned()).or_default();
            *known = (*known).max(last);
        }
    }

    pub(super) fn serve_account_get(&self, handle: &str) -> reply::Kind {
        match self.inner.store.account(handle) {
            Ok(found) => reply::Kind::Account(pp::AccountReply {
                account: found.map(|a| a.to_json().into()).unwrap_or_default(),
                device: 0,
            }),
            Err(e) => reply::Kind::Failure(failure(store_code(&e), e.to_string())),
        }
    }

    pub(super) async fn serve_account_write(&self, w: pp::AccountWrite) -> reply::Kind {
        if tern_protocol::validate_handle(&w.handle).is_err() {
            return reply::Kind::Failure(failure(ErrorCode::InvalidHandle, "invalid handle"));
        }
        let Ok(key) = <[u8; 32]>::try_from(w.public_key.as_ref()) else {
            return reply::Kind::Failure(failure(ErrorCode::InvalidArgument, "a public key is 32 bytes"));
        };
        match self.write_as_primary(&w.handle, key, w.add_device).await {
            Ok((account, device)) => {
                reply::Kind::Account(pp::AccountReply { account: account.to_json().into(), device })
            }
            Err(e) => reply::Kind::Failure(failure(store_code(&e), e.to_string())),
        }
    }

    pub(super) async fn serve_account_put(&self, json: &[u8]) -> reply::Kind {
        let account = match Account::from_json(json) {
            Ok(a) if tern_protocol::validate_handle(&a.handle).is_ok() => a,
            _ => return reply::Kind::Failure(failure(ErrorCode::InvalidArgument, "not an account record")),
        };
        let before = self.inner.store.account(&account.handle).ok().flatten();
        match self.inner.store.put_account(account).await {
            Ok(now) => {
                // Devices that just lost a merge: end their sessions here,
                // so they learn it at their next login.
                for lost in now.lost.iter().filter(|l| before.as_ref().is_none_or(|b| !b.lost.contains(l))) {
                    self.inner.router.revoke(&QueueKey::new(&now.handle, lost.id), &lost.public_key);
                }
                // Devices just unlinked: end their sessions here.
                for id in now.removed.iter().filter(|id| before.as_ref().is_none_or(|b| !b.removed.contains(id))) {
                    self.inner.router.unlink(&QueueKey::new(&now.handle, *id));
                }
                reply::Kind::Account(pp::AccountReply::default())
            }
            Err(e) => reply::Kind::Failure(failure(store_code(&e), e.to_string())),
        }
    }
}
