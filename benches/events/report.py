"""Turns benches/events/run.sh's raw files into events.json and events.md.

usage: report.py WORK OUT USERS DURABILITY RATE...
"""

import json
import sys
from pathlib import Path


def metric(text, name):
    """Sum of every series of `name` in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def delta(work, stem, name):
    before = (work / f"{stem}.metrics0").read_text()
    after = (work / f"{stem}.metrics1").read_text()
    return metric(after, name) - metric(before, name)


def udp(work, stem):
    def read(suffix):
        ins, outs = (work / f"{stem}.{suffix}").read_text().split()
        return int(ins), int(outs)

    (i0, o0), (i1, o1) = read("udp0"), read("udp1")
    return i1 - i0, o1 - o0


def perf(work, stem):
    counts = {}
    for line in (work / f"{stem}.txt").read_text().splitlines():
        fields = line.split(",")
        if len(fields) >= 3 and fields[0] and fields[0][0].isdigit():
            counts[fields[2]] = float(fields[0])
    return counts


def main():
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    users, durability, rates = int(sys.argv[3]), sys.argv[4], sys.argv[5:]
    rows = []
    for rate in rates:
        p = rate
        sent_p = delta(work, p, "tern_sends_total")
        if sent_p <= 0:
            sys.exit(f"events: no sends counted at {rate} msg/s (see {work}/broker-{rate}.log)")
        counts = perf(work, p)
        _, outs = udp(work, p)
        prefix = "syscalls:sys_enter_"
        calls = {k[len(prefix):]: v for k, v in counts.items() if k.startswith(prefix)}
        row = {
            "rate": int(rate),
            "messages": sent_p,
            "cpu_us_per_msg": counts.get("task-clock", 0) * 1000 / sent_p,
            "context_switches_per_msg": counts.get("context-switches", 0) / sent_p,
            "cpu_migrations_per_msg": counts.get("cpu-migrations", 0) / sent_p,
            "udp_datagrams_per_msg": outs / sent_p,
            "deliveries_per_msg": delta(work, p, "tern_deliveries_total") / sent_p,
            "store_batches_per_msg": delta(work, p, "tern_store_write_seconds_count") / sent_p,
            "store_syncs_per_msg": delta(work, p, "tern_store_sync_seconds_count") / sent_p,
            "syscalls_per_msg": counts.get("raw_syscalls:sys_enter", 0) / sent_p,
            "syscalls_by_kind_per_msg": {k: v / sent_p for k, v in sorted(calls.items(), key=lambda kv: -kv[1])},
        }
        rows.append(row)
    report = {"users": users, "durability": durability, "rates": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "events.json").write_text(json.dumps(report, indent=2) + "\n")

    lines = [
        f"Events per message, {users} users, durability {durability}",
        "",
        "| per message | " + " | ".join(f"{r['rate']:,} msg/s" for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]

    def row(label, key, fmt="{:.2f}"):
        lines.append(f"| {label} | " + " | ".join(fmt.format(r[key]) for r in rows) + " |")

    row("broker CPU (µs)", "cpu_us_per_msg", "{:.1f}")
    row("UDP datagrams (both ways, both processes)", "udp_datagrams_per_msg")
    row("broker system calls (all)", "syscalls_per_msg")
    row("broker context switches", "context_switches_per_msg")
    row("store write batches", "store_batches_per_msg")
    row("store syncs", "store_syncs_per_msg")
    row("deliveries (messages and receipts)", "deliveries_per_msg")
    kinds = []
    for r in rows:
        for k in r["syscalls_by_kind_per_msg"]:
            if k not in kinds:
                kinds.append(k)
    for k in kinds:
        if max(r["syscalls_by_kind_per_msg"].get(k, 0) for r in rows) < 0.005:
            continue
        lines.append(
            f"| `{k}` | " + " | ".join(f"{r['syscalls_by_kind_per_msg'].get(k, 0):.2f}" for r in rows) + " |"
        )
    (out / "events.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
