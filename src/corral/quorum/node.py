"""`python -m corral.quorum.node ENGINE-OPTIONS`: `corral engine` plus the quorum service.

A stopgap until the node daemon starts `QuorumService` itself: it runs the engine
(same options as `corral engine`) with the quorum service attached to its CPG
service, reading the `quorum { }` section of the same corosync.conf, keeping
ev_tracking in the state directory, and writing the quorum status to
`<state_dir>/quorum.json` (the `QuorumStatus.to_dict()` form) whenever it
changes and every time the engine refreshes its status.json.

    python -m corral.quorum.node --config corosync.conf --nodeid 1 --keyfile K --state-dir D
    python -m corral.quorum.node --print-quorum D        # corosync-quorumtool -s layout

On SIGTERM/SIGINT the quorum service first announces a clean leave and leaves
its group (so allow_downscale counts it as clean), then the engine leaves the ring.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from corral import engine
from corral.errors import CorralError
from corral.quorum.config import QuorumConfig
from corral.quorum.core import QuorumStatus
from corral.quorum.format import format_status
from corral.quorum.service import QuorumService

STATUS_FILE = "quorum.json"
# How long a stop request waits for the quorum service's clean leave.
LEAVE_TIMEOUT_S = 2.0

log = logging.getLogger("corral.quorum")


class _StopAfterQuorum:
    """Stands in for the engine's stop event: a stop request first lets the quorum
    service leave cleanly, then lets the engine's own shutdown proceed."""

    def __init__(self, engine_: QuorumEngine) -> None:
        self._engine = engine_
        self._event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def set(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._stop())

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    async def _stop(self) -> None:
        quorum = self._engine.quorum
        if quorum is not None:
            try:
                await asyncio.wait_for(quorum.stop(), LEAVE_TIMEOUT_S)
            except Exception:
                log.warning("quorum: no clean leave before shutdown", exc_info=True)
        self._event.set()


class QuorumEngine(engine.Engine):
    """The engine with a QuorumService on top of its CPG service."""

    quorum: QuorumService | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stop_requested = _StopAfterQuorum(self)  # type: ignore[assignment]

    async def _start_cpg(self) -> None:
        await super()._start_cpg()
        if self.cpg is None:
            raise CorralError("the quorum service needs the CPG service, which is missing")
        with open(self.args.config, encoding="utf-8") as handle:
            config = QuorumConfig.from_conf_text(handle.read(), self.args.config)
        self.quorum = QuorumService(self.cpg, config, self.args.state_dir)
        self.quorum.subscribe(lambda _change: self.write_quorum())
        await self.quorum.start()
        self.write_quorum()

    def write_status(self) -> None:
        super().write_status()
        self.write_quorum()

    def write_quorum(self) -> None:
        if self.quorum is None:
            return
        path = os.path.join(self.args.state_dir, STATUS_FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(self.quorum.status().to_dict(), handle)
        os.replace(path + ".tmp", path)


def read_quorum(state_dir: str) -> QuorumStatus | None:
    """The last status a node wrote, or None if there is none (yet)."""
    try:
        with open(os.path.join(state_dir, STATUS_FILE), encoding="utf-8") as handle:
            data: dict[str, Any] = json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return QuorumStatus.from_dict(data)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--print-quorum"] and len(args) == 2:
        status = read_quorum(args[1])
        if status is None:
            print(f"no quorum status in {args[1]}", file=sys.stderr)
            return 1
        print(format_status(status, datetime.now()), end="")
        return 0
    engine.Engine = QuorumEngine  # type: ignore[misc]
    return engine.main(args)


if __name__ == "__main__":
    sys.exit(main())
