//! A session's profile requests: `SetProfile` for its own user (decided at
//! the handle's primary in a mesh, which copies the account record, profile
//! and all, to every member: their cached copies change with it), and
//! `GetProfile` for anyone's, read from the account record held here or
//! fetched from the other members.

use tern_protocol::pb::{self, server_frame::Kind as S};
use tern_protocol::ErrorCode;

use super::{auth, Session};
use crate::store::Account;

/// Most characters of a display name.
const MAX_NAME_CHARS: usize = 64;
/// Most characters of a status text.
const MAX_STATUS_CHARS: usize = 140;
/// Most bytes of a picture reference.
const MAX_PICTURE_BYTES: usize = 256;

/// Checks a profile change: lengths, and no control characters.
pub(crate) fn check(update: &pb::SetProfile) -> Result<(), String> {
    let field = |value: &Option<String>, what: &str, max: usize, chars: bool| -> Result<(), String> {
        let Some(v) = value else { return Ok(()) };
        let len = if chars { v.chars().count() } else { v.len() };
        if len > max {
            let unit = if chars { "characters" } else { "bytes" };
            return Err(format!("{what} has {len} {unit}, more than {max}"));
        }
        if v.chars().any(char::is_control) {
            return Err(format!("{what} holds a control character"));
        }
        Ok(())
    };
    field(&update.name, "name", MAX_NAME_CHARS, true)?;
    field(&update.status, "status", MAX_STATUS_CHARS, true)?;
    field(&update.picture, "picture", MAX_PICTURE_BYTES, false)
}

/// The `Profile` frame of an account.
pub(crate) fn frame(account: &Account) -> pb::Profile {
    let p = account.profile.clone().unwrap_or_default();
    pb::Profile {
        handle: account.handle.clone(),
        name: p.name,
        status: p.status,
        picture: p.picture,
        updated_at_ms: p.updated_at_ms,
    }
}

impl Session {
    pub(super) async fn set_profile(&mut self, request_id: u64, update: pb::SetProfile) {
        let Some(d) = &self.device else { return };
        let handle = d.delivery.queue.handle().to_owned();
        if let Err(text) = check(&update) {
            self.write_error(request_id, ErrorCode::InvalidArgument, &text);
            return;
        }
        let result = match &self.ctx.mesh {
            Some(mesh) => mesh.set_profile(&handle, update).await,
            None => self.ctx.store.set_profile(&handle, update).await,
        };
        match result {
            Ok(account) => self.write(request_id, S::Profile(frame(&account))),
            Err(e) => self.refuse(request_id, auth::store_refusal(&e).into()),
        }
    }

    pub(super) async fn get_profile(&mut self, request_id: u64, handle: &str) {
        if let Some(account) = self.looked_up(request_id, handle).await {
            self.write(request_id, S::Profile(frame(&account)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(name: Option<&str>, status: Option<&str>, picture: Option<&str>) -> pb::SetProfile {
        pb::SetProfile { name: name.map(Into::into), status: status.map(Into::into), picture: picture.map(Into::into) }
    }

    #[test]
    fn profile_fields_are_bounded_and_printable() {
        assert!(check(&update(Some("Zoë 🦜"), Some(&"é".repeat(140)), Some(&"a".repeat(256)))).is_ok());
        assert!(check(&update(Some(&"n".repeat(65)), None, None)).unwrap_err().contains("name"));
        assert!(check(&update(None, Some(&"s".repeat(141)), None)).unwrap_err().contains("status"));
        assert!(check(&update(None, None, Some(&"é".repeat(129)))).unwrap_err().contains("bytes"));
        assert!(check(&update(Some("bad\nname"), None, None)).unwrap_err().contains("control"));
        assert!(check(&update(None, None, None)).is_ok(), "nothing to change");
    }
}
