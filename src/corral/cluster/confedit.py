"""Edits of corosync.conf text: new cluster, add a node, remove a node.

Every edit parses the text, changes the tree, bumps `totem.config_version`,
and checks the result with `ClusterConfig.from_text`, so a bad edit raises
before anything is written. Errors are `JoinRefused` with a message for the
operator.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from corral.corosync_conf import (
    MAX_LINKS,
    ClusterConfig,
    NodeSpec,
    Section,
    dump,
    parse,
    render_cluster,
)
from corral.errors import CorralError

NAME_RE = re.compile(r"^[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")
CLUSTER_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_-]{0,14}$")
MAX_NODEID = (1 << 31) - 1
MAX_VOTES = 1000


class JoinRefused(CorralError):
    """A cluster change that is refused; nothing was changed."""


@dataclass(frozen=True)
class LinkArg:
    number: int
    address: str
    priority: int | None = None


def parse_link(number: int, text: str) -> LinkArg:
    """`[address=]<IP>[,priority=<n>]` (the reference's --linkN property string)."""
    address: str | None = None
    priority: int | None = None
    for part in text.split(","):
        key, _, value = part.partition("=")
        if not _:
            key, value = "address", key
        key = key.strip()
        if key == "address":
            address = value.strip()
        elif key == "priority":
            try:
                priority = int(value)
            except ValueError:
                raise JoinRefused(f"link{number}: priority must be an integer") from None
            if not 0 <= priority <= 255:
                raise JoinRefused(f"link{number}: priority must be 0..255")
        else:
            raise JoinRefused(f"link{number}: unknown key {key!r} (address=, priority=)")
    if not address:
        raise JoinRefused(f"link{number}: no address")
    try:
        address = str(ipaddress.ip_address(address))
    except ValueError:
        raise JoinRefused(f"link{number}: not an IP address: {address!r}") from None
    return LinkArg(number, address, priority)


def check_node_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise JoinRefused(f"invalid node name {name!r} (letters, digits, '-', at most 63)")


def check_votes(votes: int) -> None:
    if not 0 <= votes <= MAX_VOTES:
        raise JoinRefused(f"votes must be 0..{MAX_VOTES}, got {votes}")


def new_cluster_text(cluster_name: str, node_name: str, nodeid: int, links: list[LinkArg],
                     votes: int, port: int) -> str:
    if not CLUSTER_NAME_RE.match(cluster_name):
        raise JoinRefused(f"invalid cluster name {cluster_name!r} (letters, digits, '-', "
                          "'_', at most 15)")
    check_node_name(node_name)
    check_votes(votes)
    if not 1 <= nodeid <= MAX_NODEID:
        raise JoinRefused(f"nodeid must be 1..{MAX_NODEID}")
    links = sorted(links, key=lambda link: link.number)
    if [link.number for link in links] != list(range(len(links))) or not links:
        raise JoinRefused("links must be numbered link0, link1, ... without gaps")
    text = render_cluster(cluster_name, [(nodeid, node_name, [link.address for link in links])],
                          config_version=1, port=port)
    root = parse(text)
    totem = root.section("totem")
    assert totem is not None
    totem.options["transport"] = "knet"
    for interface, link in zip(totem.sections("interface"), links, strict=True):
        if link.priority is not None:
            interface.options["knet_link_priority"] = str(link.priority)
    _node_sections(root)[0].options["quorum_votes"] = str(votes)
    text = dump(root)
    ClusterConfig.from_text(text)
    return text


def _node_sections(root: Section) -> list[Section]:
    nodelist = root.section("nodelist")
    if nodelist is None:
        raise JoinRefused("corosync.conf has no nodelist")
    return nodelist.sections("node")


def _bump(root: Section) -> int:
    totem = root.section("totem")
    if totem is None:
        raise JoinRefused("corosync.conf has no totem section")
    version = int(totem.options.get("config_version", "0")) + 1
    totem.options["config_version"] = str(version)
    return version


def add_node(text: str, name: str, addresses: list[str], nodeid: int | None, votes: int,
             force: bool = False, online: frozenset[int] = frozenset()) -> tuple[str, int]:
    """(new text, the node's id). With `force`, an offline node of the same name is
    replaced (a node whose state was wiped joins again)."""
    check_node_name(name)
    check_votes(votes)
    config = ClusterConfig.from_text(text)
    root = parse(text)
    nodes = _node_sections(root)
    if len(addresses) != len(config.links):
        raise JoinRefused(f"the cluster has {len(config.links)} link(s); the joining node "
                          f"gives {len(addresses)} address(es)")
    replaced: int | None = None
    for spec in config.nodes:
        if spec.name == name:
            if not force:
                raise JoinRefused(f"node name {name!r} is already in the cluster (nodeid "
                                  f"{spec.nodeid}); delnode it first or use --force")
            if spec.nodeid in online:
                raise JoinRefused(f"node {name!r} is in the cluster and online")
            replaced = spec.nodeid
    others = [spec for spec in config.nodes if spec.nodeid != replaced]
    if nodeid is None:
        nodeid = replaced if replaced is not None else _free_nodeid(others)
    if not 1 <= nodeid <= MAX_NODEID:
        raise JoinRefused(f"nodeid must be 1..{MAX_NODEID}")
    for spec in others:
        if spec.nodeid == nodeid:
            raise JoinRefused(f"nodeid {nodeid} is already used by node {spec.name!r}")
        for link, address in spec.addrs.items():
            if link < len(addresses) and addresses[link] == address:
                raise JoinRefused(f"address {address} (link{link}) is already used by node "
                                  f"{spec.name!r}")
    nodelist = root.section("nodelist")
    assert nodelist is not None
    nodelist.children = [n for n in nodes if n.options.get("name") != name]
    options = {"name": name, "nodeid": str(nodeid), "quorum_votes": str(votes)}
    options.update({f"ring{i}_addr": a for i, a in enumerate(addresses[:MAX_LINKS])})
    nodelist.children.append(Section("node", options=options))
    _bump(root)
    new_text = dump(root)
    ClusterConfig.from_text(new_text)
    return new_text, nodeid


def _free_nodeid(nodes: list[NodeSpec]) -> int:
    used = {n.nodeid for n in nodes}
    candidate = 1
    while candidate in used:
        candidate += 1
    return candidate


def remove_node(text: str, name: str, online: frozenset[int], local_nodeid: int) -> tuple[str, int]:
    """(new text, the removed nodeid); refused for an online node, this node, the last node."""
    config = ClusterConfig.from_text(text)
    matches = [spec for spec in config.nodes if spec.name == name or str(spec.nodeid) == name]
    if not matches:
        raise JoinRefused(f"no node {name!r} in the cluster")
    spec = matches[0]
    if spec.nodeid == local_nodeid:
        raise JoinRefused("cannot remove the local node; run delnode on another member")
    if spec.nodeid in online:
        raise JoinRefused(f"node {spec.name!r} is online; stop its corrald (or power it off) "
                          "before removing it")
    root = parse(text)
    nodelist = root.section("nodelist")
    assert nodelist is not None
    nodelist.children = [n for n in nodelist.children
                         if not (n.name == "node" and n.options.get("nodeid") == str(spec.nodeid))]
    _bump(root)
    new_text = dump(root)
    ClusterConfig.from_text(new_text)
    return new_text, spec.nodeid
