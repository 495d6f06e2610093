"""Closed process groups (CPG) on top of Totem: named groups with virtual synchrony.

- `corral.cpg.core.CpgCore`: the sans-I/O state machine, one per node.
- `corral.cpg.service.CpgService`: the asyncio API for code inside the node process.
- `corral.cpg.ipc`: the local Unix-socket server and the `CpgClient` library.
"""

from corral.cpg.events import ConfChg, CpgEvent, Deliver, Member, Reason, TotemConfChg

__all__ = ["ConfChg", "CpgEvent", "Deliver", "Member", "Reason", "TotemConfChg"]
