"""Randomised runs of several CpgCores on the fake bus: per seed, a random mix
of joins, leaves, mcasts, disconnects, partitions, merges (with old-ring
messages in the transitional window), crashes and restarts, interleaved with
partial delivery. After every settled step the views of each ring must agree;
at the end, virtual synchrony per group and total order must hold over every
client's event log, every message a surviving sender multicast must reach the
sender exactly once, and no client may see a message twice. Set CORRAL_SOAK=1
for many more seeds."""

from __future__ import annotations

import os
import random

import pytest

from .bus import Bus, check_total_order, check_views_agree, check_virtual_synchrony

GROUPS = [b"alpha", b"beta", b"gamma"]
N_SEEDS = 400 if os.environ.get("CORRAL_SOAK") == "1" else 40


def random_partition(rng: random.Random, nodes: list[int]) -> list[list[int]]:
    shuffled = nodes[:]
    rng.shuffle(shuffled)
    n_parts = rng.randint(1, min(3, len(shuffled)))
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for index, nodeid in enumerate(shuffled):
        parts[index % n_parts if index < n_parts else rng.randrange(n_parts)].append(nodeid)
    return [sorted(p) for p in parts if p]


class Swarm:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.bus = Bus([1, 2, 3, 4])
        self.bus.configure([[1, 2, 3, 4]])
        self.next_pid = 1000
        self.next_client = 1
        # (nodeid, client_id) -> (pid, groups joined or joining)
        self.clients: dict[tuple[int, int], tuple[int, set[bytes]]] = {}
        self.sent: list[tuple[tuple[int, int], bytes]] = []
        self.unreliable: set[tuple[int, int]] = set()  # bus client keys lost/disconnected
        self.msg_counter = 0
        self.crashed: set[int] = set()

    def live_nodes(self) -> list[int]:
        return [n for n in self.bus.nodeids if n not in self.crashed]

    def op(self) -> None:
        rng, bus = self.rng, self.bus
        choice = rng.random()
        live = self.live_nodes()
        mine = [k for k in self.clients if k[0] in live]
        if choice < 0.25 or not mine:
            nodeid = rng.choice(live)
            key = (nodeid, self.next_client)
            self.next_client += 1
            self.next_pid += 1
            group = rng.choice(GROUPS)
            bus.join(nodeid, key[1], self.next_pid, group)
            self.clients[key] = (self.next_pid, {group})
        elif choice < 0.60:
            key = rng.choice(mine)
            _pid, groups = self.clients[key]
            if groups:
                group = rng.choice(sorted(groups))
                self.msg_counter += 1
                payload = b"m%d" % self.msg_counter
                if bus.mcast(key[0], key[1], group, payload):
                    self.sent.append((bus.client_key(*key), payload))
        elif choice < 0.70:
            key = rng.choice(mine)
            _pid, groups = self.clients[key]
            if groups:
                group = rng.choice(sorted(groups))
                bus.leave(key[0], key[1], group)
                groups.discard(group)
        elif choice < 0.75:
            key = rng.choice(mine)
            bus.disconnect(*key)
            self.unreliable.add(bus.client_key(*key))
            del self.clients[key]
        elif choice < 0.88:
            bus.configure(random_partition(rng, live), old_tail=rng.randint(0, 2))
        elif choice < 0.92 and len(live) > 1:
            self.crash(rng.choice(live))
        elif choice < 0.95 and self.crashed:
            nodeid = sorted(self.crashed)[0]
            self.crashed.discard(nodeid)
            bus.restart(nodeid)
        else:
            bus.run()
            check_views_agree(bus)
        bus.run_steps(rng.randint(0, 4))

    def crash(self, nodeid: int) -> None:
        for key in [k for k in self.clients if k[0] == nodeid]:
            self.unreliable.add(self.bus.client_key(*key))
            del self.clients[key]
        self.bus.crash(nodeid)
        self.crashed.add(nodeid)
        # The others notice at once: a configuration without it, same partitions.
        rings = {self.bus.ring_of[n] for n in self.live_nodes()}
        self.bus.configure([[n for n in r if n != nodeid] for r in rings if set(r) - {nodeid}])

    def finish(self) -> None:
        for nodeid in sorted(self.crashed):
            self.bus.restart(nodeid)
        self.crashed.clear()
        self.bus.configure([self.bus.nodeids])
        self.bus.run()


@pytest.mark.parametrize("seed", range(N_SEEDS))
def test_swarm(seed: int) -> None:
    swarm = Swarm(seed)
    for _ in range(120):
        swarm.op()
    swarm.finish()
    bus = swarm.bus
    check_views_agree(bus)
    check_virtual_synchrony(bus)
    check_total_order(bus)
    for key, log in bus.logs.items():
        payloads = [e.payload for e in log if hasattr(e, "payload")]
        assert len(payloads) == len(set(payloads)), f"duplicate delivery at {key}"
    for key, payload in swarm.sent:
        if key in swarm.unreliable:
            continue
        got = [e for e in bus.logs[key] if getattr(e, "payload", None) == payload]
        assert len(got) == 1, f"seed {seed}: {payload!r} from {key} delivered {len(got)} times"
    for core in bus.cores.values():
        assert core.stats()["sync_mismatch"] == 0
        assert core.stats()["malformed_dropped"] == 0
