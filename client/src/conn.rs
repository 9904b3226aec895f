//! One live connection to a broker: the QUIC handshake, the session stream,
//! the login exchange, and frame I/O. A reader task decodes incoming frames
//! into a channel so the client's actor can `select!` on them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ed25519_dalek::{Signer, SigningKey};
use tern_protocol::auth::{self, Purpose};
use tern_protocol::codec;
use tern_protocol::pb::{self, client_frame::Kind as C, server_frame::Kind as S};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::{ClientError, Identity};

/// How to authenticate a new connection.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Auth<'a> {
    Register { handle: &'a str, key: &'a SigningKey, token: Option<&'a str> },
    Login { identity: &'a Identity },
    Link { handle: &'a str, key: &'a SigningKey, approval: &'a pb::DeviceApproval },
}

/// A frame from the broker, or why the stream ended.
pub(crate) type Incoming = Result<pb::ServerFrame, String>;

#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) conn: quinn::Connection,
    /// The broker's address as configured (`host:port`).
    pub(crate) addr: String,
    send: quinn::SendStream,
    pub(crate) frames: mpsc::Receiver<Incoming>,
    next_request: u64,
    /// Largest `Send.body` the broker accepts (from its `Challenge`).
    pub(crate) max_body_len: usize,
    /// Largest frame either side accepts (from the `Challenge`); shared with
    /// the reader task, which starts before the challenge arrives.
    max_frame_len: Arc<AtomicUsize>,
}

/// Resolves `addr` (`host:port`).
pub(crate) async fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    let err = |reason: String| ClientError::Resolve { addr: addr.to_owned(), reason };
    let mut addrs = tokio::net::lookup_host(addr).await.map_err(|e| err(e.to_string()))?;
    addrs.next().ok_or_else(|| err("no address found".into()))
}

impl Conn {
    /// Connects to `addr` and opens the session stream.
    pub(crate) async fn open(
        endpoint: &quinn::Endpoint,
        addr: &str,
        server_name: Option<&str>,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let sock = resolve(addr).await?;
        let fail = |reason: String| ClientError::Connect { addr: addr.to_owned(), reason };
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
        let name = server_name.unwrap_or(host);
        let connecting = endpoint.connect(sock, name).map_err(|e| fail(e.to_string()))?;
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Err(_) => {
                return Err(fail(format!(
                    "no answer within {timeout:?}; is tern-broker running there? (check --broker)"
                )))
            }
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Ok(Ok(c)) => c,
        };
        let (send, recv) = conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
        let (tx, frames) = mpsc::channel(1024);
        let max_frame_len = Arc::new(AtomicUsize::new(tern_protocol::DEFAULT_MAX_FRAME_LEN));
        tokio::spawn(read_frames(recv, tx, max_frame_len.clone()));
        Ok(Self {
            conn,
            addr: addr.to_owned(),
            send,
            frames,
            next_request: 1,
            max_body_len: tern_protocol::DEFAULT_MAX_BODY_LEN,
            max_frame_len,
        })
    }

    /// Writes a request; returns its id.
    pub(crate) async fn request(&mut self, kind: C) -> Result<u64, ClientError> {
        let id = self.next_request;
        self.next_request += 1;
        self.write(id, kind).await?;
        Ok(id)
    }

    /// Writes a frame. A frame too large to encode is `ClientError::Invalid`
    /// (the connection is still fine); a failed write is `ConnectionLost`.
    pub(crate) async fn write(&mut self, request_id: u64, kind: C) -> Result<(), ClientError> {
        let frame = pb::ClientFrame { request_id, kind: Some(kind) };
        let max = self.max_frame_len.load(Ordering::Relaxed);
        let bytes = codec::encode_to_vec(&frame, max).map_err(|e| ClientError::Invalid(e.to_string()))?;
        self.send.write_chunk(bytes.freeze()).await.map_err(|e| ClientError::ConnectionLost(e.to_string()))
    }

    /// Waits for the answer to request `id` during the login exchange.
    async fn answer(&mut self, id: u64) -> Result<S, ClientError> {
        loop {
            let frame = match self.frames.recv().await {
                Some(Ok(f)) => f,
                Some(Err(reason)) => return Err(ClientError::ConnectionLost(reason)),
                None => return Err(ClientError::ConnectionLost("stream ended".into())),
            };
            match frame.kind {
                Some(S::Error(e)) if frame.request_id == id || frame.request_id == 0 => {
                    return Err(ClientError::Refused { code: e.code(), message: e.message });
                }
                Some(kind) if frame.request_id == id => return Ok(kind),
                _ => {}
            }
        }
    }

    /// Hello, challenge, and the signed register/login/link request.
    pub(crate) async fn authenticate(&mut self, how: Auth<'_>, client_name: &str) -> Result<pb::LoginOk, ClientError> {
        let hello = pb::Hello { version: tern_protocol::PROTOCOL_VERSION, client_name: client_name.to_owned() };
        let id = self.request(C::Hello(hello)).await?;
        let challenge = match self.answer(id).await? {
            S::Challenge(c) => c,
            other => return Err(ClientError::Protocol(format!("expected a challenge, got {other:?}"))),
        };
        if challenge.max_body_len > 0 {
            self.max_body_len = challenge.max_body_len as usize;
        }
        if challenge.max_frame_len > 0 {
            self.max_frame_len.store(challenge.max_frame_len as usize, Ordering::Relaxed);
        }
        let nonce: [u8; 32] = challenge
            .nonce
            .as_ref()
            .try_into()
            .map_err(|_| ClientError::Protocol("challenge nonce is not 32 bytes".into()))?;
        let mut exporter = [0u8; 32];
        self.conn
            .export_keying_material(&mut exporter, auth::EXPORTER_LABEL, b"")
            .map_err(|_| ClientError::Protocol("TLS exporter unavailable".into()))?;
        let sign = |key: &SigningKey, t: Vec<u8>| Bytes::copy_from_slice(&key.sign(&t).to_bytes());
        let nonce_bytes = challenge.nonce.clone();
        let request = match how {
            Auth::Register { handle, key, token } => {
                let pk = key.verifying_key().to_bytes();
                let t = auth::transcript(Purpose::Register, &exporter, &nonce, handle, 0, &pk);
                C::Register(pb::Register {
                    handle: handle.to_owned(),
                    public_key: Bytes::copy_from_slice(&pk),
                    nonce: nonce_bytes,
                    signature: sign(key, t),
                    registration_token: token.unwrap_or_default().to_owned(),
                })
            }
            Auth::Login { identity } => {
                let t =
                    auth::transcript(Purpose::Login, &exporter, &nonce, &identity.handle, identity.device_id, &[0; 32]);
                C::Login(pb::Login {
                    handle: identity.handle.clone(),
                    device_id: identity.device_id,
                    nonce: nonce_bytes,
                    signature: sign(&identity.signing_key, t),
                })
            }
            Auth::Link { handle, key, approval } => {
                let pk = key.verifying_key().to_bytes();
                let t = auth::transcript(Purpose::LinkDevice, &exporter, &nonce, handle, 0, &pk);
                C::LinkDevice(pb::LinkDevice {
                    handle: handle.to_owned(),
                    public_key: Bytes::copy_from_slice(&pk),
                    nonce: nonce_bytes,
                    signature: sign(key, t),
                    approval: Some(approval.clone()),
                })
            }
        };
        let id = self.request(request).await?;
        match self.answer(id).await? {
            S::LoginOk(ok) => Ok(ok),
            other => Err(ClientError::Protocol(format!("expected LoginOk, got {other:?}"))),
        }
    }

    /// Closes immediately; unsent data is dropped.
    pub(crate) fn close(&self) {
        self.conn.close(0u32.into(), b"bye");
    }

    /// Ends the session stream, waits (up to `wait`) until the broker has
    /// read everything written (acks included), then closes.
    pub(crate) async fn close_gracefully(mut self, wait: Duration) {
        if self.send.finish().is_ok() {
            let _ = tokio::time::timeout(wait, self.send.stopped()).await;
        }
        self.close();
    }
}

/// Decodes frames from the session stream until it ends.
async fn read_frames(mut recv: quinn::RecvStream, tx: mpsc::Sender<Incoming>, max_frame_len: Arc<AtomicUsize>) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        loop {
            match codec::decode_server_frame(&mut buf, max_frame_len.load(Ordering::Relaxed)) {
                Ok(Some(frame)) => {
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(format!("bad frame from broker: {e}"))).await;
                    return;
                }
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        match recv.read_buf(&mut buf).await {
            Ok(0) => {
                let _ = tx.send(Err("broker closed the stream".into())).await;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Err(e.to_string())).await;
                return;
            }
        }
    }
}
