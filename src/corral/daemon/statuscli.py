"""`corral resources` and `corral node status`: the cluster-wide runtime view, asked from
this node's corrald over its control socket (the data is the status broadcast, see
statusbus.py; the same rows as GET /cluster/resources and /nodes/{node}/status).

    corral resources [--type vm|node|storage] [--output-format text|json] [--state-dir D]
    corral node status [NODE] [--output-format text|json] [--state-dir D]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from corral.cluster.layout import Layout, default_state_dir
from corral.daemon.control import ControlError, request


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--state-dir", default=None,
                        help="state directory (default $CORRAL_STATE_DIR or /var/lib/corral)")
    parser.add_argument("--output-format", choices=("text", "json"), default="text")
    return parser


def _ask(state_dir: str | None, cmd: str, **params: Any) -> Any:
    layout = Layout(state_dir or default_state_dir())
    if not layout.is_clustered():
        raise ControlError(f"corosync config '{layout.conf}' does not exist - is this node "
                           "part of a cluster?")
    return request(str(layout.control_socket), cmd, timeout_s=10.0, **params)


def _size(value: object) -> str:
    if not isinstance(value, (int, float)) or value <= 0:
        return "-"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return "-"


def _percent(value: object) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def format_resources(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'ID':<26} {'TYPE':<8} {'NODE':<12} {'STATUS':<10} {'CPU':>7} {'MEM':>10} "
             f"{'MAXMEM':>10} {'DISK':>10} {'MAXDISK':>10} {'NETIN':>10} {'NETOUT':>10} "
             f"{'UPTIME':>8}"]
    for row in rows:
        uptime = row.get("uptime")
        lines.append(
            f"{row['id']:<26} {row['type']:<8} {row.get('node', ''):<12} "
            f"{row.get('status', ''):<10} {_percent(row.get('cpu')):>7} "
            f"{_size(row.get('mem')):>10} {_size(row.get('maxmem')):>10} "
            f"{_size(row.get('disk')):>10} {_size(row.get('maxdisk')):>10} "
            f"{_size(row.get('netin')):>10} {_size(row.get('netout')):>10} "
            f"{uptime if isinstance(uptime, int) else '-':>8}")
    return "\n".join(lines) + "\n"


def format_node_status(node: str, data: dict[str, Any]) -> str:
    memory, rootfs, swap = data["memory"], data["rootfs"], data["swap"]
    return (f"node:    {node}\n"
            f"uptime:  {data['uptime']} s\n"
            f"cpu:     {_percent(data['cpu'])} of {data['cpuinfo']['cpus']} CPUs "
            f"(iowait {_percent(data.get('wait'))})\n"
            f"loadavg: {' '.join(data['loadavg'])}\n"
            f"memory:  {_size(memory['used'])} used of {_size(memory['total'])}\n"
            f"swap:    {_size(swap['used'])} used of {_size(swap['total'])}\n"
            f"rootfs:  {_size(rootfs['used'])} used of {_size(rootfs['total'])} "
            "(the state dir's file system)\n")


def resources(argv: Sequence[str]) -> int:
    parser = _parser("corral resources", "guests, nodes and storages of the whole cluster")
    parser.add_argument("--type", choices=("vm", "node", "storage"), default=None)
    args = parser.parse_args(argv)
    params = {} if args.type is None else {"type": args.type}
    return _show("corral resources", args, "resources", params, format_resources)


def node(argv: Sequence[str]) -> int:
    """`corral node status [NODE]` (this node when NODE is left out)."""
    parser = _parser("corral node", "a node's runtime status (from the status broadcast)")
    parser.add_argument("action", choices=("status",))
    parser.add_argument("node", nargs="?", default=None)
    args = parser.parse_args(argv)
    params = {} if args.node is None else {"node": args.node}
    return _show("corral node status", args, "node_status", params,
                 lambda data: format_node_status(args.node or "(this node)", data))


def _show(command: str, args: argparse.Namespace, request: str, params: dict[str, Any],
          render: Callable[[Any], str]) -> int:
    """Ask corrald's control socket; print the answer as JSON or rendered text."""
    try:
        data = _ask(args.state_dir, request, **params)
    except ControlError as error:
        print(f"{command}: {error}", file=sys.stderr)
        return 1
    if args.output_format == "json":
        print(json.dumps(data, indent=1))
    else:
        sys.stdout.write(render(data))
    return 0
