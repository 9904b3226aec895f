//! Frame codec: `tern_protocol::codec::encode` and `decode` of the two frames
//! on the hot path, a client's `Send` and a broker's `Deliver`, for bodies of
//! 64 B, 1 KiB and 16 KiB; and decoding one read buffer that holds many small
//! `Send` frames back to back, as a session does after a large read.
//!
//! Throughput is whole frame bytes (length prefix included), or frames for
//! the many-frames case.

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use tern_protocol::pb::{self, client_frame, server_frame};
use tern_protocol::{codec, DEFAULT_MAX_FRAME_LEN};

const BODY_SIZES: [usize; 3] = [64, 1024, 16 * 1024];
/// Frames in the many-frames buffer.
const MANY: usize = 1024;

fn send_frame(body_len: usize) -> pb::ClientFrame {
    pb::ClientFrame {
        request_id: 42,
        kind: Some(client_frame::Kind::Send(pb::Send {
            message_id: Bytes::from_static(&[7; 16]),
            to: "bob".into(),
            body: Bytes::from(vec![0xa5; body_len]),
            no_receipt: false,
            ..Default::default()
        })),
    }
}

fn deliver_frame(body_len: usize) -> pb::ServerFrame {
    pb::ServerFrame {
        request_id: 0,
        kind: Some(server_frame::Kind::Deliver(pb::Deliver {
            seq: 123_456,
            item: Some(pb::deliver::Item::Message(pb::Message {
                message_id: Bytes::from_static(&[7; 16]),
                from: "alice".into(),
                from_device: 1,
                to: "bob".into(),
                sent_at_ms: 1_790_000_000_000,
                body: Bytes::from(vec![0xa5; body_len]),
                no_receipt: false,
            })),
        })),
    }
}

/// Encode into a reused buffer, and decode from a fresh copy of the frame.
fn bench_frame<M>(c: &mut Criterion, group_name: &str, make: fn(usize) -> M)
where
    M: prost::Message + Default + PartialEq + std::fmt::Debug,
{
    let mut group = c.benchmark_group(group_name);
    for size in BODY_SIZES {
        let frame = make(size);
        let encoded = codec::encode_to_vec(&frame, DEFAULT_MAX_FRAME_LEN).expect("frame fits");
        let decoded = codec::decode::<M>(&mut encoded.clone(), DEFAULT_MAX_FRAME_LEN).expect("decodes");
        assert_eq!(decoded.as_ref(), Some(&frame), "round trip");
        group.throughput(Throughput::Bytes(encoded.len() as u64));

        let mut buf = BytesMut::with_capacity(encoded.len());
        group.bench_function(BenchmarkId::new("encode", size), |b| {
            b.iter(|| {
                buf.clear();
                codec::encode(black_box(&frame), DEFAULT_MAX_FRAME_LEN, &mut buf).expect("frame fits");
                black_box(buf.len())
            })
        });
        group.bench_function(BenchmarkId::new("decode", size), |b| {
            b.iter_batched(
                || BytesMut::from(&encoded[..]),
                |mut src| codec::decode::<M>(&mut src, DEFAULT_MAX_FRAME_LEN).expect("decodes"),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

fn send(c: &mut Criterion) {
    bench_frame(c, "codec/client_send", send_frame);
}

fn deliver(c: &mut Criterion) {
    bench_frame(c, "codec/server_deliver", deliver_frame);
}

/// One buffer of `MANY` `Send` frames with 64-byte bodies, decoded to the end.
fn many_small(c: &mut Criterion) {
    let mut all = BytesMut::new();
    for n in 0..MANY {
        let mut frame = send_frame(64);
        frame.request_id = n as u64 + 1;
        codec::encode(&frame, DEFAULT_MAX_FRAME_LEN, &mut all).expect("frame fits");
    }
    let all = all.freeze();
    let mut group = c.benchmark_group("codec/many_small");
    group.throughput(Throughput::Elements(MANY as u64));
    group.bench_function(BenchmarkId::new("decode_send_64B", format!("{MANY}_frames_{}B", all.len())), |b| {
        b.iter_batched(
            || BytesMut::from(&all[..]),
            |mut src| {
                let mut frames = 0;
                while let Some(frame) = codec::decode::<pb::ClientFrame>(&mut src, DEFAULT_MAX_FRAME_LEN).expect("ok") {
                    black_box(frame);
                    frames += 1;
                }
                assert_eq!(frames, MANY);
                src
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = send, deliver, many_small
}
criterion_main!(benches);
