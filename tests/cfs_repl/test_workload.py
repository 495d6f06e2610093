"""A seeded random workload over the replicas on real Totem cores (simulated
time): creates of unique files and of guest configs that race for the same
VMID on different nodes, writes and unlinks, under partitions, heals, crashes
(kill -9 style, no leave) and restarts from the stores on disk. Checkers:
every acknowledged create survives; all trees are equal (version and digest)
after the final heal; no operation was applied by a node outside a majority
ring; no VMID is held by two configs. 6 seeds here; CORRAL_SOAK=1 runs 60."""

from __future__ import annotations

import os
import pathlib
import random
from collections import Counter

import pytest

from corral.cfs import rules
from corral.cfs.ops import Op

from .sim import ReplCluster, harness

_core = pytest.importorskip("corral.totem._core")
if not hasattr(_core, "TotemCore"):
    pytest.skip("Totem core not built", allow_module_level=True)

T = 1795720870
NODES = (1, 2, 3, 4, 5)
SEEDS = range(60) if os.environ.get("CORRAL_SOAK") == "1" else range(6)


class Checked(ReplCluster):
    """Records every successful apply with the size of the node's ring then."""

    def start(self, *nodeids: int) -> None:
        super().start(*nodeids)
        for nodeid in nodeids or self.nodeids:
            rstore = self.nodes[nodeid].rstore
            original = rstore.apply_group

            def apply_group(ops, *, quorate, _n=nodeid, _orig=original):  # type: ignore[no-untyped-def]
                outcomes = _orig(ops, quorate=quorate)
                if any(o.ok and o.mutations for o in outcomes):
                    # the ring as the node's event stream has reported it so far
                    self.applied_rings.append((_n, len(self.nodes[_n].ring)))
                return outcomes

            rstore.apply_group = apply_group  # type: ignore[method-assign]

    applied_rings: list[tuple[int, int]] = []


def guest_ids(cluster: ReplCluster, nodeid: int) -> Counter[int]:
    tree = cluster.nodes[nodeid].store.state.tree
    count: Counter[int] = Counter()
    for path, entry in tree.walk():
        config = rules.guest_config(path) if not entry.is_dir else None
        if config is not None and path not in cluster.nodes[nodeid].store.state.quarantined:
            count[config.vmid] += 1
    return count


@pytest.mark.parametrize("seed", SEEDS)
def test_random_workload(tmp_path: pathlib.Path, seed: int) -> None:
    rng = random.Random(seed)
    cluster = Checked(NODES, tmp_path, seed=seed, loss=rng.choice([0.0, 0.0, 0.01]))
    cluster.applied_rings = []
    cluster.start()
    try:
        cluster.settle()
        cluster.do(1, Op.mkdir("f", T))
        cluster.do(1, Op.mkdir("nodes", T))
        for n in NODES:
            cluster.do(1, Op.mkdir(f"nodes/node{n}", T))
            cluster.do(1, Op.mkdir(f"nodes/node{n}/qemu-server", T))
        cluster.settle()
        counter = 0
        down: set[int] = set()
        for _step in range(40):
            roll = rng.random()
            up = [n for n in NODES if n not in down]
            if roll < 0.55:
                for _ in range(rng.randint(1, 6)):
                    n = rng.choice(up)
                    counter += 1
                    kind = rng.random()
                    if kind < 0.5:
                        cluster.submit(n, Op.create(f"f/{n}-{counter}", T, excl=True))
                    elif kind < 0.8:
                        vmid = 100 + rng.randrange(30)
                        cluster.submit(n, Op.create(f"nodes/node{n}/qemu-server/{vmid}.conf",
                                                    T, excl=True))
                    elif kind < 0.9:
                        vmid = 100 + rng.randrange(30)
                        cluster.submit(n, Op.write(f"nodes/node{n}/qemu-server/{vmid}.conf",
                                                   0, b"cores: %d\n" % counter, T))
                    else:
                        vmid = 100 + rng.randrange(30)
                        cluster.submit(n, Op.unlink(f"nodes/node{n}/qemu-server/{vmid}.conf"))
            elif roll < 0.7:
                shuffled = list(NODES)
                rng.shuffle(shuffled)
                cut = rng.randint(1, 4)
                cluster.partition(tuple(shuffled[:cut]), tuple(shuffled[cut:]))
            elif roll < 0.82:
                cluster.heal()
            elif roll < 0.92 and len(down) < 2:
                victim = rng.choice(up)
                cluster.crash(victim)
                down.add(victim)
            elif down:
                back = rng.choice(sorted(down))
                down.discard(back)
                cluster.start(back)
            cluster.run_for(harness.ms(rng.choice([1, 5, 50, 400, 3000])))
        cluster.heal()
        for n in sorted(down):
            cluster.start(n)
        cluster.settle(timeout_s=120)
        cluster.run_for(harness.seconds(1))
        cluster.settle(timeout_s=120)
        digests = cluster.digests()
        assert len(set(digests.values())) == 1, (seed, digests)
        for (_nodeid, _request), op in cluster.acked.items():
            if op.kind == 1 and op.path.startswith("f/"):
                for node in cluster.nodes.values():
                    assert node.store.state.tree.lookup(op.path) is not None, (seed, op.path)
        for nodeid, ring_size in cluster.applied_rings:
            assert ring_size * 2 > len(NODES), (seed, nodeid, ring_size)
        for n in NODES:
            assert all(v == 1 for v in guest_ids(cluster, n).values()), seed
    finally:
        cluster.close()
