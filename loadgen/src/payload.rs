//! What every load-generator message carries so the receiving side can account
//! for it: who sent it, its number in that sender's stream, and when it was
//! meant to be sent. Padded with zeros to the requested body size.
//!
//! End to end (`chat --e2e`) the message is an `E2ePayload` whose text is a
//! string: [`Stamp::encode_text`] writes the header in hex, padded with
//! `.` to the body size (so the plaintext is as long as a plain body), and
//! [`Stamp::decode_text`] gives back the header bytes the ledger reads.

use bytes::{BufMut, Bytes, BytesMut};

/// `b"TL"` then version 1: lets the receiver skip anything that is not ours.
const MAGIC: [u8; 3] = *b"TL\x01";

/// Bytes of the header; bodies are at least this long.
pub(crate) const HEADER_LEN: usize = MAGIC.len() + 4 + 8 + 8;

/// The decoded header of a load-generator message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// Index of the sending user.
    pub(crate) sender: u32,
    /// Position in the sender's stream, from 0.
    pub(crate) seq: u64,
    /// Intended send time, ns since the run's epoch (open loop: the
    /// scheduled time, so latency includes any wait before sending).
    pub(crate) sent_ns: u64,
}

impl Stamp {
    /// The body: header then zero padding up to `len` (at least the header).
    pub(crate) fn encode(&self, len: usize) -> Bytes {
        let mut b = BytesMut::with_capacity(len.max(HEADER_LEN));
        b.put_slice(&MAGIC);
        b.put_u32(self.sender);
        b.put_u64(self.seq);
        b.put_u64(self.sent_ns);
        b.resize(len.max(HEADER_LEN), 0);
        b.freeze()
    }

    /// Reads a header; `None` when the body is not one of ours.
    pub(crate) fn decode(body: &[u8]) -> Option<Self> {
        if body.len() < HEADER_LEN || body[..3] != MAGIC {
            return None;
        }
        let n = |r: std::ops::Range<usize>| body[r].iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
        Some(Self { sender: n(3..7) as u32, seq: n(7..15), sent_ns: n(15..23) })
    }

    /// The text of an end-to-end message: the header in hex, then `.` up
    /// to `len` characters (never shorter than the hex header).
    pub(crate) fn encode_text(&self, len: usize) -> String {
        let mut text = hex::encode(self.encode(HEADER_LEN));
        let pad = len.saturating_sub(text.len());
        text.extend(std::iter::repeat_n('.', pad));
        text
    }

    /// The header bytes of a text made by [`Stamp::encode_text`], for
    /// [`crate::ledger::Ledger::delivered_to`]; `None` when it is not one.
    pub(crate) fn decode_text(text: &str) -> Option<[u8; HEADER_LEN]> {
        let mut out = [0u8; HEADER_LEN];
        hex::decode_to_slice(text.get(..2 * HEADER_LEN)?, &mut out).ok()?;
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_pads() {
        let s = Stamp { sender: 7, seq: 1 << 40, sent_ns: 123_456_789 };
        let b = s.encode(100);
        assert_eq!(b.len(), 100);
        assert_eq!(Stamp::decode(&b), Some(s));
        assert_eq!(s.encode(1).len(), HEADER_LEN, "never shorter than the header");
    }

    #[test]
    fn text_round_trips_and_pads_to_the_body_size() {
        let s = Stamp { sender: 3, seq: 99, sent_ns: 1 << 50 };
        let t = s.encode_text(100);
        assert_eq!(t.len(), 100);
        assert_eq!(Stamp::decode(&Stamp::decode_text(&t).unwrap()), Some(s));
        assert_eq!(s.encode_text(10).len(), 2 * HEADER_LEN, "never shorter than the hex header");
        assert_eq!(Stamp::decode_text("hello"), None);
        assert_eq!(Stamp::decode_text(&"zz".repeat(30)), None);
    }

    #[test]
    fn rejects_foreign_bodies() {
        assert_eq!(Stamp::decode(b"hello"), None);
        assert_eq!(Stamp::decode(&[0u8; 64]), None);
    }
}
