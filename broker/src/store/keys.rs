//! Key layout of the RocksDB column families.
//!
//! A device queue is named by [`QueueKey`]: the handle, a 0 byte (handles never
//! hold one, so no handle's key is a prefix of another's) and the device number
//! big-endian. Queue entries append the sequence number big-endian, so a
//! queue's entries sort by sequence and a queue is one contiguous key range.
//!
//! | column family | key | value |
//! | --- | --- | --- |
//! | `accounts` | handle | [`Account`](super::accounts::Account) (JSON) |
//! | `queues` | queue key + seq (u64 BE) | [`StoredItem`](super::item::StoredItem) |
//! | `meta` | queue key | head: highest seq deleted (u64 BE) |
//! | `dedup` | sender queue key + message id | accepted_at_ms (u64 BE), recipients (u32 BE) |
//! | `keys` | queue key | the device's [`KeyRecord`](super::prekeys::KeyRecord) (protobuf): identity keys, unclaimed one-time keys, fallback key |
//! | `mesh` | `id` | this store's random 16-byte id (names it as the origin of shipped entries; made anew after an unclean stop across a reboot) |
//! | `mesh` | `boot` | boot id of the machine the store was last opened on |
//! | `mesh` | `incarnation` | the gossip incarnation of the last start (u64 BE): the next start takes one above it |
//! | `mesh` | `closed` | empty; present only while the store is closed cleanly |
//! | `mesh` | `shipped` + origin id + queue key | highest origin seq accounted for (stored, or settled by a handoff) from that origin's queue (u64 BE) |
//! | `mesh` | `acctlog` + change number (u64 BE) | the handle whose account record changed (the newest 100,000 changes; sent to each peer whose link comes up) |
//! | `mesh` | `handed` + queue key | the seq (u64 BE) up to which another broker last stored this queue's entries shipped from here, then that broker's node name |
//! | `mesh` | `lastseen` + handle | the user's last-seen time, ms since the Unix epoch to the minute (u64 BE); written directly, not synced (presence) |
//! | `mesh` | `fence` + queue key | the queue's tail (u64 BE) when its fence went up; present while the queue is fenced, and after a crash until its next fence (which reorders from there) |

use std::fmt;

/// Column family names.
pub(crate) const CF_ACCOUNTS: &str = "accounts";
pub(crate) const CF_QUEUES: &str = "queues";
pub(crate) const CF_META: &str = "meta";
pub(crate) const CF_DEDUP: &str = "dedup";
pub(crate) const CF_MESH: &str = "mesh";
pub(crate) const CF_KEYS: &str = "keys";

/// Key of the store id in `mesh`.
pub(crate) const STORE_ID_KEY: &[u8] = b"id";
/// Key of the boot id of the machine the store was last opened on, in `mesh`.
pub(crate) const BOOT_KEY: &[u8] = b"boot";
/// Key of the gossip incarnation of the last start, in `mesh`.
pub(crate) const INCARNATION_KEY: &[u8] = b"incarnation";
/// Key of the clean-close marker in `mesh`: present while the store is closed
/// cleanly, deleted at open.
pub(crate) const CLOSED_KEY: &[u8] = b"closed";

/// Key of the highest seq stored from `origin`'s copy of `queue`.
pub(crate) fn shipped_key(origin: &[u8; 16], queue: &QueueKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(7 + 16 + queue.as_bytes().len());
    k.extend_from_slice(b"shipped");
    k.extend_from_slice(origin);
    k.extend_from_slice(queue.as_bytes());
    k
}

/// Key of a user's last-seen time in `mesh`.
pub(crate) fn last_seen_key(handle: &str) -> Vec<u8> {
    let mut k = b"lastseen".to_vec();
    k.extend_from_slice(handle.as_bytes());
    k
}

/// Prefix of the account change log in `mesh`.
pub(crate) const ACCOUNT_LOG_PREFIX: &[u8] = b"acctlog";

/// Key of account change `n` in `mesh`.
pub(crate) fn account_log_key(n: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(ACCOUNT_LOG_PREFIX.len() + 8);
    k.extend_from_slice(ACCOUNT_LOG_PREFIX);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// Key of the broker that last stored `queue`'s entries shipped from here.
pub(crate) fn handed_key(queue: &QueueKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(6 + queue.as_bytes().len());
    k.extend_from_slice(b"handed");
    k.extend_from_slice(queue.as_bytes());
    k
}

/// Prefix of the fence records in `mesh`.
pub(crate) const FENCE_PREFIX: &[u8] = b"fence";

/// Key of the record of `queue`'s fence.
pub(crate) fn fence_key(queue: &QueueKey) -> Vec<u8> {
    let mut k = Vec::with_capacity(FENCE_PREFIX.len() + queue.as_bytes().len());
    k.extend_from_slice(FENCE_PREFIX);
    k.extend_from_slice(queue.as_bytes());
    k
}

/// The value under [`handed_key`].
pub(crate) fn encode_handed(node: &str, up_to: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + node.len());
    v.extend_from_slice(&up_to.to_be_bytes());
    v.extend_from_slice(node.as_bytes());
    v
}

/// Reads a value written by [`encode_handed`].
pub(crate) fn decode_handed(value: &[u8]) -> Option<(String, u64)> {
    let up_to = u64::from_be_bytes(value.get(..8)?.try_into().ok()?);
    let node = std::str::from_utf8(value.get(8..)?).ok()?;
    Some((node.to_owned(), up_to))
}

/// One device's queue: `handle \0 device_be32`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey(Box<[u8]>);

impl QueueKey {
    /// The queue of `device` of `handle`. `handle` must be validated.
    pub fn new(handle: &str, device: u32) -> Self {
        let mut k = Vec::with_capacity(handle.len() + 5);
        k.extend_from_slice(handle.as_bytes());
        k.push(0);
        k.extend_from_slice(&device.to_be_bytes());
        Self(k.into_boxed_slice())
    }

    /// Parses a key written by [`QueueKey::new`].
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let zero = bytes.iter().position(|b| *b == 0)?;
        (bytes.len() == zero + 5 && std::str::from_utf8(&bytes[..zero]).is_ok()).then(|| Self(bytes.into()))
    }

    /// The handle part.
    pub fn handle(&self) -> &str {
        let zero = self.0.len() - 5;
        // Built from a `&str` or checked in `from_bytes`.
        std::str::from_utf8(&self.0[..zero]).unwrap_or_default()
    }

    /// The device number.
    pub fn device(&self) -> u32 {
        let n = self.0.len();
        u32::from_be_bytes([self.0[n - 4], self.0[n - 3], self.0[n - 2], self.0[n - 1]])
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Key of entry `seq` in this queue.
    pub(crate) fn entry(&self, seq: u64) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.0.len() + 8);
        k.extend_from_slice(&self.0);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    /// The sequence number of an entry key of this queue.
    pub(crate) fn seq_of(&self, entry_key: &[u8]) -> Option<u64> {
        let rest = entry_key.strip_prefix(&*self.0)?;
        Some(u64::from_be_bytes(rest.try_into().ok()?))
    }

    /// Dedup key for a message id sent by this device.
    pub(crate) fn dedup(&self, message_id: &[u8; 16]) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.0.len() + 16);
        k.extend_from_slice(&self.0);
        k.extend_from_slice(message_id);
        k
    }
}

impl fmt::Display for QueueKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.handle(), self.device())
    }
}

impl fmt::Debug for QueueKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QueueKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_sort_by_seq_and_stay_in_their_queue() {
        let a = QueueKey::new("a", 1);
        let ab = QueueKey::new("ab", 1);
        assert!(a.entry(1) < a.entry(2));
        assert!(a.entry(255) < a.entry(256));
        assert!(a.entry(u64::MAX) < ab.entry(0), "queues do not interleave");
        assert!(!ab.entry(0).starts_with(&a.entry(0)[..a.as_bytes().len()]));
        assert_eq!(a.seq_of(&a.entry(77)), Some(77));
        assert_eq!(ab.seq_of(&a.entry(77)), None);
        assert_eq!(QueueKey::from_bytes(a.as_bytes()), Some(a.clone()));
        assert_eq!(a.handle(), "a");
        assert_eq!(QueueKey::new("bob", 7).device(), 7);
        assert_eq!(QueueKey::from_bytes(b"bad"), None);
    }
}
