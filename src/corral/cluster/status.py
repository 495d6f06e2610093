"""`corral status` and `corral nodes` text from the daemon's status reply.

`corral status` is `pvecm status` (cluster information, then quorum and
membership as `corosync-quorumtool -siH`) followed by a node table Corral
adds: online, votes, link states, software version (flagged when it differs
from this node's) and clock offset to this node (flagged above the threshold).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from corral.quorum.core import QuorumStatus
from corral.quorum.format import format_membership, format_pvecm_status


def _quorum(status: dict[str, Any]) -> QuorumStatus:
    return QuorumStatus.from_dict(status["quorum"])


def format_status(status: dict[str, Any], moment: datetime | None = None) -> str:
    addresses = {int(row["nodeid"]): row["addresses"].get("0", str(row["nodeid"]))
                 for row in status["nodes"]}
    text = format_pvecm_status(
        _quorum(status), moment or datetime.now(), status["cluster_name"],
        int(status["config_version"]), str(status["transport"]), bool(status["secure_auth"]),
        addresses)
    return text + "\n" + format_node_table(status)


def format_node_table(status: dict[str, Any]) -> str:
    own_version = status["software_version"]
    threshold_ms = float(status.get("clock_offset_warn_ms", 500))
    lines = ["Node information", "----------------",
             f"{'Nodeid':>10} {'Name':<16} {'Online':<6} {'Votes':>5} {'Links':<16} "
             f"{'Version':<18} Clock offset"]
    warnings = []
    fs = status.get("filesystem") or {}
    if not fs.get("mounted") and fs.get("note"):
        warnings.append(str(fs["note"]))
    for row in status["nodes"]:
        name = row["name"] + (" (local)" if row["local"] else "")
        links = " ".join(f"{k}:{v}" for k, v in sorted(row["links"].items())) or "-"
        version = row.get("version")
        version_text = version or "?"
        if version and version != own_version:
            version_text += " MISMATCH"
            warnings.append(f"node {row['name']} runs corral {version}, this node "
                            f"{own_version}")
        offset = row.get("clock_offset_ms")
        offset_text = "?" if offset is None else f"{offset:+.1f} ms"
        if offset is not None and abs(offset) > threshold_ms:
            offset_text += " TOO LARGE"
            warnings.append(f"node {row['name']}'s clock is {offset:+.0f} ms off this node's "
                            f"(limit {threshold_ms:.0f} ms): synchronize time (NTP)")
        lines.append(f"0x{int(row['nodeid']):08x} {name:<16} "
                     f"{'yes' if row['online'] else 'no':<6} {int(row['votes']):>5} "
                     f"{links:<16} {version_text:<18} {offset_text}")
    for reason in status.get("restart_needed") or []:
        warnings.append(f"config change needs a corrald restart: {reason}")
    if fs.get("mounted"):
        lines += ["", f"Configuration tree: mounted at {fs.get('mountpoint')} "
                  f"({fs.get('phase', '?')}, version {fs.get('version', '?')})"]
    text = "\n".join(lines) + "\n"
    if warnings:
        text += "\n" + "\n".join(f"WARNING: {w}" for w in warnings) + "\n"
    return text


def format_nodes(status: dict[str, Any]) -> str:
    names = {int(row["nodeid"]): row["name"] for row in status["nodes"]}
    return format_membership(_quorum(status), names)
