"""Tap devices of bridged guests: names, the bridge check, the enslaving script, counters.

A `netN: <model>=<mac>,bridge=<br>` NIC gets a tap named as the reference does,
`tap<vmid>i<N>`, created by QEMU itself (`-netdev tap,ifname=...,script=...`) so it is
not persistent: the kernel removes it when QEMU exits, however it exits. QEMU runs the
script we write to the run dir with the tap's name; it enslaves the tap to the bridge.

Nodes of the demo cluster without network namespaces share one host, so a guest moving
between two of them needs its tap name twice at once. When the reference name is taken
by another tap, a fallback `t<vmid>i<N>f<k>` is used; the names in use are recorded in
`<run dir>/<vmid>.taps` and the counters follow them. A name taken by a device that is
not a tap is an error (the operator must look at it).

Counters come from `/proc/<qemu pid>/net/dev`: the QEMU's own network namespace, right
even when the reader sits in another one (sysfs shows the namespace it was mounted in).
Orientation as the reference: netout = what the tap received (the guest sent it),
netin = what the tap transmitted (to the guest).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterable

IFNAME_MAX_CHARS = 15      # IFNAMSIZ - 1
FALLBACK_COUNT = 10
IP_TIMEOUT_S = 5.0
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class NetdevError(RuntimeError):
    """A bridged NIC cannot be set up (message is meant for the operator)."""


def tap_name(vmid: int, index: int) -> str:
    """The reference's tap name of `net<index>` of guest `vmid`."""
    return f"tap{vmid}i{index}"


def fallback_names(vmid: int, index: int) -> list[str]:
    names = [f"t{vmid}i{index}f{k}" for k in range(FALLBACK_COUNT)]
    return [name for name in names if len(name) <= IFNAME_MAX_CHARS]


def link_kind(ifname: str) -> str | None:
    """None when no such interface in this network namespace; else its kind
    ("bridge", "tun", ... or "" for a plain device)."""
    if not _IFNAME_RE.match(ifname):
        raise NetdevError(f"invalid interface name {ifname!r}")
    try:
        result = subprocess.run(["ip", "-d", "-j", "link", "show", "dev", ifname],
                                capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise NetdevError("the `ip` command is missing (apt-get install iproute2)") from None
    if result.returncode != 0:
        return None
    try:
        links = json.loads(result.stdout)
        return str(links[0].get("linkinfo", {}).get("info_kind", ""))
    except (ValueError, IndexError, AttributeError):
        return ""


def config_bridges(entries: dict[str, str]) -> list[tuple[str, str]]:
    """(netN, bridge) of a guest config's bridged NICs (entries already validated)."""
    pairs = []
    for key, value in entries.items():
        if key.startswith("net"):
            for part in value.split(","):
                name, _, bridge = part.partition("=")
                if name == "bridge" and bridge:
                    pairs.append((key, bridge))
    return pairs


def bridge_problems(bridges: Iterable[tuple[str, str]], node: str) -> list[str]:
    """For (netN, bridge) pairs: what is wrong on this node (empty list: all fine).
    Usable as a migration precheck on the target."""
    problems = []
    for key, bridge in bridges:
        kind = link_kind(bridge)
        if kind is None:
            problems.append(f"{key}: bridge '{bridge}' does not exist on node '{node}'")
        elif kind != "bridge":
            problems.append(f"{key}: '{bridge}' on node '{node}' is not a bridge ({kind or 'plain device'})")
    return problems


def choose_tap(vmid: int, index: int) -> str:
    """The reference name if free; else the first free fallback if the reference name is
    held by another tap (a second QEMU of this guest on the same host)."""
    name = tap_name(vmid, index)
    kind = link_kind(name)
    if kind is None:
        return name
    if kind != "tun":
        raise NetdevError(f"interface name '{name}' is taken by a device that is not a tap "
                          f"({kind or 'plain device'}); remove it or renumber the guest")
    for fallback in fallback_names(vmid, index):
        if link_kind(fallback) is None:
            return fallback
    raise NetdevError(f"interface name '{name}' and its {FALLBACK_COUNT} fallbacks are taken")


def write_ifup_script(run_dir: str, vmid: int, key: str, bridge: str) -> str:
    """The script QEMU runs with the new tap's name: enslave it to `bridge`, bring it up."""
    if not _IFNAME_RE.match(bridge):
        raise NetdevError(f"invalid bridge name {bridge!r}")
    path = os.path.join(run_dir, f"{vmid}.{key}-ifup")
    text = ("#!/bin/sh\n# written by corral: enslave QEMU's tap to its bridge\nset -e\n"
            f"ip link set dev \"$1\" master '{bridge}'\nip link set dev \"$1\" up\n")
    with open(path + ".tmp", "w", encoding="ascii") as handle:
        handle.write(text)
    os.chmod(path + ".tmp", 0o755)
    os.replace(path + ".tmp", path)
    return path


def taps_path(run_dir: str, vmid: int) -> str:
    return os.path.join(run_dir, f"{vmid}.taps")


def record_taps(run_dir: str, vmid: int, taps: dict[str, str]) -> None:
    path = taps_path(run_dir, vmid)
    if not taps:
        if os.path.exists(path):
            os.unlink(path)
        return
    with open(path + ".tmp", "w", encoding="ascii") as handle:
        json.dump(taps, handle)
    os.replace(path + ".tmp", path)


def read_taps(run_dir: str, vmid: int) -> dict[str, str]:
    """netN -> tap name of the running QEMU (empty when none or unreadable)."""
    try:
        with open(taps_path(run_dir, vmid), encoding="ascii") as handle:
            taps = json.load(handle)
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(taps, dict):
        return {}
    return {str(k): str(v) for k, v in taps.items() if isinstance(v, str)}


def parse_net_dev(text: str) -> dict[str, tuple[int, int]]:
    """/proc/net/dev -> interface: (rx_bytes, tx_bytes)."""
    counters: dict[str, tuple[int, int]] = {}
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) >= 9:
            counters[name.strip()] = (int(fields[0]), int(fields[8]))
    return counters


def tap_counters(pid: int, taps: Iterable[str]) -> tuple[int, int]:
    """(netin, netout) of a QEMU's taps, in bytes (reference orientation, see above);
    (0, 0) for a guest without taps or once the process is gone."""
    names = list(taps)
    if not names:
        return 0, 0
    try:
        with open(f"/proc/{pid}/net/dev", encoding="ascii") as handle:
            counters = parse_net_dev(handle.read())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0, 0
    netin = sum(counters[name][1] for name in names if name in counters)
    netout = sum(counters[name][0] for name in names if name in counters)
    return netin, netout
