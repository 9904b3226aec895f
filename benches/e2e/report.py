#!/usr/bin/env python3
"""Medians of benches/e2e/run.sh's runs: writes OUT/tables.md (every metric,
per rate and setup, with the e2e/plain ratios) and OUT/headline.md (the
short table docs/bench/RESULTS.md includes).

    python3 benches/e2e/report.py OUT USERS

Every run found in OUT counts (chat-RATE-SETUP-ROUND.json,
keys-BROKERS-ROUND.json), so sessions that added a rate or rounds later
are summarised together.
"""
import json
import re
import statistics
import sys
from pathlib import Path

CONFIGS = [("plain-1", "no e2e, 1 device"), ("plain-3", "no e2e, 3 devices"), ("e2e-3", "e2e, 3 devices")]


def rounds_of(out, prefix):
    """The round numbers of OUT/PREFIX-ROUND.json, in order."""
    found = (re.fullmatch(re.escape(prefix) + r"-(\d+)\.json", p.name) for p in out.glob(prefix + "-*.json"))
    return sorted(int(m.group(1)) for m in found if m)


def load(out, name):
    p = out / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def med(runs, get):
    vals = [get(r) for r in runs if r is not None]
    return statistics.median(vals) if vals else None


def fmt(v, digits=0):
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


def ratio(a, b):
    return "n/a" if a is None or not b else f"{a / b:.2f}"


def per_send_loadgen(r):
    return r["loadgen_cpu_s"] * 1e6 / max(r["acked"], 1)


CHAT_ROWS = [
    ("deliveries per message", lambda r: r["deliveries_per_message"], 0),
    ("acked sends/s", lambda r: r["acked_per_s"], 0),
    ("deliveries/s", lambda r: r["throughput_per_s"], 0),
    ("send→deliver p50 (µs)", lambda r: r["deliver_latency_us"]["p50"], 0),
    ("send→deliver p99 (µs)", lambda r: r["deliver_latency_us"]["p99"], 0),
    ("send→ack p50 (µs)", lambda r: r["ack_latency_us"]["p50"], 0),
    ("send→ack p99 (µs)", lambda r: r["ack_latency_us"]["p99"], 0),
    ("broker CPU µs per delivery", lambda r: r["broker"]["cpu_us_per_msg"], 1),
    ("broker CPU µs per send", lambda r: r["broker"]["cpu_us_per_send"], 1),
    ("loadgen CPU µs per send (all its clients)", per_send_loadgen, 1),
]

KEYS_ROWS = [
    ("claims/s", lambda r: r["keys"]["claims_per_s"], 0),
    ("claim p50 (µs)", lambda r: r["keys"]["claim_latency_us"]["p50"], 0),
    ("claim p99 (µs)", lambda r: r["keys"]["claim_latency_us"]["p99"], 0),
    ("one-time keys handed out", lambda r: r["keys"]["one_time_keys"], 0),
    ("one-time keys handed out twice", lambda r: r["keys"]["one_time_keys_twice"], 0),
    ("fallback keys handed out", lambda r: r["keys"]["fallback_keys"], 0),
    ("claim errors", lambda r: sum(r["keys"]["errors"].values()), 0),
    ("broker CPU µs per claim (all brokers)", lambda r: r["keys"]["broker_cpu_us_per_claim"], 1),
]


def machine_cores(out, name):
    """Average busy CPUs of the whole machine over a run (run.sh's NAME.machine)."""
    p = out / f"{name}.machine"
    if not p.exists():
        return None
    busy, hz, secs = (int(x) for x in p.read_text().split())
    return busy / hz / max(secs, 1)


def anomalies(runs):
    runs = [r for r in runs if r is not None]
    return {k: sum(r[k] for r in runs) for k in ("lost", "duplicated", "reordered", "failed", "undecryptable")}


def chat_table(out, rate):
    rounds = {c: rounds_of(out, f"chat-{rate}-{c}") for c, _ in CONFIGS}
    runs = {c: [load(out, f"chat-{rate}-{c}-{i}") for i in rounds[c]] for c, _ in CONFIGS}
    n = {c: sum(r is not None for r in runs[c]) for c, _ in CONFIGS}
    lines = [f"### chat at {rate:,} msg/s", "",
             f"Median of {'–'.join(map(str, sorted(set(n.values()))))} runs per setup, alternated "
             "(order rotated each round).", "",
             "| metric | " + " | ".join(label for _, label in CONFIGS) + " | e2e-3 / plain-3 | e2e-3 / plain-1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    meds = {}
    for name, get, digits in CHAT_ROWS:
        m = {c: med(runs[c], get) for c, _ in CONFIGS}
        meds[name] = m
        lines.append(f"| {name} | " + " | ".join(fmt(m[c], digits) for c, _ in CONFIGS)
                     + f" | {ratio(m['e2e-3'], m['plain-3'])} | {ratio(m['e2e-3'], m['plain-1'])} |")
    cores = {c: statistics.median([v for i in rounds[c]
                                   if (v := machine_cores(out, f"chat-{rate}-{c}-{i}")) is not None] or [0])
             for c, _ in CONFIGS}
    lines.append("| whole machine busy CPUs over the run (all processes) | "
                 + " | ".join(f"{cores[c]:.2f}" for c, _ in CONFIGS) + " | | |")
    a = {c: anomalies(runs[c]) for c, _ in CONFIGS}
    lines.append("| lost / duplicated / reordered (sum over runs) | "
                 + " | ".join(f"{a[c]['lost']} / {a[c]['duplicated']} / {a[c]['reordered']}" for c, _ in CONFIGS)
                 + " | | |")
    lines.append("| failed sends / undecryptable (sum) | "
                 + " | ".join(f"{a[c]['failed']} / {a[c]['undecryptable']}" for c, _ in CONFIGS) + " | | |")
    return lines, meds


def keys_table(out):
    rounds = {n: rounds_of(out, f"keys-{n}") for n in (1, 3)}
    runs = {n: [load(out, f"keys-{n}-{i}") for i in rounds[n]] for n in (1, 3)}
    counts = sorted({len(r) for r in rounds.values()})
    lines = ["### keys: claims through one broker and through a 3-broker mesh", "",
             f"Median of {'–'.join(map(str, counts))} runs per setup, alternated.", "",
             "| metric | 1 broker | 3-broker mesh | mesh / 1 broker |", "| --- | ---: | ---: | ---: |"]
    meds = {}
    for name, get, digits in KEYS_ROWS:
        m = {n: med(runs[n], get) for n in (1, 3)}
        meds[name] = m
        lines.append(f"| {name} | {fmt(m[1], digits)} | {fmt(m[3], digits)} | {ratio(m[3], m[1])} |")
    cores = {n: statistics.median([v for i in rounds[n]
                                   if (v := machine_cores(out, f"keys-{n}-{i}")) is not None] or [0]) for n in (1, 3)}
    lines.append(f"| whole machine busy CPUs over the run (all processes) | {cores[1]:.2f} | {cores[3]:.2f} | |")
    return lines, meds


def main():
    out, users = Path(sys.argv[1]), int(sys.argv[2])
    rates = sorted({int(m.group(1)) for p in out.glob("chat-*.json")
                    if (m := re.fullmatch(r"chat-(\d+)-.*\.json", p.name))})
    tables, head = [], []
    chat = {}
    for rate in rates:
        if rates:
            lines, meds = chat_table(out, rate)
            tables += lines + [""]
            chat[rate] = meds
    keys = None
    if list(out.glob("keys-*.json")):
        lines, keys = keys_table(out)
        tables += lines + [""]
    (out / "tables.md").write_text("\n".join(tables))

    head.append(f"{users} users, synced durability, one machine (2 CPUs shared by broker and load generator); "
                "medians of alternated runs.")
    head.append("")
    if chat:
        head += ["| chat | rate | p50 send→deliver (µs) | p99 send→deliver (µs) | broker CPU µs per send | "
                 "broker CPU µs per delivery |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for rate, m in chat.items():
            for c, label in CONFIGS:
                acked = m["acked sends/s"][c]
                if acked is not None and acked < 0.97 * rate:
                    label = f"{label} (saturated: {acked:,.0f} sends/s acked)"
                head.append(f"| {label} | {rate:,} | {fmt(m['send→deliver p50 (µs)'][c])} | "
                            f"{fmt(m['send→deliver p99 (µs)'][c])} | {fmt(m['broker CPU µs per send'][c], 1)} | "
                            f"{fmt(m['broker CPU µs per delivery'][c], 1)} |")
            r = lambda k: ratio(m[k]["e2e-3"], m[k]["plain-3"])
            head.append(f"| *e2e-3 / plain-3* | {rate:,} | {r('send→deliver p50 (µs)')} | "
                        f"{r('send→deliver p99 (µs)')} | {r('broker CPU µs per send')} | "
                        f"{r('broker CPU µs per delivery')} |")
        head.append("")
        head.append("*Saturated*: the setup could not be offered its rate on this machine (load generator and "
                    "broker share 2 CPUs; the e2e clients' crypto runs in the load generator), so its latency is "
                    "queueing, and its broker CPU per send is that of the lower rate it reached.")
        head.append("")
    if keys:
        head += ["| key claims | claims/s | p50 (µs) | p99 (µs) | one-time keys handed out twice | fallback keys |",
                 "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for n, label in ((1, "1 broker"), (3, "3-broker mesh")):
            head.append(f"| {label} | {fmt(keys['claims/s'][n])} | {fmt(keys['claim p50 (µs)'][n])} | "
                        f"{fmt(keys['claim p99 (µs)'][n])} | {fmt(keys['one-time keys handed out twice'][n])} | "
                        f"{fmt(keys['fallback keys handed out'][n])} |")
    (out / "headline.md").write_text("\n".join(head) + "\n")
    print((out / "tables.md").read_text())


if __name__ == "__main__":
    main()
