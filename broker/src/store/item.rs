//! What a queue entry holds: when it was queued and the item itself (a
//! message or a delivery receipt), stored as the protobuf bytes that go into a
//! `Deliver` frame so a push needs no re-encoding.
//!
//! Value layout: `enqueued_at_ms: u64 BE`, `kind: u8` (1 message, 2 receipt;
//! with bit 0x80 set, a stamp follows), `stamp: u64 BE`, then the protobuf
//! bytes of `pb::Message` or `pb::Receipt`.
//!
//! The stamp orders one sender's entries across brokers: the sender's broker
//! gives it from its hybrid logical clock when it stores the entry, and it
//! travels unchanged in the value when the entry is shipped. A device's
//! broker gives its stamps only after the device's previous broker moved on
//! what the device sent through it and reported its clock (`SenderFlushed`),
//! so one device's stamps rise across its moves. Where entries of one sender
//! arrive out of order (a handoff after a move), the queue is put back in
//! stamp order before any is delivered (`WriteCmd::Reorder`). Entries
//! written before stamps existed read as stamp 0 and keep their place.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use tern_protocol::pb;

const KIND_MESSAGE: u8 = 1;
/// Kind byte of a stored receipt.
pub(crate) const KIND_RECEIPT: u8 = 2;
/// Set in the kind byte of a value that carries a stamp.
const STAMPED: u8 = 0x80;
/// `enqueued_at_ms` and the kind byte.
const HEADER: usize = 9;
const STAMP: usize = 8;

/// A decoded queue entry.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredItem {
    /// Broker time the entry was queued, ms since the Unix epoch.
    pub enqueued_at_ms: u64,
    /// Its place in its sender's order: the sender's broker's hybrid
    /// logical clock when it was stored there (0: not stamped).
    pub stamp: u64,
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
        let mut buf = BytesMut::with_capacity(HEADER + STAMP + len);
        buf.put_u64(self.enqueued_at_ms);
        if self.stamp == 0 {
            buf.put_u8(kind);
        } else {
            buf.put_u8(kind | STAMPED);
            buf.put_u64(self.stamp);
        }
        match &self.item {
            pb::deliver::Item::Message(m) => m.encode_raw(&mut buf),
            pb::deliver::Item::Receipt(r) => r.encode_raw(&mut buf),
        }
        buf.freeze()
    }

    /// Decodes a value of the `queues` column family.
    pub fn decode(value: &[u8]) -> Result<Self, CorruptItem> {
        let enqueued_at_ms = enqueued_at(value).ok_or_else(|| CorruptItem("short value".into()))?;
        let (kind, stamp, body) = parts(value).ok_or_else(|| CorruptItem("short value".into()))?;
        let body = Bytes::copy_from_slice(body);
        let item = match kind {
            KIND_MESSAGE => {
                pb::deliver::Item::Message(pb::Message::decode(body).map_err(|e| CorruptItem(e.to_string()))?)
            }
            KIND_RECEIPT => {
                pb::deliver::Item::Receipt(pb::Receipt::decode(body).map_err(|e| CorruptItem(e.to_string()))?)
            }
            other => return Err(CorruptItem(format!("unknown kind {other}"))),
        };
        Ok(Self { enqueued_at_ms, stamp, item })
    }
}

/// The kind (without the stamp bit), stamp (0: none) and protobuf bytes of a
/// stored value.
fn parts(value: &[u8]) -> Option<(u8, u64, &[u8])> {
    let kind = *value.get(HEADER - 1)?;
    if kind & STAMPED == 0 {
        return Some((kind, 0, &value[HEADER..]));
    }
    let stamp: [u8; STAMP] = value.get(HEADER..HEADER + STAMP)?.try_into().ok()?;
    Some((kind & !STAMPED, u64::from_be_bytes(stamp), &value[HEADER + STAMP..]))
}

/// The kind byte and protobuf bytes of a stored value.
pub(crate) fn split_item(value: &[u8]) -> Option<(u8, &[u8])> {
    parts(value).map(|(kind, _, body)| (kind, body))
}

/// Whose order a stored value is in, and its place in it: the device that
/// sent the message (or whose delivery the receipt reports) and the stamp.
/// `None` for a value that does not decode.
pub(crate) fn order_of(value: &[u8]) -> Option<(u8, String, u32, u64)> {
    let (kind, stamp, body) = parts(value)?;
    match kind {
        KIND_MESSAGE => pb::Message::decode(body).ok().map(|m| (kind, m.from, m.from_device, stamp)),
        KIND_RECEIPT => pb::Receipt::decode(body).ok().map(|r| (kind, r.handle, r.device, stamp)),
        _ => None,
    }
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
                no_receipt: true,
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
            for stamp in [0, 1_800_000_000_000_000] {
                let stored = StoredItem { enqueued_at_ms: 1234, stamp, item: item.clone() };
                let bytes = stored.encode();
                assert_eq!(enqueued_at(&bytes), Some(1234));
                assert_eq!(StoredItem::decode(&bytes).unwrap(), stored);
                let (kind, _) = split_item(&bytes).unwrap();
                assert!(
                    kind == KIND_MESSAGE || kind == KIND_RECEIPT,
                    "split_item gives the kind without the stamp bit"
                );
                assert_eq!(order_of(&bytes).unwrap().3, stamp);
            }
        }
        assert!(StoredItem::decode(&[0; 3]).is_err());
        assert!(StoredItem::decode(&[0, 0, 0, 0, 0, 0, 0, 0, 7]).is_err());
        assert!(StoredItem::decode(&[0, 0, 0, 0, 0, 0, 0, 0, 0x81, 1, 2]).is_err(), "a stamp cut short");
    }
}
