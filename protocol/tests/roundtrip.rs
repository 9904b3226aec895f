//! Property tests: every frame kind, of the client protocol (`ClientFrame`,
//! `ServerFrame`) and of the broker-to-broker one (`PeerFrame`), survives
//! encode -> decode unchanged, its `encoded_len` is exact, and arbitrary bytes
//! never panic the decoder or make it allocate beyond the maximum.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use prost::Message as _;
use tern_protocol::pb::{self, client_frame, deliver, server_frame};
use tern_protocol::peer::{self, peer_frame, reply, request};
use tern_protocol::{codec, decode, encode, DecodeError};

const MAX: usize = 64 * 1024;

/// The broker's peer link frame limit (`MAX_PEER_FRAME` in
/// broker/src/mesh/link.rs, crate-private there).
const MAX_PEER_FRAME: usize = 8 << 20;

fn bytes_up_to(n: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..n).prop_map(Bytes::from)
}

fn text() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{0,64}"
}

fn approval() -> impl Strategy<Value = pb::DeviceApproval> {
    (any::<u32>(), any::<u64>(), bytes_up_to(64)).prop_map(|(d, e, s)| pb::DeviceApproval {
        approver_device_id: d,
        expires_at_ms: e,
        signature: s,
    })
}

fn identity_keys() -> impl Strategy<Value = pb::IdentityKeys> {
    (bytes_up_to(40), bytes_up_to(40), bytes_up_to(70)).prop_map(|(curve25519, ed25519, signature)| pb::IdentityKeys {
        curve25519,
        ed25519,
        signature,
    })
}

fn one_time_key() -> impl Strategy<Value = pb::OneTimeKey> {
    (any::<u64>(), bytes_up_to(40), bytes_up_to(70)).prop_map(|(key_id, public_key, signature)| pb::OneTimeKey {
        key_id,
        public_key,
        signature,
    })
}

fn key_stock() -> impl Strategy<Value = pb::KeyStock> {
    (any::<u32>(), any::<u32>(), any::<u32>(), any::<bool>(), any::<bool>()).prop_map(
        |(one_time_keys, max_one_time_keys, low_water, identity, fallback_key)| pb::KeyStock {
            one_time_keys,
            max_one_time_keys,
            low_water,
            identity,
            fallback_key,
        },
    )
}

fn envelope() -> impl Strategy<Value = pb::Envelope> {
    (text(), any::<u32>(), bytes_up_to(40), bytes_up_to(512))
        .prop_map(|(handle, device, identity_key, body)| pb::Envelope { handle, device, identity_key, body })
}

fn send() -> impl Strategy<Value = pb::Send> {
    (
        (bytes_up_to(20), text(), bytes_up_to(2048), any::<bool>()),
        (proptest::collection::vec(envelope(), 0..4), any::<u64>(), any::<u64>(), any::<u32>()),
    )
        .prop_map(
            |((message_id, to, body, no_receipt), (envelopes, to_devices_version, own_devices_version, to_device))| {
                pb::Send {
                    message_id,
                    to,
                    body,
                    no_receipt,
                    envelopes,
                    to_devices_version,
                    own_devices_version,
                    to_device,
                }
            },
        )
}

fn key_requests() -> impl Strategy<Value = client_frame::Kind> {
    prop_oneof![
        (
            proptest::option::of(identity_keys()),
            proptest::collection::vec(one_time_key(), 0..4),
            proptest::option::of(one_time_key())
        )
            .prop_map(|(identity, one_time_keys, fallback_key)| {
                client_frame::Kind::PublishKeys(pb::PublishKeys { identity, one_time_keys, fallback_key })
            }),
        (text(), proptest::collection::vec(any::<u32>(), 0..6))
            .prop_map(|(handle, devices)| client_frame::Kind::ClaimKeys(pb::ClaimKeys { handle, devices })),
        any::<u32>().prop_map(|device_id| client_frame::Kind::UnlinkDevice(pb::UnlinkDevice { device_id })),
    ]
}

fn client_kind() -> impl Strategy<Value = client_frame::Kind> {
    prop_oneof![
        (any::<u32>(), ".{0,40}")
            .prop_map(|(version, client_name)| client_frame::Kind::Hello(pb::Hello { version, client_name })),
        (text(), bytes_up_to(40), bytes_up_to(40), bytes_up_to(70), ".{0,20}").prop_map(
            |(handle, public_key, nonce, signature, registration_token)| {
                client_frame::Kind::Register(pb::Register { handle, public_key, nonce, signature, registration_token })
            }
        ),
        (text(), any::<u32>(), bytes_up_to(40), bytes_up_to(70)).prop_map(|(handle, device_id, nonce, signature)| {
            client_frame::Kind::Login(pb::Login { handle, device_id, nonce, signature })
        }),
        send().prop_map(client_frame::Kind::Send),
        any::<u64>().prop_map(|up_to_seq| client_frame::Kind::Ack(pb::Ack { up_to_seq })),
        any::<u64>().prop_map(|nonce| client_frame::Kind::Ping(pb::Ping { nonce })),
        (text(), bytes_up_to(40), bytes_up_to(40), bytes_up_to(70), proptest::option::of(approval())).prop_map(
            |(handle, public_key, nonce, signature, approval)| {
                client_frame::Kind::LinkDevice(pb::LinkDevice { handle, public_key, nonce, signature, approval })
            }
        ),
        text().prop_map(|handle| client_frame::Kind::ListDevices(pb::ListDevices { handle })),
        key_requests(),
    ]
}

fn mismatch() -> impl Strategy<Value = pb::DeviceMismatch> {
    (
        text(),
        any::<u64>(),
        proptest::collection::vec(any::<u32>(), 0..3),
        proptest::collection::vec(any::<u32>(), 0..3),
        proptest::collection::vec(any::<u32>(), 0..3),
    )
        .prop_map(|(handle, version, missing, extra, stale)| pb::DeviceMismatch {
            handle,
            version,
            missing,
            extra,
            stale,
        })
}

fn claimed() -> impl Strategy<Value = pb::ClaimedKeys> {
    (
        any::<u32>(),
        bytes_up_to(40),
        proptest::option::of(identity_keys()),
        proptest::option::of(one_time_key()),
        any::<bool>(),
    )
        .prop_map(|(device_id, device_key, identity, one_time_key, fallback)| pb::ClaimedKeys {
            device_id,
            device_key,
            identity,
            one_time_key,
            fallback,
        })
}

fn key_answers() -> impl Strategy<Value = server_frame::Kind> {
    prop_oneof![
        proptest::option::of(key_stock())
            .prop_map(|stock| server_frame::Kind::KeysPublished(pb::KeysPublished { stock })),
        (text(), proptest::collection::vec(claimed(), 0..3), proptest::collection::vec(any::<u32>(), 0..3)).prop_map(
            |(handle, devices, without_keys)| {
                server_frame::Kind::KeysClaimed(pb::KeysClaimed { handle, devices, without_keys })
            }
        ),
        key_stock().prop_map(server_frame::Kind::KeyStock),
    ]
}

fn message() -> impl Strategy<Value = pb::Message> {
    (bytes_up_to(20), text(), any::<u32>(), text(), any::<u64>(), bytes_up_to(2048), any::<bool>()).prop_map(
        |(message_id, from, from_device, to, sent_at_ms, body, no_receipt)| pb::Message {
            message_id,
            from,
            from_device,
            to,
            sent_at_ms,
            body,
            no_receipt,
        },
    )
}

fn server_kind() -> impl Strategy<Value = server_frame::Kind> {
    prop_oneof![
        (bytes_up_to(40), any::<u32>(), text(), any::<u32>(), any::<u32>()).prop_map(
            |(nonce, version, broker_id, max_frame_len, max_body_len)| {
                server_frame::Kind::Challenge(pb::Challenge { nonce, version, broker_id, max_frame_len, max_body_len })
            }
        ),
        (text(), any::<u32>(), any::<u64>(), any::<u64>(), proptest::option::of(key_stock())).prop_map(
            |(handle, device_id, acked_seq, pending, key_stock)| {
                server_frame::Kind::LoginOk(pb::LoginOk { handle, device_id, acked_seq, pending, key_stock })
            }
        ),
        (bytes_up_to(20), any::<bool>(), any::<u64>(), any::<u32>()).prop_map(
            |(message_id, duplicate, accepted_at_ms, recipients)| {
                server_frame::Kind::SendAck(pb::SendAck { message_id, duplicate, accepted_at_ms, recipients })
            }
        ),
        (any::<u64>(), message()).prop_map(|(seq, m)| server_frame::Kind::Deliver(pb::Deliver {
            seq,
            item: Some(deliver::Item::Message(m))
        })),
        (any::<u64>(), bytes_up_to(20), text(), any::<u32>(), any::<u64>(), 0i32..60).prop_map(
            |(seq, message_id, handle, device, delivered_at_ms, error)| {
                server_frame::Kind::Deliver(pb::Deliver {
                    seq,
                    item: Some(deliver::Item::Receipt(pb::Receipt {
                        message_id,
                        handle,
                        device,
                        delivered_at_ms,
                        error,
                    })),
                })
            }
        ),
        (0i32..60, ".{0,80}", any::<u32>(), proptest::collection::vec(mismatch(), 0..3)).prop_map(
            |(code, message, retry_after_ms, devices)| {
                server_frame::Kind::Error(pb::Error { code, message, retry_after_ms, devices })
            }
        ),
        any::<u64>().prop_map(|nonce| server_frame::Kind::Pong(pb::Pong { nonce })),
        (
            text(),
            proptest::collection::vec((any::<u32>(), bytes_up_to(40), any::<u64>(), bytes_up_to(40)), 0..4),
            any::<u64>()
        )
            .prop_map(|(handle, devices, version)| {
                server_frame::Kind::DeviceList(pb::DeviceList {
                    handle,
                    devices: devices
                        .into_iter()
                        .map(|(device_id, public_key, added_at_ms, identity_key)| pb::DeviceInfo {
                            device_id,
                            public_key,
                            added_at_ms,
                            identity_key,
                        })
                        .collect(),
                    version,
                })
            }),
        (proptest::collection::vec(".{0,30}", 0..3), ".{0,30}")
            .prop_map(|(brokers, reason)| server_frame::Kind::Redirect(pb::Redirect { brokers, reason })),
        key_answers(),
    ]
}

fn request_kind() -> impl Strategy<Value = request::Kind> {
    prop_oneof![
        (text(), any::<u32>()).prop_map(|(handle, device)| request::Kind::Lookup(peer::Lookup { handle, device })),
        text().prop_map(|handle| request::Kind::AccountGet(peer::AccountGet { handle })),
        (text(), bytes_up_to(40), any::<bool>()).prop_map(|(handle, public_key, add_device)| {
            request::Kind::AccountWrite(peer::AccountWrite { handle, public_key, add_device })
        }),
        bytes_up_to(512).prop_map(|account| request::Kind::AccountPut(peer::AccountPut { account })),
        (text(), any::<u32>())
            .prop_map(|(handle, device)| request::Kind::SenderFlush(peer::SenderFlush { handle, device })),
        (text(), any::<u32>(), bytes_up_to(512)).prop_map(|(handle, device, publish)| request::Kind::KeysPublish(
            peer::KeysPublish { handle, device, publish }
        )),
        (text(), proptest::collection::vec(any::<u32>(), 0..4), text(), any::<u32>()).prop_map(
            |(handle, devices, requester, requester_device)| {
                request::Kind::KeysClaim(peer::KeysClaim { handle, devices, requester, requester_device })
            }
        ),
        (text(), any::<u32>(), bytes_up_to(512))
            .prop_map(|(handle, device, record)| request::Kind::KeysPut(peer::KeysPut { handle, device, record })),
        (text(), any::<u32>(), any::<u32>())
            .prop_map(|(handle, device, by)| request::Kind::AccountUnlink(peer::AccountUnlink { handle, device, by })),
    ]
}

fn reply_kind() -> impl Strategy<Value = reply::Kind> {
    prop_oneof![
        (text(), any::<u64>()).prop_map(|(node, epoch)| reply::Kind::Lookup(peer::LookupReply { node, epoch })),
        (bytes_up_to(512), any::<u32>())
            .prop_map(|(account, device)| reply::Kind::Account(peer::AccountReply { account, device })),
        (any::<i32>(), ".{0,80}").prop_map(|(code, message)| reply::Kind::Failure(peer::Failure { code, message })),
        (any::<u32>(), any::<bool>(), any::<u64>()).prop_map(|(queues, complete, clock)| {
            reply::Kind::SenderFlushed(peer::SenderFlushed { queues, complete, clock })
        }),
        bytes_up_to(512).prop_map(|answer| reply::Kind::Keys(peer::KeysReply { answer })),
    ]
}

/// A `Ship` with every field set, the entries' seqs arbitrary (a decoder
/// does not check them; `shipping::admit` does).
fn ship() -> impl Strategy<Value = peer::Ship> {
    (
        (text(), any::<u32>(), bytes_up_to(17)),
        proptest::collection::vec((any::<u64>(), bytes_up_to(512)), 0..8),
        (any::<u64>(), text(), any::<u64>(), any::<bool>()),
    )
        .prop_map(|((handle, device, origin), entries, (base, handed_to, handed_up_to, hold))| peer::Ship {
            handle,
            device,
            origin,
            entries: entries.into_iter().map(|(seq, value)| peer::ShipEntry { seq, value }).collect(),
            base,
            handed_to,
            handed_up_to,
            hold,
        })
}

/// Every `PeerFrame` kind of proto/peer.proto.
fn peer_kind() -> impl Strategy<Value = peer_frame::Kind> {
    prop_oneof![
        (text(), ".{0,40}", any::<u64>()).prop_map(|(node, addr, incarnation)| {
            peer_frame::Kind::Hello(peer::PeerHello { node, addr, incarnation })
        }),
        bytes_up_to(1500).prop_map(|packet| peer_frame::Kind::Gossip(peer::Gossip { packet })),
        (any::<u64>(), proptest::option::of(request_kind()))
            .prop_map(|(id, kind)| peer_frame::Kind::Request(peer::Request { id, kind })),
        (any::<u64>(), proptest::option::of(reply_kind()))
            .prop_map(|(id, kind)| peer_frame::Kind::Reply(peer::Reply { id, kind })),
        ship().prop_map(peer_frame::Kind::Ship),
        (text(), any::<u32>(), any::<u64>())
            .prop_map(|(handle, device, up_to)| peer_frame::Kind::ShipAck(peer::ShipAck { handle, device, up_to })),
        (text(), any::<u32>(), text(), any::<u64>()).prop_map(|(handle, device, node, epoch)| {
            peer_frame::Kind::Location(peer::Location { handle, device, node, epoch })
        }),
        (text(), any::<u32>(), text(), any::<u64>(), text()).prop_map(|(handle, device, node, epoch, from_node)| {
            peer_frame::Kind::Moved(peer::Moved { handle, device, node, epoch, from_node })
        }),
        (text(), any::<u32>(), any::<u64>()).prop_map(|(handle, device, request_id)| {
            peer_frame::Kind::HandoffDone(peer::HandoffDone { handle, device, request_id })
        }),
        (text(), any::<u32>())
            .prop_map(|(handle, device)| peer_frame::Kind::ShipDefer(peer::ShipDefer { handle, device })),
        (text(), any::<u32>(), any::<u64>(), any::<i32>(), any::<u32>()).prop_map(
            |(handle, device, expected, code, retry_after_ms)| {
                peer_frame::Kind::ShipNack(peer::ShipNack { handle, device, expected, code, retry_after_ms })
            }
        ),
        (text(), any::<u32>(), any::<u64>()).prop_map(|(handle, device, request_id)| {
            peer_frame::Kind::HandoffRequest(peer::HandoffRequest { handle, device, request_id })
        }),
        (text(), any::<u32>(), bytes_up_to(256))
            .prop_map(|(handle, device, frame)| peer_frame::Kind::Notice(peer::Notice { handle, device, frame })),
    ]
}

fn round_trip<M: prost::Message + Default + PartialEq + std::fmt::Debug>(frame: &M) {
    round_trip_max(frame, MAX);
}

fn round_trip_max<M: prost::Message + Default + PartialEq + std::fmt::Debug>(frame: &M, max: usize) {
    let mut buf = BytesMut::new();
    encode(frame, max, &mut buf).expect("encode");
    assert_eq!(buf.len(), codec::LEN_PREFIX + frame.encoded_len(), "encoded_len is exact");
    let back: M = decode(&mut buf, max).expect("decode").expect("whole frame");
    assert_eq!(&back, frame);
    assert!(buf.is_empty());
}

proptest! {
    #[test]
    fn client_frames_round_trip(request_id in any::<u64>(), kind in proptest::option::of(client_kind())) {
        round_trip(&pb::ClientFrame { request_id, kind });
    }

    #[test]
    fn server_frames_round_trip(request_id in any::<u64>(), kind in proptest::option::of(server_kind())) {
        round_trip(&pb::ServerFrame { request_id, kind });
    }

    #[test]
    fn frames_split_anywhere_reassemble(kind in client_kind(), cut in any::<prop::sample::Index>()) {
        let frame = pb::ClientFrame { request_id: 9, kind: Some(kind) };
        let whole = codec::encode_to_vec(&frame, MAX).unwrap();
        let cut = cut.index(whole.len() + 1);
        let mut buf = BytesMut::from(&whole[..cut]);
        let first = decode::<pb::ClientFrame>(&mut buf, MAX).unwrap();
        if cut < whole.len() {
            prop_assert!(first.is_none());
            buf.extend_from_slice(&whole[cut..]);
            prop_assert_eq!(decode::<pb::ClientFrame>(&mut buf, MAX).unwrap(), Some(frame));
        } else {
            prop_assert_eq!(first, Some(frame));
        }
    }

    #[test]
    fn peer_frames_round_trip(kind in proptest::option::of(peer_kind())) {
        round_trip_max(&peer::PeerFrame { kind }, MAX_PEER_FRAME);
    }

    /// A `Ship` in pieces on the link stream: nothing before its last byte,
    /// then the same shipment, all fields kept.
    #[test]
    fn ships_split_anywhere_reassemble(ship in ship(), cut in any::<prop::sample::Index>()) {
        let frame = peer::PeerFrame { kind: Some(peer_frame::Kind::Ship(ship)) };
        let whole = codec::encode_to_vec(&frame, MAX_PEER_FRAME).unwrap();
        let cut = cut.index(whole.len());
        let mut buf = BytesMut::from(&whole[..cut]);
        prop_assert!(decode::<peer::PeerFrame>(&mut buf, MAX_PEER_FRAME).unwrap().is_none());
        buf.extend_from_slice(&whole[cut..]);
        prop_assert_eq!(decode::<peer::PeerFrame>(&mut buf, MAX_PEER_FRAME).unwrap(), Some(frame));
    }

    /// Arbitrary bytes on a peer link: frames, `None` or an error, never a
    /// panic.
    #[test]
    fn peer_garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut buf = BytesMut::from(&data[..]);
        while let Ok(Some(_)) = decode::<peer::PeerFrame>(&mut buf, MAX_PEER_FRAME) {}
        prop_assert!(buf.len() <= data.len());
    }

    /// Arbitrary bytes: the decoder returns frames, `None` or an error, never
    /// panics, and never holds more than the input.
    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut buf = BytesMut::from(&data[..]);
        for _ in 0..data.len() + 1 {
            match decode::<pb::ClientFrame>(&mut buf, 1024) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
        prop_assert!(buf.len() <= data.len());
    }

    /// A truncated frame body with a prefix that lies about its length is
    /// either incomplete or malformed, never a panic.
    #[test]
    fn truncated_frames(kind in server_kind(), drop in 1usize..64) {
        let frame = pb::ServerFrame { request_id: 1, kind: Some(kind) };
        let body = frame.encode_to_vec();
        let keep = body.len().saturating_sub(drop);
        let mut buf = BytesMut::new();
        buf.put_u32(keep as u32);
        buf.put_slice(&body[..keep]);
        let _ = decode::<pb::ServerFrame>(&mut buf, MAX);
    }
}

#[test]
fn oversized_prefix_rejected_without_allocation() {
    let mut buf = BytesMut::with_capacity(8);
    buf.put_u32(u32::MAX);
    let cap = buf.capacity();
    match decode::<pb::ClientFrame>(&mut buf, MAX) {
        Err(DecodeError::TooLarge { len, max }) => {
            assert_eq!(len, u32::MAX as usize);
            assert_eq!(max, MAX);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_eq!(buf.capacity(), cap);
}

#[test]
fn unknown_fields_are_skipped() {
    // A frame from a newer client with a field this version does not know
    // (field 99, varint) still decodes: forward compatibility.
    let mut body =
        pb::ClientFrame { request_id: 5, kind: Some(client_frame::Kind::Ping(pb::Ping { nonce: 1 })) }.encode_to_vec();
    body.extend_from_slice(&[0x98, 0x06, 0x01]);
    let mut buf = BytesMut::new();
    buf.put_u32(body.len() as u32);
    buf.put_slice(&body);
    let frame: pb::ClientFrame = decode(&mut buf, MAX).unwrap().unwrap();
    assert_eq!(frame.request_id, 5);
}

#[test]
fn ship_from_an_older_sender_with_the_reserved_restart_field_decodes() {
    // Field 5 of `Ship` (`restart`, a bool) is reserved: a shipment that
    // still carries it decodes, the field ignored.
    let ship = peer::Ship {
        handle: "bob".into(),
        device: 1,
        origin: vec![7; 16].into(),
        entries: vec![peer::ShipEntry { seq: 3, value: vec![1, 2, 3].into() }],
        base: 2,
        handed_to: "n3".into(),
        handed_up_to: 2,
        hold: false,
    };
    let mut body = ship.encode_to_vec();
    body.extend_from_slice(&[0x28, 0x01]);
    assert_eq!(peer::Ship::decode(&body[..]).unwrap(), ship);
}

#[test]
fn oversized_peer_prefix_rejected_without_allocation() {
    let mut buf = BytesMut::with_capacity(8);
    buf.put_u32((MAX_PEER_FRAME + 1) as u32);
    let cap = buf.capacity();
    assert!(matches!(
        decode::<peer::PeerFrame>(&mut buf, MAX_PEER_FRAME),
        Err(DecodeError::TooLarge { len, max: MAX_PEER_FRAME }) if len == MAX_PEER_FRAME + 1
    ));
    assert_eq!(buf.capacity(), cap);
}

fn ship_frame(entries: usize) -> peer::PeerFrame {
    peer::PeerFrame {
        kind: Some(peer_frame::Kind::Ship(peer::Ship {
            handle: "bob".into(),
            device: 1,
            entries: (1..=entries as u64).map(|seq| peer::ShipEntry { seq, value: Bytes::new() }).collect(),
            ..Default::default()
        })),
    }
}

/// The fuzzing finding of docs/fuzzing.md: empty entries cost 20 times
/// their wire size in one allocation, so a `Ship` of more than
/// `MAX_SHIP_ENTRIES` is refused before it is decoded, and nothing of it
/// is consumed.
#[test]
fn a_ship_of_too_many_entries_is_refused_before_decoding() {
    let mut buf = codec::encode_to_vec(&ship_frame(tern_protocol::MAX_SHIP_ENTRIES + 1), MAX_PEER_FRAME).unwrap();
    let len = buf.len();
    assert!(matches!(
        codec::decode_peer_frame(&mut buf, MAX_PEER_FRAME),
        Err(DecodeError::TooManyEntries { field: "Ship.entries", count, max }) if count == max + 1
    ));
    assert_eq!(buf.len(), len);

    let full = ship_frame(tern_protocol::MAX_SHIP_ENTRIES);
    let mut buf = codec::encode_to_vec(&full, MAX_PEER_FRAME).unwrap();
    assert_eq!(codec::decode_peer_frame(&mut buf, MAX_PEER_FRAME).unwrap(), Some(full));
}

/// protobuf merges a message field that occurs twice, so the entries of
/// two `ship` fields in one frame count together.
#[test]
fn entries_are_counted_across_repeated_occurrences_of_the_ship_field() {
    let half = tern_protocol::MAX_SHIP_ENTRIES / 2 + 1;
    let mut body = ship_frame(half).encode_to_vec();
    body.extend_from_slice(&ship_frame(half).encode_to_vec());
    assert_eq!(codec::count_field(&body, &[5, 4]).unwrap(), 2 * half);
    let mut buf = BytesMut::new();
    buf.put_u32(body.len() as u32);
    buf.extend_from_slice(&body);
    assert!(matches!(codec::decode_peer_frame(&mut buf, MAX_PEER_FRAME), Err(DecodeError::TooManyEntries { .. })));
}

/// The client side of the same finding: a hostile broker's `DeviceList` of
/// empty devices or `Redirect` of empty addresses cost a client 24 and 12
/// times their wire size; more than the bound are refused before decoding.
#[test]
fn a_server_frame_listing_too_many_devices_or_brokers_is_refused_before_decoding() {
    let max = tern_protocol::DEFAULT_MAX_FRAME_LEN;
    let devices = |n: usize| pb::ServerFrame {
        request_id: 1,
        kind: Some(pb::server_frame::Kind::DeviceList(pb::DeviceList {
            handle: "bob".into(),
            devices: vec![pb::DeviceInfo::default(); n],
            version: 0,
        })),
    };
    let redirect = |n: usize| pb::ServerFrame {
        request_id: 0,
        kind: Some(pb::server_frame::Kind::Redirect(pb::Redirect {
            brokers: vec![String::new(); n],
            reason: "drain".into(),
        })),
    };
    for (frame, field) in [
        (devices(tern_protocol::MAX_LISTED_DEVICES + 1), "DeviceList.devices"),
        (redirect(tern_protocol::MAX_REDIRECT_BROKERS + 1), "Redirect.brokers"),
    ] {
        let mut buf = codec::encode_to_vec(&frame, max).unwrap();
        let len = buf.len();
        let refused = codec::decode_server_frame(&mut buf, max);
        assert!(matches!(refused, Err(DecodeError::TooManyEntries { field: f, .. }) if f == field), "{refused:?}");
        assert_eq!(buf.len(), len, "nothing consumed");
    }
    for frame in [devices(tern_protocol::MAX_LISTED_DEVICES), redirect(tern_protocol::MAX_REDIRECT_BROKERS)] {
        let mut buf = codec::encode_to_vec(&frame, max).unwrap();
        assert_eq!(codec::decode_server_frame(&mut buf, max).unwrap(), Some(frame));
    }
}

proptest! {
    /// The pre-scan agrees with prost on every frame prost decodes.
    #[test]
    fn the_entry_count_matches_what_prost_decodes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(frame) = peer::PeerFrame::decode(&body[..]) {
            let decoded = match frame.kind {
                Some(peer_frame::Kind::Ship(ship)) => ship.entries.len(),
                _ => 0,
            };
            let counted = codec::count_field(&body, &[5, 4]).unwrap();
            // A later oneof field of another kind replaces the ship, so
            // the pre-scan may count more, never fewer.
            prop_assert!(counted >= decoded, "counted {} decoded {}", counted, decoded);
        }
    }
}

/// A `Send` of empty envelopes or a `PublishKeys` of empty keys cost the
/// broker about 50 and 36 times their wire size; more than the bound are
/// refused before decoding.
#[test]
fn a_client_frame_with_too_many_envelopes_or_keys_is_refused_before_decoding() {
    let max = tern_protocol::DEFAULT_MAX_FRAME_LEN;
    let send = |n: usize| pb::ClientFrame {
        request_id: 1,
        kind: Some(client_frame::Kind::Send(pb::Send {
            envelopes: vec![pb::Envelope::default(); n],
            ..Default::default()
        })),
    };
    let publish = |n: usize| pb::ClientFrame {
        request_id: 2,
        kind: Some(client_frame::Kind::PublishKeys(pb::PublishKeys {
            one_time_keys: vec![pb::OneTimeKey::default(); n],
            ..Default::default()
        })),
    };
    let limits = [(send(tern_protocol::MAX_ENVELOPES), send(tern_protocol::MAX_ENVELOPES + 1))];
    let keys = [(publish(tern_protocol::MAX_PUBLISHED_KEYS), publish(tern_protocol::MAX_PUBLISHED_KEYS + 1))];
    for (ok, over) in limits.into_iter().chain(keys) {
        let mut buf = BytesMut::from(&codec::encode_to_vec(&ok, max).unwrap()[..]);
        assert_eq!(codec::decode_client_frame(&mut buf, max).unwrap(), Some(ok));
        let mut buf = BytesMut::from(&codec::encode_to_vec(&over, max).unwrap()[..]);
        assert!(matches!(codec::decode_client_frame(&mut buf, max), Err(DecodeError::TooManyEntries { .. })));
    }
}
