//! User accounts: a handle and its devices' Ed25519 public keys.
//!
//! Only public keys are stored. Records are JSON in the `accounts` column
//! family, written by the store's writer (so a handle is claimed once) and
//! read through a bounded moka cache that the writer updates on every change.

use serde::{Deserialize, Serialize};

/// One device of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Device number, from 1, never reused.
    pub id: u32,
    /// Ed25519 public key, hex.
    #[serde(with = "hex_key")]
    pub public_key: [u8; 32],
    /// When the device was added, ms since the Unix epoch.
    pub added_at_ms: u64,
}

/// A user and their devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The user's handle.
    pub handle: String,
    /// Registration time, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Devices in id order.
    pub devices: Vec<Device>,
    /// The number the next device gets.
    pub next_device_id: u32,
}

impl Account {
    /// A new account with its first device (device 1).
    pub fn new(handle: &str, public_key: [u8; 32], now_ms: u64) -> Self {
        Self {
            handle: handle.to_owned(),
            created_at_ms: now_ms,
            devices: vec![Device { id: 1, public_key, added_at_ms: now_ms }],
            next_device_id: 2,
        }
    }

    /// The device with number `id`.
    pub fn device(&self, id: u32) -> Option<&Device> {
        self.devices.iter().find(|d| d.id == id)
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        // Serialising plain data to a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub(crate) fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

mod hex_key {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(key: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(key))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(D::Error::custom)?;
        bytes.try_into().map_err(|_| D::Error::custom("a public key is 32 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let a = Account::new("alice", [7; 32], 10);
        assert_eq!(Account::from_json(&a.to_json()).unwrap(), a);
        assert_eq!(a.device(1).map(|d| d.public_key), Some([7; 32]));
        assert!(a.device(2).is_none());
    }
}
