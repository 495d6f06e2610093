"""corral-ha asks corrald's control socket for quorum (the `quorum` request `corral status`
uses): the answer wins over the tree's `.members`, it is cached briefly, and when corrald
does not answer the daemon falls back to `.members`."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.ha.daemon.fsenv import CorraldQuorum, Tree


class FakeCorrald(threading.Thread):
    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.quorate = True
        self.requests = 0
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(8)

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                request = json.loads(conn.makefile().readline())
                assert request["cmd"] == "quorum"
                self.requests += 1
                data = {"quorate": self.quorate, "ready": True, "members": [1, 2]}
                conn.sendall(json.dumps({"ok": True, "data": data}).encode() + b"\n")


@pytest.fixture
def corrald(tmp_path: Path) -> Iterator[FakeCorrald]:
    fake = FakeCorrald(str(tmp_path / "corrald.sock"))
    fake.start()
    yield fake
    fake.server.close()


def _members(path: Path, quorate: bool) -> None:
    path.write_text(json.dumps({"cluster": {"quorate": int(quorate)}, "nodelist": {}}))


def test_corrald_answer_wins_and_is_cached(tmp_path: Path, corrald: FakeCorrald) -> None:
    _members(tmp_path / ".members", quorate=False)
    source = CorraldQuorum(str(tmp_path / "corrald.sock"), cache_s=0.3)
    tree = Tree(tmp_path, quorum_source=source)
    assert tree.quorate()
    assert tree.quorate() and corrald.requests == 1          # cached
    corrald.quorate = False
    time.sleep(0.35)
    assert not tree.quorate() and corrald.requests == 2


def test_falls_back_to_members_without_corrald(tmp_path: Path) -> None:
    _members(tmp_path / ".members", quorate=True)
    tree = Tree(tmp_path, quorum_source=CorraldQuorum(str(tmp_path / "missing.sock")))
    assert tree.quorate()
    _members(tmp_path / ".members", quorate=False)
    tree = Tree(tmp_path, quorum_source=CorraldQuorum(str(tmp_path / "missing.sock")))
    assert not tree.quorate()
