//! A data directory whose filesystem fills up during sends: the sends that
//! do not fit fail with `STORAGE_FULL`, nothing acknowledged is lost, and
//! the broker takes sends again once space is freed, without a restart.
//!
//! The test mounts its own tmpfs (it must run as root, as CI does): the
//! free-space floor is off (`min_free_disk_mb = 0`), so RocksDB's own writes
//! hit the full disk. RocksDB resumes writing by itself once the free space
//! is above what its memtables may need to flush (128 MiB by default), so
//! the filesystem is larger than that.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use tern_protocol::pb::server_frame::Kind as S;
use tern_protocol::ErrorCode;

/// A tmpfs of `size_mb` mounted in a temp directory, unmounted on drop.
struct SmallFs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size_mb: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tern-disk-full"])
            .arg(&mnt)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and must run as root: mount said {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Self { mnt, _dir: dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// Writes `path` until the filesystem is full but for about `leave` bytes.
fn fill(path: &Path, leave: u64) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 64 << 10];
    loop {
        let stat = rustix::fs::statvfs(path).unwrap();
        let free = stat.f_bavail * stat.f_frsize;
        if free <= leave + chunk.len() as u64 {
            break;
        }
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    f.sync_all().unwrap();
}

#[tokio::test]
async fn a_full_disk_fails_sends_with_storage_full_loses_nothing_acked_and_recovers_when_space_returns() {
    let fs = SmallFs::mount(320);
    let data = fs.mnt.join("data");
    let filler = fs.mnt.join("filler");
    let broker = start(&data).await;
    let (mut alice, _) = user(&broker, "alice").await;
    let (bob, bob_key) = user(&broker, "bob").await;
    drop(bob);

    // Leave room for a few hundred messages, then keep sending into the
    // full disk.
    fill(&filler, 1 << 20);
    let body = vec![0x42u8; 4096];
    let mut acked = Vec::new();
    let mut full = 0;
    for n in 1..=2_000u64 {
        match alice.send_msg("bob", mid(n), &body).await {
            S::SendAck(_) => acked.push(n),
            S::Error(e) => {
                assert_eq!(e.code(), ErrorCode::StorageFull, "a full disk is STORAGE_FULL: {e:?}");
                full += 1;
                if full == 20 {
                    break;
                }
            }
            other => panic!("send {n}: {other:?}"),
        }
    }
    assert_eq!(full, 20, "the disk filled up: {} sends acked and none refused", acked.len());
    assert!(!acked.is_empty(), "some sends fit before the disk was full");

    // Space comes back: sends are taken again within a bounded time.
    std::fs::remove_file(&filler).unwrap();
    let mut n = 10_000;
    let recovered = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        n += 1;
        match alice.send_msg("bob", mid(n), &body).await {
            S::SendAck(_) => {
                acked.push(n);
                break;
            }
            S::Error(e) if e.code() == ErrorCode::StorageFull => {
                assert!(tokio::time::Instant::now() < recovered, "still STORAGE_FULL 60 s after space returned");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => panic!("send {n} after space returned: {other:?}"),
        }
    }
    for _ in 0..10 {
        n += 1;
        assert!(matches!(alice.send_msg("bob", mid(n), &body).await, S::SendAck(_)), "send {n} after recovery");
        acked.push(n);
    }
    drop(alice);
    broker.shutdown().await;

    // After a restart bob gets every acknowledged message once, in order.
    let broker = start(&data).await;
    let mut bob = Raw::connect(&broker).await;
    match bob.login("bob", 1, &bob_key).await {
        S::LoginOk(ok) => assert_eq!(ok.pending, acked.len() as u64, "every acked send is stored"),
        other => panic!("bob's login: {other:?}"),
    }
    let mut got = Vec::new();
    while got.len() < acked.len() {
        let d = tokio::time::timeout(TIMEOUT, bob.deliver()).await.expect("a delivery").expect("open");
        let id = message_of(&d).message_id.clone();
        got.push(u64::from_be_bytes(id[..8].try_into().unwrap()));
        bob.ack(d.seq).await;
    }
    assert_eq!(got, acked, "bob gets what was acked, once, in order");
    broker.shutdown().await;
}
