//! Presence and typing: who is online, when they were last seen, who is
//! typing to whom. Ephemeral by design: nothing here is queued or pushed,
//! and the only thing stored is a user's last-seen time, to the minute.
//!
//! Each broker keeps which devices of which users are online, as far as it
//! knows: its own sessions, and the `PresenceChange`s the other members
//! broadcast when one of theirs logs in or out. Sessions watch users
//! (`WatchPresence`); a change of a watched user goes to each watching
//! session as a QUIC datagram, if the two users share presence
//! ([`Account::shares_presence_with`]: each allows the other and neither
//! chose nobody), checked again at every change so a setting takes effect
//! at once. Typing is relayed the same way, to the recipient's online
//! devices only, and only between users who share presence.
//!
//! A broker that starts learns remote users' presence from their next
//! change (a restarted broker shows a user connected elsewhere as offline
//! until then).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use prost::Message as _;
use tern_protocol::pb;

use crate::router::{Notice, Router};
use crate::store::{now_ms, Account, QueueKey, Store};
use crate::Context;

/// Last-seen times are kept to the minute.
const LAST_SEEN_RESOLUTION_MS: u64 = 60_000;

/// `ms` rounded down to the resolution of a last-seen time.
pub(crate) fn coarse(ms: u64) -> u64 {
    ms - ms % LAST_SEEN_RESOLUTION_MS
}

/// Cheap, cloneable handle to a broker's presence state.
#[derive(Debug, Clone, Default)]
pub(crate) struct Presence {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Sessions of each online device of each user, here and as the
    /// other members told: counted, since a device that logs in again
    /// ends its old session after its new one began.
    online: Mutex<HashMap<String, HashMap<u32, u32>>>,
    /// Last seen (to the minute) of users gone offline while known here.
    last_seen: Mutex<HashMap<String, u64>>,
    /// Watched user -> the device sessions watching them.
    watchers: Mutex<HashMap<String, HashSet<QueueKey>>>,
    /// Watching device session -> the users it watches.
    watching: Mutex<HashMap<QueueKey, Vec<String>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Presence {
    /// Records a device going online (`true`) or offline; returns whether
    /// the user's own state changed (first device on, last device off).
    pub(crate) fn device_changed(&self, handle: &str, device: u32, online: bool, last_seen_ms: u64) -> bool {
        let mut all = lock(&self.inner.online);
        let devices = all.entry(handle.to_owned()).or_default();
        let was = !devices.is_empty();
        if online {
            *devices.entry(device).or_default() += 1;
        } else if let Some(n) = devices.get_mut(&device) {
            *n -= 1;
            if *n == 0 {
                devices.remove(&device);
            }
        }
        let now = !devices.is_empty();
        if !now {
            all.remove(handle);
            lock(&self.inner.last_seen).insert(handle.to_owned(), last_seen_ms);
        }
        was != now
    }

    /// The state of `handle` as known here (`visible` set).
    pub(crate) fn state(&self, handle: &str, stored_last_seen: Option<u64>) -> pb::PresenceState {
        let online = lock(&self.inner.online).get(handle).is_some_and(|d| !d.is_empty());
        let heard = lock(&self.inner.last_seen).get(handle).copied();
        let last_seen_ms = if online { 0 } else { heard.max(stored_last_seen).unwrap_or(0) };
        pb::PresenceState { handle: handle.to_owned(), visible: true, online, last_seen_ms }
    }

    /// Makes `watcher`'s session watch exactly `handles`.
    pub(crate) fn watch(&self, watcher: &QueueKey, handles: Vec<String>) {
        self.unwatch(watcher);
        let mut watchers = lock(&self.inner.watchers);
        for h in &handles {
            watchers.entry(h.clone()).or_default().insert(watcher.clone());
        }
        lock(&self.inner.watching).insert(watcher.clone(), handles);
    }

    /// Ends `watcher`'s watch (its session ended).
    pub(crate) fn unwatch(&self, watcher: &QueueKey) {
        let Some(old) = lock(&self.inner.watching).remove(watcher) else { return };
        let mut watchers = lock(&self.inner.watchers);
        for h in old {
            if let Some(set) = watchers.get_mut(&h) {
                set.remove(watcher);
                if set.is_empty() {
                    watchers.remove(&h);
                }
            }
        }
    }

    /// The device sessions here watching `handle`.
    pub(crate) fn watchers_of(&self, handle: &str) -> Vec<QueueKey> {
        lock(&self.inner.watchers).get(handle).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// Sends `state` of `subject` to each session here watching it whose
    /// user shares presence with `subject` (accounts from `account`).
    pub(crate) fn tell_watchers(
        &self,
        router: &Router,
        subject: &Account,
        state: &pb::PresenceState,
        account: impl Fn(&str) -> Option<Arc<Account>>,
    ) {
        let datagram = datagram(pb::datagram::Kind::Presence(state.clone()));
        for watcher in self.watchers_of(&subject.handle) {
            if account(watcher.handle()).is_some_and(|w| w.shares_presence_with(subject)) {
                router.notify(&watcher, Notice::Datagram(datagram.clone()));
            }
        }
    }
}

/// `queue`'s device logged in (`online`) or its session ended here: the
/// watchers here are told if its user's state changed, its last-seen time
/// is stored, and the other members are told.
pub(crate) fn changed(ctx: &Context, queue: &QueueKey, online: bool) {
    let last_seen = if online { 0 } else { last_seen_now() };
    if ctx.presence.device_changed(queue.handle(), queue.device(), online, last_seen) {
        tell(&ctx.store, &ctx.router, &ctx.presence, queue.handle());
    }
    if !online {
        ctx.store.set_last_seen(queue.handle(), last_seen);
    }
    if let Some(mesh) = &ctx.mesh {
        mesh.broadcast_presence(queue, online, last_seen);
    }
}

/// Tells the sessions here watching `handle` its state now.
pub(crate) fn tell(store: &Store, router: &Router, presence: &Presence, handle: &str) {
    if presence.watchers_of(handle).is_empty() {
        return;
    }
    let Ok(Some(subject)) = store.account(handle) else { return };
    let state = presence.state(handle, store.last_seen(handle));
    presence.tell_watchers(router, &subject, &state, |h| store.account(h).ok().flatten());
}

/// An encoded `Datagram`.
pub(crate) fn datagram(kind: pb::datagram::Kind) -> Bytes {
    pb::Datagram { kind: Some(kind) }.encode_to_vec().into()
}

/// A device going offline now: its last-seen time.
pub(crate) fn last_seen_now() -> u64 {
    coarse(now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_is_online_while_any_device_is_and_last_seen_is_kept_to_the_minute() {
        let p = Presence::default();
        assert!(p.device_changed("alice", 1, true, 0), "first device on");
        assert!(!p.device_changed("alice", 2, true, 0), "second: no change");
        assert!(!p.device_changed("alice", 1, false, 120_000), "one still on");
        assert!(p.state("alice", None).online);
        assert!(!p.device_changed("alice", 2, true, 0), "device 2 logs in again");
        assert!(!p.device_changed("alice", 2, false, 150_000), "its old session ends: still online");
        assert!(p.state("alice", None).online);
        assert!(p.device_changed("alice", 2, false, 180_000), "last device off");
        let s = p.state("alice", Some(60_000));
        assert_eq!((s.online, s.last_seen_ms), (false, 180_000), "the later of heard and stored");
        assert_eq!(p.state("bob", Some(60_000)).last_seen_ms, 60_000);
        assert_eq!(coarse(1_796_592_097_634), 1_796_592_060_000);
    }

    #[test]
    fn a_watch_replaces_the_previous_one_and_ends_with_the_session() {
        let p = Presence::default();
        let (a, b) = (QueueKey::new("alice", 1), QueueKey::new("bob", 1));
        p.watch(&a, vec!["carol".into(), "dan".into()]);
        p.watch(&b, vec!["carol".into()]);
        p.watch(&a, vec!["dan".into()]);
        assert_eq!(p.watchers_of("carol"), vec![b.clone()]);
        assert_eq!(p.watchers_of("dan"), vec![a.clone()]);
        p.unwatch(&a);
        assert!(p.watchers_of("dan").is_empty());
    }
}
