"""Text output in the layout of `corosync-quorumtool -s` / `pvecm status` and `pvecm nodes`.

The layout (anchors 3.7 and api.md 4.1):

- label column 18 characters wide (`Expected votes:   3`);
- `Date:` in ctime form (`Thu Nov 26 19:03:28 2026`, day padded with a space);
- `Ring ID:` as `<representative hex>.<sequence hex>`;
- `Quorum:` followed by two spaces when quorate, ` Activity blocked` when not;
- every flag on the `Flags:` line is followed by one space;
- membership rows: nodeid and votes right-aligned in 10 columns, each followed
  by a space, then the name, with ` (local)` on this node's row. With
  `hex_ids`, node ids print as `0x%08x` (the `-H` option).

`names` maps nodeid to what the Name column shows (a node name, or an address
for `pvecm status`, which runs quorumtool with `-i`). A node without an entry
shows its nodeid.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from corral.quorum.core import QuorumStatus

PROVIDER = "corosync_votequorum"
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def ctime_text(moment: datetime) -> str:
    """C's ctime() without the newline: `Thu Nov  6 19:03:28 2026`."""
    return (
        f"{_DAYS[moment.weekday()]} {_MONTHS[moment.month - 1]} {moment.day:2d} "
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d} {moment.year}"
    )


def ring_id_text(ring_id: tuple[int, int] | None) -> str:
    if ring_id is None:
        return "0.0"
    return f"{ring_id[0]:x}.{ring_id[1]:x}"


def _nodeid_text(nodeid: int, hex_ids: bool) -> str:
    return f"0x{nodeid:08x}" if hex_ids else f"{nodeid:10d}"


def _line(label: str, value: object) -> str:
    return f"{label + ':':<18}{value}"


def format_cluster_information(
    name: str, config_version: int, transport: str, secure_auth: bool
) -> str:
    """The `Cluster information` block `pvecm status` prints before quorumtool's output."""
    lines = [
        "Cluster information",
        "-------------------",
        _line("Name", name),
        _line("Config Version", config_version),
        _line("Transport", transport),
        _line("Secure auth", "on" if secure_auth else "off"),
    ]
    return "\n".join(lines) + "\n"


def format_membership(
    status: QuorumStatus, names: Mapping[int, str] | None = None, hex_ids: bool = False
) -> str:
    """The membership block, starting with an empty line (this is all of `pvecm nodes`)."""
    names = names or {}
    lines = ["", "Membership information", "----------------------", "    Nodeid      Votes Name"]
    for member in status.members:
        name = names.get(member.nodeid, str(member.nodeid))
        local = " (local)" if member.local else ""
        lines.append(f"{_nodeid_text(member.nodeid, hex_ids)} {member.votes:10d} {name}{local}")
    return "\n".join(lines) + "\n"


def format_status(
    status: QuorumStatus,
    moment: datetime,
    names: Mapping[int, str] | None = None,
    hex_ids: bool = False,
) -> str:
    """`corosync-quorumtool -s` (with `hex_ids`: `-H`) for this node."""
    node_id = f"0x{status.nodeid:08x}" if hex_ids else str(status.nodeid)
    quorum_suffix = " " if status.quorate else "Activity blocked"
    lines = [
        "Quorum information",
        "------------------",
        _line("Date", ctime_text(moment)),
        _line("Quorum provider", PROVIDER),
        _line("Nodes", len(status.members)),
        _line("Node ID", node_id),
        _line("Ring ID", ring_id_text(status.ring_id)),
        _line("Quorate", "Yes" if status.quorate else "No"),
        "",
        "Votequorum information",
        "----------------------",
        _line("Expected votes", status.expected_votes),
        _line("Highest expected", status.highest_expected),
        _line("Total votes", status.total_votes),
        _line("Quorum", f"{status.quorum} {quorum_suffix}"),
        _line("Flags", "".join(flag + " " for flag in status.flags)),
    ]
    return "\n".join(lines) + "\n" + format_membership(status, names, hex_ids)


def format_pvecm_status(
    status: QuorumStatus,
    moment: datetime,
    cluster_name: str,
    config_version: int,
    transport: str,
    secure_auth: bool,
    addresses: Mapping[int, str] | None = None,
) -> str:
    """`pvecm status`: cluster information, then quorumtool `-siH` (addresses, hex ids)."""
    head = format_cluster_information(cluster_name, config_version, transport, secure_auth)
    return head + "\n" + format_status(status, moment, addresses, hex_ids=True)
