"""Apply a changed nodelist to a running transport (nodes added or removed).

The transport has no public API for this yet, so this reaches into its link
monitor, peer list and the authenticator's known senders. What cannot change
without a restart (links, ports, this node's addresses, Totem timers derived
from the node count) is reported back and left alone.
"""

from __future__ import annotations

import logging

from corral.corosync_conf import ClusterConfig
from corral.totem.transport import LinkState, PeerLink, UdpTransport

log = logging.getLogger("corral.daemon")


def restart_needed(old: ClusterConfig, new: ClusterConfig, nodeid: int) -> list[str]:
    """What differs between `old` and `new` that only a restart applies."""
    reasons = []
    if old.links != new.links:
        reasons.append("links/interfaces changed")
    if old.cluster_name != new.cluster_name:
        reasons.append("cluster name changed")
    if old.encrypt != new.encrypt:
        reasons.append("encryption changed")
    if old.totem != new.totem:
        reasons.append("totem timers changed")
    old_self = [n for n in old.nodes if n.nodeid == nodeid]
    new_self = [n for n in new.nodes if n.nodeid == nodeid]
    if old_self and new_self and old_self[0].addrs != new_self[0].addrs:
        reasons.append("this node's addresses changed")
    for node in new.nodes:
        for before in old.nodes:
            if before.nodeid == node.nodeid and before.addrs != node.addrs:
                reasons.append(f"node {node.nodeid}'s addresses changed")
    return reasons


def apply_nodelist(transport: UdpTransport, new: ClusterConfig) -> tuple[list[int], list[int]]:
    """Add and remove peers so the transport matches `new`; returns (added, removed)."""
    old_ids = {n.nodeid for n in transport.config.nodes}
    new_ids = {n.nodeid for n in new.nodes}
    added = sorted(new_ids - old_ids)
    removed = sorted(old_ids - new_ids - {transport.nodeid})
    for node in new.nodes:
        if node.nodeid not in added:
            continue
        for link in new.links:
            address = (node.addrs[link.linknumber], link.port)
            transport._address_owner[(link.linknumber, address[0])] = node.nodeid
            transport.monitor.add(PeerLink(node.nodeid, link.linknumber, link.priority, address))
    for nodeid in removed:
        for key in [k for k in transport.monitor.peers if k[0] == nodeid]:
            peer = transport.monitor.peers.pop(key)
            transport._address_owner.pop((key[1], peer.address[0]), None)
    transport.other_nodeids = sorted(new_ids - {transport.nodeid})
    transport.auth.known_nodeids = frozenset(new_ids)
    transport.config = new
    if added or removed:
        log.info("transport: nodes added %s, removed %s", added or "-", removed or "-")
    return added, removed


def link_states(transport: UdpTransport) -> dict[int, dict[int, str]]:
    """nodeid -> link number -> 'local' | 'up' | 'down'."""
    result: dict[int, dict[int, str]] = {}
    for (nodeid, linknumber), peer in transport.monitor.peers.items():
        state = {LinkState.LOCAL: "local", LinkState.UP: "up"}.get(peer.state, "down")
        result.setdefault(nodeid, {})[linknumber] = state
    return result
