"""corrald as a service: sd_notify READY/WATCHDOG/STOPPING over $NOTIFY_SOCKET,
control socket and CPG socket modes, SIGHUP and `corral updatecerts` (the join API
serves the new certificate), exit status 2 without a cluster config, and the
config catch-up of a node that was down while another joined.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.cluster.conftest import wait_until

from corral.cluster.joinclient import PeerClient
from corral.daemon.demo import DemoCluster

FORM_TIMEOUT_S = 40


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    yield sock
    sock.close()


def _messages(sock: socket.socket, want: str, timeout_s: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            seen.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if any(want in message for message in seen):
            return seen
    raise AssertionError(f"no {want!r} in {seen}")


def test_notify_reload_updatecerts_stop(make_cluster: Callable[[int], DemoCluster],
                                        notify_socket: socket.socket) -> None:
    cluster = make_cluster(1)
    cluster.create()
    layout = cluster.layout(1)
    env = dict(os.environ, NOTIFY_SOCKET=notify_socket.getsockname(), WATCHDOG_USEC="400000")
    log = open(cluster.log_path(1), "ab")
    process = subprocess.Popen([sys.executable, "-m", "corral.daemon.main", "--state-dir",
                                str(layout.root)], env=env, stdout=log, stderr=log)
    try:
        seen = _messages(notify_socket, "READY=1", 30)
        seen += _messages(notify_socket, "WATCHDOG=1", 5)
        assert os.stat(layout.control_socket).st_mode & 0o777 == 0o600
        assert os.stat(layout.cpg_socket).st_mode & 0o777 == 0o600
        assert os.stat(layout.ca_key).st_mode & 0o777 == 0o600
        assert os.stat(layout.priv).st_mode & 0o777 == 0o700
        cluster.wait_quorate([1], 1, FORM_TIMEOUT_S)

        client = PeerClient(cluster.address(1), cluster.api_port, None)
        before = client.peer_fingerprint()
        assert before == cluster.fingerprint(1)
        renewed = cluster.corral(1, "updatecerts")
        after = cluster.fingerprint(1)
        assert after != before and after in renewed.stdout
        assert client.peer_fingerprint() == after  # reloaded without a restart

        process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloading" in cluster.log_path(1).read_text(), 10, "SIGHUP reload")
        assert process.poll() is None

        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        _messages(notify_socket, "STOPPING=1", 5)
        assert not layout.control_socket.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def test_without_config_exits_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "corral.daemon.main", "--state-dir",
                             str(tmp_path / "empty")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not in a cluster" in result.stderr


def test_stale_node_catches_up(make_cluster: Callable[[int], DemoCluster]) -> None:
    """Node 2 joins and stops; node 3 joins while node 2 is down; node 2 starts with
    the older nodelist, fetches the newer config from a peer and all three form."""
    cluster = make_cluster(3)
    cluster.create()
    cluster.start(1)
    cluster.wait_quorate([1], 1, FORM_TIMEOUT_S)
    cluster.join(2)
    cluster.start(2)
    cluster.wait_quorate([1, 2], 2, FORM_TIMEOUT_S)
    assert cluster.stop(2) == 0
    wait_until(lambda: len(cluster.control(1, "quorum")["members"]) == 1, FORM_TIMEOUT_S,
               "node 2 gone")
    # Two of two expected votes are needed; with node 2 down node 1 alone is not
    # quorate and cannot admit node 3. Lower the bar first, as an operator would.
    cluster.corral(1, "expected", "1")
    wait_until(lambda: cluster.quorate_with(1, 1), 10, "node 1 quorate alone")
    cluster.join(3)
    cluster.start(3)
    cluster.wait_quorate([1, 3], 2, FORM_TIMEOUT_S)
    assert cluster.layout(2).conf.read_text().count("nodeid") == 2  # still stale on disk
    cluster.start(2)
    cluster.wait_quorate([1, 2, 3], 3, FORM_TIMEOUT_S)
    assert "catch-up: a peer has a newer config" in cluster.log_path(2).read_text()
    assert cluster.layout(2).conf.read_text().count("nodeid") == 3
