//! End to end through the binaries: a `tern-broker` process and two `tern`
//! profiles exchanging messages, online and offline, with JSON output,
//! receipts, timeouts (`inf` included), device linking, device lists with
//! human dates, and clear errors.
//!
//! Needs `tern-broker` built next to `tern` (`cargo build --workspace --bins`,
//! which `scripts/test.sh` runs first).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Broker {
    child: Child,
    addr: String,
    ca: PathBuf,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn broker_bin() -> PathBuf {
    let tern = PathBuf::from(env!("CARGO_BIN_EXE_tern"));
    let path = tern.with_file_name("tern-broker");
    assert!(path.exists(), "{} missing: run `cargo build --workspace --bins` first", path.display());
    path
}

fn start_broker(dir: &Path) -> Broker {
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(broker_bin())
        .args(["--listen", &addr, "--data-dir"])
        .arg(dir)
        .env("TERN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ca = dir.join("tls/cert.pem");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ca.exists() {
        assert!(Instant::now() < deadline, "broker did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    Broker { child, addr, ca }
}

fn tern(b: &Broker, profile: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--broker", &b.addr, "--ca"])
        .arg(&b.ca)
        .arg("--profile")
        .arg(profile)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "exit {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn two_profiles_exchange_messages_through_the_broker_binary() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_broker(&dir.path().join("broker"));
    let alice = dir.path().join("alice");
    let bob = dir.path().join("bob");
    assert_eq!(ok(tern(&b, &alice, &["register", "alice"])).trim(), "registered alice (device 1)");
    ok(tern(&b, &bob, &["register", "bob"]));

    // Offline: sent before bob listens; send prints the id after the durable ack.
    let mut ids = Vec::new();
    for text in ["hello bob", "second"] {
        let id = ok(tern(&b, &alice, &["send", "bob", text])).trim().to_owned();
        assert_eq!(id.len(), 32, "a 128-bit id in hex: {id}");
        ids.push(id);
    }
    let out = ok(tern(&b, &bob, &["recv", "--count", "2", "--timeout", "20", "--json"]));
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for (line, (id, text)) in lines.iter().zip(ids.iter().zip(["hello bob", "second"])) {
        assert_eq!(line["id"], id.as_str());
        assert_eq!(line["from"], "alice");
        assert_eq!(line["text"], text, "in send order");
    }

    // Acked by that recv: nothing comes again.
    let out = tern(&b, &bob, &["recv", "--count", "1", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(3), "timeout exits 3");
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));

    // Online: bob waits, alice sends, the message is pushed.
    let waiting = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--broker", &b.addr, "--ca"])
        .arg(&b.ca)
        .arg("--profile")
        .arg(&bob)
        .args(["recv", "--count", "1", "--timeout", "20"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    ok(tern(&b, &alice, &["send", "bob", "pushed"]));
    let out = ok(waiting.wait_with_output().unwrap());
    assert_eq!(out.trim(), "alice: pushed");

    // One more asking for no receipt: delivered, and not receipted.
    ok(tern(&b, &alice, &["send", "--no-receipt", "bob", "quiet"]));
    let out = ok(tern(&b, &bob, &["recv", "--count", "1", "--timeout", "20"]));
    assert_eq!(out.trim(), "alice: quiet");

    // Alice gets delivered receipts for the three others.
    let out = ok(tern(&b, &alice, &["recv", "--timeout", "3", "--receipts", "--json"]));
    let receipts: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(receipts.len(), 3, "{out}");
    assert!(receipts.iter().all(|r| r["handle"] == "bob" && r["device"] == 1));
    assert_eq!(receipts[0]["receipt"], ids[0].as_str());
}

#[test]
fn linking_a_second_device_and_errors_that_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_broker(&dir.path().join("broker"));
    let bob = dir.path().join("bob");
    let laptop = dir.path().join("bob-laptop");
    let alice = dir.path().join("alice");
    ok(tern(&b, &bob, &["register", "bob"]));
    ok(tern(&b, &alice, &["register", "alice"]));

    let key = ok(tern(&b, &laptop, &["link-key"])).trim().to_owned();
    let token = ok(tern(&b, &bob, &["approve", &key])).trim().to_owned();
    assert_eq!(ok(tern(&b, &laptop, &["link", "bob", &token])).trim(), "linked as bob (device 2)");
    let devices = ok(tern(&b, &alice, &["devices", "bob"]));
    assert_eq!(devices.lines().count(), 2, "{devices}");
    assert_device_list(&devices, &ok(tern(&b, &alice, &["devices", "bob", "--json"])), &key);

    ok(tern(&b, &alice, &["send", "bob", "to both"]));
    for profile in [&bob, &laptop] {
        assert_eq!(ok(tern(&b, profile, &["recv", "--count", "1", "--timeout", "20"])).trim(), "alice: to both");
    }

    // Errors name the problem and the fix.
    let out = tern(&b, &dir.path().join("nobody"), &["send", "bob", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("register"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tern(&b, &alice, &["send", "carol", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("UnknownRecipient"));
    let out = tern(&b, &alice, &["register", "alice2"]);
    assert!(!out.status.success(), "a profile holds one identity");
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--broker", "127.0.0.1:1", "--ca"])
        .arg(&b.ca)
        .arg("--profile")
        .arg(&alice)
        .args(["send", "bob", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach broker 127.0.0.1:1"), "{stderr}");
}

/// `tern devices` prints `HANDLE/ID  KEY  added <RFC 3339 UTC>`; `--json`
/// keeps the raw milliseconds.
fn assert_device_list(text: &str, json: &str, second_key: &str) {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let rows: Vec<serde_json::Value> = json.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 2, "{json}");
    assert_eq!(rows[1]["public_key"], second_key);
    for (line, row) in text.lines().zip(&rows) {
        let added_at_ms = row["added_at_ms"].as_u64().unwrap();
        assert!(now_ms.saturating_sub(added_at_ms) < 600_000, "added just now: {row}");
        let (head, date) = line.split_once("  added ").unwrap_or_else(|| panic!("{line:?}"));
        assert_eq!(head, format!("bob/{}  {}", row["device_id"], row["public_key"].as_str().unwrap()));
        // 2025-01-31T12:00:00.000Z: digits where digits belong, and the milliseconds of the raw value.
        let shape = date.bytes().enumerate().all(|(i, c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            19 => c == b'.',
            23 => c == b'Z',
            _ => c.is_ascii_digit(),
        });
        assert!(shape && date.len() == 24, "not RFC 3339: {line:?}");
        assert_eq!(&date[20..23], format!("{:03}", added_at_ms % 1000).as_str(), "{line:?}");
        assert!(date.starts_with("20"), "{line:?}");
    }
}

fn spawn_tern(b: &Broker, profile: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--broker", &b.addr, "--ca"])
        .arg(&b.ca)
        .arg("--profile")
        .arg(profile)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` to exit, killing it (and failing) after `limit`.
fn wait_at_most(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tern did not exit within {limit:?}: {:?}", child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn recv_timeout_inf_and_receipts_counted_by_count() {
    let dir = tempfile::tempdir().unwrap();
    let b = start_broker(&dir.path().join("broker"));
    let alice = dir.path().join("alice");
    let bob = dir.path().join("bob");
    ok(tern(&b, &alice, &["register", "alice"]));
    ok(tern(&b, &bob, &["register", "bob"]));

    // `--timeout inf` waits with no limit (it used to panic).
    let waiting = spawn_tern(&b, &bob, &["recv", "--count", "1", "--timeout", "inf"]);
    let id = ok(tern(&b, &alice, &["send", "bob", "no hurry"])).trim().to_owned();
    assert_eq!(ok(wait_at_most(waiting, Duration::from_secs(30))).trim(), "alice: no hurry");

    // A timeout that is not a duration is refused up front, naming the flag.
    for bad in ["nan", "-1", "soon"] {
        let out = tern(&b, &bob, &["recv", &format!("--timeout={bad}")]);
        assert_eq!(out.status.code(), Some(2), "--timeout {bad}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--timeout") && stderr.contains("inf"), "{stderr}");
    }

    // With --receipts, --count counts the receipts it prints.
    let out = ok(tern(&b, &alice, &["recv", "--receipts", "--count", "1", "--timeout", "20", "--json"]));
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["receipt"], id.as_str());
    assert_eq!(lines[0]["handle"], "bob");
}
