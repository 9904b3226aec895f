//! End-to-end encryption through a real broker with `tern_client::secure`:
//! every device of a user with three decrypts every message and the
//! sender's other devices get copies; nothing the broker writes holds a
//! plaintext; a send made for an old device list is encrypted again; a
//! restarted client keeps decrypting; a broken session recovers.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::TIMEOUT;
use tern_broker::Broker;
use tern_client::secure::{Persistence, Secure, SecureIncoming};
use tern_client::{Client, ClientConfig, Identity};

fn client_config(broker: &Broker) -> ClientConfig {
    let mut c = ClientConfig::new(vec![broker.local_addr().to_string()], broker.cert_path());
    c.backoff_min = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    c
}

/// A device: its identity and its end-to-end state directory.
struct Device {
    identity: Identity,
    dir: PathBuf,
}

impl Device {
    async fn open(&self, broker: &Broker) -> Secure {
        let client = Client::connect(client_config(broker), self.identity.clone()).await.expect("login");
        Secure::open(client, &self.dir, Persistence::Shared).await.expect("e2e state")
    }
}

async fn register(broker: &Broker, root: &Path, handle: &str) -> (Secure, Device) {
    let (client, identity) = Client::register(client_config(broker), handle, None).await.expect("register");
    let dir = root.join(format!("{handle}-1"));
    let secure = Secure::open(client, &dir, Persistence::Shared).await.expect("e2e state");
    (secure, Device { identity, dir })
}

async fn link(broker: &Broker, root: &Path, approver: &Device) -> (Secure, Device) {
    let key = tern_client::generate_key();
    let approval = approver.identity.approve(&key.verifying_key().to_bytes(), Duration::from_secs(60));
    let handle = approver.identity.handle.clone();
    let (client, identity) = Client::link_device(client_config(broker), &handle, key, &approval).await.expect("link");
    let dir = root.join(format!("{handle}-{}", identity.device_id));
    let secure = Secure::open(client, &dir, Persistence::Shared).await.expect("e2e state");
    (secure, Device { identity, dir })
}

/// The next text message on `secure` (acking everything up to it), as
/// (from, from_device, text).
async fn next_text(secure: &Secure) -> (String, u32, String) {
    loop {
        let item = tokio::time::timeout(TIMEOUT, secure.recv()).await.expect("a delivery in time").expect("open");
        secure.ack(item.seq()).await;
        match item {
            SecureIncoming::Message { from, from_device, text, .. } => return (from, from_device, text),
            SecureIncoming::Failed { error, .. } => panic!("a message did not decrypt: {error}"),
            _ => {}
        }
    }
}

/// True when some file under `dir` holds `needle`.
fn any_file_holds(dir: &Path, needle: &[u8]) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().any(|e| {
        let path = e.path();
        if path.is_dir() {
            return any_file_holds(&path, needle);
        }
        std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_each_decrypt_every_message_and_the_broker_stores_no_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(&dir.path().join("broker")).await;
    let root = dir.path().join("devices");
    let (bob1, bob) = register(&broker, &root, "bob").await;
    let (bob2, _) = link(&broker, &root, &bob).await;
    let (bob3, _) = link(&broker, &root, &bob).await;
    let (alice1, alice) = register(&broker, &root, "alice").await;
    let (alice2, _) = link(&broker, &root, &alice).await;

    let texts: Vec<String> = (0..5).map(|i| format!("plaintext-secret-{i}-{}", "x".repeat(40))).collect();
    for t in &texts {
        alice1.send_text("bob", t).await.expect("sent");
    }
    bob2.send_text("alice", "reply-secret-from-bob2").await.expect("sent");
    for (name, device) in [("bob1", &bob1), ("bob2", &bob2), ("bob3", &bob3), ("alice2", &alice2)] {
        for t in &texts {
            assert_eq!(next_text(device).await, ("alice".into(), 1, t.clone()), "{name}");
        }
    }
    for device in [&alice1, &alice2, &bob1, &bob3] {
        assert_eq!(next_text(device).await, ("bob".into(), 2, "reply-secret-from-bob2".into()));
    }
    broker.store().close();
    let data = dir.path().join("broker");
    for t in texts.iter().map(String::as_str).chain(["reply-secret-from-bob2"]) {
        assert!(!any_file_holds(&data, t.as_bytes()), "the broker wrote {t:?} in the clear");
    }
    assert!(!any_file_holds(&data, b"plaintext-secret"), "nor any part of it");
    for device in [bob1, bob2, bob3, alice1, alice2] {
        device.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_made_for_an_old_device_list_is_encrypted_again_for_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(&dir.path().join("broker")).await;
    let root = dir.path().join("devices");
    let (bob1, bob) = register(&broker, &root, "bob").await;
    let (alice1, _) = register(&broker, &root, "alice").await;
    alice1.send_text("bob", "first").await.expect("sent");
    assert_eq!(next_text(&bob1).await.2, "first");
    // alice1 holds bob's list with one device; bob links a second.
    let (bob2, _) = link(&broker, &root, &bob).await;
    let sent = alice1.send_text("bob", "second").await.expect("refused once, then sent for the new list");
    assert_eq!(sent.recipients, 2, "both of bob's devices");
    assert_eq!(next_text(&bob1).await.2, "second");
    assert_eq!(next_text(&bob2).await.2, "second", "the new device decrypts it");
    // Unlinked, a device gets nothing more and the sender follows.
    bob1.client().unlink(bob2.client().identity().device_id).await.expect("unlinked");
    let sent = alice1.send_text("bob", "third").await.expect("sent");
    assert_eq!(sent.recipients, 1);
    assert_eq!(next_text(&bob1).await.2, "third");
    for device in [bob1, bob2, alice1] {
        device.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_client_keeps_decrypting_and_a_broken_session_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(&dir.path().join("broker")).await;
    let root = dir.path().join("devices");
    let (bob1, bob) = register(&broker, &root, "bob").await;
    let (alice1, alice) = register(&broker, &root, "alice").await;
    for i in 0..3 {
        alice1.send_text("bob", &format!("before {i}")).await.unwrap();
        assert_eq!(next_text(&bob1).await.2, format!("before {i}"));
        bob1.send_text("alice", &format!("answer {i}")).await.unwrap();
        assert_eq!(next_text(&alice1).await.2, format!("answer {i}"));
    }
    // Both restart mid-conversation: the sessions come back from disk.
    bob1.close().await;
    alice1.close().await;
    let (bob1, alice1) = (bob.open(&broker).await, alice.open(&broker).await);
    alice1.send_text("bob", "after the restart").await.unwrap();
    assert_eq!(next_text(&bob1).await.2, "after the restart");

    // Bob's session with alice breaks (its state lost it).
    {
        let mut state = tern_client::e2e::E2e::open(&bob.dir).unwrap();
        state.forget_sessions("alice", 1);
        state.save().unwrap();
    }
    let sent = alice1.send_text("bob", "on a broken session").await.unwrap();
    let item = tokio::time::timeout(TIMEOUT, bob1.recv()).await.unwrap().unwrap();
    let SecureIncoming::Failed { id, .. } = &item else { panic!("expected a failure to decrypt, got {item:?}") };
    assert_eq!(*id, sent.message_id);
    bob1.ack(item.seq()).await;
    // Alice's client answers the recovery request while it receives.
    let alice_recv = {
        let alice1 = alice1.clone();
        tokio::spawn(async move {
            // The delivered receipt of the message bob could not read comes first.
            loop {
                let item = tokio::time::timeout(TIMEOUT, alice1.recv()).await.unwrap().unwrap();
                alice1.ack(item.seq()).await;
                if !matches!(item, SecureIncoming::Receipt(_)) {
                    return item;
                }
            }
        })
    };
    let item = tokio::time::timeout(TIMEOUT, bob1.recv()).await.unwrap().unwrap();
    match &item {
        SecureIncoming::Message { id, text, .. } => {
            assert_eq!((id, text.as_str()), (&sent.message_id, "on a broken session"), "under its original id");
        }
        other => panic!("expected the message sent again, got {other:?}"),
    }
    bob1.ack(item.seq()).await;
    assert!(matches!(alice_recv.await.unwrap(), SecureIncoming::Handled { .. }));
    alice1.send_text("bob", "and on").await.unwrap();
    assert_eq!(next_text(&bob1).await.2, "and on");
    bob1.close().await;
    alice1.close().await;
}

/// `Secure::recv` raced against a timer that nearly always wins (as a
/// `select!` against an ack timer does) loses nothing: a delivery taken
/// and not yet handed out when the race is lost comes out of the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recv_cancelled_mid_way_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(&dir.path().join("broker")).await;
    let root = dir.path().join("devices");
    let (bob1, _) = register(&broker, &root, "bob").await;
    let (alice1, _) = register(&broker, &root, "alice").await;
    let texts: Vec<String> = (0..20).map(|i| format!("raced {i}")).collect();
    for t in &texts {
        alice1.send_text("bob", t).await.unwrap();
    }
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while got.len() < texts.len() && tokio::time::Instant::now() < deadline {
        // Cancelled at its first wait nearly every time.
        let Ok(Some(item)) = tokio::time::timeout(Duration::from_micros(50), bob1.recv()).await else { continue };
        bob1.ack(item.seq()).await;
        if let SecureIncoming::Message { text, .. } = item {
            got.push(text);
        }
    }
    assert_eq!(got, texts, "every message, once, in order");
    bob1.close().await;
    alice1.close().await;
}
