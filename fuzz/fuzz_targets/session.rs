//! A client's byte stream before and after login, without a socket.
//!
//! The broker's session (`broker/src/session/`) is crate-private and reads
//! from a `quinn::RecvStream`, so it cannot be driven from here. This target
//! replays what it does with the public pieces it is made of: the stream is
//! fed in random chunk sizes through the session's read-buffer rule into
//! `codec::decode_client_frame` (the pre-login frame limit until a login,
//! then the full one, as `Session::max_frame_len`), each frame is gated and
//! validated as `Session::handle` does (`Hello` version, challenge nonce,
//! `validate_handle`, key and signature shape, Ed25519 `verify_strict` over
//! `tern_protocol::auth` transcripts, `MessageId`, body limit), and the
//! requests go to a real `tern_broker::Store` on a temporary RocksDB:
//! register, link device, login, send, ack, list devices, and the pushes a
//! logged-in session reads from its queue (`StoredItem::decode`, `Deliver`).
//!
//! Signatures cannot be guessed, so the harness signs for the fuzzer: an
//! empty `nonce` is replaced by the open challenge's, a one-byte
//! `public_key` by the public key of one of four fixed device keys, and a
//! one-byte `signature` (or approval signature) by a valid signature of that
//! key over the right transcript. Anything else goes through unchanged.
//!
//! Asserts: no panic; the store never reports corruption or a database error
//! for anything a client sends; a resent message id is a duplicate with the
//! first acceptance time; pushed entries decode, come in seq order and fit
//! the frame limit; acks never move the queue head past what was pushed;
//! account records keep their device ids unique.
#![no_main]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tern_broker::config::LimitsConfig;
use tern_broker::store::{QueueKey, QueueListener, StoredItem};
use tern_broker::{Durability, Store, StoreConfig, StoreError};
use tern_fuzz::{read_into, session_reserve, Chunks, Input};
use tern_protocol::auth::{self, Purpose};
use tern_protocol::pb::{self, client_frame::Kind as C};
use tern_protocol::{codec, MessageId};

/// A fresh store every this many inputs, so the database stays small.
const INPUTS_PER_STORE: u64 = 20_000;

struct NoListener;

impl QueueListener for NoListener {
    fn queued(&self, _: &QueueKey, _: u64, _: &Bytes) {}
}

struct Harness {
    rt: tokio::runtime::Runtime,
    store: Store,
    inputs: u64,
    /// The input count the store was opened at: its directory's name.
    generation: u64,
    keys: Vec<SigningKey>,
    limits: LimitsConfig,
}

/// This process's store directory. libFuzzer exits without dropping
/// statics, so each start first removes the directories of processes that
/// are gone.
fn store_dir() -> PathBuf {
    let tmp = std::env::temp_dir();
    for entry in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("tern-fuzz-session-")) else { continue };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    tmp.join(format!("tern-fuzz-session-{}", std::process::id()))
}

fn open_store(generation: u64) -> Store {
    let config = StoreConfig {
        path: store_dir().join(generation.to_string()),
        durability: Durability::Written,
        retention: Duration::from_secs(86_400),
        max_queue_len: 64,
        max_entry_len: tern_broker::store::max_entry_len(tern_protocol::DEFAULT_MAX_FRAME_LEN),
        max_batch: 64,
        max_devices: 4,
        account_cache_entries: 1024,
        memory_mb: 8,
        keys: Default::default(),
    };
    Store::open(config, std::sync::Arc::new(NoListener)).expect("store opens")
}

static HARNESS: Mutex<Option<Harness>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = HARNESS.lock().unwrap_or_else(|e| e.into_inner());
    let h = guard.get_or_insert_with(|| Harness {
        rt: tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime"),
        store: open_store(0),
        inputs: 0,
        generation: 0,
        keys: (1..=4u8).map(|i| SigningKey::from_bytes(&[i; 32])).collect(),
        limits: LimitsConfig::default(),
    });
    h.inputs += 1;
    if h.inputs.is_multiple_of(INPUTS_PER_STORE) {
        h.store.close();
        let old = std::mem::replace(&mut h.generation, h.inputs);
        h.store = open_store(h.generation);
        let _ = std::fs::remove_dir_all(store_dir().join(old.to_string()));
    }
    let mut input = Input(data);
    let seed = input.u32();
    let mut session = Session { h, challenge: None, failed_logins: 0, device: None, sent: HashMap::new(), nonces: 0 };
    let rt = &session.h.rt;
    rt.block_on(session.run(seed, input.rest()));
});

struct Device {
    queue: QueueKey,
    last_pushed: u64,
    head: u64,
}

struct Session<'a> {
    h: &'a Harness,
    challenge: Option<([u8; 32], [u8; 32])>,
    failed_logins: u32,
    device: Option<Device>,
    /// Message ids accepted in this input: id -> first acceptance time.
    sent: HashMap<(QueueKey, [u8; 16]), u64>,
    nonces: u64,
}

/// The session goes on, or closes the connection.
enum Flow {
    Go,
    End,
}

/// What the session answers a request with (the frame is encoded, as the
/// session would send it, but only errors matter here).
type Answer = Result<(), pb::ErrorCode>;

impl Session<'_> {
    async fn run(&mut self, seed: u32, stream: &[u8]) {
        let mut chunks = Chunks::new(seed, stream);
        let mut buf = BytesMut::new();
        loop {
            session_reserve(&mut buf, self.max_frame_len());
            if !read_into(&mut buf, &mut chunks) {
                return;
            }
            loop {
                let frame = match codec::decode_client_frame(&mut buf, self.max_frame_len()) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    // FRAME_TOO_LARGE or MALFORMED_FRAME: the connection closes.
                    Err(_) => return,
                };
                if let Flow::End = self.handle(frame).await {
                    return;
                }
                self.push().await;
            }
        }
    }

    fn max_frame_len(&self) -> usize {
        if self.device.is_some() {
            self.h.limits.max_frame_len
        } else {
            self.h.limits.max_frame_len_before_login
        }
    }

    async fn handle(&mut self, frame: pb::ClientFrame) -> Flow {
        let logged_in = self.device.is_some();
        let Some(kind) = frame.kind else { return Flow::End };
        match kind {
            C::Hello(_) | C::Register(_) | C::Login(_) | C::LinkDevice(_) if logged_in => Flow::End,
            C::Hello(hello) => {
                if hello.version != tern_protocol::PROTOCOL_VERSION {
                    return Flow::End;
                }
                self.nonces += 1;
                let mut nonce = [0u8; 32];
                nonce[..8].copy_from_slice(&self.nonces.to_le_bytes());
                self.challenge = Some((nonce, [0x5a; 32]));
                Flow::Go
            }
            C::Register(mut req) => {
                let result = self.register(&mut req).await;
                self.logged_in(result).await
            }
            C::Login(mut req) => {
                let result = self.login(&mut req).await;
                self.logged_in(result).await
            }
            C::LinkDevice(mut req) => {
                let result = self.link_device(&mut req).await;
                self.logged_in(result).await
            }
            _ if !logged_in => Flow::Go,
            C::Send(req) => {
                let _ = self.send(req).await;
                Flow::Go
            }
            C::Ack(ack) => {
                self.ack(ack.up_to_seq).await;
                Flow::Go
            }
            C::Ping(_) => Flow::Go,
            C::ListDevices(req) => {
                if let Ok(Some(account)) = self.h.store.account(&req.handle) {
                    let mut ids: Vec<u32> = account.devices.iter().map(|d| d.id).collect();
                    ids.dedup();
                    assert_eq!(ids.len(), account.devices.len(), "device ids are unique");
                    assert!(ids.iter().all(|id| *id < account.next_device_id));
                }
                Flow::Go
            }
            // Keys, unlinking, profiles, presence and push are the broker's
            // session and mesh logic, beyond the store this harness drives
            // (covered by broker/tests/{keys,devices,profiles,presence,push}.rs).
            _ => Flow::Go,
        }
    }

    /// The open challenge, its nonce put in where the fuzzer left it empty.
    fn challenge(&mut self, nonce: &mut Bytes) -> Result<([u8; 32], [u8; 32]), pb::ErrorCode> {
        // Taken: a challenge is good for one login attempt.
        let (c_nonce, exporter) = self.challenge.take().ok_or(pb::ErrorCode::InvalidChallenge)?;
        if nonce.is_empty() {
            *nonce = Bytes::copy_from_slice(&c_nonce);
        }
        if nonce[..] != c_nonce[..] {
            return Err(pb::ErrorCode::InvalidChallenge);
        }
        Ok((c_nonce, exporter))
    }

    fn key(&self, pick: &[u8]) -> SigningKey {
        self.h.keys[usize::from(pick.first().copied().unwrap_or(0)) % self.h.keys.len()].clone()
    }

    /// A one-byte public key stands for one of the fixed keys.
    fn public_key(&self, field: &mut Bytes) -> Result<[u8; 32], pb::ErrorCode> {
        if field.len() == 1 {
            *field = Bytes::copy_from_slice(self.key(field).verifying_key().as_bytes());
        }
        field[..].try_into().map_err(|_| pb::ErrorCode::InvalidArgument)
    }

    /// A one-byte signature stands for one by the fixed key it names.
    fn sign(&self, field: &mut Bytes, message: &[u8]) {
        if field.len() == 1 {
            *field = Bytes::copy_from_slice(&self.key(field).sign(message).to_bytes());
        }
    }

    async fn register(&mut self, req: &mut pb::Register) -> Result<(String, u32), pb::ErrorCode> {
        let (nonce, exporter) = self.challenge(&mut req.nonce)?;
        tern_protocol::validate_handle(&req.handle).map_err(|_| pb::ErrorCode::InvalidHandle)?;
        let key = self.public_key(&mut req.public_key)?;
        let transcript = auth::transcript(Purpose::Register, &exporter, &nonce, &req.handle, 0, &key);
        self.sign(&mut req.signature, &transcript);
        verify(&key, &transcript, &req.signature)?;
        let account = self.h.store.register(&req.handle, key).await.map_err(store_code)?;
        assert_eq!(account.handle, req.handle);
        Ok((account.handle, 1))
    }

    async fn login(&mut self, req: &mut pb::Login) -> Result<(String, u32), pb::ErrorCode> {
        let (nonce, exporter) = self.challenge(&mut req.nonce)?;
        tern_protocol::validate_handle(&req.handle).map_err(|_| pb::ErrorCode::InvalidHandle)?;
        let transcript = auth::transcript(Purpose::Login, &exporter, &nonce, &req.handle, req.device_id, &[0; 32]);
        self.sign(&mut req.signature, &transcript);
        Signature::from_slice(&req.signature).map_err(|_| pb::ErrorCode::BadSignature)?;
        let account = self.h.store.account(&req.handle).map_err(store_code)?.ok_or(pb::ErrorCode::UnknownDevice)?;
        let device = account.device(req.device_id).ok_or(pb::ErrorCode::UnknownDevice)?;
        verify(&device.public_key, &transcript, &req.signature)?;
        Ok((account.handle.clone(), device.id))
    }

    async fn link_device(&mut self, req: &mut pb::LinkDevice) -> Result<(String, u32), pb::ErrorCode> {
        let (nonce, exporter) = self.challenge(&mut req.nonce)?;
        tern_protocol::validate_handle(&req.handle).map_err(|_| pb::ErrorCode::InvalidHandle)?;
        let key = self.public_key(&mut req.public_key)?;
        let transcript = auth::transcript(Purpose::LinkDevice, &exporter, &nonce, &req.handle, 0, &key);
        self.sign(&mut req.signature, &transcript);
        verify(&key, &transcript, &req.signature)?;
        let approval = req.approval.as_mut().ok_or(pb::ErrorCode::BadApproval)?;
        if approval.expires_at_ms < tern_broker::store::now_ms() {
            return Err(pb::ErrorCode::BadApproval);
        }
        let account = self.h.store.account(&req.handle).map_err(store_code)?.ok_or(pb::ErrorCode::UnknownDevice)?;
        let approver = account.device(approval.approver_device_id).ok_or(pb::ErrorCode::BadApproval)?;
        let signed = auth::approval(&req.handle, &key, approval.expires_at_ms);
        let mut signature = std::mem::take(&mut approval.signature);
        self.sign(&mut signature, &signed);
        verify(&approver.public_key, &signed, &signature).map_err(|_| pb::ErrorCode::BadApproval)?;
        if account.devices.iter().any(|d| d.public_key == key) {
            return Err(pb::ErrorCode::InvalidArgument);
        }
        let device = self.h.store.add_device(&req.handle, key).await.map_err(store_code)?;
        assert!(device > 1 && account.device(device).is_none(), "a new device gets a new number");
        Ok((req.handle.clone(), device))
    }

    async fn logged_in(&mut self, result: Result<(String, u32), pb::ErrorCode>) -> Flow {
        let (handle, device) = match result {
            Ok(ok) => ok,
            Err(_) => {
                self.failed_logins += 1;
                return if self.failed_logins >= self.h.limits.max_login_attempts { Flow::End } else { Flow::Go };
            }
        };
        let queue = QueueKey::new(&handle, device);
        let bounds = match self.h.store.bounds(queue.clone()).await {
            Ok(b) => b,
            Err(e) => {
                store_code(e);
                return Flow::End;
            }
        };
        assert!(bounds.head <= bounds.tail);
        self.device = Some(Device { queue, last_pushed: bounds.head, head: bounds.head });
        Flow::Go
    }

    async fn send(&mut self, req: pb::Send) -> Answer {
        let Some(d) = &self.device else { return Ok(()) };
        let id = MessageId::from_slice(&req.message_id).map_err(|_| pb::ErrorCode::InvalidArgument)?;
        tern_protocol::validate_handle(&req.to).map_err(|_| pb::ErrorCode::InvalidHandle)?;
        if req.body.len() > self.h.limits.max_body_len {
            return Err(pb::ErrorCode::PayloadTooLarge);
        }
        let sender = d.queue.clone();
        let done = self.h.store.enqueue(sender.clone(), id.0, req.to, req.body).await.map_err(store_code)?;
        match self.sent.get(&(sender.clone(), id.0)) {
            Some(first) => {
                assert!(done.duplicate, "a resent message id is stored once");
                assert_eq!(done.accepted_at_ms, *first, "a duplicate answers with the first acceptance time");
            }
            None => {
                self.sent.insert((sender, id.0), done.accepted_at_ms);
            }
        }
        Ok(())
    }

    async fn ack(&mut self, up_to: u64) {
        let Some(d) = &mut self.device else { return };
        // Never beyond what this session pushed (`Session::ack`).
        let up_to = up_to.min(d.last_pushed);
        if up_to <= d.head {
            return;
        }
        match self.h.store.ack(d.queue.clone(), up_to).await {
            Ok(bounds) => {
                assert!(bounds.head >= up_to, "acked to {up_to}, head at {}", bounds.head);
                assert!(bounds.head <= bounds.tail);
                d.head = bounds.head;
            }
            Err(e) => {
                store_code(e);
            }
        }
    }

    /// What the session's delivery pushes after each frame: the queue's
    /// next entries, in order, each a `Deliver` within the frame limit.
    async fn push(&mut self) {
        let max_frame_len = self.h.limits.max_frame_len;
        let Some(d) = &mut self.device else { return };
        let entries = match self.h.store.read(&d.queue, d.last_pushed + 1, 16, 64 * 1024) {
            Ok(e) => e,
            Err(e) => {
                store_code(e);
                return;
            }
        };
        for (seq, value) in entries {
            assert!(seq > d.last_pushed, "entries come in seq order");
            d.last_pushed = seq;
            let stored = StoredItem::decode(&value).expect("an entry the store wrote decodes");
            let frame = pb::ServerFrame {
                request_id: 0,
                kind: Some(pb::server_frame::Kind::Deliver(pb::Deliver { seq, item: Some(stored.item) })),
            };
            assert!(frame.encoded_len() <= max_frame_len, "a push of {} bytes", frame.encoded_len());
        }
    }
}

fn verify(public_key: &[u8; 32], message: &[u8], signature: &[u8]) -> Result<(), pb::ErrorCode> {
    let key = VerifyingKey::from_bytes(public_key).map_err(|_| pb::ErrorCode::BadSignature)?;
    let sig = Signature::from_slice(signature).map_err(|_| pb::ErrorCode::BadSignature)?;
    key.verify_strict(message, &sig).map_err(|_| pb::ErrorCode::BadSignature)
}

/// Nothing a client sends may make the store fail as if damaged.
fn store_code(e: StoreError) -> pb::ErrorCode {
    assert!(!matches!(e, StoreError::Db(_) | StoreError::Corrupt(_)), "a client's request broke the store: {e}");
    pb::ErrorCode::Internal
}
