"""The fixed rules of the configuration tree: names, limits, guest configs,
locks, modes. Pure functions over paths and inputs; no state, no I/O.

Paths are relative to the mount root, "/"-separated, with no leading or
trailing slash ("" is the root). Errno values come from the `errno` module,
so they are the host's numbers and match what FUSE returns to callers.
"""

from __future__ import annotations

import errno
import functools
import re
from dataclasses import dataclass

from corral.errors import ConfigError

NAME_MAX_BYTES = 255
PATH_MAX_BYTES = 4096
CHUNK_SIZE = 4096

# Root entries the daemon serves itself; users can neither create nor remove them.
GENERATED_FILES = frozenset({".version", ".members", ".vmlist", ".clusterlog", ".rrd", ".debug"})
ROOT_SYMLINKS = frozenset({"local", "qemu-server", "lxc", "openvz"})
ROOT_VIRTUAL = GENERATED_FILES | ROOT_SYMLINKS

LOCK_DIR = "priv/lock"
_LOCK_PREFIX = LOCK_DIR + "/"
# Lock expiry: the default (the reference's fixed 120 s) and the bounds of the
# cluster-wide setting read from LOCK_EXPIRY_CONFIG (see locks.py).
LOCK_EXPIRY_NS = 120 * 1_000_000_000
LOCK_EXPIRY_MIN_NS = 10 * 1_000_000_000
LOCK_EXPIRY_MAX_NS = 600 * 1_000_000_000
LOCK_EXPIRY_CONFIG = "datacenter.cfg"

# A guest config: nodes/<host name>/<kind>/<id>.conf, the id without leading
# zeros. The 32-bit bound is checked separately (a regex cannot say it).
_GUEST_CONFIG = re.compile(
    r"nodes/([A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)/(qemu-server|lxc|openvz)/([1-9][0-9]{0,9})\.conf"
)
GUEST_TYPES = {"qemu-server": "qemu", "lxc": "lxc", "openvz": "openvz"}
_NODE_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_GUEST_FILE = re.compile(r"([1-9][0-9]{0,9})\.conf")
VMID_MAX = (1 << 32) - 1

# Files whose change counters appear in `.version` (what PVE clients watch).
OBSERVED_PATHS = (
    "corosync.conf", "storage.cfg", "datacenter.cfg", "user.cfg", "domains.cfg",
    "notifications.cfg", "priv/notifications.cfg", "priv/shadow.cfg", "priv/acme/plugins.cfg",
    "priv/tfa.cfg", "priv/token.cfg", "priv/ipam.db", "priv/macs.db", "replication.cfg",
    "ha/crm_commands", "ha/manager_status", "ha/resources.cfg", "ha/groups.cfg",
    "ha/rules.cfg", "ha/fence.cfg", "status.cfg", "vzdump.cron", "vzdump.conf",
    "jobs.cfg", "sdn/vnets.cfg", "sdn/zones.cfg", "sdn/controllers.cfg", "sdn/subnets.cfg",
    "sdn/ipams.cfg", "sdn/dns.cfg", "sdn/fabrics.cfg", "sdn/.running-config",
    "virtual-guest/cpu-models.conf", "virtual-guest/profiles.cfg", "firewall/cluster.fw",
    "mapping/directory.cfg", "mapping/pci.cfg", "mapping/usb.cfg", "ceph.conf",
    "acme/accounts", "metricserver.cfg", "pools.cfg",
)


@dataclass(frozen=True, slots=True)
class Limits:
    """Enforced limits. The reference enforces only the per-file size; Corral
    enforces all three and rejects an oversize write whole."""

    file_size_max_bytes: int = 1024 * 1024
    total_size_max_bytes: int = 4 * 1024 * 1024 * 1024
    inodes_max: int = 1_000_000

    def __post_init__(self) -> None:
        if not 0 < self.file_size_max_bytes <= 16 * 1024 * 1024:
            raise ConfigError("file_size_max_bytes", "must be in 1 B .. 16 MiB")
        if self.total_size_max_bytes < self.file_size_max_bytes:
            raise ConfigError("total_size_max_bytes", "smaller than the file size limit")
        if self.inodes_max < 1:
            raise ConfigError("inodes_max", "must be positive")


@dataclass(frozen=True, slots=True)
class GuestConfig:
    node: str
    kind: str  # "qemu", "lxc" or "openvz", as `.vmlist` names them
    vmid: int


def path_error(path: str) -> int:
    """0 if `path` is a well-formed tree path, else the errno to return."""
    if not path:
        return 0
    # Fast accept for the common case (runs on every operation): a short
    # ASCII path with no NUL, no empty name and no name starting with a dot
    # is well-formed. Anything else takes the full check below.
    if len(path) <= NAME_MAX_BYTES and path.isascii() and "\0" not in path \
            and path[0] != "/" and path[-1] != "/" and path[0] != "." \
            and "//" not in path and "/." not in path:
        return 0
    return _path_error_full(path)


def _path_error_full(path: str) -> int:
    if len(path.encode("utf-8", "surrogateescape")) > PATH_MAX_BYTES:
        return errno.ENAMETOOLONG
    for name in path.split("/"):
        if name in ("", ".", ".."):
            return errno.EINVAL
        if "\0" in name:
            return errno.EINVAL
        if len(name.encode("utf-8", "surrogateescape")) > NAME_MAX_BYTES:
            return errno.ENAMETOOLONG
    return 0


def split_parent(path: str) -> tuple[str, str]:
    """("a/b", "c") for "a/b/c"; ("", "c") for "c"."""
    head, _, tail = path.rpartition("/")
    return head, tail


def is_root_virtual(path: str) -> bool:
    return "/" not in path and path in ROOT_VIRTUAL


def is_generated_file(path: str) -> bool:
    return "/" not in path and path in GENERATED_FILES


def is_lock_path(path: str) -> bool:
    """A lock is a direct child directory of priv/lock."""
    if not path.startswith(_LOCK_PREFIX):
        return False
    head, name = split_parent(path)
    return head == LOCK_DIR and bool(name)


def guest_config(path: str) -> GuestConfig | None:
    """The guest config `path` names, if it matches the reference's pattern."""
    if not path.startswith("nodes/") or not path.endswith(".conf"):
        return None
    return _guest_config_match(path)


# The apply step asks about one path several times per operation (conflict
# check, registration); GuestConfig is immutable, so answers can be shared.
@functools.lru_cache(maxsize=4096)
def _guest_config_match(path: str) -> GuestConfig | None:
    match = _GUEST_CONFIG.fullmatch(path)
    if match is None:
        return None
    node, kind_dir, digits = match.groups()
    vmid = int(digits)
    if vmid > VMID_MAX:
        return None
    return GuestConfig(node, GUEST_TYPES[kind_dir], vmid)


def is_node_name(name: str) -> bool:
    return _NODE_NAME.fullmatch(name) is not None


def guest_file_vmid(name: str) -> int | None:
    """The VMID of a file named `<id>.conf` in a guest directory, if valid."""
    match = _GUEST_FILE.fullmatch(name)
    if match is None:
        return None
    vmid = int(match.group(1))
    return vmid if vmid <= VMID_MAX else None


def is_private(path: str) -> bool:
    """priv/... and nodes/<node>/priv/... are owner-only."""
    parts = path.split("/")
    if parts[0] == "priv":
        return True
    return len(parts) >= 3 and parts[0] == "nodes" and parts[2] == "priv"


def mode_of(path: str, is_dir: bool, quorate: bool) -> int:
    """Permission bits derived from the path and quorum, never stored:
    0755/0640 with quorum, 0555/0440 without; private paths owner-only."""
    if is_generated_file(path):
        return 0o640 if path == ".debug" else 0o440
    if is_dir or path in ROOT_SYMLINKS:
        mode = 0o755 if quorate else 0o555
    else:
        mode = 0o640 if quorate else 0o440
    if is_private(path):
        mode &= 0o700
    return mode


def chmod_error(path: str, mode: int) -> int:
    """chmod is a no-op that succeeds only for the fixed mode of the path."""
    wanted = 0o600 if is_private(path) else 0o640
    return 0 if (mode & 0o7777) == wanted else errno.EPERM


def chown_error(uid: int, gid: int, www_data_gid: int) -> int:
    """chown succeeds only to root / www-data; -1 means "unchanged"."""
    if uid not in (-1, 0) or gid not in (-1, www_data_gid):
        return errno.EPERM
    return 0


# Operations the tree never supports, with the reference's errnos.
SYMLINK_ERRNO = errno.ENOSYS
MKNOD_ERRNO = errno.ENOSYS
LINK_ERRNO = errno.EPERM
SETXATTR_ERRNO = errno.ENOTSUP
