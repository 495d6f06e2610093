"""Events CPG hands to a local client, and the membership entry they carry.

These are shared by the sans-I/O core (which produces them), the in-process
service and the IPC layer (which forward them), so every layer speaks the same
typed values. Reasons are numbered as corosync's `cpg_reason_t`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class Reason(enum.IntEnum):
    """Why an entry appears in a confchg; member_list entries carry UNDEFINED."""

    UNDEFINED = 0
    JOIN = 1
    LEAVE = 2
    NODEDOWN = 3
    NODEUP = 4
    PROCDOWN = 5


class Member(NamedTuple):
    """One process in a group: the node it runs on, its pid, and why it is listed."""

    nodeid: int
    pid: int
    reason: int = Reason.UNDEFINED


class Deliver(NamedTuple):
    """A message multicast to `group` by process `pid` on node `nodeid`.

    Immutable like the other events, but a NamedTuple: one is built per
    delivered message in the node and in every client, and a tuple is built
    several times faster than a frozen dataclass."""

    group: bytes
    nodeid: int
    pid: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class ConfChg:
    """The membership of `group` changed: the new member list, who left, who joined."""

    group: bytes
    members: tuple[Member, ...]
    left: tuple[Member, ...]
    joined: tuple[Member, ...]


@dataclass(frozen=True, slots=True)
class TotemConfChg:
    """The Totem ring changed: its id (representative nodeid, sequence) and members."""

    ring_id: tuple[int, int]
    members: tuple[int, ...]


CpgEvent = Deliver | ConfChg | TotemConfChg
