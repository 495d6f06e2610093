"""Tables of a `python -m bench totem` report: one row per figure, Corral vs corosync.

The ratio column is Corral / corosync. Whether higher is better depends on
the row, so each row says it ("more is better" or "less is better").
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass(frozen=True)
class Row:
    section: str
    label: str
    unit: str
    corral: float | None
    corosync: float | None
    higher_is_better: bool
    digits: int = 0


def size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def _case_key(case: dict[str, Any]) -> tuple[int, int, int]:
    return (int(case["size"]), int(case["senders"]), int(case["rate_per_s"]))


def _cases(system: dict[str, Any] | None, key: str) -> dict[tuple[int, int, int], dict[str, Any]]:
    if not system:
        return {}
    return {_case_key(case): case for case in system.get(key, [])}


def _get(case: dict[str, Any] | None, field: str) -> float | None:
    if not case or case.get(field) is None:
        return None
    return float(case[field])


def throughput_rows(corral: dict[str, Any] | None, corosync: dict[str, Any] | None) -> list[Row]:
    ours, theirs = _cases(corral, "throughput"), _cases(corosync, "throughput")
    rows = []
    for key in sorted(set(ours) | set(theirs), key=lambda k: (k[1], k[0])):
        size, senders, _ = key
        name = f"{size_label(size)}, {senders} sender{'s' if senders > 1 else ''}"
        a, b = ours.get(key), theirs.get(key)
        rows.append(Row("throughput (delivered per node)", name, "msg/s",
                        _get(a, "msgs_per_s_per_node"), _get(b, "msgs_per_s_per_node"), True))
        rows.append(Row("throughput (delivered per node)", name, "MB/s",
                        _get(a, "mb_per_s_per_node"), _get(b, "mb_per_s_per_node"), True, 2))
    return rows


def latency_rows(corral: dict[str, Any] | None, corosync: dict[str, Any] | None) -> list[Row]:
    ours, theirs = _cases(corral, "latency"), _cases(corosync, "latency")
    rows = []
    for key in sorted(set(ours) | set(theirs), key=lambda k: (k[1], k[0])):
        size, senders, rate = key
        name = f"{size_label(size)} at {rate}/s x{senders}"
        a, b = ours.get(key), theirs.get(key)
        rows.append(Row("send-to-own-delivery latency", f"{name} p50", "ms",
                        _get(a, "latency_ms_p50"), _get(b, "latency_ms_p50"), False, 3))
        rows.append(Row("send-to-own-delivery latency", f"{name} p99", "ms",
                        _get(a, "latency_ms_p99"), _get(b, "latency_ms_p99"), False, 3))
    return rows


def kill_rows(corral: dict[str, Any] | None, corosync: dict[str, Any] | None) -> list[Row]:
    def by_token(system: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        return {str(k["token_ms"]): k for k in (system or {}).get("kill", [])}

    ours, theirs = by_token(corral), by_token(corosync)
    rows = []
    for token in sorted(set(ours) | set(theirs), key=lambda t: (t != "None", t)):
        name = "default token" if token == "None" else f"token {token}"
        rows.append(Row("kill -9 of one node to 2-node ring", name, "s",
                        _get(ours.get(token), "mean_s"), _get(theirs.get(token), "mean_s"),
                        False, 3))
    return rows


def other_rows(corral: dict[str, Any] | None, corosync: dict[str, Any] | None) -> list[Row]:
    a_loss, b_loss = (corral or {}).get("loss"), (corosync or {}).get("loss")
    percent = (a_loss or b_loss or {}).get("loss_percent", 5)
    a_idle, b_idle = (corral or {}).get("idle"), (corosync or {}).get("idle")
    section = f"{percent}% UDP loss on one node, 1 sender, 1 KiB"
    return [
        Row(section, "delivered at sender node", "msg/s",
            _get(a_loss, "sender_msgs_per_s"), _get(b_loss, "sender_msgs_per_s"), True),
        Row(section, "delivered per node (mean)", "msg/s",
            _get(a_loss, "msgs_per_s_per_node"), _get(b_loss, "msgs_per_s_per_node"), True),
        Row(section, "ring changes seen on node 1", "count",
            _get(a_loss, "ring_changes_node1"), _get(b_loss, "ring_changes_node1"), False),
        Row("idle", "CPU of the 3 daemons", "% of a core",
            _get(a_idle, "total_pct"), _get(b_idle, "total_pct"), False, 2),
    ]


def all_rows(report: dict[str, Any]) -> list[Row]:
    corral, corosync = report.get("corral"), report.get("corosync")
    return (throughput_rows(corral, corosync) + latency_rows(corral, corosync)
            + kill_rows(corral, corosync) + other_rows(corral, corosync))


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def _ratio(row: Row) -> str:
    if row.corral is None or row.corosync is None or row.corosync == 0:
        return "n/a"
    return f"{row.corral / row.corosync:.2f}x"


def print_report(report: dict[str, Any], out: TextIO = sys.stdout) -> None:
    meta = report.get("meta", {})
    print(f"\nTotem benchmark, {meta.get('date_utc', '?')}, {meta.get('cpus', '?')} CPUs, "
          f"load at start {tuple(round(x, 2) for x in meta.get('loadavg_at_start', ()))}",
          file=out)
    for system in ("corral", "corosync"):
        describe = (report.get(system) or {}).get("describe")
        if describe:
            details = ", ".join(f"{k}={v}" for k, v in describe.items() if k != "system")
            print(f"  {system}: {details}", file=out)
    if meta.get("command"):
        print(f"  command: {meta['command']}", file=out)
    section = None
    widths = (44, 12, 14, 14, 9)
    for row in all_rows(report):
        if row.section != section:
            section = row.section
            print(f"\n{section}", file=out)
            header = ("", "unit", "Corral", "corosync", "ratio")
            print("  " + "".join(h.ljust(w) if i < 2 else h.rjust(w)
                                 for i, (h, w) in enumerate(zip(header, widths, strict=True))),
                  file=out)
        better = "more is better" if row.higher_is_better else "less is better"
        cells = (row.label, row.unit, _fmt(row.corral, row.digits),
                 _fmt(row.corosync, row.digits), _ratio(row))
        print("  " + "".join(c.ljust(w) if i < 2 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
              + f"   ({better})", file=out)
    for system in ("corral", "corosync"):
        data = report.get(system)
        if not data:
            continue
        problems = list(data.get("errors", []))
        for case in data.get("throughput", []) + data.get("latency", []):
            if case.get("gaps") or case.get("dups"):
                problems.append(f"{size_label(case['size'])} x{case['senders']}: "
                                f"{case['gaps']} gaps, {case['dups']} duplicates")
        if problems:
            print(f"\n{system} problems:", file=out)
            for problem in problems:
                print(f"  - {problem}", file=out)
    print(file=out)
