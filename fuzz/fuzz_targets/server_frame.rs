//! The server frame decoder a client reads the broker with
//! (`codec::decode_server_frame`, as `tern-client` calls it) over an
//! arbitrary byte stream in random chunk sizes, with a frame limit from the
//! input (the default, or any small one): what a hostile or broken broker
//! can make a client do.
//!
//! Asserts: no panic; an incomplete frame consumes and allocates nothing; a
//! length over the limit is refused before anything is allocated for it; a
//! frame's decoding allocates at most its own size plus what the bounded
//! lists (`MAX_LISTED_DEVICES` devices, `MAX_REDIRECT_BROKERS` addresses)
//! cost in memory, and a frame listing more is refused before any
//! allocation; every decoded frame re-encodes, exactly `encoded_len` long,
//! and decodes back equal.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tern_fuzz::{decode_stream, Chunks, Decoded, Input, TrackingAlloc};
use tern_protocol::{codec, pb, MAX_LISTED_DEVICES, MAX_REDIRECT_BROKERS};

#[global_allocator]
static ALLOC: TrackingAlloc = TrackingAlloc;

/// What the lists of one frame may cost decoded beyond its bytes: a
/// `DeviceInfo` is 48 bytes in memory, a `String` 24, in `Vec`s grown by
/// doubling (reallocations counted too).
const LISTS_MEMORY: usize = 2 * 48 * MAX_LISTED_DEVICES + 2 * 24 * MAX_REDIRECT_BROKERS;

const SLACK: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let max = match input.u8() & 3 {
        0 => tern_protocol::DEFAULT_MAX_FRAME_LEN,
        1 => 64 * 1024,
        2 => 4096,
        _ => usize::from(input.u8()) * 16,
    };
    let seed = input.u32();
    let mut chunks = Chunks::new(seed, input.rest());
    // The client's rule (`read_frames` in client/src/conn.rs).
    let reserve = |buf: &mut BytesMut| {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
    };
    let on_frame = |d: Decoded<pb::ServerFrame>| {
        assert!(d.alloc.total <= d.len + LISTS_MEMORY + SLACK, "{:?} for {}", d.alloc, d.len);
        let largest = (max + codec::LEN_PREFIX).max(SLACK).max(LISTS_MEMORY / 2);
        assert!(d.alloc.largest <= largest, "{:?} for a frame of {}, limit {max}", d.alloc, d.len);
        check_reencodes(&d.frame);
    };
    decode_stream(&mut chunks, max, reserve, codec::decode_server_frame, on_frame);
});

/// A decoded frame survives a round trip (re-encoded no longer than it came).
fn check_reencodes(frame: &pb::ServerFrame) {
    let len = frame.encoded_len();
    let mut out = codec::encode_to_vec(frame, usize::MAX >> 1).expect("a decoded frame re-encodes");
    assert_eq!(out.len(), codec::LEN_PREFIX + len);
    let back = codec::decode_server_frame(&mut out, usize::MAX >> 1).expect("re-decodes").expect("whole");
    assert_eq!(&back, frame);
}
