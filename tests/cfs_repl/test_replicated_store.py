"""ReplicatedStore: the resync marker and the term survive a reopen (they
are files next to the store directory, written durably), a finished resync
removes the marker, and a garbage term file is a clear error."""

from __future__ import annotations

import pathlib

import pytest

from corral.cfs.replication import ReplicatedStore
from corral.cfs.store import Store
from corral.errors import UsageError


def test_marker_and_term_survive_reopen(tmp_path: pathlib.Path) -> None:
    with Store(tmp_path / "cfs") as store:
        replicated = ReplicatedStore(store)
        assert not replicated.dirty and replicated.term == 0
        replicated.set_dirty(True)
        replicated.set_term(7)
        assert (tmp_path / "cfs.resync").exists()
    with Store(tmp_path / "cfs") as store:
        replicated = ReplicatedStore(store)
        assert replicated.dirty and replicated.term == 7
        replicated.set_dirty(False)
        assert not (tmp_path / "cfs.resync").exists()
    with Store(tmp_path / "cfs") as store:
        assert not ReplicatedStore(store).dirty


def test_garbage_term_is_an_error(tmp_path: pathlib.Path) -> None:
    (tmp_path / "cfs.term").write_text("seven\n")
    with Store(tmp_path / "cfs") as store, pytest.raises(UsageError, match=r"cfs\.term"):
        ReplicatedStore(store)
