"""The status endpoints of corrald's HTTPS API (a Router of corral.daemon.api), in the
reference's shapes:

    GET /api2/json/cluster/resources[?type=vm|node|storage]
    GET /api2/json/nodes
    GET /api2/json/nodes/{node}/status
    GET /api2/json/nodes/{node}/qemu
    GET /api2/json/nodes/{node}/qemu/{vmid}/status/current

Any node answers for any node from the status broadcast (statusbus.py), where the
reference proxies the request to the node concerned: figures are at most one
broadcast interval old. Which guests exist and where comes from this node's copy of
the tree (in memory, never through the FUSE mount this loop serves). Authentication:
an administrator ticket.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from corral.daemon.api import ApiError, Request, Route
from corral.daemon.statuscore import GUEST_NUMBERS, GUEST_TEXTS, Received, StatusTable

_NODE = r"([A-Za-z0-9][A-Za-z0-9.-]{0,62})"
_NODE_STATUS_RE = re.compile(rf"^/nodes/{_NODE}/status$")
_NODE_QEMU_RE = re.compile(rf"^/nodes/{_NODE}/qemu$")
_GUEST_STATUS_RE = re.compile(rf"^/nodes/{_NODE}/qemu/(\d{{3,9}})/status/current$")
RESOURCE_TYPES = ("vm", "node", "storage")
GuestList = Callable[[], Iterable[tuple[int, str, str, int]]]   # (vmid, node, kind, version)


class StatusSource(Protocol):
    table: StatusTable

    def now_ns(self) -> int: ...


class StatusApi:
    def __init__(self, bus: StatusSource, node_names: Callable[[], list[str]],
                 members: Callable[[], set[str]], guest_list: GuestList) -> None:
        self.bus = bus
        self.node_names = node_names      # every node of the cluster config
        self.members = members            # node names in the current membership
        self.guest_list = guest_list

    def route(self, method: str, path: str) -> Route | None:
        if method != "GET":
            return None
        if path == "/cluster/resources":
            return self._resources, "admin", ""
        if path == "/nodes":
            return self._nodes, "admin", ""
        for pattern, handler in ((_NODE_STATUS_RE, self._node_status),
                                 (_NODE_QEMU_RE, self._node_qemu),
                                 (_GUEST_STATUS_RE, self._guest_status)):
            if pattern.match(path):
                return handler, "admin", path
        return None

    # ---- rows -------------------------------------------------------------------------

    def _report(self, node: str) -> Received | None:
        entry = self.bus.table.by_node(node)
        if entry is None or not self.bus.table.is_fresh(entry, self.bus.now_ns()):
            return None
        return entry

    def node_row(self, node: str) -> dict[str, Any]:
        row: dict[str, Any] = {"id": f"node/{node}", "type": "node", "node": node, "level": ""}
        entry = self._report(node)
        if node not in self.members():
            row["status"] = "offline"
        elif entry is None:
            row["status"] = "unknown"
        else:
            row["status"] = "online"
        if entry is not None and row["status"] == "online":
            figures = entry.report.figures
            for key in ("uptime", "cpu", "maxcpu", "mem", "maxmem", "disk", "maxdisk"):
                if key in figures:
                    row[key] = figures[key]
        return row

    def guest_row(self, vmid: int, node: str) -> dict[str, Any]:
        row: dict[str, Any] = {"id": f"qemu/{vmid}", "type": "qemu", "vmid": vmid,
                               "node": node, "template": 0}
        runtime = self.bus.table.guest(vmid, node, self.bus.now_ns())
        row["status"] = runtime["status"]
        for key in (*GUEST_NUMBERS, *GUEST_TEXTS):
            if key in runtime:
                row[key] = runtime[key]
        if "cpus" in row:
            row["maxcpu"] = row["cpus"]
        return row

    def _guests(self, node: str | None = None) -> list[tuple[int, str]]:
        return [(vmid, where) for vmid, where, kind, _ in self.guest_list()
                if kind == "qemu" and (node is None or where == node)]

    def _check_node(self, node: str) -> None:
        if node not in self.node_names():
            raise ApiError(400, f"no such node '{node}'")

    # ---- handlers ---------------------------------------------------------------------

    async def _resources(self, request: Request, _: str) -> list[dict[str, Any]]:
        return self.resources(request.params.get("type"))

    def resources(self, kind: str | None) -> list[dict[str, Any]]:
        """/cluster/resources rows (also the control request `resources`)."""
        if kind is not None and kind not in RESOURCE_TYPES:
            raise ApiError(400, "Parameter verification failed.",
                           {"type": f"value '{kind}' does not have a value in the enumeration "
                                    "'vm, storage, node, sdn, pool'"})
        rows: list[dict[str, Any]] = []
        if kind in (None, "vm"):
            rows += [self.guest_row(vmid, node) for vmid, node in self._guests()]
        if kind in (None, "node"):
            rows += [self.node_row(node) for node in sorted(self.node_names())]
        if kind in (None, "storage"):
            rows += self._storage_rows()
        return rows

    def _storage_rows(self) -> list[dict[str, Any]]:
        rows = []
        for node in sorted(self.node_names()):
            entry = self._report(node)
            if entry is None:
                continue
            for storage, figures in sorted(entry.report.storages.items()):
                row = {"id": f"storage/{node}/{storage}", "type": "storage",
                       "storage": storage, "node": node, "plugintype": "dir",
                       "status": "available" if figures.get("active") else "unknown",
                       "disk": 0, "maxdisk": 0}
                row.update({k: v for k, v in figures.items() if k != "active"})
                rows.append(row)
        return rows

    async def _nodes(self, request: Request, _: str) -> list[dict[str, Any]]:
        return [self.node_row(node) for node in sorted(self.node_names())]

    async def _node_status(self, request: Request, path: str) -> dict[str, Any]:
        match = _NODE_STATUS_RE.match(path)
        assert match is not None
        return self.node_status(match.group(1))

    def node_status(self, node: str) -> dict[str, Any]:
        """/nodes/{node}/status (also the control request `node_status`)."""
        self._check_node(node)
        entry = self._report(node)
        if entry is None:
            raise ApiError(595, f"no fresh status from node '{node}' (offline or not "
                                "reporting)")
        figures = entry.report.figures
        mem, maxmem = int(figures.get("mem", 0)), int(figures.get("maxmem", 0))
        swap, maxswap = int(figures.get("swap", 0)), int(figures.get("maxswap", 0))
        disk, maxdisk = int(figures.get("disk", 0)), int(figures.get("maxdisk", 0))
        return {
            "uptime": int(figures.get("uptime", 0)), "cpu": figures.get("cpu", 0.0),
            "wait": figures.get("wait", 0.0),
            "loadavg": [f"{value:.2f}" for value in entry.report.loadavg],
            "cpuinfo": {"cpus": int(figures.get("maxcpu", 1))},
            "memory": {"total": maxmem, "used": mem, "free": maxmem - mem},
            "swap": {"total": maxswap, "used": swap, "free": maxswap - swap},
            "rootfs": {"total": maxdisk, "used": disk, "free": maxdisk - disk,
                       "avail": maxdisk - disk},
        }

    async def _node_qemu(self, request: Request, path: str) -> list[dict[str, Any]]:
        match = _NODE_QEMU_RE.match(path)
        assert match is not None
        node = match.group(1)
        self._check_node(node)
        return [_without_resource_keys(self.guest_row(vmid, where))
                for vmid, where in self._guests(node)]

    async def _guest_status(self, request: Request, path: str) -> dict[str, Any]:
        match = _GUEST_STATUS_RE.match(path)
        assert match is not None
        node, vmid = match.group(1), int(match.group(2))
        self._check_node(node)
        if (vmid, node) not in self._guests(node):
            raise ApiError(500, f"Configuration file 'nodes/{node}/qemu-server/{vmid}.conf' "
                                "does not exist")
        return _without_resource_keys(self.guest_row(vmid, node))


def _without_resource_keys(row: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in row.items() if key not in ("id", "type", "node")}
