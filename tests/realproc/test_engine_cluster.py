"""Real `corral engine` processes on this machine, each in its own network namespace
(crl-tp<k>-n<i>, private bridge, 10.213.x.y), carrying a message load:

- 3 nodes form one ring; every node delivers the same streams in the same order,
  without gaps or duplicates;
- kill -9 of one node: the other two form a new membership; the node restarts
  and rejoins; total order still agrees;
- 3 nodes with 2 links: cutting link 0 of one node moves traffic to link 1
  without a membership change, and link 0 comes back;
- 5 nodes partitioned 2|3 (nftables in the namespaces) form two rings, then merge;
- 5 % random loss on one node for ~20 s: no membership change, gap-free streams;
- genuine packets captured on the wire and sent again are dropped as replays;
- garbage, stale-incarnation, tampered and foreign-cluster packets sent
  to a node's port are dropped and counted, and the ring carries on;
- `corral demo --duration` starts, shows the membership and stops cleanly.

Needs root (namespaces, nftables) and the compiled Totem core; skipped otherwise.
Everything created is removed in teardown, also on failure.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from corral.demo import LocalCluster

from .checks import check_streams, check_total_order, read_log, streams_delivered

try:
    from corral.totem import _core

    HAVE_CORE = hasattr(_core, "TotemCore")
except ImportError:
    HAVE_CORE = False

pytestmark = [
    pytest.mark.realproc,
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not HAVE_CORE, reason="the Totem core extension is not built yet"),
]

TOTEM = {"token": "1000", "token_coefficient": "0"}
FORM_TIMEOUT_S = 20.0
_serial = itertools.count(1)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def make_cluster(tmp_path: Any) -> Iterator[Callable[..., LocalCluster]]:
    made: list[LocalCluster] = []

    def factory(n_nodes: int, load: str | None = "100:200", n_links: int = 1) -> LocalCluster:
        serial = next(_serial) + os.getpid() % 50 * 2
        cluster = LocalCluster(n_nodes, str(tmp_path / f"c{serial}"), prefix=f"crl-tp{serial}",
                               use_netns=True, subnet=f"10.213.{100 + serial % 100}",
                               load=load, totem_options=TOTEM, stats_interval_s=2.0,
                               n_links=n_links)
        made.append(cluster)
        cluster.setup()
        return cluster

    yield factory
    for cluster in made:
        cluster.close()
        for nodeid in cluster.nodeids:  # keep the logs of failures visible
            if os.path.exists(cluster.log_path(nodeid)):
                with open(cluster.log_path(nodeid), errors="replace") as handle:
                    tail = handle.read()[-1500:]
                sys.stderr.write(f"--- node {nodeid} log tail ---\n{tail}\n")


def members_are(cluster: LocalCluster, nodeids: list[int], expected: list[int]) -> bool:
    return all(cluster.members(n) == expected for n in nodeids)


def check_logs(cluster: LocalCluster, nodeids: list[int], gap_free: bool) -> list[Any]:
    logs = [read_log(n, cluster.deliveries_path(n)) for n in nodeids]
    problems = check_total_order(logs)
    for log in logs:
        problems += check_streams(log, gap_free=gap_free)
    assert problems == [], "\n".join(problems)
    return logs


def test_three_nodes_form_and_agree(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(3)
    cluster.start_all()
    wait_until(lambda: members_are(cluster, [1, 2, 3], [1, 2, 3]), FORM_TIMEOUT_S, "3 members")
    ring = cluster.status(1)["ring_id"]
    time.sleep(4)
    assert all(cluster.status(n)["ring_id"] == ring for n in (1, 2, 3))
    wait_until(lambda: all(cluster.status(n).get("delivered", 0) > 300 for n in (1, 2, 3)),
               10, "deliveries")
    for nodeid in (1, 2, 3):
        assert cluster.stop(nodeid) == 0
    logs = check_logs(cluster, [1, 2, 3], gap_free=True)
    assert all(len(log.messages) > 300 for log in logs)
    with open(cluster.log_path(1)) as handle:
        text = handle.read()
    assert "A new membership (" in text and "Members[3]: 1 2 3" in text


def test_kill_and_rejoin(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(3)
    cluster.start_all()
    wait_until(lambda: members_are(cluster, [1, 2, 3], [1, 2, 3]), FORM_TIMEOUT_S, "3 members")
    time.sleep(1)
    killed_at = time.monotonic()
    cluster.kill(3)
    wait_until(lambda: members_are(cluster, [1, 2], [1, 2]), 15, "membership without node 3")
    detect_s = time.monotonic() - killed_at
    cluster.start(3)
    wait_until(lambda: members_are(cluster, [1, 2, 3], [1, 2, 3]), FORM_TIMEOUT_S, "rejoin")
    time.sleep(2)
    for nodeid in (1, 2, 3):
        assert cluster.stop(nodeid) == 0
    check_logs(cluster, [1, 2, 3], gap_free=False)
    # survivors agree on everything from each other without gaps
    for nodeid in (1, 2):
        log = read_log(nodeid, cluster.deliveries_path(nodeid))
        survivors = [m for m in log.messages if m[0] in (1, 2)]
        assert check_streams(type(log)(nodeid, survivors), gap_free=True) == []
    print(f"kill -9 to new 2-node membership: {detect_s:.2f} s")


def test_partition_and_merge(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(5, load="50:200")
    cluster.start_all()
    everyone = [1, 2, 3, 4, 5]
    wait_until(lambda: members_are(cluster, everyone, everyone), FORM_TIMEOUT_S, "5 members")
    for nodeid in (1, 2):
        cluster.block(nodeid, [3, 4, 5])
    for nodeid in (3, 4, 5):
        cluster.block(nodeid, [1, 2])
    wait_until(lambda: members_are(cluster, [1, 2], [1, 2])
               and members_are(cluster, [3, 4, 5], [3, 4, 5]), 20, "two partitions")
    time.sleep(2)
    for nodeid in everyone:
        cluster.clear_faults(nodeid)
    wait_until(lambda: members_are(cluster, everyone, everyone), 25, "merge")
    time.sleep(2)
    for nodeid in everyone:
        assert cluster.stop(nodeid) == 0
    check_logs(cluster, everyone, gap_free=False)


def test_loss_without_membership_change(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(3)
    cluster.start_all()
    wait_until(lambda: members_are(cluster, [1, 2, 3], [1, 2, 3]), FORM_TIMEOUT_S, "3 members")
    time.sleep(1)
    ring = cluster.status(1)["ring_id"]
    cluster.lossy(3, 5)
    time.sleep(20)
    rings = [cluster.status(n)["ring_id"] for n in (1, 2, 3)]
    cluster.clear_faults(3)
    time.sleep(2)
    for nodeid in (1, 2, 3):
        assert cluster.stop(nodeid) == 0
    assert rings == [ring, ring, ring], "membership changed under 5 % loss"
    logs = check_logs(cluster, [1, 2, 3], gap_free=True)
    counts = [streams_delivered(log) for log in logs]
    assert all(sum(c.values()) > 3000 for c in counts)


def link_state(cluster: LocalCluster, nodeid: int, peer: int, link: int) -> str:
    for row in cluster.status(nodeid).get("links", []):
        if row["nodeid"] == peer and row["link"] == link:
            return str(row["state"])
    return "?"


def test_link_failover_without_membership_change(
        make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(3, n_links=2)
    cluster.start_all()
    wait_until(lambda: members_are(cluster, [1, 2, 3], [1, 2, 3]), FORM_TIMEOUT_S, "3 members")
    wait_until(lambda: link_state(cluster, 1, 3, 1) == "up", 10, "link 1 up")
    ring = cluster.status(1)["ring_id"]
    before = cluster.status(1)["transport_stats"].get("tx_totem_link1", 0)
    cluster.block(3, [1, 2], links=[0])  # cut link 0 of node 3 only
    wait_until(lambda: link_state(cluster, 1, 3, 0) == "down", 10, "link 0 to node 3 down")
    time.sleep(3)
    assert link_state(cluster, 1, 3, 1) == "up"
    assert cluster.status(1)["transport_stats"].get("tx_totem_link1", 0) > before + 50
    cluster.clear_faults(3)
    wait_until(lambda: link_state(cluster, 1, 3, 0) == "up", 10, "link 0 back up")
    time.sleep(1)
    rings = [cluster.status(n)["ring_id"] for n in (1, 2, 3)]
    for nodeid in (1, 2, 3):
        assert cluster.stop(nodeid) == 0
    assert rings == [ring, ring, ring], "membership changed on a link failover"
    check_logs(cluster, [1, 2, 3], gap_free=True)
    with open(cluster.log_path(1)) as handle:
        text = handle.read()
    assert "link 0 to node 3 is down" in text


SENDER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], 0))
for line in sys.stdin:
    sock.sendto(bytes.fromhex(line.strip()), (sys.argv[2], int(sys.argv[3])))
"""


CAPTURE = """
import socket, struct, sys, time
source, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
raw.bind(("eth0", 0))
raw.settimeout(5)
wanted = socket.inet_aton(source)
found = 0
while found < count:
    frame = raw.recv(65535)
    ip = frame[14:]
    if ip[9] != 17 or ip[12:16] != wanted:
        continue
    udp = ip[(ip[0] & 15) * 4:]
    if struct.unpack(">H", udp[2:4])[0] != port:
        continue
    print(udp[8:].hex(), flush=True)
    found += 1
"""


def test_captured_packets_replayed_are_dropped(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(3)
    cluster.start_all()
    wait_until(lambda: members_are(cluster, [1, 2, 3], [1, 2, 3]), FORM_TIMEOUT_S, "3 members")
    captured = subprocess.run(
        ["ip", "netns", "exec", cluster.netns(1), sys.executable, "-c", CAPTURE,
         cluster.address(2), str(cluster.port), "40"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout
    assert len(captured.split()) == 40
    time.sleep(0.5)
    before = cluster.status(1)["transport_stats"]
    subprocess.run(["ip", "netns", "exec", cluster.netns(2), sys.executable, "-c", SENDER,
                    cluster.address(2), cluster.address(1), str(cluster.port)],
                   input=captured, text=True, check=True)
    time.sleep(2.5)
    after = cluster.status(1)["transport_stats"]
    assert after["drop_replay"] - before.get("drop_replay", 0) == 40
    assert after["opened"] > before["opened"]  # the genuine stream went on
    assert cluster.members(1) == [1, 2, 3]


def test_bad_packets_dropped_and_counted(make_cluster: Callable[..., LocalCluster]) -> None:
    from corral.totem import auth

    cluster = make_cluster(3)
    cluster.start_all()
    wait_until(lambda: members_are(cluster, [1, 2, 3], [1, 2, 3]), FORM_TIMEOUT_S, "3 members")
    key = auth.read_key_file(cluster.key_path)
    name = f"{cluster.prefix}-cluster"
    stale = auth.PacketAuthenticator(key, name, 2, 1, [1, 2, 3], encrypt=True)
    foreign = auth.PacketAuthenticator(key, "someone-else", 2, 1, [1, 2, 3], encrypt=True)
    tampered = bytearray(stale.seal(auth.KIND_TOTEM, b"x" * 50))
    tampered[-1] ^= 1
    packets = [os.urandom(n) for n in (0, 1, 30, 100, 1400)]
    packets += [stale.seal(auth.KIND_TOTEM, b"old incarnation") for _ in range(5)]
    packets += [foreign.seal(auth.KIND_TOTEM, b"foreign") for _ in range(5)]
    packets += [bytes(tampered)]
    future = auth.PacketAuthenticator(key, name, 2, 1 << 63, [1, 2, 3], encrypt=True)
    forged = bytearray(future.seal(auth.KIND_TOTEM, b"y" * 50))
    forged[-1] ^= 1
    packets += [bytes(forged)] * 3
    before = cluster.status(1)["transport_stats"]
    subprocess.run(["ip", "netns", "exec", cluster.netns(2), sys.executable, "-c", SENDER,
                    cluster.address(2), cluster.address(1), str(cluster.port)],
                   input="\n".join(p.hex() for p in packets) + "\n", text=True, check=True)
    time.sleep(2.5)
    after = cluster.status(1)["transport_stats"]

    def grew(key: str) -> int:
        return int(after.get(key, 0)) - int(before.get(key, 0))

    assert grew("drop_malformed") >= 5
    assert grew("drop_replay") >= 5 + 1  # stale incarnation, and the tampered one
    assert grew("drop_foreign_cluster") >= 5
    assert grew("drop_bad_mac") >= 3
    assert cluster.members(1) == [1, 2, 3] and cluster.running(1)
    delivered = cluster.status(1)["delivered"]
    wait_until(lambda: cluster.status(1)["delivered"] > delivered + 50, 10, "deliveries go on")


@pytest.mark.parametrize("netns", [True, False], ids=["netns", "loopback"])
def test_demo_with_duration(tmp_path: Any, netns: bool) -> None:
    prefix = f"crl-tpd{os.getpid() % 100}"
    extra = [] if netns else ["--no-netns"]
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli", "demo", "--nodes", "3", "--duration", "10",
         "--prefix", prefix, "--stats-interval", "2", "--dir", str(tmp_path / "demo"), *extra],
        capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Members[3]: 1 2 3" in result.stdout, result.stdout[-3000:]
    assert "rates: delivered" in result.stdout
    assert ("network namespaces" in result.stdout) == netns
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in namespaces


def test_cpg_over_ipc_on_real_engines(make_cluster: Callable[..., LocalCluster]) -> None:
    """Three engines serve CPG on their IPC sockets; a client on each node joins one
    group, sends 30 messages, and all three see the same 90 deliveries in one order."""
    ipc = pytest.importorskip("corral.cpg.ipc")
    import asyncio

    from corral.cpg.events import Deliver

    cluster = make_cluster(3, load=None)
    sockets = {n: os.path.join(cluster.node_dir(n), "cpg.sock") for n in cluster.nodeids}
    for nodeid in cluster.nodeids:
        cluster.start(nodeid, ["--ipc-socket", sockets[nodeid]])
    wait_until(lambda: members_are(cluster, [1, 2, 3], [1, 2, 3]), FORM_TIMEOUT_S, "3 members")

    async def scenario() -> dict[int, list[tuple[int, bytes]]]:
        clients = {n: await ipc.CpgClient.connect(sockets[n]) for n in cluster.nodeids}
        handles = {n: await clients[n].join("realproc") for n in cluster.nodeids}
        await asyncio.wait_for(asyncio.gather(*(
            _wait_members(handles[n], 3) for n in cluster.nodeids)), 15)
        seen: dict[int, list[tuple[int, bytes]]] = {n: [] for n in cluster.nodeids}

        async def consume(nodeid: int) -> None:
            async for event in handles[nodeid].events():
                if isinstance(event, Deliver):
                    seen[nodeid].append((event.nodeid, event.payload))
                    if len(seen[nodeid]) == 90:
                        return

        consumers = [asyncio.create_task(consume(n)) for n in cluster.nodeids]
        for index in range(30):
            for nodeid in cluster.nodeids:
                await handles[nodeid].mcast(f"{nodeid}:{index}".encode())
        await asyncio.wait_for(asyncio.gather(*consumers), 20)
        for client in clients.values():
            await client.finalize()
        return seen

    seen = asyncio.run(scenario())
    assert seen[1] == seen[2] == seen[3]
    for nodeid in cluster.nodeids:
        own = [p for sender, p in seen[1] if sender == nodeid]
        assert own == [f"{nodeid}:{i}".encode() for i in range(30)]


async def _wait_members(handle: Any, count: int) -> None:
    import asyncio

    await handle.wait_joined()
    while len(handle.members()) < count:
        await asyncio.sleep(0.05)


SOAK_S = float(os.environ.get("CORRAL_SOAK_S", "120"))
soak = pytest.mark.skipif(os.environ.get("CORRAL_SOAK") != "1", reason="soak: set CORRAL_SOAK=1")


@soak
@pytest.mark.slow
def test_soak_loss_three_senders(make_cluster: Callable[..., LocalCluster]) -> None:
    """The corosync §3.6 scenario: 5 % loss both ways on node 3, three senders of
    1 KiB messages, for CORRAL_SOAK_S seconds: no membership change, no gap."""
    cluster = make_cluster(3, load="150:1024")
    cluster.start_all()
    wait_until(lambda: members_are(cluster, [1, 2, 3], [1, 2, 3]), FORM_TIMEOUT_S, "3 members")
    time.sleep(1)
    ring = cluster.status(1)["ring_id"]
    cluster.lossy(3, 5)
    time.sleep(SOAK_S)
    rings = [cluster.status(n)["ring_id"] for n in (1, 2, 3)]
    cluster.clear_faults(3)
    time.sleep(3)
    for nodeid in (1, 2, 3):
        assert cluster.stop(nodeid) == 0
    assert rings == [ring, ring, ring]
    check_logs(cluster, [1, 2, 3], gap_free=True)


@soak
@pytest.mark.slow
def test_soak_repeated_kills(make_cluster: Callable[..., LocalCluster]) -> None:
    """Kill -9 and restart a rotating node every few seconds for CORRAL_SOAK_S
    seconds; the delivered streams keep agreeing on total order."""
    cluster = make_cluster(3, load="100:200")
    cluster.start_all()
    wait_until(lambda: members_are(cluster, [1, 2, 3], [1, 2, 3]), FORM_TIMEOUT_S, "3 members")
    deadline = time.monotonic() + SOAK_S
    victim = 3
    while time.monotonic() < deadline:
        cluster.kill(victim)
        others = [n for n in (1, 2, 3) if n != victim]
        wait_until(lambda alive=others: members_are(cluster, alive, alive), 20, "survivors' ring")
        cluster.start(victim)
        wait_until(lambda: members_are(cluster, [1, 2, 3], [1, 2, 3]), 30, "rejoin")
        victim = victim % 3 + 1
    for nodeid in (1, 2, 3):
        assert cluster.stop(nodeid) == 0
    check_logs(cluster, [1, 2, 3], gap_free=False)
