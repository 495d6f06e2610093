"""VM configuration files in the reference's `key: value` format.

A config is an ordered list of keys; leading `#` lines are the description. Every value
is validated against the key's schema when parsed or set, so a bad file or a bad
`qm set` fails with a `ConfigError` that names the key. Order and unknown-but-valid
formatting survive a parse/write round trip because values are stored as written.
Snapshot (`[name]`) and `[PENDING]` sections are rejected for now.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

MAX_CONFIG_BYTES = 512 * 1024       # bound on a config file (the reference's pmxcfs limit)
MAX_DESCRIPTION_BYTES = 8 * 1024
VMID_MIN, VMID_MAX = 100, 999_999_999

LOCK_VALUES = ("backup", "clone", "create", "migrate", "rollback", "snapshot",
               "snapshot-delete", "suspending", "suspended", "destroyed")
NET_MODELS = ("virtio", "e1000", "rtl8139", "vmxnet3")
DISK_BUSES = {"scsi": 31, "virtio": 16, "ide": 4, "sata": 6}
_NAME_RE = re.compile(r"^(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
                      r"(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
_TAG_RE = re.compile(r"^[a-z0-9_][a-z0-9_+.-]*$", re.IGNORECASE)
_VOLID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*:[A-Za-z0-9_./-]+$")
_SIZE_RE = re.compile(r"^\d+(\.\d+)?[KMGT]?$")
_CPU_MODEL_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")
_BRIDGE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class ConfigError(ValueError):
    """A config key or value is invalid; `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def is_valid_vmid(vmid: int) -> bool:
    return VMID_MIN <= vmid <= VMID_MAX


# --- property strings ("default,key=value,...") -------------------------------------------


def parse_property_string(key: str, value: str, default_key: str | None) -> dict[str, str]:
    """Split `a,b=c` into a dict; a bare first item is stored under default_key."""
    result: dict[str, str] = {}
    for index, item in enumerate(value.split(",")):
        if not item:
            raise ConfigError(key, f"empty item in {value!r}")
        name, sep, item_value = item.partition("=")
        if not sep:
            if index != 0 or default_key is None:
                raise ConfigError(key, f"item {item!r} needs the form name=value")
            name, item_value = default_key, item
        if name in result:
            raise ConfigError(key, f"duplicate property {name!r}")
        result[name] = item_value
    return result


def _check_props(key: str, props: dict[str, str], allowed: dict[str, Callable[[str], bool]]) -> None:
    for name, item_value in props.items():
        check = allowed.get(name)
        if check is None:
            raise ConfigError(key, f"unknown property {name!r}")
        if not check(item_value):
            raise ConfigError(key, f"invalid value {item_value!r} for property {name!r}")


def _is_bool(value: str) -> bool:
    return value in ("0", "1")


def _int_between(low: int, high: int) -> Callable[[str], bool]:
    def check(value: str) -> bool:
        return value.isdigit() and low <= int(value) <= high
    return check


def _any(value: str) -> bool:
    return bool(value) and "\n" not in value


def parse_size_bytes(size: str) -> int:
    """`32G` -> bytes; a bare number is bytes (as the reference's size= property)."""
    if not _SIZE_RE.match(size):
        raise ValueError(f"invalid size {size!r}")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if size[-1] in units:
        return int(float(size[:-1]) * units[size[-1]])
    return int(float(size))


# --- per-key validators --------------------------------------------------------------------


def _validate_int(low: int, high: int) -> Callable[[str, str], None]:
    def validate(key: str, value: str) -> None:
        if not value.isdigit() or not low <= int(value) <= high:
            raise ConfigError(key, f"expected an integer {low}..{high}, got {value!r}")
    return validate


def _validate_bool(key: str, value: str) -> None:
    if not _is_bool(value):
        raise ConfigError(key, f"expected 0 or 1, got {value!r}")


def _validate_name(key: str, value: str) -> None:
    if not _NAME_RE.match(value):
        raise ConfigError(key, f"invalid DNS name {value!r}")


def _validate_tags(key: str, value: str) -> None:
    for tag in re.split(r"[;, ]+", value.strip()):
        if tag and not _TAG_RE.match(tag):
            raise ConfigError(key, f"invalid tag {tag!r}")


def _validate_lock(key: str, value: str) -> None:
    if value not in LOCK_VALUES:
        raise ConfigError(key, f"unknown lock {value!r} (one of {', '.join(LOCK_VALUES)})")


def _validate_cpu(key: str, value: str) -> None:
    props = parse_property_string(key, value, "cputype")
    _check_props(key, props, {"cputype": lambda v: bool(_CPU_MODEL_RE.match(v)),
                              "flags": lambda v: bool(re.match(r"^([+-][A-Za-z0-9_.-]+;?)+$", v))})
    if "cputype" not in props:
        raise ConfigError(key, "missing the CPU model")


def _validate_net(key: str, value: str) -> None:
    props = parse_property_string(key, value, None) if "=" in value.split(",")[0] else {}
    if not props:
        raise ConfigError(key, f"expected model=MAC,... got {value!r}")
    models = [name for name in props if name in NET_MODELS]
    if len(models) != 1:
        raise ConfigError(key, f"exactly one model ({'|'.join(NET_MODELS)})=MAC is required")
    allowed: dict[str, Callable[[str], bool]] = {m: lambda v: bool(_MAC_RE.match(v)) for m in NET_MODELS}
    allowed.update({"bridge": lambda v: bool(_BRIDGE_RE.match(v)), "firewall": _is_bool,
                    "link_down": _is_bool, "tag": _int_between(1, 4094),
                    "rate": lambda v: bool(re.match(r"^\d+(\.\d+)?$", v)),
                    "mtu": _int_between(1, 65520), "queues": _int_between(0, 64)})
    _check_props(key, props, allowed)


def _validate_disk(key: str, value: str) -> None:
    props = parse_property_string(key, value, "file")
    _check_props(key, props, {
        "file": _any, "size": lambda v: bool(_SIZE_RE.match(v)), "media": lambda v: v in ("disk", "cdrom"),
        "cache": lambda v: v in ("none", "writethrough", "writeback", "unsafe", "directsync"),
        "format": lambda v: v in ("raw", "qcow2"), "iothread": _is_bool, "discard": lambda v: v in ("on", "ignore"),
        "ssd": _is_bool, "backup": _is_bool, "replicate": _is_bool, "shared": _is_bool,
        "serial": lambda v: bool(re.match(r"^[A-Za-z0-9_-]{1,20}$", v)),
    })
    volume = props.get("file", "")
    if volume != "none" and not _VOLID_RE.match(volume):
        raise ConfigError(key, f"invalid volume {volume!r} (expected storage:vmid/name or none)")
    if volume == "none" and props.get("media") != "cdrom":
        raise ConfigError(key, "'none' is only allowed for media=cdrom")


def _validate_boot(key: str, value: str) -> None:
    props = parse_property_string(key, value, "legacy")
    _check_props(key, props, {"order": lambda v: bool(re.match(r"^[a-z]+\d+(;[a-z]+\d+)*$", v)),
                              "legacy": lambda v: bool(re.match(r"^[acdn]{1,4}$", v))})


def _validate_serial(key: str, value: str) -> None:
    if value != "socket" and not re.match(r"^/dev/.+$", value):
        raise ConfigError(key, f"expected 'socket' or a /dev path, got {value!r}")


def _validate_args(key: str, value: str) -> None:
    try:
        shlex.split(value)
    except ValueError as exc:
        raise ConfigError(key, f"cannot split arguments: {exc}") from None


def _validate_ostype(key: str, value: str) -> None:
    allowed = ("other", "wxp", "w2k", "w2k3", "w2k8", "wvista", "win7", "win8", "win10", "win11",
               "l24", "l26", "solaris")
    if value not in allowed:
        raise ConfigError(key, f"unknown ostype {value!r}")


def _validate_machine(key: str, value: str) -> None:
    if not re.match(r"^(pc|q35|pc-i440fx-[\d.]+|pc-q35-[\d.]+)(\+pve\d+)?$", value):
        raise ConfigError(key, f"unknown machine type {value!r}")


def _validate_description(key: str, value: str) -> None:
    if len(value.encode()) > MAX_DESCRIPTION_BYTES:
        raise ConfigError(key, f"longer than {MAX_DESCRIPTION_BYTES} bytes")


SIMPLE_KEYS: dict[str, Callable[[str, str], None]] = {
    "name": _validate_name,
    "memory": _validate_int(16, 4 * 1024 * 1024),
    "balloon": _validate_int(0, 4 * 1024 * 1024),
    "cores": _validate_int(1, 1024),
    "sockets": _validate_int(1, 16),
    "vcpus": _validate_int(1, 4096),
    "cpu": _validate_cpu,
    "boot": _validate_boot,
    "onboot": _validate_bool,
    "agent": _validate_bool,
    "tags": _validate_tags,
    "lock": _validate_lock,
    "ostype": _validate_ostype,
    "machine": _validate_machine,
    "args": _validate_args,
    "migrate_speed": _validate_int(0, 1 << 30),
    "migrate_downtime": lambda key, value: _validate_float(key, value, 0.0, 2000.0),
    "description": _validate_description,
}
INDEXED_KEYS: dict[str, tuple[int, Callable[[str, str], None]]] = {
    "net": (32, _validate_net),
    "serial": (4, _validate_serial),
    **{bus: (count, _validate_disk) for bus, count in DISK_BUSES.items()},
}
_INDEXED_RE = re.compile(r"^([a-z]+)(\d+)$")


def _validate_float(key: str, value: str, low: float, high: float) -> None:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(key, f"expected a number, got {value!r}") from None
    if not low <= number <= high:
        raise ConfigError(key, f"expected {low}..{high}, got {value!r}")


def validate(key: str, value: str) -> None:
    """Raise ConfigError unless `key: value` is a known key with a valid value."""
    if key in SIMPLE_KEYS:
        SIMPLE_KEYS[key](key, value)
        return
    match = _INDEXED_RE.match(key)
    if match and match.group(1) in INDEXED_KEYS:
        count, validator = INDEXED_KEYS[match.group(1)]
        if str(int(match.group(2))) != match.group(2) or int(match.group(2)) >= count:
            raise ConfigError(key, f"index out of range (0..{count - 1})")
        validator(key, value)
        return
    raise ConfigError(key, "unknown configuration key")


def is_disk_key(key: str) -> bool:
    match = _INDEXED_RE.match(key)
    return bool(match) and match.group(1) in DISK_BUSES  # type: ignore[union-attr]


# --- the config object ---------------------------------------------------------------------


@dataclass
class VmConfig:
    """An ordered VM config; `description` is kept apart, as the file keeps it on top."""

    entries: dict[str, str] = field(default_factory=dict)
    description: str = ""

    def get(self, key: str, default: str | None = None) -> str | None:
        if key == "description":
            return self.description or default
        return self.entries.get(key, default)

    def set(self, key: str, value: str) -> None:
        validate(key, value)
        if key == "description":
            self.description = value
        else:
            self.entries[key] = value

    def delete(self, key: str) -> None:
        if key == "description":
            self.description = ""
        elif key in self.entries:
            del self.entries[key]
        else:
            raise ConfigError(key, "not set, cannot delete")

    def disks(self) -> Iterator[tuple[str, dict[str, str]]]:
        for key, value in self.entries.items():
            if is_disk_key(key):
                yield key, parse_property_string(key, value, "file")

    def int_value(self, key: str, default: int) -> int:
        value = self.entries.get(key)
        return default if value is None else int(value)

    def as_dict(self) -> dict[str, str]:
        result = dict(self.entries)
        if self.description:
            result["description"] = self.description
        return result


def parse_config(text: str) -> VmConfig:
    """Parse a config file's text; raise ConfigError naming the first bad key."""
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError("<file>", f"config larger than {MAX_CONFIG_BYTES} bytes")
    config = VmConfig()
    description_lines: list[str] = []
    seen_key = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not line:
            continue
        if line.startswith("#"):
            if seen_key:
                raise ConfigError("description", f"line {number}: comment after the first key")
            description_lines.append(line[1:])
            continue
        if line.startswith("["):
            raise ConfigError(line, f"line {number}: snapshot/pending sections are not supported yet")
        key, sep, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not re.match(r"^[a-z][a-z0-9_-]*$", key):
            raise ConfigError(key or line, f"line {number}: expected 'key: value'")
        if key in config.entries or key == "description":
            raise ConfigError(key, f"line {number}: duplicate or misplaced key")
        validate(key, value)
        config.entries[key] = value
        seen_key = True
    config.description = "\n".join(description_lines)
    return config


def write_config(config: VmConfig) -> str:
    """Render a config to text (description first as # lines, then keys in order)."""
    lines = [f"#{line}" for line in config.description.split("\n")] if config.description else []
    lines += [f"{key}: {value}" for key, value in config.entries.items()]
    return "\n".join(lines) + "\n"
