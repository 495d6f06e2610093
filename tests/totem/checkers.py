"""Safety checkers over the harness's per-node event logs (total order and EVS)."""

from __future__ import annotations

from corral.totem._core import CONF_REGULAR, CONF_TRANSITIONAL

from .harness import Cluster


def segments(events: list[tuple[object, ...]]) -> list[tuple[object, object, list[tuple[object, ...]]]]:
    """Split a log into (regular ring id, next transitional ring id or None, messages)."""
    out: list[tuple[object, object, list[tuple[object, ...]]]] = []
    ring: object = None
    transitional: object = None
    messages: list[tuple[object, ...]] = []
    for event in events:
        if event[0] == "msg":
            messages.append(event)
        elif event[0] == "stop":
            out.append((ring, None, messages))
            messages = []
            ring = None
            transitional = None
        elif event[1] == CONF_TRANSITIONAL:
            # Messages delivered in the transitional configuration (old-ring
            # messages past a gap) count for the old ring: keep collecting.
            transitional = (event[2], event[3])
        elif event[1] == CONF_REGULAR:
            out.append((ring, transitional, messages))
            messages = []
            transitional = None
            ring = event[2]
            if len(event[3]) == 1:  # type: ignore[arg-type]
                # A node that restarts with its disk lost reuses its singleton
                # ring ids; a singleton has nobody to disagree with anyway.
                ring = (ring, "singleton", len(out))
    out.append((ring, None, messages))
    return out


def check(cluster: Cluster, alive_only: bool = False) -> None:
    """Raise AssertionError if the logs break total order or virtual synchrony."""
    by_ring: dict[object, list[tuple[int, object, list[tuple[object, ...]]]]] = {}
    for nodeid, log in cluster.logs.items():
        seen = set()
        for event in log.events:
            if event[0] == "msg":
                key = (event[1], event[2])
                assert key not in seen, f"node {nodeid} delivered {key!r} twice"
                seen.add(key)
        for ring, nxt, messages in segments(log.events):
            if ring is not None:
                by_ring.setdefault(ring, []).append((nodeid, nxt, messages))
    for ring, entries in by_ring.items():
        # Agreed order: any two nodes deliver the messages they have in
        # common in the same order (after a gap, each side of a partition
        # may deliver different messages of its own members).
        for i, (node_a, _, first) in enumerate(entries):
            for node_b, _, second in entries[i + 1:]:
                common = set(first) & set(second)
                assert [m for m in first if m in common] == [m for m in second if m in common], (
                    f"ring {ring}: nodes {node_a} and {node_b} disagree on the order")
        # Virtual synchrony: nodes that move together to the same next
        # configuration delivered exactly the same messages in this one.
        groups: dict[object, list[tuple[int, list[tuple[object, ...]]]]] = {}
        for nodeid, nxt, messages in entries:
            if nxt is not None:
                groups.setdefault(nxt, []).append((nodeid, messages))
        for nxt, members in groups.items():
            trans_members = nxt[1]  # type: ignore[index]
            # (a member of the transitional set may not have installed it yet)
            assert {n for n, _ in members} <= set(trans_members), (ring, nxt)
            first = members[0][1]
            for nodeid, messages in members[1:]:
                assert messages == first, f"ring {ring} -> {nxt}: node {nodeid} differs"
