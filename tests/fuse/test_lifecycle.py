"""Mount lifecycle on real mounts: data survives unmount and remount (the
store persists), a mount whose daemon was killed with -9 is detected as
stale and cleaned by the next mount on the same path, SIGTERM unmounts
cleanly, and a node without quorum (read-only backend) fails every
mutation with EACCES while reads keep working and modes show read-only."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from corral.cfs.mount import is_mounted, is_stale


def test_data_survives_remount(mount_factory) -> None:
    m = mount_factory.new("persist").start()
    os.makedirs(m.path("nodes/n1/qemu-server"))
    with open(m.path("nodes/n1/qemu-server/100.conf"), "w") as out:
        out.write("name: survivor\n")
    os.utime(m.path("nodes/n1/qemu-server/100.conf"), (1_700_000_000, 1_700_000_000))
    assert m.stop() == 0
    assert not is_mounted(m.root) and not is_stale(m.root)
    assert os.listdir(m.root) == []  # an empty mountpoint once unmounted
    m.start()
    with open(m.path("qemu-server/100.conf")) as back:
        assert back.read() == "name: survivor\n"
    assert int(os.stat(m.path("nodes/n1/qemu-server/100.conf")).st_mtime) == 1_700_000_000
    with open(m.path(".vmlist")) as vmlist:
        assert '"100"' in vmlist.read()


def test_stale_mount_is_cleaned_on_start(mount_factory) -> None:
    m = mount_factory.new("stale").start()
    with open(m.path("kept.cfg"), "w") as out:
        out.write("kept\n")
    m.kill()  # kill -9: the kernel keeps a dead mount behind
    with pytest.raises(OSError) as info:
        os.stat(m.root)
    assert info.value.errno == errno.ENOTCONN
    assert is_stale(m.root)
    m.start()
    assert not is_stale(m.root)
    with open(m.path("kept.cfg")) as back:
        assert back.read() == "kept\n"
    out = subprocess.run(["findmnt", "-n", "-o", "TARGET", str(m.root)],
                         capture_output=True, text=True, check=False).stdout.split()
    assert out == [str(m.root)]  # exactly one mount, the new one


def test_stale_mount_seen_while_root_attributes_are_cached(mount_factory) -> None:
    # Right after kill -9 the kernel may still answer a stat of the root from its
    # attribute cache; a restart within that window must still see a dead mount.
    m = mount_factory.new("stale-cached").start()
    os.stat(m.root)  # the root's attributes are now in the kernel's cache
    m.kill()
    assert is_stale(m.root)
    m.start()
    assert not is_stale(m.root) and os.path.exists(m.path(".members"))


def test_second_mount_on_live_mount_is_refused(mount_factory) -> None:
    m = mount_factory.new("live").start()
    other = subprocess.run(
        [os.sys.executable, "-m", "corral.cfs.mount", "--store", str(m.base / "store2"),
         "--mountpoint", str(m.root), "--local", "--nodename", "n1"],
        capture_output=True, text=True, timeout=60, check=False)
    assert other.returncode == 1 and "already mounted" in other.stderr
    assert os.path.exists(m.path(".members"))


def test_without_quorum_everything_is_read_only(mount_factory) -> None:
    m = mount_factory.new("noquorum").start()
    os.makedirs(m.path("nodes/n1/qemu-server"))
    os.makedirs(m.path("priv"))
    with open(m.path("nodes/n1/qemu-server/100.conf"), "w") as out:
        out.write("cores: 1\n")
    m.stop()
    m.start("--read-only")
    conf = m.path("nodes/n1/qemu-server/100.conf")
    with open(conf) as back:
        assert back.read() == "cores: 1\n"
    assert os.stat(conf).st_mode & 0o777 == 0o440
    assert os.stat(m.path("nodes")).st_mode & 0o777 == 0o555
    assert os.stat(m.path("priv")).st_mode & 0o777 == 0o500
    assert os.lstat(m.path("local")).st_mode & 0o777 == 0o555  # PVE's quorum probe
    attempts = [
        (open, conf, "w"), (open, conf, "a"), (open, m.path("new.cfg"), "w"),
        (os.mkdir, m.path("dir")), (os.unlink, conf), (os.rmdir, m.path("priv")),
        (os.rename, conf, m.path("x.conf")), (os.truncate, conf, 0),
        (os.utime, conf, (5, 5)),
    ]
    for call, *args in attempts:
        with pytest.raises(OSError) as info:
            call(*args)
        assert info.value.errno == errno.EACCES, (call, args, info.value)
    os.chmod(conf, 0o640)  # chmod to the fixed mode is a no-op that succeeds
    with open(conf) as back:
        assert back.read() == "cores: 1\n"
    assert sorted(os.listdir(m.path("nodes/n1/qemu-server"))) == ["100.conf"]


def test_run_mount_in_process_stops_on_event(tmp_path) -> None:
    """run_mount as a daemon embeds it: serve, answer a client running in a
    thread, unmount when the stop event is set (no signal handlers)."""
    import asyncio

    from corral.cfs.local import LocalBackend
    from corral.cfs.mount import lazy_unmount, run_mount
    from corral.cfs.store import Durability, Store

    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    mountpoint = tmp_path / "mnt"

    async def scenario() -> list[str]:
        with Store(tmp_path / "store", durability=Durability.PROCESS) as store:
            stop, ready = asyncio.Event(), asyncio.Event()
            serving = asyncio.create_task(run_mount(
                LocalBackend(store, "n1"), mountpoint, stop=stop, ready=ready,
                handle_signals=False))
            await asyncio.wait_for(ready.wait(), 30)
            names = await asyncio.to_thread(os.listdir, mountpoint)
            stop.set()
            await asyncio.wait_for(serving, 30)
            return names

    try:
        names = asyncio.run(scenario())
    finally:
        if is_stale(mountpoint) or is_mounted(mountpoint):
            lazy_unmount(mountpoint)
    assert {"local", "qemu-server", "lxc", ".members", ".vmlist"} <= set(names)
    assert not is_mounted(mountpoint)
