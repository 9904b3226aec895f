//! The `tern-broker` binary refuses a bad configuration before it starts:
//! exit status 2 and a message naming the flag or field, whether the value
//! came from a flag, a `TERN_*` variable or the file.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn broker() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tern-broker"));
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// Runs the broker, which must exit by itself within 30 s (a broker that
/// started instead is killed and the test fails).
fn run(mut command: Command) -> Output {
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the broker started instead of refusing its configuration: {:?}", child.wait_with_output());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn refused(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    stderr
}

#[test]
fn a_bad_log_filter_exits_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = broker();
    c.args(["--log", "tern_broker=loud", "--listen", "127.0.0.1:0", "--data-dir"]).arg(dir.path().join("d"));
    let stderr = refused(&run(c));
    assert!(stderr.contains("--log"), "{stderr}");

    let mut c = broker();
    c.env("TERN_LOG", "info,[broken").args(["--listen", "127.0.0.1:0", "--data-dir"]).arg(dir.path().join("d"));
    let stderr = refused(&run(c));
    assert!(stderr.contains("--log"), "{stderr}");
}

fn cluster_node(dir: &Path) -> std::path::PathBuf {
    let ok = |out: Output| assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    ok(run({
        let mut c = broker();
        c.args(["cluster-ca", "--out"]).arg(dir.join("ca"));
        c
    }));
    ok(run({
        let mut c = broker();
        c.args(["cluster-cert", "--node", "node-1", "--ca"]).arg(dir.join("ca")).arg("--out").arg(dir.join("node-1"));
        c
    }));
    dir.join("node-1")
}

#[test]
fn a_mesh_member_on_an_unspecified_address_needs_advertise() {
    let dir = tempfile::tempdir().unwrap();
    let node = cluster_node(dir.path());
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let mut c = broker();
        c.args(["--node", "node-1", "--listen", listen, "--cluster"])
            .arg(&node)
            .arg("--data-dir")
            .arg(dir.path().join("d"));
        let stderr = refused(&run(c));
        assert!(stderr.contains("cluster.advertise") && stderr.contains("--advertise"), "{listen}: {stderr}");
    }
}

#[test]
fn limit_store_and_cluster_values_from_flags_and_env_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    // (flag or variable, value out of range, what the message must name)
    let flags = [
        ("--max-batch", "0", "store.max_batch"),
        ("--max-devices", "0", "store.max_devices"),
        ("--max-body-len", "0", "limits.max_body_len"),
        ("--udp-buffer-bytes", "1", "limits.udp_buffer_bytes"),
        ("--max-connections", "0", "limits.max_connections"),
        ("--max-pending-sends", "0", "limits.max_pending_sends"),
        ("--handshake-timeout-secs", "0", "limits.handshake_timeout_secs"),
        ("--max-login-attempts", "0", "limits.max_login_attempts"),
        ("--location-cache-entries", "0", "cluster.location_cache_entries"),
        ("--min-free-disk-mb", "lots", "--min-free-disk-mb"),
    ];
    let vars = [
        ("TERN_ACCOUNT_CACHE_ENTRIES", "0", "store.account_cache_entries"),
        ("TERN_MAX_FRAME_LEN", "100", "limits.max_frame_len"),
        ("TERN_MAX_INFLIGHT", "0", "limits.max_inflight"),
        ("TERN_IDLE_TIMEOUT_SECS", "0", "limits.idle_timeout_secs"),
        ("TERN_LOCATION_CACHE_TTL_SECS", "0", "cluster.location_cache_ttl_secs"),
        ("TERN_DRAIN_SECS", "4000", "cluster.drain_secs"),
    ];
    for (is_flag, (name, value, field)) in flags.map(|f| (true, f)).into_iter().chain(vars.map(|v| (false, v))) {
        let mut c = broker();
        c.args(["--listen", "127.0.0.1:0", "--data-dir"]).arg(dir.path().join("d"));
        if is_flag {
            c.args([name, value]);
        } else {
            c.env(name, value);
        }
        let stderr = refused(&run(c));
        assert!(stderr.contains(field), "{name}={value}: {stderr}");
    }
}

#[test]
fn zero_worker_threads_exit_2_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = broker();
    c.args(["--worker-threads", "0", "--listen", "127.0.0.1:0", "--data-dir"]).arg(dir.path().join("d"));
    let stderr = refused(&run(c));
    assert!(stderr.contains("worker_threads"), "{stderr}");
}
