//! `tern-loadgen chaos` against real `tern-broker` processes: bad input is
//! refused before anything starts, and a short run with link cuts sets up
//! the mesh, injects the faults through the admin port (with its token),
//! drains, accounts for every acknowledged message and leaves no broker
//! behind. The full suite (kills and pauses too, 60 s) is
//! `benches/chaos/run.sh --duration 60`, which `.ci/run` runs.
//!
//! Needs `tern-broker` built next to `tern-loadgen` (`cargo build --workspace --bins`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn broker_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tern-loadgen")).with_file_name("tern-broker");
    assert!(bin.exists(), "{} missing: run `cargo build --workspace --bins` first", bin.display());
    bin
}

fn chaos(broker: &Path, dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern-loadgen"))
        .arg("chaos")
        .arg("--broker-bin")
        .arg(broker)
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .env_remove("TERN_LOG")
        .output()
        .unwrap()
}

/// Whether a process whose command line mentions `dir` is still running.
fn runs_in(dir: &Path) -> bool {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc").unwrap().filter_map(Result::ok).any(|p| {
        std::fs::read(p.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(&needle))
    })
}

#[test]
fn bad_arguments_are_refused_before_any_broker_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = chaos(&tmp.path().join("no-such-broker"), &tmp.path().join("mesh"), &["--duration", "5"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--broker-bin"));

    std::fs::write(tmp.path().join("left-over"), "x").unwrap();
    let out = chaos(&broker_bin(), tmp.path(), &["--duration", "5"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));

    let out = chaos(&broker_bin(), &tmp.path().join("mesh"), &["--duration", "-1"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn link_cuts_lose_nothing_and_every_broker_is_gone_afterwards() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, json) = (tmp.path().join("mesh"), tmp.path().join("report.json"));
    let args = ["--faults", "sever", "--duration", "12", "--rate", "100", "--users", "12", "--seed", "7", "--quiet"];
    let out = chaos(&broker_bin(), &dir, &[&args[..], &["--json", json.to_str().unwrap()]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap_or_default())
        .unwrap_or_else(|e| panic!("no report ({e}); stderr: {stderr}"));
    assert!(out.status.success(), "{stderr}\n{v:#}");
    let n = |key: &str| v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v:#}"));
    assert_eq!(n("sent"), 1200);
    assert!(n("acked") > 1100, "{v:#}");
    assert_eq!((n("lost"), n("duplicated"), n("reordered")), (0, 0, 0), "{v:#}");
    let c = &v["chaos"];
    assert_eq!(c["seed"], 7);
    assert_eq!(c["passed"], true);
    assert!(c["severs"].as_u64().unwrap() >= 2, "{c:#}");
    assert_eq!((c["kills"].as_u64(), c["failed_faults"].as_u64()), (Some(0), Some(0)), "{c:#}");
    assert!(c["events"].as_array().unwrap().iter().all(|e| e["kind"] == "sever"), "{c:#}");
    // What an operator reads afterwards is there; no broker is left running.
    for f in ["events.log", "brokers.pem", "logs/node-1.log", "logs/node-3.log"] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    assert!(!runs_in(&dir), "a broker of {} is still running", dir.display());
}
