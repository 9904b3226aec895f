//! Tern client library: log in to a Tern broker over QUIC, send messages
//! that resolve on the broker's durable ack, and receive this device's queue
//! in order, each item once.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tern_client::{Client, ClientConfig, Incoming};
//! let config = ClientConfig::new(vec!["127.0.0.1:4433".into()], "tern-data/tls/cert.pem");
//! let (alice, identity) = Client::register(config, "alice", None).await?;
//! // keep `identity` (its signing key) to log in later with Client::connect
//! alice.send("bob", "hello").await?;            // durable on the broker
//! while let Some(item) = alice.recv().await {
//!     if let Incoming::Message { from, body, .. } = &item {
//!         println!("{from}: {}", String::from_utf8_lossy(body));
//!     }
//!     alice.ack(item.seq()).await;
//! }
//! # Ok(()) }
//! ```
//!
//! Modules: `client` is the public handle; `actor` the task behind it that
//! owns the connection, reconnects, resends and deduplicates; `conn` one
//! connection and its login; `config`, `backoff`, `dedup`, `identity`, `tls`
//! their parts.
#![warn(missing_docs)]

mod actor;
mod backoff;
mod client;
mod config;
mod conn;
mod dedup;
pub mod e2e;
mod error;
mod identity;
pub mod secure;
mod tls;

pub use backoff::Backoff;
pub use client::{Client, Incoming, Outgoing, PendingAck, SendOptions, SendReceipt};
pub use config::ClientConfig;
pub use error::{ClientError, SendError};
pub use identity::{approval_from_token, approval_to_token, generate_key, Identity};
pub use tern_protocol::{ErrorCode, MessageId};
pub use tls::SharedEndpoint;
