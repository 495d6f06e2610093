"""The status broadcast's sans-I/O core: report encoding and validation, and the table of
the latest report per node (what the reference's pvestatd + pmxcfs kvstore provide).

Every node multicasts a report of its own figures and of its local guests' runtime
status in the CPG group `corral-status` (see statusbus.py). Receivers keep the latest
report per sender nodeid with the time it arrived (their own monotonic clock, so no
clock agreement is needed). A report is dropped when its node leaves the group's
membership or when it is older than REPORT_MAX_AGE_NS (5 minutes); a guest of a node
whose report is missing or older than FRESH_NS shows `unknown`.

A report is bounded to MAX_REPORT_BYTES: a node with more guests than fit sends the
lowest vmids that fit and the number it left out (`omitted`); receivers show the
others as `unknown`. Malformed or oversized payloads raise ReportError (the caller
logs and drops them). No clock, socket or file is touched here: times are arguments.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1
MAX_REPORT_BYTES = 256 * 1024          # a CPG message may be 1 MiB; status is not worth more
MAX_GUESTS = 100_000
MAX_STORAGES = 64
MAX_TEXT_CHARS = 256
REPORT_MAX_AGE_NS = 300 * 1_000_000_000
FRESH_NS = 35 * 1_000_000_000          # three broadcast intervals and a margin
GUEST_STATES = ("running", "stopped", "unknown")

_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")
_STORAGE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
STORAGE_NUMBERS = ("disk", "maxdisk", "shared", "active")
NODE_NUMBERS = ("uptime", "cpu", "maxcpu", "mem", "maxmem", "disk", "maxdisk", "swap",
                "maxswap", "wait", "idle", "ctime", "netin", "netout")
GUEST_NUMBERS = ("uptime", "cpu", "cpus", "mem", "maxmem", "memhost", "disk", "maxdisk",
                 "netin", "netout", "diskread", "diskwrite", "pid")
GUEST_TEXTS = ("name", "qmpstatus", "lock", "tags", "accel")


class ReportError(ValueError):
    """A received report is malformed or too large (it is dropped)."""


@dataclass(frozen=True, slots=True)
class NodeReport:
    node: str
    seq: int
    figures: Mapping[str, float]           # NODE_NUMBERS
    loadavg: tuple[float, float, float]
    guests: Mapping[int, Mapping[str, Any]]
    omitted: int = 0
    storages: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


# ---- encoding -----------------------------------------------------------------------


def _clean_guest(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"status": row.get("status", "unknown")}
    if out["status"] not in GUEST_STATES:
        out["status"] = "unknown"
    for key in GUEST_NUMBERS:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = value
    for key in GUEST_TEXTS:
        value = row.get(key)
        if isinstance(value, str):
            out[key] = value[:MAX_TEXT_CHARS]
    return out


def encode_report(report: NodeReport, max_bytes: int = MAX_REPORT_BYTES) -> bytes:
    """JSON bytes of `report`, at most `max_bytes`: guests beyond the budget (highest
    vmids first) are left out and counted in `omitted`."""
    envelope: dict[str, Any] = {
        "v": FORMAT_VERSION, "node": report.node, "seq": report.seq,
        "figures": dict(report.figures), "loadavg": list(report.loadavg), "guests": {},
        "omitted": report.omitted,
        "storages": {name: {k: v for k, v in figures.items() if k in (*STORAGE_NUMBERS, "content")}
                     for name, figures in sorted(report.storages.items())[:MAX_STORAGES]}}
    budget = max_bytes - len(json.dumps(envelope)) - 32      # room for a larger `omitted`
    guests: dict[str, Any] = {}
    omitted = report.omitted
    for vmid in sorted(report.guests):
        clean = _clean_guest(report.guests[vmid])
        entry = json.dumps(clean)
        cost = len(entry) + len(str(vmid)) + 6
        if budget - cost < 0:
            omitted += 1
            continue
        budget -= cost
        guests[str(vmid)] = clean
    envelope.update(guests=guests, omitted=omitted)
    data = json.dumps(envelope, separators=(",", ":")).encode()
    if len(data) > max_bytes:
        raise ReportError(f"report of {len(data)} bytes over {max_bytes} even without guests")
    return data


# ---- validation ---------------------------------------------------------------------


def _number(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"{where}: not a number: {value!r:.40}")
    if not math.isfinite(value) or value < 0:
        raise ReportError(f"{where}: out of range: {value!r}")
    return value


def _object(where: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ReportError(f"{where}: not an object")
    return value


def _guest(vmid_text: str, value: object) -> tuple[int, dict[str, Any]]:
    if not vmid_text.isdigit() or not 100 <= int(vmid_text) <= 999_999_999:
        raise ReportError(f"guests: invalid vmid {vmid_text!r:.20}")
    row = _object(f"guest {vmid_text}", value)
    status = row.get("status")
    if status not in GUEST_STATES:
        raise ReportError(f"guest {vmid_text}: invalid status {status!r:.20}")
    out: dict[str, Any] = {"status": status}
    for key in GUEST_NUMBERS:
        if key in row:
            out[key] = _number(f"guest {vmid_text}.{key}", row[key])
    for key in GUEST_TEXTS:
        if key in row:
            text = row[key]
            if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
                raise ReportError(f"guest {vmid_text}.{key}: not a short text")
            out[key] = text
    return int(vmid_text), out


def decode_report(payload: bytes, max_bytes: int = MAX_REPORT_BYTES) -> NodeReport:
    """Validate and decode a received report; unknown keys are ignored (newer senders)."""
    if len(payload) > max_bytes:
        raise ReportError(f"{len(payload)} bytes, over the limit of {max_bytes}")
    try:
        message = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as error:
        raise ReportError(f"not JSON: {error}") from None
    message = _object("report", message)
    if message.get("v") != FORMAT_VERSION:
        raise ReportError(f"unsupported format version {message.get('v')!r:.20}")
    node = message.get("node")
    if not isinstance(node, str) or not _NODE_RE.match(node):
        raise ReportError(f"invalid node name {node!r:.70}")
    seq = message.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ReportError(f"invalid seq {seq!r:.20}")
    raw_figures = _object("figures", message.get("figures"))
    figures = {key: _number(f"figures.{key}", raw_figures[key])
               for key in NODE_NUMBERS if key in raw_figures}
    loadavg = message.get("loadavg")
    if not isinstance(loadavg, list) or len(loadavg) != 3:
        raise ReportError("loadavg: not three numbers")
    load = tuple(_number("loadavg", value) for value in loadavg)
    raw_guests = _object("guests", message.get("guests"))
    if len(raw_guests) > MAX_GUESTS:
        raise ReportError(f"{len(raw_guests)} guests, over {MAX_GUESTS}")
    guests = dict(_guest(vmid, row) for vmid, row in raw_guests.items())
    omitted = _number("omitted", message.get("omitted", 0))
    storages = _storages(_object("storages", message.get("storages", {})))
    return NodeReport(node, seq, figures, (load[0], load[1], load[2]), guests, int(omitted),
                      storages)


def _storages(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    if len(raw) > MAX_STORAGES:
        raise ReportError(f"{len(raw)} storages, over {MAX_STORAGES}")
    out: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        if not _STORAGE_RE.match(name):
            raise ReportError(f"storages: invalid storage id {name!r:.70}")
        row = _object(f"storage {name}", value)
        figures: dict[str, Any] = {key: int(_number(f"storage {name}.{key}", row[key]))
                                   for key in STORAGE_NUMBERS if key in row}
        content = row.get("content", "")
        if not isinstance(content, str) or len(content) > MAX_TEXT_CHARS:
            raise ReportError(f"storage {name}.content: not a short text")
        figures["content"] = content
        out[name] = figures
    return out


# ---- the table ----------------------------------------------------------------------


@dataclass(slots=True)
class Received:
    nodeid: int
    report: NodeReport
    received_ns: int


@dataclass
class StatusTable:
    """The latest report per node; every method takes the caller's monotonic now."""

    max_age_ns: int = REPORT_MAX_AGE_NS
    fresh_ns: int = FRESH_NS
    entries: dict[int, Received] = field(default_factory=dict)
    dropped_expired: int = 0
    dropped_left: int = 0

    def apply(self, nodeid: int, report: NodeReport, now_ns: int) -> None:
        self.entries[nodeid] = Received(nodeid, report, now_ns)

    def membership(self, members: Iterable[int]) -> list[int]:
        """Keep only reports of current members; returns the nodeids dropped."""
        keep = set(members)
        gone = [nodeid for nodeid in self.entries if nodeid not in keep]
        for nodeid in gone:
            del self.entries[nodeid]
        self.dropped_left += len(gone)
        return gone

    def expire(self, now_ns: int) -> list[int]:
        old = [n for n, e in self.entries.items() if now_ns - e.received_ns > self.max_age_ns]
        for nodeid in old:
            del self.entries[nodeid]
        self.dropped_expired += len(old)
        return old

    def by_node(self, node: str) -> Received | None:
        """The newest report from node name `node` (a renamed nodeid: the latest wins)."""
        matches = [e for e in self.entries.values() if e.report.node == node]
        return max(matches, key=lambda e: e.received_ns) if matches else None

    def is_fresh(self, entry: Received, now_ns: int) -> bool:
        return now_ns - entry.received_ns <= self.fresh_ns

    def guest(self, vmid: int, node: str, now_ns: int) -> dict[str, Any]:
        """The runtime status of guest `vmid` whose config is on `node`: its node's report
        entry if fresh, else {"status": "unknown"}. A fresh report without the guest says
        it is stopped (its config appeared after the report), unless guests were omitted."""
        entry = self.by_node(node)
        if entry is None or not self.is_fresh(entry, now_ns):
            return {"status": "unknown"}
        row = entry.report.guests.get(vmid)
        if row is not None:
            return dict(row)
        return {"status": "unknown" if entry.report.omitted else "stopped"}

    def fresh_reports(self, now_ns: int) -> list[Received]:
        return sorted((e for e in self.entries.values() if self.is_fresh(e, now_ns)),
                      key=lambda e: e.report.node)


VMLIST_RUNTIME_KEYS = ("status", "uptime", "cpu", "mem", "maxmem", "netin", "netout",
                       "diskread", "diskwrite")


def vmlist_runtime(table: StatusTable, vmid: int, node: str, now_ns: int) -> dict[str, Any]:
    """The `.vmlist` runtime fields of guest `vmid` (config on `node`), from the table."""
    row = table.guest(vmid, node, now_ns)
    return {key: row[key] for key in VMLIST_RUNTIME_KEYS if key in row}


def _rrd_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def rrd_lines(table: StatusTable) -> list[str]:
    """`.rrd` lines in the reference's formats from every report the table holds (it
    drops them after 5 minutes, as the reference expunges its RRD hash):
    pve2-node/<node>, pve2.3-vm/<vmid> and pve2-storage/<node>/<storage>, each stamped
    with the sender's wall clock at gathering (`ctime`)."""
    lines: list[str] = []
    for entry in sorted(table.entries.values(), key=lambda e: e.report.node):
        report = entry.report
        f = report.figures
        ctime = int(f.get("ctime", 0))
        node = [f.get("uptime", 0), 0, ctime, report.loadavg[0], f.get("maxcpu", 0),
                f.get("cpu", 0.0), f.get("wait", 0.0), f.get("maxmem", 0), f.get("mem", 0),
                f.get("maxswap", 0), f.get("swap", 0), f.get("maxdisk", 0), f.get("disk", 0),
                f.get("netin", 0), f.get("netout", 0)]
        lines.append(f"pve2-node/{report.node}:" + ":".join(map(_rrd_value, node)))
        for vmid, g in sorted(report.guests.items()):
            vm = [g.get("uptime", 0), g.get("name", ""), g["status"], 0, ctime,
                  g.get("cpus", 0), g.get("cpu", 0.0), g.get("maxmem", 0), g.get("mem", 0),
                  g.get("maxdisk", 0), g.get("disk", 0), g.get("netin", 0),
                  g.get("netout", 0), g.get("diskread", 0), g.get("diskwrite", 0)]
            lines.append(f"pve2.3-vm/{vmid}:" + ":".join(map(_rrd_value, vm)))
        for name, s in sorted(report.storages.items()):
            if s.get("active"):
                lines.append(f"pve2-storage/{report.node}/{name}:{ctime}:"
                             f"{s.get('maxdisk', 0)}:{s.get('disk', 0)}")
    return lines


# ---- node figures from /proc texts (the reading is the caller's) --------------------


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> bytes of total, used (total - available), swap total and used."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[name] = int(parts[0]) * 1024
    total = values.get("MemTotal", 0)
    available = values.get("MemAvailable", values.get("MemFree", 0))
    swap_total = values.get("SwapTotal", 0)
    return {"maxmem": total, "mem": max(0, total - available), "maxswap": swap_total,
            "swap": max(0, swap_total - values.get("SwapFree", 0))}


def parse_cpu_ticks(text: str) -> tuple[int, int, int]:
    """/proc/stat's aggregate line -> (busy, iowait, total) ticks."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            ticks = [int(value) for value in line.split()[1:]]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
            total = sum(ticks[:8])
            return total - idle, ticks[4] if len(ticks) > 4 else 0, total
    raise ValueError("no aggregate cpu line in /proc/stat")


def cpu_fractions(previous: tuple[int, int, int] | None,
                  current: tuple[int, int, int]) -> tuple[float, float]:
    """(cpu busy fraction, iowait fraction) between two /proc/stat samples."""
    if previous is None:
        return 0.0, 0.0
    total = current[2] - previous[2]
    if total <= 0:
        return 0.0, 0.0
    busy = max(0, current[0] - previous[0]) / total
    wait = max(0, current[1] - previous[1]) / total
    return round(busy, 4), round(wait, 4)
