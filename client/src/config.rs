//! [`ClientConfig`]: which brokers to use, what to trust, and how patient to
//! be. Checked by [`ClientConfig::validate`] before anything connects, so a
//! bad value is reported with the field's name.

use std::path::PathBuf;
use std::time::Duration;

use crate::ClientError;

/// How to reach brokers and how patient to be.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Broker addresses (`host:port`); the client uses the first that answers
    /// and moves on to the next when it fails. After a connection loss it
    /// tries the broker it was logged in at first (a restarted broker is
    /// back within seconds, and the device's queue is there), then the next.
    pub brokers: Vec<String>,
    /// PEM file with the certificate(s) to trust.
    pub ca: PathBuf,
    /// TLS server name; defaults to the host part of the broker address.
    pub server_name: Option<String>,
    /// Sent in `Hello`, for the broker's logs.
    pub client_name: String,
    /// Limit for the QUIC handshake with one broker.
    pub connect_timeout: Duration,
    /// Limit for a send's durable ack (it may still land later; resending
    /// with the same id is safe).
    pub request_timeout: Duration,
    /// Shortest reconnect delay.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// How many delivered ids to remember for dropping redeliveries.
    pub dedup_window: usize,
    /// Deliveries buffered for the application. When it is full the client
    /// keeps serving sends and lets the broker push the rest again later; it
    /// never blocks on a slow reader.
    pub incoming_buffer: usize,
    /// Most sends kept while no broker is connected, each waiting to be
    /// written after the reconnect; a send beyond it fails at once with
    /// [`SendError::Backlogged`](crate::SendError::Backlogged), so an
    /// application that keeps sending through a long outage is told instead
    /// of growing the client's memory without bound.
    pub max_offline_sends: usize,
    /// QUIC idle timeout: a broker that vanished without closing (crash,
    /// network cut) is noticed after this long, and the client reconnects.
    /// A crashed broker that is back sooner is noticed sooner: it answers
    /// the old connection's next packet with a stateless reset. Keep-alives
    /// go out at a third of it.
    pub idle_timeout: Duration,
    /// After a connection loss, try the broker the client was logged in at
    /// first (the default: a restarted broker is back within seconds and the
    /// device's queue is there). Off: go on to the next broker of the list,
    /// so devices move, and spread, at every reconnect (the chaos suite uses
    /// it to exercise moves).
    pub reconnect_to_last: bool,
    /// Use this endpoint (UDP socket) instead of opening one per client. Its
    /// trust and idle timeout are the ones it was made with.
    pub endpoint: Option<crate::SharedEndpoint>,
}

impl ClientConfig {
    /// Defaults for `brokers`, trusting `ca`.
    pub fn new(brokers: Vec<String>, ca: impl Into<PathBuf>) -> Self {
        Self {
            brokers,
            ca: ca.into(),
            server_name: None,
            client_name: concat!("tern-client/", env!("CARGO_PKG_VERSION")).into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            dedup_window: 65_536,
            incoming_buffer: 1024,
            max_offline_sends: 10_000,
            idle_timeout: Duration::from_secs(10),
            reconnect_to_last: true,
            endpoint: None,
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |field: &str, reason: &str| Err(ClientError::Config(format!("{field}: {reason}")));
        if self.brokers.is_empty() {
            return Err(ClientError::NoBroker);
        }
        if let Some(addr) = self.brokers.iter().find(|b| !is_host_port(b)) {
            return bad("brokers", &format!("{addr:?} is not HOST:PORT"));
        }
        if self.server_name.as_deref().is_some_and(str::is_empty) {
            return bad("server_name", "empty");
        }
        for (field, value) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("backoff_min", self.backoff_min),
            ("idle_timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                return bad(field, "must be above zero");
            }
        }
        if self.backoff_max < self.backoff_min {
            return bad("backoff_max", "below backoff_min");
        }
        if self.dedup_window == 0 {
            return bad("dedup_window", "must be at least 1");
        }
        if self.incoming_buffer == 0 {
            return bad("incoming_buffer", "must be at least 1");
        }
        if self.max_offline_sends == 0 {
            return bad("max_offline_sends", "must be at least 1");
        }
        Ok(())
    }
}

/// `host:port` with a non-empty host and a valid port.
fn is_host_port(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClientConfig {
        ClientConfig::new(vec!["127.0.0.1:4433".into(), "[::1]:4433".into(), "broker.example:1".into()], "ca.pem")
    }

    #[test]
    fn defaults_are_valid() {
        config().validate().unwrap();
        let c = config();
        assert_eq!((c.backoff_min, c.backoff_max), (Duration::from_millis(100), Duration::from_secs(10)));
    }

    #[test]
    fn bad_fields_are_named() {
        type Change = fn(&mut ClientConfig);
        let cases: [(&str, Change); 7] = [
            ("brokers", |c| c.brokers.push("no-port".into())),
            ("brokers", |c| c.brokers.push(":4433".into())),
            ("request_timeout", |c| c.request_timeout = Duration::ZERO),
            ("backoff_max", |c| c.backoff_max = Duration::from_millis(1)),
            ("dedup_window", |c| c.dedup_window = 0),
            ("incoming_buffer", |c| c.incoming_buffer = 0),
            ("max_offline_sends", |c| c.max_offline_sends = 0),
        ];
        for (field, change) in cases {
            let mut c = config();
            change(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
        let mut c = config();
        c.brokers.clear();
        assert!(matches!(c.validate(), Err(ClientError::NoBroker)));
    }
}
