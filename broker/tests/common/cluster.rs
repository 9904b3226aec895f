//! `TestCluster`: brokers on 127.0.0.1:0 that form one mesh under a cluster
//! CA made for the test, like nats-server's `checkClusterFormed`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_broker::{Broker, BrokerConfig};

use super::{config, wait_for};

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub brokers: Vec<Option<Broker>>,
    pub configs: Vec<BrokerConfig>,
}

/// Node name of broker `i`.
pub fn node(i: usize) -> String {
    format!("node-{}", i + 1)
}

/// Makes a cluster CA in `dir/ca` and a node directory per name.
pub fn certify(dir: &Path, nodes: &[String]) -> Vec<PathBuf> {
    let ca = dir.join("ca");
    if !ca.join("ca.pem").exists() {
        tern_broker::mesh::create_ca(&ca).unwrap();
    }
    nodes
        .iter()
        .map(|n| {
            let out = dir.join("certs").join(n);
            tern_broker::mesh::create_node_cert(&ca, n, &out).unwrap();
            out
        })
        .collect()
}

impl TestCluster {
    /// Starts `n` brokers; each after the first joins the first. Returns once
    /// every broker sees every other alive over a link.
    pub async fn spawn(n: usize) -> Self {
        Self::spawn_with(n, |_, _| {}).await
    }

    /// Like [`TestCluster::spawn`], with `tweak(i, config)` applied to
    /// broker `i`'s configuration first.
    pub async fn spawn_with(n: usize, tweak: impl Fn(usize, &mut BrokerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..n).map(node).collect();
        let certs = certify(dir.path(), &names);
        let mut cluster = Self { dir, brokers: Vec::new(), configs: Vec::new() };
        for (i, cert_dir) in certs.into_iter().enumerate() {
            let mut c = config(&cluster.dir.path().join(&names[i]));
            c.node = names[i].clone();
            c.cluster.dir = Some(cert_dir);
            c.cluster.drain_secs = 0;
            if let Some(first) = cluster.configs.first() {
                c.cluster.join = vec![first.listen.to_string()];
            }
            tweak(i, &mut c);
            let broker = Broker::spawn(c.clone()).await.expect("broker starts");
            // Restarts reuse the port the broker got.
            c.listen = broker.local_addr();
            cluster.configs.push(c);
            cluster.brokers.push(Some(broker));
        }
        assert!(cluster.wait_formed(Duration::from_secs(20)).await, "mesh formed: {:#?}", cluster.statuses());
        cluster
    }

    pub fn broker(&self, i: usize) -> &Broker {
        self.brokers[i].as_ref().expect("broker running")
    }

    pub fn statuses(&self) -> Vec<Option<tern_broker::mesh::MeshStatus>> {
        self.brokers.iter().map(|b| b.as_ref().and_then(Broker::mesh_status)).collect()
    }

    /// True when every running broker sees every other running broker alive
    /// with a link up.
    pub fn formed(&self) -> bool {
        let running: Vec<String> = (0..self.brokers.len()).filter(|i| self.brokers[*i].is_some()).map(node).collect();
        self.statuses().into_iter().flatten().all(|s| {
            running
                .iter()
                .filter(|n| **n != s.node)
                .all(|n| s.members.iter().any(|m| &m.node == n && m.alive && m.link.is_some()))
                && s.members.iter().filter(|m| m.alive).count() == running.len() - 1
        })
    }

    pub async fn wait_formed(&self, timeout: Duration) -> bool {
        wait_for(timeout, || self.formed()).await
    }

    /// Shuts broker `i` down gracefully.
    pub async fn stop(&mut self, i: usize) {
        if let Some(b) = self.brokers[i].take() {
            b.shutdown().await;
        }
    }

    /// Starts broker `i` again with its config (same port, data and certificate).
    pub async fn restart(&mut self, i: usize) {
        let mut c = self.configs[i].clone();
        if c.cluster.join.is_empty() && i == 0 && self.configs.len() > 1 {
            c.cluster.join = vec![self.configs[1].listen.to_string()];
        }
        self.brokers[i] = Some(Broker::spawn(c).await.expect("broker restarts"));
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.brokers.len() {
            self.stop(i).await;
        }
    }
}
