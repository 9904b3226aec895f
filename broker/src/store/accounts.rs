//! User accounts: a handle and its devices' Ed25519 public keys.
//!
//! Only public keys are stored. Records are JSON in the `accounts` column
//! family, written by the store's writer (so a handle is claimed once) and
//! read through a bounded moka cache that the writer updates on every change.
//!
//! In a mesh split by a partition, each side can claim the same handle, or
//! add a device with the same number to it. When the copies meet again they
//! are merged with [`Account::merge`], the same way at every broker and in
//! any order: the earlier claim keeps the handle, a device number keeps its
//! first key, and the devices that lost are kept in `lost` so that their next
//! login is told so (`HANDLE_LOST`) instead of failing as a bad signature.

use serde::{Deserialize, Serialize};

/// One device of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Device number, from 1, never reused.
    pub id: u32,
    /// Ed25519 public key, hex.
    #[serde(with = "hex_bytes")]
    pub public_key: [u8; 32],
    /// When the device was added, ms since the Unix epoch.
    pub added_at_ms: u64,
    /// The Curve25519 identity key of the device's end-to-end account, once
    /// it published one (the key service's record has the rest).
    #[serde(default, with = "hex_opt", skip_serializing_if = "Option::is_none")]
    pub identity_key: Option<[u8; 32]>,
    /// When `identity_key` was set, ms since the Unix epoch: of two copies
    /// that differ in it, the later wins a merge.
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub identity_at_ms: u64,
    /// The device's Web Push subscription, if it registered one (an empty
    /// endpoint records an unregistration: the later of two wins a merge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushSubscription>,
}

/// A Web Push subscription (RFC 8030): where to send a device's wake-ups
/// and the keys to encrypt them to (RFC 8291).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PushSubscription {
    /// When it was set, ms since the Unix epoch.
    pub at_ms: u64,
    /// The push service's URL for the device; empty: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    /// P-256 public key (65 bytes uncompressed), hex.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub p256dh: String,
    /// Authentication secret (16 bytes), hex.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub auth: String,
}

impl Device {
    /// A device with no end-to-end identity yet.
    pub fn new(id: u32, public_key: [u8; 32], added_at_ms: u64) -> Self {
        Self { id, public_key, added_at_ms, identity_key: None, identity_at_ms: 0, push: None }
    }
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

/// What others see of a user beside the handle (the design's user service).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Profile {
    /// When it was last changed, ms since the Unix epoch: of two copies
    /// that differ, the later wins a merge (first, so it orders them).
    pub updated_at_ms: u64,
    /// Display name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Status text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
    /// Picture: a media reference.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub picture: String,
}

/// Who may see a user's presence (online state, last seen, typing).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PresenceSettings {
    /// When last changed, ms since the Unix epoch: the later wins a merge.
    pub updated_at_ms: u64,
    /// Nobody may (and this user sees nobody's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nobody: bool,
    /// Users who may, if they allow this user too; sorted, at most
    /// [`MAX_ALLOWED`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed: Vec<String>,
}

/// Most users one user's presence settings may allow.
pub const MAX_ALLOWED: usize = 1024;

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
    /// Names this claim of the handle (random, made at registration); two
    /// claims made on both sides of a partition differ in it. Records
    /// written before it existed read as zero: [`Account::claim`] derives
    /// one from what they hold.
    #[serde(default, with = "hex_bytes", skip_serializing_if = "is_zero")]
    pub claim: [u8; 16],
    /// Devices that lost a merge (their claim of the handle, or their
    /// number, went to another), at most [`LOST_MAX`], by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost: Vec<Device>,
    /// Numbers of devices unlinked, in order: never current again, whatever
    /// copy they meet in a merge.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<u32>,
    /// The user's profile, once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,
    /// Who may see the user's presence, once set (unset: nobody is allowed
    /// yet, which shows nothing to anyone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceSettings>,
}

/// Most lost devices an account remembers (the newest are kept).
pub(crate) const LOST_MAX: usize = 32;

fn is_zero(claim: &[u8; 16]) -> bool {
    *claim == [0; 16]
}

impl Account {
    /// A new account with its first device (device 1), under a fresh claim.
    pub fn new(handle: &str, public_key: [u8; 32], now_ms: u64) -> Self {
        Self {
            handle: handle.to_owned(),
            created_at_ms: now_ms,
            devices: vec![Device::new(1, public_key, now_ms)],
            next_device_id: 2,
            claim: rand::random(),
            lost: Vec::new(),
            removed: Vec::new(),
            profile: None,
            presence: None,
        }
    }

    /// True when `self` and `other` may see each other's presence: each
    /// allows the other and neither chose nobody (reciprocal by design).
    pub fn shares_presence_with(&self, other: &Self) -> bool {
        let allows = |a: &Self, b: &Self| {
            a.presence.as_ref().is_some_and(|p| !p.nobody && p.allowed.binary_search(&b.handle).is_ok())
        };
        self.handle != other.handle && allows(self, other) && allows(other, self)
    }

    /// Unlinks device `id`: it is no longer current, and its number is
    /// never given again (numbers only grow). False if it is not current.
    pub fn unlink(&mut self, id: u32) -> bool {
        let Some(at) = self.devices.iter().position(|d| d.id == id) else { return false };
        self.devices.remove(at);
        if !self.removed.contains(&id) {
            self.removed.push(id);
            self.removed.sort_unstable();
        }
        true
    }

    /// The primary device: the lowest-numbered current one, which may
    /// unlink the others (any device may unlink itself).
    pub fn primary(&self) -> Option<u32> {
        self.devices.iter().map(|d| d.id).min()
    }

    /// The device with number `id`.
    pub fn device(&self, id: u32) -> Option<&Device> {
        self.devices.iter().find(|d| d.id == id)
    }

    /// The device list's version: a digest of every device's number, login
    /// key and identity key, so it changes whenever one is added, removed
    /// or gets new identity keys, and is the same at every broker.
    pub fn devices_version(&self) -> u64 {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for d in &self.devices {
            ctx.update(&d.id.to_be_bytes());
            ctx.update(&d.public_key);
            ctx.update(&d.identity_key.unwrap_or([0; 32]));
        }
        let digest = ctx.finish();
        let mut v = [0u8; 8];
        v.copy_from_slice(&digest.as_ref()[..8]);
        u64::from_be_bytes(v)
    }

    /// Devices numbered `id` that lost a merge.
    pub fn lost_devices(&self, id: u32) -> impl Iterator<Item = &Device> {
        self.lost.iter().filter(move |d| d.id == id)
    }

    /// This record's claim id; for a record without one, derived from its
    /// handle, first device and registration time (the same at every broker).
    pub fn claim(&self) -> [u8; 16] {
        if !is_zero(&self.claim) {
            return self.claim;
        }
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(self.handle.as_bytes());
        ctx.update(&self.created_at_ms.to_be_bytes());
        if let Some(first) = self.devices.iter().min_by_key(|d| d.id) {
            ctx.update(&first.public_key);
        }
        let mut claim = [0u8; 16];
        claim.copy_from_slice(&ctx.finish().as_ref()[..16]);
        claim
    }

    /// The record both copies of an account become when they meet: the
    /// same whichever broker merges and in whichever order (commutative,
    /// associative, and `a.merge(&a) == a`).
    ///
    /// - Different claims (the handle was registered on both sides of a
    ///   partition): the earlier registration keeps the handle (ties go to
    ///   the lower claim id); all of the other's devices are lost.
    /// - The same claim: devices are joined by number. A number given to
    ///   two keys (a device added on each side) keeps the key added first
    ///   (ties: the lower key); the other is lost.
    pub fn merge(&self, other: &Self) -> Self {
        let (winner, loser) = if (self.created_at_ms, self.claim()) <= (other.created_at_ms, other.claim()) {
            (self, other)
        } else {
            (other, self)
        };
        let mut devices: Vec<Device> = winner.devices.clone();
        let mut lost: Vec<Device> = winner.lost.iter().chain(&loser.lost).cloned().collect();
        let same_claim = winner.claim() == loser.claim();
        let mut next_device_id = winner.next_device_id;
        if same_claim {
            next_device_id = next_device_id.max(loser.next_device_id);
            for d in &loser.devices {
                match devices.iter_mut().find(|k| k.id == d.id) {
                    None => devices.push(d.clone()),
                    Some(k) if k.public_key == d.public_key => {
                        // The same device: the identity set later wins.
                        if (d.identity_at_ms, d.identity_key) > (k.identity_at_ms, k.identity_key) {
                            k.identity_key = d.identity_key;
                            k.identity_at_ms = d.identity_at_ms;
                        }
                        if d.push > k.push {
                            k.push = d.push.clone();
                        }
                    }
                    Some(k) => {
                        if (d.added_at_ms, d.public_key) < (k.added_at_ms, k.public_key) {
                            lost.push(std::mem::replace(k, d.clone()));
                        } else {
                            lost.push(d.clone());
                        }
                    }
                }
            }
        } else {
            lost.extend(loser.devices.iter().cloned());
        }
        let mut removed: Vec<u32> = winner.removed.clone();
        if same_claim {
            removed.extend(&loser.removed);
        }
        removed.sort_unstable();
        removed.dedup();
        devices.retain(|d| !removed.contains(&d.id));
        devices.sort_by_key(|d| d.id);
        // A device that is current is not also lost; each lost one once.
        lost.retain(|l| !devices.iter().any(|d| d.id == l.id && d.public_key == l.public_key));
        lost.sort_by_key(|d| (d.added_at_ms, d.id, d.public_key));
        lost.dedup_by(|a, b| a.id == b.id && a.public_key == b.public_key);
        if lost.len() > LOST_MAX {
            lost.drain(..lost.len() - LOST_MAX);
        }
        Self {
            handle: winner.handle.clone(),
            created_at_ms: winner.created_at_ms,
            devices,
            next_device_id,
            claim: winner.claim(),
            lost,
            removed,
            // The same claim: the later profile; else the winner's.
            profile: if same_claim {
                winner.profile.clone().max(loser.profile.clone())
            } else {
                winner.profile.clone()
            },
            presence: if same_claim {
                winner.presence.clone().max(loser.presence.clone())
            } else {
                winner.presence.clone()
            },
        }
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        // Serialising plain data to a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub(crate) fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// An optional 32-byte key as a hex string.
mod hex_opt {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_str(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        let Some(text) = Option::<String>::deserialize(d)? else { return Ok(None) };
        let bytes = hex::decode(text).map_err(D::Error::custom)?;
        bytes.try_into().map(Some).map_err(|_| D::Error::custom("expected 32 bytes"))
    }
}

/// Fixed-size byte arrays (keys, claim ids) as hex strings.
mod hex_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer, const N: usize>(bytes: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(text).map_err(D::Error::custom)?;
        bytes.try_into().map_err(|_| D::Error::custom(format!("expected {N} bytes")))
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
        let old = br#"{"handle":"bob","created_at_ms":5,"devices":[],"next_device_id":2}"#;
        let b = Account::from_json(old).unwrap();
        assert_eq!((b.claim, b.lost.len()), ([0; 16], 0), "a record from before claims reads");
        assert_eq!(b.claim(), Account::from_json(old).unwrap().claim(), "and gets the same derived claim");
        assert_ne!(b.claim(), [0; 16]);
    }

    fn with_device(mut a: Account, key: u8, at: u64) -> Account {
        let id = a.next_device_id;
        a.next_device_id += 1;
        a.devices.push(Device::new(id, [key; 32], at));
        a
    }

    fn keys(devices: &[Device]) -> Vec<(u32, u8)> {
        devices.iter().map(|d| (d.id, d.public_key[0])).collect()
    }

    #[test]
    fn the_device_list_version_follows_devices_and_identities_and_merges_to_the_later_identity() {
        let a = Account::new("fay", [1; 32], 100);
        let b = with_device(a.clone(), 2, 200);
        assert_ne!(a.devices_version(), b.devices_version(), "a device added");
        let mut c = b.clone();
        c.devices[1].identity_key = Some([9; 32]);
        c.devices[1].identity_at_ms = 300;
        assert_ne!(b.devices_version(), c.devices_version(), "an identity published");
        assert_eq!(Account::from_json(&c.to_json()).unwrap(), c, "and kept");
        let mut d = b.clone();
        d.devices[1].identity_key = Some([8; 32]);
        d.devices[1].identity_at_ms = 400;
        assert_eq!(c.merge(&d), d.merge(&c), "either order");
        assert_eq!(c.merge(&d).devices[1].identity_key, Some([8; 32]), "the later identity");
        assert_eq!(c.merge(&b).devices[1].identity_key, Some([9; 32]), "over none");
        assert_eq!(a.devices_version(), Account::from_json(&a.to_json()).unwrap().devices_version());
    }

    #[test]
    fn an_unlinked_device_stays_unlinked_whatever_copy_it_meets() {
        let base = with_device(with_device(Account::new("gus", [1; 32], 100), 2, 200), 3, 300);
        let mut unlinked = base.clone();
        assert!(unlinked.unlink(2));
        assert!(!unlinked.unlink(2), "once");
        assert_eq!(keys(&unlinked.devices), vec![(1, 1), (3, 3)]);
        assert_eq!(unlinked.merge(&base), base.merge(&unlinked), "either order");
        assert_eq!(keys(&unlinked.merge(&base).devices), vec![(1, 1), (3, 3)], "the old copy does not bring it back");
        assert_eq!(unlinked.merge(&base).next_device_id, 4, "and its number is not given again");
        assert_eq!(Account::from_json(&unlinked.to_json()).unwrap(), unlinked);
        assert_eq!(unlinked.primary(), Some(1));
    }

    #[test]
    fn the_later_profile_wins_a_merge_in_either_order() {
        let base = Account::new("hal", [1; 32], 100);
        let mut early = base.clone();
        early.profile = Some(Profile { updated_at_ms: 10, name: "Hal".into(), ..Profile::default() });
        let mut late = base.clone();
        late.profile = Some(Profile { updated_at_ms: 20, status: "away".into(), ..Profile::default() });
        assert_eq!(early.merge(&late), late.merge(&early));
        assert_eq!(early.merge(&late).profile, late.profile);
        assert_eq!(early.merge(&base).profile, early.profile, "over none");
        assert_eq!(Account::from_json(&late.to_json()).unwrap(), late);
    }

    #[test]
    fn presence_is_shared_only_both_ways_and_nobody_hides_both_ways() {
        let with = |handle: &str, nobody: bool, allowed: &[&str]| {
            let mut a = Account::new(handle, [1; 32], 1);
            let allowed = allowed.iter().map(|h| (*h).to_owned()).collect();
            a.presence = Some(PresenceSettings { updated_at_ms: 1, nobody, allowed });
            a
        };
        let (alice, bob) = (with("alice", false, &["bob"]), with("bob", false, &["alice", "carol"]));
        assert!(alice.shares_presence_with(&bob) && bob.shares_presence_with(&alice));
        let carol = with("carol", false, &["bob"]);
        assert!(!carol.shares_presence_with(&alice), "a stranger sees nothing");
        assert!(carol.shares_presence_with(&bob));
        let shy_bob = with("bob", true, &["alice", "carol"]);
        assert!(!alice.shares_presence_with(&shy_bob) && !shy_bob.shares_presence_with(&alice), "nobody: both ways");
        assert!(!Account::new("dan", [2; 32], 1).shares_presence_with(&alice), "never set: nothing");
    }

    /// Issue 11, 2.7: copies of a handle claimed on both sides of a
    /// partition were settled by `next_device_id`, so the claimant with
    /// more devices silently took over the other's handle and keys. Now the
    /// earlier claim wins wherever the copies meet, and the loser's devices
    /// are remembered as lost.
    #[test]
    fn two_claims_of_a_handle_merge_to_the_earlier_one_in_any_order() {
        let first = Account::new("dave", [1; 32], 100);
        let second = with_device(with_device(Account::new("dave", [2; 32], 200), 3, 210), 4, 220);
        let merged = first.merge(&second);
        assert_eq!(merged, second.merge(&first), "the same in either order");
        assert_eq!(merged.claim(), first.claim(), "the earlier claim keeps the handle");
        assert_eq!(keys(&merged.devices), vec![(1, 1)]);
        assert_eq!(keys(&merged.lost), vec![(1, 2), (2, 3), (3, 4)], "the other claim's devices are lost");
        assert_eq!(merged.merge(&merged), merged, "merging again changes nothing");
        assert_eq!(merged.merge(&second), merged);
        assert_eq!(merged.merge(&first), merged);
    }

    /// The same claim with a device added on each side of a partition
    /// under the same number: the first added keeps the number.
    #[test]
    fn a_device_number_given_twice_keeps_the_key_added_first() {
        let base = Account::new("erin", [1; 32], 100);
        let left = with_device(base.clone(), 5, 300);
        let right = with_device(with_device(base.clone(), 6, 200), 7, 400);
        let merged = left.merge(&right);
        assert_eq!(merged, right.merge(&left));
        assert_eq!(keys(&merged.devices), vec![(1, 1), (2, 6), (3, 7)]);
        assert_eq!(keys(&merged.lost), vec![(2, 5)]);
        assert_eq!(merged.next_device_id, 4);
        let third = with_device(base, 8, 250);
        assert_eq!(merged.merge(&third), third.merge(&left).merge(&right), "associative");
    }
}
