"""The operational ring: total order, packing, fragmentation, token hold, loss, backpressure.

Cores run in the in-memory harness. Checks compare what every node delivered
(payload and original sender) and read the cores' stats counters; rates are
measured in simulated time.
"""

from __future__ import annotations

import random

from corral.totem._core import (
    PACKET_MCAST,
    SEND_QUEUE_MESSAGES_LIMIT,
    TotemCore,
)
from corral.totem.config import TotemConfig

from .harness import Cluster, ms, seconds


def formed(n: int, **kwargs: object) -> Cluster:
    cluster = Cluster(tuple(range(1, n + 1)), **kwargs)  # type: ignore[arg-type]
    cluster.start()
    cluster.run_until(cluster.operational, seconds(5))
    return cluster


def delivered_everywhere(cluster: Cluster, count: int) -> bool:
    return all(len(cluster.logs[n].delivered) >= count for n in cluster.cores)


def test_total_order_three_concurrent_senders() -> None:
    cluster = formed(3)
    rng = random.Random(5)
    sent = []
    for round_ in range(40):
        for nodeid in rng.sample([1, 2, 3], 3):
            for i in range(rng.randint(0, 12)):
                payload = b"%d:%d:%d:" % (nodeid, round_, i) + rng.randbytes(rng.randint(0, 3000))
                assert cluster.submit(nodeid, payload)
                sent.append((nodeid, payload))
        cluster.run_for(rng.randint(0, 3) * 100_000)
    cluster.run_until(lambda: delivered_everywhere(cluster, len(sent)), seconds(10))
    reference = cluster.logs[1].delivered
    assert sorted(reference) == sorted(sent)
    for nodeid in (2, 3):
        assert cluster.logs[nodeid].delivered == reference
    # Per-sender FIFO within the total order.
    for nodeid in (1, 2, 3):
        mine = [p for s, p in reference if s == nodeid]
        assert mine == [p for s, p in sent if s == nodeid]


def test_small_messages_are_packed_per_token_visit() -> None:
    cluster = formed(3)
    frames_before = cluster.cores[2].stats()["frames_sent"]
    for i in range(200):
        cluster.submit(2, b"small-%03d" % i)
    cluster.run_until(lambda: delivered_everywhere(cluster, 200), seconds(5))
    frames = cluster.cores[2].stats()["frames_sent"] - frames_before
    assert frames <= 3, frames
    assert [p for _, p in cluster.logs[3].delivered] == [b"small-%03d" % i for i in range(200)]


def test_one_mebibyte_message_fragmented_and_reassembled() -> None:
    cluster = formed(3)
    sizes = []
    mtu = cluster.timers.netmtu
    cluster.drop_filter = lambda s, d, p: sizes.append(len(p)) or False
    big = random.Random(3).randbytes(1 << 20)
    assert cluster.submit(2, b"before")
    assert cluster.submit(2, big)
    assert cluster.submit(3, b"other")
    assert cluster.submit(2, b"after")
    cluster.run_until(lambda: delivered_everywhere(cluster, 4), seconds(10))
    for nodeid in cluster.nodeids:
        got = cluster.logs[nodeid].delivered
        assert (2, big) in got
        mine = [p for s, p in got if s == 2]
        assert mine == [b"before", big, b"after"]
    assert max(sizes) <= mtu
    assert cluster.cores[2].stats()["frames_sent"] >= (1 << 20) // mtu


def test_frames_respect_netmtu_and_carry_original_sender_on_retransmit() -> None:
    config = TotemConfig(token=1000, netmtu=600)
    cluster = formed(3, config=config, loss=0.1, seed=9)
    seen_sizes = []
    cluster.drop_filter = lambda s, d, p: seen_sizes.append(len(p)) or False
    payloads = [bytes([i]) * (i * 37 % 2000) for i in range(60)]
    for payload in payloads:
        cluster.submit(1, payload)
    cluster.run_until(lambda: delivered_everywhere(cluster, 60), seconds(30))
    for nodeid in cluster.nodeids:
        assert cluster.logs[nodeid].delivered == [(1, p) for p in payloads]
    assert max(seen_sizes) <= 600
    assert sum(cluster.cores[n].stats()["retransmits_sent"] for n in cluster.nodeids) > 0


def test_idle_ring_holds_token_and_hold_cancel_is_quick() -> None:
    cluster = formed(3)
    cluster.submit(1, b"warm-up")
    cluster.run_for(seconds(3))
    before = cluster.cores[1].stats()["token_rotations"]
    cluster.run_for(seconds(10))
    rotations_per_s = (cluster.cores[1].stats()["token_rotations"] - before) / 10
    per_hold = 1e9 / cluster.timers.hold_ns
    assert 0.5 * per_hold <= rotations_per_s <= 1.5 * per_hold, rotations_per_s
    assert cluster.cores[1].held or cluster.cores[1].stats()["token_holds"] > 10
    # A node that is not the representative submits while the token is held.
    cluster.run_until(lambda: cluster.cores[1].held, seconds(2))
    took = cluster.run_until(lambda: delivered_everywhere(cluster, 2), seconds(5)) if cluster.submit(3, b"wake") else None
    assert took is not None and took < ms(5), took
    assert cluster.cores[3].stats()["hold_cancels_sent"] >= 1
    # The representative itself submits while holding.
    cluster.run_for(seconds(3))
    cluster.run_until(lambda: cluster.cores[1].held, seconds(2))
    cluster.submit(1, b"rep")
    took = cluster.run_until(lambda: delivered_everywhere(cluster, 3), seconds(5))
    assert took < ms(5)


def test_loss_5_percent_no_membership_change() -> None:
    cluster = formed(3, loss=0.05, seed=17)
    formed_before = [cluster.cores[n].stats()["memberships_formed"] for n in cluster.nodeids]
    rng = random.Random(1)
    count = 0
    for _ in range(1200):  # 120 s of simulated time
        for nodeid in cluster.nodeids:
            if rng.random() < 0.5:
                cluster.submit(nodeid, b"%d-%d" % (nodeid, count))
                count += 1
        cluster.run_for(ms(100))
    cluster.run_until(lambda: delivered_everywhere(cluster, count), seconds(10))
    after = [cluster.cores[n].stats()["memberships_formed"] for n in cluster.nodeids]
    assert after == formed_before
    assert cluster.logs[1].delivered == cluster.logs[2].delivered == cluster.logs[3].delivered
    assert sum(cluster.cores[n].stats()["retransmits_requested"] for n in cluster.nodeids) > 0


def test_backpressure_submit_false_when_full() -> None:
    core = TotemCore(1, TotemConfig().timers(3))
    accepted = 0
    while core.submit(b"x"):
        accepted += 1
        assert accepted <= SEND_QUEUE_MESSAGES_LIMIT
    assert accepted == SEND_QUEUE_MESSAGES_LIMIT
    assert core.send_queue_room == 0
    assert core.stats()["submit_rejected"] == 1
    # Byte bound: big messages fill it long before the message bound.
    core = TotemCore(1, TotemConfig().timers(3))
    big = bytes(1 << 20)
    accepted = 0
    while core.submit(big):
        accepted += 1
    assert 8 <= accepted <= 32
    assert core.send_queue_bytes == accepted * len(big)


def test_backpressure_drains_in_a_ring() -> None:
    cluster = formed(3)
    core = cluster.cores[2]
    submitted = 0
    while core.submit(b"p%d" % submitted):
        submitted += 1
    cluster.run_until(lambda: delivered_everywhere(cluster, submitted), seconds(60))
    assert core.send_queue_len == 0
    assert cluster.submit(2, b"again")


def test_window_limits_frames_per_rotation() -> None:
    cluster = formed(3)
    counts: dict[int, int] = {}
    def count(src: int, dst: int, packet: bytes) -> bool:
        if packet[3] == PACKET_MCAST and dst == (2 if src != 2 else 1):
            counts[src] = counts.get(src, 0) + 1
        return False
    cluster.drop_filter = count
    for nodeid in cluster.nodeids:
        for _ in range(400):
            cluster.submit(nodeid, bytes(1000))
    cluster.run_until(lambda: delivered_everywhere(cluster, 1200), seconds(10))
    tokens = cluster.cores[1].stats()["token_rotations"]
    # Every node got a fair share of the ring.
    assert min(counts.values()) > 0.2 * sum(counts.values())
    assert tokens > 0


def test_lost_token_retransmitted_by_last_holder_and_duplicates_filtered() -> None:
    cluster = formed(3)
    cluster.run_for(seconds(1))
    state = {"dropped": False}

    def drop_one_token(src: int, dst: int, packet: bytes) -> bool:
        if packet[3] == 1 and src == 2 and not state["dropped"]:
            state["dropped"] = True
            return True
        return False

    cluster.drop_filter = drop_one_token
    cluster.submit(1, b"after-loss")
    cluster.run_for(seconds(2))
    assert state["dropped"] and delivered_everywhere(cluster, 1)
    assert cluster.cores[2].stats()["token_retransmits"] >= 1
    # Every token copy arrives twice: the second copy is filtered by token_seq.
    cluster.drop_filter = None
    cluster.duplicate = 1.0
    for i in range(20):
        cluster.submit(2, b"dup-%d" % i)
    cluster.run_until(lambda: delivered_everywhere(cluster, 21), seconds(5))
    cluster.run_for(seconds(1))
    assert sum(cluster.cores[n].stats()["dropped_duplicate_token"] for n in cluster.nodeids) > 0
    assert [p for _, p in cluster.logs[3].delivered] == [b"after-loss"] + [b"dup-%d" % i for i in range(20)]
    assert all(c.stats()["memberships_formed"] == 2 for c in cluster.cores.values())
