//! The key service's records: the public keys of one device's end-to-end
//! account (its identity keys, a stock of one-time keys, a fallback key).
//!
//! One record per device, in the `keys` column family under the device's
//! queue key, written only by the store's writer: publishing and claiming
//! are read-modify-write steps of one writer batch, so two claims of one
//! device, however they arrive, are applied one after the other and never
//! take the same one-time key (the writer is this broker's only writer; in
//! a mesh every claim is made at the handle's primary, `mesh::keys`).
//!
//! The logic here is pure (a record in, a record out); the writer stores the
//! result and the session checks signatures before anything gets here.

use std::collections::VecDeque;

use prost::Message as _;
use tern_protocol::pb;

/// How many one-time keys a device may keep, and when it is told to
/// publish more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLimits {
    /// Most unclaimed one-time keys one device may have on record.
    pub max_one_time_keys: u32,
    /// Below this many the device is told (`KeyStock`), once per crossing.
    pub low_water: u32,
}

impl Default for KeyLimits {
    fn default() -> Self {
        Self { max_one_time_keys: 100, low_water: 20 }
    }
}

/// What the store holds for one device, as stored (protobuf).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyRecord {
    /// The device's identity keys (signed by its login key).
    #[prost(message, optional, tag = "1")]
    pub identity: Option<pb::IdentityKeys>,
    /// Unclaimed one-time keys, lowest id first: claims take the front.
    #[prost(message, repeated, tag = "2")]
    pub one_time_keys: Vec<pb::OneTimeKey>,
    /// The fallback key, handed out only when no one-time key is left.
    #[prost(message, optional, tag = "3")]
    pub fallback_key: Option<pb::OneTimeKey>,
    /// One above the highest one-time key id ever accepted from this
    /// account (ids start at 0): lower ids in a later publish are resends
    /// and ignored, so a key that was claimed is never stocked again.
    #[prost(uint64, tag = "4")]
    pub next_key_id: u64,
    /// Bumped by every change: a replica keeps the higher version.
    #[prost(uint64, tag = "5")]
    pub version: u64,
    /// Set once the stock fell below the low-water mark and the device was
    /// told; cleared when a publish brings it back up.
    #[prost(bool, tag = "6")]
    pub told_low: bool,
}

/// Why a publish was refused. Nothing of it was stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The first publish of a device must carry its identity keys.
    #[error("the first publish of a device must carry its identity keys")]
    NoIdentity,
    /// The stock would exceed the maximum.
    #[error("{stock} one-time keys on record and {offered} new ones exceed the maximum of {max}")]
    TooManyKeys {
        /// Keys on record.
        stock: u32,
        /// New keys in the publish.
        offered: u32,
        /// `KeyLimits::max_one_time_keys`.
        max: u32,
    },
}

/// A key handed out by a claim.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    /// The one-time key, or the fallback key when `fallback`.
    pub key: Option<pb::OneTimeKey>,
    /// True when no one-time key was left and the fallback was handed out.
    pub fallback: bool,
    /// True when this claim took the stock below the low-water mark for
    /// the first time since the device last published: tell it.
    pub crossed_low: bool,
}

impl KeyRecord {
    /// Decodes a stored record.
    pub fn decode_stored(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        Self::decode(bytes)
    }

    /// Encodes for the `keys` column family.
    pub fn encode_stored(&self) -> Vec<u8> {
        self.encode_to_vec()
    }

    /// What the device is told it has on record.
    pub fn stock(&self, limits: KeyLimits) -> pb::KeyStock {
        pb::KeyStock {
            one_time_keys: self.one_time_keys.len() as u32,
            max_one_time_keys: limits.max_one_time_keys,
            low_water: limits.low_water,
            identity: self.identity.is_some(),
            fallback_key: self.fallback_key.is_some(),
        }
    }

    /// Applies a publish whose signatures were checked. New identity keys
    /// (a device whose end-to-end account was made anew) drop every key
    /// of the old account first.
    pub fn publish(&mut self, publish: pb::PublishKeys, limits: KeyLimits) -> Result<(), PublishError> {
        let mut next = self.clone();
        match publish.identity {
            Some(identity) if next.identity.as_ref() != Some(&identity) => {
                next = Self { identity: Some(identity), version: next.version, ..Self::default() };
            }
            Some(_) => {}
            None if next.identity.is_none() => return Err(PublishError::NoIdentity),
            None => {}
        }
        let mut fresh: Vec<pb::OneTimeKey> =
            publish.one_time_keys.into_iter().filter(|k| k.key_id >= next.next_key_id).collect();
        fresh.sort_by_key(|k| k.key_id);
        fresh.dedup_by_key(|k| k.key_id);
        let (stock, offered) = (next.one_time_keys.len() as u32, fresh.len() as u32);
        if stock + offered > limits.max_one_time_keys {
            return Err(PublishError::TooManyKeys { stock, offered, max: limits.max_one_time_keys });
        }
        if let Some(last) = fresh.last() {
            next.next_key_id = last.key_id.saturating_add(1);
        }
        next.one_time_keys.extend(fresh);
        if let Some(fallback) = publish.fallback_key {
            next.fallback_key = Some(fallback);
        }
        if next.one_time_keys.len() as u32 >= limits.low_water {
            next.told_low = false;
        }
        next.version += 1;
        *self = next;
        Ok(())
    }

    /// Hands out the oldest one-time key (removing it), or the fallback key
    /// when none is left (kept: it may be handed out again until replaced).
    pub fn claim(&mut self, limits: KeyLimits) -> Claimed {
        let mut keys = VecDeque::from(std::mem::take(&mut self.one_time_keys));
        let taken = keys.pop_front();
        self.one_time_keys = keys.into();
        let fallback = taken.is_none();
        let key = taken.or_else(|| self.fallback_key.clone());
        let crossed_low = !fallback && !self.told_low && (self.one_time_keys.len() as u32) < limits.low_water;
        if crossed_low {
            self.told_low = true;
        }
        if !fallback || crossed_low {
            self.version += 1;
        }
        Claimed { key, fallback, crossed_low }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn key(id: u64) -> pb::OneTimeKey {
        pb::OneTimeKey { key_id: id, public_key: Bytes::from(vec![id as u8; 32]), signature: Bytes::from(vec![0; 64]) }
    }

    fn identity(n: u8) -> pb::IdentityKeys {
        pb::IdentityKeys {
            curve25519: Bytes::from(vec![n; 32]),
            ed25519: Bytes::from(vec![n; 32]),
            signature: Bytes::from(vec![n; 64]),
        }
    }

    fn publish(id: Option<u8>, keys: impl IntoIterator<Item = u64>, fallback: Option<u64>) -> pb::PublishKeys {
        pb::PublishKeys {
            identity: id.map(identity),
            one_time_keys: keys.into_iter().map(key).collect(),
            fallback_key: fallback.map(key),
        }
    }

    const LIMITS: KeyLimits = KeyLimits { max_one_time_keys: 10, low_water: 3 };

    #[test]
    fn claims_take_each_key_once_in_id_order_then_the_fallback() {
        let mut r = KeyRecord::default();
        r.publish(publish(Some(1), [2, 0, 1], Some(100)), LIMITS).unwrap();
        let ids: Vec<_> = (0..3).map(|_| r.claim(LIMITS)).map(|c| (c.key.unwrap().key_id, c.fallback)).collect();
        assert_eq!(ids, [(0, false), (1, false), (2, false)], "vodozemac's ids start at 0");
        let c = r.claim(LIMITS);
        assert_eq!((c.key.map(|k| k.key_id), c.fallback), (Some(100), true), "the fallback, when none is left");
        assert_eq!(r.claim(LIMITS).key.map(|k| k.key_id), Some(100), "and again until replaced");
        assert_eq!(r.stock(LIMITS).one_time_keys, 0);
    }

    #[test]
    fn a_resent_publish_never_stocks_a_claimed_key_again() {
        let mut r = KeyRecord::default();
        let p = publish(Some(1), [1, 2], None);
        r.publish(p.clone(), LIMITS).unwrap();
        assert_eq!(r.claim(LIMITS).key.map(|k| k.key_id), Some(1));
        r.publish(p, LIMITS).unwrap();
        assert_eq!(r.one_time_keys.iter().map(|k| k.key_id).collect::<Vec<_>>(), [2]);
        assert_eq!(r.claim(LIMITS).key.map(|k| k.key_id), Some(2));
        assert!(r.claim(LIMITS).key.is_none(), "no fallback published: nothing");
    }

    #[test]
    fn the_first_publish_needs_identity_keys_and_new_ones_drop_the_old_account() {
        let mut r = KeyRecord::default();
        assert_eq!(r.publish(publish(None, [1], None), LIMITS), Err(PublishError::NoIdentity));
        assert_eq!(r, KeyRecord::default(), "nothing stored");
        r.publish(publish(Some(1), [5, 6], Some(7)), LIMITS).unwrap();
        r.publish(publish(Some(2), [1], None), LIMITS).unwrap();
        assert_eq!(r.identity, Some(identity(2)));
        assert_eq!(
            r.one_time_keys.iter().map(|k| k.key_id).collect::<Vec<_>>(),
            [1],
            "the new account's ids start anew"
        );
        assert!(r.fallback_key.is_none());
    }

    #[test]
    fn the_stock_is_capped_and_a_publish_over_it_is_refused_whole() {
        let mut r = KeyRecord::default();
        r.publish(publish(Some(1), 1..=8, None), LIMITS).unwrap();
        let before = r.clone();
        let refused = r.publish(publish(None, 9..=11, None), LIMITS);
        assert_eq!(refused, Err(PublishError::TooManyKeys { stock: 8, offered: 3, max: 10 }));
        assert_eq!(r, before);
    }

    #[test]
    fn the_device_is_told_once_per_crossing_of_the_low_water_mark() {
        let mut r = KeyRecord::default();
        r.publish(publish(Some(1), 1..=5, None), LIMITS).unwrap();
        let crossed: Vec<bool> = (0..5).map(|_| r.claim(LIMITS).crossed_low).collect();
        assert_eq!(crossed, [false, false, true, false, false], "5 -> 4 -> 3 -> 2 (below 3): told once");
        r.publish(publish(None, 6..=9, None), LIMITS).unwrap();
        let crossed: Vec<bool> = (0..2).map(|_| r.claim(LIMITS).crossed_low).collect();
        assert_eq!(crossed, [false, true], "told again after a publish brought it back up");
    }

    #[test]
    fn every_change_bumps_the_version_and_the_record_round_trips() {
        let mut r = KeyRecord::default();
        r.publish(publish(Some(1), [1], Some(2)), LIMITS).unwrap();
        let v = r.version;
        r.claim(LIMITS);
        assert!(r.version > v);
        let v = r.version;
        r.claim(LIMITS);
        assert_eq!(r.version, v, "handing out the fallback changes nothing");
        assert_eq!(KeyRecord::decode_stored(&r.encode_stored()).unwrap(), r);
    }
}
