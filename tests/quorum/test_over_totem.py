"""QuorumCore over CpgCore over the real TotemCore (ext/totem), in the in-memory
Totem harness with simulated time (tests/totem/harness.py, stacked with CPG by
tests/cpg/test_over_totem.py). Each node's quorum core is one CPG client in the
group `corral-quorum`, fed its TotemConfChg and Deliver events as the service
feeds them. Checks: three nodes form and become quorate; a partition leaves only
the majority quorate and the minority learns it; `expected 1` on the isolated node
applies; a merge brings everyone back; a crash is seen by the survivors.
"""

from __future__ import annotations

import pytest

from corral.cpg.events import Deliver, TotemConfChg
from corral.quorum.config import QuorumConfig
from corral.quorum.core import Effect, QuorumCore, Send
from corral.quorum.service import GROUP

over_totem = pytest.importorskip("cpg.test_over_totem", reason="CPG-over-Totem harness missing")
harness = over_totem.harness
CLIENT = 7
G = GROUP.encode()


class QuorumCluster(over_totem.CpgCluster):  # type: ignore[misc,name-defined]
    """The CPG-over-Totem harness with one QuorumCore per node in `corral-quorum`."""

    def __init__(self, nodeids: tuple[int, ...], options: dict[str, str]) -> None:
        super().__init__(nodeids)
        self.quorum_config = QuorumConfig.from_options(options, dict.fromkeys(nodeids, 1))
        self.quorum: dict[int, QuorumCore] = {}
        self.seen: dict[int, int] = {}

    def start(self, *nodeids: int) -> None:
        super().start(*nodeids)
        for nodeid in nodeids or self.nodeids:
            self.quorum[nodeid] = QuorumCore(self.quorum_config, nodeid)
            self.seen[nodeid] = 0
            self.join(nodeid, CLIENT, 1000 + nodeid, G)

    def crash(self, nodeid: int) -> None:
        super().crash(nodeid)
        del self.quorum[nodeid]

    def _feed(self, nodeid: int, cpg: object, event: tuple[object, ...]) -> None:
        super()._feed(nodeid, cpg, event)
        core = self.quorum.get(nodeid)
        if core is None:
            return
        log = self.logs_cpg[self.key(nodeid, CLIENT)]
        while self.seen[nodeid] < len(log):
            cpg_event = log[self.seen[nodeid]]
            self.seen[nodeid] += 1
            if isinstance(cpg_event, TotemConfChg):
                self._apply(nodeid, core.membership_changed(
                    cpg_event.ring_id, cpg_event.members, (), self.now_ns))
            elif isinstance(cpg_event, Deliver):
                self._apply(nodeid, core.message_received(cpg_event.nodeid, cpg_event.payload))

    def _apply(self, nodeid: int, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                self.cpg[nodeid].mcast(CLIENT, G, effect.payload)

    def sizes(self) -> dict[int, int]:
        return {n: len(core.status().members) for n, core in self.quorum.items()}

    def quorate(self) -> list[int]:
        return sorted(n for n, core in self.quorum.items() if core.quorate)

    def wait(self, goal: object, timeout_s: float = 20) -> None:
        self.run_until(goal, harness.seconds(timeout_s))
        self.run_for(harness.ms(100))


def test_form_partition_expected_merge_crash() -> None:
    cluster = QuorumCluster((1, 2, 3), {})
    cluster.start()
    cluster.wait(lambda: cluster.quorate() == [1, 2, 3])
    status = cluster.quorum[1].status()
    assert (status.total_votes, status.quorum, len(status.members)) == (3, 2, 3)

    cluster.partition((1, 2), (3,))
    cluster.wait(lambda: cluster.sizes() == {1: 2, 2: 2, 3: 1} and cluster.quorate() == [1, 2])
    assert cluster.quorum[1].status().total_votes == 2

    effects = cluster.quorum[3].set_expected(1)
    cluster._apply(3, effects)
    cluster._drain(3)
    cluster.wait(lambda: cluster.quorum[3].quorate)
    assert cluster.quorum[3].status().quorum == 1

    cluster.heal()
    cluster.wait(lambda: cluster.sizes() == {1: 3, 2: 3, 3: 3} and cluster.quorate() == [1, 2, 3])
    assert cluster.quorum[1].status().quorum == 2  # expected raised back to T = 3

    cluster.crash(3)
    cluster.crash(2)
    cluster.wait(lambda: cluster.sizes() == {1: 1})
    assert cluster.quorate() == []
    assert cluster.quorum[1].status().total_votes == 1
