//! What `/mesh` and `tern-broker mesh status` show: members, links and
//! outbox depths as this broker sees them.

use serde::Serialize;

use super::{lock, Mesh};

impl Mesh {
    /// A snapshot for `/mesh` and `tern-broker mesh status`.
    pub(crate) fn status(&self) -> MeshStatus {
        let members = self.members();
        let links = lock(&self.inner.links).clone();
        let mut names: Vec<&String> = members.keys().chain(links.keys()).collect();
        names.sort();
        names.dedup();
        let me = &self.inner.me;
        MeshStatus {
            node: me.name.clone(),
            addr: me.addr.to_string(),
            incarnation: me.incarnation,
            held_queues: self.inner.outbox.get("").queues,
            members: names
                .into_iter()
                .map(|name| {
                    let link = links.get(name);
                    let id = members.get(name).or(link.map(|l| &l.peer));
                    let outbox = self.inner.outbox.get(name);
                    MemberStatus {
                        node: name.clone(),
                        addr: id.map(|i| i.addr.to_string()).unwrap_or_default(),
                        incarnation: id.map_or(0, |i| i.incarnation),
                        alive: members.contains_key(name),
                        outbox_queues: outbox.queues,
                        outbox_in_flight: outbox.in_flight,
                        link: link.map(|l| LinkStatus {
                            dialed_by: l.dialer.clone(),
                            up_secs: l.since.elapsed().as_secs(),
                            rtt_us: l.rtt().as_micros() as u64,
                            queued_frames: l.queued() as u64,
                            frames_out: l.stats().frames_out.load(std::sync::atomic::Ordering::Relaxed),
                            frames_in: l.stats().frames_in.load(std::sync::atomic::Ordering::Relaxed),
                            writes: l.stats().writes.load(std::sync::atomic::Ordering::Relaxed),
                        }),
                    }
                })
                .collect(),
        }
    }
}

/// This broker's view of the mesh.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MeshStatus {
    /// This broker's node name.
    pub node: String,
    /// The address it advertises.
    pub addr: String,
    /// Its gossip incarnation.
    pub incarnation: u64,
    /// Queues held here for devices with no known location.
    pub held_queues: u64,
    /// Every other member it knows as alive or holds a link to.
    pub members: Vec<MemberStatus>,
}

/// One other broker as this one sees it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct MemberStatus {
    /// Node name.
    pub node: String,
    /// Advertised address.
    pub addr: String,
    /// Gossip incarnation.
    pub incarnation: u64,
    /// Alive (or suspected) by gossip.
    pub alive: bool,
    /// Queues being shipped to this member.
    pub outbox_queues: u64,
    /// Entries shipped to it and not yet acknowledged.
    pub outbox_in_flight: u64,
    /// The peer link, when up.
    pub link: Option<LinkStatus>,
}

/// A peer link's state.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LinkStatus {
    /// Which end dialed it.
    pub dialed_by: String,
    /// Seconds since it came up.
    pub up_secs: u64,
    /// QUIC's smoothed round-trip time, microseconds.
    pub rtt_us: u64,
    /// Frames waiting to be written.
    pub queued_frames: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Stream writes (frames per write = batching).
    pub writes: u64,
}
