//! Register, log in and link a device: checking the signed transcript
//! against the key on record (or the key being registered).
//!
//! Every function returns the authenticated `(handle, device)` or a typed
//! error; none stores anything unless every check passed. Whatever can be
//! checked without an account record (the nonce, the handle, the shape of
//! the signature, for `Register` and `LinkDevice` the signature itself) is
//! checked before a record is looked up, since a record missing here is
//! asked of the other mesh members ([`AccountLookups`]).

use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::{Signature, VerifyingKey};
use tern_protocol::auth::{self, Purpose};
use tern_protocol::{pb, validate_handle, ErrorCode};

use super::lookup::AccountLookups;
use crate::mesh::Mesh;
use crate::ratelimit::RateLimited;
use crate::store::{now_ms, Account, Store, StoreError};

/// Where account records come from: the local store, and in a mesh the
/// handle's primary (writes) and the other members (records missing here,
/// through the shared [`AccountLookups`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Accounts<'a> {
    pub(crate) store: &'a Store,
    pub(crate) mesh: Option<&'a Mesh>,
    pub(crate) lookups: &'a AccountLookups,
    /// Only the records held here: no member is asked (a handle whose
    /// failed logins ran out, see `rate.login_failures_per_handle`).
    pub(crate) local_only: bool,
}

impl Accounts<'_> {
    fn remote(&self) -> Option<&Mesh> {
        self.mesh.filter(|_| !self.local_only)
    }

    async fn register(&self, handle: &str, key: [u8; 32]) -> Result<Account, StoreError> {
        match self.mesh {
            Some(mesh) => mesh.register(handle, key).await,
            None => self.store.register(handle, key).await,
        }
    }

    async fn add_device(&self, handle: &str, key: [u8; 32]) -> Result<u32, StoreError> {
        match self.mesh {
            Some(mesh) => mesh.add_device(handle, key).await,
            None => self.store.add_device(handle, key).await,
        }
    }

    /// The account of `handle`: the record held here, else the other
    /// members' (looked up once per miss and TTL).
    pub(crate) async fn account(&self, handle: &str) -> Result<Option<Arc<Account>>, StoreError> {
        if let Some(found) = self.store.account(handle)? {
            return Ok(Some(found));
        }
        match self.remote() {
            Some(mesh) => self.lookups.get(handle, None, || mesh.account(handle)).await,
            None => Ok(None),
        }
    }

    /// The account of `handle` with device `device`, fetched again from the
    /// mesh when the copy here does not have it (added at another broker).
    async fn account_with(&self, handle: &str, device: u32) -> Result<Option<Arc<Account>>, StoreError> {
        let found = self.account(handle).await?;
        match (found, self.remote()) {
            (Some(a), Some(mesh)) if a.device(device).is_none() => {
                self.lookups.get(handle, Some(device), || mesh.refresh_account(handle)).await
            }
            (found, _) => Ok(found),
        }
    }
}

/// A failed request: the code and text sent back, and for `RATE_LIMITED`
/// when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) text: String,
    pub(crate) retry_after: Option<Duration>,
}

impl From<(ErrorCode, String)> for Refusal {
    fn from((code, text): (ErrorCode, String)) -> Self {
        Self { code, text, retry_after: None }
    }
}

impl From<RateLimited> for Refusal {
    fn from(limited: RateLimited) -> Self {
        Self { code: ErrorCode::RateLimited, text: limited.to_string(), retry_after: Some(limited.retry_after) }
    }
}

impl Refusal {
    /// True for a failure that says the device could not prove itself (as
    /// opposed to the broker being unable to check), counted per handle.
    pub(crate) fn is_auth_failure(&self) -> bool {
        matches!(self.code, ErrorCode::BadSignature | ErrorCode::UnknownDevice | ErrorCode::BadApproval)
    }
}

/// What the checks below fail with, before it is a [`Refusal`].
type Failed = (ErrorCode, String);

/// What the session knows when a login-type request arrives.
#[derive(Debug)]
pub(crate) struct Challenge {
    pub(crate) nonce: [u8; auth::NONCE_LEN],
    pub(crate) exporter: [u8; auth::EXPORTER_LEN],
}

fn key_of(bytes: &[u8]) -> Result<[u8; 32], Failed> {
    bytes.try_into().map_err(|_| (ErrorCode::InvalidArgument, format!("a public key is 32 bytes, got {}", bytes.len())))
}

fn signature_of(signature: &[u8]) -> Result<Signature, Failed> {
    Signature::from_slice(signature).map_err(|_| (ErrorCode::BadSignature, "a signature is 64 bytes".into()))
}

fn verify(public_key: &[u8; 32], transcript: &[u8], signature: &[u8]) -> Result<(), Failed> {
    let bad = |why: &str| (ErrorCode::BadSignature, why.to_owned());
    let key = VerifyingKey::from_bytes(public_key).map_err(|_| bad("the public key is not a valid Ed25519 key"))?;
    let sig = signature_of(signature)?;
    key.verify_strict(transcript, &sig).map_err(|_| bad("the signature does not verify"))
}

fn check_nonce(challenge: Option<&Challenge>, nonce: &[u8]) -> Result<(), Failed> {
    match challenge {
        Some(c) if c.nonce.as_slice() == nonce => Ok(()),
        Some(_) => Err((ErrorCode::InvalidChallenge, "the nonce is not this connection's current challenge".into())),
        None => Err((ErrorCode::InvalidChallenge, "no open challenge: send Hello first".into())),
    }
}

fn check_handle(handle: &str) -> Result<(), Failed> {
    validate_handle(handle).map_err(|e| (ErrorCode::InvalidHandle, e.to_string()))
}

/// Maps a store failure to what the client is told.
pub(crate) fn store_refusal(e: &StoreError) -> Failed {
    let code = match e {
        StoreError::UnknownUser(_) => ErrorCode::UnknownRecipient,
        StoreError::UnknownDevice(_) => ErrorCode::UnknownDevice,
        StoreError::HandleTaken(_) => ErrorCode::HandleTaken,
        StoreError::TooManyDevices(..) => ErrorCode::TooManyDevices,
        StoreError::QueueFull(..) => ErrorCode::QueueFull,
        StoreError::Full(_) => ErrorCode::StorageFull,
        StoreError::Db(_) | StoreError::Corrupt(_) => ErrorCode::StorageError,
        StoreError::Closed => ErrorCode::ShuttingDown,
        StoreError::Unavailable(_) => ErrorCode::MeshUnavailable,
        StoreError::Invalid(_) => ErrorCode::InvalidArgument,
        StoreError::Denied(_) => ErrorCode::PermissionDenied,
        StoreError::DevicesChanged(_) => ErrorCode::DevicesChanged,
    };
    (code, e.to_string())
}

/// `Register`: claim a handle with device 1.
pub(crate) async fn register(
    accounts: Accounts<'_>,
    challenge: Option<&Challenge>,
    required_token: Option<&str>,
    req: &pb::Register,
) -> Result<(String, u32), Refusal> {
    check_nonce(challenge, &req.nonce)?;
    check_handle(&req.handle)?;
    if let Some(token) = required_token {
        // Constant time: the comparison must not tell how much of a guess was right.
        if !crate::admin::token_matches(&req.registration_token, token) {
            return Err((ErrorCode::RegistrationDenied, "this broker needs a valid registration token".into()).into());
        }
    }
    let key = key_of(&req.public_key)?;
    let c = challenge.ok_or((ErrorCode::InvalidChallenge, String::new()))?;
    let transcript = auth::transcript(Purpose::Register, &c.exporter, &c.nonce, &req.handle, 0, &key);
    verify(&key, &transcript, &req.signature)?;
    let account = accounts.register(&req.handle, key).await.map_err(|e| store_refusal(&e))?;
    Ok((account.handle, 1))
}

/// `Login`: act as an existing device.
pub(crate) async fn login(
    accounts: Accounts<'_>,
    challenge: Option<&Challenge>,
    req: &pb::Login,
) -> Result<(String, u32), Refusal> {
    check_nonce(challenge, &req.nonce)?;
    check_handle(&req.handle)?;
    // No key in the request to check the signature with before the record
    // is found; its shape at least.
    signature_of(&req.signature)?;
    let unknown = || (ErrorCode::UnknownDevice, format!("no device {} of {:?}", req.device_id, req.handle));
    let account =
        accounts.account_with(&req.handle, req.device_id).await.map_err(|e| store_refusal(&e))?.ok_or_else(unknown)?;
    let c = challenge.ok_or((ErrorCode::InvalidChallenge, String::new()))?;
    let transcript = auth::transcript(Purpose::Login, &c.exporter, &c.nonce, &req.handle, req.device_id, &[0; 32]);
    // A device whose account lost a merge (see `Account::merge`) proves
    // itself with its own key, and is told, not sent a bad signature.
    let lost = || {
        account.lost_devices(req.device_id).any(|d| verify(&d.public_key, &transcript, &req.signature).is_ok()).then(
            || {
                let text = format!(
                    "device {} of {:?} lost its account to another claim made while the mesh was partitioned; \
                     register again",
                    req.device_id, req.handle
                );
                Refusal::from((ErrorCode::HandleLost, text))
            },
        )
    };
    match account.device(req.device_id) {
        Some(device) => match verify(&device.public_key, &transcript, &req.signature) {
            Ok(()) => Ok((account.handle.clone(), device.id)),
            Err(bad) => Err(lost().unwrap_or_else(|| bad.into())),
        },
        None => Err(lost().unwrap_or_else(|| unknown().into())),
    }
}

/// `LinkDevice`: add a device approved by an existing one.
pub(crate) async fn link_device(
    accounts: Accounts<'_>,
    challenge: Option<&Challenge>,
    req: &pb::LinkDevice,
) -> Result<(String, u32), Refusal> {
    check_nonce(challenge, &req.nonce)?;
    check_handle(&req.handle)?;
    let key = key_of(&req.public_key)?;
    let c = challenge.ok_or((ErrorCode::InvalidChallenge, String::new()))?;
    let transcript = auth::transcript(Purpose::LinkDevice, &c.exporter, &c.nonce, &req.handle, 0, &key);
    verify(&key, &transcript, &req.signature)?;
    let bad = |why: String| (ErrorCode::BadApproval, why);
    let approval = req.approval.as_ref().ok_or_else(|| bad("a device approval is required".into()))?;
    if approval.expires_at_ms < now_ms() {
        return Err(bad("the approval has expired".into()).into());
    }
    let account = accounts
        .account_with(&req.handle, approval.approver_device_id)
        .await
        .map_err(|e| store_refusal(&e))?
        .ok_or_else(|| (ErrorCode::UnknownDevice, format!("no user {:?}", req.handle)))?;
    let approver = account
        .device(approval.approver_device_id)
        .ok_or_else(|| bad(format!("no device {} approves", approval.approver_device_id)))?;
    let signed = auth::approval(&req.handle, &key, approval.expires_at_ms);
    verify(&approver.public_key, &signed, &approval.signature)
        .map_err(|_| bad("the approval is not signed by that device".into()))?;
    if account.devices.iter().any(|d| d.public_key == key) {
        return Err((ErrorCode::InvalidArgument, "this key is already a device of the user".into()).into());
    }
    let device = accounts.add_device(&req.handle, key).await.map_err(|e| store_refusal(&e))?;
    Ok((req.handle.clone(), device))
}
