"""The `corral` command: one verb per subsystem, each implemented in its own module.

Verbs are looked up lazily so a broken optional subsystem cannot stop the others.
Every verb's handler takes the remaining argv and returns an exit status.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# verb: ("module:function", one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "demo": ("corral.demo:main", "start a local multi-node demo cluster"),
    "engine": ("corral.engine:main", "run one Totem/CPG engine node (used by the demo and tests)"),
    "sim": ("corral.sim.__main__:main", "run the deterministic Totem simulator"),
    "ha-sim": ("corral.ha.simcli:main", "run HA scenario directories"),
    "ha": ("corral.ha.cli:main", "HA manager: status, add, set, remove, migrate, relocate, "
           "node-maintenance, disarm, arm"),
    "create": ("corral.cluster.cli:create", "create a new cluster with this node"),
    "add": ("corral.cluster.cli:add", "join this node to an existing cluster"),
    "join-token": ("corral.cluster.cli:join_token", "print a one-time join token"),
    "delnode": ("corral.cluster.cli:delnode", "remove a node from the cluster"),
    "expected": ("corral.cluster.cli:expected", "set expected votes"),
    "status": ("corral.cluster.cli:status", "cluster, quorum and membership status"),
    "nodes": ("corral.cluster.cli:nodes", "list cluster nodes"),
    "updatecerts": ("corral.cluster.cli:updatecerts", "renew this node's certificate"),
    "qm": ("corral.guests.cli:main", "manage QEMU guests on this node"),
    "tasks": ("corral.guests.clustertasks:main", "recent tasks of every node in the cluster"),
    "resources": ("corral.daemon.statuscli:resources",
                  "guests, nodes and storages of the whole cluster, with their runtime status"),
    "node": ("corral.daemon.statuscli:node", "node status [NODE]: a node's runtime status"),
    "version": ("corral.cli:version", "print the software version"),
}


def version(argv: Sequence[str]) -> int:
    from corral import __version__

    print(f"corral {__version__}")
    return 0


def usage() -> str:
    lines = ["usage: corral VERB [ARGS...]", "", "verbs:"]
    lines += [f"  {verb:<10} {text}" for verb, (_, text) in VERBS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    verb, rest = args[0], args[1:]
    if verb not in VERBS:
        print(f"corral: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name = VERBS[verb][0].split(":")
    handler = getattr(importlib.import_module(module_name), function_name)
    return int(handler(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
