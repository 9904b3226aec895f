//! Pushing a device's queue to its session, in seq order, within a window of
//! unacknowledged entries.
//!
//! Entries arrive two ways: handed over by the router right after they are
//! written, before their WAL sync (the fast path), or read from the store
//! (after login, after the router's channel overflowed, or when the window
//! reopens). `next` is the next seq to push: anything below it is skipped, so
//! the two paths never push an entry twice within a session.

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};

use crate::store::{now_ms, QueueKey, Store, StoreError};

/// `ServerFrame.kind = deliver` field number.
const FRAME_DELIVER: u32 = 5;
/// `Deliver.seq`, `Deliver.message`, `Deliver.receipt` field numbers.
const DELIVER_SEQ: u32 = 1;
const DELIVER_MESSAGE: u32 = 2;
const DELIVER_RECEIPT: u32 = 3;

/// Push state of one logged-in device.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) queue: QueueKey,
    /// Next seq to push.
    next: u64,
    /// Highest seq acknowledged by the device.
    acked: u64,
    /// The store may hold entries >= `next` that the router did not hand over.
    need_read: bool,
    window: u64,
    /// Highest seq pushed to this device by an earlier session.
    previously_pushed: u64,
}

impl Delivery {
    /// Starts after `head`, the highest seq already deleted.
    pub(crate) fn new(queue: QueueKey, head: u64, window: usize, previously_pushed: u64) -> Self {
        Self { queue, next: head + 1, acked: head, need_read: true, window: window as u64, previously_pushed }
    }

    fn room(&self) -> u64 {
        self.window.saturating_sub(self.next - 1 - self.acked.min(self.next - 1))
    }

    /// Highest seq pushed so far.
    pub(crate) fn last_pushed(&self) -> u64 {
        self.next - 1
    }

    /// The router handed over entry `seq`. Pushes it if it is the next one
    /// and the window has room; otherwise falls back to reading the store.
    pub(crate) fn on_handed(&mut self, seq: u64, value: &Bytes, out: &mut BytesMut) {
        if seq < self.next {
            return;
        }
        if seq == self.next && !self.need_read && self.room() > 0 {
            self.push(seq, value, out);
        } else {
            self.need_read = true;
        }
    }

    /// Entries may be waiting in the store.
    pub(crate) fn mark_lagged(&mut self) {
        self.need_read = true;
    }

    /// Reads waiting entries from the store into `out`, as far as the
    /// window allows. On the session's own task: these reads are of the
    /// newest entries (the memtable, microseconds), and a hop to a blocking
    /// thread per read made the 1:1 path's median latency at 10,000 msg/s
    /// about 28 % higher (docs/bench/ab-issue11.md, 2026-12-02).
    pub(crate) fn fill(&mut self, store: &Store, out: &mut BytesMut, max_bytes: usize) -> Result<(), StoreError> {
        while self.need_read && self.room() > 0 {
            let want = self.room().min(256) as usize;
            let entries = store.read(&self.queue, self.next, want, max_bytes)?;
            let bytes: usize = entries.iter().map(|(_, v)| v.len()).sum();
            for (seq, value) in &entries {
                self.push(*seq, value, out);
            }
            if entries.len() < want && bytes < max_bytes {
                // Caught up: whatever is stored later will be handed over.
                self.need_read = false;
            }
        }
        Ok(())
    }

    fn push(&mut self, seq: u64, value: &Bytes, out: &mut BytesMut) {
        if encode_deliver(seq, value, out) {
            metrics::counter!("tern_deliveries_total").increment(1);
            if seq <= self.previously_pushed {
                metrics::counter!("tern_redeliveries_total").increment(1);
            }
            if let Some(at) = crate::store::enqueued_at(value) {
                let ms = now_ms().saturating_sub(at);
                metrics::histogram!("tern_queue_wait_seconds").record(ms as f64 / 1000.0);
            }
        }
        self.next = seq + 1;
    }

    /// The device acknowledged up to `up_to`. Returns the seq to acknowledge
    /// in the store, clamped to what this session pushed, if it moved
    /// forward.
    ///
    /// Clamped rather than refused: an `Ack` has no answer, so a refusal
    /// could only close the connection, and a client that repeats a stale
    /// ack after each login would then never get its queue; the broker
    /// cannot tell most stale acks (those at or below what it pushed) from
    /// good ones anyway, so the client must not send them (docs/protocol.md,
    /// "Sequence numbers and acks"). Clamping keeps the harm of a bad ack to
    /// what a good one could delete: entries this session pushed.
    pub(crate) fn on_ack(&mut self, up_to: u64) -> Option<u64> {
        let up_to = up_to.min(self.last_pushed());
        if up_to <= self.acked {
            return None;
        }
        self.acked = up_to;
        Some(up_to)
    }
}

/// Appends a whole `ServerFrame { deliver: { seq, message|receipt } }` frame
/// built straight from the stored bytes, without decoding them. Returns false
/// (and writes nothing) for a value that is not a stored item.
pub(crate) fn encode_deliver(seq: u64, value: &[u8], out: &mut BytesMut) -> bool {
    let Some((kind, item)) = crate::store::split_item(value) else {
        tracing::error!(seq, "skipping a corrupt queue entry");
        return false;
    };
    let item_field = if kind == crate::store::KIND_RECEIPT { DELIVER_RECEIPT } else { DELIVER_MESSAGE };
    let inner_len = key_len(DELIVER_SEQ)
        + encoded_len_varint(seq)
        + key_len(item_field)
        + encoded_len_varint(item.len() as u64)
        + item.len();
    let frame_len = key_len(FRAME_DELIVER) + encoded_len_varint(inner_len as u64) + inner_len;
    out.reserve(4 + frame_len);
    out.put_u32(frame_len as u32);
    encode_key(FRAME_DELIVER, WireType::LengthDelimited, out);
    encode_varint(inner_len as u64, out);
    encode_key(DELIVER_SEQ, WireType::Varint, out);
    encode_varint(seq, out);
    encode_key(item_field, WireType::LengthDelimited, out);
    encode_varint(item.len() as u64, out);
    out.put_slice(item);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoredItem;
    use tern_protocol::pb;

    #[test]
    fn hand_built_frame_decodes_as_deliver() {
        let items = [
            pb::deliver::Item::Message(pb::Message {
                message_id: vec![3; 16].into(),
                from: "alice".into(),
                from_device: 1,
                to: "bob".into(),
                sent_at_ms: 42,
                body: vec![9; 300].into(),
                no_receipt: false,
            }),
            pb::deliver::Item::Receipt(pb::Receipt {
                message_id: vec![4; 16].into(),
                handle: "bob".into(),
                device: 2,
                delivered_at_ms: 7,
                error: 0,
            }),
        ];
        for (i, item) in items.into_iter().enumerate() {
            let value = StoredItem { enqueued_at_ms: 1, stamp: 0, item: item.clone() }.encode();
            let mut out = BytesMut::new();
            let seq = 1_000_000 + i as u64;
            assert!(encode_deliver(seq, &value, &mut out));
            let frame: pb::ServerFrame = tern_protocol::decode(&mut out, 1 << 20).unwrap().unwrap();
            let expected = pb::ServerFrame {
                request_id: 0,
                kind: Some(pb::server_frame::Kind::Deliver(pb::Deliver { seq, item: Some(item) })),
            };
            assert_eq!(frame, expected);
            assert!(out.is_empty());
        }
    }

    #[test]
    fn window_and_ack_clamping() {
        let mut d = Delivery::new(QueueKey::new("bob", 1), 10, 2, 0);
        let v = StoredItem { enqueued_at_ms: 1, stamp: 0, item: pb::deliver::Item::Receipt(pb::Receipt::default()) }
            .encode();
        let mut out = BytesMut::new();
        d.need_read = false;
        d.on_handed(11, &v, &mut out);
        d.on_handed(12, &v, &mut out);
        assert_eq!(d.last_pushed(), 12);
        d.on_handed(13, &v, &mut out);
        assert_eq!(d.last_pushed(), 12, "window of 2 is full");
        assert!(d.need_read, "the skipped entry will be read from the store");
        assert_eq!(d.on_ack(100), Some(12), "cannot ack beyond what was pushed");
        assert_eq!(d.on_ack(5), None);
        d.on_handed(11, &v, &mut out);
        assert_eq!(d.last_pushed(), 12, "old entries are not pushed again");
    }
}
