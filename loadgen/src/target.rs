//! `--target` URLs: `tern://HOST:PORT`, `nats://HOST:PORT`, `mqtt://HOST:PORT`.

use std::fmt;
use std::str::FromStr;

/// Which protocol a target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    Tern,
    Nats,
    Mqtt,
}

/// A broker to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) scheme: Scheme,
    /// `HOST:PORT` (IPv6 hosts in brackets).
    pub(crate) addr: String,
}

impl Target {
    /// The host part, without brackets.
    pub(crate) fn host(&self) -> &str {
        let host = self.addr.rsplit_once(':').map_or(self.addr.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }

    /// The port.
    pub(crate) fn port(&self) -> u16 {
        self.addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(0)
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            format!("{s:?} has no scheme; write tern://HOST:PORT, nats://HOST:PORT or mqtt://HOST:PORT")
        })?;
        let scheme = match scheme {
            "tern" => Scheme::Tern,
            "nats" => Scheme::Nats,
            "mqtt" => Scheme::Mqtt,
            other => return Err(format!("unknown scheme {other:?}; use tern, nats or mqtt")),
        };
        let addr = rest.trim_end_matches('/');
        let Some((host, port)) = addr.rsplit_once(':') else {
            return Err(format!("{s:?} has no port; write {}://HOST:PORT", scheme_name(scheme)));
        };
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("{s:?}: expected HOST:PORT with a port in 1..=65535"));
        }
        Ok(Self { scheme, addr: addr.to_owned() })
    }
}

fn scheme_name(s: Scheme) -> &'static str {
    match s {
        Scheme::Tern => "tern",
        Scheme::Nats => "nats",
        Scheme::Mqtt => "mqtt",
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", scheme_name(self.scheme), self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_schemes() {
        let t: Target = "tern://127.0.0.1:4433".parse().unwrap();
        assert_eq!((t.scheme, t.host(), t.port()), (Scheme::Tern, "127.0.0.1", 4433));
        let t: Target = "nats://[::1]:4222/".parse().unwrap();
        assert_eq!((t.scheme, t.host(), t.port()), (Scheme::Nats, "::1", 4222));
        assert_eq!("mqtt://localhost:1883".parse::<Target>().unwrap().to_string(), "mqtt://localhost:1883");
    }

    #[test]
    fn rejects_what_it_cannot_use() {
        for bad in ["127.0.0.1:4433", "http://x:1", "tern://host", "tern://:5", "tern://h:0", "tern://h:99999"] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }
}
