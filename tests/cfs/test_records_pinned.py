"""Pins the exact apply output for a fixed operation sequence: every errno,
every mutation (key and value bytes, in order), every effect, and the final
stored records. Written before the apply step was optimised, so any change
of the on-disk record format, of the mutation order, of the digests or of
an errno makes this fail. If a format change is intended, it needs a new
STORE_FORMAT and a new pin, not an edited one."""

from __future__ import annotations

import errno
import hashlib

from corral.cfs.memkv import MemoryKV
from corral.cfs.ops import Op
from corral.cfs.state import CfsState, LockChanged, UnlockRequested, lock_checksum

GUESTS = "nodes/pve1/qemu-server"


def _ops() -> list[tuple[Op, int]]:
    """(op, writer): creates, small and chunk-crossing writes, appends,
    overwrites, truncates, renames (file over file, guest migration), locks,
    unlinks, rmdirs, errors of each kind."""
    big = bytes(range(256)) * 40  # 10,240 bytes: three chunks
    ops: list[tuple[Op, int]] = [
        (Op.mkdir("nodes", 10), 1),
        (Op.mkdir("nodes/pve1", 11), 1),
        (Op.mkdir(GUESTS, 12), 1),
        (Op.mkdir("nodes/pve2", 13), 2),
        (Op.mkdir("nodes/pve2/qemu-server", 14), 2),
        (Op.mkdir("priv", 15), 1),
        (Op.mkdir("priv/lock", 16), 1),
        (Op.create("storage.cfg", 20, excl=True), 1),
        (Op.write("storage.cfg", 0, b"dir: local\n\tpath /var/lib/vz\n", 21), 1),
        (Op.create("storage.cfg", 22, excl=True), 1),  # EEXIST
        (Op.create("storage.cfg", 22), 1),  # exists, not excl: ok, no change
        (Op.create(f"{GUESTS}/100.conf", 30, excl=True), 1),
        (Op.write(f"{GUESTS}/100.conf", 0, b"cores: 2\nmemory: 2048\n", 31), 1),
        (Op.create("nodes/pve2/qemu-server/100.conf", 32, excl=True), 2),  # EEXIST: vmid held
        (Op.create(f"{GUESTS}/101.conf", 33, excl=True), 1),
        (Op.write(f"{GUESTS}/101.conf", 0, big, 34), 1),
        (Op.write(f"{GUESTS}/101.conf", 4090, b"0123456789ab", 35), 1),  # crosses a chunk edge
        (Op.append(f"{GUESTS}/101.conf", b"tail\n", 36), 1),
        (Op.truncate(f"{GUESTS}/101.conf", 5000, 37), 1),
        (Op.truncate(f"{GUESTS}/101.conf", 9000, 38), 1),  # zero-extends
        (Op.truncate(f"{GUESTS}/100.conf", 0, 39), 1),
        (Op.write(f"{GUESTS}/100.conf", 0, b"cores: 4\n", 40), 1),
        (Op.write(f"{GUESTS}/100.conf", 2, b"", 41), 1),  # empty write: ok, no change
        (Op.mkdir("priv/lock/ha_agent_pve1_lock", 50), 1),
        (Op.set_mtime("priv/lock/ha_agent_pve1_lock", 55), 2),  # EACCES: not the writer
        (Op.set_mtime("priv/lock/ha_agent_pve1_lock", 56), 1),  # refresh
        (Op.set_mtime("priv/lock/ha_agent_pve1_lock", 0), 2),  # asks for removal
        (Op.rename("priv/lock/ha_agent_pve1_lock", "priv/lock/x", 57), 1),  # EACCES
        (Op.rmdir("priv/lock/ha_agent_pve1_lock", 58), 1),
        (Op.mkdir("priv/lock/storage-local", 59), 1),
        (Op.create("user.cfg", 60, excl=True), 1),
        (Op.write("user.cfg", 0, b"user:root@pam:1:0:::\n", 61), 1),
        (Op.create("user.cfg.tmp.123", 62, excl=True), 1),
        (Op.write("user.cfg.tmp.123", 0, b"user:root@pam:1:0:::\nuser:a@pve:1:0:::\n", 63), 1),
        (Op.rename("user.cfg.tmp.123", "user.cfg", 64), 1),  # atomic replace
        (Op.rename(f"{GUESTS}/100.conf", "nodes/pve2/qemu-server/100.conf", 65), 1),  # migrate
        (Op.rename(f"{GUESTS}/101.conf", "nodes/pve2/qemu-server/100.conf", 66), 1),  # replaces it
        (Op.set_mtime("storage.cfg", 70), 1),
        (Op.unlink("nodes/pve2/qemu-server/100.conf", 71), 1),
        (Op.unlink(f"{GUESTS}/101.conf", 72), 1),  # ENOENT
        (Op.unlink("nodes", 73), 1),  # EISDIR
        (Op.rmdir("nodes/pve1", 74), 1),  # ENOTEMPTY
        (Op.mkdir("a", 75), 1),
        (Op.rename("a", "b", 76), 1),
        (Op.rmdir("b", 77), 1),
        (Op.write("missing", 0, b"x", 78), 1),  # ENOENT
        (Op.create(".vmlist", 79), 1),  # EEXIST: virtual
        (Op.create("a/../b", 80), 1),  # EINVAL
        (Op.create("n" * 256, 81), 1),  # ENAMETOOLONG
        (Op.truncate("storage.cfg", 2 * 1024 * 1024, 82), 1),  # EFBIG
    ]
    return ops


def _overwrite_ops() -> list[tuple[Op, int]]:
    """Rewrites of multi-chunk files: whole overwrites from 0 (shorter,
    longer, equal, partial last chunk), O_TRUNC + write, truncate to 0."""
    big = bytes(range(251)) * 60  # 15,060 bytes: four chunks
    ops: list[tuple[Op, int]] = [
        (Op.mkdir("d", 1), 1),
        (Op.create("d/f", 2), 1),
        (Op.write("d/f", 0, big, 3), 1),
        (Op.write("d/f", 0, big[:9000], 4), 1),  # leaves the tail: size stays
        (Op.write("d/f", 0, big[::-1], 5), 1),  # every byte replaced
        (Op.write("d/f", 100, big[:15060], 6), 1),  # grows by 100
        (Op.truncate("d/f", 0, 7), 1),
        (Op.write("d/f", 0, big[:5000], 8), 1),
        (Op.write("d/f", 0, big[:4096], 9), 1),  # first chunk whole, second kept
        (Op.truncate("d/f", 4096, 10), 1),
        (Op.write("d/f", 0, big[:4095], 11), 1),  # one byte of the old chunk stays
        (Op.truncate("d/f", 12000, 12), 1),
        (Op.write("d/f", 0, big[:12000], 13), 1),
        (Op.truncate("d/f", 0, 14), 1),
        (Op.truncate("d/f", 0, 15), 1),
        (Op.write("d/f", 8192, b"xyz", 16), 1),  # a hole then data
    ]
    return ops


def _effect_text(effect: object) -> str:
    if isinstance(effect, LockChanged):
        return f"L{effect.path}:{effect.checksum}"
    assert isinstance(effect, UnlockRequested)
    return f"U{effect.path}:{effect.checksum}"


def _run(ops: list[tuple[Op, int]] | None = None) -> tuple[str, str, list[int]]:
    state = CfsState(debug_checks=True)
    kv = MemoryKV()
    trace = hashlib.sha256()
    codes = []
    for op, writer in _ops() if ops is None else ops:
        outcome = state.apply(op, writer=writer, quorate=True, reader=kv)
        codes.append(outcome.errno)
        trace.update(f"{op.kind.name} {op.path} -> {outcome.errno}\n".encode())
        for key, value in outcome.mutations:
            trace.update(key + b"=" + (b"<del>" if value is None else value) + b"\n")
        for effect in outcome.effects:
            trace.update(_effect_text(effect).encode() + b"\n")
        kv.apply_batch(outcome.mutations)
    lock = state.tree.lookup("priv/lock/storage-local")
    if lock is not None:
        trace.update(str(lock_checksum("priv/lock/storage-local", lock)).encode())
    final = hashlib.sha256()
    for key in sorted(kv):
        final.update(key + b"=" + kv[key] + b"\n")
    return trace.hexdigest(), final.hexdigest(), codes


E = errno
EXPECTED_ERRNOS = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, E.EEXIST, 0, 0, 0, E.EEXIST, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    E.EACCES, 0, E.EACCES, E.EACCES, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, E.ENOENT, E.EISDIR,
    E.ENOTEMPTY, 0, 0, 0, E.ENOENT, E.EEXIST, E.EINVAL, E.ENAMETOOLONG, E.EFBIG,
]


def test_apply_output_is_pinned() -> None:
    trace, final, codes = _run()
    assert codes == EXPECTED_ERRNOS
    # sha256 of every mutation and effect in order, then of the final store.
    # (Re-pinned when directory writers joined the digest: lock checksums in the
    # effects changed; the stored records did not, `final` is the same.)
    assert trace == "f808a72f597a51df61d23fa5962138b2ad40b66c1a84bc917f30ef0e3beafd55"
    assert final == "ad7c53f109c7b7d0f132009e9cf1c8a7db10a3e7649c070e56ec6c3a3b45c453"


def test_meta_record_layout_is_pinned() -> None:
    """One metadata record spelled out byte by byte (the layout the hashes cover)."""
    state = CfsState()
    kv = MemoryKV()
    outcome = state.apply(Op.mkdir("nodes", 7), writer=3, quorate=True, reader=kv)
    assert outcome.mutations == [
        (b"m" + (2).to_bytes(8, "big"),
         (1).to_bytes(8, "little") + (2).to_bytes(8, "little") + (3).to_bytes(4, "little")
         + (7).to_bytes(8, "little") + (0).to_bytes(4, "little") + (0).to_bytes(8, "little")
         + b"\x01nodes"),
        (b"h", (2).to_bytes(8, "little") + (3).to_bytes(4, "little") + (7).to_bytes(8, "little")
         + (1).to_bytes(4, "little")),
    ]


def test_overwrite_output_is_pinned() -> None:
    """Pinned with the apply step as it was before the whole-rewrite path
    (which skips reading chunks it replaces or drops)."""
    trace, final, codes = _run(_overwrite_ops())
    assert codes == [0] * len(_overwrite_ops())
    assert trace == "c132fa2dcd6ae2283ab7c16ada63a53423216e70365cae0d09ff9213283979fe"
    assert final == "9011cb8a96f0d806739742ea7b61d7b3deb5f28bbc393973b47dbe3a3a151740"
