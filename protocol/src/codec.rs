//! Length-prefixed framing: a 4-byte big-endian length, then that many bytes
//! of one protobuf message.
//!
//! [`decode`] reads from a growing [`BytesMut`] buffer: an incomplete frame is
//! `Ok(None)` (read more and call again), and a length above the maximum is an
//! error before any byte of the frame is buffered or allocated.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

/// Bytes in the length prefix.
pub const LEN_PREFIX: usize = 4;

/// Why a frame could not be decoded. Every variant is fatal for the stream.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix announces more than the maximum frame length.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The frame's bytes are not a valid protobuf message.
    #[error("malformed frame: {0}")]
    Malformed(#[from] prost::DecodeError),
    /// A repeated field holds more elements than its bound: a `Ship`'s
    /// entries ([`MAX_SHIP_ENTRIES`]), a `DeviceList`'s devices
    /// ([`MAX_LISTED_DEVICES`]) or a `Redirect`'s brokers
    /// ([`MAX_REDIRECT_BROKERS`]). Refused before decoding.
    #[error("{field} holds {count} elements, more than the maximum of {max}")]
    TooManyEntries {
        /// The field, as `Message.field`.
        field: &'static str,
        /// Elements in the frame.
        count: usize,
        /// The maximum.
        max: usize,
    },
}

/// Most entries one `Ship` frame may carry. A sender's batches hold at most
/// half of it. The bound is what keeps a peer frame's decoded size near its
/// wire size: an empty `ShipEntry` takes 2 bytes on the wire and 40 in
/// memory, and the `Vec` holding the entries grows by doubling, so without
/// it one 8 MiB frame cost 160 MiB in one allocation (docs/fuzzing.md).
pub const MAX_SHIP_ENTRIES: usize = 1024;

/// Most devices one `DeviceList` may name: the most a broker lets one user
/// have (`store.max_devices` is at most 1,024). An empty `DeviceInfo` takes
/// 2 bytes on the wire and 48 in memory.
pub const MAX_LISTED_DEVICES: usize = 1024;

/// Most broker addresses one `Redirect` may carry (a broker sends at most
/// this many of its mesh's members). An empty string takes 2 bytes on the
/// wire and 24 in memory.
pub const MAX_REDIRECT_BROKERS: usize = 1024;

/// Most envelopes one `Send` may carry: one per device of the recipient
/// and of the sender's other devices, each user at most
/// [`MAX_LISTED_DEVICES`]. An empty `Envelope` takes 2 bytes on the wire
/// and about 100 in memory.
pub const MAX_ENVELOPES: usize = 2 * MAX_LISTED_DEVICES;

/// Most one-time keys one `PublishKeys` may carry (`keys.max_one_time_keys`
/// is at most 10,000). An empty `OneTimeKey` takes 2 bytes on the wire and
/// about 72 in memory.
pub const MAX_PUBLISHED_KEYS: usize = 10_000;

/// Why a frame could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The encoded message is larger than the maximum frame length.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Encoded length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
}

/// Appends `msg` as one frame to `dst`.
pub fn encode<M: Message>(msg: &M, max_len: usize, dst: &mut BytesMut) -> Result<(), EncodeError> {
    let len = msg.encoded_len();
    if len > max_len {
        return Err(EncodeError::TooLarge { len, max: max_len });
    }
    dst.reserve(LEN_PREFIX + len);
    // `len <= max_len`, and callers keep `max_len` far below 4 GiB.
    dst.put_u32(u32::try_from(len).map_err(|_| EncodeError::TooLarge { len, max: max_len })?);
    // Cannot fail: capacity was reserved above.
    msg.encode(dst).map_err(|_| EncodeError::TooLarge { len, max: max_len })?;
    Ok(())
}

/// Encodes `msg` as one frame into a fresh buffer.
pub fn encode_to_vec<M: Message>(msg: &M, max_len: usize) -> Result<BytesMut, EncodeError> {
    let mut buf = BytesMut::new();
    encode(msg, max_len, &mut buf)?;
    Ok(buf)
}

/// Takes one frame off the front of `src`.
///
/// Returns `Ok(None)` when `src` does not hold a whole frame yet; nothing is
/// consumed then. The length prefix is checked against `max_len` as soon as
/// its 4 bytes are there, so a peer cannot make the caller buffer more.
pub fn decode<M: Message + Default>(src: &mut BytesMut, max_len: usize) -> Result<Option<M>, DecodeError> {
    let Some(len) = peek_len(src, max_len)? else {
        return Ok(None);
    };
    if src.len() < LEN_PREFIX + len {
        return Ok(None);
    }
    src.advance(LEN_PREFIX);
    let frame = src.split_to(len).freeze();
    Ok(Some(M::decode(frame)?))
}

/// [`decode`] for a broker-to-broker [`PeerFrame`](crate::peer::PeerFrame),
/// refusing one whose `Ship` carries more than [`MAX_SHIP_ENTRIES`] entries
/// before decoding it: a pre-scan of the wire format counts them without
/// allocating.
pub fn decode_peer_frame(src: &mut BytesMut, max_len: usize) -> Result<Option<crate::peer::PeerFrame>, DecodeError> {
    // `PeerFrame.ship` is field 5, `Ship.entries` field 4 (peer.proto).
    decode_bounded(src, max_len, &[(&[5, 4], "Ship.entries", MAX_SHIP_ENTRIES)])
}

/// [`decode`] for a [`ClientFrame`](crate::pb::ClientFrame) (what a broker
/// reads), refusing one whose `Send` carries more than [`MAX_ENVELOPES`]
/// envelopes or whose `PublishKeys` more than [`MAX_PUBLISHED_KEYS`] keys
/// before decoding it.
pub fn decode_client_frame(src: &mut BytesMut, max_len: usize) -> Result<Option<crate::pb::ClientFrame>, DecodeError> {
    // `ClientFrame.send` is field 5 with `envelopes` 5; `publish_keys` 10
    // with `one_time_keys` 2 (tern.proto).
    // `set_presence` 15 with `allow` 2 and `disallow` 3, `watch_presence` 16
    // with `handles` 1: at most 1,024 users each.
    let bounds: [Bound; 5] = [
        (&[5, 5], "Send.envelopes", MAX_ENVELOPES),
        (&[10, 2], "PublishKeys.one_time_keys", MAX_PUBLISHED_KEYS),
        (&[15, 2], "SetPresence.allow", MAX_LISTED_DEVICES),
        (&[15, 3], "SetPresence.disallow", MAX_LISTED_DEVICES),
        (&[16, 1], "WatchPresence.handles", MAX_LISTED_DEVICES),
    ];
    decode_bounded(src, max_len, &bounds)
}

/// [`decode`] for a [`ServerFrame`](crate::pb::ServerFrame) (what a client
/// reads), refusing one whose `DeviceList` or `Redirect` holds more than
/// [`MAX_LISTED_DEVICES`] or [`MAX_REDIRECT_BROKERS`] elements before
/// decoding it, so a frame costs a client about its size in memory.
pub fn decode_server_frame(src: &mut BytesMut, max_len: usize) -> Result<Option<crate::pb::ServerFrame>, DecodeError> {
    // `ServerFrame.device_list` is field 8 with `devices` 2, `redirect` 9
    // with `brokers` 1, `keys_claimed` 11 with `devices` 2, `error` 6 with
    // `devices` 4 (tern.proto).
    let bounds: [Bound; 4] = [
        (&[8, 2], "DeviceList.devices", MAX_LISTED_DEVICES),
        (&[9, 1], "Redirect.brokers", MAX_REDIRECT_BROKERS),
        (&[11, 2], "KeysClaimed.devices", MAX_LISTED_DEVICES),
        (&[6, 4], "Error.devices", MAX_LISTED_DEVICES),
    ];
    decode_bounded(src, max_len, &bounds)
}

/// A repeated field's path (see [`count_field`]), its name in errors, and
/// the most elements a frame may hold.
type Bound = (&'static [u32], &'static str, usize);

/// [`decode`], refusing a whole frame in which a field of `bounds` occurs
/// more often than its bound before decoding anything of it.
fn decode_bounded<M: Message + Default>(
    src: &mut BytesMut,
    max_len: usize,
    bounds: &[Bound],
) -> Result<Option<M>, DecodeError> {
    let Some(len) = peek_len(src, max_len)? else {
        return Ok(None);
    };
    let Some(frame) = src.get(LEN_PREFIX..LEN_PREFIX + len) else {
        return Ok(None);
    };
    for &(path, field, max) in bounds {
        let count = count_field(frame, path)?;
        if count > max {
            return Err(DecodeError::TooManyEntries { field, count, max });
        }
    }
    decode(src, max_len)
}

/// How often field `path`'s last number occurs in the encoded message
/// `msg`, inside the nested message fields the numbers before it name
/// (every occurrence of each, since protobuf merges a message field that
/// occurs twice). For a repeated message field, that is its element count.
/// Reads the wire format only; allocates nothing.
pub fn count_field(mut msg: &[u8], path: &[u32]) -> Result<usize, prost::DecodeError> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    let Some((&field, inner)) = path.split_first() else {
        return Ok(0);
    };
    let mut count = 0;
    while !msg.is_empty() {
        let (tag, wire_type) = decode_key(&mut msg)?;
        if tag == field && inner.is_empty() {
            count += 1;
        }
        if tag == field && !inner.is_empty() && wire_type == WireType::LengthDelimited {
            // A length past the end counts what is there; decoding then
            // fails on it.
            let len = usize::try_from(decode_varint(&mut msg)?).unwrap_or(usize::MAX).min(msg.len());
            let (nested, rest) = msg.split_at(len);
            count += count_field(nested, inner)?;
            msg = rest;
        } else {
            skip_field(wire_type, tag, &mut msg, DecodeContext::default())?;
        }
    }
    Ok(count)
}

/// The length announced by the prefix at the front of `src`, once it is
/// there, checked against `max_len`. Lets a reader size its next read.
pub fn peek_len(src: &[u8], max_len: usize) -> Result<Option<usize>, DecodeError> {
    let Some(prefix) = src.get(..LEN_PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > max_len {
        return Err(DecodeError::TooLarge { len, max: max_len });
    }
    Ok(Some(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::{client_frame::Kind, ClientFrame, Ping};

    fn ping(n: u64) -> ClientFrame {
        ClientFrame { request_id: n, kind: Some(Kind::Ping(Ping { nonce: n })) }
    }

    #[test]
    fn incomplete_frame_is_not_an_error() {
        let full = encode_to_vec(&ping(7), 1024).unwrap();
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert!(decode::<ClientFrame>(&mut part, 1024).unwrap().is_none());
            assert_eq!(part.len(), cut, "nothing consumed from a partial frame");
        }
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let mut buf = BytesMut::new();
        for n in 1..=3 {
            encode(&ping(n), 1024, &mut buf).unwrap();
        }
        for n in 1..=3 {
            assert_eq!(decode::<ClientFrame>(&mut buf, 1024).unwrap(), Some(ping(n)));
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_length_rejected_before_body_arrives() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        let err = decode::<ClientFrame>(&mut buf, 1 << 20).unwrap_err();
        assert!(matches!(err, DecodeError::TooLarge { len: 0xffff_ffff, max: 1_048_576 }));
        assert!(buf.capacity() < 1024, "no allocation for the announced length");
    }

    #[test]
    fn encode_refuses_oversized() {
        let frame = ClientFrame {
            request_id: 1,
            kind: Some(Kind::Send(crate::pb::Send { body: vec![0; 100].into(), ..Default::default() })),
        };
        assert!(matches!(encode_to_vec(&frame, 50), Err(EncodeError::TooLarge { .. })));
    }

    #[test]
    fn garbage_is_malformed() {
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(decode::<ClientFrame>(&mut buf, 1024), Err(DecodeError::Malformed(_))));
    }
}
