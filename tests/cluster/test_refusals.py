"""Every refused cluster command, against real daemons: a clear message, exit status 2
(1 when corrald is unreachable), and nothing changed — no cluster files on the
joining node, the member's config_version unchanged.

Covers: unreachable host, a host that does not speak TLS, fingerprint mismatch,
no fingerprint without a terminal, malformed fingerprint, bad/expired/reused
token, wrong password, name/nodeid/address taken, bad link syntax, guest
configs on the joining node, joining node already clustered, delnode of an
unknown node, verbs on an unclustered node.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from corral.daemon.demo import DEMO_PASSWORD, DemoCluster

FORM_TIMEOUT_S = 40


@pytest.fixture
def plain_http_server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that answers like a plain HTTP server."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            with connection:
                connection.settimeout(1)
                try:
                    connection.recv(4096)
                    connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join()
    server.close()


def test_join_refusals(make_cluster: Callable[[int], DemoCluster], plain_http_server: int) -> None:
    cluster = make_cluster(3)
    cluster.create()
    cluster.start(1)
    cluster.wait_quorate([1], 1, FORM_TIMEOUT_S)
    member = f"{cluster.address(1)}:{cluster.api_port}"
    fingerprint = cluster.fingerprint(1)

    def add(*args: str, stdin_text: str | None = None, node: int = 2) -> str:
        options = {"--name": cluster.name(node), "--link0": cluster.address(node)}
        argv = list(args)
        for key, value in options.items():
            if key not in argv:
                argv += [key, value]
        result = cluster.corral(node, "add", *argv, "--no-start", check=False,
                                stdin_text=stdin_text)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert not cluster.layout(node).conf.exists()
        assert not cluster.layout(node).authkey.exists()
        return result.stderr

    def token(expire_s: float = 600) -> str:
        return "--token=" + cluster.join_token(1, expire_s)

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    assert "cannot reach" in add(f"127.0.0.1:{closed_port}", "--fingerprint", fingerprint,
                                 token())
    assert "does not speak TLS" in add(f"127.0.0.1:{plain_http_server}", "--fingerprint",
                                       fingerprint, token())
    other = ":".join(["AB"] * 32)
    error = add(member, "--fingerprint", other, token())
    assert "fingerprint mismatch" in error and fingerprint in error
    assert "no --fingerprint given" in add(member, token())
    assert "not a SHA-256 fingerprint" in add(member, "--fingerprint", "12:34", token())
    assert "bad join token" in add(member, "--fingerprint", fingerprint, "--token=cjt_nope")
    expiring = token(expire_s=1)
    time.sleep(1.3)
    assert "join token expired" in add(member, "--fingerprint", fingerprint, expiring)
    assert "authentication failure" in add(member, "--fingerprint", fingerprint, "--password",
                                           stdin_text="wrong password\n")
    assert "exactly one of" in add(member, "--fingerprint", fingerprint)
    assert "node name 'node1' is already in the cluster" in add(
        member, "--fingerprint", fingerprint, token(), "--name", "node1")
    assert "nodeid 1 is already used" in add(member, "--fingerprint", fingerprint, token(),
                                             "--nodeid", "1")
    assert "already used by node 'node1'" in add(member, "--fingerprint", fingerprint, token(),
                                                 "--link0", cluster.address(1))
    assert "not an IP address" in add(member, "--fingerprint", fingerprint, token(),
                                      "--link0", "not-an-ip")
    assert "votes must be" in add(member, "--fingerprint", fingerprint, token(),
                                  "--votes", "-1")
    guests = cluster.mount(2) / "nodes" / "node2" / "qemu-server"
    guests.mkdir(parents=True)
    (guests / "100.conf").write_text("memory: 512\n")
    assert "holds guest configs" in add(member, "--fingerprint", fingerprint, token(),
                                        "--mount", str(cluster.mount(2)))
    (guests / "100.conf").unlink()
    assert cluster.control(1, "status")["config_version"] == 1

    used = cluster.join_token(1)
    cluster.join(2, token=used)
    assert cluster.control(1, "status")["config_version"] == 2
    # node2 is configured but not started: node 1 alone has 1 of 2 expected votes.
    # Config changes need quorum.
    refused = cluster.corral(1, "delnode", "node2", check=False)
    assert refused.returncode == 2 and "not quorate" in refused.stderr
    assert cluster.corral(1, "expected", "1").returncode == 0
    assert "join token already used" in add(member, "--fingerprint", fingerprint,
                                            f"--token={used}", node=3)
    again = cluster.corral(2, "add", member, "--fingerprint", fingerprint, token(), "--name",
                           "node2", "--no-start", check=False)
    assert again.returncode == 2 and "already in a cluster" in again.stderr

    missing = cluster.corral(1, "delnode", "nosuchnode", check=False)
    assert missing.returncode == 2 and "no node 'nosuchnode'" in missing.stderr
    local = cluster.corral(1, "delnode", "node1", check=False)
    assert local.returncode == 2 and "local node" in local.stderr
    # node2 is in the config but not running: offline, so it can be removed.
    assert cluster.corral(1, "delnode", "node2").returncode == 0
    assert cluster.control(1, "status")["config_version"] == 3

    # A password join works (the same admin password as the demo's create).
    joined = cluster.corral(3, "add", member, "--fingerprint", fingerprint, "--password",
                            "--name", "node3", "--link0", cluster.address(3), "--no-start",
                            stdin_text=DEMO_PASSWORD + "\n")
    assert "joined as nodeid" in joined.stdout


def test_verbs_on_unclustered_node(make_cluster: Callable[[int], DemoCluster]) -> None:
    cluster = make_cluster(1)
    for verb in (["status"], ["nodes"], ["expected", "2"], ["delnode", "x"], ["join-token"]):
        result = cluster.corral(1, *verb, check=False)
        assert result.returncode == 2, verb
        assert "is this node part of a cluster?" in result.stderr
    bad_name = cluster.corral(1, "create", "bad name!", "--link0", "127.0.0.1", "--no-start",
                              check=False)
    assert bad_name.returncode == 2 and "invalid cluster name" in bad_name.stderr
    assert not cluster.layout(1).conf.exists()
    cluster.create()
    # Clustered but corrald not running: the CLI says so (exit 1), nothing else.
    stopped = cluster.corral(1, "status", check=False)
    assert stopped.returncode == 1 and "corrald is not running" in stopped.stderr
    daemon = cluster.corral(1, "version")
    assert daemon.stdout.startswith("corral ")
