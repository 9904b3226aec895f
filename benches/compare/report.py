#!/usr/bin/env python3
"""Turns the JSON reports of benches/compare/run.sh into RESULTS.md and plots.

    python3 benches/compare/report.py --data docs/bench/data --out docs/bench

Reads DATA/meta.json (machine, versions, settings), DATA/runs.jsonl (one line
per broker start, loadgen run, skipped run and broker stop, with exit status
and command), DATA/configs/ (the peers' configuration files) and one
tern-loadgen JSON report per run. Writes OUT/RESULTS.md, OUT/latency.png and
OUT/max_throughput.png. Only what was measured is shown; a missing value is
printed as "-".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

BROKERS = ["tern", "nats", "mosquitto"]
BROKER_NAMES = {"tern": "Tern", "nats": "NATS JetStream", "mosquitto": "Mosquitto"}
TIERS = ["T0", "T1", "T2"]
TIER_NAMES = {"T0": "T0 memory", "T1": "T1 written", "T2": "T2 synced"}
COLORS = {"tern": "#1f77b4", "nats": "#2ca02c", "mosquitto": "#ff7f0e"}
STYLES = {"T0": ":", "T1": "--", "T2": "-"}
MARKERS = {"T0": "o", "T1": "s", "T2": "^"}

TIER_MEANING = {
    "T0": {
        "what": "acknowledged once in the broker's memory; nothing on disk",
        "tern": "`--durability written` with the data directory on a tmpfs (`/dev/shm`): Tern has no "
        "in-memory mode, so its WAL and tables are written to memory and nothing reaches a disk",
        "nats": "JetStream stream with `storage: memory` (the loadgen creates it so, from "
        "`TERN_LOADGEN_NATS_STORAGE=memory`)",
        "mosquitto": "`persistence false`",
    },
    "T1": {
        "what": "written towards disk, not synced: survives a broker crash at best, not a power loss",
        "tern": "`--durability written`: WAL written to the OS before the ack, never fsynced per send",
        "nats": "file storage with the default `sync_interval` (2 min): written to its block files, "
        "fsynced at most every 2 minutes",
        "mosquitto": "`persistence true` with the default `autosave_interval` (1800 s): the whole in-memory "
        "database is saved to `mosquitto.db` every 30 minutes and at a clean exit, never per "
        "message. This is the closest mosquitto has to T1 and it is weaker: a broker crash loses "
        "acknowledged messages too",
    },
    "T2": {
        "what": "synced before the ack: survives a power loss",
        "tern": "`--durability synced` (the default): WAL fsynced before `SendAck`, with group commit",
        "nats": "file storage with `jetstream { sync_interval: always }`: an fsync on every write "
        "(the server's /varz reports `sync_always: true`)",
        "mosquitto": "n/a: mosquitto never syncs a message before its PUBACK",
    },
}


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


def runs(events: list[dict], reports: dict, scenario: str) -> list[dict]:
    """Loadgen runs of one scenario, each with its report (or None), in order."""
    out = []
    for ev in events:
        if ev.get("event") == "run" and ev.get("scenario") == scenario:
            out.append({**ev, "report": reports.get(ev.get("json") or "")})
    return out


def get(d: dict | None, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or d.get(key) is None:
            return default
        d = d[key]
    return d


# ------------------------------------------------------------ formatting --


def ms(us) -> str:
    if us is None:
        return "-"
    v = us / 1000.0
    if v < 10:
        return f"{v:.2f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:,.0f}"


def num(v, digits=0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def mib(b) -> str:
    return "-" if b is None else f"{b / 1048576:,.0f}"


def ratio(a, b) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or ("l" * 2 + "r" * (len(header) - 2))
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fenced(lines: list[str], lang: str = "") -> list[str]:
    """A Markdown code block of `lines`, followed by a blank line."""
    return [f"```{lang}", *lines, "```", ""]


def exit_cell(run: dict) -> str:
    rc = run.get("exit")
    if rc == 0:
        return "0"
    if rc == 1:
        return "**1 LOST**"
    return f"{rc} ({run.get('exit_meaning', '')})"


def order(r: dict) -> tuple:
    return (BROKERS.index(r["broker"]) if r["broker"] in BROKERS else 9, r["tier"], offered(r) or 0)


def accounting(rep: dict | None) -> str:
    if not rep:
        return "-"
    return f"{rep.get('lost', 0)}/{rep.get('duplicated', 0)}/{rep.get('reordered', 0)}"


def offered(run: dict) -> float | None:
    rate = get(run, "report", "offered_rate")
    if rate is None and run.get("name", "").startswith("chat-"):
        try:
            rate = float(run["name"].split("-", 1)[1])
        except ValueError:
            pass
    return rate


# ---------------------------------------------------------------- tables --


def chat_table(chat: list[dict], events: list[dict]) -> str:
    rows = []
    for r in sorted(chat, key=order):
        rep = r["report"]
        d = get(rep, "deliver_latency_us", default={})
        rows.append([
            BROKER_NAMES.get(r["broker"], r["broker"]), TIER_NAMES.get(r["tier"], r["tier"]),
            num(offered(r)), num(get(rep, "acked_per_s")), num(get(rep, "throughput_per_s")),
            ms(d.get("p50")), ms(d.get("p90")), ms(d.get("p99")), ms(d.get("p999")), ms(d.get("max")),
            ms(get(rep, "ack_latency_us", "p99")), accounting(rep),
            num(get(rep, "broker", "cpu_us_per_msg"), 1), mib(get(rep, "broker", "rss_bytes")), exit_cell(r),
        ])
    for ev in events:
        if ev.get("event") == "skipped" and ev.get("scenario") == "chat":
            rows.append([BROKER_NAMES.get(ev["broker"], ev["broker"]), TIER_NAMES.get(ev["tier"], ev["tier"]),
                         num(ev.get("offered_rate")), f"skipped: {ev.get('reason', '')}"] + [""] * 11)
    rows.sort(key=lambda row: (list(BROKER_NAMES.values()).index(row[0]) if row[0] in BROKER_NAMES.values() else 9,
                               row[1], float(row[2].replace(",", "") or 0) if row[2] != "-" else 0))
    header = ["broker", "tier", "offered msg/s", "acked/s", "delivered/s", "p50", "p90", "p99", "p99.9", "max",
              "ack p99", "lost/dup/reord", "CPU µs/msg", "RSS MiB", "exit"]
    return table(header, rows, "llrrrrrrrrrrrrl")


def best_stage(rep: dict | None) -> dict | None:
    stages = [s for s in get(rep, "max", "stages", default=[]) if s.get("within_bounds")]
    return max(stages, key=lambda s: s.get("delivered_per_s", 0), default=None)


def max_table(mx: list[dict]) -> str:
    rows = []
    for r in sorted(mx, key=order):
        rep = r["report"]
        best = best_stage(rep) or {}
        rows.append([
            BROKER_NAMES.get(r["broker"], r["broker"]), TIER_NAMES.get(r["tier"], r["tier"]),
            f"**{num(get(rep, 'max', 'max_sustained_per_s'))}**" if rep else "-",
            num(best.get("in_flight")), ms(best.get("ack_p99_us")), ms(best.get("deliver_p50_us")),
            ms(best.get("deliver_p99_us")), get(rep, "max", "stopped_because", default="-") or "-",
            accounting(rep), num(get(rep, "broker", "cpu_us_per_msg"), 1), mib(get(rep, "broker", "rss_bytes")),
            exit_cell(r),
        ])
    header = ["broker", "tier", "max sustained msg/s", "in flight", "ack p99", "deliver p50", "deliver p99",
              "ramp stopped because", "lost/dup/reord", "CPU µs/msg", "RSS MiB", "exit"]
    return table(header, rows, "llrrrrrlrrrl")


def stages_tables(mx: list[dict]) -> str:
    out = []
    for r in sorted(mx, key=order):
        stages = get(r["report"], "max", "stages", default=[])
        if not stages:
            continue
        rows = [[num(s.get("in_flight")), num(s.get("seconds"), 1), num(s.get("acked_per_s")),
                 num(s.get("delivered_per_s")), ms(s.get("ack_p99_us")), ms(s.get("deliver_p50_us")),
                 ms(s.get("deliver_p99_us")), num(s.get("backlog")), "yes" if s.get("within_bounds") else "no"]
                for s in stages]
        out.append(f"**{BROKER_NAMES.get(r['broker'])} {TIER_NAMES.get(r['tier'])}**\n\n" + table(
            ["in flight", "s", "acked/s", "delivered/s", "ack p99", "deliver p50", "deliver p99", "backlog",
             "within bounds"], rows, "rrrrrrrrl"))
    return "\n\n".join(out)


# ----------------------------------------------------------------- plots --


def plots(chat: list[dict], mx: list[dict], out: Path, saturated_below: float) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib missing; no plots (pip install matplotlib)", file=sys.stderr)
        return []
    made = []

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    series: dict[tuple[str, str], list[tuple[float, float, float, bool]]] = {}
    for r in chat:
        rep = r["report"]
        d = get(rep, "deliver_latency_us")
        if not d or not d.get("count"):
            continue
        rate = offered(r)
        sat = (get(rep, "acked_per_s", default=0) or 0) < saturated_below * rate
        series.setdefault((r["broker"], r["tier"]), []).append((rate, d["p50"] / 1000, d["p99"] / 1000, sat))
    for ax, idx, title in ((axes[0], 1, "p50"), (axes[1], 2, "p99")):
        for (broker, tier), pts in sorted(series.items(), key=lambda kv: (BROKERS.index(kv[0][0]), kv[0][1])):
            pts.sort()
            xs = [p[0] for p in pts]
            ys = [max(p[idx], 1e-3) for p in pts]
            ax.plot(xs, ys, linestyle=STYLES[tier], color=COLORS[broker], linewidth=1.6,
                    label=f"{BROKER_NAMES[broker]} {TIER_NAMES[tier]}")
            for x, y, p in zip(xs, ys, pts):
                ax.plot([x], [y], marker=MARKERS[tier], color=COLORS[broker],
                        markerfacecolor="white" if p[3] else COLORS[broker], markersize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered rate (msg/s)")
        ax.set_title(f"{title} send→deliver latency")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (ms, log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("chat scenario: send→deliver latency against offered rate "
                 f"(hollow marker: acked/s below {saturated_below:.0%} of offered)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    made.append("latency.png")

    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.26
    values = {(r["broker"], r["tier"]): get(r["report"], "max", "max_sustained_per_s") for r in mx}
    top = max([v for v in values.values() if v] or [1])
    for i, broker in enumerate(BROKERS):
        xs = [t + (i - 1) * width for t in range(len(TIERS))]
        ys = [values.get((broker, tier)) for tier in TIERS]
        ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width,
               color=COLORS[broker], label=BROKER_NAMES[broker])
        for x, y in zip(xs, ys):
            ax.text(x, (y or 0) + top * 0.01, "n/a" if y is None else f"{y:,.0f}", ha="center", va="bottom",
                    fontsize=8 if y is not None else 9, rotation=90 if y is not None else 0,
                    color="black" if y is not None else COLORS[broker])
    ax.set_xticks(range(len(TIERS)), [TIER_NAMES[t] for t in TIERS])
    ax.set_xlim(-0.6, len(TIERS) - 0.3)
    ax.set_ylabel("max sustained delivered msg/s")
    ax.set_ylim(0, top * 1.25)
    ax.set_title("max scenario: highest rate sustained within bounds, per durability tier")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "max_throughput.png", dpi=110)
    plt.close(fig)
    made.append("max_throughput.png")
    return made


# ---------------------------------------------------------------- report --


def find(runs_: list[dict], broker: str, tier: str, rate: float | None = None) -> dict | None:
    for r in runs_:
        if r["broker"] == broker and r["tier"] == tier and (rate is None or offered(r) == rate):
            return r["report"]
    return None


def saturation(events: list[dict], broker: str, tier: str, rate: float) -> str | None:
    """Why the chat run at `rate` is missing, if the sweep skipped it."""
    for ev in events:
        if (ev.get("event") == "skipped" and ev.get("broker") == broker and ev.get("tier") == tier
                and float(ev.get("offered_rate") or -1) == rate):
            return ev.get("reason")
    return None


def p99_cell(c: dict | None, events: list[dict], broker: str, tier: str, rate: float) -> str:
    if c is not None:
        return ms(get(c, "deliver_latency_us", "p99"))
    why = saturation(events, broker, tier, rate)
    return f"not run ({why})" if why else "-"


def headline(chat: list[dict], mx: list[dict], events: list[dict], ratio_rate: float) -> str:
    lines = []
    rows = []
    for broker in BROKERS:
        for tier in TIERS:
            if broker == "mosquitto" and tier == "T2":
                rows.append([BROKER_NAMES[broker], TIER_NAMES[tier], "n/a", "n/a", "n/a"])
                continue
            m = find(mx, broker, tier)
            c = find(chat, broker, tier, ratio_rate)
            if m is None and c is None:
                continue
            rows.append([BROKER_NAMES[broker], TIER_NAMES[tier], num(get(m, "max", "max_sustained_per_s")),
                         p99_cell(c, events, broker, tier, ratio_rate), num(get(m, "broker", "cpu_us_per_msg"), 1)])
    lines.append(table(["broker", "tier", "max sustained msg/s", f"p99 send→deliver at {ratio_rate:,.0f} msg/s (ms)",
                        "broker CPU µs/msg (max run)"], rows))
    lines.append("")
    lines.append("Ratios (Tern / NATS JetStream):")
    lines.append("")
    for tier in TIERS:
        t_max = get(find(mx, "tern", tier), "max", "max_sustained_per_s")
        n_max = get(find(mx, "nats", tier), "max", "max_sustained_per_s")
        t_p99 = get(find(chat, "tern", tier, ratio_rate), "deliver_latency_us", "p99")
        n_p99 = get(find(chat, "nats", tier, ratio_rate), "deliver_latency_us", "p99")
        if None in (t_max, n_max) and None in (t_p99, n_p99):
            continue
        p99_text = (f"{ratio(t_p99, n_p99)} ({ms(t_p99)} vs {ms(n_p99)} ms; below 1 means Tern is faster)"
                    if None not in (t_p99, n_p99) else
                    f"n/a (Tern {p99_cell(find(chat, 'tern', tier, ratio_rate), events, 'tern', tier, ratio_rate)}"
                    f", NATS {p99_cell(find(chat, 'nats', tier, ratio_rate), events, 'nats', tier, ratio_rate)})")
        lines.append(f"- {TIER_NAMES[tier]}: max sustained throughput {ratio(t_max, n_max)} "
                     f"({num(t_max)} vs {num(n_max)} msg/s); p99 send→deliver at {ratio_rate:,.0f} msg/s "
                     + p99_text)
    return "\n".join(lines)


def other_cpu(r: dict) -> float | None:
    """CPU seconds the rest of the machine used during a run (an upper bound:
    the broker's and load generator's set-up time counts here too)."""
    rep = r.get("report")
    if r.get("machine_cpu_s") is None or not r.get("wall_s") or not rep:
        return None
    own = (get(rep, "broker", "cpu_s", default=0) or 0) + (rep.get("loadgen_cpu_s") or 0)
    return max(r["machine_cpu_s"] - own, 0.0)


def anomalies(all_runs: list[dict], events: list[dict]) -> tuple[list[str], list[str]]:
    lost, odd = [], []
    for r in sorted(all_runs, key=order):
        rep = r["report"]
        label = f"{BROKER_NAMES.get(r['broker'])} {TIER_NAMES.get(r['tier'])} `{r.get('name')}`"
        if r.get("exit") == 1 or (rep and rep.get("lost", 0) > 0):
            lost.append(f"- {label}: **{get(rep, 'lost', default='?')} acknowledged messages lost** "
                        f"(of {get(rep, 'acked', default='?')} acked; loadgen exit {r.get('exit')})")
        if (r.get("busy_before_pct") or 0) > 15:
            odd.append(f"- {label}: other work kept {r['busy_before_pct']}% of the CPUs busy just before the run"
                       + (f" ({r['busy_with']})" if r.get("busy_with") else "") + "; its numbers are not trustworthy")
        other = other_cpu(r)
        if other is not None and other > 0.6 * r["wall_s"]:
            odd.append(f"- {label}: processes other than this broker and the load generator used about "
                       f"{other:.1f} CPU-seconds during the {r['wall_s']:.0f} s run; its numbers may be disturbed")
        if r.get("exit") not in (0, 1):
            odd.append(f"- {label}: exit {r.get('exit')} ({r.get('exit_meaning')}); see "
                       f"target/compare/logs/{r['broker']}-{r['tier']}-{r.get('name')}.loadgen.log")
        if rep:
            errs = {k: v for k, v in (rep.get("errors") or {}).items() if v}
            if errs or rep.get("failed"):
                odd.append(f"- {label}: {rep.get('failed', 0)} sends failed: "
                           + ", ".join(f"{k} {v}" for k, v in sorted(errs.items())))
            for key in ("duplicated", "reordered", "delivered_unacked"):
                if rep.get(key):
                    odd.append(f"- {label}: **{key} {rep[key]:,}** (of {rep.get('delivered', 0):,} delivered)")
    for ev in events:
        who = f"{BROKER_NAMES.get(ev.get('broker'))} {TIER_NAMES.get(ev.get('tier'))}"
        if ev.get("event") == "broker-died":
            odd.append(f"- {who}: the broker exited during `{ev.get('name')}`; a fresh one ran the rest")
        elif ev.get("event") == "restarted":
            odd.append(f"- {who}: restarted with a fresh data directory after `{ev.get('after')}` failed "
                       f"(exit {ev.get('exit')})")
        elif ev.get("event") == "stopped" and str(ev.get("stopped_by", "SIGTERM")).startswith("SIGKILL"):
            odd.append(f"- {who}: the broker did not exit within 15 s of SIGTERM and was killed")
    return lost, odd


def fsync_text(m: dict, events: list[dict]) -> str:
    probes = [("before the runs", m.get("fsync_4k_median_us"))]
    probes += [("after them", ev.get("fsync_4k_median_us")) for ev in events if ev.get("event") == "fsync-probe"]
    shown = [f"{v:,.0f} µs {when}" for when, v in probes if v is not None]
    return ", ".join(shown) if shown else "-"


def render(meta: dict, events: list[dict], reports: dict, data: Path, out: Path, elapsed: int | None) -> str:
    chat = runs(events, reports, "chat")
    mx = runs(events, reports, "max")
    s = meta.get("settings", {})
    m = meta.get("machine", {})
    v = meta.get("versions", {})
    saturated_below = s.get("saturated_below", 0.9)
    ratio_rate = 10000.0
    images = plots(chat, mx, out, saturated_below)
    lost, odd = anomalies(chat + mx, events)
    rel_data = os.path.relpath(data, out)

    md = []
    md.append("# Tern, NATS JetStream and Mosquitto side by side")
    md.append("")
    md.append(f"Generated by `benches/compare/report.py` from the JSON in [`{rel_data}/`]({rel_data}/) of one "
              f"`bash benches/compare/run.sh{' --quick' if meta.get('mode') == 'quick' else ''}` run on "
              f"{meta.get('date', '?')} (commit {meta.get('git', '?')}"
              + (f", {elapsed // 60} min {elapsed % 60} s in all" if elapsed else "") + "). Do not edit by hand: "
              "run the script again.")
    md.append("")
    md.append(f"**Broker and load generator share this {m.get('nproc', '?')}-core machine**: every number below "
              "includes the load generator competing with the broker for the same CPUs, over loopback. They "
              "compare the brokers with each other under identical conditions; they are not what any of them "
              "does on dedicated hardware.")
    md.append("")
    if lost:
        md.append("## ⚠ ACKNOWLEDGED MESSAGES LOST")
        md.append("")
        md.append("These runs acknowledged messages that were never delivered within the drain timeout:")
        md.append("")
        md += lost
    else:
        md.append("No run lost an acknowledged message (every acked message was delivered).")
    md.append("")

    md.append("## Headline")
    md.append("")
    md.append(headline(chat, mx, events, ratio_rate))
    md.append("")
    for img, alt in (("latency.png", "p50 and p99 send to deliver latency against offered rate"),
                     ("max_throughput.png", "max sustained throughput per durability tier")):
        if img in images:
            md.append(f"![{alt}]({img})")
            md.append("")

    md.append("## Machine")
    md.append("")
    md.append(table(["", ""], [
        ["CPUs (nproc)", str(m.get("nproc", "-"))], ["CPU model", m.get("cpu", "-")],
        ["kernel", m.get("kernel", "-")], ["OS", m.get("os", "-")],
        ["memory", f"{m['mem_kib'] / 1048576:.1f} GiB" if m.get("mem_kib") else "-"],
        ["filesystem of the data dirs", m.get("filesystem", "-")],
        ["4 KiB write + fsync in a T1/T2 data dir's filesystem (median of 200)", fsync_text(m, events)],
    ], "ll"))
    md.append("")
    md.append("## Versions")
    md.append("")
    md.append(table(["", ""], [[k, f"`{val}`"] for k, val in v.items()], "ll"))
    md.append("")

    md.append("## Durability tiers")
    md.append("")
    md.append("Each broker runs once per tier, on loopback, with a fresh temporary data directory (on the "
              "tmpfs for T0, on the disk for T1 and T2), and is stopped after that tier's runs. The tiers say what has happened to a message when the broker "
              "acknowledges it to the sender:")
    md.append("")
    md.append(table(["tier", "meaning", "Tern", "NATS JetStream", "Mosquitto"],
                    [[TIER_NAMES[t], TIER_MEANING[t]["what"]] + [TIER_MEANING[t][b] for b in BROKERS] for t in TIERS],
                    "lllll"))
    md.append("")
    md.append("Mosquitto has no T2: it never fsyncs before a PUBACK, whatever its settings. Its T1 is a periodic "
              "snapshot, so its T1 rows are closer to T0 in what they do per message.")
    md.append("")
    stopped = [ev for ev in events if ev.get("event") == "stopped"]
    if stopped:
        md.append("Data directory size after each broker stopped (shows which tiers wrote to disk): "
                  + "; ".join(f"{BROKER_NAMES.get(ev['broker'])} {ev['tier']} {ev.get('data_dir_kib', 0):,} KiB"
                              for ev in stopped) + ".")
        md.append("")

    md.append("## Settings")
    md.append("")
    rates = ", ".join(f"{r:,}" for r in s.get("rates", []))
    md.append(f"- Users: {s.get('users', '-')} (one connection each, in one-to-one conversations); message body "
              f"{s.get('body_bytes', '-')} bytes; the same for every broker and tier.")
    md.append(f"- Order per tier: one `max` run, then the `chat` sweep in ascending rates, against one broker "
              "process (restarted with a fresh data directory only after a failed run).")
    md.append(f"- `chat` (open loop): offered rates {rates} msg/s in total, {s.get('chat_duration_s', '-')} s "
              f"measured after {s.get('warmup_s', '-')} s of warm-up at the same rate. Send times are scheduled in "
              "advance and latency counts from the scheduled time, so a slow broker cannot hide its latency. "
              f"A sweep stops after the first rate whose acked/s falls below {saturated_below:.0%} of the offered "
              f"rate, and skips rates above {s.get('rate_cap', 2):g}x the tier's max sustained rate: far past "
              "saturation a run only measures a growing backlog (skipped rates are listed as such).")
    md.append(f"- `max` (closed loop): {s.get('max_duration_s', '-')} s in all, doubling the sends in flight "
              "each stage until p99 send→deliver passes 100 ms, throughput stops growing or a backlog builds; "
              "the result is the highest delivered/s of a stage within bounds.")
    md.append("- Latency: *send→deliver* from the scheduled send to the receiving user's delivery; *ack* from the "
              "send to the broker's durable acknowledgement (SendAck, JetStream PubAck, MQTT PUBACK). "
              "*lost* counts acknowledged messages not delivered within the loadgen's 30 s drain.")
    md.append("- CPU µs/msg: broker CPU time (user + system, from /proc) over the measured part divided by the "
              "messages delivered (at low rates the broker's fixed background work, timers and keep-alives, "
              "is shared by few messages, so the figure is high). RSS: the broker's resident memory at the end of the run; one broker process "
              "serves all the runs of a tier, so later runs include what earlier ones left.")
    md.append(f"- Each loadgen run has a hard limit of its sending time + {s.get('run_slack_s', '-')} s.")
    md.append("- Peers: Mosquitto gets `max_queued_messages 100000` and `max_inflight_messages 512` (Tern's "
              "default queue bound and push window; mosquitto's defaults are 1000 and 20, which would drop or "
              "throttle at these rates) and `set_tcp_nodelay true`. NATS runs with its defaults apart from the "
              "store directory and, in T2, `sync_interval: always`. How each protocol is driven (NATS: a "
              "work-queue stream with one durable pull consumer per user and an explicit ack per delivery, where "
              "Tern acks cumulatively; MQTT: QoS 1 with persistent sessions) is in the loadgen's adapters, "
              "`loadgen/src/adapter/`.")
    md.append("")

    md.append("## Commands")
    md.append("")
    md.append("`$TMP` is the run's temporary directory. Brokers:")
    md.append("")
    started = []
    for ev in events:
        if ev.get("event") == "started":
            started += [f"# {BROKER_NAMES.get(ev['broker'])} {TIER_NAMES.get(ev['tier'])}", ev.get("command", "")]
    md += fenced(started, "sh")
    confs = sorted((data / "configs").glob("*.conf")) if (data / "configs").is_dir() else []
    if confs:
        md.append("<details><summary>Peer configuration files</summary>")
        md.append("")
        for c in confs:
            md.append(f"`{c.name}`:")
            md.append("")
            md += fenced([c.read_text().rstrip()])
        md.append("</details>")
        md.append("")
    md.append("<details><summary>Load generator commands</summary>")
    md.append("")
    md += fenced([ev.get("command", "") for ev in events if ev.get("event") == "run"], "sh")
    md.append("</details>")
    md.append("")

    md.append("## chat: latency against offered rate")
    md.append("")
    md.append("Latencies in milliseconds; send→deliver unless marked *ack*.")
    md.append("")
    md.append(chat_table(chat, events))
    md.append("")
    md.append("## max: highest sustained throughput")
    md.append("")
    md.append("Latencies (ms) and in-flight sends of the best stage within bounds.")
    md.append("")
    md.append(max_table(mx))
    md.append("")
    stages = stages_tables(mx)
    if stages:
        md.append("<details><summary>Every stage of every max run</summary>")
        md.append("")
        md.append(stages)
        md.append("")
        md.append("</details>")
        md.append("")

    mesh = data / "mesh" / "headline.md"
    if mesh.exists():
        md += ["## Across brokers: one broker against a 3-broker mesh", "",
               mesh.read_text().rstrip(), "",
               "Every run, the `max` ramps and the machine: [mesh.md](mesh.md).", ""]
    md.append("## Anything odd")
    md.append("")
    md += odd or ["- Every run exited 0, with no failed sends, duplicates or reordering."]
    na = [ev for ev in events if ev.get("event") == "n/a"]
    for ev in na:
        md.append(f"- {BROKER_NAMES.get(ev['broker'])} {TIER_NAMES.get(ev['tier'])}: not run ({ev.get('reason')}).")
    md.append("")
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("docs/bench/data"))
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument("--elapsed", type=int, help="seconds the whole run took")
    args = ap.parse_args()
    meta, events, reports = load(args.data)
    if not events:
        print(f"report.py: no runs recorded in {args.data}/runs.jsonl", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    # Regenerated later (benches/mesh/run.sh does), the run's own time stands.
    elapsed = args.elapsed if args.elapsed is not None else meta.get("elapsed_s")
    text = render(meta, events, reports, args.data, args.out, elapsed)
    (args.out / "RESULTS.md").write_text(text)
    print(f"wrote {args.out / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
