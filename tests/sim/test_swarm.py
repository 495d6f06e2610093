"""Swarm runs of the real Totem core under the deterministic simulator.

Each seed picks its own fault mix (swarm testing) from all fault classes, runs
a safety phase with faults and a workload, then a fault-free liveness phase
that must converge to one ring of all nodes within the stated bound; the EVS
checkers run after every event (see src/corral/sim/checkers.py). A failing
seed prints its violation, a trace excerpt and the one replay command.

- test_swarm_seed: the default suite, SWARM_SEEDS seeds, 3 to 5 nodes, short
  timers (token 300 ms), 2 to 3 simulated seconds of faults each;
- test_swarm_seed_big_cluster: BIG_SWARM_SEEDS seeds of 6 or 7 nodes, token
  500 ms, 4 simulated seconds of faults;
- test_regression_seed: every line of regression_seeds.txt;
- test_real_core_is_deterministic: two runs, and two processes with different
  PYTHONHASHSEED, give the same trace digest;
- test_soak, test_soak_cpg: many more, longer seeds (the latter with CPG),
  only with CORRAL_SOAK=1 (CORRAL_SOAK_SEEDS sets how many).

Seeds that fail because of a known, unfixed core bug are listed in
KNOWN_CORE_BUGS with the entry in docs/sim-findings.md and run as xfail.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from corral.sim.cluster import SimOptions, run_seed
from corral.sim.faults import FAULT_NAMES, parse_faults

_core = pytest.importorskip("corral.totem._core")
if not hasattr(_core, "TotemCore"):
    pytest.skip("corral.totem._core has no TotemCore yet", allow_module_level=True)

HERE = pathlib.Path(__file__).resolve().parent
SWARM_SEEDS = 400
BIG_SWARM_SEEDS = 100
SOAK_SEEDS = int(os.environ.get("CORRAL_SOAK_SEEDS", "3000"))

# seed: why it is expected to fail (a core bug reported in docs/sim-findings.md)
# Seeds fixed by a core change stay in regression_seeds.txt with their finding.
# (F4, seed 40367, fixed: nested encapsulation of the old ring's own recovery frames.)
KNOWN_CORE_BUGS: dict[int, str] = {}


def swarm_options(seed: int, *, duration_ms: int | None = None) -> SimOptions:
    return SimOptions(
        seed=seed,
        nodes=3 + seed % 3,
        duration_ms=duration_ms if duration_ms is not None else 2000 + 500 * (seed % 3),
        faults=FAULT_NAMES,
        token_ms=300,
    )


def _check(options: SimOptions) -> None:
    result = run_seed(options)
    assert result.ok, f"{result.summary()}\n{result.report}"


def _seed_params(seeds: range) -> list[object]:
    params: list[object] = []
    for seed in seeds:
        marks = []
        if seed in KNOWN_CORE_BUGS:
            marks.append(pytest.mark.xfail(reason=KNOWN_CORE_BUGS[seed], strict=False))
        params.append(pytest.param(seed, marks=marks, id=str(seed)))
    return params


@pytest.mark.parametrize("seed", _seed_params(range(1, SWARM_SEEDS + 1)))
def test_swarm_seed(seed: int) -> None:
    _check(swarm_options(seed))


@pytest.mark.parametrize("seed", _seed_params(range(10_001, 10_001 + BIG_SWARM_SEEDS)))
def test_swarm_seed_big_cluster(seed: int) -> None:
    # 6 or 7 nodes, the default-ish token of 500 ms, longer fault phase.
    _check(SimOptions(seed=seed, nodes=6 + seed % 2, duration_ms=4000, faults=FAULT_NAMES, token_ms=500))


def _regression_lines() -> list[object]:
    params: list[object] = []
    for line in (HERE / "regression_seeds.txt").read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        seed, nodes, duration_ms, faults, token_ms = text.split()
        options = SimOptions(
            seed=int(seed), nodes=int(nodes), duration_ms=int(duration_ms),
            faults=parse_faults(faults), token_ms=int(token_ms),
        )
        marks = []
        if int(seed) in KNOWN_CORE_BUGS:
            marks.append(pytest.mark.xfail(reason=KNOWN_CORE_BUGS[int(seed)], strict=False))
        params.append(pytest.param(options, marks=marks, id=text.replace(" ", "-")))
    return params or [pytest.param(None, marks=pytest.mark.skip(reason="no regression seeds yet"))]


@pytest.mark.parametrize("options", _regression_lines())
def test_regression_seed(options: SimOptions) -> None:
    _check(options)


def test_real_core_is_deterministic() -> None:
    options = swarm_options(7)
    first, second = run_seed(options), run_seed(options)
    assert first.digest == second.digest
    assert first.events == second.events and first.delivered == second.delivered
    assert run_seed(swarm_options(8)).digest != first.digest


def test_replay_command_reproduces_across_hash_seeds() -> None:
    command = swarm_options(5).replay_command().split()[1:]
    digests = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run(
            [sys.executable, *command], capture_output=True, text=True, env=env, timeout=120,
        )
        match = re.search(r"trace digest ([0-9a-f]+)", out.stdout)
        assert match, out.stdout + out.stderr
        digests.append(match.group(1))
    assert digests[0] == digests[1] == run_seed(swarm_options(5)).digest


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CORRAL_SOAK") != "1", reason="soak: set CORRAL_SOAK=1")
def test_soak() -> None:
    jobs = os.cpu_count() or 2
    command = [
        sys.executable, "-m", "corral.sim", "soak", "--seeds", f"100000:{100000 + SOAK_SEEDS}",
        "--jobs", str(jobs), "--nodes", "3:7", "--duration-ms", "8000", "--token-ms", "300",
    ]
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CORRAL_SOAK") != "1", reason="soak: set CORRAL_SOAK=1")
def test_soak_cpg() -> None:
    command = [
        sys.executable, "-m", "corral.sim", "soak", "--seeds", f"200000:{200000 + SOAK_SEEDS // 2}",
        "--jobs", str(os.cpu_count() or 2), "--nodes", "3:7", "--duration-ms", "6000",
        "--token-ms", "300", "--cpg",
    ]
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
