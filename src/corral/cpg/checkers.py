"""Checkers over what CPG clients saw, for tests and the deterministic simulator.

Each function takes per-client event logs (any hashable client key mapping to
the client's events in order) and returns a list of violations as readable
strings; an empty list means the property holds.

- Virtual synchrony per group: clients that see the same two consecutive
  confchgs of a group deliver the same messages between them. Equal confchg
  content is not enough to call two confchgs "the same" (a membership can
  recur), so each event comes with a stamp naming the input that produced it
  (the same Totem message or configuration on every node that saw it).
- Total order: two clients deliver the messages they both delivered in the
  same order (payloads must be unique in the run).
- View agreement: the operational members of one ring hold the same view.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from corral.cpg.core import CpgCore, SyncState
from corral.cpg.events import ConfChg, CpgEvent, Deliver

Stamped = tuple[Hashable, ConfChg]
Segment = tuple[Stamped, Stamped, list[tuple[int, int, bytes]]]


def group_segments(
    events: Sequence[CpgEvent], stamps: Sequence[Hashable], group: bytes
) -> list[Segment]:
    """(confchg, next confchg, deliveries between) for one group in one client's log."""
    out: list[Segment] = []
    current: Stamped | None = None
    between: list[tuple[int, int, bytes]] = []
    for event, stamp in zip(events, stamps, strict=True):
        if isinstance(event, ConfChg) and event.group == group:
            if current is not None:
                out.append((current, (stamp, event), between))
            current, between = (stamp, event), []
        elif isinstance(event, Deliver) and event.group == group:
            between.append((event.nodeid, event.pid, event.payload))
    return out


def virtual_synchrony_violations(
    logs: Mapping[Any, Sequence[CpgEvent]], stamps: Mapping[Any, Sequence[Hashable]]
) -> tuple[int, list[str]]:
    """Returns (segment pairs compared, violations)."""
    compared, problems = 0, []
    groups = {e.group for log in logs.values() for e in log if isinstance(e, ConfChg)}
    for group in sorted(groups):
        seen: dict[tuple[Stamped, Stamped], tuple[Any, list[tuple[int, int, bytes]]]] = {}
        for key in sorted(logs, key=repr):
            for first, second, between in group_segments(logs[key], stamps[key], group):
                prior = seen.setdefault((first, second), (key, between))
                if prior[0] == key and prior[1] is between:
                    continue
                compared += 1
                if prior[1] != between:
                    problems.append(
                        f"group {group!r}: clients {prior[0]} and {key} saw the same two "
                        f"confchgs but delivered {len(prior[1])} vs {len(between)} "
                        "different messages between them"
                    )
    return compared, problems


def total_order_violations(logs: Mapping[Any, Sequence[CpgEvent]]) -> list[str]:
    orders = {
        key: [e.payload for e in log if isinstance(e, Deliver)] for key, log in logs.items()
    }
    problems = []
    for (key_a, a), (key_b, b) in itertools.combinations(
        sorted(orders.items(), key=lambda item: repr(item[0])), 2
    ):
        common = set(a) & set(b)
        if [p for p in a if p in common] != [p for p in b if p in common]:
            problems.append(f"clients {key_a} and {key_b} deliver common messages in another order")
    return problems


def view_agreement_violations(
    cores: Mapping[int, CpgCore], rings: Iterable[Sequence[int]]
) -> list[str]:
    """Every ring given (its live members) must be operational with one view."""
    problems = []
    for ring in rings:
        members = [n for n in ring if n in cores]
        not_ready = [n for n in members if cores[n].state != SyncState.OPERATIONAL]
        if not_ready:
            problems.append(f"ring {tuple(ring)}: nodes {not_ready} not operational")
            continue
        digests = {cores[n].view_digest() for n in members}
        if len(digests) > 1:
            problems.append(f"ring {tuple(ring)}: {len(digests)} different group views")
    return problems
