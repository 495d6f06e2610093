"""The seam between the FUSE front and what applies operations.

The FUSE front (`corral.cfs.fuse`) reads the local store directly (reads are
local) and hands every mutating operation to a backend, which returns only
once the operation is applied locally, with the errno every node got:

- `LocalBackend` (local mode, like `pmxcfs -l`): applies straight to the
  node's store, treating the node as quorate; for recovery of a single node.
- `ReplicatedBackend` (`corral.cfs.replication`): multicasts the operation in
  total order through a process group and applies it in delivery order on
  every node; refuses with EACCES without quorum, waits (or EAGAIN after a
  bound) during a resync.
"""

from __future__ import annotations

from typing import Protocol

from corral.cfs.ops import Op
from corral.cfs.store import Store


class CfsBackend(Protocol):
    """What the FUSE front needs from the layer below it."""

    @property
    def store(self) -> Store:
        """The node's store: `store.state.tree` for metadata, `store.read` for content."""
        ...

    @property
    def nodename(self) -> str:
        """This node's name (target of the `local`, `qemu-server`, `lxc` links)."""
        ...

    def quorate(self) -> bool:
        """Whether mutations can currently succeed (modes shown read-only otherwise)."""
        ...

    async def submit(self, op: Op) -> int:
        """Apply `op` cluster-wide; return its errno (0 = applied) once applied locally."""
        ...

    def virtual_file(self, name: str) -> bytes | None:
        """Content of a generated root file (`.members`, `.vmlist`, `.version`,
        `.clusterlog`), or None if `name` is not one."""
        ...
