//! Local delivery: which device is online on this broker, and how a newly
//! stored entry reaches its session.
//!
//! The store's writer calls [`Router::queued`] after each batch is written
//! (before its WAL sync; see `store::writer`). If the device has a session
//! here, the entry is handed to it through a bounded channel; when that channel is full the session is flagged as lagging and
//! woken, and reads the entries from the store instead. So the channel is only
//! a fast path: the store is the source of truth and nothing depends on the
//! channel having room.
//!
//! In a mesh, an entry for a device with no session here is announced to the
//! ship actor (the `remote` hook), which moves it to the device's broker.
//!
//! Beside the entries, a session takes notices: frames pushed to the device
//! as they are (a key-stock warning), never stored, dropped when the device
//! is not connected here or its notice channel is full ([`Router::notify`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::store::{QueueKey, QueueListener};

/// Devices whose highest pushed seq is remembered for the redelivery count,
/// at most (connected ones are always kept).
const PUSHED_MAX: usize = 65_536;

/// An entry pushed to a session: its seq and stored bytes.
pub(crate) type Pushed = (u64, Bytes);

/// Notices a session may hold before more are dropped.
const NOTICES: usize = 64;

/// What a session is handed to pass on as it is.
#[derive(Debug, Clone)]
pub(crate) enum Notice {
    /// An encoded server frame, written to the session stream.
    Frame(Bytes),
    /// An encoded `Datagram`, sent as a QUIC datagram.
    Datagram(Bytes),
}

/// Cheap, cloneable handle to the local routing table.
#[derive(Clone, Debug, Default)]
pub struct Router {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: Mutex<HashMap<QueueKey, Slot>>,
    /// Highest seq pushed to each device by any session, to count redeliveries.
    pushed: Mutex<HashMap<QueueKey, u64>>,
    next_id: AtomicU64,
    /// Told of entries for devices not connected here (mesh members only:
    /// the mesh's ship actor). The router knows nothing of the mesh.
    remote: OnceLock<Box<dyn QueueListener>>,
    /// Told of every entry for a device with no session here (push
    /// wake-ups). Must not block.
    offline: OnceLock<OfflineHook>,
}

/// See `Inner::offline`.
struct OfflineHook(Box<dyn Fn(&QueueKey) + Send + Sync>);

impl std::fmt::Debug for OfflineHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OfflineHook")
    }
}

impl std::fmt::Debug for dyn QueueListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueListener")
    }
}

#[derive(Debug)]
struct Slot {
    id: u64,
    tx: mpsc::Sender<Pushed>,
    lag: Arc<Lag>,
    replaced: CancellationToken,
    /// The device key the session logged in with.
    key: [u8; 32],
    lost: CancellationToken,
    unlinked: CancellationToken,
    /// Frames and datagrams for the session to send as they are.
    notices: mpsc::Sender<Notice>,
}

/// Set when an entry could not be handed over; the session then reads the store.
#[derive(Debug, Default)]
pub(crate) struct Lag {
    pub(crate) lagged: AtomicBool,
    pub(crate) wake: Notify,
}

/// A session's registration; detaches on drop.
#[derive(Debug)]
pub struct Attachment {
    pub(crate) lag: Arc<Lag>,
    /// Cancelled when the same device logs in on another connection.
    pub(crate) replaced: CancellationToken,
    /// Cancelled when the device's account lost a merge (see
    /// [`Router::revoke`]).
    pub(crate) lost: CancellationToken,
    /// Cancelled when the device is unlinked ([`Router::unlink`]).
    pub(crate) unlinked: CancellationToken,
    /// Highest seq pushed to this device before this session.
    pub(crate) previously_pushed: u64,
    /// Notices for the session (see [`Router::notify`]); taken by it.
    pub(crate) notices: Option<mpsc::Receiver<Notice>>,
    router: Router,
    queue: QueueKey,
    id: u64,
}

impl Attachment {
    /// Records how far this session pushed, for the redelivery count.
    /// Devices no longer connected are forgotten once more than
    /// [`PUSHED_MAX`] are remembered (their next redeliveries go uncounted).
    pub(crate) fn record_pushed(&self, seq: u64) {
        if let Ok(mut pushed) = self.router.inner.pushed.lock() {
            if pushed.len() >= PUSHED_MAX && !pushed.contains_key(&self.queue) {
                if let Ok(sessions) = self.router.inner.sessions.lock() {
                    pushed.retain(|q, _| sessions.contains_key(q));
                }
            }
            let entry = pushed.entry(self.queue.clone()).or_default();
            *entry = (*entry).max(seq);
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Ok(mut sessions) = self.router.inner.sessions.lock() {
            if sessions.get(&self.queue).is_some_and(|s| s.id == self.id) {
                sessions.remove(&self.queue);
            }
        }
    }
}

impl Router {
    /// Registers a session for `queue`, replacing (and cancelling) an older
    /// one. Entries stored from now on arrive on the returned receiver.
    pub fn attach(&self, queue: QueueKey, capacity: usize) -> (Attachment, mpsc::Receiver<Pushed>) {
        self.attach_as(queue, [0; 32], capacity)
    }

    /// Like [`Router::attach`], for a session that logged in with device
    /// key `key`.
    pub fn attach_as(&self, queue: QueueKey, key: [u8; 32], capacity: usize) -> (Attachment, mpsc::Receiver<Pushed>) {
        let (tx, rx) = mpsc::channel(capacity);
        let lag = Arc::new(Lag::default());
        let replaced = CancellationToken::new();
        let lost = CancellationToken::new();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (notices, notices_rx) = mpsc::channel(NOTICES);
        let unlinked = CancellationToken::new();
        let slot = Slot {
            id,
            tx,
            lag: lag.clone(),
            replaced: replaced.clone(),
            key,
            lost: lost.clone(),
            unlinked: unlinked.clone(),
            notices,
        };
        let old = self.inner.sessions.lock().ok().and_then(|mut s| s.insert(queue.clone(), slot));
        if let Some(old) = old {
            old.replaced.cancel();
        }
        let previously_pushed = self.inner.pushed.lock().ok().and_then(|p| p.get(&queue).copied()).unwrap_or(0);
        let notices = Some(notices_rx);
        let attachment =
            Attachment { lag, replaced, lost, unlinked, previously_pushed, notices, router: self.clone(), queue, id };
        (attachment, rx)
    }

    /// Ends the session of `queue`'s device here if it logged in with
    /// `key`: that key lost its account to another (see `Account::merge`).
    pub(crate) fn revoke(&self, queue: &QueueKey, key: &[u8; 32]) {
        if let Ok(mut sessions) = self.inner.sessions.lock() {
            if sessions.get(queue).is_some_and(|s| s.key == *key) {
                if let Some(slot) = sessions.remove(queue) {
                    slot.lost.cancel();
                }
            }
        }
    }

    /// Ends the session of `queue`'s device here: the device was unlinked.
    pub(crate) fn unlink(&self, queue: &QueueKey) {
        if let Ok(mut sessions) = self.inner.sessions.lock() {
            if let Some(slot) = sessions.remove(queue) {
                slot.unlinked.cancel();
            }
        }
    }

    /// Tells `remote` (the mesh's ship actor) of entries for devices not
    /// connected here. It must not block: it runs on the store's writer
    /// thread.
    pub(crate) fn set_remote(&self, remote: impl QueueListener) {
        let _ = self.inner.remote.set(Box::new(remote));
    }

    /// Tells `hook` of every entry for a device with no session here. It
    /// must not block: it runs on the store's writer thread.
    pub(crate) fn set_offline_hook(&self, hook: impl Fn(&QueueKey) + Send + Sync + 'static) {
        let _ = self.inner.offline.set(OfflineHook(Box::new(hook)));
    }

    /// True when `queue`'s device has a session here.
    pub(crate) fn is_attached(&self, queue: &QueueKey) -> bool {
        self.inner.sessions.lock().is_ok_and(|s| s.contains_key(queue))
    }

    /// Ends the session of `queue`'s device here: it logged in at another
    /// broker since.
    pub(crate) fn replace_remotely(&self, queue: &QueueKey) {
        if let Ok(mut sessions) = self.inner.sessions.lock() {
            // Detached at once: from now on entries for the device are
            // shipped to its new broker, not handed to the ending session.
            if let Some(slot) = sessions.remove(queue) {
                slot.replaced.cancel();
            }
        }
    }

    /// Hands `notice` to `queue`'s session here. False when the device has
    /// none (or its notices are full: a notice is ephemeral, and the device
    /// learns the same again later).
    pub(crate) fn notify(&self, queue: &QueueKey, notice: Notice) -> bool {
        let Ok(sessions) = self.inner.sessions.lock() else { return false };
        sessions.get(queue).is_some_and(|slot| slot.notices.try_send(notice).is_ok())
    }

    /// Devices with a session on this broker.
    pub(crate) fn online(&self) -> usize {
        self.inner.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }
}

impl QueueListener for Router {
    fn queued(&self, queue: &QueueKey, seq: u64, value: &Bytes) {
        let Ok(sessions) = self.inner.sessions.lock() else { return };
        if let Some(slot) = sessions.get(queue) {
            if slot.tx.try_send((seq, value.clone())).is_err() {
                slot.lag.lagged.store(true, Ordering::Release);
                slot.lag.wake.notify_one();
            }
            return;
        }
        if let Some(offline) = self.inner.offline.get() {
            (offline.0)(queue);
        }
        if let Some(remote) = self.inner.remote.get() {
            remote.queued(queue, seq, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redelivery_record_of_devices_gone_is_bounded() {
        let router = Router::default();
        let online = router.attach(QueueKey::new("online", 1), 4);
        online.0.record_pushed(7);
        for i in 0..PUSHED_MAX + 10 {
            let (attachment, _rx) = router.attach(QueueKey::new(&format!("u{i}"), 1), 4);
            attachment.record_pushed(1);
        }
        let pushed = router.inner.pushed.lock().unwrap();
        assert!(pushed.len() <= PUSHED_MAX, "{} devices remembered", pushed.len());
        assert_eq!(pushed.get(&QueueKey::new("online", 1)), Some(&7), "a connected device is kept");
    }

    #[tokio::test]
    async fn hands_over_and_flags_lag_when_full() {
        let router = Router::default();
        let q = QueueKey::new("bob", 1);
        let (a, mut rx) = router.attach(q.clone(), 1);
        router.queued(&q, 1, &Bytes::from_static(b"x"));
        router.queued(&q, 2, &Bytes::from_static(b"y"));
        assert_eq!(rx.recv().await.map(|p| p.0), Some(1));
        assert!(a.lag.lagged.load(Ordering::Acquire), "second entry did not fit");
    }

    #[tokio::test]
    async fn second_login_replaces_first() {
        let router = Router::default();
        let q = QueueKey::new("bob", 1);
        let (first, _rx1) = router.attach(q.clone(), 4);
        let (second, _rx2) = router.attach(q.clone(), 4);
        assert!(first.replaced.is_cancelled());
        drop(first);
        assert_eq!(router.online(), 1, "dropping the replaced session keeps the new one");
        drop(second);
        assert_eq!(router.online(), 0);
    }
}
