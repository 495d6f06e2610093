"""LRM service jobs run asynchronously in the daemon (corral.ha.daemon.jobs.ThreadJobRunner):
a round returns while a guest stop is still blocked, writes its status without a result for
that job, starts no second job for the service, keeps serving other services, and records
the result at the first round after the stop finished; the synchronous runner (simulator)
keeps every scenario log as before (checked by test_scenarios). A job that raises is an
error result, not a crashed daemon."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from corral.ha.daemon.jobs import ThreadJobRunner
from corral.ha.logic.lrm import Lrm
from corral.ha.logic.types import ExitCode
from corral.ha.sim.scenario import Scenario, Simulation

NODES = {f"node{i}": {"power": "off", "network": "off"} for i in (1, 2, 3)}
SERVICES = {"vm:101": {"node": "node1", "state": "started"},
            "vm:102": {"node": "node1", "state": "started"}}


def _simulation() -> Simulation:
    scenario = Scenario(Path("."), dict(NODES), {k: dict(v) for k, v in SERVICES.items()}, [])
    sim = Simulation(scenario)
    for node in NODES:
        sim.execute(f"power {node} on")
    return sim


def _rounds(sim: Simulation, count: int, start_s: int) -> int:
    for _ in range(count):
        sim._round(start_s)
        start_s += sim.round_s
    return start_s


def _service(sim: Simulation, sid: str) -> dict[str, Any]:
    return dict(sim.cluster.manager_status["service_status"][sid])


def test_round_does_not_wait_for_a_slow_stop() -> None:
    sim = _simulation()
    now_s = _rounds(sim, 6, 0)
    assert sim.cluster.running["node1"] == {"vm:101", "vm:102"}
    lrm = sim.cluster.nodes["node1"].lrm
    assert isinstance(lrm, Lrm)
    runner = ThreadJobRunner()
    lrm.jobs = runner
    release = threading.Event()
    entered = threading.Event()
    real_stop = lrm.env.guest_stop

    def slow_stop(sid: str, timeout_s: int | None) -> bool:
        if sid == "vm:101":
            entered.set()
            release.wait(30)
        return real_stop(sid, timeout_s)

    lrm.env.guest_stop = slow_stop  # type: ignore[method-assign]
    sim.execute("service vm:101 stopped")
    sim.execute("service vm:102 stopped")
    started = time.monotonic()
    for _ in range(40):                             # rounds go on while vm:101's stop hangs
        now_s = _rounds(sim, 1, now_s)
        if entered.is_set() and "vm:102" not in sim.cluster.running["node1"]:
            break
        time.sleep(0.05)
    now_s = _rounds(sim, 3, now_s)
    assert entered.is_set()
    assert time.monotonic() - started < 10          # no round waited for the stop
    assert "vm:101" in runner.running() and "vm:101" in lrm.in_flight  # (vm:102: re-checks)
    assert lrm.in_flight["vm:101"][1]["state"] == "request_stop"   # still its first job
    uid = _service(sim, "vm:101")["uid"]
    assert uid not in sim.cluster.lrm_status["node1"].get("results", {})
    assert "vm:101" in sim.cluster.running["node1"]
    assert "vm:102" not in sim.cluster.running["node1"]   # the other job went on meanwhile
    assert _service(sim, "vm:102")["state"] == "stopped"
    release.set()
    deadline = time.monotonic() + 10
    while "vm:101" in sim.cluster.running["node1"] and time.monotonic() < deadline:
        time.sleep(0.01)
    now_s = _rounds(sim, 3, now_s)
    assert lrm.in_flight.get("vm:101", ("", {}))[0] != uid           # the first job is done
    assert "vm:101" not in sim.cluster.running["node1"]
    assert _service(sim, "vm:101")["state"] == "stopped"
    runner.shutdown()


def test_failing_job_is_an_error_result() -> None:
    runner = ThreadJobRunner(threads_max=2)

    def boom() -> ExitCode:
        raise OSError("qemu exploded")

    runner.start("vm:1", boom)
    runner.start("vm:2", lambda: ExitCode.SUCCESS)
    deadline = time.monotonic() + 10
    done: dict[str, ExitCode] = {}
    while len(done) < 2 and time.monotonic() < deadline:
        done.update(runner.collect())
        time.sleep(0.01)
    assert done == {"vm:1": ExitCode.ERROR, "vm:2": ExitCode.SUCCESS}
    runner.shutdown()
