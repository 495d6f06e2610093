"""The errno contract of the mount, checked with direct system calls on a
real local-mode mount: what the tree never supports (symlink, mknod, link,
xattrs), generated files, VMID uniqueness across nodes' directories and
migration by rename, size limits, modes and ownership, and locks."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from tests.fuse.conftest import Mount


def expect_errno(code: int, call, *args: object) -> None:
    with pytest.raises(OSError) as info:
        call(*args)
    assert info.value.errno == code, f"{call.__name__}{args}: {info.value}"


def test_objects_the_tree_does_not_hold(shared_mount: Mount) -> None:
    m = shared_mount
    os.makedirs(m.path("err1"), exist_ok=True)
    with open(m.path("err1/file"), "w") as out:
        out.write("x")
    expect_errno(errno.ENOSYS, os.symlink, "file", m.path("err1/link"))
    expect_errno(errno.ENOSYS, os.mkfifo, m.path("err1/fifo"))
    expect_errno(errno.ENOSYS, os.mknod, m.path("err1/node"), stat.S_IFREG | 0o640)
    expect_errno(errno.EPERM, os.link, m.path("err1/file"), m.path("err1/hard"))
    # The front answers ENOSYS once and the kernel answers ENOTSUP from then
    # on: the same errno every time, for every xattr call.
    for _ in range(2):
        expect_errno(errno.ENOTSUP, os.setxattr, m.path("err1/file"), "user.x", b"1")
        expect_errno(errno.ENOTSUP, os.getxattr, m.path("err1/file"), "user.x")
        expect_errno(errno.ENOTSUP, os.listxattr, m.path("err1/file"))
        expect_errno(errno.ENOTSUP, os.removexattr, m.path("err1/file"), "user.x")
    with open(m.path("err1/file"), "r+") as again:
        again.write("y")  # writes still work once getxattr is off
    assert sorted(os.listdir(m.path("err1"))) == ["file"]


def test_generated_files_and_root_entries(shared_mount: Mount) -> None:
    m = shared_mount
    for name in (".members", ".vmlist", ".version", ".clusterlog"):
        assert os.stat(m.path(name)).st_mode & 0o777 == 0o440
        expect_errno(errno.EIO, open, m.path(name), "w")
    with open(m.path(".members")) as members:
        assert '"nodename": "n1"' in members.read()
    expect_errno(errno.EACCES, os.unlink, m.path(".vmlist"))
    expect_errno(errno.EACCES, os.unlink, m.path("local"))
    expect_errno(errno.EEXIST, os.mkdir, m.path("local"))
    assert os.lstat(m.path("local")).st_mode & 0o777 == 0o755


def test_create_exclusive_and_directory_rules(shared_mount: Mount) -> None:
    m = shared_mount
    os.makedirs(m.path("err2/full/sub"), exist_ok=True)
    os.close(os.open(m.path("err2/f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    expect_errno(errno.EEXIST, os.open, m.path("err2/f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    expect_errno(errno.ENOTEMPTY, os.rename, m.path("err2/full"), m.path("err2/other"))
    expect_errno(errno.ENOTEMPTY, os.rmdir, m.path("err2/full"))
    os.mkdir(m.path("err2/empty"))
    os.rename(m.path("err2/empty"), m.path("err2/empty2"))
    assert os.path.isdir(m.path("err2/empty2"))


def test_vmid_unique_across_nodes_and_migration(shared_mount: Mount) -> None:
    m = shared_mount
    with open(m.path("nodes/n1/qemu-server/777.conf"), "w") as out:
        out.write("cores: 2\n")
    expect_errno(errno.EEXIST, open, m.path("nodes/n2/qemu-server/777.conf"), "w")
    expect_errno(errno.EEXIST, open, m.path("nodes/n1/lxc/777.conf"), "w")
    os.rename(m.path("nodes/n1/qemu-server/777.conf"), m.path("nodes/n2/qemu-server/777.conf"))
    with open(m.path("nodes/n2/qemu-server/777.conf")) as moved:
        assert moved.read() == "cores: 2\n"
    with open(m.path(".vmlist")) as vmlist:
        assert '"777": {\n   "node": "n2"' in vmlist.read()
    with open(m.path("nodes/n1/qemu-server/778.conf"), "w") as out:
        out.write("x")
    expect_errno(errno.EEXIST, os.rename, m.path("nodes/n1/qemu-server/778.conf"),
                 m.path("nodes/n1/qemu-server/777.conf"))
    for path in ("nodes/n2/qemu-server/777.conf", "nodes/n1/qemu-server/778.conf"):
        os.unlink(m.path(path))


def test_oversize_write_is_rejected_whole(shared_mount: Mount) -> None:
    m = shared_mount
    os.makedirs(m.path("err3"), exist_ok=True)
    path = m.path("err3/big")
    limit = 1024 * 1024
    with open(path, "wb") as out:
        out.write(b"a" * (limit - 10))
    fd = os.open(path, os.O_WRONLY)
    try:
        expect_errno(errno.EFBIG, os.pwrite, fd, b"b" * 100, limit - 50)
        # A large write() is one request (max_write 1 MiB, up to 256 pages
        # of the caller's buffer), rejected whole: the reference got 128 KiB
        # pieces and kept those below the limit.
        expect_errno(errno.EFBIG, os.pwrite, fd, b"b" * (512 * 1024), limit - 100 * 1024)
    finally:
        os.close(fd)
    expect_errno(errno.EFBIG, os.truncate, path, 2 * limit)
    with open(path, "rb") as back:
        assert back.read() == b"a" * (limit - 10)
    with open(path, "r+b") as out:  # exactly at the limit is fine
        out.seek(limit - 10)
        out.write(b"c" * 10)
    assert os.stat(path).st_size == limit
    os.unlink(path)


def test_modes_chmod_chown(shared_mount: Mount) -> None:
    m = shared_mount
    with open(m.path("nodes/n1/priv/key"), "w") as out:
        out.write("secret")
    with open(m.path("err4.cfg"), "w") as out:
        out.write("x")
    assert os.stat(m.path("priv")).st_mode & 0o777 == 0o700
    assert os.stat(m.path("nodes/n1/priv/key")).st_mode & 0o777 == 0o600
    assert os.stat(m.path("err4.cfg")).st_mode & 0o777 == 0o640
    os.chmod(m.path("err4.cfg"), 0o640)
    os.chmod(m.path("nodes/n1/priv/key"), 0o600)
    expect_errno(errno.EPERM, os.chmod, m.path("err4.cfg"), 0o644)
    expect_errno(errno.EPERM, os.chmod, m.path("nodes/n1/priv/key"), 0o640)
    os.chown(m.path("err4.cfg"), 0, 33)
    os.chown(m.path("err4.cfg"), -1, 33)
    expect_errno(errno.EPERM, os.chown, m.path("err4.cfg"), 1000, -1)
    expect_errno(errno.EPERM, os.chown, m.path("err4.cfg"), 0, 0)
    st = os.stat(m.path("err4.cfg"))
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 33, 0o640)


def test_lock_directories(shared_mount: Mount) -> None:
    m = shared_mount
    lock = m.path("priv/lock/file-storage_cfg")
    os.mkdir(lock)
    expect_errno(errno.EEXIST, os.mkdir, lock)
    assert os.stat(lock).st_mode & 0o777 == 0o700
    now = int(os.stat(lock).st_mtime) + 5
    os.utime(lock, (now, now))  # refresh by the same writer
    assert int(os.stat(lock).st_mtime) == now
    # utime(0) is the unlock request: refused while the lock is young.
    expect_errno(errno.EACCES, os.utime, lock, (0, 0))
    expect_errno(errno.EACCES, os.rename, lock, m.path("priv/lock/other"))
    os.rmdir(lock)
    os.mkdir(lock)
    os.rmdir(lock)


def test_statfs_reports_enforced_limits(shared_mount: Mount) -> None:
    m = shared_mount
    info = os.statvfs(m.path(""))
    assert info.f_bsize == 4096 and info.f_namemax == 255
    assert info.f_blocks == 4 * 1024 * 1024 * 1024 // 4096  # default total limit
    assert info.f_files == 1_000_000 and 0 < info.f_ffree < info.f_files
    assert 0 < info.f_bfree <= info.f_blocks
