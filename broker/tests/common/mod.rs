//! Test support: brokers on 127.0.0.1:0 in temp directories, and a raw
//! protocol client that speaks frames directly, so tests can send exactly
//! the bytes they mean (bad signatures, garbage, other devices' ids).
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ed25519_dalek::{Signer, SigningKey};
use tern_broker::{Broker, BrokerConfig};
use tern_protocol::auth::{self, Purpose};
use tern_protocol::pb::{self, client_frame::Kind as C, server_frame::Kind as S};
use tern_protocol::{codec, ErrorCode};
use tokio::io::AsyncReadExt;

pub mod cluster;
pub mod procs;

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A free UDP port on loopback.
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A broker process, killed with SIGKILL when dropped (also when a test fails).
pub struct Proc(pub std::process::Child);

impl Proc {
    pub fn sigkill(&mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }

    /// SIGSTOPs the process (`stop`), or SIGCONTs it: stopped, it sends and
    /// reads nothing, and its peers see it fall silent, as after a freeze.
    pub fn pause(&self, stop: bool) {
        use rustix::process::{kill_process, Pid, Signal};
        let pid = Pid::from_raw(self.0.id() as i32).expect("a running process");
        kill_process(pid, if stop { Signal::STOP } else { Signal::CONT }).expect("signal the broker");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// A config for a test broker in `dir`, on an ephemeral loopback port.
pub fn config(dir: &Path) -> BrokerConfig {
    let mut c = BrokerConfig { listen: "127.0.0.1:0".parse().unwrap(), data_dir: dir.to_owned(), ..Default::default() };
    c.store.min_free_disk_mb = 0;
    c
}

pub async fn start(dir: &Path) -> Broker {
    Broker::spawn(config(dir)).await.expect("broker starts")
}

/// Polls `cond` until it holds or `timeout` passes.
pub async fn wait_for<F: FnMut() -> bool>(timeout: Duration, mut cond: F) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

pub fn client_endpoint(ca: &Path) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tern_protocol::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    endpoint
}

/// A client speaking raw frames on one session stream.
pub struct Raw {
    pub conn: quinn::Connection,
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    buf: BytesMut,
    next_id: u64,
    _endpoint: quinn::Endpoint,
}

impl Raw {
    pub async fn connect(broker: &Broker) -> Self {
        Self::connect_to(broker.local_addr(), broker.cert_path()).await
    }

    pub async fn connect_to(addr: SocketAddr, ca: &Path) -> Self {
        Self::try_connect_to(addr, ca).await.expect("QUIC handshake")
    }

    pub async fn try_connect_to(addr: SocketAddr, ca: &Path) -> Result<Self, String> {
        let endpoint = client_endpoint(ca);
        let connecting = endpoint.connect(addr, "127.0.0.1").map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(Duration::from_secs(2), connecting)
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        Ok(Self { conn, send, recv, buf: BytesMut::new(), next_id: 1, _endpoint: endpoint })
    }

    pub async fn write_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.unwrap();
    }

    /// Sends a frame; returns its request id.
    pub async fn request(&mut self, kind: C) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let frame = pb::ClientFrame { request_id: id, kind: Some(kind) };
        let bytes = codec::encode_to_vec(&frame, 1 << 24).unwrap();
        self.send.write_all(&bytes).await.unwrap();
        id
    }

    /// The next frame, or None when the stream ends or times out.
    pub async fn next(&mut self) -> Option<pb::ServerFrame> {
        tokio::time::timeout(TIMEOUT, async {
            loop {
                if let Some(f) = codec::decode::<pb::ServerFrame>(&mut self.buf, 1 << 24).unwrap() {
                    return Some(f);
                }
                match self.recv.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// The answer to request `id` (pushed deliveries before it are returned in `skipped`).
    pub async fn answer(&mut self, id: u64) -> S {
        loop {
            let f = self.next().await.expect("an answer");
            if f.request_id == id {
                return f.kind.expect("a kind");
            }
        }
    }

    pub async fn hello(&mut self) -> pb::Challenge {
        let id = self.request(C::Hello(pb::Hello { version: 1, client_name: "test".into() })).await;
        match self.answer(id).await {
            S::Challenge(c) => c,
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    pub fn exporter(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        self.conn.export_keying_material(&mut out, auth::EXPORTER_LABEL, b"").unwrap();
        out
    }

    /// Hello + Register; returns the answer.
    pub async fn register(&mut self, handle: &str, key: &SigningKey) -> S {
        let c = self.hello().await;
        let nonce: [u8; 32] = c.nonce.as_ref().try_into().unwrap();
        let pk = key.verifying_key().to_bytes();
        let t = auth::transcript(Purpose::Register, &self.exporter(), &nonce, handle, 0, &pk);
        let req = pb::Register {
            handle: handle.into(),
            public_key: Bytes::copy_from_slice(&pk),
            nonce: c.nonce,
            signature: Bytes::copy_from_slice(&key.sign(&t).to_bytes()),
            registration_token: String::new(),
        };
        let id = self.request(C::Register(req)).await;
        self.answer(id).await
    }

    /// The signed `Login` for `device` of `handle` on this connection.
    pub async fn login_request(&mut self, handle: &str, device: u32, key: &SigningKey) -> pb::Login {
        let c = self.hello().await;
        let nonce: [u8; 32] = c.nonce.as_ref().try_into().unwrap();
        let t = auth::transcript(Purpose::Login, &self.exporter(), &nonce, handle, device, &[0; 32]);
        pb::Login {
            handle: handle.into(),
            device_id: device,
            nonce: c.nonce,
            signature: Bytes::copy_from_slice(&key.sign(&t).to_bytes()),
        }
    }

    pub async fn login(&mut self, handle: &str, device: u32, key: &SigningKey) -> S {
        let req = self.login_request(handle, device, key).await;
        let id = self.request(C::Login(req)).await;
        self.answer(id).await
    }

    pub async fn send_msg(&mut self, to: &str, message_id: [u8; 16], body: &[u8]) -> S {
        self.send_msg_with(to, message_id, body, false).await
    }

    /// [`Raw::send_msg`], asking for no delivered receipt if `no_receipt`.
    pub async fn send_msg_with(&mut self, to: &str, message_id: [u8; 16], body: &[u8], no_receipt: bool) -> S {
        let id = self
            .request(C::Send(pb::Send {
                message_id: Bytes::copy_from_slice(&message_id),
                to: to.into(),
                body: Bytes::copy_from_slice(body),
                no_receipt,
                ..Default::default()
            }))
            .await;
        self.answer(id).await
    }

    pub async fn ack(&mut self, up_to: u64) {
        let frame = pb::ClientFrame { request_id: 0, kind: Some(C::Ack(pb::Ack { up_to_seq: up_to })) };
        self.send.write_all(&codec::encode_to_vec(&frame, 1 << 20).unwrap()).await.unwrap();
    }

    /// The next pushed delivery (skips nothing else: panics on other frames).
    pub async fn deliver(&mut self) -> Option<pb::Deliver> {
        match self.next().await?.kind? {
            S::Deliver(d) => Some(d),
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    /// Waits `wait` for a frame; None if none came.
    pub async fn maybe_next(&mut self, wait: Duration) -> Option<pb::ServerFrame> {
        tokio::time::timeout(wait, self.next()).await.ok().flatten()
    }
}

pub fn key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

pub fn error_code(kind: &S) -> Option<ErrorCode> {
    match kind {
        S::Error(e) => Some(e.code()),
        _ => None,
    }
}

/// Registers `handle` and returns its logged-in raw connection and key.
pub async fn user(broker: &Broker, handle: &str) -> (Raw, SigningKey) {
    let key = key();
    let mut raw = Raw::connect(broker).await;
    match raw.register(handle, &key).await {
        S::LoginOk(ok) => assert_eq!(ok.device_id, 1),
        other => panic!("register {handle}: {other:?}"),
    }
    (raw, key)
}

pub fn message_of(d: &pb::Deliver) -> &pb::Message {
    match d.item.as_ref() {
        Some(pb::deliver::Item::Message(m)) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

pub fn mid(n: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    id[8..].copy_from_slice(&0x7e57_u64.to_be_bytes());
    id
}

/// The directory owner of `handle`'s device 1 among `nodes`: the rendezvous
/// winner, computed as the broker does (docs/mesh.md). Tests pick handles by
/// it to put a device's directory entry where a scenario needs it.
pub fn directory_owner(handle: &str, nodes: &[String]) -> String {
    let mut key = handle.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(&1u32.to_be_bytes());
    rendezvous_owner(&key, nodes)
}

/// The rendezvous winner for `key` among `nodes`, as the broker picks a
/// directory owner or an account's primary (docs/mesh.md).
pub fn rendezvous_owner(key: &[u8], nodes: &[String]) -> String {
    let score = |node: &str| {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(node.as_bytes());
        ctx.update(&[0xff]);
        ctx.update(key);
        u64::from_be_bytes(ctx.finish().as_ref()[..8].try_into().unwrap())
    };
    nodes.iter().max_by_key(|n| (score(n), n.as_str())).unwrap().clone()
}

/// The first of `prefix0`, `prefix1`, ... whose directory owner among
/// `nodes` satisfies `want`.
pub fn handle_owned(prefix: &str, nodes: &[String], want: impl Fn(&str) -> bool) -> String {
    (0..).map(|i| format!("{prefix}{i}")).find(|h| want(&directory_owner(h, nodes))).unwrap()
}
