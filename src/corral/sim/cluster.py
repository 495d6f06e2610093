"""The simulated cluster: N Totem cores, one network, one seed, two phases.

A run is a pure function of `SimOptions` (and the core's code): every random
choice comes from a generator derived from the seed (rng.py), time is the
scheduler's integer nanoseconds, and ties are broken by insertion order.

Phases:

1. safety, [0, duration): faults chosen by the seed (faults.py) are on, the
   workload submits messages, checkers run after every event;
2. liveness, from `duration`: links heal, loss/dup/delay/jitter stop, crashed
   nodes restart (ring seq kept). Within `convergence_bound_ns(timers)` every
   node must be OPERATIONAL in one ring that contains all nodes, and the
   application must have seen that configuration. Then the workload stops, the
   queues drain (at most `drain_bound_ns(timers)`), and the final checks run:
   self-delivery, same ring everywhere, same messages in the final ring.
"""

from __future__ import annotations

import hashlib
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from corral.sim.checkers import (
    EvsChecker,
    Proc,
    Violation,
    make_payload,
    parse_payload,
    proc_name,
)
from corral.sim.cpglayer import CpgLayer, config_stamp, wrap
from corral.sim.faults import FAULT_NAMES, FaultPlan
from corral.sim.network import SimNetwork
from corral.sim.rng import derive_rng
from corral.sim.scheduler import Scheduler
from corral.totem.config import NS_PER_MS, TotemConfig, TotemTimers

TRACE_KEEP = 400
TRACE_SHOW = 30
TRACE_DELIVERIES_SHOW = 12
PACKET_TRACE_KEEP = 12
PACKET_HEAD_BYTES = 44
# Totem common header (ext/totem/codec.pxi): magic u16 | version u8 | type u8 |
# sender u32 | ring_rep u32 | ring_seq u64, little-endian.
TOTEM_MAGIC = 0x7C05
PACKET_TYPES = {1: "token", 2: "mcast", 3: "join", 4: "commit", 5: "merge-detect", 6: "hold-cancel"}


def describe_packet(packet: bytes) -> str:
    """Best-effort one-line summary of a Totem packet, for traces only."""
    if len(packet) >= 20 and int.from_bytes(packet[0:2], "little") == TOTEM_MAGIC:
        kind = PACKET_TYPES.get(packet[3], f"type{packet[3]}")
        rep = int.from_bytes(packet[8:12], "little")
        seq = int.from_bytes(packet[12:20], "little")
        extra = ""
        if packet[3] in (1, 2) and len(packet) >= 28:
            extra = f" seq {int.from_bytes(packet[20:28], 'little')}"
            if packet[3] == 1 and len(packet) >= 44:
                extra = f" token_seq {int.from_bytes(packet[20:28], 'little')} seq {int.from_bytes(packet[28:36], 'little')} aru {int.from_bytes(packet[36:44], 'little')}"
        return f"{kind} ring ({rep}, {seq}){extra}"
    return packet[:16].hex()
MAX_EVENTS = 5_000_000
PPM = 1_000_000
# Rounds of (collect outputs, submit CPG's messages) per drain: each round only
# repeats when Totem accepted something, and a singleton ring answers at once.
DRAIN_ROUNDS_MAX = 64
# Share of seeds whose workload also fills one node's send queue to the brim.
BURST_PROBABILITY = 0.05
BURST_MAX_MESSAGES = 20_000


def convergence_bound_ns(timers: TotemTimers) -> int:
    """How long after the heal one ring of all nodes must have formed.

    A node partitioned away may only notice the others through a merge detect
    (merge timer after an idle token visit), and a gather can need a token
    timeout plus up to two consensus timeouts before a commit token succeeds
    (one to expire stale failure marks, one to agree); a margin covers commit,
    recovery and a restart.
    """
    return 2 * timers.token_ns + 3 * timers.consensus_ns + timers.merge_ns + 20 * timers.join_ns


def drain_bound_ns(timers: TotemTimers) -> int:
    """How long after convergence the send queues have to empty in a clean network."""
    return 4 * timers.token_ns


@dataclass(frozen=True, slots=True)
class CoreApi:
    """What the simulator needs from a core module (the real one or a test fake)."""

    factory: Callable[[int, TotemTimers, int], Any]
    ev_deliver: int
    ev_config: int
    conf_transitional: int
    conf_regular: int
    state_operational: int
    loopback: bool = True
    state_stopped: int = -1


def real_core_api() -> CoreApi:
    from corral.totem import _core

    return CoreApi(
        factory=lambda nodeid, timers, ring_seq: _core.TotemCore(nodeid, timers, ring_seq=ring_seq),
        ev_deliver=_core.EV_DELIVER,
        ev_config=_core.EV_CONFIG,
        conf_transitional=_core.CONF_TRANSITIONAL,
        conf_regular=_core.CONF_REGULAR,
        state_operational=_core.STATE_OPERATIONAL,
        state_stopped=_core.STATE_STOPPED,
    )


@dataclass(frozen=True, slots=True)
class SimOptions:
    seed: int
    nodes: int = 3
    duration_ms: int = 3000
    faults: tuple[str, ...] = ()
    token_ms: int = 500
    cpg: bool = False
    verbose: int = 0

    def replay_command(self) -> str:
        faults = "all" if self.faults == FAULT_NAMES else ",".join(self.faults) or "none"
        return (
            f"python -m corral.sim --seed {self.seed} --nodes {self.nodes} "
            f"--duration-ms {self.duration_ms} --faults {faults} --token-ms {self.token_ms}"
            + (" --cpg" if self.cpg else "")
        )

    def totem_config(self) -> TotemConfig:
        # No per-node token coefficient: keeps the simulated timers short.
        return TotemConfig(token=self.token_ms, token_coefficient=0)


@dataclass(slots=True)
class RunResult:
    options: SimOptions
    ok: bool
    violation: Violation | None
    report: str
    digest: str
    plan: FaultPlan
    submitted: int = 0
    backpressure: int = 0
    delivered: int = 0
    configs: int = 0
    rings: int = 0
    crashes: int = 0
    events: int = 0
    converge_ns: int = -1
    sim_ns: int = 0
    wall_s: float = 0.0
    stats: dict[str, int] = field(default_factory=dict)
    cpg_stats: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        converge = f"{self.converge_ns / NS_PER_MS:.0f}ms" if self.converge_ns >= 0 else "never"
        return (
            f"seed {self.options.seed}: {'OK' if self.ok else 'FAIL'}; faults: {self.plan.describe()}\n"
            f"  submitted {self.submitted} (refused {self.backpressure}), deliveries {self.delivered}, "
            f"config events {self.configs}, regular rings {self.rings}, crashes {self.crashes}\n"
            + (f"  cpg: {self.cpg_stats['cpg_operations']} client operations, {self.cpg_stats['cpg_mcasts']} mcasts, "
               f"{self.cpg_stats['cpg_deliveries']} deliveries, {self.cpg_stats['cpg_refused']} refused, "
               f"{self.cpg_stats['cpg_vs_pairs']} confchg segments compared\n" if self.cpg_stats else "")
            + f"  converged {converge} after heal; simulated {self.sim_ns / NS_PER_MS:.0f}ms in "
            f"{self.wall_s:.2f}s wall, {self.events} events; trace digest {self.digest}"
        )


@dataclass(slots=True)
class NodeSlot:
    nodeid: int
    core: Any = None
    incarnation: int = 0
    persisted_ring_seq: int = 0
    timer_at_ns: int = -1
    timer_generation: int = 0
    counter: int = 0
    paused_until_ns: int = -1
    # The node's monotonic clock: offset + t * (1 + rate_ppm / 1e6) of global time t.
    clock_offset_ns: int = 0
    clock_rate_ppm: int = 0

    def local_ns(self, global_ns: int) -> int:
        return self.clock_offset_ns + global_ns + global_ns * self.clock_rate_ppm // PPM

    def global_ns(self, local_ns: int) -> int:
        """The first global time at which this node's clock reads at least `local_ns`."""
        elapsed = local_ns - self.clock_offset_ns
        estimate = max(0, elapsed * PPM // (PPM + self.clock_rate_ppm) - 1)
        while self.local_ns(estimate) < local_ns:
            estimate += 1
        return estimate

    @property
    def proc(self) -> Proc:
        return (self.nodeid, self.incarnation)


class Simulation:
    def __init__(self, options: SimOptions, api: CoreApi | None = None) -> None:
        self.options = options
        self.api = api if api is not None else real_core_api()
        self.timers = options.totem_config().timers(options.nodes)
        seed = options.seed
        self.plan = FaultPlan.choose(seed, options.faults, self.timers.token_ns)
        self.scheduler = Scheduler()
        self.nodeids = tuple(range(1, options.nodes + 1))
        self.network = SimNetwork(
            self.nodeids, derive_rng(seed, "net"), self.scheduler,
            loopback=self.api.loopback, on_drop=self._on_drop,
        )
        # One generator per fault class: switching one class off leaves the
        # others' schedules unchanged, so a failing seed can be narrowed down.
        self.fault_rngs = {name: derive_rng(seed, f"faults/{name}") for name in ("start", "partition", "asym", "crash", "pause", "leave")}
        self.workload_rng = derive_rng(seed, "workload")
        self.checker = EvsChecker((self.api.conf_transitional, self.api.conf_regular))
        self.cpg = CpgLayer(derive_rng(seed, "cpg")) if options.cpg else None
        self.slots = {nodeid: NodeSlot(nodeid) for nodeid in self.nodeids}
        if self.plan.clock_drift_ppm:
            clock_rng = derive_rng(seed, "clocks")
            for slot in self.slots.values():
                slot.clock_rate_ppm = clock_rng.randint(-self.plan.clock_drift_ppm, self.plan.clock_drift_ppm)
                slot.clock_offset_ns = clock_rng.randrange(1 << 50)
        self.digest = hashlib.blake2b(digest_size=16)
        self.trace: deque[tuple[int, str | tuple[Any, ...]]] = deque(maxlen=TRACE_KEEP)
        self.delivery_trace: deque[tuple[int, str | tuple[Any, ...]]] = deque(maxlen=TRACE_KEEP)
        self.packet_trace: deque[tuple[int, int, int, bytes]] = deque(maxlen=PACKET_TRACE_KEEP)
        self.phase = "safety"
        self.safety_end_ns = options.duration_ms * NS_PER_MS
        self.converge_deadline_ns = self.safety_end_ns + convergence_bound_ns(self.timers)
        self.converged_at_ns = -1
        self.converged_ring: tuple[int, int] = (0, 0)
        self.end_deadline_ns = 0
        self.rings_after_converge = 0
        self.workload_on = True
        self.driving_node = 0
        self.finished = False
        self.events = 0
        self.submitted = 0
        self.backpressure = 0
        self.crashes = 0
        # Workload intensity is part of the swarm choice too.
        self.submit_interval_ns = self.workload_rng.choice((2, 5, 20, 50)) * NS_PER_MS
        # A few seeds also fill one node's send queue until the core refuses.
        self.burst_rng = derive_rng(seed, "burst")
        self.burst_at_ns = -1
        if self.burst_rng.random() < BURST_PROBABILITY:
            self.burst_at_ns = self.burst_rng.randrange(max(1, self.safety_end_ns))

    # -- driving --------------------------------------------------------------------

    def run(self) -> RunResult:
        started = time.perf_counter()
        violation: Violation | None = None
        try:
            self._schedule_initial()
            self._loop()
        except Violation as error:
            violation = error
        except Exception as error:
            # The innermost frame tells a crash of the core (a finding) from a
            # bug of the simulator itself.
            frames = traceback.extract_tb(error.__traceback__)
            where = "harness-error" if frames and "/corral/sim/" in frames[-1].filename else "core-exception"
            nodes = [self.driving_node] if self.driving_node else []
            violation = Violation(where, nodes, f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=8)}")
        return self._result(violation, time.perf_counter() - started)

    def _schedule_initial(self) -> None:
        rng = self.fault_rngs["start"]
        for nodeid in self.nodeids:
            self.scheduler.at(rng.randrange(self.timers.token_ns // 2), ("restart", nodeid, False))
        plan = self.plan
        if plan.partition_interval_ns:
            self.scheduler.at(self._jitter("partition", plan.partition_interval_ns), ("partition",))
        if plan.asym_interval_ns:
            self.scheduler.at(self._jitter("asym", plan.asym_interval_ns), ("asym",))
        if plan.crash_interval_ns:
            self.scheduler.at(self._jitter("crash", plan.crash_interval_ns), ("crash",))
        if plan.pause_interval_ns:
            self.scheduler.at(self._jitter("pause", plan.pause_interval_ns), ("pause",))
        if plan.leave_interval_ns:
            self.scheduler.at(self._jitter("leave", plan.leave_interval_ns), ("leave",))
        self.network.set_plan(plan)
        self.scheduler.at(self.timers.token_ns // 2, ("submit",))
        if self.burst_at_ns >= 0 and self.cpg is None:
            self.scheduler.at(self.burst_at_ns, ("burst",))
        self.scheduler.at(self.safety_end_ns, ("heal",))
        self.scheduler.at(self.converge_deadline_ns, ("deadline",))

    def _loop(self) -> None:
        handlers: dict[str, Callable[[tuple[Any, ...]], None]] = {
            "packet": self._on_packet, "timer": self._on_timer, "submit": self._on_submit,
            "restart": self._on_restart, "crash": self._on_crash, "partition": self._on_partition,
            "asym": self._on_asym, "uncut": self._on_uncut, "heal": self._on_heal,
            "deadline": self._on_deadline, "end": self._on_end, "pause": self._on_pause,
            "leave": self._on_leave, "burst": self._on_burst,
        }
        while not self.finished:
            event = self.scheduler.pop()
            if event is None:
                raise Violation("liveness", list(self.nodeids), "no more events (every timer disarmed)")
            self.events += 1
            if self.events > MAX_EVENTS:
                raise Violation("liveness", list(self.nodeids), f"more than {MAX_EVENTS} events")
            self.driving_node = event[1] if event[0] in ("packet", "timer", "restart") else 0
            handlers[event[0]](event)
            if self.phase == "liveness" and self.converged_at_ns < 0:
                self._check_converged()

    def _jitter(self, fault: str, interval_ns: int) -> int:
        return self.scheduler.now_ns + interval_ns // 2 + self.fault_rngs[fault].randrange(interval_ns)

    # -- node events --------------------------------------------------------------------

    def _on_packet(self, event: tuple[Any, ...]) -> None:
        _, destination, source, packet = event
        slot = self.slots[destination]
        self.digest.update(b"p%d>%d@%d:" % (source, destination, self.scheduler.now_ns))
        self.digest.update(packet)
        if slot.core is None:
            return
        if self._deferred(slot, event):
            return
        self.packet_trace.append((self.scheduler.now_ns, source, destination, packet[:PACKET_HEAD_BYTES]))
        if self.options.verbose >= 2:
            self._note(f"n{source} -> n{destination} {describe_packet(packet)}")
        slot.core.receive(slot.local_ns(self.scheduler.now_ns), packet)
        self._drain(slot)

    def _on_timer(self, event: tuple[Any, ...]) -> None:
        _, nodeid, generation = event
        slot = self.slots[nodeid]
        if slot.core is None or generation != slot.timer_generation:
            return
        if self._deferred(slot, event):
            return
        slot.timer_at_ns = -1
        self.digest.update(b"t%d@%d;" % (nodeid, self.scheduler.now_ns))
        slot.core.tick(slot.local_ns(self.scheduler.now_ns))
        self._drain(slot)

    def _on_submit(self, event: tuple[Any, ...]) -> None:
        if not self.workload_on:
            return
        rng = self.workload_rng
        self.scheduler.after(1 + int(rng.expovariate(1.0 / self.submit_interval_ns)), ("submit",))
        now_ns = self.scheduler.now_ns
        up = [s for s in self.slots.values() if s.core is not None and s.paused_until_ns <= now_ns]
        if not up:
            return
        slot = up[rng.randrange(len(up))]
        self.driving_node = slot.nodeid
        if self.cpg is not None:
            self.cpg.act(slot.nodeid)
            self._drain(slot)
            return
        size_draw = rng.random()
        if size_draw < 0.01:
            filler = rng.randrange(10_000, 70_000)
        elif size_draw < 0.06:
            filler = rng.randrange(3000, 5000)
        else:
            filler = rng.randrange(200)
        slot.counter += 1
        payload = make_payload(slot.nodeid, slot.counter, filler)
        accepted = slot.core.submit(payload)
        self.digest.update(b"s%d:%d:%d;" % (slot.nodeid, slot.counter, accepted))
        if accepted:
            self.submitted += 1
            self.checker.on_submit(slot.proc, payload)
        else:
            self.backpressure += 1
        self._drain(slot)

    def _on_burst(self, event: tuple[Any, ...]) -> None:
        """Submit small messages from one node until its core refuses one
        (backpressure), at most BURST_MAX_MESSAGES."""
        now_ns = self.scheduler.now_ns
        up = [s for s in self.slots.values() if s.core is not None and s.paused_until_ns <= now_ns]
        if not up:
            return
        slot = up[self.burst_rng.randrange(len(up))]
        self.driving_node = slot.nodeid
        accepted = 0
        while accepted < BURST_MAX_MESSAGES:
            slot.counter += 1
            payload = make_payload(slot.nodeid, slot.counter, 8)
            if not slot.core.submit(payload):
                self.backpressure += 1
                break
            accepted += 1
            self.submitted += 1
            self.checker.on_submit(slot.proc, payload)
        self.digest.update(b"b%d:%d;" % (slot.nodeid, accepted))
        self._note(f"n{slot.nodeid} burst: {accepted} messages accepted" + (", then refused" if accepted < BURST_MAX_MESSAGES else ""))
        self._drain(slot)

    def _on_restart(self, event: tuple[Any, ...]) -> None:
        _, nodeid, disk_lost = event
        slot = self.slots[nodeid]
        if slot.core is not None:
            return
        if disk_lost:
            slot.persisted_ring_seq = 0
        slot.incarnation += 1
        slot.timer_at_ns = -1
        slot.timer_generation += 1
        self._note(f"n{nodeid} starts (incarnation {slot.incarnation}, ring seq {slot.persisted_ring_seq}{', disk lost' if disk_lost else ''})")
        self.checker.on_start(slot.proc, disk_lost=disk_lost)
        if self.cpg is not None:
            self.cpg.on_start(nodeid, slot.incarnation)
        slot.core = self.api.factory(nodeid, self.timers, slot.persisted_ring_seq)
        slot.core.start(slot.local_ns(self.scheduler.now_ns))
        self._drain(slot)

    def _drain(self, slot: NodeSlot) -> None:
        """Collect a core's outputs: persist, then send, then deliver, then re-arm.

        With CPG on, CPG's outgoing messages are then submitted to Totem (in
        order, stopping at the first refusal), which can produce more outputs."""
        core = slot.core
        for _ in range(DRAIN_ROUNDS_MAX):
            seq = core.take_ring_seq_to_persist()
            if seq is not None:
                slot.persisted_ring_seq = seq
            for destination, packet in core.pop_outbox():
                self.network.send(slot.nodeid, destination, packet)
            for event in core.pop_events():
                self._on_core_event(slot, event)
            if self.cpg is None or not self._submit_cpg(slot):
                break
        deadline = core.next_deadline_ns()
        if deadline != slot.timer_at_ns:
            slot.timer_generation += 1
            slot.timer_at_ns = deadline
            if deadline >= 0:
                self.scheduler.at(slot.global_ns(deadline), ("timer", slot.nodeid, slot.timer_generation))

    def _submit_cpg(self, slot: NodeSlot) -> bool:
        assert self.cpg is not None
        if slot.core.state == self.api.state_stopped:
            return False
        accepted = 0
        for inner in self.cpg.pending_payloads(slot.nodeid):
            slot.counter += 1
            payload = wrap(slot.nodeid, slot.counter, inner)
            if not slot.core.submit(payload):
                self.backpressure += 1
                break
            accepted += 1
            self.submitted += 1
            self.checker.on_submit(slot.proc, payload)
        self.cpg.submitted(slot.nodeid, accepted)
        return accepted > 0

    def _on_core_event(self, slot: NodeSlot, event: tuple[Any, ...]) -> None:
        if event[0] == self.api.ev_deliver:
            _, sender, payload = event
            self.digest.update(b"d%d<%d:" % (slot.nodeid, sender))
            self.digest.update(payload)
            self.delivery_trace.append((self.scheduler.now_ns, ("deliver", slot.nodeid, sender, payload[:24])))
            if self.options.verbose >= 2:
                print(f"{self.scheduler.now_ns / NS_PER_MS:12.3f}ms  {_format_entry(self.delivery_trace[-1][1])}")
            self.checker.on_deliver(slot.proc, sender, payload)
            if self.cpg is not None:
                self.cpg.on_totem_deliver(slot.nodeid, sender, payload, ("m", parse_payload(payload)))
        elif event[0] == self.api.ev_config:
            _, kind, ring_id, members, joined, left = event
            name = "regular" if kind == self.api.conf_regular else "transitional"
            text = f"n{slot.nodeid} {name} ring {tuple(ring_id)} members {tuple(members)} joined {tuple(joined)} left {tuple(left)}"
            self.digest.update(text.encode())
            self._note(text)
            old_regular = self.checker.procs[slot.proc].regular
            self.checker.on_config(slot.proc, kind, tuple(ring_id), tuple(members), tuple(joined), tuple(left))
            if self.cpg is not None:
                transitional = kind == self.api.conf_transitional
                ring = self.checker.ring_key(tuple(ring_id))
                stamp = config_stamp(transitional, old_regular[0] if old_regular else None, ring, tuple(sorted(members)))
                self.cpg.on_totem_config(slot.nodeid, transitional, tuple(ring_id), tuple(members), stamp)
        else:
            raise Violation("core-exception", [slot.nodeid], f"unknown event {event!r}")

    # -- faults ------------------------------------------------------------------------

    def _on_crash(self, event: tuple[Any, ...]) -> None:
        if self.phase != "safety":
            return
        plan = self.plan
        rng = self.fault_rngs["crash"]
        self.scheduler.at(self._jitter("crash", plan.crash_interval_ns), ("crash",))
        up = [slot for slot in self.slots.values() if slot.core is not None]
        if len(up) <= 1:
            return
        slot = up[rng.randrange(len(up))]
        disk_lost = rng.random() < plan.disk_lost_probability
        downtime_ns = 1 + rng.randrange(plan.crash_downtime_ns)
        self._crash(slot)
        self.scheduler.after(downtime_ns, ("restart", slot.nodeid, disk_lost))

    def _check_wire(self, slot: NodeSlot) -> None:
        """The simulated network never corrupts or truncates packets, so a core
        that calls one of them malformed has an encoder/decoder mismatch."""
        malformed = slot.core.stats().get("dropped_malformed", 0)
        if malformed:
            raise Violation("wire-integrity", [slot.nodeid], f"{proc_name(slot.proc)} dropped {malformed} packets as malformed; the simulated network never corrupts packets")

    def _crash(self, slot: NodeSlot, why: str = "crashes") -> None:
        self._check_wire(slot)
        self._note(f"n{slot.nodeid} {why} (incarnation {slot.incarnation})")
        if why == "crashes":
            self.crashes += 1
        self.checker.on_crash(slot.proc)
        if self.cpg is not None:
            self.cpg.on_crash(slot.nodeid)
        slot.core = None
        slot.paused_until_ns = -1
        slot.timer_generation += 1
        slot.timer_at_ns = -1

    def _deferred(self, slot: NodeSlot, event: tuple[Any, ...]) -> bool:
        """A paused node handles nothing until it resumes: requeue the event then.

        Requeued events keep their relative order (insertion order breaks the tie)."""
        if slot.paused_until_ns > self.scheduler.now_ns:
            self.scheduler.at(slot.paused_until_ns, event)
            return True
        return False

    def _on_pause(self, event: tuple[Any, ...]) -> None:
        if self.phase != "safety":
            return
        plan = self.plan
        rng = self.fault_rngs["pause"]
        self.scheduler.at(self._jitter("pause", plan.pause_interval_ns), ("pause",))
        now_ns = self.scheduler.now_ns
        up = [slot for slot in self.slots.values() if slot.core is not None and slot.paused_until_ns <= now_ns]
        if not up:
            return
        slot = up[rng.randrange(len(up))]
        duration_ns = 1 + rng.randrange(plan.pause_duration_ns)
        slot.paused_until_ns = now_ns + duration_ns
        self._note(f"n{slot.nodeid} pauses for {duration_ns / NS_PER_MS:.0f}ms")

    def _on_leave(self, event: tuple[Any, ...]) -> None:
        if self.phase != "safety":
            return
        plan = self.plan
        rng = self.fault_rngs["leave"]
        self.scheduler.at(self._jitter("leave", plan.leave_interval_ns), ("leave",))
        now_ns = self.scheduler.now_ns
        up = [slot for slot in self.slots.values() if slot.core is not None and slot.paused_until_ns <= now_ns]
        if len(up) <= 1:
            return
        slot = up[rng.randrange(len(up))]
        self._note(f"n{slot.nodeid} leaves gracefully")
        if self.cpg is not None:
            self.cpg.on_crash(slot.nodeid)  # its CPG clients go with it
        slot.core.leave(slot.local_ns(now_ns))
        self._drain(slot)
        # The core is stopped: it keeps nothing worth driving; restart it later.
        self._crash(slot, why="left")
        self.scheduler.after(1 + rng.randrange(2 * self.timers.token_ns), ("restart", slot.nodeid, False))

    def _on_partition(self, event: tuple[Any, ...]) -> None:
        if self.phase != "safety":
            return
        plan = self.plan
        rng = self.fault_rngs["partition"]
        self.scheduler.at(self._jitter("partition", plan.partition_interval_ns), ("partition",))
        nodes = list(self.nodeids)
        rng.shuffle(nodes)
        split = 1 + rng.randrange(len(nodes) - 1) if len(nodes) > 1 else 1
        side_a, side_b = sorted(nodes[:split]), sorted(nodes[split:])
        links = [(a, b) for a in side_a for b in side_b] + [(b, a) for a in side_a for b in side_b]
        self._cut(links, f"partition {side_a} | {side_b}", 1 + rng.randrange(plan.partition_duration_ns))

    def _on_asym(self, event: tuple[Any, ...]) -> None:
        if self.phase != "safety":
            return
        plan = self.plan
        rng = self.fault_rngs["asym"]
        self.scheduler.at(self._jitter("asym", plan.asym_interval_ns), ("asym",))
        source = self.nodeids[rng.randrange(len(self.nodeids))]
        others = [node for node in self.nodeids if node != source]
        if not others:
            return
        if rng.random() < 0.5:
            links = [(source, others[rng.randrange(len(others))])]
        else:
            links = [(source, other) for other in others]
        self._cut(links, "one-way cut " + " ".join(f"{a}->{b}" for a, b in links), 1 + rng.randrange(plan.asym_duration_ns))

    def _cut(self, links: list[tuple[int, int]], text: str, duration_ns: int) -> None:
        self._note(f"{text} for {duration_ns / NS_PER_MS:.0f}ms")
        self.network.cut(links)
        self.scheduler.after(duration_ns, ("uncut", links, text))

    def _on_uncut(self, event: tuple[Any, ...]) -> None:
        if self.phase != "safety":
            return
        _, links, text = event
        self._note(f"heal {text}")
        self.network.uncut(links)

    def _on_drop(self, why: str, source: int, destination: int, packet: bytes) -> None:
        self.digest.update(b"x%d>%d;" % (source, destination))

    # -- phases ------------------------------------------------------------------------

    def _on_heal(self, event: tuple[Any, ...]) -> None:
        self.phase = "liveness"
        self._note("liveness phase: network healed, faults off, crashed nodes restart")
        self.network.heal_all()
        self.network.set_plan(FaultPlan())
        # A pause that is still running ends on its own; the bound starts then.
        pause_end_ns = max(slot.paused_until_ns for slot in self.slots.values())
        if pause_end_ns > self.scheduler.now_ns:
            self.converge_deadline_ns = pause_end_ns + convergence_bound_ns(self.timers)
            self.scheduler.at(self.converge_deadline_ns, ("deadline",))
        for slot in self.slots.values():
            # A pause still running ends at its time: its backlog is already queued.
            if slot.core is None:
                self.scheduler.after(0, ("restart", slot.nodeid, False))

    def _single_ring(self) -> tuple[int, int] | None:
        """The ring id when every node is OPERATIONAL in one ring of all nodes and
        its application has seen that configuration; None otherwise."""
        first = self.slots[self.nodeids[0]]
        if first.core is None:
            return None
        ring = tuple(first.core.ring_id)
        for slot in self.slots.values():
            core = slot.core
            if slot.paused_until_ns > self.scheduler.now_ns:
                return None
            if core is None or core.state != self.api.state_operational or tuple(core.ring_id) != ring:
                return None
            if tuple(core.members) != self.nodeids:
                return None
            seen = self.checker.procs[slot.proc].regular
            if seen is None or seen[0][:2] != ring:
                return None
        return (int(ring[0]), int(ring[1]))

    def _check_converged(self) -> None:
        ring = self._single_ring()
        if ring is None:
            return
        self.converged_at_ns = self.scheduler.now_ns
        self.converged_ring = ring
        self.workload_on = False
        self._note(f"converged: ring {ring} with all {len(self.nodeids)} nodes")
        self.end_deadline_ns = self.scheduler.now_ns + drain_bound_ns(self.timers) + convergence_bound_ns(self.timers)
        self.scheduler.after(drain_bound_ns(self.timers), ("end",))

    def _on_deadline(self, event: tuple[Any, ...]) -> None:
        if self.converged_at_ns >= 0 or self.scheduler.now_ns < self.converge_deadline_ns:
            return
        # A packet the core could not decode is the more precise diagnosis.
        for slot in self.slots.values():
            if slot.core is not None:
                self._check_wire(slot)
        states = "; ".join(
            f"n{slot.nodeid}: " + ("down" if slot.core is None else f"state {slot.core.state} ring {tuple(slot.core.ring_id)} members {tuple(slot.core.members)}")
            for slot in self.slots.values()
        )
        bound_ms = convergence_bound_ns(self.timers) / NS_PER_MS
        raise Violation(
            "liveness", list(self.nodeids),
            f"no single ring of all nodes within {bound_ms:.0f}ms after the heal (or after the last pause ended) "
            f"(bound = 2*token + 3*consensus + merge + 20*join); {states}",
        )

    def _on_end(self, event: tuple[Any, ...]) -> None:
        for slot in self.slots.values():
            self._check_wire(slot)
        """Final checks, once the queues are empty and all nodes are in one ring.

        Packets still in flight from the fault phase (a late JOIN, say) may
        legitimately trigger one more membership round after convergence; the
        run then waits for the ring to settle again, up to another bound."""
        busy = [slot.nodeid for slot in self.slots.values() if slot.core.send_queue_len]
        ring = self._single_ring()
        if self.cpg is not None and not self.cpg.settled():
            busy = busy or list(self.nodeids)
        if busy or ring is None:
            if self.scheduler.now_ns < self.end_deadline_ns:
                self.scheduler.after(self.timers.token_ns // 4, ("end",))
                return
            if busy:
                raise Violation("liveness", busy, f"send queues not empty {(self.scheduler.now_ns - self.converged_at_ns) / NS_PER_MS:.0f}ms after convergence")
            raise Violation("membership-agreement", list(self.nodeids), f"no single ring of all nodes {(self.scheduler.now_ns - self.converged_at_ns) / NS_PER_MS:.0f}ms after first converging to {self.converged_ring}")
        if ring != self.converged_ring:
            self._note(f"settled again in ring {ring} after converging to {self.converged_ring}")
            self.rings_after_converge = ring[1] - self.converged_ring[1]
        for slot in self.slots.values():
            self._check_wire(slot)
        self.checker.check_final([slot.proc for slot in self.slots.values()])
        if self.cpg is not None:
            self.cpg.check_final()
        self.finished = True

    # -- reporting ----------------------------------------------------------------------

    def _note(self, text: str) -> None:
        line = (self.scheduler.now_ns, text)
        self.trace.append(line)
        if self.options.verbose:
            print(f"{self.scheduler.now_ns / NS_PER_MS:12.3f}ms  {text}")

    def _result(self, violation: Violation | None, wall_s: float) -> RunResult:
        report = ""
        if violation is not None:
            report = self._report(violation)
        rings = {key for key in self.checker.ring_members}
        return RunResult(
            options=self.options, ok=violation is None, violation=violation, report=report,
            digest=self.digest.hexdigest(), plan=self.plan, submitted=self.submitted,
            backpressure=self.backpressure, delivered=self.checker.deliveries,
            configs=self.checker.configs, rings=len(rings), crashes=self.crashes,
            events=self.events,
            converge_ns=self.converged_at_ns - self.safety_end_ns if self.converged_at_ns >= 0 else -1,
            sim_ns=self.scheduler.now_ns, wall_s=wall_s,
            cpg_stats=self.cpg.summary() if self.cpg is not None else {},
            stats={"sent": self.network.stats.sent, "dropped_cut": self.network.stats.dropped_cut,
                   "dropped_loss": self.network.stats.dropped_loss, "duplicated": self.network.stats.duplicated},
        )

    def _report(self, violation: Violation) -> str:
        lines = [
            f"VIOLATION [{violation.checker}] nodes {violation.nodes} at t={self.scheduler.now_ns / NS_PER_MS:.3f}ms ({self.phase} phase)",
            f"  {violation.detail}",
            f"  faults: {self.plan.describe()}; cut links now: {self.network.cut_links()}",
            f"  processes: {', '.join(proc_name(slot.proc) + ('' if slot.core else ' (down)') for slot in self.slots.values())}",
            f"trace excerpt (membership, faults, and the last deliveries at nodes {violation.nodes}):",
        ]
        for time_ns, entry in self._trace_excerpt(violation.nodes):
            lines.append(f"  {time_ns / NS_PER_MS:12.3f}ms  {_format_entry(entry)}")
        lines.append(f"last {PACKET_TRACE_KEEP} packets received:")
        for time_ns, source, destination, head in self.packet_trace:
            lines.append(f"  {time_ns / NS_PER_MS:12.3f}ms  n{source} -> n{destination} {describe_packet(head)}")
        lines.append(f"replay: {self.options.replay_command()} -v")
        return "\n".join(lines)


    def _trace_excerpt(self, nodes: list[int]) -> list[tuple[int, str | tuple[Any, ...]]]:
        """The last events that concern `nodes` (all nodes when empty), plus faults
        and phase changes, and the last few deliveries at those nodes."""
        wanted = set(nodes) if nodes else set(self.nodeids)
        prefixes = tuple(f"n{node} " for node in sorted(wanted))

        def relevant(entry: str | tuple[Any, ...]) -> bool:
            if isinstance(entry, tuple):
                return int(entry[1]) in wanted
            return entry.startswith(prefixes) or not (entry[:1] == "n" and entry[1:2].isdigit())

        events = [item for item in self.trace if relevant(item[1])][-TRACE_SHOW:]
        deliveries = [item for item in self.delivery_trace if relevant(item[1])][-TRACE_DELIVERIES_SHOW:]
        return sorted(events + deliveries, key=lambda item: item[0])


def _format_entry(entry: str | tuple[Any, ...]) -> str:
    if isinstance(entry, str):
        return entry
    _, nodeid, sender, head = entry
    message = parse_payload(head)
    name = f"m{message}" if message is not None else repr(head)
    return f"n{nodeid} delivers {name} from n{sender}"


def run_seed(options: SimOptions, api: CoreApi | None = None) -> RunResult:
    return Simulation(options, api).run()
