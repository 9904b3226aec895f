//! Membership and failure detection: foca (SWIM) in an actor.
//!
//! foca is sans-IO: packets and timer events go in through
//! `handle_data`/`handle_timer`, and what it wants done comes out of an
//! `AccumulatingRuntime` (packets to send, timers to set, notifications). The
//! actor owns the `Foca` instance; packets come from peer links (QUIC
//! datagrams) and go out through [`Mesh::send_gossip`], timers are tokio
//! sleeps that post back to the actor, and every change of the member list
//! is published on a `watch` channel for the directory and the admin view.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use foca::{AccumulatingRuntime, Foca, NoCustomBroadcast, OwnedNotification, PostcardCodec, Timer};
use rand_foca::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::Mesh;

/// A broker's gossip identity: its node name, the address it is reached at,
/// and an incarnation that grows at each restart (so a restarted broker is
/// not mistaken for the one declared down).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct NodeId {
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    pub(crate) incarnation: u64,
}

impl std::fmt::Debug for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}#{}", self.name, self.addr, self.incarnation)
    }
}

impl foca::Identity for NodeId {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(Self { incarnation: self.incarnation + 1, ..self.clone() })
    }

    fn addr(&self) -> String {
        self.name.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.incarnation > adversary.incarnation
    }
}

/// The live members other than this broker, by node name.
pub(crate) type Members = BTreeMap<String, NodeId>;

/// Input to the membership actor.
#[derive(Debug)]
pub(crate) enum MembershipMsg {
    /// A SWIM packet from a peer.
    Packet(Bytes),
    /// A timer foca asked for has fired.
    Timer(Timer<NodeId>),
    /// A link came up with this node: introduce ourselves.
    Announce(NodeId),
    /// Leave the cluster (on shutdown); answered once the leave is sent.
    Leave(oneshot::Sender<()>),
}

type Swim = Foca<NodeId, PostcardCodec, rand_foca::rngs::StdRng, NoCustomBroadcast>;

pub(crate) struct MembershipActor {
    foca: Swim,
    runtime: AccumulatingRuntime<NodeId>,
    rx: mpsc::Receiver<MembershipMsg>,
    tx: mpsc::WeakSender<MembershipMsg>,
    members: watch::Sender<Members>,
    mesh: Mesh,
    cancel: CancellationToken,
    /// Set once this broker asked to leave: foca then reports itself defunct.
    leaving: bool,
}

/// Most bytes in one SWIM packet: fits a QUIC datagram on any path QUIC
/// allows (1200-byte minimum MTU, less headers).
pub(crate) const MAX_PACKET: usize = 1100;

impl MembershipActor {
    pub(crate) fn new(
        identity: NodeId,
        rx: mpsc::Receiver<MembershipMsg>,
        tx: &mpsc::Sender<MembershipMsg>,
        members: watch::Sender<Members>,
        mesh: Mesh,
        cancel: CancellationToken,
    ) -> Self {
        let mut config = foca::Config::new_lan(NonZeroU32::MIN.saturating_add(15));
        config.max_packet_size = MAX_PACKET.try_into().unwrap_or(config.max_packet_size);
        // Announce to a member now and then, so two halves of a healed
        // partition find each other again.
        config.periodic_announce =
            Some(foca::PeriodicParams { frequency: Duration::from_secs(5), num_members: std::num::NonZeroUsize::MIN });
        config.remove_down_after = Some(Duration::from_secs(60));
        let rng = rand_foca::rngs::StdRng::seed_from_u64(rand::random());
        let foca = Foca::new(identity, config, rng, PostcardCodec);
        Self {
            foca,
            runtime: AccumulatingRuntime::new(),
            rx,
            tx: tx.downgrade(),
            members,
            mesh,
            cancel,
            leaving: false,
        }
    }

    pub(crate) async fn run(mut self) {
        loop {
            let msg = tokio::select! {
                () = self.cancel.cancelled() => break,
                msg = self.rx.recv() => match msg {
                    Some(m) => m,
                    None => break,
                },
            };
            let result = match msg {
                MembershipMsg::Packet(data) => self.foca.handle_data(&data, &mut self.runtime),
                MembershipMsg::Timer(timer) => self.foca.handle_timer(timer, &mut self.runtime),
                MembershipMsg::Announce(id) => self.foca.announce(id, &mut self.runtime),
                MembershipMsg::Leave(done) => {
                    self.leaving = true;
                    let result = self.foca.leave_cluster(&mut self.runtime);
                    self.drain();
                    let _ = done.send(());
                    result
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "gossip input ignored");
            }
            self.drain();
        }
    }

    /// Carries out what foca asked for.
    fn drain(&mut self) {
        while let Some((to, data)) = self.runtime.to_send() {
            self.mesh.send_gossip(&to, data);
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if let Some(tx) = tx.upgrade() {
                    let _ = tx.send(MembershipMsg::Timer(timer)).await;
                }
            });
        }
        let mut changed = false;
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                OwnedNotification::MemberUp(id) => {
                    tracing::info!(member = ?id, "member up");
                    changed = true;
                }
                OwnedNotification::MemberDown(id) => {
                    tracing::warn!(member = ?id, "member down");
                    changed = true;
                }
                OwnedNotification::Rename(old, new) => {
                    tracing::info!(old = ?old, new = ?new, "member restarted");
                    changed = true;
                }
                OwnedNotification::Rejoin(id) => {
                    tracing::warn!(identity = ?id, "declared down by the cluster; rejoined")
                }
                OwnedNotification::Idle => tracing::warn!("no live member left"),
                OwnedNotification::Active => tracing::info!("joined the mesh"),
                OwnedNotification::Defunct if self.leaving => tracing::debug!("left the mesh"),
                OwnedNotification::Defunct => tracing::error!("declared down and cannot rejoin"),
            }
        }
        if changed {
            let live: Members = self.foca.iter_members().map(|m| (m.id().name.clone(), m.id().clone())).collect();
            metrics::gauge!("tern_mesh_members").set(live.len() as f64 + 1.0);
            self.members.send_replace(live);
        }
    }
}
