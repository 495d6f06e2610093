"""CPG in the simulator (stage 2): the CPG checkers fail on planted bugs and
pass on real runs.

A tiny one-node CPG is driven by hand through `CpgLayer` (configuration, its
own joinlist, a JOIN), then fed forged or repeated messages, or given a wrong
expectation, and each CPG checker must fire: cpg-integrity (invented or
duplicated delivery), cpg-views, cpg-self-delivery, cpg-virtual-synchrony,
cpg-total-order. A whole simulated run with one node silently losing CPG
deliveries must fail too. Then CPG_SWARM_SEEDS seeds of the real Totem and CPG
cores with all faults must pass.
"""

from __future__ import annotations

import random

import pytest

from corral.cpg import wire
from corral.cpg.events import ConfChg, CpgEvent, Deliver, Member
from corral.sim.checkers import Violation
from corral.sim.cluster import SimOptions, Simulation, run_seed
from corral.sim.cpglayer import CpgLayer, wrap
from corral.sim.faults import FAULT_NAMES

pytest.importorskip("corral.totem._core")

CPG_SWARM_SEEDS = 60
RING = (1, 4)


class OneNode:
    """One node's CPG fed by a perfect single-node 'Totem' (everything loops back)."""

    def __init__(self) -> None:
        self.layer = CpgLayer(random.Random(1))
        self.layer.on_start(1, 1)
        self.counter = 0
        self.layer.on_totem_config(1, True, RING, (1,), ("t", None, RING, (1,)))
        self.layer.on_totem_config(1, False, RING, (1,), ("r", RING, (1,)))
        self.loop()

    def deliver(self, inner: bytes) -> None:
        self.counter += 1
        self.layer.on_totem_deliver(1, 1, wrap(1, self.counter, inner), ("m", self.counter))

    def loop(self) -> None:
        pending = self.layer.pending_payloads(1)
        self.layer.submitted(1, len(pending))
        for inner in pending:
            self.deliver(inner)

    def joined_client(self) -> int:
        node = self.layer.nodes[1]
        self.layer._join_new(1, node)
        self.loop()
        return max(node.clients)


def test_hand_driven_node_passes_the_final_checks() -> None:
    one = OneNode()
    client = one.joined_client()
    one.layer._mcast(1, one.layer.nodes[1], client)
    one.loop()
    assert one.layer.settled()
    one.layer.check_final()
    assert one.layer.summary()["cpg_deliveries"] == 1


def test_invented_cpg_message_is_caught() -> None:
    one = OneNode()
    client = one.joined_client()
    group = sorted(one.layer.nodes[1].clients[client].groups)[0]
    pid = one.layer.nodes[1].clients[client].pid
    with pytest.raises(Violation, match=r"^\[cpg-integrity\].*nobody multicast"):
        one.deliver(wire.encode_mcast(group, pid, b"forged"))


def test_duplicate_cpg_delivery_is_caught() -> None:
    one = OneNode()
    client = one.joined_client()
    one.layer._mcast(1, one.layer.nodes[1], client)
    pending = one.layer.pending_payloads(1)
    one.layer.submitted(1, len(pending))
    one.deliver(pending[0])
    with pytest.raises(Violation, match=r"^\[cpg-integrity\].*twice"):
        one.deliver(pending[0])


def test_wrong_group_view_is_caught() -> None:
    one = OneNode()
    client = one.joined_client()
    # The harness believes the client is in one more group than CPG has it in.
    one.layer.nodes[1].clients[client].groups.add(b"never-joined")
    with pytest.raises(Violation, match=r"^\[cpg-views\]"):
        one.layer.check_final()


def test_missing_cpg_self_delivery_is_caught() -> None:
    one = OneNode()
    client = one.joined_client()
    one.layer._mcast(1, one.layer.nodes[1], client)
    one.layer.submitted(1, len(one.layer.pending_payloads(1)))  # lost, never delivered
    with pytest.raises(Violation, match=r"^\[cpg-self-delivery\]"):
        one.layer.check_final()


def _fabricated_logs(layer: CpgLayer, second_between: list[bytes]) -> None:
    group = b"alpha"
    first = ConfChg(group, (Member(1, 10), Member(2, 20)), (), (Member(2, 20),))
    second = ConfChg(group, (Member(1, 10),), (Member(2, 20, 3),), ())
    for key, between in (((1, 1, 1), [b"m1", b"m2"]), ((3, 1, 1), second_between)):
        events: list[CpgEvent] = [first, *(Deliver(group, 1, 10, p) for p in between), second]
        layer.logs[key] = events
        layer.stamps[key] = ["s1", *("m" for _ in between), "s2"]


def test_cpg_virtual_synchrony_breach_is_caught() -> None:
    layer = CpgLayer(random.Random(1))
    _fabricated_logs(layer, [b"m1"])
    with pytest.raises(Violation, match=r"^\[cpg-virtual-synchrony\]"):
        layer.check_final()


def test_cpg_total_order_breach_is_caught() -> None:
    layer = CpgLayer(random.Random(1))
    _fabricated_logs(layer, [b"m2", b"m1"])
    with pytest.raises(Violation, match=r"^\[cpg-total-order\]"):
        layer.check_final()


def test_simulated_run_losing_cpg_deliveries_fails() -> None:
    options = SimOptions(seed=3, nodes=3, duration_ms=1500, faults=(), token_ms=300, cpg=True)
    sim = Simulation(options)
    assert sim.cpg is not None
    real = sim.cpg.on_totem_deliver
    dropped = [0]

    def lossy(nodeid: int, sender: int, payload: bytes, stamp: object) -> None:
        if nodeid == 2 and b"cpgm:" in payload and dropped[0] < 3:
            dropped[0] += 1
            return
        real(nodeid, sender, payload, stamp)

    sim.cpg.on_totem_deliver = lossy  # type: ignore[method-assign]
    result = sim.run()
    assert dropped[0] == 3
    assert result.violation is not None and result.violation.checker.startswith("cpg-"), result.report
    assert "--cpg" in result.report


@pytest.mark.parametrize("seed", range(1, CPG_SWARM_SEEDS + 1))
def test_cpg_swarm_seed(seed: int) -> None:
    options = SimOptions(seed=seed, nodes=3 + seed % 3, duration_ms=2500, faults=FAULT_NAMES, token_ms=300, cpg=True)
    result = run_seed(options)
    assert result.ok, f"{result.summary()}\n{result.report}"
    assert result.cpg_stats["cpg_mcasts"] > 0


def test_cpg_runs_are_deterministic() -> None:
    options = SimOptions(seed=9, nodes=4, duration_ms=2000, faults=FAULT_NAMES, token_ms=300, cpg=True)
    first, second = run_seed(options), run_seed(options)
    assert first.ok and second.ok
    assert first.digest == second.digest and first.cpg_stats == second.cpg_stats
