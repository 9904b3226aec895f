//! What a queue entry holds: when it was queued and the item itself (a
//! message or a delivery receipt), stored as the protobuf bytes that go into a
//! `Deliver` frame so a push needs no re-encoding.
//!
//! Value layout: `enqueued_at_ms: u64 BE`, `kind: u8` (1 message, 2 receipt),
//! protobuf bytes of `pb::Message` or `pb::Receipt`.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use tern_protocol::pb;

const KIND_MESSAGE: u8 = 1;
/// Kind byte of a stored receipt.
pub(crate) const KIND_RECEIPT: u8 = 2;
const HEADER: usize = 9;

/// A decoded queue entry.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredItem {
    /// Broker time the entry was queued, ms since the Unix epoch.
    pub enqueued_at_ms: u64,
    /// The payload.
    pub item: pb::deliver::Item,
}

/// A stored value that does not decode: the database is damaged.
#[derive(Debug, thiserror::Error)]
#[error("corrupt queue entry: {0}")]
pub struct CorruptItem(String);

impl StoredItem {
    /// Encodes for the `queues` column family.
    pub fn encode(&self) -> Bytes {
        let (kind, len) = match &self.item {
            pb::deliver::Item::Message(m) => (KIND_MESSAGE, m.encoded_len()),
            pb::deliver::Item::Receipt(r) => (KIND_RECEIPT, r.encoded_len()),
        };
        let mut buf = BytesMut::with_capacity(HEADER + len);
        buf.put_u64(self.enqueued_at_ms);
        buf.put_u8(kind);
        match &self.item {
            pb::deliver::Item::Message(m) => m.encode_raw(&mut buf),
            pb::deliver::Item::Receipt(r) => r.encode_raw(&mut buf),
        }
        buf.freeze()
    }

    /// Decodes a value of the `queues` column family.
    pub fn decode(value: &[u8]) -> Result<Self, CorruptItem> {
        let enqueued_at_ms = enqueued_at(value).ok_or_else(|| CorruptItem("short value".into()))?;
        let body = Bytes::copy_from_slice(&value[HEADER..]);
        let item = match value[8] {
            KIND_MESSAGE => {
                pb::deliver::Item::Message(pb::Message::decode(body).map_err(|e| CorruptItem(e.to_string()))?)
            }
            KIND_RECEIPT => {
                pb::deliver::Item::Receipt(pb::Receipt::decode(body).map_err(|e| CorruptItem(e.to_string()))?)
            }
            other => return Err(CorruptItem(format!("unknown kind {other}"))),
        };
        Ok(Self { enqueued_at_ms, item })
    }
}

/// The kind byte and protobuf bytes of a stored value.
pub(crate) fn split_item(value: &[u8]) -> Option<(u8, &[u8])> {
    (value.len() >= HEADER).then(|| (value[8], &value[HEADER..]))
}

/// Whether a stored value is a message sent by device `device` of `handle`
/// (a value that does not decode is not).
pub(crate) fn sent_by(value: &[u8], handle: &str, device: u32) -> bool {
    match split_item(value) {
        Some((KIND_MESSAGE, body)) => {
            pb::Message::decode(body).is_ok_and(|m| m.from == handle && m.from_device == device)
        }
        _ => false,
    }
}

/// The enqueue time of a stored value, without decoding the rest.
pub(crate) fn enqueued_at(value: &[u8]) -> Option<u64> {
    let head: [u8; 8] = value.get(..8)?.try_into().ok()?;
    (value.len() >= HEADER).then(|| u64::from_be_bytes(head))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let items = [
            pb::deliver::Item::Message(pb::Message {
                message_id: vec![1; 16].into(),
                from: "alice".into(),
                from_device: 2,
                to: "bob".into(),
                sent_at_ms: 5,
                body: "hi".into(),
            }),
            pb::deliver::Item::Receipt(pb::Receipt {
                message_id: vec![2; 16].into(),
                handle: "bob".into(),
                device: 1,
                delivered_at_ms: 9,
                error: tern_protocol::ErrorCode::PayloadTooLarge as i32,
            }),
        ];
        for item in items {
            let stored = StoredItem { enqueued_at_ms: 1234, item };
            let bytes = stored.encode();
            assert_eq!(enqueued_at(&bytes), Some(1234));
            assert_eq!(StoredItem::decode(&bytes).unwrap(), stored);
        }
        assert!(StoredItem::decode(&[0; 3]).is_err());
        assert!(StoredItem::decode(&[0, 0, 0, 0, 0, 0, 0, 0, 7]).is_err());
    }
}
