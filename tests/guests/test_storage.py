"""storage.cfg parsing (dir storages, content types, shared flag, errors) and volumes
created, listed, sized and removed with the real qemu-img in a temp directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from corral.guests import storage

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")


def _cfg(tmp_path: Path) -> storage.StorageConfig:
    text = (f"dir: local\n\tpath {tmp_path}/local\n\tcontent images,iso\n\n"
            f"# comment\ndir: shared\n\tpath {tmp_path}/shared\n\tcontent images\n\tshared 1\n\n"
            f"dir: isos\n\tpath {tmp_path}/isos\n\tcontent iso\n")
    return storage.parse_storage_cfg(text)


def test_parse_storages(tmp_path: Path) -> None:
    config = _cfg(tmp_path)
    assert list(config.storages) == ["local", "shared", "isos"]
    assert config.get("shared").shared and not config.get("local").shared
    assert config.get("local").content == ("images", "iso")


@pytest.mark.parametrize(("text", "message"), [
    ("lvm: vg\n\tpath /x\n", "only 'dir"),
    ("dir: a\n\tcontent images\n", "missing path"),
    ("dir: a\n\tpath relative\n", "must be absolute"),
    ("dir: a\n\tpath /x\n\tcontent images,movies\n", "unknown content type 'movies'"),
    ("dir: a\n\tpath /x\n\tshared yes\n", "shared must be 0 or 1"),
    ("dir: a\n\tpath /x\n\tcolour blue\n", "unknown option 'colour'"),
    ("dir: a\n\tpath /x\ndir: a\n\tpath /y\n", "duplicate storage id"),
    ("\tpath /x\n", "outside a storage section"),
])
def test_bad_storage_cfg(text: str, message: str) -> None:
    with pytest.raises(storage.StorageError, match=message):
        storage.parse_storage_cfg(text)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_volume_create_list_remove(tmp_path: Path, fmt: str) -> None:
    config = _cfg(tmp_path)
    first = storage.create_volume(config, "local", 100, "64M", fmt)
    second = storage.create_volume(config, "local", 100, "1G", fmt)
    assert first == f"local:100/vm-100-disk-0.{fmt}"
    assert second == f"local:100/vm-100-disk-1.{fmt}"
    assert os.path.exists(storage.volume_path(config, first))
    listed = storage.list_volumes(config, "local", 100)
    assert [(v["volid"], v["size"], v["format"]) for v in listed] == [
        (first, 64 << 20, fmt), (second, 1 << 30, fmt)]
    storage.remove_volume(config, first)
    assert [v["volid"] for v in storage.list_volumes(config, "local")] == [second]
    # the freed index is reused for the next volume
    assert storage.create_volume(config, "local", 100, "1M", fmt).endswith(f"disk-0.{fmt}")
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.remove_volume(config, "local:100/vm-100-disk-7.raw")


def test_volume_errors(tmp_path: Path) -> None:
    config = _cfg(tmp_path)
    with pytest.raises(storage.StorageError, match="storage 'nope' does not exist"):
        storage.create_volume(config, "nope", 100, "1G")
    with pytest.raises(storage.StorageError, match="content type 'images'"):
        storage.create_volume(config, "isos", 100, "1G")
    with pytest.raises(storage.StorageError, match="unsupported volume format"):
        storage.create_volume(config, "local", 100, "1G", "vmdk")
    with pytest.raises(storage.StorageError, match="invalid size"):
        storage.create_volume(config, "local", 100, "big")
    with pytest.raises(storage.StorageError, match="invalid volume"):
        storage.volume_path(config, "local:../../etc/passwd")
    with pytest.raises(storage.StorageError, match="invalid volume id"):
        storage.volume_path(config, "no-colon")


def test_free_space(tmp_path: Path) -> None:
    config = _cfg(tmp_path)
    os.makedirs(config.get("local").path)
    space = config.get("local").free_space()
    stats = os.statvfs(config.get("local").path)
    assert space["total"] == stats.f_blocks * stats.f_frsize
    assert 0 < space["avail"] <= space["total"] and 0 <= space["used"] <= space["total"]
