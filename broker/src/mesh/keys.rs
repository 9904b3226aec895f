//! The key service across the mesh.
//!
//! A handle's keys are decided at its primary (the same rendezvous winner
//! as for its account, `mesh::accounts`): publishes and claims are sent
//! there, and its store's writer applies the claims of one device one after
//! the other, so two claims arriving through different brokers never get
//! the same one-time key while the member list is stable. After each
//! change the primary copies the device's record to every live member,
//! waiting for each (briefly), so a member that becomes primary when the
//! old one goes down holds what it had. A copy carries the record's
//! version; a member keeps the newer of what it holds and what it is sent.
//!
//! What this cannot prevent: a member that missed copies (it was down or
//! partitioned) and then becomes primary may hand out a key that was
//! already claimed. The device that receives the second session with that
//! key cannot decrypt it (its account deleted the key at first use), and
//! the sender recovers with a new claim (docs/security.md).

use bytes::Bytes;
use prost::Message as _;
use tern_protocol::peer::{self as pp, peer_frame::Kind as P, reply, request, PeerFrame};
use tern_protocol::{pb, ErrorCode};

use super::{failure, Mesh, REQUEST_TIMEOUT};
use crate::keys::{decode_answer, KeyRefusal, KeyService};
use crate::store::{KeyDone, KeyOp, KeyRecord, QueueKey};

impl Mesh {
    fn key_service(&self) -> KeyService<'_> {
        KeyService { store: &self.inner.store, router: &self.inner.router, mesh: Some(self) }
    }

    /// The primary of `handle`'s keys when it is another member.
    fn keys_elsewhere(&self, handle: &str) -> Option<String> {
        let primary = self.account_primary(handle);
        (primary != self.node()).then_some(primary)
    }

    async fn ask_primary(&self, primary: &str, kind: request::Kind) -> Result<Bytes, KeyRefusal> {
        let unavailable = |e: String| (ErrorCode::MeshUnavailable, format!("key service at {primary}: {e}; retry"));
        let link = self.link(primary).ok_or_else(|| unavailable("no link".into()))?;
        match link.request(kind, REQUEST_TIMEOUT).await {
            Ok(reply::Kind::Keys(k)) => Ok(k.answer),
            Ok(_) => Err(unavailable("answered something else".into())),
            Err(super::PeerError::Failure { code, message, .. }) => Err((code, message)),
            Err(e) => Err(unavailable(e.to_string())),
        }
    }

    /// Publishes `queue`'s device's keys at the handle's primary.
    pub(crate) async fn publish_keys(
        &self,
        queue: &QueueKey,
        publish: pb::PublishKeys,
    ) -> Result<pb::KeysPublished, KeyRefusal> {
        let Some(primary) = self.keys_elsewhere(queue.handle()) else {
            return self.key_service().publish_here(queue, publish).await;
        };
        let req = pp::KeysPublish {
            handle: queue.handle().to_owned(),
            device: queue.device(),
            publish: publish.encode_to_vec().into(),
        };
        let answer = self.ask_primary(&primary, request::Kind::KeysPublish(req)).await?;
        decode_answer(&answer)
    }

    /// Claims keys of `handle`'s devices at the handle's primary.
    pub(crate) async fn claim_keys(
        &self,
        requester: &QueueKey,
        handle: &str,
        devices: &[u32],
    ) -> Result<pb::KeysClaimed, KeyRefusal> {
        let Some(primary) = self.keys_elsewhere(handle) else {
            return self.key_service().claim_here(requester, handle, devices).await;
        };
        let req = pp::KeysClaim {
            handle: handle.to_owned(),
            devices: devices.to_vec(),
            requester: requester.handle().to_owned(),
            requester_device: requester.device(),
        };
        let answer = self.ask_primary(&primary, request::Kind::KeysClaim(req)).await?;
        decode_answer(&answer)
    }

    /// Copies `record` of `queue`'s device to every live member, waiting for
    /// each (briefly).
    pub(crate) async fn copy_keys(&self, queue: &QueueKey, record: &KeyRecord) {
        let bytes = Bytes::from(record.encode_stored());
        let links: Vec<_> = self.members().keys().filter_map(|m| self.link(m)).collect();
        let puts = links.iter().map(|link| {
            let put = pp::KeysPut { handle: queue.handle().to_owned(), device: queue.device(), record: bytes.clone() };
            link.request(request::Kind::KeysPut(put), REQUEST_TIMEOUT)
        });
        for (link, result) in links.iter().zip(futures::future::join_all(puts).await) {
            if let Err(e) = result {
                metrics::counter!("tern_mesh_key_copies_failed_total").increment(1);
                tracing::warn!(%queue, peer = %link.peer.name, error = %e, "key record not copied");
            }
        }
    }

    /// Pushes `frame` to `queue`'s device at the broker it is connected to,
    /// if any (in the background; dropped on any failure).
    pub(crate) fn notify_device(&self, queue: &QueueKey, frame: Bytes) {
        let (mesh, queue) = (self.clone(), queue.clone());
        self.inner.tasks.spawn(async move {
            let Some(Some(location)) = mesh.locate(&queue).await else { return };
            if location.node == mesh.node() {
                return;
            }
            if let Some(link) = mesh.link(&location.node) {
                let notice = pp::Notice { handle: queue.handle().to_owned(), device: queue.device(), frame };
                link.send(PeerFrame { kind: Some(P::Notice(notice)) });
            }
        });
    }

    /// A notice from a peer for a device connected here.
    pub(super) fn on_notice(&self, notice: pp::Notice) {
        let Ok(queue) = super::queue_key(&notice.handle, notice.device) else { return };
        if tern_protocol::decode_server_frame(&mut bytes::BytesMut::from(&notice.frame[..]), notice.frame.len())
            .ok()
            .flatten()
            .is_none()
        {
            metrics::counter!("tern_mesh_frames_ignored_total").increment(1);
            return;
        }
        self.inner.router.notify(&queue, crate::router::Notice::Frame(notice.frame));
    }

    pub(super) async fn serve_keys(&self, kind: request::Kind) -> reply::Kind {
        let answer = match kind {
            request::Kind::KeysPublish(p) => self.serve_publish(p).await.map(|a| a.encode_to_vec()),
            request::Kind::KeysClaim(c) => self.serve_claim(c).await.map(|a| a.encode_to_vec()),
            request::Kind::KeysPut(p) => self.serve_put(p).await.map(|()| Vec::new()),
            _ => Err((ErrorCode::UnknownFrame, "not a key service request".into())),
        };
        match answer {
            Ok(bytes) => reply::Kind::Keys(pp::KeysReply { answer: bytes.into() }),
            Err((code, text)) => reply::Kind::Failure(failure(code, text)),
        }
    }

    async fn serve_publish(&self, p: pp::KeysPublish) -> Result<pb::KeysPublished, KeyRefusal> {
        let queue = super::queue_key(&p.handle, p.device).map_err(|_| bad_request())?;
        let publish = pb::PublishKeys::decode(p.publish).map_err(|_| bad_request())?;
        self.key_service().publish_here(&queue, publish).await
    }

    async fn serve_claim(&self, c: pp::KeysClaim) -> Result<pb::KeysClaimed, KeyRefusal> {
        tern_protocol::validate_handle(&c.handle).map_err(|_| bad_request())?;
        let requester = super::queue_key(&c.requester, c.requester_device).map_err(|_| bad_request())?;
        self.key_service().claim_here(&requester, &c.handle, &c.devices).await
    }

    async fn serve_put(&self, p: pp::KeysPut) -> Result<(), KeyRefusal> {
        let queue = super::queue_key(&p.handle, p.device).map_err(|_| bad_request())?;
        let record = KeyRecord::decode_stored(&p.record).map_err(|_| bad_request())?;
        match self.inner.store.keys(KeyOp::Put { queue, record }).await {
            Ok(KeyDone::Put) => Ok(()),
            Ok(_) => Err((ErrorCode::Internal, "the store answered a copy with something else".into())),
            Err(e) => Err(crate::session::store_refusal(&e)),
        }
    }
}

fn bad_request() -> KeyRefusal {
    (ErrorCode::InvalidArgument, "a malformed key service request".into())
}
