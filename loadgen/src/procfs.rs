//! Reading a local process's CPU time and memory from /proc, and finding the
//! process that listens on a port (so `--broker-pid` is rarely needed).

use std::fs;

/// Clock ticks per second in /proc/PID/stat (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// User + system CPU seconds consumed by `pid` so far.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / USER_HZ)
}

/// CPU seconds of this process.
pub(crate) fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds(std::process::id())
}

/// Resident set size of `pid`, in bytes.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The process (other than this one) with a socket bound to local `port`:
/// UDP for QUIC brokers, TCP in LISTEN state otherwise. Needs permission to
/// read the other process's /proc/PID/fd (same user, or root).
pub(crate) fn find_listener(port: u16, udp: bool) -> Option<u32> {
    let tables: &[&str] = if udp { &["/proc/net/udp", "/proc/net/udp6"] } else { &["/proc/net/tcp", "/proc/net/tcp6"] };
    let inodes: Vec<String> = tables
        .iter()
        .filter_map(|t| fs::read_to_string(t).ok())
        .flat_map(|table| socket_inodes(&table, port, udp))
        .collect();
    if inodes.is_empty() {
        return None;
    }
    let me = std::process::id();
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if let Ok(link) = fs::read_link(fd.path()) {
                let link = link.to_string_lossy();
                if inodes.iter().any(|i| link == format!("socket:[{i}]")) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// Inodes of the sockets in a /proc/net table bound to local `port`.
fn socket_inodes(table: &str, port: u16, udp: bool) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            // TCP state 0A is LISTEN; UDP sockets have no listen state.
            let listening = udp || *f.get(3)? == "0A";
            (local_port == port && listening).then(|| f.get(9).map(|s| (*s).to_owned())).flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_cpu_and_memory() {
        assert!(own_cpu_seconds().is_some());
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }

    #[test]
    fn parses_net_tables() {
        let table =
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 0100007F:115C 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 4242 2 0\n\
            1: 0100007F:115D 00000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 4343 2 0\n";
        assert_eq!(socket_inodes(table, 0x115C, true), vec!["4242".to_owned()]);
        assert!(socket_inodes(table, 0x115C, false).is_empty(), "TCP needs LISTEN (0A)");
    }

    #[test]
    fn finds_a_listening_socket_of_another_process() {
        // A child process holding a UDP port: found by its port.
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = sock.local_addr().unwrap().port();
        // Our own socket is skipped on purpose: nothing else has it.
        assert_eq!(find_listener(port, true), None);
    }
}
