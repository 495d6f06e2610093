"""Render the generated root files `.members`, `.vmlist`, `.version` and
`.clusterlog` in the reference's JSON shapes (clients parse them as JSON, so
whitespace is ours). Pure functions: membership, guest lists, counters and
log entries are inputs; no clock is read here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

CLUSTERLOG_SHOWN = 50


@dataclass(frozen=True, slots=True)
class ClusterNode:
    name: str
    nodeid: int
    online: bool
    ip: str


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    name: str
    config_version: int
    quorate: bool
    nodes: Sequence[ClusterNode]


@dataclass(frozen=True, slots=True)
class LogEntry:
    uid: int
    time: int
    pri: int
    tag: str
    pid: int
    node: str
    user: str
    msg: str


def _dump(value: object) -> bytes:
    return (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode()


def render_members(nodename: str, version: int, cluster: ClusterInfo | None) -> bytes:
    """`.members`: this node's name and the cluster's node list, if any."""
    out: dict[str, object] = {"nodename": nodename, "version": version}
    if cluster is not None:
        out["cluster"] = {
            "name": cluster.name,
            "version": cluster.config_version,
            "nodes": len(cluster.nodes),
            "quorate": int(cluster.quorate),
        }
        out["nodelist"] = {
            node.name: {"id": node.nodeid, "online": int(node.online), "ip": node.ip}
            for node in sorted(cluster.nodes, key=lambda n: n.nodeid)
        }
    return _dump(out)


GuestRuntime = Callable[[int, str], Mapping[str, object]]


def render_vmlist(version: int, guests: Iterable[tuple[int, str, str, int]],
                  runtime: GuestRuntime | None = None) -> bytes:
    """`.vmlist` from (vmid, node, kind, config version) tuples. With `runtime` (vmid,
    node -> fields from the status broadcast) every entry also carries the guest's
    runtime fields; `version` numbers stay those of the configs."""
    ids: dict[str, dict[str, object]] = {}
    for vmid, node, kind, config_version in sorted(guests):
        entry: dict[str, object] = {"node": node, "type": kind, "version": config_version}
        if runtime is not None:
            entry.update({key: value for key, value in runtime(vmid, node).items()
                          if key not in entry})
        ids[str(vmid)] = entry
    return _dump({"version": version, "ids": ids})


def render_rrd(lines: Iterable[str]) -> bytes:
    """`.rrd`: one `key:values` line per RRD key, then a NUL byte, as the reference."""
    return "".join(f"{line}\n" for line in lines).encode() + b"\0"


def render_version(starttime: int, clinfo_version: int, vmlist_version: int,
                   observed: Mapping[str, int],
                   kvstore: Mapping[str, Mapping[str, int]]) -> bytes:
    """`.version`: daemon start time, info/list versions and per-file counters."""
    out: dict[str, object] = {
        "starttime": starttime, "clinfo": clinfo_version, "vmlist": vmlist_version,
    }
    for path in sorted(observed):
        out[path] = observed[path]
    out["kvstore"] = {node: dict(sorted(keys.items())) for node, keys in sorted(kvstore.items())}
    return _dump(out)


def render_clusterlog(entries: Iterable[LogEntry], max_entries: int = CLUSTERLOG_SHOWN) -> bytes:
    """`.clusterlog`: the newest `max_entries` entries, newest first."""
    newest = sorted(entries, key=lambda e: (e.time, e.uid), reverse=True)[:max_entries]
    data = [
        {"uid": e.uid, "time": e.time, "pri": e.pri, "tag": e.tag, "pid": e.pid,
         "node": e.node, "user": e.user, "msg": e.msg}
        for e in newest
    ]
    return _dump({"data": data})
