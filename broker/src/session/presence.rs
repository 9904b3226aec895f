//! A session's presence requests: who may see its user (`SetPresence`,
//! decided at the handle's primary in a mesh like every account change),
//! which users it watches (`WatchPresence`), and the typing datagrams its
//! device sends, relayed to the recipient's online devices.

use std::sync::Arc;

use prost::Message as _;
use tern_protocol::pb::{self, server_frame::Kind as S};
use tern_protocol::ErrorCode;

use super::{auth, Session};
use crate::presence::datagram;
use crate::router::Notice;
use crate::store::{Account, QueueKey, MAX_ALLOWED};

fn settings(account: &Account) -> pb::PresenceSettings {
    let s = account.presence.clone().unwrap_or_default();
    let visibility =
        if s.nobody { pb::PresenceVisibility::Nobody } else { pb::PresenceVisibility::Conversations } as i32;
    pb::PresenceSettings { visibility, allowed: s.allowed }
}

/// The state a watcher is told of a user it may not see.
fn hidden(handle: &str) -> pb::PresenceState {
    pb::PresenceState { handle: handle.to_owned(), ..Default::default() }
}

impl Session {
    pub(super) async fn set_presence(&mut self, request_id: u64, update: pb::SetPresence) {
        let Some(d) = &self.device else { return };
        let handle = d.delivery.queue.handle().to_owned();
        if update.allow.len() + update.disallow.len() > 2 * MAX_ALLOWED {
            self.write_error(request_id, ErrorCode::InvalidArgument, "too many users in one change");
            return;
        }
        if let Some(bad) = update.allow.iter().find(|h| tern_protocol::validate_handle(h).is_err()) {
            self.write_error(request_id, ErrorCode::InvalidHandle, &format!("{bad:?} is not a handle"));
            return;
        }
        let result = match &self.ctx.mesh {
            Some(mesh) => mesh.set_presence(&handle, update).await,
            None => self.ctx.store.set_presence(&handle, update).await,
        };
        match result {
            Ok(account) => {
                self.write(request_id, S::PresenceSettings(settings(&account)));
                // Who may see this user changed: its watchers learn at once.
                crate::presence::tell(&self.ctx.store, &self.ctx.router, &self.ctx.presence, &handle);
            }
            Err(e) => self.refuse(request_id, auth::store_refusal(&e).into()),
        }
    }

    pub(super) async fn watch_presence(&mut self, request_id: u64, handles: Vec<String>) {
        let Some(d) = &self.device else { return };
        let me = d.delivery.queue.clone();
        if handles.len() > MAX_ALLOWED {
            let text = format!("at most {MAX_ALLOWED} users may be watched");
            self.write_error(request_id, ErrorCode::InvalidArgument, &text);
            return;
        }
        if let Err(limited) = self.limit(&self.ctx.rate.lookups, || me.clone()) {
            self.refuse(request_id, limited.into());
            return;
        }
        let mine = match self.accounts().account(me.handle()).await {
            Ok(Some(a)) => a,
            Ok(None) => return self.write_error(request_id, ErrorCode::UnknownDevice, "no account"),
            Err(e) => return self.refuse(request_id, auth::store_refusal(&e).into()),
        };
        let mut states = Vec::with_capacity(handles.len());
        for handle in &handles {
            let theirs = self.ctx.store.account(handle).ok().flatten();
            states.push(match theirs {
                Some(t) if mine.shares_presence_with(&t) => {
                    self.ctx.presence.state(handle, self.ctx.store.last_seen(handle))
                }
                _ => hidden(handle),
            });
        }
        self.ctx.presence.watch(&me, handles);
        self.write(request_id, S::PresenceList(pb::PresenceList { states }));
    }

    /// A datagram from the device: a typing notice, relayed to the
    /// recipient's online devices if the two share presence; anything else
    /// (or from a stranger) is dropped. Never stored.
    pub(super) fn on_datagram(&mut self, bytes: &[u8]) {
        let Some(d) = &self.device else { return };
        let me = d.delivery.queue.clone();
        let Ok(pb::Datagram { kind: Some(pb::datagram::Kind::Typing(typing)) }) = pb::Datagram::decode(bytes) else {
            metrics::counter!("tern_datagrams_dropped_total", "why" => "malformed").increment(1);
            return;
        };
        if self.limit(&self.ctx.rate.sends, || me.clone()).is_err() {
            metrics::counter!("tern_datagrams_dropped_total", "why" => "rate").increment(1);
            return;
        }
        let store = &self.ctx.store;
        let (Ok(Some(mine)), Ok(Some(theirs))) = (store.account(me.handle()), store.account(&typing.to)) else {
            return;
        };
        if !mine.shares_presence_with(&theirs) {
            metrics::counter!("tern_datagrams_dropped_total", "why" => "not_shared").increment(1);
            return;
        }
        metrics::counter!("tern_typing_relayed_total").increment(1);
        let relayed = pb::Typing {
            to: typing.to.clone(),
            typing: typing.typing,
            from: me.handle().to_owned(),
            from_device: me.device(),
        };
        self.relay(&theirs, datagram(pb::datagram::Kind::Typing(relayed)));
    }

    /// Sends `datagram` to every device of `to` that is online: here
    /// through the router, elsewhere through the mesh.
    fn relay(&self, to: &Arc<Account>, datagram: bytes::Bytes) {
        for device in &to.devices {
            let queue = QueueKey::new(&to.handle, device.id);
            if self.ctx.router.notify(&queue, Notice::Datagram(datagram.clone())) {
                continue;
            }
            if let Some(mesh) = &self.ctx.mesh {
                if !self.ctx.router.is_attached(&queue) {
                    mesh.relay_datagram(queue, datagram.clone());
                }
            }
        }
    }
}
