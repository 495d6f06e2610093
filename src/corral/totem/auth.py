"""The authenticated wire envelope around every Totem and link-health packet.

Sans-I/O: pure functions plus `PacketAuthenticator`, which holds keys, this
node's send counter and the per-sender replay windows. Layout (big endian):

    offset size field
    0      4    magic b"CRLT"
    4      1    envelope version (1)
    5      1    kind (KIND_TOTEM, KIND_PING, KIND_PONG)
    6      1    flags (FLAG_ENCRYPTED)
    7      1    reserved, must be 0
    8      8    cluster id: keyed hash of the cluster name, so foreign clusters drop
    16     4    sender nodeid
    20     8    sender incarnation (grows across restarts of the sender)
    28     8    per-packet counter (starts at 1 for every incarnation)
    36     n    payload (ciphertext when encrypted)
    36+n   16   tag: keyed BLAKE2b over bytes 0..36+n, or the AES-256-GCM tag

With encryption the header is the associated data and the AES key is derived
per (sender, incarnation), so the 12-byte nonce (nodeid, counter) never repeats
under one key even though counters restart at every incarnation.

Replay protection: per sender the newest incarnation seen and a sliding window
of `REPLAY_WINDOW` counters. Packets of an older incarnation, counters below the
window or already seen are dropped. The window only moves after the tag checked.

`open()` never raises for remote input: every drop is counted under a
`DropReason` and returns None.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import secrets
import struct
from collections.abc import Iterable
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from corral.errors import ConfigError, InvariantError, UsageError

MAGIC = b"CRLT"
ENVELOPE_VERSION = 1
KIND_TOTEM = 1
KIND_PING = 2
KIND_PONG = 3
KINDS = (KIND_TOTEM, KIND_PING, KIND_PONG)
FLAG_ENCRYPTED = 0x01

HEADER = struct.Struct(">4sBBBx8sIQQ")
HEADER_BYTES = HEADER.size  # 36
_COUNTER = struct.Struct(">Q")
_NONCE = struct.Struct(">IQ")  # sender nodeid, counter
TAG_BYTES = 16
OVERHEAD_BYTES = HEADER_BYTES + TAG_BYTES
# Counters older than this many below the highest seen are dropped as replays.
REPLAY_WINDOW = 1024
# Envelope bound: a UDP datagram payload cannot be larger anyway.
MAX_PACKET_BYTES = 65_507
# Senders whose derived AES keys are cached (one per live incarnation).
MAX_CACHED_SENDER_KEYS = 1024

KEY_MIN_BYTES = 128
KEY_MAX_BYTES = 4096
KEY_DEFAULT_BYTES = 256
MAX_COUNTER = (1 << 64) - 1


class DropReason(enum.Enum):
    MALFORMED = "malformed"
    FOREIGN_CLUSTER = "foreign_cluster"
    UNKNOWN_NODE = "unknown_node"
    BAD_MAC = "bad_mac"
    REPLAY = "replay"


class Opened(NamedTuple):
    """An authenticated packet (a tuple: built once per received datagram)."""

    kind: int
    sender_nodeid: int
    incarnation: int
    counter: int
    payload: bytes


def generate_key(size_bytes: int = KEY_DEFAULT_BYTES) -> bytes:
    """A fresh cluster key (corosync authkey style: random bytes)."""
    if not KEY_MIN_BYTES <= size_bytes <= KEY_MAX_BYTES:
        raise UsageError(f"key size {size_bytes} must be {KEY_MIN_BYTES}..{KEY_MAX_BYTES}")
    return secrets.token_bytes(size_bytes)


def check_key(key: bytes) -> None:
    if not KEY_MIN_BYTES <= len(key) <= KEY_MAX_BYTES:
        raise ConfigError(
            "totem.keyfile", f"key is {len(key)} bytes, must be {KEY_MIN_BYTES}..{KEY_MAX_BYTES}"
        )


def write_key_file(path: str, size_bytes: int = KEY_DEFAULT_BYTES) -> None:
    """Create a key file readable by its owner only; refuses to overwrite."""
    key = generate_key(size_bytes)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_key_file(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            key = handle.read(KEY_MAX_BYTES + 1)
    except OSError as error:
        raise ConfigError("totem.keyfile", f"cannot read {path}: {error.strerror}") from None
    check_key(key)
    return key


def _subkey(root: bytes, label: bytes, size_bytes: int = 32) -> bytes:
    return hashlib.blake2b(label, key=root, digest_size=size_bytes).digest()


def derive_root_key(key: bytes) -> bytes:
    """Compress the 128..4096-byte key file into a 64-byte BLAKE2b key."""
    check_key(key)
    return hashlib.blake2b(key, digest_size=64, person=b"corral-root").digest()


def cluster_id(root_key: bytes, cluster_name: str) -> bytes:
    return _subkey(root_key, b"cluster-id:" + cluster_name.encode(), 8)


class _ReplayWindow:
    """Per-sender: newest incarnation, highest counter, bitmask of recent counters."""

    __slots__ = ("highest", "incarnation", "seen_mask")

    def __init__(self, incarnation: int) -> None:
        self.incarnation = incarnation
        self.highest = 0
        self.seen_mask = 0  # bit i set = counter (highest - i) was accepted

    def is_fresh(self, incarnation: int, counter: int) -> bool:
        if incarnation != self.incarnation:
            return incarnation > self.incarnation
        if counter > self.highest:
            return True
        offset = self.highest - counter
        return offset < REPLAY_WINDOW and not (self.seen_mask >> offset) & 1

    def accept(self, incarnation: int, counter: int) -> None:
        if incarnation > self.incarnation:
            self.incarnation, self.highest, self.seen_mask = incarnation, 0, 0
        if counter > self.highest:
            shift = counter - self.highest
            mask = (self.seen_mask << shift) if shift < REPLAY_WINDOW else 0
            self.seen_mask = (mask | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.highest = counter
        else:
            self.seen_mask |= 1 << (self.highest - counter)


class PacketAuthenticator:
    """Seals outgoing and opens incoming envelopes for one node of one cluster."""

    def __init__(
        self,
        key: bytes,
        cluster_name: str,
        nodeid: int,
        incarnation: int,
        known_nodeids: Iterable[int],
        encrypt: bool = False,
    ) -> None:
        if not 0 < nodeid < 1 << 32:
            raise UsageError(f"nodeid {nodeid} out of range")
        if not 0 <= incarnation <= MAX_COUNTER:
            raise UsageError(f"incarnation {incarnation} out of range")
        self._root = derive_root_key(key)
        self._mac_key = _subkey(self._root, b"mac")
        self._encryption_root = _subkey(self._root, b"aes-256-gcm")
        self._cluster_id = cluster_id(self._root, cluster_name)
        self._nodeid = nodeid
        self._incarnation = incarnation
        self._encrypt = encrypt
        self.known_nodeids = frozenset(known_nodeids)
        self._counter = 0
        self._windows: dict[int, _ReplayWindow] = {}
        self._aead: dict[tuple[int, int], AESGCM] = {}
        self._header_prefix: dict[int, bytes] = {}
        self._own_aead: AESGCM | None = None
        self._prepare_sealing()
        self.drops: dict[str, int] = {reason.value: 0 for reason in DropReason}
        self.sealed = 0
        self.opened = 0

    def _prepare_sealing(self) -> None:
        """Every header field but the counter is fixed per kind: packed once (and
        again whenever one of the identity attributes below is changed)."""
        flags = FLAG_ENCRYPTED if self._encrypt else 0
        self._header_prefix = {
            kind: HEADER.pack(MAGIC, ENVELOPE_VERSION, kind, flags, self._cluster_id,
                              self._nodeid, self._incarnation, 0)[:-_COUNTER.size]
            for kind in KINDS
        }
        self._own_aead = (self._derive_aead(self._nodeid, self._incarnation)
                          if self._encrypt else None)

    @property
    def cluster_id(self) -> bytes:
        return self._cluster_id

    @cluster_id.setter
    def cluster_id(self, value: bytes) -> None:
        self._cluster_id = value
        self._prepare_sealing()

    @property
    def nodeid(self) -> int:
        return self._nodeid

    @nodeid.setter
    def nodeid(self, value: int) -> None:
        self._nodeid = value
        self._prepare_sealing()

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @incarnation.setter
    def incarnation(self, value: int) -> None:
        self._incarnation = value
        self._prepare_sealing()

    @property
    def encrypt(self) -> bool:
        return self._encrypt

    @encrypt.setter
    def encrypt(self, value: bool) -> None:
        self._encrypt = value
        self._prepare_sealing()

    def seal(self, kind: int, payload: bytes) -> bytes:
        prefix = self._header_prefix.get(kind)
        if prefix is None:
            raise UsageError(f"unknown envelope kind {kind}")
        if len(payload) + OVERHEAD_BYTES > MAX_PACKET_BYTES:
            raise UsageError(f"payload of {len(payload)} bytes does not fit one datagram")
        if self._counter >= MAX_COUNTER:
            raise InvariantError("packet counter exhausted; restart with a new incarnation")
        self._counter = counter = self._counter + 1
        header = prefix + _COUNTER.pack(counter)
        self.sealed += 1
        if self._own_aead is not None:
            return header + self._own_aead.encrypt(_NONCE.pack(self._nodeid, counter), payload,
                                                   header)
        body = header + payload
        return body + hashlib.blake2b(body, key=self._mac_key, digest_size=TAG_BYTES).digest()

    def open(self, packet: bytes) -> Opened | None:
        """Authenticate one received datagram; None (and a counted drop) if not acceptable."""
        if len(packet) < OVERHEAD_BYTES or len(packet) > MAX_PACKET_BYTES:
            return self._drop(DropReason.MALFORMED)
        magic, version, kind, flags, cluster, sender, incarnation, counter = HEADER.unpack_from(
            packet
        )
        if magic != MAGIC or version != ENVELOPE_VERSION or kind not in KINDS:
            return self._drop(DropReason.MALFORMED)
        if packet[7] != 0 or flags != (FLAG_ENCRYPTED if self._encrypt else 0):
            return self._drop(DropReason.MALFORMED)
        if cluster != self._cluster_id:
            return self._drop(DropReason.FOREIGN_CLUSTER)
        if sender not in self.known_nodeids:
            return self._drop(DropReason.UNKNOWN_NODE)
        window = self._windows.get(sender)
        # The usual case, the next counter of the current incarnation, is fresh
        # without a call; anything else takes the full check.
        if window is not None and not (incarnation == window.incarnation
                                       and counter > window.highest) \
                and not window.is_fresh(incarnation, counter):
            return self._drop(DropReason.REPLAY)
        payload = self._verify(packet, sender, incarnation, counter)
        if payload is None:
            return self._drop(DropReason.BAD_MAC)
        if window is None:
            window = self._windows[sender] = _ReplayWindow(incarnation)
        window.accept(incarnation, counter)
        self.opened += 1
        return Opened(kind, sender, incarnation, counter, payload)

    def _verify(self, packet: bytes, sender: int, incarnation: int, counter: int) -> bytes | None:
        header = packet[:HEADER_BYTES]
        if self._encrypt:
            nonce = _NONCE.pack(sender, counter)
            cached = self._aead.get((sender, incarnation))
            aead = cached or self._derive_aead(sender, incarnation)
            try:
                plaintext = aead.decrypt(nonce, packet[HEADER_BYTES:], header)
            except InvalidTag:
                return None
            if cached is None:  # cache only keys that opened a packet: forgeries cannot churn it
                self._remember_aead(sender, incarnation, aead)
            return plaintext
        body = packet[:-TAG_BYTES]
        expected = hashlib.blake2b(body, key=self._mac_key, digest_size=TAG_BYTES).digest()
        if not hmac.compare_digest(expected, packet[-TAG_BYTES:]):
            return None
        return packet[HEADER_BYTES:-TAG_BYTES]

    def _sender_aead(self, sender: int, incarnation: int) -> AESGCM:
        """The AES-256-GCM key of one sender incarnation (cached, bounded)."""
        aead = self._aead.get((sender, incarnation))
        if aead is None:
            aead = self._derive_aead(sender, incarnation)
            self._remember_aead(sender, incarnation, aead)
        return aead

    def _derive_aead(self, sender: int, incarnation: int) -> AESGCM:
        label = struct.pack(">IQ", sender, incarnation)
        return AESGCM(_subkey(self._encryption_root, label))

    def _remember_aead(self, sender: int, incarnation: int, aead: AESGCM) -> None:
        if len(self._aead) >= MAX_CACHED_SENDER_KEYS:
            self._aead.clear()
        self._aead[(sender, incarnation)] = aead

    def _drop(self, reason: DropReason) -> Opened | None:
        """Count a dropped packet; returns None so callers can `return self._drop(...)`."""
        self.drops[reason.value] += 1
        return None

    def stats(self) -> dict[str, int]:
        result = {f"drop_{name}": count for name, count in self.drops.items()}
        result["sealed"] = self.sealed
        result["opened"] = self.opened
        return result
