//! The peer frame decoder (`PeerFrame`, broker-to-broker) over an arbitrary
//! byte stream, fed in random chunk sizes through the peer link's
//! read-buffer rule, with the broker's `MAX_PEER_FRAME` (8 MiB) or a smaller
//! limit from the input; every decoded `Ship` goes through
//! `tern_protocol::shipping::admit` as the receiving store would call it.
//!
//! Asserts: no panic; an incomplete frame consumes and allocates nothing; a
//! length over the limit is refused before anything is allocated for it;
//! decoding allocates at most the frame's size plus what `MAX_SHIP_ENTRIES`
//! entries cost in memory, and a `Ship` of more is refused before any
//! allocation (docs/fuzzing.md, "Findings"); every
//! decoded frame re-encodes, exactly `encoded_len` long, and decodes back
//! equal; `admit` answers within its contract.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tern_fuzz::{check_admit, decode_stream, Chunks, Decoded, Input, TrackingAlloc};
use tern_protocol::peer::{peer_frame, PeerFrame};
use tern_protocol::{codec, MAX_SHIP_ENTRIES};

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

/// The broker's peer frame limit (`MAX_PEER_FRAME` in
/// broker/src/mesh/link.rs, crate-private there).
const MAX_PEER_FRAME: usize = 8 << 20;

/// What the entries of one `Ship` may cost decoded beyond the frame's
/// bytes: a `ShipEntry` is 40 bytes in memory (2 on the wire when empty),
/// at most `MAX_SHIP_ENTRIES` of them, in a `Vec` grown by doubling
/// (reallocations counted too).
const ENTRIES_MEMORY: usize = 2 * 40 * MAX_SHIP_ENTRIES;

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
    // The peer link's rule (`reserve` in broker/src/mesh/link.rs).
    let reserve = |buf: &mut BytesMut| {
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
    };
    let on_frame = |d: Decoded<PeerFrame>| {
        assert!(d.alloc.total <= d.len + ENTRIES_MEMORY + SLACK, "{:?} for {}", d.alloc, d.len);
        let largest = (max + codec::LEN_PREFIX).max(SLACK).max(ENTRIES_MEMORY / 2);
        assert!(d.alloc.largest <= largest, "{:?} for a frame of {}, limit {max}", d.alloc, d.len);
        check_reencodes(&d.frame);
        if let Some(peer_frame::Kind::Ship(ship)) = &d.frame.kind {
            let seqs: Vec<u64> = ship.entries.iter().map(|e| e.seq).collect();
            check_admit(done, ship.base, ship.handed_up_to, &seqs);
        }
    };
    decode_stream(&mut chunks, max, reserve, codec::decode_peer_frame, on_frame);
});

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
