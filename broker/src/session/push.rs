//! A session's push registration: `RegisterPush` records the device's Web
//! Push subscription in its account (at the handle's primary in a mesh, so
//! every member can wake the device), after checking it: https to a public
//! address unless `push.allow_private_endpoints`, and keys that encrypt.
//! `UnregisterPush` clears it.

use std::net::IpAddr;

use tern_protocol::pb::{self, server_frame::Kind as S};
use tern_protocol::ErrorCode;

use super::{auth, Session};
use crate::store::{now_ms, PushSubscription};

/// Longest endpoint URL accepted.
const MAX_ENDPOINT_LEN: usize = 2048;

/// True for an address a user must not make the broker call.
fn private(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast()
        }
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || v6.is_unique_local() || v6.is_unicast_link_local(),
    }
}

/// Checks an endpoint's scheme and (resolved) address.
async fn check_endpoint(endpoint: &str, allow_private: bool) -> Result<(), String> {
    if endpoint.len() > MAX_ENDPOINT_LEN {
        return Err(format!("the endpoint is longer than {MAX_ENDPOINT_LEN} bytes"));
    }
    let uri: http::Uri = endpoint.parse().map_err(|e| format!("the endpoint is not a URL: {e}"))?;
    let https = uri.scheme_str() == Some("https");
    let http_allowed = allow_private && uri.scheme_str() == Some("http");
    if !(https || http_allowed) {
        return Err("the endpoint must be an https URL".into());
    }
    let host = uri.host().ok_or("the endpoint has no host")?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    if allow_private {
        return Ok(());
    }
    let addrs = tokio::net::lookup_host((host, port)).await.map_err(|e| format!("cannot resolve {host}: {e}"))?;
    for addr in addrs {
        if private(addr.ip()) {
            return Err(format!("the endpoint's address {} is not public", addr.ip()));
        }
    }
    Ok(())
}

impl Session {
    pub(super) async fn register_push(&mut self, request_id: u64, req: Option<pb::RegisterPush>) {
        let Some(d) = &self.device else { return };
        let queue = d.delivery.queue.clone();
        let Some(push) = self.ctx.push.clone() else {
            self.write_error(request_id, ErrorCode::PermissionDenied, "this broker sends no push wake-ups");
            return;
        };
        let subscription = match &req {
            Some(r) => {
                let allow_private = self.ctx.config.push.allow_private_endpoints;
                let checked = match crate::push::check_keys(&r.p256dh, &r.auth) {
                    Ok(_) => check_endpoint(&r.endpoint, allow_private).await,
                    Err(e) => Err(e),
                };
                if let Err(text) = checked {
                    self.write_error(request_id, ErrorCode::InvalidArgument, &text);
                    return;
                }
                PushSubscription {
                    at_ms: now_ms(),
                    endpoint: r.endpoint.clone(),
                    p256dh: hex::encode(&r.p256dh),
                    auth: hex::encode(&r.auth),
                }
            }
            None => PushSubscription {
                at_ms: now_ms(),
                endpoint: String::new(),
                p256dh: String::new(),
                auth: String::new(),
            },
        };
        let result = match &self.ctx.mesh {
            Some(mesh) => mesh.set_push(queue.handle(), queue.device(), subscription).await,
            None => self.ctx.store.set_push(queue.handle(), queue.device(), subscription).await,
        };
        match result {
            Ok(_) => {
                metrics::counter!("tern_push_registrations_total", "op" => if req.is_some() { "register" } else { "unregister" }).increment(1);
                let registered = req.is_some();
                let answer =
                    pb::PushRegistered { vapid_public_key: push.vapid_public_key().to_vec().into(), registered };
                self.write(request_id, S::PushRegistered(answer));
            }
            Err(e) => self.refuse(request_id, auth::store_refusal(&e).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_must_be_https_to_public_addresses_unless_allowed() {
        assert!(check_endpoint("http://push.example/x", false).await.unwrap_err().contains("https"));
        assert!(check_endpoint("https://127.0.0.1/x", false).await.unwrap_err().contains("not public"));
        assert!(check_endpoint("https://10.1.2.3:8443/x", false).await.unwrap_err().contains("not public"));
        assert!(check_endpoint("https://[::1]/x", false).await.unwrap_err().contains("not public"));
        assert!(
            check_endpoint("https://192.0.2.10/wake", false).await.is_ok(),
            "a public address (TEST-NET-1 is not private)"
        );
        assert!(check_endpoint("http://127.0.0.1:9/x", true).await.is_ok(), "allowed: tests, a local distributor");
        assert!(check_endpoint("ftp://127.0.0.1/x", true).await.is_err());
        assert!(check_endpoint(&format!("https://a.example/{}", "x".repeat(3000)), false).await.is_err());
    }
}
