"""The cluster-wide lock expiry setting: derived from datacenter.cfg's `ha-timing`
exactly as corral-ha derives its lock timeout (profile, override, bounds 10..600 s,
anything invalid keeps 120 s and is reported once per file version); the judging member
of a replicated cluster and the local-mode backend both use the value the tree holds when
they judge, including after a runtime change; injected clocks only."""

from __future__ import annotations

import asyncio
import errno
import pathlib

from cfs_repl.bus import Bus
from corral.cfs.local import LocalBackend
from corral.cfs.locks import ExpirySetting, LockTracker, expiry_from_config
from corral.cfs.ops import Op
from corral.cfs.rules import LOCK_EXPIRY_NS
from corral.cfs.store import Store

T = 1795720870
S = 1_000_000_000
LOCK = "priv/lock/x"


def test_expiry_from_config_values() -> None:
    assert expiry_from_config(None) == (LOCK_EXPIRY_NS, None)
    assert expiry_from_config(b"keyboard: en-us\n") == (LOCK_EXPIRY_NS, None)
    assert expiry_from_config(b"ha-timing: profile=fast\n") == (14 * S, None)
    value = b"ha-timing: profile=fast,lock_timeout_s=40\n"
    assert expiry_from_config(value) == (40 * S, None)


def test_invalid_and_out_of_range_keep_default() -> None:
    for text in (b"ha-timing: lock_timeout_s=abc\n",
                 b"ha-timing: profile=fast,lock_timeout_s=9\n",   # unsafe for the watchdog
                 b"ha-timing: profile=nope\n",
                 b"ha-timing: lock_timeout_s=700,watchdog_timeout_s=600\n",  # > 600 s bound
                 b"\xff\xfe"):
        expiry_ns, problem = expiry_from_config(text)
        assert expiry_ns == LOCK_EXPIRY_NS, text
        assert problem is not None and "keeping 120 s" in problem, text


def test_setting_rereads_only_on_version_change_and_reports_once() -> None:
    setting = ExpirySetting()
    reads: list[int] = []
    content = {1: b"ha-timing: profile=fast\n", 2: b"ha-timing: lock_timeout_s=x\n"}

    def reader(version: int) -> bytes:
        reads.append(version)
        return content[version]

    assert setting.refresh(1, lambda: reader(1)) is None
    assert setting.expiry_ns == 14 * S
    assert setting.refresh(1, lambda: reader(1)) is None
    assert reads == [1]
    assert setting.refresh(2, lambda: reader(2)) is not None
    assert setting.refresh(2, lambda: reader(2)) is None   # logged once
    assert setting.expiry_ns == LOCK_EXPIRY_NS
    assert setting.refresh(None, lambda: b"") is None      # file removed: default
    assert setting.expiry_ns == LOCK_EXPIRY_NS


def test_tracker_uses_the_expiry_passed_when_judging() -> None:
    tracker = LockTracker()
    tracker.note(LOCK, 7, now_ns=0)
    assert tracker.is_expired(LOCK, 7, now_ns=15 * S, expiry_ns=14 * S)
    assert not tracker.is_expired(LOCK, 7, now_ns=15 * S)   # default 120 s


def _formed() -> Bus:
    bus = Bus([1, 2, 3])
    bus.configure((1, 2, 3))
    bus.deliver_all()
    return bus


def _write(bus: Bus, nodeid: int, path: str, data: bytes) -> None:
    assert bus.do(nodeid, Op.create(path, T)) in (0, errno.EEXIST)
    assert bus.do(nodeid, Op.truncate(path, 0, T)) == 0
    assert bus.do(nodeid, Op.write(path, 0, data, T)) == 0


def _take_lock(bus: Bus) -> None:
    for path in ("priv", "priv/lock", LOCK):
        assert bus.do(2, Op.mkdir(path, T)) == 0


def _unlocked(bus: Bus) -> bool:
    return all(node.store.state.tree.lookup(LOCK) is None for node in bus.nodes.values())


def test_replicated_cluster_expires_after_the_configured_time() -> None:
    bus = _formed()
    _write(bus, 2, "datacenter.cfg", b"ha-timing: profile=fast\n")
    _take_lock(bus)
    assert bus.do(3, Op.set_mtime(LOCK, 0)) == errno.EACCES   # window starts
    bus.advance(13 * S)
    assert bus.do(3, Op.set_mtime(LOCK, 0)) == errno.EACCES
    assert not _unlocked(bus)
    bus.advance(2 * S)                                          # 15 s > 14 s
    assert bus.do(3, Op.set_mtime(LOCK, 0)) == errno.EACCES
    assert bus.nodes[1].core.counters["unlocks_sent"] == 1
    assert _unlocked(bus)


def test_replicated_runtime_change_and_invalid_value() -> None:
    bus = _formed()
    _take_lock(bus)
    assert bus.do(3, Op.set_mtime(LOCK, 0)) == errno.EACCES
    bus.advance(30 * S)
    assert bus.do(3, Op.set_mtime(LOCK, 0)) == errno.EACCES
    assert not _unlocked(bus)                                   # default: 120 s
    _write(bus, 3, "datacenter.cfg", b"ha-timing: profile=fast,lock_timeout_s=20\n")
    assert bus.do(3, Op.set_mtime(LOCK, 0)) == errno.EACCES
    assert _unlocked(bus)                                       # 30 s > 20 s: judged now
    assert bus.do(2, Op.mkdir(LOCK, T)) == 0                    # a new incarnation
    _write(bus, 3, "datacenter.cfg", b"ha-timing: lock_timeout_s=oops\n")
    assert bus.do(3, Op.set_mtime(LOCK, 0)) == errno.EACCES
    warnings = [line for line in bus.nodes[1].logs if "keeping 120 s" in str(line)]
    bus.advance(60 * S)
    assert bus.do(3, Op.set_mtime(LOCK, 0)) == errno.EACCES
    assert not _unlocked(bus)                                   # invalid -> 120 s again
    assert len(warnings) == 1
    assert len([line for line in bus.nodes[1].logs if "keeping 120 s" in str(line)]) == 1
    bus.advance(61 * S)
    assert bus.do(3, Op.set_mtime(LOCK, 0)) == errno.EACCES
    assert _unlocked(bus)


def test_local_backend_follows_the_setting(tmp_path: pathlib.Path) -> None:
    now = [0]
    with Store(tmp_path / "db") as store:
        backend = LocalBackend(store, "n1", monotonic_ns=lambda: now[0])

        def do(op: Op) -> int:
            return asyncio.run(backend.submit(op))

        assert do(Op.create("datacenter.cfg", T)) == 0
        text = b"ha-timing: profile=fast\n"
        assert do(Op.write("datacenter.cfg", 0, text, T)) == 0
        for path in ("priv", "priv/lock", LOCK):
            assert do(Op.mkdir(path, T)) == 0
        assert do(Op.set_mtime(LOCK, 0)) == errno.EACCES
        now[0] = 13 * S
        assert do(Op.set_mtime(LOCK, 0)) == errno.EACCES
        assert store.state.tree.lookup(LOCK) is not None
        now[0] = 15 * S
        assert do(Op.set_mtime(LOCK, 0)) == errno.EACCES
        assert store.state.tree.lookup(LOCK) is None
