"""The authenticated envelope (corral.totem.auth): sealed packets open on a peer of
the same cluster, in MAC mode and in AES-256-GCM mode; forged, tampered, replayed,
truncated (whole, byte at a time), padded, foreign-cluster and unknown-sender packets
are dropped, counted under their reason, and never raise (also under hypothesis
fuzzing of random and single-byte-mutated packets)."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.errors import ConfigError, UsageError
from corral.totem import auth

KEY = bytes(range(256))
NODES = (1, 2, 3)


def make(nodeid: int, encrypt: bool, incarnation: int = 100, key: bytes = KEY,
         name: str = "alpha") -> auth.PacketAuthenticator:
    return auth.PacketAuthenticator(key, name, nodeid, incarnation, NODES, encrypt=encrypt)


@pytest.fixture(params=[False, True], ids=["mac", "aes-gcm"])
def encrypt(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def test_round_trip(encrypt: bool) -> None:
    sender, receiver = make(1, encrypt), make(2, encrypt)
    for size in (0, 1, 100, 1400, 60_000):
        payload = os.urandom(size)
        opened = receiver.open(sender.seal(auth.KIND_TOTEM, payload))
        assert opened is not None
        assert (opened.kind, opened.sender_nodeid, opened.payload) == (auth.KIND_TOTEM, 1, payload)
        assert opened.incarnation == 100
    assert receiver.opened == 5
    assert sum(receiver.drops.values()) == 0


def test_encrypted_payload_is_not_in_clear() -> None:
    payload = b"secret-payload-" * 10
    assert payload not in make(1, True).seal(auth.KIND_TOTEM, payload)
    assert payload in make(1, False).seal(auth.KIND_TOTEM, payload)


def test_every_single_bit_flip_is_dropped(encrypt: bool) -> None:
    sender, receiver = make(1, encrypt), make(2, encrypt)
    packet = sender.seal(auth.KIND_TOTEM, b"hello world")
    for index in range(len(packet)):
        for bit in (0x01, 0x80):
            tampered = bytearray(packet)
            tampered[index] ^= bit
            assert receiver.open(bytes(tampered)) is None
    assert receiver.opened == 0
    # the untouched packet still opens: tampered copies did not advance the window
    assert receiver.open(packet) is not None


def test_forged_with_other_key_is_bad_mac(encrypt: bool) -> None:
    other_key = bytes(reversed(KEY))
    forger = auth.PacketAuthenticator(other_key, "alpha", 1, 100, NODES, encrypt=encrypt)
    receiver = make(2, encrypt)
    # same cluster id is required to reach the MAC check: copy it over
    forger.cluster_id = receiver.cluster_id
    assert receiver.open(forger.seal(auth.KIND_TOTEM, b"x")) is None
    assert receiver.drops["bad_mac"] == 1


def test_foreign_cluster_dropped(encrypt: bool) -> None:
    receiver = make(2, encrypt)
    assert receiver.open(make(1, encrypt, name="beta").seal(auth.KIND_TOTEM, b"x")) is None
    other_key = auth.PacketAuthenticator(bytes(200), "alpha", 1, 1, NODES, encrypt=encrypt)
    assert receiver.open(other_key.seal(auth.KIND_TOTEM, b"x")) is None
    assert receiver.drops["foreign_cluster"] == 2


def test_unknown_node_dropped(encrypt: bool) -> None:
    stranger = auth.PacketAuthenticator(KEY, "alpha", 9, 1, (*NODES, 9), encrypt=encrypt)
    receiver = make(2, encrypt)
    assert receiver.open(stranger.seal(auth.KIND_TOTEM, b"x")) is None
    assert receiver.drops["unknown_node"] == 1


def test_replay_and_reordering_window(encrypt: bool) -> None:
    sender, receiver = make(1, encrypt), make(2, encrypt)
    packets = [sender.seal(auth.KIND_TOTEM, bytes([i])) for i in range(10)]
    # out of order within the window is fine, each exactly once
    for index in (0, 5, 3, 9, 1, 2, 4, 8, 7, 6):
        assert receiver.open(packets[index]) is not None
    for packet in packets:
        assert receiver.open(packet) is None
    assert receiver.drops["replay"] == 10


def test_counter_older_than_window_is_replay() -> None:
    sender, receiver = make(1, False), make(2, False)
    first = sender.seal(auth.KIND_TOTEM, b"old")
    for _ in range(auth.REPLAY_WINDOW + 1):
        assert receiver.open(sender.seal(auth.KIND_TOTEM, b"new")) is not None
    assert receiver.open(first) is None
    assert receiver.drops["replay"] == 1


def test_newer_incarnation_accepted_older_dropped(encrypt: bool) -> None:
    receiver = make(2, encrypt)
    old_life = make(1, encrypt, incarnation=100)
    stale = old_life.seal(auth.KIND_TOTEM, b"before restart")
    assert receiver.open(old_life.seal(auth.KIND_TOTEM, b"a")) is not None
    new_life = make(1, encrypt, incarnation=200)  # restarted: counter starts at 1 again
    assert receiver.open(new_life.seal(auth.KIND_TOTEM, b"b")) is not None
    assert receiver.open(stale) is None
    assert receiver.open(old_life.seal(auth.KIND_TOTEM, b"c")) is None
    assert receiver.drops["replay"] == 2


def test_truncation_byte_at_a_time_and_trailing_garbage(encrypt: bool) -> None:
    sender, receiver = make(1, encrypt), make(2, encrypt)
    packet = sender.seal(auth.KIND_TOTEM, b"payload bytes")
    for length in range(len(packet)):
        assert receiver.open(packet[:length]) is None
    assert receiver.open(packet + b"\0") is None
    assert receiver.open(packet + os.urandom(40)) is None
    dropped = receiver.drops["malformed"] + receiver.drops["bad_mac"]
    assert dropped == len(packet) + 2
    assert receiver.open(packet) is not None


def test_random_garbage_never_raises(encrypt: bool) -> None:
    receiver = make(2, encrypt)
    for size in range(0, 300):
        assert receiver.open(os.urandom(size)) is None
    # valid-looking header with random rest
    header = make(1, encrypt).seal(auth.KIND_TOTEM, b"")[: auth.HEADER_BYTES]
    for _ in range(50):
        assert receiver.open(header + os.urandom(40)) is None
    assert sum(receiver.drops.values()) == 350


def test_mode_mismatch_is_malformed() -> None:
    assert make(2, True).open(make(1, False).seal(auth.KIND_TOTEM, b"x")) is None
    receiver = make(2, False)
    assert receiver.open(make(1, True).seal(auth.KIND_TOTEM, b"x")) is None
    assert receiver.drops["malformed"] == 1


def test_key_file(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "authkey")
    auth.write_key_file(path)
    assert len(auth.read_key_file(path)) == auth.KEY_DEFAULT_BYTES
    assert os.stat(path).st_mode & 0o777 == 0o400
    with pytest.raises(FileExistsError):
        auth.write_key_file(path)
    short = os.path.join(tmp_path, "short")
    with open(short, "wb") as handle:
        handle.write(b"x" * 64)
    with pytest.raises(ConfigError, match="keyfile"):
        auth.read_key_file(short)
    with pytest.raises(ConfigError):
        auth.read_key_file(os.path.join(tmp_path, "missing"))
    with pytest.raises(UsageError):
        auth.generate_key(10)


def test_seal_rejects_oversize_and_bad_kind() -> None:
    sender = make(1, False)
    with pytest.raises(UsageError):
        sender.seal(auth.KIND_TOTEM, bytes(auth.MAX_PACKET_BYTES))
    with pytest.raises(UsageError):
        sender.seal(99, b"")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), encrypt=st.booleans())
def test_fuzz_random_bytes_never_raise(data: bytes, encrypt: bool) -> None:
    receiver = make(2, encrypt)
    assert receiver.open(data) is None
    assert sum(receiver.drops.values()) == 1


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=64), index=st.integers(min_value=0),
       value=st.integers(min_value=0, max_value=255), encrypt=st.booleans())
def test_fuzz_mutated_packets(payload: bytes, index: int, value: int, encrypt: bool) -> None:
    packet = bytearray(make(1, encrypt).seal(auth.KIND_TOTEM, payload))
    index %= len(packet)
    changed = packet[index] != value
    packet[index] = value
    opened = make(2, encrypt).open(bytes(packet))
    assert (opened is None) == changed


def test_forged_incarnations_do_not_fill_the_key_cache() -> None:
    receiver = make(2, True)
    assert receiver.open(make(1, True).seal(auth.KIND_TOTEM, b"genuine")) is not None
    forger = auth.PacketAuthenticator(bytes(reversed(KEY)), "alpha", 1, 1, NODES, encrypt=True)
    forger.cluster_id = receiver.cluster_id
    for incarnation in range(1000, 1100):
        forger.incarnation = incarnation
        assert receiver.open(forger.seal(auth.KIND_TOTEM, b"x")) is None
    assert receiver.drops["bad_mac"] == 100
    assert len(receiver._aead) == 1  # only the genuine sender's key
