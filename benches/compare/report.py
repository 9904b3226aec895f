#!/usr/bin/env python3
"""Turns the JSON reports of benches/compare/run.sh into RESULTS.md and plots.

    python3 benches/compare/report.py --data docs/bench/data --out docs/bench

Reads DATA/meta.json (machine, versions, settings), DATA/runs.jsonl (one line
per broker start, loadgen run, skipped run and broker stop, with exit status
and command), DATA/configs/ (the peers' configuration files) and one
tern-loadgen JSON report per run. Writes OUT/RESULTS.md, OUT/latency.png,
OUT/cpu.png and OUT/max_throughput.png. Only what was measured is shown; a
missing value is printed as "-".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

BROKERS = ["tern", "nats", "mosquitto", "rabbitmq", "ejabberd"]
BROKER_NAMES = {"tern": "Tern", "nats": "NATS JetStream", "mosquitto": "Mosquitto", "rabbitmq": "RabbitMQ",
                "ejabberd": "ejabberd"}
TIERS = ["T0", "T1", "T2"]
TIER_NAMES = {"T0": "T0 memory", "T1": "T1 written", "T2": "T2 synced"}
COLORS = {"tern": "#1f77b4", "nats": "#2ca02c", "mosquitto": "#ff7f0e", "rabbitmq": "#d62728",
          "ejabberd": "#9467bd"}
STYLES = {"T0": ":", "T1": "--", "T2": "-"}
MARKERS = {"T0": "o", "T1": "s", "T2": "^"}
# Tiers a broker does not have (run.sh records why, as an "n/a" event).
NOT_AVAILABLE = {("mosquitto", "T2"), ("rabbitmq", "T1"), ("ejabberd", "T2")}
# Issue 12 compares Tern T2 with this tier of Mosquitto (its most durable,
# the one its 10,000-user runs use, and the baseline the issue quotes).
MOSQUITTO_BEST = "T1"

TIER_MEANING = {
    "T0": {
        "what": "acknowledged once in the broker's memory; nothing on disk",
        "tern": "`--durability written` with the data directory on a tmpfs (`/dev/shm`): Tern has no "
        "in-memory mode, so its WAL and tables are written to memory and nothing reaches a disk",
        "nats": "JetStream stream with `storage: memory` (the loadgen creates it so, from "
        "`TERN_LOADGEN_NATS_STORAGE=memory`)",
        "mosquitto": "`persistence false`",
        "rabbitmq": "the T2 configuration with the data directory on the tmpfs: RabbitMQ has no in-memory "
        "mode for persistent messages on durable queues, so, as with Tern, its queue files and their "
        "fsyncs go to memory and nothing reaches a disk",
        "ejabberd": "`queue_type: ram`: a session's backlog (everything but the one message in flight) in the "
        "session process's memory, data directory on the tmpfs",
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
        "rabbitmq": "n/a: a PUBACK is RabbitMQ's publisher confirm, which for a persistent message on a durable "
        "queue waits for the fsync (or for the subscriber's ack); it has no written-not-synced mode",
        "ejabberd": "`queue_type: file`: a session's backlog goes to a file per session (`p1_file_queue`, "
        "written, never synced). The closest ejabberd has to T1 and weaker than it: the PUBACK is sent once "
        "the message is handed to the recipient's session process, before any write, and sessions live "
        "in memory (mnesia `ram_copies`), so a crash or even a clean restart loses every queued message",
    },
    "T2": {
        "what": "synced before the ack: survives a power loss",
        "tern": "`--durability synced` (the default): WAL fsynced before `SendAck`, with group commit",
        "nats": "file storage with `jetstream { sync_interval: always }`: an fsync on every write "
        "(the server's /varz reports `sync_always: true`)",
        "mosquitto": "n/a: mosquitto never syncs a message before its PUBACK",
        "rabbitmq": "durable classic queues (one per MQTT session with clean session off) and persistent "
        "messages (QoS 1) on the disk: the PUBACK waits for the publisher confirm, sent when the queue has "
        "synced the message (it syncs in batches, when idle: group commit) or when the subscriber has "
        "acked it, whichever comes first",
        "ejabberd": "n/a: ejabberd's mod_mqtt never syncs a message",
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


def users_of(ev: dict, default: int) -> int:
    """Users of a run or skipped run (older records have no "users": the
    tier's sweep, or the report's own count)."""
    if ev.get("users") is not None:
        return int(ev["users"])
    rep = ev.get("report")
    if isinstance(rep, dict) and rep.get("users") is not None:
        return int(rep["users"])
    return default


def runs(events: list[dict], reports: dict, scenario: str, users: int | None = None,
         default_users: int = 100) -> list[dict]:
    """Loadgen runs of one scenario (with `users` users, if given), each with
    its report (or None), in order."""
    out = []
    for ev in events:
        if ev.get("event") == "run" and ev.get("scenario") == scenario:
            r = {**ev, "report": reports.get(ev.get("json") or "")}
            if users is None or users_of(r, default_users) == users:
                out.append(r)
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


def broker_rank(broker: str) -> int:
    return BROKERS.index(broker) if broker in BROKERS else len(BROKERS)


def order(r: dict) -> tuple:
    return (broker_rank(r["broker"]), r["tier"], offered(r) or 0)


def accounting(rep: dict | None) -> str:
    if not rep:
        return "-"
    return f"{rep.get('lost', 0)}/{rep.get('duplicated', 0)}/{rep.get('reordered', 0)}"


def offered(run: dict) -> float | None:
    rate = get(run, "report", "offered_rate")
    if rate is None and run.get("offered_rate") is not None:
        rate = float(run["offered_rate"])
    if rate is None and "chat-" in run.get("name", ""):
        try:
            rate = float(run["name"].rsplit("-", 1)[1])
        except ValueError:
            pass
    return rate


def label(broker: str, tier: str) -> str:
    return f"{BROKER_NAMES.get(broker, broker)} {TIER_NAMES.get(tier, tier)}"


# ---------------------------------------------------------------- tables --


def chat_table(chat: list[dict], events: list[dict], users: int, default_users: int) -> str:
    rows = []
    for r in sorted(chat, key=order):
        rep = r["report"]
        d = get(rep, "deliver_latency_us", default={})
        rows.append(((broker_rank(r["broker"]), r["tier"], offered(r) or 0), [
            BROKER_NAMES.get(r["broker"], r["broker"]), TIER_NAMES.get(r["tier"], r["tier"]),
            num(offered(r)), num(get(rep, "acked_per_s")), num(get(rep, "throughput_per_s")),
            ms(d.get("p50")), ms(d.get("p90")), ms(d.get("p99")), ms(d.get("p999")), ms(d.get("max")),
            ms(get(rep, "ack_latency_us", "p99")), accounting(rep),
            num(get(rep, "broker", "cpu_us_per_msg"), 1), mib(get(rep, "broker", "rss_bytes")), exit_cell(r),
        ]))
    for ev in events:
        if (ev.get("event") == "skipped" and ev.get("scenario") == "chat"
                and users_of(ev, default_users) == users):
            rate = float(ev.get("offered_rate") or 0)
            rows.append(((broker_rank(ev["broker"]), ev["tier"], rate), [
                BROKER_NAMES.get(ev["broker"], ev["broker"]), TIER_NAMES.get(ev["tier"], ev["tier"]),
                num(ev.get("offered_rate")), f"skipped: {ev.get('reason', '')}"] + [""] * 11))
    rows.sort(key=lambda kv: kv[0])
    header = ["broker", "tier", "offered msg/s", "acked/s", "delivered/s", "p50", "p90", "p99", "p99.9", "max",
              "ack p99", "lost/dup/reord", "CPU µs/msg", "RSS MiB", "exit"]
    return table(header, [row for _, row in rows], "llrrrrrrrrrrrrl")


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
        out.append(f"**{label(r['broker'], r['tier'])}**\n\n" + table(
            ["in flight", "s", "acked/s", "delivered/s", "ack p99", "deliver p50", "deliver p99", "backlog",
             "within bounds"], rows, "rrrrrrrrl"))
    return "\n\n".join(out)


def skipped_rows(events: list[dict], scenario: str, width: int) -> list[list[str]]:
    return [[BROKER_NAMES.get(ev["broker"], ev["broker"]), TIER_NAMES.get(ev["tier"], ev["tier"]),
             f"skipped: {ev.get('reason', '')}"] + [""] * (width - 3)
            for ev in events if ev.get("event") == "skipped" and ev.get("scenario") == scenario]


def offline_table(off: list[dict], events: list[dict]) -> str:
    rows = []
    for r in sorted(off, key=order):
        rep = r["report"]
        o = get(rep, "offline", default={})
        rows.append([
            BROKER_NAMES.get(r["broker"], r["broker"]), TIER_NAMES.get(r["tier"], r["tier"]),
            num(o.get("messages")), num(o.get("fill_per_s")), num(o.get("drain_s"), 2),
            f"**{num(o.get('drain_per_s'))}**" if o else "-",
            ms(get(rep, "deliver_latency_us", "p99")), accounting(rep),
            num(get(rep, "broker", "cpu_us_per_msg"), 1), mib(get(rep, "broker", "rss_bytes")), exit_cell(r),
        ])
    header = ["broker", "tier", "messages queued", "fill msg/s", "drain s", "drain msg/s",
              "send→deliver p99 (ms)", "lost/dup/reord", "CPU µs/msg", "RSS MiB", "exit"]
    return table(header, rows + skipped_rows(events, "offline", len(header)), "llrrrrrrrrl")


def all_served(s: dict) -> str:
    """The storm's headline figure: when the last client was served again,
    or, when some never were, how many."""
    if not s:
        return "-"
    if s.get("failed"):
        last = f"; the last of the {s.get('served', 0):,} served after {s['all_served_s']:.2f} s" if s.get("served") else ""
        return f"**never: {s['failed']:,} not served**{last}"
    return f"**{num(s.get('all_served_s'), 2)}**"


def storm_table(st: list[dict], events: list[dict]) -> str:
    rows = []
    for r in sorted(st, key=order):
        rep = r["report"]
        s = get(rep, "storm", default={})
        w = s.get("reconnect_ms") or {}
        rows.append([
            BROKER_NAMES.get(r["broker"], r["broker"]), TIER_NAMES.get(r["tier"], r["tier"]),
            num(s.get("clients")), num(s.get("window_s"), 0), num(s.get("served")), num(s.get("failed")),
            all_served(s),
            num(w.get("p50")), num(w.get("p99")), num(w.get("max")),
            num(get(rep, "broker", "cpu_s"), 1), mib(get(rep, "broker", "rss_bytes")), exit_cell(r),
        ])
    header = ["broker", "tier", "clients", "window s", "served", "failed", "all served after (s)",
              "reconnect wait p50 (ms)", "p99 (ms)", "max (ms)", "broker CPU s", "RSS MiB", "exit"]
    return table(header, rows + skipped_rows(events, "storm", len(header)), "llrrrrrrrrrrl")


# ----------------------------------------------------------------- plots --


def chat_series(chat: list[dict], saturated_below: float, value) -> dict:
    """(broker, tier) -> sorted [(rate, value, saturated)] of the chat runs with a value."""
    series: dict[tuple[str, str], list[tuple[float, float, bool]]] = {}
    for r in chat:
        rep = r["report"]
        rate = offered(r)
        y = value(rep) if rep else None
        if y is None or not rate:
            continue
        sat = (get(rep, "acked_per_s", default=0) or 0) < saturated_below * rate
        series.setdefault((r["broker"], r["tier"]), []).append((rate, y, sat))
    for pts in series.values():
        pts.sort()
    return dict(sorted(series.items(), key=lambda kv: (broker_rank(kv[0][0]), kv[0][1])))


def draw(ax, series: dict, floor: float = 1e-3) -> None:
    for (broker, tier), pts in series.items():
        xs = [p[0] for p in pts]
        ys = [max(p[1], floor) for p in pts]
        color = COLORS.get(broker, "gray")
        ax.plot(xs, ys, linestyle=STYLES.get(tier, "-"), color=color, linewidth=1.6, label=label(broker, tier))
        for x, y, p in zip(xs, ys, pts):
            ax.plot([x], [y], marker=MARKERS.get(tier, "o"), color=color,
                    markerfacecolor="white" if p[2] else color, markersize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (msg/s, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: (f"{v:,.0f}" if v >= 1 else f"{v:g}") if f"{v:.0e}"[0] in "25" else ""))


def plots(chat: list[dict], wide: list[dict], mx: list[dict], out: Path, saturated_below: float,
          users: int, wide_users: int) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib missing; no plots (pip install matplotlib)", file=sys.stderr)
        return []
    made = []

    def save_sweep(fig, what: str, name: str) -> None:
        """Titles, lays out and writes one figure of the chat sweep."""
        fig.suptitle(f"chat scenario: {what} against offered rate "
                     f"(hollow marker: acked/s below {saturated_below:.0%} of offered)", fontsize=10)
        fig.tight_layout(rect=(0, 0.14, 1, 1))
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

    def deliver(pct):
        def f(rep):
            d = get(rep, "deliver_latency_us")
            return d[pct] / 1000 if d and d.get("count") else None
        return f

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), sharey=True)
    for ax, pct in ((axes[0], "p50"), (axes[1], "p99")):
        draw(ax, chat_series(chat, saturated_below, deliver(pct)))
        ax.set_title(f"{pct} send→deliver latency, {users:,} users")
    axes[0].set_ylabel("latency (ms, log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    save_sweep(fig, "send→deliver latency", "latency.png")

    def cpu(rep):
        v = get(rep, "broker", "cpu_us_per_msg")
        return v if v else None

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), sharey=True)
    panels = ((axes[0], chat, f"{users:,} users (one connection each)"),
              (axes[1], wide, f"{wide_users:,} users (one connection each)"))
    legend: dict[str, object] = {}
    for ax, runs_, title in panels:
        draw(ax, chat_series(runs_, saturated_below, cpu), floor=0.1)
        ax.set_title(title)
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
        if not ax.lines:
            ax.text(0.5, 0.5, "not run", transform=ax.transAxes, ha="center", va="center", color="gray")
    axes[0].set_ylabel("broker CPU µs per delivered message (log scale)")
    ordered = sorted(legend.items(), key=lambda kv: next(
        (broker_rank(b) * 10 + TIERS.index(t) for b in BROKERS for t in TIERS if label(b, t) == kv[0]), 99))
    fig.legend([h for _, h in ordered], [lab for lab, _ in ordered], loc="lower center", ncol=4, fontsize=8,
               frameon=False)
    save_sweep(fig, "broker CPU time per delivered message", "cpu.png")

    fig, ax = plt.subplots(figsize=(11, 5.2))
    present = [b for b in BROKERS if any(r["broker"] == b for r in mx)] or BROKERS
    width = 0.8 / len(present)
    values = {(r["broker"], r["tier"]): get(r["report"], "max", "max_sustained_per_s") for r in mx}
    top = max([v for v in values.values() if v] or [1])
    for i, broker in enumerate(present):
        xs = [t + (i - (len(present) - 1) / 2) * width for t in range(len(TIERS))]
        ys = [values.get((broker, tier)) for tier in TIERS]
        ax.bar([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], width,
               color=COLORS.get(broker, "gray"), label=BROKER_NAMES.get(broker, broker))
        for x, y in zip(xs, ys):
            ax.text(x, (y or 0) + top * 0.01, "n/a" if y is None else f"{y:,.0f}", ha="center", va="bottom",
                    fontsize=7 if y is not None else 8, rotation=90,
                    color="black" if y is not None else COLORS.get(broker, "gray"))
    ax.set_xticks(range(len(TIERS)), [TIER_NAMES[t] for t in TIERS])
    ax.set_xlim(-0.6, len(TIERS) - 0.4)
    ax.set_ylabel("max sustained delivered msg/s")
    ax.set_ylim(0, top * 1.3)
    ax.set_title(f"max scenario ({users:,} users): highest rate sustained within bounds, per durability tier")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "max_throughput.png", dpi=110)
    plt.close(fig)
    made.append("max_throughput.png")
    return made


# ---------------------------------------------------------------- report --


def find_run(runs_: list[dict], broker: str, tier: str, rate: float | None = None) -> dict | None:
    for r in runs_:
        if r["broker"] == broker and r["tier"] == tier and (rate is None or offered(r) == rate):
            return r
    return None


def find(runs_: list[dict], broker: str, tier: str, rate: float | None = None) -> dict | None:
    r = find_run(runs_, broker, tier, rate)
    return r["report"] if r else None


def saturation(events: list[dict], broker: str, tier: str, rate: float, users: int,
               default_users: int) -> str | None:
    """Why the chat run at `rate` is missing, if the sweep skipped it."""
    for ev in events:
        if (ev.get("event") == "skipped" and ev.get("broker") == broker and ev.get("tier") == tier
                and ev.get("scenario", "chat") == "chat" and users_of(ev, default_users) == users
                and float(ev.get("offered_rate") or -1) == rate):
            return ev.get("reason")
    return None


def missing_cell(events: list[dict], broker: str, tier: str, rate: float, users: int, default_users: int) -> str:
    why = saturation(events, broker, tier, rate, users, default_users)
    return f"not run ({why})" if why else "-"


def tier_ran(events: list[dict], broker: str, tier: str) -> bool:
    return any(ev.get("event") == "started" and ev.get("broker") == broker and ev.get("tier") == tier
               for ev in events)


def headline(chat: list[dict], mx: list[dict], events: list[dict], users: int) -> str:
    rows = []
    for broker in BROKERS:
        for tier in TIERS:
            if (broker, tier) in NOT_AVAILABLE:
                if any(ev.get("broker") == broker for ev in events):
                    rows.append([BROKER_NAMES[broker], TIER_NAMES[tier]] + ["n/a"] * 6)
                continue
            m = find(mx, broker, tier)
            if m is None and not tier_ran(events, broker, tier):
                continue
            cells = [BROKER_NAMES[broker], TIER_NAMES[tier], num(get(m, "max", "max_sustained_per_s"))]
            for rate, what in ((1000.0, ("deliver_latency_us", "p50")), (10000.0, ("deliver_latency_us", "p99")),
                               (1000.0, ("broker", "cpu_us_per_msg")), (10000.0, ("broker", "cpu_us_per_msg"))):
                c = find(chat, broker, tier, rate)
                if c is None:
                    cells.append(missing_cell(events, broker, tier, rate, users, users))
                elif what[0] == "broker":
                    cells.append(num(get(c, *what), 1))
                else:
                    cells.append(ms(get(c, *what)))
            cells.append(num(get(m, "broker", "cpu_us_per_msg"), 1))
            rows.append(cells)
    return table(["broker", "tier", "max sustained msg/s", "p50 send→deliver at 1,000 msg/s (ms)",
                  "p99 send→deliver at 10,000 msg/s (ms)", "CPU µs/msg at 1,000 msg/s",
                  "CPU µs/msg at 10,000 msg/s", "CPU µs/msg (max run)"], rows)


def nats_ratios(chat: list[dict], mx: list[dict], events: list[dict], ratio_rate: float, users: int) -> list[str]:
    lines = []
    for tier in TIERS:
        t_max = get(find(mx, "tern", tier), "max", "max_sustained_per_s")
        n_max = get(find(mx, "nats", tier), "max", "max_sustained_per_s")
        t_p99 = get(find(chat, "tern", tier, ratio_rate), "deliver_latency_us", "p99")
        n_p99 = get(find(chat, "nats", tier, ratio_rate), "deliver_latency_us", "p99")
        if None in (t_max, n_max) and None in (t_p99, n_p99):
            continue

        def cell(broker):
            c = find(chat, broker, tier, ratio_rate)
            if c is not None:
                return ms(get(c, "deliver_latency_us", "p99"))
            return missing_cell(events, broker, tier, ratio_rate, users, users)

        p99_text = (f"{ratio(t_p99, n_p99)} ({ms(t_p99)} vs {ms(n_p99)} ms; below 1 means Tern is faster)"
                    if None not in (t_p99, n_p99) else f"n/a (Tern {cell('tern')}, NATS {cell('nats')})")
        lines.append(f"- {TIER_NAMES[tier]}: max sustained throughput {ratio(t_max, n_max)} "
                     f"({num(t_max)} vs {num(n_max)} msg/s); p99 send→deliver at {ratio_rate:,.0f} msg/s "
                     + p99_text)
    return lines


def targets_table(chat: list[dict], wide: list[dict], mx: list[dict], users: int, wide_users: int) -> tuple[str, str]:
    """Issue 12's targets, Tern T2 against Mosquitto's best tier: the table
    and the name of that tier."""
    mq = MOSQUITTO_BEST
    if find(mx, "mosquitto", mq) is None and find(chat, "mosquitto", mq) is None:
        mq = "T0"
    rows = []

    def judge(t, m, limit, absolute=None) -> tuple[str, str]:
        """The ratio cell and whether the target is met (t/m <= limit, and t <= absolute)."""
        if t is None or m is None or m == 0:
            return "n/a", "n/a (not measured)"
        r = t / m
        ok = r <= limit and (absolute is None or t <= absolute)
        return f"{r:.2f}x", "yes" if ok else "**no**"

    def cpu_of(rep):
        return get(rep, "broker", "cpu_us_per_msg")

    for runs_, n in ((chat, users), (wide, wide_users)):
        for rate in (1000.0, 2000.0, 10000.0):
            t = cpu_of(find(runs_, "tern", "T2", rate))
            m = cpu_of(find(runs_, "mosquitto", mq, rate))
            rc, ok = judge(t, m, 1.5)
            rows.append([f"broker CPU µs per message at {rate:,.0f} msg/s, {n:,} users", "≤ 1.5x",
                         num(t, 1), num(m, 1), rc, ok])
    t = cpu_of(find(mx, "tern", "T2"))
    m = cpu_of(find(mx, "mosquitto", mq))
    rc, ok = judge(t, m, 1.0)
    rows.append([f"broker CPU µs per message at max load (`max` run, {users:,} users)", "≤ 1.0x",
                 num(t, 1), num(m, 1), rc, ok])
    t = get(find(chat, "tern", "T2", 1000.0), "deliver_latency_us", "p50")
    m = get(find(chat, "mosquitto", mq, 1000.0), "deliver_latency_us", "p50")
    rc, ok = judge(t, m, 2.0)
    rows.append([f"send→deliver p50 at 1,000 msg/s (ms, {users:,} users)", "≤ 2x", ms(t), ms(m), rc, ok])
    t = get(find(chat, "tern", "T2", 10000.0), "deliver_latency_us", "p99")
    m = get(find(chat, "mosquitto", mq, 10000.0), "deliver_latency_us", "p99")
    rc, ok = judge(t, m, 1.5, absolute=2000)
    rows.append([f"send→deliver p99 at 10,000 msg/s (ms, {users:,} users)", "≤ 2 ms and ≤ 1.5x", ms(t), ms(m),
                 rc, ok])
    t = get(find(mx, "tern", "T2"), "max", "max_sustained_per_s")
    m = get(find(mx, "mosquitto", mq), "max", "max_sustained_per_s")
    if t is None or m is None or m == 0:
        rc, ok = "n/a", "n/a (not measured)"
    else:
        rc, ok = f"{t / m:.2f}x", "yes" if t >= m else "**no**"
    rows.append(["max sustained throughput (msg/s): Tern synced against Mosquitto unsynced", "≥ 1.0x", num(t),
                 num(m), rc, ok])
    rss = [get(r["report"], "broker", "rss_bytes") for r in chat + mx if r["broker"] == "tern" and r["tier"] == "T2"]
    rss = [v for v in rss if v]
    t_rss = max(rss) if rss else None
    m_rss = [get(r["report"], "broker", "rss_bytes") for r in chat + mx if r["broker"] == "mosquitto" and r["tier"] == mq]
    m_rss = max([v for v in m_rss if v], default=None)
    ok = "n/a (not measured)" if t_rss is None else ("yes" if t_rss <= 64 * 1048576 else "**no**")
    rows.append([f"broker resident memory, {users:,} users (MiB; the largest at the end of any run of the tier)",
                 "≤ 64 MiB", mib(t_rss), mib(m_rss), "-", ok])
    return table(["what", "target", "Tern T2", f"Mosquitto {mq}", "Tern / Mosquitto", "met"], rows,
                 "lrrrrl"), mq


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
        name = f"{label(r['broker'], r['tier'])} `{r.get('name')}`"
        if r.get("exit") == 1 or (rep and rep.get("lost", 0) > 0):
            lost.append(f"- {name}: **{get(rep, 'lost', default='?')} acknowledged messages lost** "
                        f"(of {get(rep, 'acked', default='?')} acked; loadgen exit {r.get('exit')})")
        if (r.get("busy_before_pct") or 0) > 15:
            odd.append(f"- {name}: other work kept {r['busy_before_pct']}% of the CPUs busy just before the run"
                       + (f" ({r['busy_with']})" if r.get("busy_with") else "") + "; its numbers are not trustworthy")
        other = other_cpu(r)
        if other is not None and other > 0.6 * r["wall_s"]:
            many = (r.get("users") or 0) > 1000
            odd.append(f"- {name}: processes other than this broker and the load generator used about "
                       f"{other:.1f} CPU-seconds during the {r['wall_s']:.0f} s run"
                       + (f" (an upper bound that includes the set-up of its {r['users']:,} users)" if many else "")
                       + "; its numbers may be disturbed")
        if r.get("exit") not in (0, 1):
            odd.append(f"- {name}: exit {r.get('exit')} ({r.get('exit_meaning')}); see "
                       f"target/compare/logs/{r['broker']}-{r['tier']}-{r.get('name')}.loadgen.log")
        if rep:
            errs = {k: v for k, v in (rep.get("errors") or {}).items() if v}
            if errs or rep.get("failed"):
                odd.append(f"- {name}: {rep.get('failed', 0)} sends failed: "
                           + ", ".join(f"{k} {v}" for k, v in sorted(errs.items())))
            for key in ("duplicated", "reordered", "delivered_unacked"):
                if rep.get(key):
                    odd.append(f"- {name}: **{key} {rep[key]:,}** (of {rep.get('delivered', 0):,} delivered)")
            storm = rep.get("storm") or {}
            if storm.get("failed"):
                odd.append(f"- {name}: {storm['failed']:,} of {storm.get('clients', 0):,} clients were not served "
                           "again")
    for ev in events:
        who = label(ev.get("broker"), ev.get("tier")) + (" (wide runs)" if ev.get("phase") == "wide" else "")
        if ev.get("event") == "broker-died":
            odd.append(f"- {who}: the broker exited during `{ev.get('name')}`; a fresh one ran the rest")
        elif ev.get("event") == "restarted":
            odd.append(f"- {who}: restarted with a fresh data directory after `{ev.get('after')}` failed "
                       f"(exit {ev.get('exit')})")
        elif ev.get("event") == "stopped" and str(ev.get("stopped_by", "SIGTERM")).startswith("SIGKILL"):
            odd.append(f"- {who}: the broker did not exit within {ev.get('stop_wait_s', 15)} s of SIGTERM and "
                       "was killed")
    return lost, odd


def fsync_text(m: dict, events: list[dict]) -> str:
    probes = [("before the runs", m.get("fsync_4k_median_us"))]
    probes += [("after them", ev.get("fsync_4k_median_us")) for ev in events if ev.get("event") == "fsync-probe"]
    shown = [f"{v:,.0f} µs {when}" for when, v in probes if v is not None]
    return ", ".join(shown) if shown else "-"


def peers_text(s: dict) -> list[str]:
    return [
        "- Mosquitto gets `max_queued_messages 100000` and `max_inflight_messages 512` (Tern's default queue "
        "bound and push window; mosquitto's defaults are 1000 and 20, which would drop or throttle at these "
        "rates) and `set_tcp_nodelay true`.",
        "- NATS runs with its defaults apart from the store directory and, in T2, `sync_interval: always`.",
        "- RabbitMQ (Debian's `rabbitmq-server`) runs as its own node per tier with only the `rabbitmq_mqtt` "
        "plugin, every file in the temporary directory (`RABBITMQ_MNESIA_BASE`, `RABBITMQ_LOG_BASE`, "
        "`RABBITMQ_CONFIG_FILE`, `RABBITMQ_ENABLED_PLUGINS_FILE`, an empty `RABBITMQ_CONF_ENV_FILE`, its own "
        "`HOME` for the Erlang cookie), an epmd of its own on a free loopback port, and AMQP (unused) and "
        "Erlang distribution on loopback ports. Settings: `mqtt.prefetch = 512` (deliveries a subscriber may "
        "have unacknowledged; the default 10 would throttle delivery: 512 is Tern's push window and "
        "Mosquitto's `max_inflight_messages`); `mqtt.tcp_listen_options.backlog = 4096` (default 128, for "
        "the reconnect storm); `vm_memory_high_watermark.relative = 0.4` and `disk_free_limit.absolute = "
        "50MB` are its defaults, written out to show that publishers are blocked only above 40% of RAM (9.4 "
        "GiB here, which no run approaches) or below 50 MB of free disk; `log.file.level = warning` (its info "
        "level logs every connection; mosquitto logs errors and warnings only). An MQTT session with clean "
        "session off is a durable classic queue (version 1, the 3.10 default) named after the client, "
        "expiring after 24 h unused (`mqtt.subscription_ttl`, default); a QoS 1 publish is a persistent "
        "message, and its PUBACK is the publisher confirm. Clients log in anonymously as `guest` (its "
        "default user, allowed on loopback only). The Erlang VM's own defaults from RabbitMQ's start script "
        "stay (schedulers do not busy-wait: `+sbwt none`).",
        "- ejabberd (Debian's `ejabberd`) is driven through its MQTT module `mod_mqtt`, by the same `mqtt://` "
        "adapter as Mosquitto and RabbitMQ: MQTT 3.1.1, QoS 1, persistent sessions (clean session off). "
        "`mod_mqtt` is ejabberd's own broker, with the QoS 1 semantics of the other MQTT peers, so the three "
        "are loaded identically; an XMPP adapter would measure XML stanza handling of a different protocol "
        "with its own acknowledgement (XEP-0198), not the same workload. It runs with anonymous login "
        "(`auth_method: [anonymous]`, `anonymous_protocol: login_anon`, `allow_multiple_connections: true`), "
        "which accepts any user name and password: `mod_mqtt` refuses a CONNECT without a password, so the "
        "loadgen sends its client id and a fixed password (`TERN_LOADGEN_MQTT_PASSWORD`), and no 10,000 "
        "accounts need registering. Settings: `mod_mqtt` `max_queue: 100000` (messages a session holds beyond "
        "the one in flight; the default 5000 drops the whole session and its queue when passed; 100000 is "
        "Tern's queue bound), `session_expiry: 3600` (how long a disconnected session is kept; default 300 "
        "s), the listener's `max_fsm_queue: 100000` (a session process with more messages waiting is killed; "
        "default 10000) and `backlog: 4096` (for the storm), `loglevel: warning` (its info level logs every "
        "session). The VM starts as `ejabberdctl foreground` starts it (`+K true +P 250000`, "
        "`ERL_MAX_PORTS=32000`), without Erlang distribution (no node name, no epmd), and with `+sbwt none "
        "+sbwtdcpu none +sbwtdio none` as RabbitMQ's start script sets: busy-waiting schedulers would count "
        "their spinning as CPU per message and take CPU from the load generator on this machine. Note that "
        "ejabberd 23.01's `mod_mqtt` keeps one QoS 1 message in flight per session: the next delivery to a "
        "client waits for the PUBACK of the one before.",
        "- How each protocol is driven (NATS: a work-queue stream with one durable pull consumer per user and "
        "an explicit ack per delivery, where Tern acks cumulatively; MQTT: QoS 1 with persistent sessions and a "
        "PUBACK per delivery) is in the loadgen's adapters, `loadgen/src/adapter/`.",
    ]


def render(meta: dict, events: list[dict], reports: dict, data: Path, out: Path, elapsed: int | None) -> str:
    s = meta.get("settings", {})
    m = meta.get("machine", {})
    v = meta.get("versions", {})
    users = int(s.get("users", 100))
    wide_users = int(s.get("wide_users", 10000))
    chat = [r for r in runs(events, reports, "chat", users, users) if not r.get("name", "").startswith("wide-")]
    wide = [r for r in runs(events, reports, "chat", None, users) if r.get("name", "").startswith("wide-")]
    mx = runs(events, reports, "max")
    off = runs(events, reports, "offline")
    st = runs(events, reports, "storm")
    saturated_below = s.get("saturated_below", 0.9)
    ratio_rate = 10000.0
    images = plots(chat, wide, mx, out, saturated_below, users, wide_users)
    lost, odd = anomalies(chat + wide + mx + off + st, events)
    rel_data = os.path.relpath(data, out)
    present = [b for b in BROKERS if any(ev.get("broker") == b for ev in events)]
    names = [BROKER_NAMES[b] for b in present] or [BROKER_NAMES[b] for b in BROKERS]
    title = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]

    md = []
    md.append(f"# {title} side by side")
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
    md.append(f"{users:,} users; latencies in milliseconds. *n/a*: the broker has no such tier "
              "([Durability tiers](#durability-tiers)).")
    md.append("")
    md.append(headline(chat, mx, events, users))
    md.append("")
    md.append("### Issue 12's targets: Tern T2 against Mosquitto")
    md.append("")
    if tier_ran(events, "tern", "T2") and any(tier_ran(events, "mosquitto", t) for t in TIERS):
        targets, mq = targets_table(chat, wide, mx, users, wide_users)
        why = (f"its most durable tier, the one its {wide_users:,}-user runs use, and the baseline issue 12 quotes"
               if mq == MOSQUITTO_BEST else f"its {TIER_NAMES[MOSQUITTO_BEST]} did not run")
        md.append(f"Tern synced (T2) against Mosquitto {TIER_NAMES.get(mq, mq)} ({why}), from this run. A ratio is "
                  "Tern's figure over Mosquitto's (below 1: Tern uses less, or is faster).")
        md.append("")
        md.append(targets)
    else:
        md.append("Not measured: they need Tern T2 and Mosquitto in the same run (`--brokers` with tern and "
                  "mosquitto).")
    md.append("")
    nats = nats_ratios(chat, mx, events, ratio_rate, users)
    if nats:
        md.append("Ratios (Tern / NATS JetStream):")
        md.append("")
        md += nats
        md.append("")
    for img, alt in (("cpu.png", "broker CPU microseconds per delivered message against offered rate"),
                     ("latency.png", "p50 and p99 send to deliver latency against offered rate"),
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
        ["open files per process (`ulimit -n`)", num(m.get("open_files_limit"))],
    ], "ll"))
    md.append("")
    md.append("## Versions")
    md.append("")
    md.append(table(["", ""], [[k, f"`{val}`"] for k, val in v.items()], "ll"))
    md.append("")

    md.append("## Durability tiers")
    md.append("")
    md.append("Each broker runs once per tier, on loopback, with a fresh temporary data directory (on the "
              "tmpfs for T0, on the disk for T1 and T2), and is stopped after that tier's runs. The tiers say "
              "what has happened to a message when the broker acknowledges it to the sender:")
    md.append("")
    shown = present or BROKERS
    md.append(table(["tier", "meaning"] + [BROKER_NAMES[b] for b in shown],
                    [[TIER_NAMES[t], TIER_MEANING[t]["what"]] + [TIER_MEANING[t][b] for b in shown]
                     for t in TIERS], "l" * (2 + len(shown))))
    md.append("")
    md.append("Mosquitto has no T2: it never fsyncs before a PUBACK, whatever its settings. Its T1 is a periodic "
              "snapshot, so its T1 rows are closer to T0 in what they do per message. RabbitMQ has no T1: a "
              "persistent message on a durable queue is confirmed only once synced (or acked by its "
              "subscriber); its T0 is its T2 on a tmpfs, as Tern's T0 is Tern on a tmpfs. ejabberd has no T2, and "
              "its T1 survives no crash or restart either: it differs from its T0 only in where a session's "
              "backlog waits (a file instead of the heap).")
    md.append("")
    stopped = [ev for ev in events if ev.get("event") == "stopped"]
    if stopped:
        md.append("Data directory size after each broker stopped (shows which tiers wrote to disk): "
                  + "; ".join(f"{BROKER_NAMES.get(ev['broker'])} {ev['tier']}"
                              + (f" ({wide_users:,}-user runs)" if ev.get("phase") == "wide" else "")
                              + f" {ev.get('data_dir_kib', 0):,} KiB" for ev in stopped) + ".")
        md.append("")

    md.append("## Settings")
    md.append("")
    rates = ", ".join(f"{r:,}" for r in s.get("rates", []))
    wide_rates = ", ".join(f"{r:,}" for r in s.get("wide_rates", []))
    md.append(f"- Users: {users:,} (one connection each, in one-to-one conversations); message body "
              f"{s.get('body_bytes', '-')} bytes; the same for every broker and tier.")
    md.append("- Order per tier: one `max` run, then the `chat` sweep in ascending rates, against one broker "
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
    durable = s.get("durable_tiers") or {}
    if durable:
        md.append(f"- Then, on a fresh broker in one tier per broker ("
                  + ", ".join(f"{BROKER_NAMES.get(b, b)} {t}" for b, t in durable.items())
                  + f"): a `chat` sweep with {wide_users:,} users at {wide_rates} msg/s "
                  f"({s.get('wide_chat_duration_s', '-')} s measured after the same warm-up; the same saturation "
                  f"and cap rules; users set up {s.get('wide_connect_concurrency', 64)} at a time), an `offline` "
                  f"drain ({s.get('offline_users', 100):,} users: half send {s.get('offline_messages', 1000):,} "
                  "messages each to their offline partners, who then connect at once; *drain msg/s* is "
                  "messages delivered per second from the reconnect to the last delivery) and a reconnect "
                  f"`storm` ({s.get('storm_users', 10000):,} connected clients drop at once and reconnect spread "
                  f"over {s.get('storm_window_s', 5):g} s; a client is served again when the broker answers a "
                  "ping on its new connection: for MQTT a QoS 1 publish and its PUBACK). The tier is each "
                  "broker's most durable" + next(
                      (", except ejabberd's: " + ev.get("reason", "") for ev in events
                       if ev.get("event") == "wide-tier" and ev.get("broker") == "ejabberd"), "") + ".")
    estimate = (f" The run's own estimate beforehand was about {s['estimate_s'] // 60} min"
                + (f" ({s['estimate_max_s'] // 60} min if no sweep had stopped early)" if s.get("estimate_max_s") else "")
                + "." if s.get("estimate_s") else "")
    if meta.get("mode") == "quick":
        md.append("- Time: a `--quick` run: fewer rates, shorter runs and fewer users in the wide runs than the "
                  "full comparison, to check the set-up, not to measure." + estimate)
    else:
        md.append("- Time: the whole run is kept under about 45 minutes on this 2-core machine, so the "
                  f"{wide_users:,}-user sweep runs only {wide_rates} msg/s, the offline drain uses "
                  f"{s.get('offline_users', 100):,} users and the storm a {s.get('storm_window_s', 5):g} s "
                  "window." + estimate)
    md.append("- Latency: *send→deliver* from the scheduled send to the receiving user's delivery; *ack* from the "
              "send to the broker's durable acknowledgement (SendAck, JetStream PubAck, MQTT PUBACK). "
              "*lost* counts acknowledged messages not delivered within the loadgen's 30 s drain.")
    md.append("- CPU µs/msg: broker CPU time (user + system, from /proc of the broker process: for RabbitMQ and "
              "ejabberd the Erlang VM, `beam.smp`, not a start script) over the measured part divided by the "
              "messages delivered (at low rates the broker's fixed background work, timers and keep-alives, "
              "is shared by few messages, so the figure is high; with "
              f"{wide_users:,} connections a keep-alive every 10 s per connection is 1,000 a second). RSS: the "
              "broker's resident memory at the end of the run; one broker process serves all the runs of a "
              "tier, so later runs include what earlier ones left.")
    md.append(f"- Each loadgen run has a hard limit of its sending time + {s.get('run_slack_s', '-')} s.")
    md += peers_text(s)
    md.append("")

    md.append("## Commands")
    md.append("")
    md.append("`$TMP` is the run's temporary directory on the disk, `$SHM` the one on the tmpfs. Brokers:")
    md.append("")
    started = []
    for ev in events:
        if ev.get("event") == "started":
            phase = f" ({wide_users:,}-user runs)" if ev.get("phase") == "wide" else ""
            started += [f"# {label(ev['broker'], ev['tier'])}{phase}", ev.get("command", "")]
    md += fenced(started, "sh")
    confs = sorted(c for c in (data / "configs").iterdir()
                   if c.is_file() and c.suffix != ".json") if (data / "configs").is_dir() else []
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

    md.append(f"## chat: latency against offered rate, {users:,} users")
    md.append("")
    md.append("Latencies in milliseconds; send→deliver unless marked *ack*.")
    md.append("")
    md.append(chat_table(chat, events, users, users))
    md.append("")
    if wide or any(ev.get("event") == "skipped" and users_of(ev, users) == wide_users for ev in events):
        md.append(f"## chat with {wide_users:,} users")
        md.append("")
        md.append(f"{wide_users:,} connections, one per user, in each broker's tier of the wide runs; latencies in "
                  "milliseconds.")
        md.append("")
        md.append(chat_table(wide, events, wide_users, users))
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
    if off or any(ev.get("event") == "skipped" and ev.get("scenario") == "offline" for ev in events):
        md.append("## offline: draining queues to reconnecting devices")
        md.append("")
        md.append(offline_table(off, events))
        md.append("")
    if st or any(ev.get("event") == "skipped" and ev.get("scenario") == "storm" for ev in events):
        md.append("## storm: every client reconnecting at once")
        md.append("")
        md.append("*all served after*: from the moment every client dropped its connection until the last one was "
                  "served again (*never* when some clients were not: their reconnect or its first ping failed, "
                  "within the loadgen's 10 s connect timeout and 30 s ack timeout); the reconnect wait counts from "
                  "each served client's scheduled reconnect. CPU is the broker's total over the run (a storm "
                  "delivers no messages).")
        md.append("")
        md.append(storm_table(st, events))
        md.append("")

    mesh = data / "mesh" / "headline.md"
    if mesh.exists():
        md += ["## Across brokers: one broker against a 3-broker mesh", "",
               mesh.read_text().rstrip(), "",
               "Every run, the `max` ramps and the machine: [mesh.md](mesh.md).", ""]
    # Written by benches/e2e/run.sh (issue 13): kept when RESULTS.md is made again.
    e2e = data / "e2e" / "headline.md"
    if e2e.exists():
        md += ["## End-to-end encryption, three devices per user, and key claims", "",
               e2e.read_text().rstrip(), "",
               "Every run, the command lines and the machine: [e2e.md](e2e.md).", ""]
    md.append("## Anything odd")
    md.append("")
    md += odd or ["- Every run exited 0, with no failed sends, duplicates or reordering."]
    na = [ev for ev in events if ev.get("event") == "n/a"]
    for ev in na:
        md.append(f"- {label(ev['broker'], ev['tier'])}: not run ({ev.get('reason')}).")
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
