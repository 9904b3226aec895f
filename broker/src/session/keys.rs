//! A session's key requests: `PublishKeys` for its own device, `ClaimKeys`
//! for the devices of another user (or of its own). Both are decided where
//! the handle's keys are kept (`crate::keys`): here when standalone, at the
//! handle's primary in a mesh.

use std::time::Instant;

use tern_protocol::pb::{self, server_frame::Kind as S};
use tern_protocol::ErrorCode;

use super::Session;
use crate::keys::KeyService;

impl Session {
    fn key_service(&self) -> KeyService<'_> {
        KeyService { store: &self.ctx.store, router: &self.ctx.router, mesh: self.ctx.mesh.as_ref() }
    }

    pub(super) async fn publish_keys(&mut self, request_id: u64, req: pb::PublishKeys) {
        let Some(d) = &self.device else { return };
        let queue = d.delivery.queue.clone();
        let result = match &self.ctx.mesh {
            Some(mesh) => mesh.publish_keys(&queue, req).await,
            None => self.key_service().publish_here(&queue, req).await,
        };
        match result {
            Ok(published) => self.write(request_id, S::KeysPublished(published)),
            Err((code, text)) => self.write_error(request_id, code, &text),
        }
    }

    pub(super) async fn claim_keys(&mut self, request_id: u64, req: pb::ClaimKeys) {
        let Some(d) = &self.device else { return };
        let requester = d.delivery.queue.clone();
        if let Err(e) = tern_protocol::validate_handle(&req.handle) {
            self.write_error(request_id, ErrorCode::InvalidHandle, &e.to_string());
            return;
        }
        let key = || (requester.clone(), req.handle.clone());
        if let Err(limited) = self.limit(&self.ctx.rate.key_claims, key) {
            self.refuse(request_id, limited.into());
            return;
        }
        let started = Instant::now();
        let result = match &self.ctx.mesh {
            Some(mesh) => mesh.claim_keys(&requester, &req.handle, &req.devices).await,
            None => self.key_service().claim_here(&requester, &req.handle, &req.devices).await,
        };
        metrics::histogram!("tern_key_claim_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(claimed) => self.write(request_id, S::KeysClaimed(claimed)),
            Err((code, text)) => self.write_error(request_id, code, &text),
        }
    }
}
