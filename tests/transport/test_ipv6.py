"""IPv6 links: two transports bound to fd00:213::1 and ::2 inside a private network
namespace (crl-tp6-<pid>) bring their link up and exchange a broadcast. Needs
root; the namespace is removed afterwards."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace"),
]

SCRIPT = """
import asyncio
from corral.corosync_conf import ClusterConfig, render_cluster
from corral.totem.auth import PacketAuthenticator
from corral.totem.transport import BROADCAST, UdpTransport

async def main():
    text = render_cluster("v6", [(1, "a", ["fd00:213::1"]), (2, "b", ["fd00:213::2"])],
                          port=5405).replace("mcastport", "knet_ping_interval: 20\\n        mcastport")
    config = ClusterConfig.from_text(text)
    got = []
    transports = []
    for nodeid in (1, 2):
        auth = PacketAuthenticator(bytes(200), "v6", nodeid, 1, [1, 2], encrypt=True)
        transport = UdpTransport(config, nodeid, auth)
        transport.on_batch = got.extend
        await transport.start()
        transports.append(transport)
    for _ in range(300):
        if transports[0].connected(2) and transports[1].connected(1):
            break
        await asyncio.sleep(0.01)
    transports[0].send(BROADCAST, b"over ipv6")
    await asyncio.sleep(0.3)
    print(sorted(got), transports[1].counters["tx_no_link_up"], transports[0].connected(2))

asyncio.run(main())
"""


def test_ipv6_link_up_and_broadcast() -> None:
    namespace = f"crl-tp6-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        for address in ("fd00:213::1/128", "fd00:213::2/128"):
            subprocess.run(["ip", "-n", namespace, "addr", "add", address, "dev", "lo",
                            "nodad"], check=True)
        result = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", SCRIPT],
                                capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["ip", "netns", "del", namespace], check=False)
    assert result.returncode == 0, result.stderr
    # one copy: node 2's, over the network (the sender gets none of its own broadcast)
    assert result.stdout.strip() == "[(1, b'over ipv6')] 0 True"
