"""HA timing settings and the safety rule that ties them together.

Safety rule: the master may treat a node as fenced once it can take that node's agent lock,
which happens `lock_timeout_s` after the node last renewed it. The node stops feeding its
watchdog client at that same renewal; watchdog-mux stops pinging the device
`watchdog_timeout_s` later and the device resets the node `watchdog_device_timeout_s` after
that. So the node is certainly dead before its lock can be taken if

    lock_timeout_s >= watchdog_timeout_s + watchdog_device_timeout_s + safety_margin_s

with a margin that covers clock skew between nodes and scheduling delay of watchdog-mux.
Settings that break it are refused with a ConfigError naming the key.

`fence_delay_from_lock` (fast profile only; the reference counts every fence delay from the
new master's own first sight of the node): a master that never saw a node online in its term
may count that node's fence delay as elapsed once it can take the node's agent lock. Taking
it proves the lock was not renewed for `lock_timeout_s` (>= the fence delay and >= the
watchdog reset time above), judged by the one clock every node already trusts for locks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from corral.errors import ConfigError

NS_PER_S = 1_000_000_000
MIN_SAFETY_MARGIN_S = 5
MIN_ROUND_S = 1
MAX_TIMEOUT_S = 3600


@dataclass(frozen=True)
class HaTimings:
    """All HA timing knobs, in whole seconds (files and logs use seconds)."""

    fence_delay_s: int = 60
    lock_timeout_s: int = 120
    watchdog_timeout_s: int = 60
    watchdog_device_timeout_s: int = 10
    safety_margin_s: int = 10
    crm_round_s: int = 10
    lrm_round_s: int = 10
    # The simulator's round length (the reference simulator uses 20 s for 10 s real rounds).
    sim_round_s: int = 20
    # See the module docstring; off in the reference profile (which it would change).
    fence_delay_from_lock: bool = False

    @property
    def fence_delay_ns(self) -> int:
        return self.fence_delay_s * NS_PER_S

    @property
    def lock_timeout_ns(self) -> int:
        return self.lock_timeout_s * NS_PER_S

    @property
    def watchdog_timeout_ns(self) -> int:
        return self.watchdog_timeout_s * NS_PER_S

    @property
    def watchdog_reset_after_ns(self) -> int:
        """Worst case from the last feed until the device resets the node."""
        return (self.watchdog_timeout_s + self.watchdog_device_timeout_s) * NS_PER_S

    def validate(self) -> HaTimings:
        """Return self, or raise ConfigError naming the first key that is out of bounds."""
        for key in ("fence_delay_s", "lock_timeout_s", "watchdog_timeout_s",
                    "watchdog_device_timeout_s", "crm_round_s", "lrm_round_s", "sim_round_s"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(key, f"must be an integer number of seconds, got {value!r}")
            if not MIN_ROUND_S <= value <= MAX_TIMEOUT_S:
                raise ConfigError(key, f"must be between {MIN_ROUND_S} and {MAX_TIMEOUT_S} s")
        if self.safety_margin_s < MIN_SAFETY_MARGIN_S:
            raise ConfigError("safety_margin_s", f"must be at least {MIN_SAFETY_MARGIN_S} s")
        needed_s = self.watchdog_timeout_s + self.watchdog_device_timeout_s + self.safety_margin_s
        if self.lock_timeout_s < needed_s:
            raise ConfigError(
                "lock_timeout_s",
                f"{self.lock_timeout_s} s is unsafe: it must be at least watchdog_timeout_s "
                f"({self.watchdog_timeout_s}) + watchdog_device_timeout_s "
                f"({self.watchdog_device_timeout_s}) + safety_margin_s ({self.safety_margin_s})"
                f" = {needed_s} s, or a partitioned node could still run its guests when they"
                " are recovered elsewhere",
            )
        if self.watchdog_timeout_s <= self.lrm_round_s:
            raise ConfigError(
                "watchdog_timeout_s",
                f"must exceed lrm_round_s ({self.lrm_round_s} s), or a healthy LRM gets reset",
            )
        if self.sim_round_s > self.watchdog_timeout_s + self.watchdog_device_timeout_s:
            raise ConfigError("sim_round_s", "must not exceed the watchdog reset time, or "
                                             "every simulated daemon is reset between rounds")
        if self.lock_timeout_s <= 2 * max(self.crm_round_s, self.lrm_round_s):
            raise ConfigError("lock_timeout_s", "must exceed two daemon rounds")
        if self.fence_delay_from_lock and self.lock_timeout_s < self.fence_delay_s:
            raise ConfigError("fence_delay_s", "must not exceed lock_timeout_s when an agent "
                                               "lock counts as the fence delay elapsed")
        return self


REFERENCE = HaTimings().validate()

# Faster profile: rounds of 2 s, fence delay 5 s, watchdog 6 s + 2 s device, lock 14 s.
# Recovery starts at most lock_timeout + one CRM round after the node's last lock renewal,
# i.e. about 16-18 s after failure, and the safety rule holds with a 6 s margin. Also when
# the master died with the node: the new master does not add its own fence delay on top of
# the manager lock's expiry (fence_delay_from_lock).
FAST = HaTimings(
    fence_delay_s=5, lock_timeout_s=14, watchdog_timeout_s=6, watchdog_device_timeout_s=2,
    safety_margin_s=6, crm_round_s=2, lrm_round_s=2, sim_round_s=6,
    fence_delay_from_lock=True,
).validate()

PROFILES = {"reference": REFERENCE, "fast": FAST}

_KEYS = ("fence_delay_s", "lock_timeout_s", "watchdog_timeout_s", "watchdog_device_timeout_s",
         "safety_margin_s", "crm_round_s", "lrm_round_s", "sim_round_s")


def timings_from_mapping(values: dict[str, Any]) -> HaTimings:
    """Build timings from `{"profile": name, <key>: seconds, ...}`; unknown keys are errors."""
    profile_name = values.get("profile", "reference")
    if profile_name not in PROFILES:
        raise ConfigError("profile", f"unknown timing profile {profile_name!r} "
                                     f"(known: {', '.join(sorted(PROFILES))})")
    changes: dict[str, Any] = {}  # int seconds for the keys of _KEYS
    for key, value in values.items():
        if key == "profile":
            continue
        if key not in _KEYS:
            raise ConfigError(key, "unknown HA timing key")
        try:
            changes[key] = int(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"must be an integer number of seconds, got {value!r}") from None
    return replace(PROFILES[profile_name], **changes).validate()
