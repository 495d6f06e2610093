"""A minority partition on a real 3-node cluster (nftables in node 3's namespace).

Checks: once node 3 is cut off it loses quorum and its mount turns read-only: every
mutating call (create, write, truncate, mkdir, rmdir, unlink, rename, utime) fails
with EACCES and changes nothing (its version and digest stay), reads keep working,
stat shows the read-only modes (0440 files, 0555 directories, `local` without the
owner write bit). Meanwhile the majority (nodes 1, 2) keeps writing. After the cut
heals node 3 catches up (same version and digest, the majority's changes visible
through its mount, read-write modes again) and accepts writes that reach the others.
A second test cuts node 3 while writers stream creates through nodes 1 and 3:
no write returns success without quorum, and after the heal every acknowledged
write is on all nodes with no half-applied file. Needs root and nftables.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.fuse_cluster.conftest import (
    can_partition,
    describe,
    fs_status,
    in_sync,
    partition,
    wait_in_sync,
    wait_until,
)
from tests.fuse_cluster.writers import Writer

from corral.daemon.demo import DemoCluster

pytestmark = pytest.mark.skipif(not can_partition(), reason="needs root, ip and nftables")

MINORITY = 3
MAJORITY_FILES = 40
ATTR_CACHE_S = 5.0


def _modes(mount: Path) -> tuple[int, int, bool]:
    """Mode of part/existing.conf, of part/, and whether `local` has the owner write
    bit (PVE's quorum probe)."""
    return (stat.S_IMODE(os.stat(mount / "part" / "existing.conf").st_mode),
            stat.S_IMODE(os.stat(mount / "part").st_mode),
            bool(os.lstat(mount / "local").st_mode & 0o200))


def _expect_eacces(what: str, call: Callable[[], object]) -> None:
    with pytest.raises(OSError) as caught:
        call()
    assert caught.value.errno == errno.EACCES, f"{what}: {caught.value!r}, expected EACCES"


def _open_write(path: Path, flags: int) -> None:
    fd = os.open(path, flags, 0o640)
    try:
        os.write(fd, b"from the minority\n")
    finally:
        os.close(fd)


def _mutations(part: Path) -> list[tuple[str, Callable[[], object]]]:
    existing = part / "existing.conf"
    return [
        ("create", lambda: _open_write(part / "new.conf", os.O_WRONLY | os.O_CREAT | os.O_EXCL)),
        ("overwrite", lambda: _open_write(existing, os.O_WRONLY | os.O_TRUNC)),
        ("append", lambda: _open_write(existing, os.O_WRONLY | os.O_APPEND)),
        ("truncate", lambda: os.truncate(existing, 0)),
        ("mkdir", lambda: os.mkdir(part / "newdir")),
        ("rmdir", lambda: os.rmdir(part / "d")),
        ("unlink", lambda: os.unlink(existing)),
        ("rename", lambda: os.rename(existing, part / "moved.conf")),
        ("utime", lambda: os.utime(existing, (1_000_000, 1_000_000))),
    ]


def test_minority_turns_read_only_and_catches_up(cluster: DemoCluster) -> None:
    mounts = {n: cluster.mount(n) for n in cluster.nodeids}
    majority = [n for n in cluster.nodeids if n != MINORITY]
    part = {n: mounts[n] / "part" for n in cluster.nodeids}
    part[1].mkdir()
    (part[1] / "d").mkdir()
    (part[1] / "existing.conf").write_bytes(b"before\n")
    wait_in_sync(cluster, cluster.nodeids)
    assert (part[MINORITY] / "existing.conf").read_bytes() == b"before\n"

    partition(cluster, MINORITY, cut=True)
    wait_until(lambda: fs_status(cluster, MINORITY).get("quorate") is False
               and in_sync(cluster, majority), 60,
               lambda: "node 3 without quorum, 1 and 2 synced\n" + describe(cluster, [1, 2, 3]))
    before = fs_status(cluster, MINORITY)

    mine = part[MINORITY]
    assert (mine / "existing.conf").read_bytes() == b"before\n"
    assert sorted(os.listdir(mine)) == ["d", "existing.conf"]
    # The kernel may keep attributes for the mount's cache timeout (1 s).
    wait_until(lambda: _modes(mounts[MINORITY]) == (0o440, 0o555, False), ATTR_CACHE_S,
               lambda: f"read-only modes, have {_modes(mounts[MINORITY])}")
    for what, call in _mutations(mine):
        _expect_eacces(what, call)

    for index in range(MAJORITY_FILES):
        (part[1 + index % 2] / f"m{index:03d}.conf").write_bytes(f"majority {index}\n".encode())
    (part[2] / "existing.conf").write_bytes(b"after\n")
    os.rmdir(part[1] / "d")
    wait_in_sync(cluster, majority)

    # Nothing changed on the minority, and it still reads.
    after = fs_status(cluster, MINORITY)
    assert (after.get("version"), after.get("digest")) == \
        (before.get("version"), before.get("digest"))
    assert (mine / "existing.conf").read_bytes() == b"before\n"
    assert sorted(os.listdir(mine)) == ["d", "existing.conf"]

    healed_at = time.monotonic()
    partition(cluster, MINORITY, cut=False)
    wait_in_sync(cluster, cluster.nodeids)
    caught_up_s = time.monotonic() - healed_at
    assert (mine / "existing.conf").read_bytes() == b"after\n"
    names = sorted(os.listdir(mine))
    assert names == sorted(["existing.conf"] + [f"m{i:03d}.conf" for i in range(MAJORITY_FILES)])
    for index in range(MAJORITY_FILES):
        assert (mine / f"m{index:03d}.conf").read_bytes() == f"majority {index}\n".encode()
    wait_until(lambda: _modes(mounts[MINORITY]) == (0o640, 0o755, True), ATTR_CACHE_S,
               lambda: f"read-write modes, have {_modes(mounts[MINORITY])}")

    (mine / "from-minority.conf").write_bytes(b"back\n")
    wait_until(lambda: (part[1] / "from-minority.conf").exists(), 10, "node 3's write on node 1")
    assert (part[1] / "from-minority.conf").read_bytes() == b"back\n"
    last_sync = fs_status(cluster, MINORITY).get("last_sync")
    print(f"partition: node 3 in sync {caught_up_s:.1f} s after the heal; last resync "
          f"{last_sync}")


def test_partition_during_write_streams(cluster: DemoCluster) -> None:
    """Writers stream creates through node 1 (majority) and node 3 (minority) while
    node 3 is cut off and later healed: the minority's writes fail during the cut
    (EACCES, or EIO for one in flight: outcome unknown) and never return success
    without quorum; afterwards every acknowledged write of both writers is on all
    three nodes, no file is half-applied, and the digests are equal."""
    mounts = {n: cluster.mount(n) for n in cluster.nodeids}
    for directory in ("p-major", "p-minor"):
        (mounts[1] / directory).mkdir()
    wait_in_sync(cluster, cluster.nodeids)
    major = Writer("major", mounts[1] / "p-major")
    minor = Writer("minor", mounts[MINORITY] / "p-minor")
    writers = [major, minor]
    for writer in writers:
        writer.start()
    try:
        wait_until(lambda: len(major.acked) >= 20 and len(minor.acked) >= 20, 30,
                   "20 acknowledged writes per writer")
        partition(cluster, MINORITY, cut=True)
        wait_until(lambda: fs_status(cluster, MINORITY).get("quorate") is False
                   and in_sync(cluster, [1, 2]), 60,
                   lambda: "the cut to take effect\n" + describe(cluster, [1, 2, 3]))
        acked_at_cut = len(minor.acked)
        errors_at_cut = len(minor.errors)
        wait_until(lambda: len(minor.errors) >= errors_at_cut + 3, 30,
                   "the minority's writes to fail")
        assert len(minor.acked) == acked_at_cut, "a write succeeded without quorum"
        refused = {code for _, code in minor.errors}
        assert refused <= {errno.EACCES, errno.EIO}, refused
        majority_before = len(major.acked)
        wait_until(lambda: len(major.acked) >= majority_before + 20, 30,
                   "the majority to keep writing")
        partition(cluster, MINORITY, cut=False)
        wait_in_sync(cluster, cluster.nodeids)
        wait_until(lambda: len(minor.acked) > acked_at_cut, 30,
                   "the minority writing again after the heal")
    finally:
        partition(cluster, MINORITY, cut=False)
        for writer in writers:
            writer.finish()
    wait_in_sync(cluster, cluster.nodeids)
    for nodeid in cluster.nodeids:
        for writer in writers:
            folder = mounts[nodeid] / writer.directory.name
            listed = set(os.listdir(folder))
            missing = set(writer.acked) - listed
            assert not missing, f"node{nodeid} lost {len(missing)} acknowledged writes"
            assert listed <= set(writer.attempted)
            for name in listed:
                body = (folder / name).read_bytes()
                assert body in (b"", writer.attempted[name]), \
                    f"node{nodeid}: {name} half-applied: {body[:40]!r}"
                if name in writer.acked:
                    assert body == writer.acked[name]
    print(f"partition under load: {len(major.acked)} + {len(minor.acked)} acknowledged, "
          f"minority refusals {sorted(errno.errorcode[c] for c in refused)}")
