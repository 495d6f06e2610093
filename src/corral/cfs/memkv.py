"""A dict-backed key-value store with the store's read interface.

Tests and the deterministic simulator apply CfsState mutations to it instead
of RocksDB; it behaves like one atomic batch per `apply_batch` call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from corral.cfs import records
from corral.cfs.state import CfsState, Mutation


class MemoryKV(dict[bytes, bytes]):
    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self.get(key) for key in keys]

    def apply_batch(self, mutations: Iterable[Mutation]) -> None:
        for key, value in mutations:
            if value is None:
                self.pop(key, None)
            else:
                self[key] = value

    def load_state(self, state: CfsState) -> list[str]:
        """Rebuild `state` (fresh) from the stored records, as the store does."""
        head_value = self.get(records.HEAD_KEY)
        head = records.Head.unpack(head_value) if head_value is not None else None
        recs = [
            records.unpack_meta(records.ino_of_meta_key(key), value)
            for key, value in sorted(self.items())
            if key[:1] == records.META_PREFIX
        ]
        return state.load(head, recs)
