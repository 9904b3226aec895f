//! The peer frame decoder (`PeerFrame`, broker-to-broker) over an arbitrary
//! byte stream, fed in random chunk sizes through the peer link's
//! read-buffer rule, with the broker's `MAX_PEER_FRAME` (8 MiB) or a smaller
//! limit from the input; every decoded `Ship` goes through
//! `tern_protocol::shipping::admit` as the receiving store would call it.
//!
//! Asserts: no panic; an incomplete frame consumes and allocates nothing; a
//! length over the limit is refused before anything is allocated for it;
//! decoding allocates at most `REPEATED_AMPLIFICATION` times the frame's
//! size (a `Ship` of empty entries: see docs/fuzzing.md, "Findings"); every
//! decoded frame re-encodes, exactly `encoded_len` long, and decodes back
//! equal; `admit` answers within its contract.
#![no_main]

use std::sync::OnceLock;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tern_fuzz::{check_admit, read_into, AllocWatch, Chunks, Input, TrackingAlloc};
use tern_protocol::peer::{peer_frame, PeerFrame};
use tern_protocol::{codec, DecodeError};

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

/// The broker's peer frame limit (`MAX_PEER_FRAME` in
/// broker/src/mesh/link.rs, crate-private there).
const MAX_PEER_FRAME: usize = 8 << 20;

/// How many bytes of memory one byte of a frame may cost when decoded: a
/// `ShipEntry` (40 bytes in memory) takes 2 bytes on the wire when empty, and
/// the `Vec` holding them grows by doubling (reallocations counted too).
const REPEATED_AMPLIFICATION: usize = 4 * 40 / 2;

const SLACK: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let max = match input.u8() & 3 {
        0 => MAX_PEER_FRAME,
        1 => 64 * 1024,
        2 => 4096,
        _ => usize::from(input.u8()) * 16,
    };
    let done = small_or_large(input.u64());
    let seed = input.u32();
    let mut chunks = Chunks::new(seed, input.rest());
    let mut buf = BytesMut::new();
    loop {
        // The peer link's rule (`reserve` in broker/src/mesh/link.rs).
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        if !read_into(&mut buf, &mut chunks) {
            return;
        }
        loop {
            let before = buf.len();
            AllocWatch::start();
            let result = codec::decode::<PeerFrame>(&mut buf, max);
            let alloc = AllocWatch::stop();
            match result {
                Ok(Some(frame)) => {
                    let frame_len = before - buf.len() - codec::LEN_PREFIX;
                    assert!(frame_len <= max);
                    assert!(alloc.total <= REPEATED_AMPLIFICATION * frame_len + SLACK, "{alloc:?} for {frame_len}");
                    if strict() {
                        let limit = (max + codec::LEN_PREFIX).max(SLACK);
                        assert!(alloc.largest <= limit, "{alloc:?} for a frame of {frame_len}, limit {max}");
                    }
                    check_reencodes(&frame);
                    if let Some(peer_frame::Kind::Ship(ship)) = &frame.kind {
                        let seqs: Vec<u64> = ship.entries.iter().map(|e| e.seq).collect();
                        check_admit(done, ship.base, ship.handed_up_to, &seqs);
                    }
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "an incomplete frame is not consumed");
                    assert_eq!(alloc.total, 0, "an incomplete frame allocates nothing");
                    break;
                }
                Err(DecodeError::TooLarge { len, max: m }) => {
                    assert!(len > max && m == max);
                    assert_eq!(alloc.total, 0, "a frame over the limit allocates nothing");
                    return;
                }
                Err(DecodeError::Malformed(_)) => return,
            }
        }
    }
});

/// With `TERN_FUZZ_STRICT_ALLOC` set, no single allocation may exceed the
/// frame limit either: the finding of docs/fuzzing.md, which
/// `artifacts/peer_frame/ship-of-empty-entries` reproduces.
fn strict() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| std::env::var_os("TERN_FUZZ_STRICT_ALLOC").is_some())
}

/// Seqs near 0 and near `u64::MAX` are where arithmetic breaks.
fn small_or_large(v: u64) -> u64 {
    match v & 3 {
        0 => (v >> 2) & 0xff,
        1 => u64::MAX - ((v >> 2) & 0xff),
        _ => v >> 2,
    }
}

fn check_reencodes(frame: &PeerFrame) {
    let mut out = BytesMut::new();
    // A negative int32 (`ShipNack.code`) sent as a 5-byte varint re-encodes
    // in 10, so a re-encoded frame may exceed the limit by a few bytes: no
    // limit here, only the round trip.
    codec::encode(frame, usize::MAX >> 1, &mut out).expect("encodes");
    assert_eq!(out.len(), codec::LEN_PREFIX + frame.encoded_len());
    let back = codec::decode::<PeerFrame>(&mut out, usize::MAX >> 1).expect("re-decodes").expect("whole");
    assert_eq!(&back, frame);
}
