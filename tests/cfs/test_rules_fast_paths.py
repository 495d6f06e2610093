"""The fast paths in rules.py (path_error's quick accept, guest_config's
prefix check and cache, is_lock_path's prefix check) give the same answers
as the plain definitions, on random paths built from the characters that
matter (slashes, dots, NUL, non-ASCII, long names) and on edge cases."""

from __future__ import annotations

import errno
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.cfs import rules

_GUEST = re.compile(
    r"nodes/([A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)/(qemu-server|lxc|openvz)/([1-9][0-9]{0,9})\.conf"
)


def plain_path_error(path: str) -> int:
    if not path:
        return 0
    if len(path.encode("utf-8", "surrogateescape")) > rules.PATH_MAX_BYTES:
        return errno.ENAMETOOLONG
    for name in path.split("/"):
        if name in ("", ".", "..") or "\0" in name:
            return errno.EINVAL
        if len(name.encode("utf-8", "surrogateescape")) > rules.NAME_MAX_BYTES:
            return errno.ENAMETOOLONG
    return 0


def plain_guest_config(path: str) -> rules.GuestConfig | None:
    match = _GUEST.fullmatch(path)
    if match is None or int(match.group(3)) > rules.VMID_MAX:
        return None
    return rules.GuestConfig(match.group(1), rules.GUEST_TYPES[match.group(2)],
                             int(match.group(3)))


def plain_is_lock_path(path: str) -> bool:
    head, _, name = path.rpartition("/")
    return head == rules.LOCK_DIR and bool(name)


_PIECES = st.sampled_from([
    "/", "//", ".", "..", "a", "nodes", "nodes/", "pve1", "qemu-server", "lxc", "100", "0",
    ".conf", "priv", "lock", "priv/lock", "\0", "é", "\udcff", "x" * 100, "4294967296",
    "-", "ü" * 130,
])
_PATHS = st.lists(_PIECES, max_size=12).map("".join)


@settings(max_examples=3000, deadline=None)
@given(_PATHS)
def test_fast_paths_match_the_plain_definitions(path: str) -> None:
    assert rules.path_error(path) == plain_path_error(path)
    assert rules.guest_config(path) == plain_guest_config(path)
    assert rules.is_lock_path(path) == plain_is_lock_path(path)


def test_edge_cases() -> None:
    cases = [
        "", "a", ".a", "a/.b", "a/b.", "a./b", "..", "a/..", "a/", "/a", "a//b", "a\0b",
        "x" * 255, "x" * 256, "a/" + "x" * 255, "a/" + "x" * 256, "é" * 128, "é" * 127,
        "/".join(["x" * 200] * 21), "/".join(["x" * 200] * 20), "priv/lock/", "priv/lock/a",
        "priv/lock/a/b", "priv/lockx/a", "nodes/pve1/qemu-server/100.conf",
        "nodes/pve1/qemu-server/4294967295.conf", "nodes/pve1/qemu-server/4294967296.conf",
        "nodes/-x/lxc/1.conf", "nodes/pve1/lxc/01.conf", "nodes/pve1/openvz/7.conf",
    ]
    for path in cases:
        assert rules.path_error(path) == plain_path_error(path), path
        assert rules.guest_config(path) == plain_guest_config(path), path
        assert rules.is_lock_path(path) == plain_is_lock_path(path), path
