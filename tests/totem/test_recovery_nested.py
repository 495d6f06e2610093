"""Recovery from an old ring whose buffer still holds that ring's own recovery
traffic (F4 in docs/sim-findings.md).

A ring that was itself formed by a recovery has encapsulated frames in its
sequence (old-ring messages of the ring before). When that ring fails before
every member holds them, the next recovery must re-send them too; encapsulation
nests one level only, so they go out as empty plain frames of the old ring
(same header: rep, seq, epoch, seq number, origin), not encapsulated twice,
which every receiver drops as malformed and the recovery never ends.
"""

from __future__ import annotations

from corral.sim.cluster import SimOptions, Simulation
from corral.sim.faults import FAULT_NAMES


def test_recovery_resending_encapsulated_old_ring_frames_completes() -> None:
    # A 5-node run (partitions, pauses, merges) in which ring (1, 16) fails
    # while n5's encapsulated recovery frames of it are above the others' aru;
    # ring (1, 20) then has to re-send them.
    sim = Simulation(SimOptions(seed=40367, nodes=5, duration_ms=4000, faults=FAULT_NAMES,
                                token_ms=300))
    result = sim.run()
    stats = {nodeid: slot.core.stats() for nodeid, slot in sim.slots.items()
             if slot.core is not None}
    assert len(stats) == 5
    assert {n: s["dropped_malformed"] for n, s in stats.items()} == {n: 0 for n in stats}
    assert sum(s["old_ring_messages_recovered"] for s in stats.values()) > 0
    assert result.ok, f"{result.summary()}\n{result.report}"
    assert result.converge_ns >= 0
