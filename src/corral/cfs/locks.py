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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from corral.cfs.rules import LOCK_EXPIRY_NS
from corral.cfs.state import Effect, LockChanged, UnlockRequested


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

    def is_expired(self, path: str, checksum: int, now_ns: int) -> bool:
        """Judge an unlock request; an incarnation seen for the first time
        starts its window now."""
        seen = self._seen.get(path)
        if seen is None or seen.checksum != checksum:
            self.note(path, checksum, now_ns)
            return False
        return now_ns - seen.first_seen_ns > self.expiry_ns

    def follow(self, effects: list[Effect], now_ns: int) -> list[UnlockRequested]:
        """Feed one outcome's effects; returns the unlock requests to judge."""
        requests = []
        for effect in effects:
            if isinstance(effect, LockChanged):
                self.note(effect.path, effect.checksum, now_ns)
            else:
                requests.append(effect)
        return requests
