"""Randomised scenarios (swarm testing): each seed picks a cluster size, services, rules,
policies and a list of faults and admin commands, runs the simulator with its safety checker
armed, then heals everything (power, network, arm, maintenance off) and checks liveness: every
requested-started, healthy service ends 'started' and runs on exactly its node.

A failing seed prints the command that replays it. CORRAL_SOAK=1 runs many more seeds.
"""

from __future__ import annotations

import json
import os
import pathlib
import random

import pytest

from corral.ha.sim.scenario import Simulation, load_scenario

SEEDS = range(400) if os.environ.get("CORRAL_SOAK") == "1" else range(24)


def _services(rng: random.Random, nodes: list[str]) -> dict[str, dict[str, str]]:
    services = {}
    for index in range(rng.randint(2, 6)):
        kind = "vm" if rng.random() < 0.8 else "ct"
        state = rng.choice(["started"] * 4 + ["stopped", "disabled"])
        services[f"{kind}:{101 + index}"] = {"node": rng.choice(nodes), "state": state}
    if rng.random() < 0.3:
        # a scriptable failing resource: some failing starts and migrations
        services[f"fa:1{rng.randint(0, 3)}{rng.randint(0, 2)}0"] = {
            "node": rng.choice(nodes), "state": "started"}
    return services


def _rules(rng: random.Random, sids: list[str], nodes: list[str]) -> str:
    blocks = []
    if rng.random() < 0.4 and len(sids) >= 2:
        pair = rng.sample(sids, 2)
        affinity = rng.choice(["positive", "negative"])
        blocks.append(f"resource-affinity: ra\n\tresources {','.join(pair)}\n\taffinity {affinity}\n")
    if rng.random() < 0.4:
        sid = rng.choice(sids)
        chosen = rng.sample(nodes, rng.randint(1, len(nodes)))
        strict = "\tstrict 1\n" if rng.random() < 0.3 else ""
        blocks.append(f"node-affinity: na\n\tresources {sid}\n\tnodes {','.join(chosen)}\n"
                      + strict)
    return "\n".join(blocks)


def _step(rng: random.Random, nodes: list[str], sids: list[str]) -> list[str]:
    node, sid = rng.choice(nodes), rng.choice(sids)
    return [rng.choice([
        f"network {node} off", f"network {node} on", f"power {node} off", f"power {node} on",
        f"reboot {node}", f"shutdown {node}", f"restart-lrm {node}",
        f"service {sid} migrate {rng.choice(nodes)}", f"service {sid} relocate {rng.choice(nodes)}",
        f"service {sid} {rng.choice(['started', 'stopped', 'disabled'])}",
        f"service {sid} stop {rng.choice([0, 30])}",
        f"crm {node} enable-node-maintenance", f"crm {node} disable-node-maintenance",
        f"crm {node} disarm-ha {rng.choice(['freeze', 'ignore'])}", f"crm {node} arm-ha",
        f"delay {rng.choice([0, 30, 90])}",
        f"cfs {node} {rng.choice(['rw', 'update'])} fail", f"cfs {node} rw work",
        f"cfs {node} update work", f"service {sid} lock {rng.choice(['backup', 'create'])}",
        f"service {sid} unlock", f"crm {node} stop", f"crm {node} start",
        f"skip-round {rng.choice(['crm', 'lrm'])} {rng.randint(1, 2)}",
        f"service {sid} ignored", f"service {sid} manual-migrate {rng.choice(nodes)}",
        f"service vm:199 add {node} started", "service vm:199 delete",
    ])]


def make_scenario(seed: int, directory: pathlib.Path) -> None:
    rng = random.Random(seed)
    nodes = [f"node{i}" for i in range(1, rng.randint(3, 5) + 1)]
    services = _services(rng, nodes)
    sids = sorted(services)
    heal = [f"power {n} on" for n in nodes] + [f"network {n} on" for n in nodes]
    heal += [f"cfs {n} rw work" for n in nodes] + [f"cfs {n} update work" for n in nodes]
    heal += [f"service {sid} unlock" for sid in sids] + [f"crm {n} start" for n in nodes]
    heal += [f"crm {n} disable-node-maintenance" for n in nodes] + [f"crm {nodes[0]} arm-ha"]
    commands = [[f"power {n} on" for n in nodes]]
    commands += [_step(rng, nodes, sids) for _ in range(rng.randint(3, 8))]
    # Heal twice: a shutdown requested while the cluster had no quorum completes only after
    # the first heal restored it, and powers its node off again.
    commands += [heal, heal, ["delay 400"], [f"crm {nodes[0]} arm-ha"]]
    datacenter = {"ha": {"shutdown_policy": rng.choice(["conditional", "freeze", "failover",
                                                         "migrate"])},
                  "crs": {"ha": rng.choice(["basic", "static", "dynamic"]),
                          "ha-rebalance-on-start": rng.choice([0, 1]),
                          "ha-auto-rebalance": rng.choice([0, 1])},
                  "ha-timing": {"profile": rng.choice(["reference", "fast"])
                                if len(nodes) <= 4 else "reference"}}
    directory.mkdir(parents=True)
    (directory / "hardware_status").write_text(json.dumps(
        {n: {"power": "off", "network": "off"} for n in nodes}))
    (directory / "service_config").write_text(json.dumps(services))
    (directory / "cmdlist").write_text(json.dumps(commands))
    (directory / "datacenter.cfg").write_text(json.dumps(datacenter))
    rules = _rules(rng, sids, nodes)
    if rules:
        (directory / "rules_config").write_text(rules)


@pytest.mark.parametrize("seed", SEEDS)
def test_swarm_seed(seed: int, tmp_path: pathlib.Path) -> None:
    directory = tmp_path / f"seed-{seed}"
    make_scenario(seed, directory)
    replay = (f"replay: python -c 'from tests.ha.test_swarm import make_scenario; import pathlib;"
              f" make_scenario({seed}, pathlib.Path(\"/tmp/swarm-{seed}\"))' && "
              f"corral ha-sim run /tmp/swarm-{seed}")
    simulation = Simulation(load_scenario(directory))
    result = simulation.run()
    assert result.error is None, f"{result.error}\n{replay}"
    cluster = simulation.cluster
    status = cluster.manager_status.get("service_status", {})
    assert not cluster.manager_status.get("disarm"), replay
    for sid, resource in cluster.resources.items():
        if resource.state != "started" or sid not in status:
            continue
        entry = status[sid]
        if entry["state"] == "error" or sid.startswith("fa:"):
            continue
        assert entry["state"] == "started", f"{sid}: {entry}\n{replay}"
        running_on = [n for n, sids in cluster.running.items() if sid in sids]
        assert running_on == [entry["node"]], f"{sid} runs on {running_on}: {entry}\n{replay}"
