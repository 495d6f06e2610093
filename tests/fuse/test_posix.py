"""POSIX behaviour of a real mount checked with ordinary shell tools (cp, mv,
mkdir, rm, cat, ls -l, stat, echo >>, truncate, touch -d) run as
subprocesses, as an administrator would use /etc/pve; local mode over a
real store."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.fuse.conftest import Mount


def sh(script: str, cwd: str) -> str:
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{script!r}: {result.stderr}"
    return result.stdout


def test_shell_tools_round_trip(shared_mount: Mount, tmp_path: Path) -> None:
    root = str(shared_mount.root)
    source = tmp_path / "storage.cfg"
    source.write_text("dir: local\n\tpath /var/lib/vz\n")
    sh(f"mkdir -p posix/a/b && cp {source} posix/a/storage.cfg", root)
    assert sh("cat posix/a/storage.cfg", root) == source.read_text()
    sh("echo 'content iso' >> posix/a/storage.cfg", root)
    assert sh("cat posix/a/storage.cfg", root).endswith("\tpath /var/lib/vz\ncontent iso\n")
    sh("mv posix/a/storage.cfg posix/a/b/moved.cfg", root)
    assert not os.path.exists(shared_mount.path("posix/a/storage.cfg"))
    listing = sh("ls -l posix/a/b", root)
    assert "-rw-r----- 1 root www-data" in listing and "moved.cfg" in listing
    sh("truncate -s 4 posix/a/b/moved.cfg", root)
    assert sh("cat posix/a/b/moved.cfg", root) == "dir:"
    sh("truncate -s 10 posix/a/b/moved.cfg", root)
    assert Path(shared_mount.path("posix/a/b/moved.cfg")).read_bytes() == b"dir:" + bytes(6)
    sh("touch -d '2024-01-02 03:04:05 UTC' posix/a/b/moved.cfg", root)
    assert sh("stat -c '%Y %s %a %U %G %h' posix/a/b/moved.cfg", root).split() == [
        "1704164645", "10", "640", "root", "www-data", "1"]
    sh("rm posix/a/b/moved.cfg && rmdir posix/a/b && rm -r posix/a", root)
    assert sh("ls -A posix", root) == ""


def test_overwrite_and_cp_over_existing(shared_mount: Mount) -> None:
    root = str(shared_mount.root)
    sh("mkdir -p posix2 && printf 'long old content\\n' > posix2/f && printf 'new\\n' > posix2/f",
       root)
    assert sh("cat posix2/f", root) == "new\n"
    sh("printf 'x' > posix2/g && cp posix2/f posix2/g && cp -r posix2 posix3", root)
    assert sh("cat posix2/g posix3/g", root) == "new\nnew\n"
    # Atomic replace as PVE tools do it: temp file, rename over the target.
    sh("printf 'v2\\n' > posix2/f.tmp.123 && mv -f posix2/f.tmp.123 posix2/f", root)
    assert sh("cat posix2/f; ls posix2", root) == "v2\nf\ng\n"


def test_stat_of_directories_and_root_links(shared_mount: Mount) -> None:
    root = str(shared_mount.root)
    out = sh("stat -c '%a %F %U %G' nodes nodes/n1/priv priv/lock", root).splitlines()
    assert out == ["755 directory root www-data", "700 directory root www-data",
                   "700 directory root www-data"]
    assert sh("readlink local qemu-server lxc", root).split() == [
        "nodes/n1", "nodes/n1/qemu-server", "nodes/n1/lxc"]
    sh("echo 'memory: 512' > qemu-server/4242.conf", root)
    assert sh("cat nodes/n1/qemu-server/4242.conf", root) == "memory: 512\n"
    assert sh("ls local/qemu-server", root).split() == ["4242.conf"]
    sh("rm local/qemu-server/4242.conf", root)


def test_appends_from_two_writers_never_overwrite(shared_mount: Mount) -> None:
    root = str(shared_mount.root)
    sh("mkdir -p posix4 && : > posix4/log", root)
    sh("for i in $(seq 1 50); do echo a$i >> posix4/log; done & "
       "for i in $(seq 1 50); do echo b$i >> posix4/log; done; wait", root)
    lines = Path(shared_mount.path("posix4/log")).read_text().splitlines()
    assert sorted(lines) == sorted([f"a{i}" for i in range(1, 51)] +
                                   [f"b{i}" for i in range(1, 51)])
