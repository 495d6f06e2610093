"""The HTTPS join API in the reference's shapes, against a real corrald: apiversion
without auth, keep-alive for authenticated requests only, tickets from POST /access/ticket, CSRF required on writes, join info
with this node's fingerprint, the nodelist, DELETE of a node, 401 without
credentials, 501 for unknown paths, malformed requests refused, and the listener
bound only to the node's configured address."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable

import pytest

from corral.cluster.joinclient import JoinError, PeerClient
from corral.daemon.demo import DEMO_PASSWORD, DemoCluster

FORM_TIMEOUT_S = 40


def _raw_request(host: str, port: int, raw: bytes) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), 5) as sock, \
            context.wrap_socket(sock) as tls:
        tls.sendall(raw)
        chunks = []
        try:
            while chunk := tls.recv(4096):
                chunks.append(chunk)
        except (OSError, ssl.SSLError):
            pass
        return b"".join(chunks)


def test_api_shapes(make_cluster: Callable[[int], DemoCluster]) -> None:
    cluster = make_cluster(2)
    cluster.create()
    cluster.start(1)
    cluster.wait_quorate([1], 1, FORM_TIMEOUT_S)
    fingerprint = cluster.fingerprint(1)
    client = PeerClient(cluster.address(1), cluster.api_port, fingerprint)
    assert client.call("GET", "/cluster/config/apiversion") == 1
    with pytest.raises(JoinError, match="No ticket"):
        client.call("GET", "/cluster/config/join")
    with pytest.raises(JoinError, match="not implemented"):
        client.call("GET", "/pools")
    with pytest.raises(JoinError, match="authentication failure"):
        client.login("root@pam", "wrong")
    with pytest.raises(JoinError, match="authentication failure"):
        client.login("admin@pve", DEMO_PASSWORD)
    client.login("root@pam", DEMO_PASSWORD)
    assert client.ticket is not None and client.ticket.startswith("PVE:root@pam:")

    info = client.call("GET", "/cluster/config/join")
    assert info["preferred_node"] == "node1"
    assert info["totem"]["cluster_name"] == "demo" and info["totem"]["config_version"] == "1"
    [entry] = info["nodelist"]
    assert entry["pve_fp"] == fingerprint and entry["pve_addr"] == cluster.address(1)
    assert entry["ring0_addr"] == cluster.address(1) and entry["nodeid"] == 1

    # Keep-alive: authenticated requests share one connection until one says close;
    # an unauthenticated or failed request closes it.
    cookie = f"Cookie: PVEAuthCookie={client.ticket}\r\n"
    ask = f"GET /api2/json/cluster/config/nodes HTTP/1.1\r\n{cookie}"
    replies = _raw_request(cluster.address(1), cluster.api_port, (
        f"{ask}\r\n{ask}\r\n{ask}Connection: close\r\n\r\n{ask}\r\n").encode())
    assert replies.count(b"HTTP/1.1 200 OK") == 3, replies[:300]
    assert replies.count(b"Connection: keep-alive") == 2
    for raw in (b"GET /api2/json/cluster/config/apiversion HTTP/1.1\r\n\r\n",
                f"GET /api2/json/pools HTTP/1.1\r\n{cookie}\r\n".encode()):
        replies = _raw_request(cluster.address(1), cluster.api_port, raw + raw)
        assert replies.count(b"HTTP/1.1 ") == 1 and b"Connection: close" in replies, replies[:300]

    cluster.join(2)
    nodes = client.call("GET", "/cluster/config/nodes")
    assert [(n["name"], n["nodeid"], n["quorum_votes"]) for n in nodes] == \
        [("node1", 1, 1), ("node2", 2, 1)]

    cluster.control(1, "expected", votes=1)  # node2 never starts: node 1 alone is quorate
    csrf, client.csrf = client.csrf, None
    with pytest.raises(JoinError, match="authentication failure"):
        client.call("DELETE", "/cluster/config/nodes/node2")  # no CSRF token
    client.csrf = csrf
    assert client.call("DELETE", "/cluster/config/nodes/node2") is None
    assert cluster.control(1, "status")["config_version"] == 3

    # Malformed requests get an error (or a closed connection) and change nothing.
    for raw in (b"garbage\r\n\r\n", b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                b"POST /api2/json/access/ticket HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
                b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n"):
        reply = _raw_request(cluster.address(1), cluster.api_port, raw)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 4"), reply[:80]
    assert client.call("GET", "/cluster/config/apiversion") == 1

    # Bound to the configured address only: not on another loopback address.
    with pytest.raises(OSError), socket.create_connection(("127.0.0.9", cluster.api_port), 2):
        pass
