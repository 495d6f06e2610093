"""The watchdog mux in fallback mode: a fed client keeps the guests alive; a client that
stops feeding, or that dies without the magic close, gets every guest of its node SIGKILLed
within the timeout; a magic close disarms it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from corral.ha.daemon.agent import ProcessGuestAgent
from corral.ha.daemon.watchdog import WatchdogClient, start_mux

from .harness import guest_pids, make_guest, wait_for

TIMEOUT_S = 1.5


@pytest.fixture
def mux(tmp_path: Path) -> Iterator[tuple[str, ProcessGuestAgent]]:
    root = tmp_path / "tree"
    make_guest(root, "n1", 100)
    make_guest(root, "n1", 101)
    agent = ProcessGuestAgent(root, "n1", tmp_path / "guests")
    sock = str(tmp_path / "mux.sock")
    pid = start_mux(sock, tmp_path / "guests", TIMEOUT_S, "fallback", 1,
                    str(tmp_path / "mux.log"))
    assert pid > 0
    try:
        yield sock, agent
    finally:
        os.kill(pid, signal.SIGKILL)
        for guest in guest_pids(tmp_path / "guests").values():
            os.kill(guest, signal.SIGKILL)


def test_fed_client_keeps_guests_then_expiry_kills_them(mux: tuple[str, ProcessGuestAgent]) -> None:
    sock, agent = mux
    assert agent.start("vm:100") and agent.start("vm:101")
    client = WatchdogClient(sock)
    client.open()
    for _ in range(10):  # 3 s of feeding, twice the timeout
        client.update()
        stopped_feeding = time.monotonic()
        time.sleep(0.3)
    assert agent.running("vm:100") and agent.running("vm:101")
    wait_for(lambda: not agent.running("vm:100") and not agent.running("vm:101"),
             TIMEOUT_S + 5, "the mux to kill the guests")
    assert time.monotonic() - stopped_feeding >= TIMEOUT_S - 0.1
    client.close()


def test_magic_close_disarms(mux: tuple[str, ProcessGuestAgent]) -> None:
    sock, agent = mux
    assert agent.start("vm:100")
    client = WatchdogClient(sock)
    client.update()
    client.close()
    time.sleep(TIMEOUT_S + 1.0)
    assert agent.running("vm:100")


def test_client_killed_without_magic(mux: tuple[str, ProcessGuestAgent], tmp_path: Path) -> None:
    sock, agent = mux
    assert agent.start("vm:100")
    code = ("import socket,sys,time\n"
            "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'p')\n"
            "time.sleep(60)\n")
    client = subprocess.Popen([sys.executable, "-c", code, sock])
    time.sleep(0.3)
    client.send_signal(signal.SIGKILL)
    client.wait(10)
    wait_for(lambda: not agent.running("vm:100"), TIMEOUT_S + 5, "the guest to be killed")
    log = (tmp_path / "mux.log").read_text()
    assert "closed without magic" in log and "killed guests" in log
