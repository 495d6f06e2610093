"""Two real corrald nodes (DemoCluster, FUSE mounts, the real ReplicatedBackend):
a change made through node 1's mount shows through node 2's mount at once,
although node 2's kernel may cache names and attributes for 10 s
(FEED_CACHE_TIMEOUT_S): a longer rewrite (size), a utime (mtime), an atomic
replace (temp + rename over: new inode under the cached name), a rename and an
unlink. Each is checked within half the cache timeout, right after node 2 has
cached the old state, so only the change feed's invalidation can pass it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.cfs.fuse import FEED_CACHE_TIMEOUT_S

FORM_TIMEOUT_S = 90.0
# Well inside the kernel cache timeout: passing needs the invalidation.
SEEN_WITHIN_S = FEED_CACHE_TIMEOUT_S / 2


def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except OSError:
            pass  # a name between its removal and its replacement
        time.sleep(0.02)
    return False


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    from corral.daemon.demo import DemoCluster

    demo = DemoCluster(2, str(tmp_path / "c"), prefix=f"crl-fz{os.getpid() % 100}",
                       stats_interval_s=60, cluster_name="fztest")
    try:
        demo.setup_network()
        demo.build()
        guests = [demo.mount(n) / "nodes" / demo.name(1) / "qemu-server" for n in (1, 2)]
        assert wait_for(lambda: all(path.is_dir() for path in guests), FORM_TIMEOUT_S)
        yield guests[0], guests[1]
    finally:
        demo.close()


def write(path: Path, body: bytes) -> None:
    with open(path, "wb") as out:
        out.write(body)


def test_changes_on_one_node_show_at_once_on_the_other(two_nodes: tuple[Path, Path]) -> None:
    one, two = two_nodes
    write(one / "100.conf", b"cores: 1\n")
    assert wait_for(lambda: (two / "100.conf").stat().st_size == 9, SEEN_WITHIN_S)

    longer = b"cores: 4\nmemory: 2048\n"
    assert (two / "100.conf").stat().st_size == 9  # cached by node 2's kernel now
    write(one / "100.conf", longer)
    assert wait_for(lambda: (two / "100.conf").stat().st_size == len(longer), SEEN_WITHIN_S)
    assert (two / "100.conf").read_bytes() == longer

    assert (two / "100.conf").stat().st_mtime != 1_234_567_890
    os.utime(one / "100.conf", (1_234_567_890, 1_234_567_890))
    assert wait_for(lambda: (two / "100.conf").stat().st_mtime == 1_234_567_890,
                    SEEN_WITHIN_S)

    replaced = b"cores: 8\nmemory: 4096\nname: replaced\n"
    assert (two / "100.conf").stat().st_size == len(longer)
    write(one / "100.conf.tmp", replaced)
    os.rename(one / "100.conf.tmp", one / "100.conf")
    assert wait_for(lambda: (two / "100.conf").stat().st_size == len(replaced), SEEN_WITHIN_S)
    assert (two / "100.conf").read_bytes() == replaced

    assert (two / "100.conf").exists()
    os.rename(one / "100.conf", one / "101.conf")
    assert wait_for(lambda: not (two / "100.conf").exists(), SEEN_WITHIN_S)
    assert (two / "101.conf").read_bytes() == replaced

    assert (two / "101.conf").exists()
    os.unlink(one / "101.conf")
    assert wait_for(lambda: not (two / "101.conf").exists(), SEEN_WITHIN_S)
