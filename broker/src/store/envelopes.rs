//! Per-device sends: one body per device (end-to-end ciphertext made for
//! that device's keys), checked against the device lists the writer holds.
//!
//! A send names the device-list versions it was made for and carries one
//! envelope per device. It is stored only if the envelopes cover exactly
//! the current devices of the recipient and the sender's other devices,
//! each made for the identity key on record, under the current versions;
//! otherwise it is refused whole (`DEVICES_CHANGED`) with, per user, the
//! devices missing, extra (no longer current) and stale (new identity
//! keys), so the sender can claim keys, encrypt again and resend, and no
//! device is left with a message it cannot decrypt. The check runs in the
//! store's writer, in the same batch as the enqueue: a device linked or
//! unlinked in between cannot slip past it.

use std::collections::{BTreeSet, HashMap};

use bytes::Bytes;
use tern_protocol::pb;

use super::{Account, QueueKey, StoreError};

/// What a send puts in each device queue.
#[derive(Debug, Clone)]
pub enum SendBody {
    /// The same body for every device.
    Same(Bytes),
    /// One body for one device of the recipient only (no copies).
    ToDevice {
        /// The device.
        device: u32,
        /// Its body.
        body: Bytes,
    },
    /// One body per device, made for these device lists.
    PerDevice {
        /// One per device.
        envelopes: Vec<pb::Envelope>,
        /// `DeviceList.version` of the recipient the send was made for.
        to_version: u64,
        /// `DeviceList.version` of the sender's own user.
        own_version: u64,
    },
}

impl From<Bytes> for SendBody {
    fn from(body: Bytes) -> Self {
        Self::Same(body)
    }
}

/// The body for each target queue of a per-device send, or why it is refused.
pub(crate) fn bodies(
    sender: &QueueKey,
    recipient: &Account,
    own: Option<&Account>,
    envelopes: &[pb::Envelope],
    to_version: u64,
    own_version: u64,
) -> Result<HashMap<QueueKey, Bytes>, StoreError> {
    let to = recipient.handle.as_str();
    let mut given: HashMap<&str, HashMap<u32, &pb::Envelope>> = HashMap::new();
    for e in envelopes {
        if e.handle != to && e.handle != sender.handle() {
            return Err(StoreError::Invalid(format!(
                "an envelope for {:?}, neither the recipient nor the sender",
                e.handle
            )));
        }
        if given.entry(e.handle.as_str()).or_default().insert(e.device, e).is_some() {
            return Err(StoreError::Invalid(format!("two envelopes for device {} of {:?}", e.device, e.handle)));
        }
    }
    let mut lists = vec![(recipient, to_version)];
    if let Some(own) = own.filter(|o| o.handle != to) {
        lists.push((own, own_version));
    }
    let mut mismatches = Vec::new();
    let mut out = HashMap::new();
    for (account, version) in lists {
        let envelopes = given.remove(account.handle.as_str()).unwrap_or_default();
        let mismatch = compare(sender, account, version, &envelopes);
        if let Some(m) = mismatch {
            mismatches.push(m);
            continue;
        }
        for (device, e) in envelopes {
            out.insert(QueueKey::new(&account.handle, device), e.body.clone());
        }
    }
    if mismatches.is_empty() {
        Ok(out)
    } else {
        Err(StoreError::DevicesChanged(mismatches))
    }
}

/// How `envelopes` differ from `account`'s current devices (the sending
/// device left out), if they do or `version` is not current.
fn compare(
    sender: &QueueKey,
    account: &Account,
    version: u64,
    envelopes: &HashMap<u32, &pb::Envelope>,
) -> Option<pb::DeviceMismatch> {
    let own = account.handle == sender.handle();
    let current: BTreeSet<u32> =
        account.devices.iter().map(|d| d.id).filter(|id| !(own && *id == sender.device())).collect();
    let sent: BTreeSet<u32> = envelopes.keys().copied().collect();
    let stale = current
        .intersection(&sent)
        .copied()
        .filter(|id| {
            let on_record = account.device(*id).and_then(|d| d.identity_key);
            let made_for = envelopes.get(id).map(|e| e.identity_key.as_ref()).unwrap_or_default();
            on_record.as_ref().map(<[u8; 32]>::as_slice).unwrap_or_default() != made_for
        })
        .collect::<Vec<_>>();
    let missing: Vec<u32> = current.difference(&sent).copied().collect();
    let extra: Vec<u32> = sent.difference(&current).copied().collect();
    let now = account.devices_version();
    if missing.is_empty() && extra.is_empty() && stale.is_empty() && version == now {
        return None;
    }
    Some(pb::DeviceMismatch { handle: account.handle.clone(), version: now, missing, extra, stale })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Device;

    fn account(handle: &str, devices: &[(u32, Option<u8>)]) -> Account {
        let mut a = Account::new(handle, [1; 32], 1);
        a.devices = devices
            .iter()
            .map(|(id, identity)| Device {
                identity_key: identity.map(|b| [b; 32]),
                ..Device::new(*id, [*id as u8; 32], 1)
            })
            .collect();
        a
    }

    fn envelope(handle: &str, device: u32, identity: u8) -> pb::Envelope {
        pb::Envelope {
            handle: handle.into(),
            device,
            identity_key: Bytes::from(vec![identity; 32]),
            body: Bytes::from(format!("{handle}/{device}")),
        }
    }

    #[test]
    fn a_send_made_for_the_current_lists_gets_one_body_per_device() {
        let (bob, alice) =
            (account("bob", &[(1, Some(11)), (2, Some(12))]), account("alice", &[(1, Some(1)), (3, Some(3))]));
        let sender = QueueKey::new("alice", 1);
        let envelopes = [envelope("bob", 1, 11), envelope("bob", 2, 12), envelope("alice", 3, 3)];
        let out =
            bodies(&sender, &bob, Some(&alice), &envelopes, bob.devices_version(), alice.devices_version()).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[&QueueKey::new("bob", 2)], Bytes::from("bob/2"));
        assert_eq!(out[&QueueKey::new("alice", 3)], Bytes::from("alice/3"));
    }

    #[test]
    fn missing_extra_and_stale_devices_are_named_per_user() {
        let (bob, alice) =
            (account("bob", &[(1, Some(11)), (2, Some(12))]), account("alice", &[(1, Some(1)), (3, Some(3))]));
        let sender = QueueKey::new("alice", 1);
        // bob/2 is new to the sender, bob/4 was unlinked, alice/3 has new keys.
        let envelopes = [envelope("bob", 1, 11), envelope("bob", 4, 14), envelope("alice", 3, 99)];
        let refused = bodies(&sender, &bob, Some(&alice), &envelopes, 7, alice.devices_version());
        let Err(StoreError::DevicesChanged(m)) = refused else { panic!("{refused:?}") };
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].handle.as_str(), &m[0].missing, &m[0].extra, &m[0].stale),
            ("bob", &vec![2], &vec![4], &vec![])
        );
        assert_eq!(m[0].version, bob.devices_version(), "with the current version");
        assert_eq!(
            (m[1].handle.as_str(), &m[1].missing, &m[1].extra, &m[1].stale),
            ("alice", &vec![], &vec![], &vec![3])
        );
    }

    #[test]
    fn an_old_version_alone_refuses_and_odd_envelopes_are_invalid() {
        let bob = account("bob", &[(1, Some(11))]);
        let sender = QueueKey::new("alice", 1);
        let ok = [envelope("bob", 1, 11)];
        let refused = bodies(&sender, &bob, None, &ok, bob.devices_version() ^ 1, 0);
        assert!(matches!(refused, Err(StoreError::DevicesChanged(m)) if m[0].missing.is_empty()));
        let twice = [envelope("bob", 1, 11), envelope("bob", 1, 11)];
        assert!(matches!(bodies(&sender, &bob, None, &twice, bob.devices_version(), 0), Err(StoreError::Invalid(_))));
        let stranger = [envelope("bob", 1, 11), envelope("carol", 1, 1)];
        assert!(matches!(
            bodies(&sender, &bob, None, &stranger, bob.devices_version(), 0),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn a_send_to_ones_own_user_covers_the_other_devices_only() {
        let alice = account("alice", &[(1, Some(1)), (2, Some(2))]);
        let sender = QueueKey::new("alice", 1);
        let out =
            bodies(&sender, &alice, Some(&alice), &[envelope("alice", 2, 2)], alice.devices_version(), 0).unwrap();
        assert_eq!(out.keys().collect::<Vec<_>>(), [&QueueKey::new("alice", 2)]);
        let to_self = [envelope("alice", 1, 1), envelope("alice", 2, 2)];
        let refused = bodies(&sender, &alice, Some(&alice), &to_self, alice.devices_version(), 0);
        assert!(matches!(refused, Err(StoreError::DevicesChanged(m)) if m[0].extra == vec![1]));
    }

    #[test]
    fn a_device_without_identity_keys_takes_an_envelope_made_for_none() {
        let bob = account("bob", &[(1, None)]);
        let sender = QueueKey::new("alice", 1);
        let none = pb::Envelope { identity_key: Bytes::new(), ..envelope("bob", 1, 0) };
        assert!(bodies(&sender, &bob, None, &[none], bob.devices_version(), 0).is_ok());
        let refused = bodies(&sender, &bob, None, &[envelope("bob", 1, 5)], bob.devices_version(), 0);
        assert!(matches!(refused, Err(StoreError::DevicesChanged(m)) if m[0].stale == vec![1]));
    }
}
