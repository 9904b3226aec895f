//! The client library against a `tern-broker` process: a reader with no
//! room never stalls sends, and a broker killed with SIGKILL and restarted
//! loses nothing and duplicates nothing for the application.
//!
//! Needs `tern-broker` built next to `tern` (`cargo build --workspace --bins`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_client::{Client, ClientConfig, Incoming};

const TIMEOUT: Duration = Duration::from_secs(20);

struct Broker {
    child: Child,
    addr: String,
    dir: PathBuf,
}

impl Broker {
    fn start(dir: &Path, addr: Option<&str>) -> Self {
        let addr = match addr {
            Some(a) => a.to_owned(),
            None => {
                let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
                format!("127.0.0.1:{port}")
            }
        };
        let bin = PathBuf::from(env!("CARGO_BIN_EXE_tern")).with_file_name("tern-broker");
        assert!(bin.exists(), "{} missing: run `cargo build --workspace --bins` first", bin.display());
        let child = Command::new(bin)
            .args(["--listen", &addr, "--data-dir"])
            .arg(dir)
            .env("TERN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.join("tls/cert.pem").exists() {
            assert!(Instant::now() < deadline, "broker did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, addr, dir: dir.to_owned() }
    }

    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new(vec![self.addr.clone()], self.dir.join("tls/cert.pem"));
        c.backoff_min = Duration::from_millis(50);
        c.backoff_max = Duration::from_millis(500);
        // A killed broker is noticed by the idle timeout.
        c.idle_timeout = Duration::from_secs(2);
        c
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Registers `handle`, retrying while the broker is still starting.
async fn register(b: &Broker, handle: &str, buffer: usize) -> Client {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut config = b.config();
        config.incoming_buffer = buffer;
        match Client::register(config, handle, None).await {
            Ok((client, _)) => return client,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("register {handle}: {e}"),
        }
    }
}

/// The next message's text, acking receipts on the way.
async fn next_text(client: &Client) -> (u64, String) {
    loop {
        let item = tokio::time::timeout(TIMEOUT, client.recv()).await.expect("a delivery in time").expect("open");
        match item {
            Incoming::Message { seq, body, .. } => return (seq, String::from_utf8_lossy(&body).into_owned()),
            Incoming::Receipt { seq, .. } => client.ack(seq).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_without_room_does_not_stall_sends_and_gets_everything_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = Broker::start(dir.path(), None);
    let alice = register(&b, "alice", 1024).await;
    // Bob's buffer holds 4 deliveries and he does not read for a while.
    let bob = register(&b, "bob", 4).await;
    for n in 0..40 {
        alice.send("bob", format!("m{n:02}")).await.unwrap();
    }
    // His own sends still get their durable ack while 40 wait for him.
    let sent = tokio::time::timeout(TIMEOUT, bob.send("alice", "still here")).await.expect("not stalled");
    assert!(sent.is_ok(), "{sent:?}");

    let mut got = Vec::new();
    while got.len() < 40 {
        let (seq, text) = next_text(&bob).await;
        got.push(text);
        bob.ack(seq).await;
    }
    let want: Vec<String> = (0..40).map(|n| format!("m{n:02}")).collect();
    assert_eq!(got, want, "every message once, in order");
    let extra = tokio::time::timeout(Duration::from_millis(500), next_text(&bob)).await;
    assert!(extra.is_err(), "nothing more: {extra:?}");
    alice.close().await;
    bob.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_broker_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = Broker::start(dir.path(), None);
    let alice = register(&b, "alice", 1024).await;
    let bob = register(&b, "bob", 1024).await;
    for n in 0..10 {
        alice.send("bob", format!("m{n:02}")).await.unwrap();
    }
    // Bob processes the first five; he holds m05..m09 unacked.
    let mut got = Vec::new();
    for _ in 0..10 {
        let (seq, text) = next_text(&bob).await;
        if got.len() < 5 {
            bob.ack(seq).await;
        }
        got.push(text);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    b.kill();
    let sender = alice.clone();
    let during = tokio::spawn(async move {
        let mut receipts = Vec::new();
        for n in 10..20 {
            receipts.push(sender.send("bob", format!("m{n:02}")).await);
        }
        receipts
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let addr = b.addr.clone();
    let b = Broker::start(dir.path(), Some(&addr));
    for r in during.await.unwrap() {
        r.expect("a send made while the broker was down resolves after it is back");
    }
    // m05..m09 come again from the broker but were already handed over.
    let mut seen: HashSet<String> = got.iter().cloned().collect();
    while got.len() < 20 {
        let (seq, text) = next_text(&bob).await;
        assert!(seen.insert(text.clone()), "{text} handed to the application twice");
        got.push(text);
        bob.ack(seq).await;
    }
    let want: Vec<String> = (0..20).map(|n| format!("m{n:02}")).collect();
    assert_eq!(got, want);
    let extra = tokio::time::timeout(Duration::from_millis(500), next_text(&bob)).await;
    assert!(extra.is_err(), "nothing more: {extra:?}");
    drop(b);
}
