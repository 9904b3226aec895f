//! A device's identity: its handle, device number and Ed25519 signing key,
//! and the approval a device signs to let a new device join its user.

use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::{Signer, SigningKey};
use tern_protocol::pb;

use crate::ClientError;

/// Who this client is.
#[derive(Clone)]
pub struct Identity {
    /// The user's handle.
    pub handle: String,
    /// This device's number.
    pub device_id: u32,
    /// The device key; never leaves the device.
    pub signing_key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("handle", &self.handle)
            .field("device_id", &self.device_id)
            .field("public_key", &hex::encode(self.public_key()))
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The device's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing_key.verifying_key().to_bytes()
    }

    /// Approves `new_public_key` as another device of this user for `ttl`.
    pub fn approve(&self, new_public_key: &[u8; 32], ttl: Duration) -> pb::DeviceApproval {
        let expires_at_ms = now_ms().saturating_add(ttl.as_millis() as u64);
        let signed = tern_protocol::auth::approval(&self.handle, new_public_key, expires_at_ms);
        pb::DeviceApproval {
            approver_device_id: self.device_id,
            expires_at_ms,
            signature: Bytes::copy_from_slice(&self.signing_key.sign(&signed).to_bytes()),
        }
    }
}

/// A new random device key.
pub fn generate_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

/// An approval as one text token: `approver_device_id.expires_at_ms.signature_hex`.
pub fn approval_to_token(a: &pb::DeviceApproval) -> String {
    format!("{}.{}.{}", a.approver_device_id, a.expires_at_ms, hex::encode(&a.signature))
}

/// Parses a token made by [`approval_to_token`].
pub fn approval_from_token(token: &str) -> Result<pb::DeviceApproval, ClientError> {
    let bad = || ClientError::Invalid(format!("not an approval token: {token:?} (expected DEVICE.EXPIRES.SIGNATURE)"));
    let mut parts = token.trim().split('.');
    let (Some(device), Some(expires), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let signature = hex::decode(sig).map_err(|_| bad())?;
    if signature.len() != 64 {
        return Err(bad());
    }
    Ok(pb::DeviceApproval {
        approver_device_id: device.parse().map_err(|_| bad())?,
        expires_at_ms: expires.parse().map_err(|_| bad())?,
        signature: signature.into(),
    })
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier};

    #[test]
    fn approval_token_round_trip_and_signature() {
        let id = Identity { handle: "bob".into(), device_id: 1, signing_key: generate_key() };
        let new_key = generate_key().verifying_key().to_bytes();
        let a = id.approve(&new_key, Duration::from_secs(60));
        let back = approval_from_token(&approval_to_token(&a)).unwrap();
        assert_eq!(back, a);
        let signed = tern_protocol::auth::approval("bob", &new_key, a.expires_at_ms);
        let sig = Signature::from_slice(&a.signature).unwrap();
        assert!(id.signing_key.verifying_key().verify(&signed, &sig).is_ok());
        assert!(approval_from_token("1.2").is_err());
        assert!(approval_from_token("x.2.abcd").is_err());
    }
}
