//! A QUIC handshake flood against one broker, for `benches/flood/run.sh`:
//! CONCURRENCY tasks each complete a full client handshake (ALPN `tern/1`),
//! close the connection at once and start the next, for SECS seconds, from
//! ENDPOINTS UDP sockets. It sends nothing after the handshake: what it
//! costs the broker is the handshakes (and their Retry, when the broker
//! asks for one). Bounded in time and count; loopback or a test host only.
//!
//! ```sh
//! cargo run --release -p tern-broker --example handshake_flood -- \
//!     ADDR CA_PEM [SECS=20] [CONCURRENCY=256] [ENDPOINTS=8] [SOURCE_IP=127.0.0.1]
//! ```
//!
//! SOURCE_IP is the loopback address the flood comes from: another one
//! than the established clients' lets a broker exempt only theirs from its
//! rate limits.
//!
//! Prints one JSON line: attempts, completed handshakes, refusals, other
//! failures and the handshake rate.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Most handshakes one run attempts, whatever its duration.
const MAX_ATTEMPTS: u64 = 5_000_000;

#[derive(Default)]
struct Counts {
    attempts: AtomicU64,
    completed: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

fn client_config(ca: &std::path::Path) -> anyhow::Result<quinn::ClientConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![tern_protocol::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

async fn one(endpoint: &quinn::Endpoint, addr: SocketAddr, counts: &Counts) {
    counts.attempts.fetch_add(1, Ordering::Relaxed);
    let connecting = match endpoint.connect(addr, "127.0.0.1") {
        Ok(c) => c,
        Err(_) => {
            counts.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(Ok(conn)) => {
            counts.completed.fetch_add(1, Ordering::Relaxed);
            conn.close(0u32.into(), b"flood");
        }
        Ok(Err(quinn::ConnectionError::ConnectionClosed(c)))
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            counts.refused.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            counts.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: handshake_flood ADDR CA_PEM [SECS] [CONCURRENCY] [ENDPOINTS] [SOURCE_IP]";
    let addr: SocketAddr = args.first().context(usage)?.parse().context("ADDR")?;
    let ca = std::path::PathBuf::from(args.get(1).context(usage)?);
    let arg = |i: usize, default: u64| args.get(i).map_or(Ok(default), |a| a.parse::<u64>());
    let secs = arg(2, 20)?.clamp(1, 600);
    let concurrency = arg(3, 256)?.clamp(1, 10_000);
    let endpoints = arg(4, 8)?.clamp(1, 64);
    let source: std::net::IpAddr = args.get(5).map_or("127.0.0.1", String::as_str).parse().context("SOURCE_IP")?;
    anyhow::ensure!(source.is_loopback(), "SOURCE_IP must be a loopback address");
    let config = client_config(&ca)?;
    let endpoints: Vec<quinn::Endpoint> = (0..endpoints)
        .map(|_| {
            let mut e = quinn::Endpoint::client(SocketAddr::new(source, 0))?;
            e.set_default_client_config(config.clone());
            Ok(e)
        })
        .collect::<anyhow::Result<_>>()?;
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let endpoint = endpoints[i as usize % endpoints.len()].clone();
            let counts = counts.clone();
            tokio::spawn(async move {
                while Instant::now() < deadline && counts.attempts.load(Ordering::Relaxed) < MAX_ATTEMPTS {
                    one(&endpoint, addr, &counts).await;
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let completed = counts.completed.load(Ordering::Relaxed);
    println!(
        "{{\"secs\":{elapsed:.2},\"concurrency\":{concurrency},\"attempts\":{},\"completed\":{completed},\"refused\":{},\"failed\":{},\"handshakes_per_s\":{:.0}}}",
        counts.attempts.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed),
        completed as f64 / elapsed,
    );
    for e in &endpoints {
        e.wait_idle().await;
    }
    Ok(())
}
