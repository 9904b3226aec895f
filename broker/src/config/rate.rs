//! `[rate]`: the rate limits' settings (the buckets themselves are
//! `crate::ratelimit`), and the two value types they are written in: a
//! [`Rate`] (`{ burst, refill_ms }`, on the command line `BURST,EVERY`) and
//! an [`IpNet`] (CIDR).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::{check, within, ConfigError, DAY_SECS};

/// `[rate]`: token buckets that bound how often one source address, handle
/// or device may repeat a request; beyond, the request is answered
/// `RATE_LIMITED` with the time after which a retry may succeed. The
/// buckets are per broker (a mesh does not add them up).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateSection {
    /// When false, nothing is rate limited (the connection, handshake and
    /// frame limits of `[limits]` still hold).
    pub enabled: bool,
    /// Source networks that are never rate limited, as CIDR
    /// (`"192.0.2.0/24"`). Default: loopback, where only local tools
    /// (benchmarks, health checks, a local proxy) connect from.
    pub exempt: Vec<IpNet>,
    /// Most keys (addresses, handles, devices) each limiter tracks; the
    /// least recently used are forgotten first (a forgotten key starts full).
    pub max_keys: u64,
    /// Connection attempts (QUIC handshakes) per source address (IPv6: per
    /// /64), taken before any handshake work. While a source's bucket is
    /// below half, its unproven attempts get a stateless Retry first, so
    /// packets with a forged source address cannot empty it all.
    pub handshakes_per_ip: Rate,
    /// `Register` requests per source address (IPv6: per /64).
    pub register_per_ip: Rate,
    /// `Login` and `LinkDevice` requests per source address (IPv6: per /64).
    pub login_per_ip: Rate,
    /// Failed `Login` and `LinkDevice` attempts per handle. A signature that
    /// verifies is never refused by it (no lock-out), but while it is empty
    /// a login is checked against the records held here only, with no
    /// lookup at other mesh members, and a failure is answered `RATE_LIMITED`.
    pub login_failures_per_handle: Rate,
    /// `Send` requests per logged-in device.
    pub sends_per_device: Rate,
    /// Account lookups (`ListDevices`) per logged-in device.
    pub lookups_per_device: Rate,
    /// Key claims (`ClaimKeys`) per logged-in device and target user: each
    /// takes a one-time key of every device of the target, so draining a
    /// user's stock, or walking the handle space, is slow.
    pub key_claims_per_device_and_target: Rate,
}

/// A token bucket: `burst` requests at once, then one more every `refill_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Requests allowed at once (the bucket's size).
    pub burst: u32,
    /// Milliseconds in which one request's worth is regained.
    pub refill_ms: u64,
}

impl Rate {
    /// `burst` at once, then one more every `refill_ms`.
    pub const fn new(burst: u32, refill_ms: u64) -> Self {
        Self { burst, refill_ms }
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{}ms", self.burst, self.refill_ms)
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    /// `BURST,EVERY`: `20,30s` is a burst of 20, then one more every 30 s
    /// (units `ms`, `s`, `m`, `h`; a bare number is milliseconds).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not BURST,EVERY (e.g. `20,30s`: 20 at once, then one every 30 s)");
        let (burst, every) = s.split_once(',').ok_or_else(bad)?;
        let burst = burst.trim().parse().map_err(|_| bad())?;
        let every = every.trim();
        let split = every.find(|c: char| !c.is_ascii_digit()).unwrap_or(every.len());
        let (n, unit) = every.split_at(split);
        let n: u64 = n.parse().map_err(|_| bad())?;
        let scale = match unit {
            "" | "ms" => 1,
            "s" => 1000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(bad()),
        };
        Ok(Self { burst, refill_ms: n.checked_mul(scale).ok_or_else(bad)? })
    }
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `::1/128`); a bare
/// address is a network of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IpNet {
    /// The network's address, host bits cleared.
    pub addr: IpAddr,
    /// Length of the network prefix in bits.
    pub prefix: u8,
}

impl IpNet {
    /// True when `ip` lies in this network (an IPv4-mapped IPv6 address
    /// counts as its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask(u32::from(ip).into(), 32, self.prefix) == u32::from(net).into(),
            (IpAddr::V6(net), IpAddr::V6(ip)) => mask(u128::from(ip), 128, self.prefix) == u128::from(net),
            _ => false,
        }
    }
}

/// `bits` with all but the first `prefix` of its `width` bits cleared.
fn mask(bits: u128, width: u32, prefix: u8) -> u128 {
    let host = width.saturating_sub(u32::from(prefix));
    if host >= 128 {
        0
    } else {
        bits >> host << host
    }
}

impl std::str::FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not an IP network such as 192.0.2.0/24 or 2001:db8::/32");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().map_err(|_| bad())?, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s.parse::<IpAddr>().map_err(|_| bad())?, None),
        };
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(width);
        if prefix > width {
            return Err(bad());
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4((mask(u32::from(a).into(), 32, prefix) as u32).into()),
            IpAddr::V6(a) => IpAddr::V6(mask(u128::from(a), 128, prefix).into()),
        };
        Ok(Self { addr, prefix })
    }
}

impl TryFrom<String> for IpNet {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<IpNet> for String {
    fn from(net: IpNet) -> Self {
        net.to_string()
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Default for RateSection {
    /// Sized for people on phones, many of them behind one carrier NAT
    /// address; see docs/operations.md ("Rate limits") for the reasoning.
    fn default() -> Self {
        Self {
            enabled: true,
            exempt: vec![
                IpNet { addr: IpAddr::from([127, 0, 0, 0]), prefix: 8 },
                IpNet { addr: IpAddr::from(std::net::Ipv6Addr::LOCALHOST), prefix: 128 },
            ],
            max_keys: 100_000,
            handshakes_per_ip: Rate::new(200, 100),
            register_per_ip: Rate::new(20, 30_000),
            login_per_ip: Rate::new(200, 100),
            login_failures_per_handle: Rate::new(10, 6_000),
            sends_per_device: Rate::new(1_000, 10),
            lookups_per_device: Rate::new(100, 1_000),
            key_claims_per_device_and_target: Rate::new(10, 60_000),
        }
    }
}

impl RateSection {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        within(self.max_keys, 1, 100_000_000, "rate.max_keys")?;
        let rates = [
            (self.handshakes_per_ip, "rate.handshakes_per_ip"),
            (self.register_per_ip, "rate.register_per_ip"),
            (self.login_per_ip, "rate.login_per_ip"),
            (self.login_failures_per_handle, "rate.login_failures_per_handle"),
            (self.sends_per_device, "rate.sends_per_device"),
            (self.lookups_per_device, "rate.lookups_per_device"),
            (self.key_claims_per_device_and_target, "rate.key_claims_per_device_and_target"),
        ];
        for (rate, field) in rates {
            within(u64::from(rate.burst), 1, 1_000_000, field)?;
            // A full bucket refills within a day: the time a key is kept.
            check(
                (1..=DAY_SECS * 1000).contains(&rate.refill_ms)
                    && rate.refill_ms.saturating_mul(u64::from(rate.burst)) <= 7 * DAY_SECS * 1000,
                field,
                || format!("refill_ms {} must be 1 to 86400000, and burst x refill_ms at most 7 days", rate.refill_ms),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BrokerConfig;

    #[test]
    fn rates_and_networks_parse_as_operators_write_them() {
        assert_eq!("20,30s".parse::<Rate>(), Ok(Rate::new(20, 30_000)));
        assert_eq!("5, 2m".parse::<Rate>(), Ok(Rate::new(5, 120_000)));
        assert_eq!("1000,10".parse::<Rate>(), Ok(Rate::new(1000, 10)));
        for bad in ["20", "x,1s", "20,1w", "20,s", "20,99999999999999999h"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        let net: IpNet = "10.1.2.3/8".parse().unwrap();
        assert_eq!(net.to_string(), "10.0.0.0/8", "host bits cleared");
        assert!(net.contains("10.200.0.1".parse().unwrap()));
        assert!(net.contains("::ffff:10.0.0.1".parse().unwrap()), "IPv4-mapped");
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.0.2.1".parse().unwrap()));
        assert!(!all.contains("2001:db8::1".parse().unwrap()));
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert_eq!("192.0.2.9".parse::<IpNet>().unwrap().prefix, 32);
        for bad in ["10.0.0.0/33", "::/129", "example.com", "10.0.0.0/x"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }

    #[test]
    fn rate_limits_are_configured_in_toml_and_checked() {
        let text = "[rate]\nexempt = [\"192.0.2.0/24\"]\nsends_per_device = { burst = 5, refill_ms = 200 }\n";
        let c: BrokerConfig = toml::from_str(text).unwrap();
        assert_eq!(c.rate.sends_per_device, Rate::new(5, 200));
        assert_eq!(c.rate.exempt, vec!["192.0.2.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(c.rate.login_per_ip, RateSection::default().login_per_ip, "unset rates keep defaults");
        c.validate().unwrap();
        assert!(toml::from_str::<BrokerConfig>("[rate]\nexempt = [\"nonsense\"]\n").is_err());
        let mut c = BrokerConfig::default();
        c.rate.register_per_ip.refill_ms = 0;
        assert_eq!(c.validate().unwrap_err().field, "rate.register_per_ip");
        let mut c = BrokerConfig::default();
        c.rate.lookups_per_device = Rate::new(1_000_000, DAY_SECS * 1000);
        assert_eq!(c.validate().unwrap_err().field, "rate.lookups_per_device", "a burst refilled in over 7 days");
        let mut c = BrokerConfig::default();
        c.limits.max_frame_len_before_login = c.limits.max_frame_len + 1;
        assert_eq!(c.validate().unwrap_err().field, "limits.max_frame_len_before_login");
    }
}
