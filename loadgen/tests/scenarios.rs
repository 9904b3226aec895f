//! `tern-loadgen` against a real `tern-broker` process on loopback: every
//! scenario runs, accounts for every acknowledged message (none lost,
//! duplicated or reordered), writes the JSON the comparison reads, and bad
//! input or an unreachable broker gives a clear error and its exit code.
//! With three `--target`s against a 3-broker mesh, users spread over the
//! brokers and every conversation crosses brokers, still fully accounted.
//!
//! Needs `tern-broker` built next to `tern-loadgen` (`cargo build --workspace --bins`).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Broker {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

fn broker_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tern-loadgen")).with_file_name("tern-broker");
    assert!(bin.exists(), "{} missing: run `cargo build --workspace --bins` first", bin.display());
    bin
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Broker {
    fn start() -> Self {
        Self::start_with(&[])
    }

    /// A broker with `extra` flags (mesh flags, say).
    fn start_with(extra: &[String]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_udp_port());
        let child = Command::new(broker_bin())
            .args(["--listen", &addr, "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .env("TERN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.path().join("tls/cert.pem").exists() {
            assert!(Instant::now() < deadline, "broker did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, addr, dir }
    }

    fn cert(&self) -> String {
        self.dir.path().join("tls/cert.pem").display().to_string()
    }

    /// `--target URL --ca FILE` for this broker.
    fn args(&self) -> Vec<String> {
        let ca = self.dir.path().join("tls/cert.pem");
        vec!["--target".into(), format!("tern://{}", self.addr), "--ca".into(), ca.display().to_string()]
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the load generator with `args` plus `--json FILE --quiet`; returns
/// its output and the parsed JSON (if it wrote one).
fn loadgen(args: &[String]) -> (Output, Option<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("out.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tern-loadgen"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--quiet")
        .output()
        .unwrap();
    let parsed = std::fs::read_to_string(&json).ok().map(|s| serde_json::from_str(&s).unwrap());
    (out, parsed)
}

fn run(scenario: &str, broker: &Broker, extra: &[&str]) -> (Output, Option<Value>) {
    let mut args = vec![scenario.to_owned()];
    args.extend(broker.args());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    loadgen(&args)
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {v:#}"))
}

/// Exit 0 and every acknowledged message delivered exactly once, in order.
fn assert_clean(out: &Output, v: &Value) {
    assert!(out.status.success(), "exit {:?}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    assert!(n(v, "acked") > 0, "{v:#}");
    assert_eq!(n(v, "lost"), 0, "{v:#}");
    assert_eq!(n(v, "duplicated"), 0, "{v:#}");
    assert_eq!(n(v, "reordered"), 0, "{v:#}");
    assert_eq!(n(v, "delivered"), n(v, "acked"), "every acked message delivered once: {v:#}");
}

#[test]
fn chat_accounts_for_every_message_and_writes_the_json_contract() {
    let b = Broker::start();
    let (out, v) = run("chat", &b, &["--users", "6", "--rate", "300", "--duration", "2", "--warmup", "0.5"]);
    let v = v.expect("json written");
    assert_clean(&out, &v);
    // 300 msg/s for 2.5 s, all sent.
    assert_eq!(n(&v, "sent"), 750, "{v:#}");
    assert!(v["throughput_per_s"].as_f64().unwrap() > 0.0);
    for key in ["p50", "p99", "p999", "max"] {
        assert!(v["deliver_latency_us"][key].as_u64().unwrap() > 0, "deliver_latency_us.{key}: {v:#}");
    }
    // Warm-up sends are accounted but not timed.
    assert!(v["deliver_latency_us"]["count"].as_u64().unwrap() < 750, "{v:#}");
    assert_eq!(v["offered_rate"].as_f64(), Some(300.0));
    assert!(v["broker"]["pid"].as_u64().is_some(), "the broker process is found by its port: {v:#}");
    assert!(v["broker"]["cpu_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn max_ramps_and_reports_stages() {
    let b = Broker::start();
    let (out, v) =
        run("max", &b, &["--users", "4", "--duration", "3", "--start-in-flight", "2", "--max-in-flight", "8"]);
    let v = v.expect("json written");
    assert_clean(&out, &v);
    let stages = v["max"]["stages"].as_array().unwrap();
    assert!(!stages.is_empty() && stages.len() <= 3, "{v:#}");
    assert_eq!(stages[0]["in_flight"], 2);
    assert!(v["max"]["max_sustained_per_s"].as_f64().unwrap() > 0.0, "{v:#}");
}

#[test]
fn offline_users_get_their_backlog_on_connect() {
    let b = Broker::start();
    let (out, v) = run("offline", &b, &["--users", "6", "--messages", "40"]);
    let v = v.expect("json written");
    assert_clean(&out, &v);
    assert_eq!(n(&v, "acked"), 120, "3 senders x 40: {v:#}");
    assert_eq!(v["offline"]["messages"], 120);
    assert!(v["offline"]["drain_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn storm_serves_every_client_again() {
    let b = Broker::start();
    let (out, v) = run("storm", &b, &["--users", "12", "--window", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = &v.expect("json written")["storm"];
    assert_eq!((s["served"].as_u64(), s["failed"].as_u64()), (Some(12), Some(0)), "{s:#}");
    assert!(s["all_served_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn connections_reports_broker_memory_per_connection() {
    let b = Broker::start();
    let (out, v) = run("connections", &b, &["--users", "40", "--hold", "0.5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c = &v.expect("json written")["connections"];
    assert_eq!((c["established"].as_u64(), c["alive_after_hold"].as_u64()), (Some(40), Some(40)), "{c:#}");
    assert!(c["rss_after_bytes"].as_u64().unwrap() > 0, "{c:#}");
}

#[test]
fn unreachable_broker_and_bad_arguments_get_clear_errors() {
    let b = Broker::start();
    let args = b.args();
    let (target, ca) = (args[1].as_str(), args[3].as_str());
    // Nothing listens on this port.
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = format!("tern://127.0.0.1:{port}");
    let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let (out, v) = loadgen(&s(&["chat", "--target", &dead, "--ca", ca, "--rate", "10", "--duration", "1"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("cannot reach") && err.contains("hint:"), "{err}");
    assert!(v.is_none(), "no report for a run that never started");

    for (args, needle) in [
        (s(&["chat", "--target", "127.0.0.1:1", "--rate", "5"]), "no scheme"),
        (s(&["chat", "--target", target, "--rate", "5"]), "--ca"),
        (s(&["chat", "--target", target, "--ca", ca, "--rate", "0"]), "--rate"),
        (s(&["chat", "--target", target, "--ca", ca, "--rate", "5", "--users", "1"]), "users"),
        (s(&["chat", "--target", target, "--ca", "/nonexistent.pem", "--rate", "5"]), "nonexistent.pem"),
        (s(&["chat", "--target", &format!("{target},nats://127.0.0.1:1"), "--rate", "5"]), "different schemes"),
        (
            s(&["chat", "--target", target, "--target", target, "--ca", ca, "--ca", ca, "--ca", ca, "--rate", "5"]),
            "3 --ca files for 2",
        ),
        (
            s(&["chat", "--target", "mqtt://127.0.0.1:1", "--target", "mqtt://127.0.0.1:2", "--rate", "5"]),
            "one --target",
        ),
    ] {
        let (out, _) = loadgen(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?} should mention {needle}: {err}");
    }
}

/// Three brokers in one mesh (node-2 and node-3 join node-1), once each
/// lists the two others alive with a link up.
fn mesh() -> (tempfile::TempDir, Vec<Broker>) {
    let certs = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(broker_bin()).args(args).current_dir(certs.path()).output().unwrap();
        assert!(out.status.success(), "tern-broker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    run(&["cluster-ca", "--out", "ca"]);
    let mut brokers: Vec<Broker> = Vec::new();
    let mut admins = Vec::new();
    for i in 1..=3 {
        let node = format!("node-{i}");
        run(&["cluster-cert", "--ca", "ca", "--node", &node, "--out", &node]);
        let admin =
            format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
        let mut flags = vec!["--node".to_owned(), node.clone(), "--admin".into(), admin.clone(), "--cluster".into()];
        flags.push(certs.path().join(&node).display().to_string());
        if let Some(first) = brokers.first() {
            flags.extend(["--join".to_owned(), first.addr.clone()]);
        }
        brokers.push(Broker::start_with(&flags));
        admins.push(admin);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for admin in &admins {
        loop {
            // Fails until the broker's admin port is up.
            let out = Command::new(broker_bin()).args(["mesh", "status", "--admin", admin, "--json"]).output().unwrap();
            let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let linked = status["members"]
                .as_array()
                .map_or(0, |m| m.iter().filter(|m| m["alive"] == Value::Bool(true) && !m["link"].is_null()).count());
            if linked == 2 {
                break;
            }
            assert!(Instant::now() < deadline, "mesh not formed: {status:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    (certs, brokers)
}

#[test]
fn chat_spreads_users_over_a_mesh_and_accounts_for_every_message() {
    let (_certs, mesh) = mesh();
    let mut args = vec!["chat".to_owned()];
    for b in &mesh {
        args.extend(["--target".to_owned(), format!("tern://{}", b.addr), "--ca".into(), b.cert()]);
    }
    args.extend(["--users", "9", "--rate", "300", "--duration", "2", "--warmup", "0.5"].map(String::from));
    let (out, v) = loadgen(&args);
    let v = v.expect("json written");
    assert_clean(&out, &v);
    assert_eq!(n(&v, "sent"), 750, "{v:#}");
    let targets: Vec<String> = mesh.iter().map(|b| format!("tern://{}", b.addr)).collect();
    assert_eq!(v["target"].as_str(), Some(targets.join(",").as_str()), "{v:#}");
    // CPU and memory are the sums over the three broker processes, each found by its port.
    assert_eq!(v["broker"]["brokers"], 3, "{v:#}");
    let pids: Vec<u64> = v["broker"]["pids"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect();
    let mut expected: Vec<u64> = mesh.iter().map(|b| u64::from(b.child.id())).collect();
    expected.sort_unstable();
    let mut found = pids;
    found.sort_unstable();
    assert_eq!(found, expected, "{v:#}");
}
