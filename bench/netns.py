"""The benchmark network: one hub namespace with a bridge, one namespace per node.

Every node gets its own network namespace (`<prefix>n1`, `<prefix>n2`, ...)
with a veth pair whose other end is enslaved to a bridge that lives in a hub
namespace (`<prefix>hub`). Nothing is created in the root namespace, so the
private subnet exists only inside our namespaces and deleting the namespaces
removes every link, address and nftables table we made.

Loss injection uses nftables inside one node's namespace
(`numgen random mod 100 < P drop` on UDP, input and output hooks), because the
kernel here has no netem.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

LOSS_TABLE = "crlb_loss"
# How long to wait for a killed process inside a stale namespace to vanish.
STALE_KILL_WAIT_S = 2.0


class TopologyError(RuntimeError):
    """A command that builds or tears down the benchmark network failed."""


def run_command(argv: Sequence[str], stdin_text: str | None = None) -> str:
    """Run one setup command; raise TopologyError with its stderr if it fails."""
    result = subprocess.run(
        list(argv), input=stdin_text, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise TopologyError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result.stdout


def list_namespaces() -> list[str]:
    out = run_command(["ip", "netns", "list"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def namespace_pids(name: str) -> list[int]:
    out = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
    ).stdout
    return [int(word) for word in out.split() if word.isdigit()]


@dataclass(frozen=True)
class Topology:
    """Names and addresses of one benchmark network; create() builds it, destroy() removes it."""

    prefix: str = "crlb-"
    subnet: str = "10.213.0"
    node_count: int = 3

    @property
    def hub(self) -> str:
        return f"{self.prefix}hub"

    def namespace(self, node: int) -> str:
        return f"{self.prefix}n{node}"

    def address(self, node: int) -> str:
        return f"{self.subnet}.{node}"

    @property
    def nodes(self) -> range:
        return range(1, self.node_count + 1)

    def all_namespaces(self) -> list[str]:
        return [self.hub, *(self.namespace(node) for node in self.nodes)]

    def in_namespace(self, node: int, argv: Sequence[str]) -> list[str]:
        """The command line that runs `argv` inside node's network namespace."""
        return ["ip", "netns", "exec", self.namespace(node), *argv]

    def create(self) -> None:
        """Build the hub, the bridge and one veth-connected namespace per node."""
        self.destroy()
        run_command(["ip", "netns", "add", self.hub])
        run_command(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        run_command(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        run_command(["ip", "-n", self.hub, "link", "set", "lo", "up"])
        for node in self.nodes:
            ns = self.namespace(node)
            run_command(["ip", "netns", "add", ns])
            run_command(["ip", "-n", self.hub, "link", "add", f"n{node}", "type", "veth",
                         "peer", "name", "eth0", "netns", ns])
            run_command(["ip", "-n", self.hub, "link", "set", f"n{node}", "master", "br0"])
            run_command(["ip", "-n", self.hub, "link", "set", f"n{node}", "up"])
            run_command(["ip", "-n", ns, "addr", "add", f"{self.address(node)}/24", "dev", "eth0"])
            run_command(["ip", "-n", ns, "link", "set", "eth0", "up"])
            run_command(["ip", "-n", ns, "link", "set", "lo", "up"])

    def destroy(self) -> None:
        """Kill what still runs inside our namespaces, then delete them (idempotent)."""
        existing = set(list_namespaces())
        mine = [name for name in self.all_namespaces() if name in existing]
        for name in mine:
            for pid in namespace_pids(name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STALE_KILL_WAIT_S
        while any(namespace_pids(name) for name in mine) and time.monotonic() < deadline:
            time.sleep(0.05)
        for name in mine:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)

    def exists(self) -> bool:
        existing = set(list_namespaces())
        return any(name in existing for name in self.all_namespaces())

    def set_loss(self, node: int, percent: int) -> None:
        """Drop `percent` % of UDP packets in both directions inside node's namespace."""
        if not 0 < percent < 100:
            raise ValueError(f"loss percent {percent} is outside 1..99")
        rules = f"""
table inet {LOSS_TABLE} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        meta l4proto udp numgen random mod 100 < {percent} drop
    }}
    chain output {{
        type filter hook output priority 0; policy accept;
        meta l4proto udp numgen random mod 100 < {percent} drop
    }}
}}
"""
        run_command(self.in_namespace(node, ["nft", "-f", "-"]), stdin_text=rules)

    def clear_loss(self, node: int) -> None:
        subprocess.run(self.in_namespace(node, ["nft", "delete", "table", "inet", LOSS_TABLE]),
                       capture_output=True, check=False)


LOCK_DIR = Path("/run/lock")


@contextmanager
def exclusive(topology: Topology) -> Iterator[None]:
    """Hold a lock for this prefix, so two runs never build (or tear down) the same namespaces."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    path = LOCK_DIR / f"{topology.prefix.rstrip('-')}-bench.lock"
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TopologyError(
                f"another benchmark run holds {path} (namespace prefix {topology.prefix!r})"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
