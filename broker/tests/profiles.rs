//! Profiles (the design's user service) through real brokers: set by the
//! user's devices, read by anyone, changed fields only, bounded fields
//! refused whole, and in a mesh read at another broker, whose copy changes
//! when the profile does.

mod common;

use common::cluster::TestCluster;
use common::{error_code, user, Raw};
use tern_protocol::pb::{self, client_frame::Kind as C, server_frame::Kind as S};
use tern_protocol::ErrorCode;

async fn set(raw: &mut Raw, name: Option<&str>, status: Option<&str>) -> S {
    let update = pb::SetProfile { name: name.map(Into::into), status: status.map(Into::into), picture: None };
    let id = raw.request(C::SetProfile(update)).await;
    raw.answer(id).await
}

async fn get(raw: &mut Raw, handle: &str) -> S {
    let id = raw.request(C::GetProfile(pb::GetProfile { handle: handle.into() })).await;
    raw.answer(id).await
}

fn profile(answer: S) -> pb::Profile {
    match answer {
        S::Profile(p) => p,
        other => panic!("expected a Profile, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_is_set_field_by_field_and_read_by_others() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(dir.path()).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let (mut bob, _) = user(&broker, "bob").await;
    let never = profile(get(&mut bob, "alice").await);
    assert_eq!((never.name.as_str(), never.updated_at_ms), ("", 0), "never set");

    let p = profile(set(&mut alice, Some("Alice A."), Some("at work")).await);
    assert_eq!((p.name.as_str(), p.status.as_str()), ("Alice A.", "at work"));
    let p = profile(set(&mut alice, None, Some("")).await);
    assert_eq!((p.name.as_str(), p.status.as_str()), ("Alice A.", ""), "the name kept, the status cleared");
    let seen = profile(get(&mut bob, "alice").await);
    assert_eq!(seen, p, "bob reads what alice set");
    assert!(seen.updated_at_ms > 0);

    let long = "n".repeat(65);
    assert_eq!(error_code(&set(&mut alice, Some(&long), Some("x")).await), Some(ErrorCode::InvalidArgument));
    assert_eq!(profile(get(&mut bob, "alice").await), p, "refused whole: the status did not change either");
    assert_eq!(error_code(&get(&mut bob, "nobody").await), Some(ErrorCode::UnknownRecipient));
    // It survives a restart (it is part of the account record).
    drop((alice, bob));
    broker.shutdown().await;
    let broker = tern_broker::Broker::spawn(common::config(dir.path())).await.unwrap();
    let (mut carol, _) = user(&broker, "carol").await;
    assert_eq!(profile(get(&mut carol, "alice").await), p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_changed_at_one_broker_is_read_changed_at_another() {
    let cluster = TestCluster::spawn(2).await;
    let (mut alice, _) = user(cluster.broker(0), "alice").await;
    let (mut bob, _) = user(cluster.broker(1), "bob").await;
    profile(set(&mut alice, Some("Alice"), Some("first")).await);
    assert_eq!(profile(get(&mut bob, "alice").await).status, "first");
    let changed = profile(set(&mut alice, None, Some("second")).await);
    // The primary copied the record to every member before answering: the
    // other broker's cached copy is the new one at once.
    let seen = profile(get(&mut bob, "alice").await);
    assert_eq!(seen, changed);
    assert_eq!((seen.name.as_str(), seen.status.as_str()), ("Alice", "second"));
    cluster.shutdown().await;
}
