"""Lock expiry bookkeeping (sans-I/O; the caller passes its own monotonic now).

A lock is a directory priv/lock/<name>. Only one node judges expiry (the
lowest nodeid in the membership), by its own clock: it remembers when it
first saw each lock incarnation (identified by `state.lock_checksum`). When
an unlock request arrives for an incarnation it has known for longer than
LOCK_EXPIRY_NS, that node multicasts UNLOCK with the checksum, and every node
removes the lock if it is still that incarnation. No clocks are compared
across nodes, so clock skew cannot expire a lock early.

The table is bounded: it tracks at most `locks_max` incarnations; beyond that
the oldest-seen entry is dropped (which can only delay an expiry).

The expiry is a cluster-wide setting, not a constant: `ExpirySetting` derives
it from the replicated `datacenter.cfg` (the `ha-timing` lock timeout that the
HA daemon validates against its watchdog), re-reading the file whenever its
version changes. Only the judging node uses it, at the moment it judges, so
every node sees the same rule even while the value changes: there is one
judge per quorate membership and the file is the same tree everywhere. The
HA daemon computes the value with the same function (`expiry_from_config`),
so the two cannot disagree. Invalid or out-of-range values keep the default
(120 s, the reference's fixed expiry) and are reported once per file version.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from corral.cfs._tree import Tree
from corral.cfs.rules import (
    LOCK_EXPIRY_CONFIG,
    LOCK_EXPIRY_MAX_NS,
    LOCK_EXPIRY_MIN_NS,
    LOCK_EXPIRY_NS,
)
from corral.cfs.state import Effect, LockChanged, UnlockRequested
from corral.errors import ConfigError
from corral.ha.logic.config import parse_datacenter
from corral.ha.logic.settings import timings_from_mapping

_NS_PER_S = 1_000_000_000


def expiry_from_config(data: bytes | None) -> tuple[int, str | None]:
    """(expiry_ns, problem) for the content of datacenter.cfg (None: no file).

    The value is `ha-timing`'s lock_timeout_s after the profile and overrides,
    exactly as corral-ha computes it; any problem keeps the default."""
    if data is None:
        return LOCK_EXPIRY_NS, None
    try:
        text = data.decode("utf-8")
        timings = timings_from_mapping(dict(parse_datacenter(text).timings))
    except (UnicodeDecodeError, ConfigError) as error:
        return LOCK_EXPIRY_NS, f"lock expiry: datacenter.cfg: {error}; keeping 120 s"
    expiry_ns = timings.lock_timeout_s * _NS_PER_S
    if not LOCK_EXPIRY_MIN_NS <= expiry_ns <= LOCK_EXPIRY_MAX_NS:
        return LOCK_EXPIRY_NS, (
            f"lock expiry: ha-timing lock_timeout_s={timings.lock_timeout_s} is outside "
            f"{LOCK_EXPIRY_MIN_NS // _NS_PER_S}..{LOCK_EXPIRY_MAX_NS // _NS_PER_S} s; keeping 120 s")
    return expiry_ns, None


class ExpirySetting:
    """The current expiry, re-derived only when the config file's version changes."""

    def __init__(self) -> None:
        self.expiry_ns = LOCK_EXPIRY_NS
        self._version: int | None = None

    def refresh(self, version: int | None, read: Callable[[], bytes]) -> str | None:
        """`version` of the file (None: absent); `read` returns its content.
        Returns a problem to log, once per file version, else None."""
        if version == self._version:
            return None
        self._version = version
        self.expiry_ns, problem = expiry_from_config(None if version is None else read())
        return problem

    def follow(self, tree: Tree, read_file: Callable[[str], bytes]) -> str | None:
        """Refresh from LOCK_EXPIRY_CONFIG as `tree` holds it now (`read_file` reads a
        path's content); the problem to log, as `refresh`."""
        entry = tree.lookup(LOCK_EXPIRY_CONFIG)
        version = None if entry is None or entry.is_dir else entry.version
        return self.refresh(version, lambda: read_file(LOCK_EXPIRY_CONFIG))


@dataclass(slots=True)
class _Seen:
    checksum: int
    first_seen_ns: int


class LockTracker:
    def __init__(self, expiry_ns: int = LOCK_EXPIRY_NS, locks_max: int = 65536) -> None:
        self.expiry_ns = expiry_ns
        self.locks_max = locks_max
        self._seen: dict[str, _Seen] = {}

    def __len__(self) -> int:
        return len(self._seen)

    def note(self, path: str, checksum: int | None, now_ns: int) -> None:
        """A lock was taken/refreshed (checksum) or removed (None)."""
        if checksum is None:
            self._seen.pop(path, None)
            return
        seen = self._seen.get(path)
        if seen is None or seen.checksum != checksum:
            self._seen.pop(path, None)
            if len(self._seen) >= self.locks_max:
                oldest = min(self._seen, key=lambda p: self._seen[p].first_seen_ns)
                del self._seen[oldest]
            self._seen[path] = _Seen(checksum, now_ns)

    def rebuild(self, locks: Mapping[str, int], now_ns: int) -> None:
        """After a load or a resync: keep first-seen times only for locks
        whose checksum did not change; forget locks that are gone."""
        for path in list(self._seen):
            if path not in locks:
                del self._seen[path]
        for path, checksum in locks.items():
            self.note(path, checksum, now_ns)

    def is_expired(self, path: str, checksum: int, now_ns: int,
                   expiry_ns: int | None = None) -> bool:
        """Judge an unlock request (by `expiry_ns`, else the tracker's own);
        an incarnation seen for the first time starts its window now."""
        seen = self._seen.get(path)
        if seen is None or seen.checksum != checksum:
            self.note(path, checksum, now_ns)
            return False
        limit_ns = self.expiry_ns if expiry_ns is None else expiry_ns
        return now_ns - seen.first_seen_ns > limit_ns

    def follow(self, effects: list[Effect], now_ns: int) -> list[UnlockRequested]:
        """Feed one outcome's effects; returns the unlock requests to judge."""
        requests = []
        for effect in effects:
            if isinstance(effect, LockChanged):
                self.note(effect.path, effect.checksum, now_ns)
            else:
                requests.append(effect)
        return requests
