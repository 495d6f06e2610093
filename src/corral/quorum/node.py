"""`python -m corral.quorum.node ENGINE-OPTIONS`: `corral engine` plus the quorum service.

A stopgap until the node daemon starts `QuorumService` itself: it runs the engine
(same options as `corral engine`) with the quorum service attached to its CPG
service, reading the `quorum { }` section of the same corosync.conf, keeping
ev_tracking in the state directory, and writing the quorum status to
`<state_dir>/quorum.json` (the `QuorumStatus.to_dict()` form) whenever it
changes and every time the engine refreshes its status.json.

    python -m corral.quorum.node --config corosync.conf --nodeid 1 --keyfile K --state-dir D
    python -m corral.quorum.node --print-quorum D        # corosync-quorumtool -s layout

Limit: on SIGTERM the engine leaves the ring, but the quorum service does not
announce a clean leave first, so allow_downscale sees it as a failure.
"""

from __future__ import annotations

import json
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


class QuorumEngine(engine.Engine):
    """The engine with a QuorumService on top of its CPG service."""

    quorum: QuorumService | None = None

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
