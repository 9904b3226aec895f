//! The brokers of a `chaos` run: `--brokers` `tern-broker` processes on
//! loopback, set up as in the README's mesh tour (a cluster CA, one
//! certificate per node, every node joining the others), each with its own
//! data directory, QUIC port and admin port, kept for the whole run so a
//! killed broker restarts where it was.
//!
//! Layout under `--dir`:
//!
//! ```text
//! ca/                 cluster CA (cluster-ca)
//! node-N/cluster/     node certificate (cluster-cert)
//! node-N/data/        the broker's data directory (RocksDB, tls/cert.pem)
//! logs/node-N.log     the broker's output, every start appended
//! pids/node-N.pid     the running process, for a wrapper's clean-up
//! brokers.pem         every broker's certificate, for the clients
//! events.log          the faults as they happened
//! ```
//!
//! Each broker gets only `TERN_LOG` and `TERN_ADMIN_TOKEN` from the
//! `TERN_*` environment, so settings of the caller's shell do not leak in
//! (and `NO_COLOR`, so its log is plain text).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::target::{Scheme, Target};
use crate::LoadError;

/// How long the brokers get to start and form the mesh.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit for one admin HTTP request.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// One broker: where it lives and its process, if running.
#[derive(Debug)]
struct Node {
    name: String,
    listen: SocketAddr,
    admin: SocketAddr,
    home: PathBuf,
    child: Option<Child>,
    paused: bool,
    starts: u32,
}

impl Node {
    fn data(&self) -> PathBuf {
        self.home.join("data")
    }
}

/// The brokers of the run.
#[derive(Debug)]
pub(crate) struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    token: String,
    log_filter: String,
    nodes: Vec<Node>,
}

/// How the cluster is set up.
#[derive(Debug, Clone)]
pub(crate) struct ClusterSpec<'a> {
    pub(crate) bin: &'a Path,
    pub(crate) dir: &'a Path,
    pub(crate) brokers: usize,
    pub(crate) token: &'a str,
    pub(crate) log_filter: &'a str,
}

fn io_err(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> LoadError {
    move |e| LoadError::Io(format!("{what}: {e}"))
}

/// A loopback port nobody uses now, for UDP (QUIC) or TCP (admin).
fn free_port(udp: bool) -> Result<u16, LoadError> {
    let port = if udp {
        std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr())
    } else {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|s| s.local_addr())
    };
    port.map(|a| a.port()).map_err(io_err("finding a free loopback port"))
}

impl Cluster {
    /// Makes the CA and certificates, starts every broker and waits until
    /// each sees all the others alive and linked.
    pub(crate) async fn create(spec: ClusterSpec<'_>) -> Result<Self, LoadError> {
        if !spec.bin.is_file() {
            return Err(LoadError::Args(format!(
                "--broker-bin {}: no such file (build it with `cargo build --release -p tern-broker`)",
                spec.bin.display()
            )));
        }
        std::fs::create_dir_all(spec.dir).map_err(io_err(spec.dir.display()))?;
        if std::fs::read_dir(spec.dir).map_err(io_err(spec.dir.display()))?.next().is_some() {
            return Err(LoadError::Args(format!("--dir {}: not empty (give a new directory)", spec.dir.display())));
        }
        for sub in ["logs", "pids"] {
            std::fs::create_dir_all(spec.dir.join(sub)).map_err(io_err(spec.dir.display()))?;
        }
        let mut cluster = Self {
            bin: spec.bin.to_owned(),
            dir: spec.dir.to_owned(),
            token: spec.token.to_owned(),
            log_filter: spec.log_filter.to_owned(),
            nodes: Vec::new(),
        };
        cluster.tool(&["cluster-ca", "--out"], &[spec.dir.join("ca")]).await?;
        for i in 0..spec.brokers {
            let name = format!("node-{}", i + 1);
            let home = spec.dir.join(&name);
            let ca = spec.dir.join("ca");
            cluster
                .tool(&["cluster-cert", "--node", &name, "--ca"], &[ca, "--out".into(), home.join("cluster")])
                .await?;
            let listen = SocketAddr::from(([127, 0, 0, 1], free_port(true)?));
            let admin = SocketAddr::from(([127, 0, 0, 1], free_port(false)?));
            cluster.nodes.push(Node { name, listen, admin, home, child: None, paused: false, starts: 0 });
        }
        for i in 0..spec.brokers {
            cluster.start(i, "initial start")?;
        }
        let result = cluster.wait_formed().await;
        if let Err(e) = result {
            cluster.shutdown().await;
            return Err(e);
        }
        Ok(cluster)
    }

    /// Runs a set-up subcommand of the broker binary.
    async fn tool(&self, args: &[&str], paths: &[PathBuf]) -> Result<(), LoadError> {
        let out = Command::new(&self.bin)
            .args(args)
            .args(paths)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .output()
            .await
            .map_err(io_err(self.bin.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(LoadError::Setup {
                target: self.bin.display().to_string(),
                what: args.join(" "),
                reason: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    }

    /// The brokers as load-generator targets, in node order.
    pub(crate) fn targets(&self) -> Vec<Target> {
        self.nodes.iter().map(|n| Target { scheme: Scheme::Tern, addr: n.listen.to_string() }).collect()
    }

    /// The file with every broker's certificate.
    pub(crate) fn ca_file(&self) -> PathBuf {
        self.dir.join("brokers.pem")
    }

    /// Node `i`'s name.
    pub(crate) fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// How many brokers there are.
    pub(crate) fn len(&self) -> usize {
        self.nodes.len()
    }

    /// How many times node `i` has been started.
    pub(crate) fn starts(&self, i: usize) -> u32 {
        self.nodes[i].starts
    }

    /// Appends a line to DIR/events.log.
    pub(crate) fn log_event(&self, line: &str) {
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(self.dir.join("events.log")) {
            let _ = writeln!(f, "{line}");
        }
    }

    /// Starts node `i` (again) on its data directory and ports; `why` goes
    /// into its log before its own output.
    pub(crate) fn start(&mut self, i: usize, why: &str) -> Result<(), LoadError> {
        let peers: Vec<String> =
            self.nodes.iter().enumerate().filter(|&(j, _)| j != i).map(|(_, n)| n.listen.to_string()).collect();
        let node = &mut self.nodes[i];
        let log_path = self.dir.join("logs").join(format!("{}.log", node.name));
        let mut log =
            OpenOptions::new().create(true).append(true).open(&log_path).map_err(io_err(log_path.display()))?;
        node.starts += 1;
        let _ = writeln!(log, "===== tern-loadgen chaos: start {} of {} ({why})", node.starts, node.name);
        let err = log.try_clone().map_err(io_err(log_path.display()))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--node")
            .arg(&node.name)
            .arg("--listen")
            .arg(node.listen.to_string())
            .arg("--data-dir")
            .arg(node.data())
            .arg("--cluster")
            .arg(node.home.join("cluster"))
            .arg("--admin")
            .arg(node.admin.to_string())
            .arg("--join")
            .arg(peers.join(","));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TERN_") {
                cmd.env_remove(key);
            }
        }
        let child = cmd
            .env("TERN_LOG", &self.log_filter)
            .env("TERN_ADMIN_TOKEN", &self.token)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(io_err(format!("starting {}", self.bin.display())))?;
        if let Some(pid) = child.id() {
            let _ = std::fs::write(self.dir.join("pids").join(format!("{}.pid", node.name)), format!("{pid}\n"));
        }
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    /// SIGKILLs node `i` and reaps it.
    pub(crate) async fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut child) = node.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        let _ = std::fs::remove_file(self.dir.join("pids").join(format!("{}.pid", node.name)));
        node.paused = false;
    }

    /// SIGSTOPs (`stop`) or SIGCONTs node `i`.
    pub(crate) fn signal(&mut self, i: usize, stop: bool) -> Result<(), LoadError> {
        let node = &mut self.nodes[i];
        let pid = node.child.as_ref().and_then(Child::id).and_then(|p| Pid::from_raw(p as i32));
        let Some(pid) = pid else {
            return Err(LoadError::Io(format!("{} is not running", node.name)));
        };
        kill_process(pid, if stop { Signal::STOP } else { Signal::CONT })
            .map_err(|e| LoadError::Io(format!("signalling {}: {e}", node.name)))?;
        node.paused = stop;
        Ok(())
    }

    /// Whether node `i` exited by itself (it should only ever be killed);
    /// its exit status if so.
    pub(crate) fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.nodes[i].child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Asks node `from` to cut its link to node `to` for `secs` seconds.
    pub(crate) async fn sever(&self, from: usize, to: usize, secs: u64) -> Result<String, String> {
        let path = format!("/mesh/sever/{}?secs={secs}", self.nodes[to].name);
        match self.admin(from, "POST", &path).await? {
            (200, body) => Ok(body.trim().to_owned()),
            (code, body) => Err(format!("HTTP {code}: {}", body.trim())),
        }
    }

    /// One request to node `i`'s admin port, with the admin token; the
    /// status code and body.
    async fn admin(&self, i: usize, method: &str, path: &str) -> Result<(u16, String), String> {
        let addr = self.nodes[i].admin;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n",
            self.token
        );
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = match tokio::time::timeout(ADMIN_TIMEOUT, exchange).await {
            Ok(Ok(r)) => String::from_utf8_lossy(&r).into_owned(),
            Ok(Err(e)) => return Err(format!("{} admin {addr}: {e}", self.nodes[i].name)),
            Err(_) => return Err(format!("{} admin {addr}: no answer within {ADMIN_TIMEOUT:?}", self.nodes[i].name)),
        };
        let code = response.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
        Ok((code, body))
    }

    /// `GET /mesh` of node `i`, parsed.
    pub(crate) async fn mesh_status(&self, i: usize) -> Result<serde_json::Value, String> {
        match self.admin(i, "GET", "/mesh").await? {
            (200, body) => serde_json::from_str(&body).map_err(|e| format!("{}: /mesh: {e}", self.nodes[i].name)),
            (code, body) => Err(format!("{}: /mesh: HTTP {code}: {}", self.nodes[i].name, body.trim())),
        }
    }

    /// The mesh counters (`tern_mesh_*_total`) of node `i` since its last
    /// start, from `/metrics`.
    pub(crate) async fn mesh_counters(&self, i: usize) -> Result<BTreeMap<String, u64>, String> {
        let (code, body) = self.admin(i, "GET", "/metrics").await?;
        if code != 200 {
            return Err(format!("{}: /metrics: HTTP {code}", self.nodes[i].name));
        }
        Ok(body
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(name, _)| name.starts_with("tern_mesh_") && name.ends_with("_total"))
            .filter_map(|(name, v)| Some((name.to_owned(), v.trim().parse::<f64>().ok()? as u64)))
            .collect())
    }

    /// Whether node `i` sees every other node alive with a link up.
    async fn sees_all(&self, i: usize) -> bool {
        let Ok(status) = self.mesh_status(i).await else { return false };
        let members = status["members"].as_array().cloned().unwrap_or_default();
        let up = members.iter().filter(|m| m["alive"].as_bool() == Some(true) && !m["link"].is_null()).count();
        up + 1 >= self.nodes.len()
    }

    /// Waits until every broker is up and sees every other alive and
    /// linked, then writes DIR/brokers.pem.
    pub(crate) async fn wait_formed(&mut self) -> Result<(), LoadError> {
        let deadline = Instant::now() + FORM_TIMEOUT;
        loop {
            for i in 0..self.nodes.len() {
                if let Some(status) = self.exited(i) {
                    return Err(LoadError::Setup {
                        target: self.nodes[i].listen.to_string(),
                        what: format!("broker {}", self.nodes[i].name),
                        reason: format!("exited with {status}; see {}", self.dir.join("logs").display()),
                    });
                }
            }
            let certs = self.nodes.iter().all(|n| n.data().join("tls/cert.pem").exists());
            let mut formed = certs;
            for i in 0..self.nodes.len() {
                formed = formed && self.sees_all(i).await;
            }
            if formed {
                break;
            }
            if Instant::now() > deadline {
                return Err(LoadError::Setup {
                    target: self.targets().iter().map(Target::to_string).collect::<Vec<_>>().join(","),
                    what: "the mesh".into(),
                    reason: format!(
                        "not formed within {FORM_TIMEOUT:?} (every broker alive and linked to every other); see {}",
                        self.dir.join("logs").display()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut pem = String::new();
        for n in &self.nodes {
            let path = n.data().join("tls/cert.pem");
            pem += &std::fs::read_to_string(&path).map_err(io_err(path.display()))?;
        }
        std::fs::write(self.ca_file(), pem).map_err(io_err(self.ca_file().display()))
    }

    /// Resumes and SIGKILLs every broker.
    pub(crate) async fn shutdown(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].paused {
                let _ = self.signal(i, false);
            }
            self.kill(i).await;
        }
    }
}
