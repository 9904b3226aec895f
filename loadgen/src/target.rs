//! `--target` URLs: `tern://HOST:PORT`, `nats://HOST:PORT`, `mqtt://HOST:PORT`.
//! A run takes one or more of them ([`Targets`], all of one scheme) and
//! spreads its users over them: user `i` connects to target `i % n`.

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

/// The brokers of one run: at least one, all speaking the same protocol
/// (the members of one Tern mesh or one NATS cluster, say).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Targets(Vec<Target>);

impl Targets {
    /// Checks that `list` is not empty and has one scheme.
    pub(crate) fn new(list: Vec<Target>) -> Result<Self, String> {
        let first = list.first().ok_or("no --target given")?;
        if let Some(other) = list.iter().find(|t| t.scheme != first.scheme) {
            return Err(format!(
                "--target {first} and --target {other} use different schemes; \
                 the targets of one run must all be {}:// (or all nats://, or all mqtt://)",
                scheme_name(first.scheme)
            ));
        }
        Ok(Self(list))
    }

    /// The protocol all targets speak.
    pub(crate) fn scheme(&self) -> Scheme {
        self.0[0].scheme
    }

    /// The targets, in the order given.
    pub(crate) fn all(&self) -> &[Target] {
        &self.0
    }

    /// How many targets there are (at least one).
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The first target (where run-wide set-up such as a NATS stream goes).
    pub(crate) fn first(&self) -> &Target {
        &self.0[0]
    }

    /// The index of the target user `user` connects to: `user % len`, so
    /// neighbours (and so the chat scenario's partners) are on different brokers.
    pub(crate) fn index_of(&self, user: u32) -> usize {
        user as usize % self.0.len()
    }

    /// The target user `user` connects to.
    pub(crate) fn of_user(&self, user: u32) -> &Target {
        &self.0[self.index_of(user)]
    }
}

impl fmt::Display for Targets {
    /// The URLs joined by commas (the report's `target`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
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

    fn targets(urls: &[&str]) -> Result<Targets, String> {
        Targets::new(urls.iter().map(|u| u.parse().unwrap()).collect())
    }

    #[test]
    fn a_list_keeps_its_order_and_prints_comma_joined() {
        let t = targets(&["tern://127.0.0.1:1", "tern://127.0.0.1:2", "tern://[::1]:3"]).unwrap();
        assert_eq!((t.len(), t.scheme(), t.first().port()), (3, Scheme::Tern, 1));
        assert_eq!(t.to_string(), "tern://127.0.0.1:1,tern://127.0.0.1:2,tern://[::1]:3");
        assert_eq!(targets(&["nats://h:4222"]).unwrap().to_string(), "nats://h:4222");
    }

    #[test]
    fn a_list_has_one_scheme_and_at_least_one_target() {
        let err = targets(&["tern://h:1", "tern://h:2", "nats://h:3"]).unwrap_err();
        assert!(err.contains("different schemes") && err.contains("nats://h:3"), "{err}");
        assert!(Targets::new(Vec::new()).unwrap_err().contains("--target"));
    }

    #[test]
    fn users_go_round_robin_over_the_targets() {
        let t = targets(&["tern://h:1", "tern://h:2", "tern://h:3"]).unwrap();
        let ports: Vec<u16> = (0..7).map(|u| t.of_user(u).port()).collect();
        assert_eq!(ports, vec![1, 2, 3, 1, 2, 3, 1]);
        assert_eq!(t.index_of(u32::MAX), u32::MAX as usize % 3);
        // Chat partners (0-1, 2-3, ...) land on different brokers whenever there are several.
        let two = targets(&["tern://h:1", "tern://h:2"]).unwrap();
        assert!((0..100).all(|u| two.index_of(u) != two.index_of(u ^ 1)));
        let one = targets(&["tern://h:1"]).unwrap();
        assert!((0..100).all(|u| one.index_of(u) == 0));
    }

    #[test]
    fn rejects_what_it_cannot_use() {
        for bad in ["127.0.0.1:4433", "http://x:1", "tern://host", "tern://:5", "tern://h:0", "tern://h:99999"] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }
}
