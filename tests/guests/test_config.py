"""VM config parsing and writing: round trip keeps order and description, and every
malformed or unknown key fails with a ConfigError that names that key."""

from __future__ import annotations

import pytest

from corral.guests.config import ConfigError, VmConfig, parse_config, write_config

SAMPLE = """#web server
# second line
name: web1
memory: 2048
cores: 2
sockets: 1
cpu: qemu64,flags=+aes
net0: virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1
scsi0: local:100/vm-100-disk-0.qcow2,iothread=1,size=32G
virtio0: shared:100/vm-100-disk-1.raw,size=4G
ide2: none,media=cdrom
boot: order=scsi0;net0
onboot: 1
tags: prod;web
lock: migrate
serial0: socket
args: -kernel /k -append 'console=ttyS0 quiet'
migrate_downtime: 0.1
"""


def test_round_trip_preserves_order_and_description() -> None:
    config = parse_config(SAMPLE)
    assert config.description == "web server\n second line"
    assert list(config.entries)[:3] == ["name", "memory", "cores"]
    assert write_config(config) == SAMPLE
    assert write_config(parse_config(write_config(config))) == SAMPLE


def test_set_and_delete_keep_position() -> None:
    config = parse_config(SAMPLE)
    config.set("memory", "4096")
    config.set("net1", "e1000=BC:24:11:00:00:02")
    config.delete("lock")
    keys = list(config.entries)
    assert keys[1] == "memory" and keys[-1] == "net1" and "lock" not in keys
    assert dict(config.disks())["scsi0"]["file"] == "local:100/vm-100-disk-0.qcow2"


BAD = [
    ("frobnicate", "1", "unknown configuration key"),
    ("memory", "lots", "expected an integer"),
    ("memory", "8", "expected an integer"),
    ("cores", "0", "expected an integer"),
    ("sockets", "17", "expected an integer"),
    ("name", "bad_name!", "invalid DNS name"),
    ("onboot", "yes", "expected 0 or 1"),
    ("tags", "ok;b@d", "invalid tag"),
    ("lock", "forever", "unknown lock"),
    ("cpu", "qemu64,flags=aes", "invalid value"),
    ("cpu", "qemu64,speed=3", "unknown property"),
    ("net0", "virtio=zz:zz", "invalid value"),
    ("net0", "bridge=vmbr0", "exactly one model"),
    ("net0", "virtio=BC:24:11:00:00:01,colour=blue", "unknown property"),
    ("net32", "virtio=BC:24:11:00:00:01", "index out of range"),
    ("net01", "virtio=BC:24:11:00:00:01", "index out of range"),
    ("scsi0", "no-storage-here", "invalid volume"),
    ("scsi0", "local:100/d.qcow2,size=huge", "invalid value"),
    ("scsi0", "none", "only allowed for media=cdrom"),
    ("scsi0", "local:100/d.qcow2,,size=1G", "empty item"),
    ("scsi0", "local:1,size=1G,size=2G", "duplicate property"),
    ("virtio16", "local:1", "index out of range"),
    ("ide4", "local:1", "index out of range"),
    ("boot", "order=scsi0;;net0", "invalid value"),
    ("serial0", "tcp", "expected 'socket'"),
    ("args", "-append 'unterminated", "cannot split"),
    ("ostype", "beos", "unknown ostype"),
    ("machine", "isapc", "unknown machine"),
    ("migrate_downtime", "fast", "expected a number"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD)
def test_bad_key_names_the_key(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        VmConfig().set(key, value)
    assert caught.value.key == key and message in str(caught.value)
    assert str(caught.value).startswith(f"{key}: ")
    with pytest.raises(ConfigError) as in_file:
        parse_config(f"name: ok\n{key}: {value}\n")
    assert in_file.value.key == key


@pytest.mark.parametrize(("text", "key", "message"), [
    ("memory: 128\nmemory: 256\n", "memory", "duplicate"),
    ("name: a\n#late comment\n", "description", "comment after the first key"),
    ("name: a\n[snap1]\nname: b\n", "[snap1]", "not supported"),
    ("Name: a\n", "Name", "expected 'key: value'"),
    ("just words\n", "just words", "expected 'key: value'"),
    ("description: x\n", "description", "misplaced"),
])
def test_bad_file_structure(text: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.key == key and message in str(caught.value)


def test_oversized_file_rejected() -> None:
    with pytest.raises(ConfigError, match="larger than"):
        parse_config("#" + "x" * (600 * 1024) + "\n")
