"""Totem timers and limits: names, defaults and formulas as corosync 3.

All user-facing values are milliseconds or counts, as in `corosync.conf`'s
`totem { }` section. `TotemConfig.timers(n_nodes)` computes the effective
values (in integer nanoseconds, what the sans-I/O core uses) for a nodelist of
`n_nodes` nodes:

- token (effective) = token + (n - 2) * token_coefficient when n >= 3
- token_retransmit = token / (token_retransmits_before_loss_const + 0.2)
- hold = token_retransmit * 0.8 - 10 ms (1000/HZ with HZ = 100)
- consensus = 1.2 * token (must exceed the effective token)

Explicitly set token_retransmit, hold or consensus override the formulas.
Every value is checked against the bounds in `BOUNDS`; a value outside raises
`ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

from corral.errors import ConfigError

NS_PER_MS = 1_000_000

# key: (minimum, maximum). Bounds are inclusive.
BOUNDS: dict[str, tuple[int, int]] = {
    "token": (100, 600_000),
    "token_coefficient": (0, 60_000),
    "token_retransmits_before_loss_const": (1, 100),
    "token_retransmit": (10, 600_000),
    "hold": (1, 600_000),
    "join": (10, 60_000),
    "consensus": (120, 1_200_000),
    "merge": (10, 60_000),
    "downcheck": (10, 60_000),
    "fail_recv_const": (10, 1_000_000),
    "seqno_unchanged_const": (1, 10_000),
    "miss_count_const": (1, 1_000),
    "max_messages": (1, 4_096),
    "window_size": (1, 16_384),
    "netmtu": (576, 65_000),
    "send_join": (0, 10_000),
}

# The sort/retransmit queue of the core holds at most this many frames.
MAX_RING_FRAMES = 16_384
# Largest application message the core accepts (fragmented into netmtu frames).
MAX_MESSAGE_BYTES = 1 << 20 | 1 << 16
# The retransmit list carried in the token holds at most this many entries.
MAX_RTR_ENTRIES = 30
# Members of one ring.
MAX_MEMBERS = 256


@dataclass(frozen=True, slots=True)
class TotemTimers:
    """Effective timer values in nanoseconds and counts, for one nodelist size."""

    token_ns: int
    token_retransmit_ns: int
    hold_ns: int
    join_ns: int
    consensus_ns: int
    merge_ns: int
    downcheck_ns: int
    send_join_ns: int
    token_warning_ns: int
    fail_recv_const: int
    seqno_unchanged_const: int
    miss_count_const: int
    max_messages: int
    window_size: int
    netmtu: int


@dataclass(frozen=True, slots=True)
class TotemConfig:
    """The `totem { }` settings; None means 'computed by the corosync formula'."""

    token: int = 3000
    token_coefficient: int = 650
    token_retransmits_before_loss_const: int = 4
    token_retransmit: int | None = None
    hold: int | None = None
    join: int = 50
    consensus: int | None = None
    merge: int = 200
    downcheck: int = 1000
    send_join: int = 0
    fail_recv_const: int = 2500
    seqno_unchanged_const: int = 30
    miss_count_const: int = 5
    max_messages: int = 17
    window_size: int = 50
    netmtu: int = 1400
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"totem.{f.name}", f"must be an integer, got {value!r}")
            low, high = BOUNDS[f.name]
            if not low <= value <= high:
                raise ConfigError(f"totem.{f.name}", f"{value} is outside [{low}, {high}]")
        if self.max_messages > self.window_size:
            raise ConfigError(
                "totem.max_messages",
                f"{self.max_messages} exceeds window_size {self.window_size}",
            )

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> TotemConfig:
        """Build from `corosync.conf`-style key/values (strings or ints); unknown keys fail."""
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in known:
                raise ConfigError(f"totem.{key}", "unknown option")
            try:
                kwargs[key] = int(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"totem.{key}", f"not an integer: {raw!r}") from None
        return cls(**kwargs)

    def with_changes(self, **changes: Any) -> TotemConfig:
        return replace(self, **changes)

    def effective_token_ms(self, n_nodes: int) -> int:
        if n_nodes >= 3:
            return self.token + (n_nodes - 2) * self.token_coefficient
        return self.token

    def timers(self, n_nodes: int) -> TotemTimers:
        """Effective values for a nodelist of `n_nodes` nodes (checked for consistency)."""
        if n_nodes < 1:
            raise ConfigError("nodelist", "needs at least one node")
        token = self.effective_token_ms(n_nodes)
        retransmit = (
            self.token_retransmit
            if self.token_retransmit is not None
            else token / (self.token_retransmits_before_loss_const + 0.2)
        )
        hold = self.hold if self.hold is not None else max(1.0, retransmit * 0.8 - 10)
        consensus = self.consensus if self.consensus is not None else int(1.2 * token)
        if consensus <= token:
            raise ConfigError(
                "totem.consensus", f"{consensus} must be greater than the token timeout {token}"
            )
        if retransmit >= token:
            raise ConfigError(
                "totem.token_retransmit", f"{retransmit} must be less than the token timeout {token}"
            )
        if hold >= retransmit:
            raise ConfigError("totem.hold", f"{hold} must be less than token_retransmit {retransmit}")
        return TotemTimers(
            token_ns=int(token * NS_PER_MS),
            token_retransmit_ns=int(retransmit * NS_PER_MS),
            hold_ns=int(hold * NS_PER_MS),
            join_ns=self.join * NS_PER_MS,
            consensus_ns=int(consensus * NS_PER_MS),
            merge_ns=self.merge * NS_PER_MS,
            downcheck_ns=self.downcheck * NS_PER_MS,
            send_join_ns=self.send_join * NS_PER_MS,
            token_warning_ns=int(token * 0.75 * NS_PER_MS),
            fail_recv_const=self.fail_recv_const,
            seqno_unchanged_const=self.seqno_unchanged_const,
            miss_count_const=self.miss_count_const,
            max_messages=self.max_messages,
            window_size=self.window_size,
            netmtu=self.netmtu,
        )
