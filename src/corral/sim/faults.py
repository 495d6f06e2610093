"""Swarm testing: each seed chooses which fault classes are on and how hard.

`FaultPlan.choose(seed, allowed)` draws, from a generator derived from the seed,
an on/off switch per allowed fault class and an intensity for each class that
is on. At least one allowed class is always on, so "faults on" means it.

Fault classes (names used by `--faults`):

- delay: one-way delay gets a large exponential tail (mean up to token/10);
- loss: each packet copy is dropped with a probability (0.1 % to 10 %);
- dup: each packet is duplicated with a probability (0.1 % to 5 %);
- reorder: links stop being FIFO and get an independent jitter per packet;
- partition: the nodes are split into two groups for a while, then healed;
- asym: one directed link (or all of one node's outgoing links) is cut one way;
- crash: a node stops (state lost) and restarts later with its ring seq kept;
- disklost: as crash, but the persisted ring seq is lost too;
- pause: a node stops processing for a while (like SIGSTOP), then handles the
  backlog of packets and timers at once;
- leave: a node leaves gracefully (`TotemCore.leave`) and restarts later;
- drift: every node's clock has its own rate (up to +-5 %) and a large random
  offset, for the whole run (it is hardware, not a network fault).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from corral.sim.rng import derive_rng

FAULT_NAMES: tuple[str, ...] = (
    "delay", "loss", "dup", "reorder", "partition", "asym", "crash", "disklost", "pause", "leave",
    "drift",
)

NS_PER_MS = 1_000_000


def parse_faults(text: str) -> tuple[str, ...]:
    """'all', 'none' or a comma list of FAULT_NAMES, returned in canonical order."""
    text = text.strip()
    if text == "all":
        return FAULT_NAMES
    if text in ("none", ""):
        return ()
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FAULT_NAMES]
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULT_NAMES)}")
    return tuple(name for name in FAULT_NAMES if name in names)


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Fault switches and intensities for one run (all zero means a clean network)."""

    delay_mean_ns: int = 0
    loss_probability: float = 0.0
    dup_probability: float = 0.0
    reorder_jitter_ns: int = 0
    partition_interval_ns: int = 0
    partition_duration_ns: int = 0
    asym_interval_ns: int = 0
    asym_duration_ns: int = 0
    crash_interval_ns: int = 0
    crash_downtime_ns: int = 0
    disk_lost_probability: float = 0.0
    pause_interval_ns: int = 0
    pause_duration_ns: int = 0
    leave_interval_ns: int = 0
    clock_drift_ppm: int = 0

    @classmethod
    def choose(cls, seed: int, allowed: tuple[str, ...], token_ns: int) -> FaultPlan:
        # One generator per class, so adding a class (or drawing more for one)
        # never changes what an existing seed chooses for the others.
        rngs = {name: derive_rng(seed, f"swarm/{name}") for name in FAULT_NAMES}
        on = [name for name in allowed if rngs[name].random() < 0.5]
        if allowed and not on:
            on = [allowed[derive_rng(seed, "swarm/fallback").randrange(len(allowed))]]
        values: dict[str, float | int] = {}
        if "delay" in on:
            values["delay_mean_ns"] = rngs["delay"].randint(NS_PER_MS // 5, max(NS_PER_MS, token_ns // 10))
        if "loss" in on:
            values["loss_probability"] = rngs["loss"].choice((0.001, 0.01, 0.03, 0.1))
        if "dup" in on:
            values["dup_probability"] = rngs["dup"].choice((0.001, 0.01, 0.05))
        if "reorder" in on:
            values["reorder_jitter_ns"] = rngs["reorder"].randint(NS_PER_MS // 10, 5 * NS_PER_MS)
        if "partition" in on:
            values["partition_interval_ns"] = rngs["partition"].randint(token_ns, 4 * token_ns)
            values["partition_duration_ns"] = rngs["partition"].randint(token_ns // 4, 3 * token_ns)
        if "asym" in on:
            values["asym_interval_ns"] = rngs["asym"].randint(token_ns, 4 * token_ns)
            values["asym_duration_ns"] = rngs["asym"].randint(token_ns // 4, 3 * token_ns)
        if "crash" in on or "disklost" in on:
            values["crash_interval_ns"] = rngs["crash"].randint(token_ns, 5 * token_ns)
            values["crash_downtime_ns"] = rngs["crash"].randint(token_ns // 10, 3 * token_ns)
            values["disk_lost_probability"] = (
                0.0 if "disklost" not in on else 1.0 if "crash" not in on else 0.5
            )
        if "pause" in on:
            values["pause_interval_ns"] = rngs["pause"].randint(token_ns, 5 * token_ns)
            values["pause_duration_ns"] = rngs["pause"].randint(token_ns // 10, 2 * token_ns)
        if "leave" in on:
            values["leave_interval_ns"] = rngs["leave"].randint(2 * token_ns, 8 * token_ns)
        if "drift" in on:
            values["clock_drift_ppm"] = rngs["drift"].choice((100, 1_000, 10_000, 50_000))
        return cls(**values)  # type: ignore[arg-type]

    def active(self) -> list[str]:
        """Names of the fault classes that are on, for the summary line."""
        names = []
        if self.delay_mean_ns:
            names.append(f"delay(mean={self.delay_mean_ns / NS_PER_MS:.1f}ms)")
        if self.loss_probability:
            names.append(f"loss({self.loss_probability:.1%})")
        if self.dup_probability:
            names.append(f"dup({self.dup_probability:.1%})")
        if self.reorder_jitter_ns:
            names.append(f"reorder(jitter={self.reorder_jitter_ns / NS_PER_MS:.1f}ms)")
        if self.partition_interval_ns:
            names.append("partition")
        if self.asym_interval_ns:
            names.append("asym")
        if self.crash_interval_ns:
            if self.disk_lost_probability < 1.0:
                names.append("crash")
            if self.disk_lost_probability > 0.0:
                names.append("disklost")
        if self.pause_interval_ns:
            names.append("pause")
        if self.leave_interval_ns:
            names.append("leave")
        if self.clock_drift_ppm:
            names.append(f"drift(+-{self.clock_drift_ppm / 10_000:g}%)")
        return names

    def describe(self) -> str:
        return ", ".join(self.active()) or "none"

    def as_dict(self) -> dict[str, float | int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
