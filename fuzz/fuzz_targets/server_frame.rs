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
use tern_fuzz::{read_into, AllocWatch, Chunks, Input, TrackingAlloc};
use tern_protocol::{codec, pb, DecodeError, MAX_LISTED_DEVICES, MAX_REDIRECT_BROKERS};

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
    let mut buf = BytesMut::new();
    loop {
        // The client's rule (`read_frames` in client/src/conn.rs).
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        if !read_into(&mut buf, &mut chunks) {
            return;
        }
        loop {
            let before = buf.len();
            AllocWatch::start();
            let result = codec::decode_server_frame(&mut buf, max);
            let alloc = AllocWatch::stop();
            match result {
                Ok(Some(frame)) => {
                    let frame_len = before - buf.len() - codec::LEN_PREFIX;
                    assert!(frame_len <= max);
                    assert!(alloc.total <= frame_len + LISTS_MEMORY + SLACK, "{alloc:?} for {frame_len}");
                    let largest = (max + codec::LEN_PREFIX).max(SLACK).max(LISTS_MEMORY / 2);
                    assert!(alloc.largest <= largest, "{alloc:?} for a frame of {frame_len}, limit {max}");
                    check_reencodes(&frame);
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
                Err(DecodeError::TooManyEntries { count, max, .. }) => {
                    assert!(count > max);
                    assert_eq!(buf.len(), before, "a refused frame is not consumed");
                    assert_eq!(alloc.total, 0, "the count allocates nothing");
                    return;
                }
                Err(DecodeError::Malformed(_)) => return,
            }
        }
    }
});

/// A decoded frame survives a round trip (re-encoded no longer than it came).
fn check_reencodes(frame: &pb::ServerFrame) {
    let len = frame.encoded_len();
    let mut out = codec::encode_to_vec(frame, usize::MAX >> 1).expect("a decoded frame re-encodes");
    assert_eq!(out.len(), codec::LEN_PREFIX + len);
    let back = codec::decode_server_frame(&mut out, usize::MAX >> 1).expect("re-decodes").expect("whole");
    assert_eq!(&back, frame);
}
