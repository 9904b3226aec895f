//! Quick side-by-side measurement of the foundation: one sender pipelining
//! sends through `tern-client` to one receiver on an in-process broker, with
//! the WAL synced before each ack (the default) and, for comparison, not
//! synced. Reports acked throughput and send->ack / send->deliver latency
//! percentiles. The full load generator is `tern-loadgen` (later issue).
//!
//! ```sh
//! cargo run --release -p tern-broker --example sendrate -- [MESSAGES] [IN_FLIGHT] [BODY_BYTES]
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use tern_broker::{Broker, BrokerConfig, Durability};
use tern_client::{Client, ClientConfig, Incoming};

struct Run {
    sync: bool,
    secs: f64,
    ack_us: Vec<u64>,
    deliver_us: Vec<u64>,
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run(sync: bool, messages: usize, in_flight: usize, body_len: usize) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir_in(".")?;
    let mut cfg =
        BrokerConfig { listen: "127.0.0.1:0".parse()?, data_dir: dir.path().to_owned(), ..Default::default() };
    cfg.store.durability = if sync { Durability::Synced } else { Durability::Written };
    cfg.store.min_free_disk_mb = 0;
    cfg.limits.max_pending_sends = in_flight.max(1);
    let broker = Broker::spawn(cfg).await?;
    let cc = ClientConfig::new(vec![broker.local_addr().to_string()], broker.cert_path());
    let (alice, _) = Client::register(cc.clone(), "alice", None).await?;
    let (bob, _) = Client::register(cc, "bob", None).await?;
    let base = Instant::now();

    let receiver = tokio::spawn(async move {
        let mut deliver_us = Vec::with_capacity(messages);
        while deliver_us.len() < messages {
            let Some(item) = bob.recv().await else { break };
            if let Incoming::Message { seq, body, .. } = &item {
                let sent = u64::from_be_bytes(body[..8].try_into().unwrap_or_default());
                deliver_us.push((base.elapsed().as_nanos() as u64).saturating_sub(sent) / 1000);
                if deliver_us.len() % 64 == 0 || deliver_us.len() == messages {
                    bob.ack(*seq).await;
                }
            }
        }
        deliver_us
    });

    let alice = Arc::new(alice);
    let started = Instant::now();
    let mut ack_us = Vec::with_capacity(messages);
    let mut running = FuturesUnordered::new();
    let mut next = 0;
    while ack_us.len() < messages {
        while next < messages && running.len() < in_flight {
            let alice = alice.clone();
            running.push(async move {
                let t0 = base.elapsed().as_nanos() as u64;
                let mut body = vec![0u8; body_len.max(8)];
                body[..8].copy_from_slice(&t0.to_be_bytes());
                alice.send("bob", body).await.map(|_| (base.elapsed().as_nanos() as u64 - t0) / 1000)
            });
            next += 1;
        }
        match running.next().await {
            Some(r) => ack_us.push(r?),
            None => break,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let mut deliver_us = tokio::time::timeout(Duration::from_secs(60), receiver).await??;
    broker.shutdown().await;
    ack_us.sort_unstable();
    deliver_us.sort_unstable();
    Ok(Run { sync, secs, ack_us, deliver_us })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let messages = args.first().copied().unwrap_or(20_000);
    let in_flight = args.get(1).copied().unwrap_or(256);
    let body = args.get(2).copied().unwrap_or(100);
    println!("{messages} messages, {in_flight} in flight, {body}-byte bodies, 1 sender -> 1 receiver, loopback\n");
    println!(
        "| WAL sync | acked msg/s | ack p50 us | ack p99 us | ack p99.9 us | deliver p50 us | deliver p99 us | delivered |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut rates = Vec::new();
    for sync in [true, false] {
        let r = run(sync, messages, in_flight, body).await?;
        let rate = r.ack_us.len() as f64 / r.secs;
        rates.push(rate);
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} |",
            if r.sync { "on (default)" } else { "off" },
            rate,
            pct(&r.ack_us, 0.5),
            pct(&r.ack_us, 0.99),
            pct(&r.ack_us, 0.999),
            pct(&r.deliver_us, 0.5),
            pct(&r.deliver_us, 0.99),
            r.deliver_us.len(),
        );
    }
    println!("\nsynced / unsynced throughput: {:.2}", rates[0] / rates[1]);
    Ok(())
}
