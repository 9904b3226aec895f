//! Brokers as processes: three `tern-broker` binaries on loopback, made
//! with the `cluster-ca` and `cluster-cert` commands, for crash and fault
//! tests that SIGKILL, restart or skew them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{free_port, wait_for, Proc, Raw};

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The brokers' `--admin-token`: `/mesh/sever` needs it.
pub const ADMIN_TOKEN: &str = "mesh-crash-admin-token-0123";

pub struct Node {
    pub name: String,
    pub port: u16,
    pub admin: u16,
    pub data: PathBuf,
    pub certs: PathBuf,
    pub join: Option<u16>,
    /// Extra environment of the process (fault drills).
    pub env: Vec<(String, String)>,
}

impl Node {
    pub fn addr(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.port).parse().unwrap()
    }

    pub fn spawn(&self) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern-broker"));
        cmd.args(["--listen", &format!("127.0.0.1:{}", self.port), "--node", &self.name])
            .args(["--admin", &format!("127.0.0.1:{}", self.admin)])
            .args(["--admin-token", ADMIN_TOKEN])
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--cluster")
            .arg(&self.certs)
            .env("TERN_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if let Some(port) = self.join {
            cmd.args(["--join", &format!("127.0.0.1:{port}")]);
        }
        Proc(cmd.spawn().expect("start tern-broker"))
    }

    /// Members this broker sees alive with a link up, from its admin port.
    pub fn linked_members(&self) -> usize {
        let Ok(mut resp) = ureq::get(&format!("http://127.0.0.1:{}/mesh", self.admin)).call() else { return 0 };
        let Ok(body) = resp.body_mut().read_to_string() else { return 0 };
        let Ok(status) = serde_json::from_str::<serde_json::Value>(&body) else { return 0 };
        status["members"]
            .as_array()
            .map(|m| m.iter().filter(|m| m["alive"] == true && !m["link"].is_null()).count())
            .unwrap_or(0)
    }
}

pub fn run(args: &[&str], dirs: &[&Path]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern-broker"));
    cmd.args(args);
    for d in dirs {
        cmd.arg(d);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Three nodes under one CA made by the CLI; node-2 and node-3 join node-1.
pub fn nodes(dir: &Path) -> Vec<Node> {
    let ca = dir.join("ca");
    run(&["cluster-ca", "--out"], &[&ca]);
    assert!(ca.join("ca.pem").exists() && ca.join("ca.key").exists());
    let first = free_port();
    (0..3)
        .map(|i| {
            let name = format!("node-{}", i + 1);
            let certs = dir.join("certs").join(&name);
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern-broker"));
            let out = cmd
                .args(["cluster-cert", "--node", &name])
                .arg("--ca")
                .arg(&ca)
                .arg("--out")
                .arg(&certs)
                .output()
                .unwrap();
            assert!(out.status.success(), "cluster-cert: {}", String::from_utf8_lossy(&out.stderr));
            Node {
                port: if i == 0 { first } else { free_port() },
                admin: free_tcp_port(),
                data: dir.join(&name),
                certs,
                join: (i > 0).then_some(first),
                env: Vec::new(),
                name,
            }
        })
        .collect()
}

pub async fn wait_formed(nodes: &[Node]) {
    let formed =
        wait_for(Duration::from_secs(30), || nodes.iter().all(|n| n.linked_members() == nodes.len() - 1)).await;
    assert!(formed, "the mesh did not form");
}

/// Connects once the broker is up (its certificate exists and it answers).
pub async fn connect(node: &Node) -> Raw {
    let cert = node.data.join("tls/cert.pem");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if cert.exists() {
            if let Ok(raw) = Raw::try_connect_to(node.addr(), &cert).await {
                return raw;
            }
        }
        assert!(Instant::now() < deadline, "broker {} did not come up", node.name);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
