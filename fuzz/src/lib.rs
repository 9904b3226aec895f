//! What the fuzz targets share: an allocator that records the largest
//! allocation, a reader that feeds a byte stream in pseudo-random chunk sizes
//! the way a QUIC stream's `read_buf` does, and small helpers to take fields
//! off the fuzzer's input.
//!
//! Every target treats its input as a stream of bytes from an untrusted peer
//! (plus a few header bytes that steer the harness) and asserts what the
//! broker relies on: no panic, no unbounded loop, and no allocation past the
//! frame limit. See docs/fuzzing.md.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::BytesMut;
use tern_protocol::shipping::{admit, Admit};
use tern_protocol::{codec, DecodeError};

/// The system allocator, recording the largest single allocation and the
/// bytes allocated since the last [`AllocWatch::start`]. Each target that
/// checks allocations installs it with `#[global_allocator]`.
#[derive(Debug)]
pub struct TrackingAlloc;

static LARGEST: AtomicUsize = AtomicUsize::new(0);
static TOTAL: AtomicUsize = AtomicUsize::new(0);

fn record(size: usize) {
    LARGEST.fetch_max(size, Ordering::Relaxed);
    TOTAL.fetch_add(size, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; the counters are
// plain atomics and allocate nothing.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

/// What was allocated between [`AllocWatch::start`] and [`AllocWatch::stop`]
/// (single-threaded targets only: other threads' allocations count too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocWatch {
    /// The largest single allocation (or reallocation's new size), bytes.
    pub largest: usize,
    /// Bytes allocated in all.
    pub total: usize,
}

impl AllocWatch {
    /// Resets the counters.
    pub fn start() {
        LARGEST.store(0, Ordering::Relaxed);
        TOTAL.store(0, Ordering::Relaxed);
    }

    /// The counters since [`AllocWatch::start`].
    pub fn stop() -> Self {
        Self { largest: LARGEST.load(Ordering::Relaxed), total: TOTAL.load(Ordering::Relaxed) }
    }
}

/// Cuts a byte stream into chunks whose sizes come from a seed: some seeds
/// give one byte at a time, others up to a datagram, others 64 KiB, so a
/// frame arrives whole, split in its prefix, or spread over many reads.
#[derive(Debug)]
pub struct Chunks<'a> {
    rest: &'a [u8],
    state: u64,
    max_chunk: usize,
}

impl<'a> Chunks<'a> {
    /// Chunks of `stream`, their sizes drawn from `seed`.
    pub fn new(seed: u32, stream: &'a [u8]) -> Self {
        let max_chunk = match seed & 7 {
            0 => 1,
            1 => 3,
            2 => 17,
            3 => 512,
            4 => 1200,
            _ => 64 * 1024,
        };
        Self { rest: stream, state: u64::from(seed) | 1 << 40, max_chunk }
    }

    /// True when every byte was handed out.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The next chunk, at most `room` bytes (a read fills at most the spare
    /// capacity it is given), or `None` at the end.
    pub fn next(&mut self, room: usize) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        // xorshift64
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        let want = 1 + (self.state as usize) % self.max_chunk;
        let n = want.min(room).min(self.rest.len()).max(1);
        let (chunk, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(chunk)
    }
}

/// The client session's read-buffer rule (`reserve` in
/// broker/src/session/mod.rs, private there; keep the two alike): room for
/// the frame being received as its prefix announces, 512 B to 64 KiB at a
/// time; 1 KiB between frames.
pub fn session_reserve(buf: &mut BytesMut, max_frame: usize) {
    let want = match codec::peek_len(buf, max_frame) {
        Ok(Some(len)) => (len + codec::LEN_PREFIX).saturating_sub(buf.len()).clamp(512, 64 * 1024),
        _ => 1024,
    };
    if buf.capacity() - buf.len() < want {
        buf.reserve(want);
    }
}

/// One read into `buf`, as `RecvStream::read_buf` does: at most the spare
/// capacity, never growing the buffer itself. Returns false at the end of
/// the stream.
pub fn read_into(buf: &mut BytesMut, chunks: &mut Chunks<'_>) -> bool {
    let room = buf.capacity() - buf.len();
    match chunks.next(room.max(1)) {
        Some(chunk) => {
            buf.extend_from_slice(chunk);
            true
        }
        None => false,
    }
}

/// A frame [`decode_stream`] decoded: its length without the prefix, and
/// what decoding it allocated.
#[derive(Debug)]
pub struct Decoded<F> {
    pub frame: F,
    pub len: usize,
    pub alloc: AllocWatch,
}

/// Feeds `chunks` into a read buffer, made room in by `reserve` before each
/// read as the real reader does, and decodes frames of at most `max` bytes
/// with `decode`, handing each to `on_frame`, until the stream ends (`None`)
/// or a frame is refused (the error, and what refusing it allocated).
///
/// Checks what every frame decoder must hold: an incomplete frame is not
/// consumed and allocates nothing; a length over `max` is refused before
/// anything is allocated for it; a frame refused for too many entries is not
/// consumed, and counting them allocates nothing.
pub fn decode_stream<F>(
    chunks: &mut Chunks<'_>,
    max: usize,
    mut reserve: impl FnMut(&mut BytesMut),
    mut decode: impl FnMut(&mut BytesMut, usize) -> Result<Option<F>, DecodeError>,
    mut on_frame: impl FnMut(Decoded<F>),
) -> Option<(DecodeError, AllocWatch)> {
    let mut buf = BytesMut::new();
    loop {
        reserve(&mut buf);
        if !read_into(&mut buf, chunks) {
            return None;
        }
        loop {
            let before = buf.len();
            AllocWatch::start();
            let result = decode(&mut buf, max);
            let alloc = AllocWatch::stop();
            match result {
                Ok(Some(frame)) => {
                    let len = before - buf.len() - codec::LEN_PREFIX;
                    assert!(len <= max, "a frame of {len} bytes decoded under a limit of {max}");
                    on_frame(Decoded { frame, len, alloc });
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before, "an incomplete frame is not consumed");
                    assert_eq!(alloc.total, 0, "an incomplete frame allocates nothing");
                    break;
                }
                Err(DecodeError::TooLarge { len, max: m }) => {
                    assert!(len > max && m == max);
                    assert_eq!(alloc.total, 0, "a frame over the limit allocates nothing");
                    return Some((DecodeError::TooLarge { len, max: m }, alloc));
                }
                Err(e @ DecodeError::TooManyEntries { count, max, .. }) => {
                    assert!(count > max);
                    assert_eq!(buf.len(), before, "a refused frame is not consumed");
                    assert_eq!(alloc.total, 0, "counting the entries allocates nothing");
                    return Some((e, alloc));
                }
                Err(e @ DecodeError::Malformed(_)) => return Some((e, alloc)),
            }
        }
    }
}

/// Takes little-endian integers off the front of the fuzzer's input; zero
/// once it runs out.
#[derive(Debug)]
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    /// The next `n` bytes (fewer at the end).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// The next 4 bytes as a `u32`.
    pub fn u32(&mut self) -> u32 {
        let mut b = [0; 4];
        let got = self.bytes(4);
        b[..got.len()].copy_from_slice(got);
        u32::from_le_bytes(b)
    }

    /// The next 8 bytes as a `u64`.
    pub fn u64(&mut self) -> u64 {
        let mut b = [0; 8];
        let got = self.bytes(8);
        b[..got.len()].copy_from_slice(got);
        u64::from_le_bytes(b)
    }

    /// Everything left.
    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// `admit`'s contract (protocol/src/shipping.rs): it never acknowledges past
/// a seq that is neither in the shipment nor gone from the sender, and never
/// stores what is accounted for already.
pub fn check_admit(done: u64, base: u64, handed_up_to: u64, seqs: &[u64]) {
    let contiguous = seqs.windows(2).all(|w| w[0].checked_add(1) == Some(w[1]));
    let floor = done.max(base);
    match admit(done, base, handed_up_to, seqs) {
        Admit::Store { from, to } => {
            let (first, last) = (seqs[0], seqs[seqs.len() - 1]);
            assert!(contiguous);
            assert!(handed_up_to <= done, "stored past entries another broker holds");
            assert!(from > done && from <= to && to == last);
            assert!(first <= from, "seq {from} stored but not shipped");
            assert_eq!(from - 1, floor, "a gap between what is accounted for and what is stored");
        }
        Admit::Duplicate { done: d } => {
            assert!(d >= done);
            assert!(seqs.is_empty() || (contiguous && seqs[seqs.len() - 1] <= d));
            assert!(d == done || (d == base && handed_up_to <= done));
        }
        Admit::Gap { expected } => {
            assert!(contiguous && !seqs.is_empty());
            assert!(expected == floor + 1 && expected < seqs[0]);
        }
        Admit::Wait { up_to, expected } => {
            assert!(contiguous && !seqs.is_empty());
            assert!(up_to == handed_up_to && up_to > done && expected == done + 1);
        }
        Admit::Malformed => assert!(!contiguous),
    }
}
