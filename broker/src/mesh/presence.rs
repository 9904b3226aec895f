//! Presence across the mesh: a device going online or offline is broadcast
//! to every live member (`PresenceChange`), which tells the sessions there
//! that watch its user; a typing datagram for a device connected elsewhere
//! is relayed to that broker (`DatagramRelay`). Both are ephemeral: a
//! member that misses one is only wrong until the next change.

use bytes::Bytes;
use tern_protocol::peer::{self as pp, peer_frame::Kind as P, PeerFrame};

use super::Mesh;
use crate::store::QueueKey;

impl Mesh {
    /// Tells every live member that `queue`'s device went online or offline.
    pub(crate) fn broadcast_presence(&self, queue: &QueueKey, online: bool, last_seen_ms: u64) {
        let change =
            pp::PresenceChange { handle: queue.handle().to_owned(), device: queue.device(), online, last_seen_ms };
        for member in self.members().keys() {
            if let Some(link) = self.link(member) {
                link.send(PeerFrame { kind: Some(P::PresenceChange(change.clone())) });
            }
        }
    }

    pub(super) fn on_presence_change(&self, c: pp::PresenceChange) {
        if super::queue_key(&c.handle, c.device).is_err() {
            return;
        }
        let inner = &self.inner;
        let last_seen = crate::presence::coarse(c.last_seen_ms);
        if inner.presence.device_changed(&c.handle, c.device, c.online, last_seen) {
            crate::presence::tell(&inner.store, &inner.router, &inner.presence, &c.handle);
        }
        if !c.online {
            inner.store.set_last_seen(&c.handle, last_seen);
        }
    }

    /// Relays `datagram` to `queue`'s device at the broker it is connected
    /// to, if another (in the background; dropped on any failure).
    pub(crate) fn relay_datagram(&self, queue: QueueKey, datagram: Bytes) {
        let mesh = self.clone();
        self.inner.tasks.spawn(async move {
            let Some(Some(location)) = mesh.locate(&queue).await else { return };
            if location.node == mesh.node() {
                return;
            }
            if let Some(link) = mesh.link(&location.node) {
                let relay = pp::DatagramRelay { handle: queue.handle().to_owned(), device: queue.device(), datagram };
                link.send(PeerFrame { kind: Some(P::DatagramRelay(relay)) });
            }
        });
    }
}
