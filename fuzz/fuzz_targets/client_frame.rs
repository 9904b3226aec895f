//! The client frame decoder over an arbitrary byte stream, fed in random
//! chunk sizes through the session's own read-buffer rule, with a frame limit
//! from the input (the broker's default, its pre-login limit, or any small
//! one).
//!
//! Asserts: no panic; an incomplete frame consumes and allocates nothing; a
//! length over the limit is refused before anything is allocated for it; no
//! single allocation while decoding exceeds limit + prefix, and a frame's
//! decoding allocates no more than its own size (plus a little); the read
//! buffer stays within twice the frame limit plus one read; every decoded
//! frame re-encodes within the limit, exactly `encoded_len` long, and decodes
//! back equal.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tern_fuzz::{decode_stream, session_reserve, Chunks, Decoded, Input, TrackingAlloc};
use tern_protocol::{codec, pb, DecodeError};

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

/// Room a decode may allocate beyond the frame's own bytes (the shared
/// buffer header `split_to` makes, an error's context).
const SLACK: usize = 4096;

/// The largest bookkeeping allocation a decode makes whatever the frame (the
/// 40-byte header `BytesMut::split_to` shares the buffer through).
const BOOKKEEPING: usize = 64;

/// What the bounded lists of one frame may cost decoded beyond its bytes
/// (`codec::decode_client_frame` refuses more elements): envelopes, one-time
/// keys, and the presence lists' strings, in `Vec`s grown by doubling.
const LISTS_MEMORY: usize = 2 * std::mem::size_of::<pb::Envelope>() * tern_protocol::MAX_ENVELOPES
    + 2 * std::mem::size_of::<pb::OneTimeKey>() * tern_protocol::MAX_PUBLISHED_KEYS
    + 3 * 2 * std::mem::size_of::<String>() * tern_protocol::MAX_LISTED_DEVICES;

/// Packed repeated integers (`ClaimKeys.devices`) cost up to 4 bytes in
/// memory per byte on the wire, bounded by the frame's size.
const PACKED_PER_BYTE: usize = 4;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let max = match input.u8() & 3 {
        0 => tern_protocol::DEFAULT_MAX_FRAME_LEN,
        1 => 4096,
        2 => 1024,
        _ => usize::from(input.u8()) * 16,
    };
    let seed = input.u32();
    let mut chunks = Chunks::new(seed, input.rest());
    let reserve = |buf: &mut BytesMut| {
        session_reserve(buf, max);
        assert!(
            buf.capacity() <= 2 * (max + codec::LEN_PREFIX) + 128 * 1024,
            "read buffer of {} bytes for a limit of {max}",
            buf.capacity()
        );
    };
    let on_frame = |d: Decoded<pb::ClientFrame>| {
        let largest = (max + codec::LEN_PREFIX).max(BOOKKEEPING).max(LISTS_MEMORY / 2).max(PACKED_PER_BYTE * d.len);
        assert!(d.alloc.largest <= largest, "{:?} for a limit of {max}", d.alloc);
        let total = (1 + PACKED_PER_BYTE) * d.len + LISTS_MEMORY + SLACK;
        assert!(d.alloc.total <= total, "{:?} for a frame of {}", d.alloc, d.len);
        check_reencodes(&d.frame, d.len, max);
    };
    match decode_stream(&mut chunks, max, reserve, codec::decode_client_frame, on_frame) {
        // Plus prost's error, which records the nesting (at most its
        // recursion limit of 100 levels).
        Some((DecodeError::Malformed(_), alloc)) => {
            assert!(alloc.largest <= (max + codec::LEN_PREFIX).max(SLACK), "{alloc:?} for a limit of {max}");
        }
        Some((DecodeError::TooManyEntries { .. } | DecodeError::TooLarge { .. }, _)) | None => {}
    }
});

/// A decoded frame is never longer re-encoded than it came (proto3 drops
/// defaults, duplicates and unknown fields) but by one byte: a single
/// `ClaimKeys.devices` element sent unpacked re-encodes packed, a byte
/// longer. And it survives a round trip.
fn check_reencodes(frame: &pb::ClientFrame, frame_len: usize, max: usize) {
    assert!(frame.encoded_len() <= frame_len + 1, "{} > {frame_len} + 1", frame.encoded_len());
    let mut out = codec::encode_to_vec(frame, max + 1).expect("a decoded frame re-encodes within the limit");
    assert_eq!(out.len(), codec::LEN_PREFIX + frame.encoded_len());
    let back = codec::decode::<pb::ClientFrame>(&mut out, max + 1).expect("re-decodes").expect("whole");
    assert_eq!(&back, frame);
}
