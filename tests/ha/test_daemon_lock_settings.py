"""corral-ha and the filesystem's lock expiry: the daemon's lock timeout is the expiry the
filesystem derives from the same datacenter.cfg (corral.cfs.locks.expiry_from_config), a
`--profile` that is not in the file falls back to the filesystem's value, and an expiry that
breaks the safety rule with the daemon's watchdog is refused (exit 2 at start). The runtime
guard: while the filesystem's expiry is shorter than the published fence time of a lock's
holder, a takeover is requested only after this process saw the lock unchanged that long."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from corral.errors import ConfigError
from corral.ha.daemon.fsenv import Tree
from corral.ha.daemon.main import effective_timings, fence_time_s, load_timings
from corral.ha.logic.settings import FAST, REFERENCE

S = 1_000_000_000


def _tree(tmp_path: Path, datacenter: str | None) -> Tree:
    (tmp_path / ".version").write_text("{}")   # looks like the Corral filesystem
    if datacenter is not None:
        (tmp_path / "datacenter.cfg").write_text(datacenter)
    return Tree(tmp_path)


def test_same_file_same_value(tmp_path: Path) -> None:
    tree = _tree(tmp_path, "ha-timing: profile=fast\n")
    assert tree.fs_lock_expiry_s() == 14
    timings = effective_timings(load_timings(tmp_path, None), tree)
    assert timings == FAST


def test_profile_only_on_the_command_line_uses_the_filesystem_value(tmp_path: Path) -> None:
    tree = _tree(tmp_path, None)
    timings = effective_timings(load_timings(tmp_path, "fast"), tree)
    assert timings.lock_timeout_s == 120 and timings.watchdog_timeout_s == 6


def test_filesystem_expiry_unsafe_for_the_watchdog_is_refused(tmp_path: Path) -> None:
    # valid for HA (700 >= 600 + 10 + 10) but beyond the filesystem's 600 s: it keeps 120 s
    tree = _tree(tmp_path, "ha-timing: lock_timeout_s=700,watchdog_timeout_s=600\n")
    timings = load_timings(tmp_path, None)
    assert timings.lock_timeout_s == 700
    with pytest.raises(ConfigError, match="unsafe"):
        effective_timings(timings, tree)


def test_plain_directory_keeps_the_daemons_value(tmp_path: Path) -> None:
    (tmp_path / "datacenter.cfg").write_text("ha-timing: profile=fast\n")
    assert effective_timings(REFERENCE, Tree(tmp_path)) == REFERENCE


def test_takeover_waits_for_the_holders_fence_time(tmp_path: Path) -> None:
    tree = _tree(tmp_path, "ha-timing: profile=fast\n")          # expiry 14 s
    lock = tree.lock_path("ha_agent_n2_lock")
    lock.mkdir(parents=True)
    (tmp_path / "nodes" / "n2").mkdir(parents=True)
    assert tree.publish_fence_time("n2", fence_time_s(FAST))      # 14 s: safe
    assert tree.takeover_allowed("ha_agent_n2_lock", now_ns=0)
    assert tree.publish_fence_time("n2", fence_time_s(REFERENCE))  # still on 80 s
    assert json.loads((tmp_path / "nodes/n2/ha_watchdog").read_text())["fence_after_s"] == 80
    assert not tree.takeover_allowed("ha_agent_n2_lock", now_ns=0)  # starts watching
    assert not tree.takeover_allowed("ha_agent_n2_lock", now_ns=79 * S)
    os.utime(lock, (1000, 1000))                                   # holder renewed it
    assert not tree.takeover_allowed("ha_agent_n2_lock", now_ns=81 * S)
    assert not tree.takeover_allowed("ha_agent_n2_lock", now_ns=160 * S)
    assert tree.takeover_allowed("ha_agent_n2_lock", now_ns=162 * S)


def test_unpublished_holder_counts_with_reference_timings(tmp_path: Path) -> None:
    tree = _tree(tmp_path, "ha-timing: profile=fast\n")
    (tmp_path / "nodes" / "n3").mkdir(parents=True)
    assert tree.holder_fence_time_s("ha_agent_n3_lock") == 80
    assert tree.publish_fence_time("n3", 14)
    assert tree.holder_fence_time_s("ha_manager_lock") == 14
