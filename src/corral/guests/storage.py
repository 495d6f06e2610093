"""storage.cfg with `dir` storages, and volumes on them created with qemu-img.

storage.cfg uses the reference's layout: a `dir: <id>` header followed by tab-indented
`key value` lines. A volume id is `<storage>:<vmid>/<file>` and lives at
`<path>/images/<vmid>/<file>`; ISO images are `<storage>:iso/<file>` under
`<path>/template/iso/`. `shared 1` marks a directory every node sees (stands in for NFS).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field

from corral.guests.config import parse_size_bytes

CONTENT_TYPES = ("images", "rootdir", "iso", "vztmpl", "backup", "snippets")
VOLUME_FORMATS = ("raw", "qcow2")
QEMU_IMG_TIMEOUT_S = 60
_STORAGE_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_VOLUME_NAME_RE = re.compile(r"^(vm|base)-(\d+)-disk-(\d+)\.(raw|qcow2)$")


class StorageError(ValueError):
    """A storage definition or a volume operation is invalid."""


@dataclass
class Storage:
    storage_id: str
    path: str
    content: tuple[str, ...] = ("images", "iso")
    shared: bool = False
    disabled: bool = False
    nodes: tuple[str, ...] = ()          # empty: every node

    def images_dir(self, vmid: int) -> str:
        return os.path.join(self.path, "images", str(vmid))

    def free_space(self) -> dict[str, int]:
        """total/used/avail bytes of the file system holding the storage."""
        stats = os.statvfs(self.path)
        total = stats.f_blocks * stats.f_frsize
        avail = stats.f_bavail * stats.f_frsize
        used = total - stats.f_bfree * stats.f_frsize
        return {"total": total, "used": used, "avail": avail}


@dataclass
class StorageConfig:
    storages: dict[str, Storage] = field(default_factory=dict)

    def get(self, storage_id: str) -> Storage:
        storage = self.storages.get(storage_id)
        if storage is None:
            raise StorageError(f"storage '{storage_id}' does not exist")
        if storage.disabled:
            raise StorageError(f"storage '{storage_id}' is disabled")
        return storage


def _parse_option(storage: Storage, key: str, value: str) -> None:
    if key == "path":
        if not value.startswith("/"):
            raise StorageError(f"storage '{storage.storage_id}': path must be absolute")
        storage.path = value
    elif key == "content":
        types = tuple(item for item in value.split(",") if item)
        for item in types:
            if item not in CONTENT_TYPES:
                raise StorageError(f"storage '{storage.storage_id}': unknown content type '{item}'")
        storage.content = types
    elif key in ("shared", "disable"):
        if value not in ("0", "1"):
            raise StorageError(f"storage '{storage.storage_id}': {key} must be 0 or 1")
        if key == "shared":
            storage.shared = value == "1"
        else:
            storage.disabled = value == "1"
    elif key == "nodes":
        storage.nodes = tuple(item for item in value.split(",") if item)
    elif key not in ("prune-backups", "mkdir", "is_mountpoint"):
        raise StorageError(f"storage '{storage.storage_id}': unknown option '{key}'")


def parse_storage_cfg(text: str) -> StorageConfig:
    config = StorageConfig()
    current: Storage | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if not raw[0].isspace():
            kind, sep, storage_id = raw.partition(":")
            storage_id = storage_id.strip()
            if not sep or kind.strip() != "dir":
                raise StorageError(f"line {number}: only 'dir: <id>' storages are supported")
            if not _STORAGE_ID_RE.match(storage_id) or storage_id in config.storages:
                raise StorageError(f"line {number}: invalid or duplicate storage id '{storage_id}'")
            current = Storage(storage_id=storage_id, path="")
            config.storages[storage_id] = current
            continue
        if current is None:
            raise StorageError(f"line {number}: option outside a storage section")
        key, _, value = raw.strip().partition(" ")
        _parse_option(current, key, value.strip())
    for storage in config.storages.values():
        if not storage.path:
            raise StorageError(f"storage '{storage.storage_id}': missing path")
    return config


def load_storage_cfg(root: str) -> StorageConfig:
    path = os.path.join(root, "storage.cfg")
    try:
        with open(path, encoding="utf-8") as handle:
            return parse_storage_cfg(handle.read())
    except FileNotFoundError:
        raise StorageError(f"{path} does not exist") from None


def split_volume_id(volume_id: str) -> tuple[str, str]:
    storage_id, sep, name = volume_id.partition(":")
    if not sep or not _STORAGE_ID_RE.match(storage_id) or not name or ".." in name:
        raise StorageError(f"invalid volume id '{volume_id}'")
    return storage_id, name


def volume_path(config: StorageConfig, volume_id: str) -> str:
    storage_id, name = split_volume_id(volume_id)
    storage = config.get(storage_id)
    if name.startswith("iso/"):
        return os.path.join(storage.path, "template", "iso", name[4:])
    vmid_text, sep, file_name = name.partition("/")
    if not sep or not vmid_text.isdigit() or not _VOLUME_NAME_RE.match(file_name):
        raise StorageError(f"invalid volume name in '{volume_id}'")
    return os.path.join(storage.images_dir(int(vmid_text)), file_name)


def volume_format(volume_id: str) -> str:
    return "qcow2" if volume_id.endswith(".qcow2") else "raw"


def _qemu_img(*args: str) -> str:
    try:
        result = subprocess.run(["qemu-img", *args], capture_output=True, text=True,
                                timeout=QEMU_IMG_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise StorageError("qemu-img is not installed (apt-get install qemu-utils)") from None
    if result.returncode != 0:
        raise StorageError(f"qemu-img {args[0]} failed: {result.stderr.strip()}")
    return result.stdout


def create_volume(config: StorageConfig, storage_id: str, vmid: int, size: str,
                  fmt: str = "qcow2") -> str:
    """Allocate the next free vm-<vmid>-disk-<n> volume; returns its volume id."""
    storage = config.get(storage_id)
    if "images" not in storage.content:
        raise StorageError(f"storage '{storage_id}' does not allow content type 'images'")
    if fmt not in VOLUME_FORMATS:
        raise StorageError(f"unsupported volume format '{fmt}' (raw or qcow2)")
    try:
        size_bytes = parse_size_bytes(size)
    except ValueError as exc:
        raise StorageError(str(exc)) from None
    if size_bytes <= 0:
        raise StorageError("volume size must be positive")
    directory = storage.images_dir(vmid)
    os.makedirs(directory, exist_ok=True)
    used = {int(m.group(3)) for m in map(_VOLUME_NAME_RE.match, os.listdir(directory)) if m}
    index = next(i for i in range(len(used) + 1) if i not in used)
    file_name = f"vm-{vmid}-disk-{index}.{fmt}"
    _qemu_img("create", "-q", "-f", fmt, os.path.join(directory, file_name), str(size_bytes))
    return f"{storage_id}:{vmid}/{file_name}"


def remove_volume(config: StorageConfig, volume_id: str) -> None:
    path = volume_path(config, volume_id)
    try:
        os.unlink(path)
    except FileNotFoundError:
        raise StorageError(f"volume '{volume_id}' does not exist") from None


def list_volumes(config: StorageConfig, storage_id: str, vmid: int | None = None) -> list[dict[str, object]]:
    """Volumes on a storage (optionally one guest's) with format and virtual size."""
    storage = config.get(storage_id)
    base = os.path.join(storage.path, "images")
    vmids = [str(vmid)] if vmid is not None else (sorted(os.listdir(base)) if os.path.isdir(base) else [])
    volumes: list[dict[str, object]] = []
    for vmid_text in vmids:
        directory = os.path.join(base, vmid_text)
        if not os.path.isdir(directory):
            continue
        for file_name in sorted(os.listdir(directory)):
            if not _VOLUME_NAME_RE.match(file_name):
                continue
            volume_id = f"{storage_id}:{vmid_text}/{file_name}"
            volumes.append({"volid": volume_id, "vmid": int(vmid_text), "format": volume_format(file_name),
                            "size": volume_size(os.path.join(directory, file_name))})
    return volumes


def volume_size(path: str) -> int:
    import json

    info = json.loads(_qemu_img("info", "--output=json", "-U", path))
    return int(info["virtual-size"])
