"""`corral ha ...`: the HA manager's command line (the verbs of `ha-manager`).

    corral ha status [--verbose]
    corral ha add SID [--state S] [--max_restart N] [--max_relocate N] [--failback 0|1]
                      [--group G] [--comment C]
    corral ha set SID [same options]
    corral ha remove SID
    corral ha migrate SID NODE | relocate SID NODE
    corral ha node-maintenance enable|disable NODE
    corral ha disarm freeze|ignore | arm

The tree is `--root`, else the mount of the node in `--state-dir` (default
$CORRAL_STATE_DIR, else /var/lib/corral). Config edits are parsed and validated as the
daemon will read them before anything is written, under the cluster lock
`priv/lock/domain-ha`, and written atomically. Commands go to `ha/crm_commands` for the
master. Exit status: 0 done, 2 refused or bad input (nothing changed), 1 tree not reachable.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from corral.errors import ConfigError
from corral.ha.daemon.agent import find_config_node
from corral.ha.daemon.fsenv import Tree, append_crm_command
from corral.ha.logic.config import (
    ResourceConfig,
    format_resources,
    parse_crm_command,
    parse_datacenter,
    parse_groups,
    parse_resources,
    resource_from_props,
)
from corral.ha.logic.rules import parse_rules, rule_states
from corral.ha.logic.status import format_status
from corral.ha.logic.statusfiles import parse_lrm_status, parse_manager_status

CONFIG_LOCK = "domain-ha"
CONFIG_LOCK_WAIT_S = 10.0
PROPS = ("state", "max_restart", "max_relocate", "failback", "group", "comment")


class Refused(Exception):
    """Bad input or a refused change: nothing was written (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral ha", description="HA manager")
    parser.add_argument("--root", type=Path, help="mounted tree (default: from --state-dir)")
    parser.add_argument("--state-dir", help="corrald state directory")
    parser.add_argument("--members-file", type=Path, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="verb", required=True)
    status = sub.add_parser("status", help="HA status in the ha-manager layout")
    status.add_argument("--verbose", action="store_true")
    for verb in ("add", "set"):
        edit = sub.add_parser(verb, help=f"{verb} a HA resource")
        edit.add_argument("sid")
        for prop in PROPS:
            edit.add_argument(f"--{prop}")
    sub.add_parser("remove", help="remove a HA resource").add_argument("sid")
    for verb in ("migrate", "relocate"):
        move = sub.add_parser(verb, help=f"{verb} a HA resource to a node")
        move.add_argument("sid")
        move.add_argument("node")
    maintenance = sub.add_parser("node-maintenance", help="node maintenance mode")
    maintenance.add_argument("action", choices=("enable", "disable"))
    maintenance.add_argument("node")
    sub.add_parser("disarm", help="disarm HA (no fencing)").add_argument(
        "mode", choices=("freeze", "ignore"))
    sub.add_parser("arm", help="arm HA again")
    return parser


def _root(args: argparse.Namespace) -> Path:
    if args.root is not None:
        return Path(args.root)
    from corral.cluster.layout import Layout, default_state_dir
    return Path(Layout(args.state_dir or default_state_dir()).read_identity().mount)


def _read(tree: Tree, rel: str) -> str:
    text = tree.read_text(rel)
    if text is None:
        raise OSError(f"cannot read {tree.path(rel)}")
    return text


@contextmanager
def _config_lock(tree: Tree) -> Iterator[None]:
    deadline = time.monotonic() + CONFIG_LOCK_WAIT_S
    while not tree.try_lock(CONFIG_LOCK, held=False):
        if time.monotonic() > deadline:
            raise Refused(f"cannot get lock '{CONFIG_LOCK}' (another edit in progress, or no "
                          "quorum)")
        time.sleep(0.1)
    try:
        yield
    finally:
        tree.unlock(CONFIG_LOCK)


def _props(args: argparse.Namespace) -> dict[str, str]:
    return {prop: getattr(args, prop) for prop in PROPS if getattr(args, prop) is not None}


def _check_resource(tree: Tree, resource: ResourceConfig) -> list[str]:
    """Refuse what the daemon would reject; return warnings (rules that would be ignored)."""
    if resource.group is not None:
        groups = parse_groups(_read(tree, "ha/groups.cfg"))
        if resource.group not in groups:
            raise Refused(f"group '{resource.group}' does not exist in ha/groups.cfg")
    rules = parse_rules(_read(tree, "ha/rules.cfg"))
    states = rule_states(rules, tree.node_names())
    return [f"warning: rule '{rule.ident}' {states[rule.ident]}" for rule in rules
            if resource.sid in rule.resources and states.get(rule.ident, "").startswith("ignored")]


def _edit(tree: Tree, args: argparse.Namespace) -> list[str]:
    with _config_lock(tree):
        resources = parse_resources(_read(tree, "ha/resources.cfg"))
        sid = args.sid
        warnings: list[str] = []
        if args.verb == "remove":
            if sid not in resources:
                raise Refused(f"service '{sid}' is not a HA resource")
            del resources[sid]
        else:
            if args.verb == "add":
                if sid in resources:
                    raise Refused(f"service '{sid}' is already a HA resource")
                resource = resource_from_props(sid, _props(args), "resource")
                if find_config_node(tree.root, sid) is None:
                    raise Refused(f"guest '{sid}' does not exist (no config under nodes/*/)")
            else:
                if sid not in resources:
                    raise Refused(f"service '{sid}' is not a HA resource")
                merged = {**_current_props(resources[sid]), **_props(args)}
                resource = resource_from_props(sid, merged, "resource")
            warnings = _check_resource(tree, resource)
            resources[sid] = resource
        text = format_resources(resources)
        parse_resources(text)  # what the daemons will read must parse
        if not tree.write_atomic("ha/resources.cfg", text):
            raise OSError("writing ha/resources.cfg failed (no quorum?)")
    return warnings


def _current_props(resource: ResourceConfig) -> dict[str, Any]:
    props: dict[str, Any] = {"state": resource.state.value, "max_restart": resource.max_restart,
                             "max_relocate": resource.max_relocate,
                             "failback": "1" if resource.failback else "0"}
    if resource.group:
        props["group"] = resource.group
    if resource.comment:
        props["comment"] = resource.comment
    return props


def _command_line(tree: Tree, args: argparse.Namespace) -> str:
    if args.verb in ("migrate", "relocate"):
        resources = parse_resources(_read(tree, "ha/resources.cfg"))
        if args.sid not in resources:
            raise Refused(f"service '{args.sid}' is not a HA resource")
        if args.node not in tree.node_names():
            raise Refused(f"no such cluster node '{args.node}'")
        line = f"{args.verb} {args.sid} {args.node}"
    elif args.verb == "node-maintenance":
        if args.node not in tree.node_names():
            raise Refused(f"no such cluster node '{args.node}'")
        line = f"{args.action}-node-maintenance {args.node}"
    elif args.verb == "disarm":
        line = f"disarm-ha {args.mode}"
    else:
        line = "arm-ha"
    parse_crm_command(line)
    return line


def _status(tree: Tree, verbose: bool) -> str:
    status = parse_manager_status(_read(tree, "ha/manager_status"))
    # As the reference: one lrm line per node the master knows, plus nodes that have
    # written an lrm_status (a fresh cluster before its first master round).
    lrm: dict[str, dict[str, Any] | None] = {}
    known = set(status.get("node_status") or {})
    for node in tree.node_names():
        text = tree.read_text(f"nodes/{node}/lrm_status")
        if node not in known and not text:
            continue
        try:
            lrm[node] = parse_lrm_status(text, node) if text is not None else None
        except ConfigError:
            lrm[node] = None
    resources = parse_resources(_read(tree, "ha/resources.cfg"))
    for sid, resource in resources.items():
        resource.node = find_config_node(tree.root, sid)
    crs = parse_datacenter(_read(tree, "datacenter.cfg")).crs_mode
    return format_status(status, lrm, resources, tree.quorate(), int(time.time()), str(crs),
                         verbose)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        root = _root(args)
        if not os.path.isdir(root):
            raise OSError(f"tree {root} is not mounted")
        tree = Tree(root, args.members_file)
        if args.verb == "status":
            sys.stdout.write(_status(tree, args.verbose))
        elif args.verb in ("add", "set", "remove"):
            for warning in _edit(tree, args):
                print(warning, file=sys.stderr)
        else:
            line = _command_line(tree, args)
            append_crm_command(tree.root, line)
            print(f"queued crm command: {line}")
    except (Refused, ConfigError) as error:
        print(f"corral ha {args.verb}: {error}", file=sys.stderr)
        return 2
    except (OSError, ValueError, KeyError) as error:
        print(f"corral ha {args.verb}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
