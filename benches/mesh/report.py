#!/usr/bin/env python3
"""Turns the JSON reports of benches/mesh/run.sh into mesh.md.

    python3 benches/mesh/report.py --data docs/bench/data/mesh --out docs/bench/mesh.md

Reads DATA/meta.json (machine, versions, settings), DATA/runs.jsonl (one line
per setup start and stop, loadgen run and skipped run, with exit status and
command), DATA/configs/ (the NATS configs, mesh status at start) and one
tern-loadgen JSON report per run. Writes one Markdown file: the two
cross-broker figures (Tern 3-broker p50 minus 1-broker p50 at the same
offered rate; Tern 3-broker max throughput over 1-broker), a table per setup
and every run. Only what was measured is shown; a missing value is "-".
Standard library only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SETUPS = ["tern-1", "tern-3", "nats-1", "nats-3"]
SETUP_NAMES = {
    "tern-1": "Tern, 1 broker",
    "tern-3": "Tern, 3-broker mesh",
    "nats-1": "NATS JetStream, 1 server",
    "nats-3": "NATS JetStream, 3-server cluster",
}
SETUP_MEANING = {
    "tern-1": "one `tern-broker`, no `--cluster`; `synced` durability (the default): the WAL is fsynced "
    "(group commit) before `SendAck`; a message is pushed to its recipient once written, while its sync runs",
    "tern-3": "three `tern-broker`s with `--node node-N --cluster DIR/node-N` (certificates from one "
    "`cluster-ca`), node-2 and node-3 started with `--join` node-1; `synced` durability. Loading starts once "
    "every broker's `mesh status` lists the two others alive with a link up. A message is stored at the "
    "sender's broker and shipped to the recipient's broker once written (acked to its sender after the sync), "
    "stored there and pushed once written (`ShipAck` after that broker's sync)",
    "nats-1": "one `nats-server` with JetStream, file storage and `sync_interval: always` (an fsync before "
    "each `PubAck`)",
    "nats-3": "three `nats-server`s in one cluster (routes between all three on loopback), JetStream with file "
    "storage and `sync_interval: always`. The run's stream has one replica (the loadgen's default), placed "
    "by JetStream on one server; users connected to the other two publish and pull through the cluster's "
    "routes",
}
P50_TARGET_US = 100.0
RATIO_TARGET = 0.70


# ----------------------------------------------------------------- input --


def load(data: Path) -> tuple[dict, list[dict], dict]:
    meta = json.loads((data / "meta.json").read_text()) if (data / "meta.json").exists() else {}
    events = []
    if (data / "runs.jsonl").exists():
        for line in (data / "runs.jsonl").read_text().splitlines():
            if line.strip():
                events.append(json.loads(line))
    reports = {}
    for ev in events:
        if ev.get("event") == "run" and ev.get("json"):
            path = data / ev["json"]
            try:
                reports[ev["json"]] = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                print(f"report.py: cannot read {path}: {e}", file=sys.stderr)
    return meta, events, reports


def get(d, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or d.get(key) is None:
            return default
        d = d[key]
    return d


def run_of(events: list[dict], reports: dict, setup: str, name: str) -> tuple[dict | None, dict | None]:
    """The last run NAME of SETUP and its report (a setup restarted after a failure may rerun nothing)."""
    found = None
    for ev in events:
        if ev.get("event") == "run" and ev.get("setup") == setup and ev.get("name") == name:
            found = ev
    if found is None:
        return None, None
    return found, reports.get(found.get("json") or "")


def skipped(events: list[dict], setup: str, name: str) -> str | None:
    for ev in events:
        if ev.get("event") == "skipped" and ev.get("setup") == setup and ev.get("name") == name:
            return ev.get("reason")
    return None


# ------------------------------------------------------------ formatting --


def us(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def num(v, digits=0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def table(header: list[str], rows: list[list[str]], align: str) -> str:
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fenced(lines: list[str], lang: str = "") -> list[str]:
    return [f"```{lang}", *lines, "```", ""]


def exit_cell(run: dict | None) -> str:
    if run is None:
        return "-"
    rc = run.get("exit")
    if rc == 0:
        return "0"
    if rc == 1:
        return "**1 LOST**"
    return f"{rc} ({run.get('exit_meaning', '')})"


def accounting(rep: dict | None) -> str:
    if not rep:
        return "-"
    return f"{rep.get('lost', 0)}/{rep.get('duplicated', 0)}/{rep.get('reordered', 0)}"


def latencies(rep: dict | None) -> str:
    d = get(rep, "deliver_latency_us")
    if not d or not d.get("count"):
        return "-"
    return f"{us(d.get('p50'))} / {us(d.get('p99'))} / {us(d.get('p999'))}"


# --------------------------------------------------------------- figures --


def p50(events, reports, setup: str, rate: int):
    return get(run_of(events, reports, setup, f"chat-{rate}")[1], "deliver_latency_us", "p50")


def max_rate(events, reports, setup: str):
    return get(run_of(events, reports, setup, "max")[1], "max", "max_sustained_per_s")


def saturated(events, reports, setup: str, rate: int, below: float) -> bool:
    rep = run_of(events, reports, setup, f"chat-{rate}")[1]
    acked = get(rep, "acked_per_s")
    return acked is not None and acked < below * rate


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("**met**" if ok else "**missed**")


def headline(events, reports, rates: list[int], below: float, fsync_us: float | None) -> list[str]:
    rows = []
    for rate in rates:
        one, three = p50(events, reports, "tern-1", rate), p50(events, reports, "tern-3", rate)
        diff = None if one is None or three is None else three - one
        note = ""
        if saturated(events, reports, "tern-1", rate, below) or saturated(events, reports, "tern-3", rate, below):
            note = " (a setup was saturated at this rate)"
        rows.append([
            f"cross-broker p50 overhead at {rate:,} msg/s: Tern 3-broker p50 − 1-broker p50",
            "-" if diff is None else f"{diff:+,.0f} µs ({us(three)} − {us(one)}){note}",
            f"≤ {P50_TARGET_US:.0f} µs", verdict(None if diff is None else diff <= P50_TARGET_US),
        ])
    m1, m3 = max_rate(events, reports, "tern-1"), max_rate(events, reports, "tern-3")
    ratio = m3 / m1 if m1 and m3 is not None else None
    rows.append([
        "cross-broker throughput ratio: Tern 3-broker max / 1-broker max",
        "-" if ratio is None else f"{ratio:.0%} ({num(m3)} / {num(m1)} msg/s)",
        f"≥ {RATIO_TARGET:.0%}", verdict(None if ratio is None else ratio >= RATIO_TARGET),
    ])
    out = [table(["figure", "measured", "target", ""], rows, "lrrl"), ""]
    if fsync_us:
        out += [f"Neither setup waits for an fsync before delivering (a message is pushed, or shipped, once "
                f"written; the sender's ack waits for the sync), but in the mesh three processes sync on the "
                f"same disk and their syncs queue: {fsync_us:,.0f} µs for a 4 KiB write + fsync on this disk "
                f"(median).", ""]
    ref = []
    for rate in rates:
        one, three = p50(events, reports, "nats-1", rate), p50(events, reports, "nats-3", rate)
        if one is not None and three is not None:
            sat = [SETUP_NAMES[s] for s in ("nats-1", "nats-3") if saturated(events, reports, s, rate, below)]
            note = f", saturated: {' and '.join(sat)}" if sat else ""
            ref.append(f"p50 at {rate:,} msg/s {three - one:+,.0f} µs ({us(three)} − {us(one)}{note})")
    n1, n3 = max_rate(events, reports, "nats-1"), max_rate(events, reports, "nats-3")
    if n1 and n3 is not None:
        ref.append(f"max {n3 / n1:.0%} ({num(n3)} / {num(n1)} msg/s)")
    if ref:
        out += [f"The same figures for NATS JetStream (3-server cluster against 1 server), for reference: "
                f"{'; '.join(ref)}.", ""]
    return out


def summary_table(events, reports, rates: list[int]) -> str:
    rows = []
    for setup in SETUPS:
        mx_run, mx = run_of(events, reports, setup, "max")
        cells = [SETUP_NAMES[setup], f"**{num(get(mx, 'max', 'max_sustained_per_s'))}**" if mx else "-"]
        lost = dup = reord = 0
        seen = False
        cpu = []
        for rate in rates:
            r, rep = run_of(events, reports, setup, f"chat-{rate}")
            why = skipped(events, setup, f"chat-{rate}")
            cells.append(latencies(rep) if rep else (f"skipped ({why})" if why else "-"))
            cpu.append(num(get(rep, "broker", "cpu_us_per_msg"), 1))
        for rep in [run_of(events, reports, setup, f"chat-{r}")[1] for r in rates] + [mx]:
            if rep:
                seen = True
                lost += rep.get("lost", 0)
                dup += rep.get("duplicated", 0)
                reord += rep.get("reordered", 0)
        cells.append(f"{lost}/{dup}/{reord}" if seen else "-")
        cells.append(" / ".join(cpu + [num(get(mx, "broker", "cpu_us_per_msg"), 1)]))
        rows.append(cells)
    header = (["setup", "max sustained msg/s"]
              + [f"p50 / p99 / p99.9 µs at {r:,} msg/s" for r in rates]
              + ["lost/dup/reord (all runs)",
                 "broker CPU µs/msg (" + ", ".join(f"{r:,}" for r in rates) + ", max)"])
    return table(header, rows, "lr" + "r" * len(rates) + "rr")


def runs_table(events, reports) -> str:
    rows = []
    for ev in events:
        if ev.get("event") not in ("run", "skipped"):
            continue
        if ev["event"] == "skipped":
            rows.append([SETUP_NAMES.get(ev["setup"], ev["setup"]), ev["name"],
                         f"skipped: {ev.get('reason', '')}"] + [""] * 9)
            continue
        rep = reports.get(ev.get("json") or "")
        d = get(rep, "deliver_latency_us", default={})
        rows.append([
            SETUP_NAMES.get(ev["setup"], ev["setup"]), ev["name"], num(get(rep, "acked_per_s")),
            num(get(rep, "throughput_per_s")), us(d.get("p50")), us(d.get("p99")), us(d.get("p999")),
            us(d.get("max")), accounting(rep), num(get(rep, "broker", "cpu_us_per_msg"), 1),
            num(get(rep, "broker", "brokers")), exit_cell(ev),
        ])
    header = ["setup", "run", "acked/s", "delivered/s", "p50 µs", "p99 µs", "p99.9 µs", "max µs",
              "lost/dup/reord", "CPU µs/msg", "brokers measured", "exit"]
    return table(header, rows, "llrrrrrrrrrl")


def stages_tables(events, reports) -> list[str]:
    out = []
    for setup in SETUPS:
        stages = get(run_of(events, reports, setup, "max")[1], "max", "stages", default=[])
        if not stages:
            continue
        rows = [[num(s.get("in_flight")), num(s.get("seconds"), 1), num(s.get("acked_per_s")),
                 num(s.get("delivered_per_s")), us(s.get("ack_p99_us")), us(s.get("deliver_p50_us")),
                 us(s.get("deliver_p99_us")), num(s.get("backlog")), "yes" if s.get("within_bounds") else "no"]
                for s in stages]
        stop = get(run_of(events, reports, setup, "max")[1], "max", "stopped_because", default="")
        out += [f"**{SETUP_NAMES[setup]}** (ramp stopped because: {stop or '-'})", "",
                table(["in flight", "s", "acked/s", "delivered/s", "ack p99 µs", "deliver p50 µs",
                       "deliver p99 µs", "backlog", "within bounds"], rows, "rrrrrrrrl"), ""]
    return out


def anomalies(events) -> list[str]:
    out = []
    for ev in events:
        label = f"{SETUP_NAMES.get(ev.get('setup'), ev.get('setup'))} {ev.get('name', '')}".strip()
        if ev.get("event") == "run" and ev.get("exit") != 0:
            out.append(f"- {label}: exit {ev.get('exit')} ({ev.get('exit_meaning')})")
        if ev.get("event") == "run" and (ev.get("busy_before_pct") or 0) > 15:
            out.append(f"- {label}: other work kept {ev['busy_before_pct']}% of the CPUs busy just before the run"
                       + (f" ({ev['busy_with']})" if ev.get("busy_with") else "") + "; its numbers are doubtful")
        if ev.get("event") in ("restarted", "broker-died"):
            out.append(f"- {label}: setup {ev['event']} after {ev.get('after') or ev.get('name')}")
    return out


# ---------------------------------------------------------------- report --


def render(meta: dict, events: list[dict], reports: dict, data: Path, out: Path, elapsed: int | None) -> str:
    m, v, s = meta.get("machine", {}), meta.get("versions", {}), meta.get("settings", {})
    rates = s.get("rates") or sorted({int(e["name"].split("-")[1]) for e in events
                                      if str(e.get("name", "")).startswith("chat-")})
    below = s.get("saturated_below", 0.9)
    try:
        rel = data.resolve().relative_to(out.parent.resolve())
    except ValueError:
        rel = data
    when = meta.get("date", "?")
    lines = [
        "# Cross-broker cost: one Tern broker against a 3-broker mesh",
        "",
        f"Generated by `benches/mesh/report.py` from the JSON in [`{rel}/`]({rel}/) of one "
        f"`bash benches/mesh/run.sh{' --quick' if meta.get('mode') == 'quick' else ''}` run on {when} "
        f"(commit {meta.get('git', '?')}"
        + (f", {elapsed // 60} min {elapsed % 60} s in all" if elapsed else "")
        + "). Do not edit by hand: run the script again.",
        "",
    ]
    if meta.get("mode") == "quick":
        lines += ["**Quick mode**: short runs to check the script, not measurements.", ""]
    lines += [
        f"**Everything shares this {m.get('nproc', '?')}-CPU machine**: in the 3-broker setups three broker "
        "processes and the load generator compete for the same CPUs over loopback, so these numbers compare "
        "the setups with each other under identical conditions; they are not what a mesh of separate "
        "machines does. With several brokers user *i* connects to broker *i* mod 3 and talks to user *i* xor 1, "
        "so **every conversation crosses brokers** in the 3-broker setups.",
        "",
        "## Headline",
        "",
        *headline(events, reports, rates, below, m.get("fsync_4k_median_us")),
        "## Results",
        "",
        "Send→deliver latency is measured from the scheduled send time (open loop, no coordinated omission). "
        "Broker CPU is the sum over the setup's broker processes (from /proc) divided by delivered messages; "
        "in the 3-broker setups a message is handled by two brokers.",
        "",
        summary_table(events, reports, rates),
        "",
        "### Every run",
        "",
        runs_table(events, reports),
        "",
        "### `max` ramps",
        "",
        *stages_tables(events, reports),
    ]
    odd = anomalies(events)
    if odd:
        lines += ["### Anomalies", "", *odd, ""]
    lines += [
        "## Setups",
        "",
        table(["setup", "what runs"], [[SETUP_NAMES[k], SETUP_MEANING[k]] for k in SETUPS], "ll"),
        "",
        "Each setup starts on free loopback ports with fresh temporary data directories, runs `chat` at each "
        "offered rate (lowest first; after a saturated rate, with acked/s below "
        f"{below:.0%} of offered, the higher rates are skipped), then `max`, and is stopped.",
        "",
        "## Machine",
        "",
        table(["", ""], [
            ["CPUs (nproc)", str(m.get("nproc", "-"))],
            ["CPU model", m.get("cpu", "-")],
            ["kernel", m.get("kernel", "-")],
            ["OS", m.get("os", "-")],
            ["memory", f"{m['mem_kib'] / 1048576:.1f} GiB" if m.get("mem_kib") else "-"],
            ["filesystem of the data dirs", m.get("filesystem", "-")],
            ["4 KiB write + fsync there (median of 200)",
             f"{m['fsync_4k_median_us']:,.0f} µs" if m.get("fsync_4k_median_us") else "-"],
        ], "ll"),
        "",
        "## Versions",
        "",
        table(["", ""], [[k, f"`{val}`"] for k, val in v.items()], "ll"),
        "",
        "## Settings",
        "",
        table(["", ""], [
            ["users (one connection each)", num(s.get("users"))],
            ["message body", f"{num(s.get('body_bytes'))} B"],
            ["chat offered rates", ", ".join(f"{r:,} msg/s" for r in rates)],
            ["chat duration", f"{num(s.get('warmup_s'), 0)} s warm-up + {num(s.get('chat_duration_s'), 0)} s measured"],
            ["max duration", f"{num(s.get('max_duration_s'), 0)} s (stages of doubling sends in flight)"],
        ], "ll"),
        "",
        "## Commands",
        "",
    ]
    cmds = []
    for ev in events:
        if ev.get("event") == "started":
            cmds.append(f"# {SETUP_NAMES.get(ev['setup'], ev['setup'])}")
            cmds += [f"{c} &" for c in ev.get("commands", [])]
        elif ev.get("event") == "run":
            cmds.append(ev.get("command", ""))
    lines += fenced(cmds, "sh")
    configs = sorted((data / "configs").glob("*")) if (data / "configs").is_dir() else []
    if configs:
        lines += ["Configurations and mesh status at start:", ""]
        for c in configs:
            lines += [f"`{c.name}`", "", *fenced(c.read_text().rstrip("\n").splitlines())]
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="directory with meta.json, runs.jsonl and the JSON")
    ap.add_argument("--out", type=Path, required=True, help="the Markdown file to write")
    ap.add_argument("--elapsed", type=int, help="seconds the whole run took")
    args = ap.parse_args()
    meta, events, reports = load(args.data)
    if not events:
        print(f"report.py: no runs recorded in {args.data}/runs.jsonl", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(meta, events, reports, args.data, args.out, args.elapsed))
    print(f"wrote {args.out}")
    # The headline again, for benches/compare/report.py to put in RESULTS.md.
    s = meta.get("settings", {})
    lines = [f"From `bash benches/mesh/run.sh` on {meta.get('date', '?')} (commit {meta.get('git', '?')}), "
             f"{meta.get('machine', {}).get('nproc', '?')} CPUs shared by every broker and the load generator; "
             f"every conversation crosses brokers in the 3-broker setups.", "",
             *headline(events, reports, s.get("rates", []), s.get("saturated_below", 0.9),
                       meta.get("machine", {}).get("fsync_4k_median_us"))]
    (args.data / "headline.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
