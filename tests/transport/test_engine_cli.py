"""`corral engine` argument handling without starting a node: --load parsing, key
generation, a bad config exits 2 naming the line, a missing key exits 2, an unknown
nodeid or an address that is not on this host exits 2, --print-status formats a status file like corosync-cfgtool -s,
ring ids print as corosync does, and netmtu defaults to 65000 for knet only when not set."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from corral import engine
from corral.corosync_conf import ClusterConfig, render_cluster
from corral.errors import ConfigError


def test_parse_load() -> None:
    assert engine.parse_load("100:256") == (100.0, 256)
    for bad in ("100", "x:1", "100:1", "0:256", "5:99999999"):
        with pytest.raises(ConfigError, match="--load"):
            engine.parse_load(bad)


@pytest.mark.parametrize(("extra", "netmtu"), [
    ("", engine.KNET_DEFAULT_NETMTU),
    ("  transport: knet\n", engine.KNET_DEFAULT_NETMTU),
    ("  transport: udpu\n", 1400),
    ("  netmtu: 1200\n", 1200),
])
def test_netmtu_default(tmp_path: Any, extra: str, netmtu: int) -> None:
    text = render_cluster("c", [(1, "a", ["127.0.0.1"])]).replace("totem {\n", "totem {\n" + extra, 1)
    assert extra in text
    conf = tmp_path / "corosync.conf"
    conf.write_text(text)
    config = ClusterConfig.from_file(str(conf))
    assert engine.totem_timers(config, str(conf)).netmtu == netmtu
    assert engine.totem_timers(config, None).netmtu == config.totem.netmtu


def test_ring_text() -> None:
    assert engine.ring_text((1, 14)) == "1.e"


def test_generate_key_and_errors(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    key = str(tmp_path / "authkey")
    assert engine.main(["--generate-key", key]) == 0
    assert os.path.getsize(key) == 256
    assert engine.main(["--generate-key", key]) == 2  # refuses to overwrite
    conf = tmp_path / "corosync.conf"
    conf.write_text("totem {\n  token: 5\n}\nnodelist {\n node {\n nodeid: 1\n"
                    " ring0_addr: 127.0.0.1\n }\n}\n")
    state = str(tmp_path / "state")
    assert engine.main(["--config", str(conf), "--nodeid", "1", "--keyfile", key,
                        "--state-dir", state]) == 2
    assert "corosync.conf:2" in capsys.readouterr().err
    conf.write_text(render_cluster("c", [(1, "a", ["127.0.0.1"])]))
    assert engine.main(["--config", str(conf), "--nodeid", "1", "--keyfile",
                        str(tmp_path / "nokey"), "--state-dir", state]) == 2
    assert "keyfile" in capsys.readouterr().err
    assert engine.main(["--config", str(conf), "--nodeid", "7", "--keyfile", key,
                        "--state-dir", state]) == 2
    assert "nodeid 7" in capsys.readouterr().err
    assert engine.main(["--config", str(conf), "--nodeid", "1", "--keyfile", key]) == 2
    assert "--state-dir" in capsys.readouterr().err


def test_address_not_on_this_host_exits_2(tmp_path: Any,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    key = str(tmp_path / "authkey")
    engine.main(["--generate-key", key])
    conf = tmp_path / "corosync.conf"
    conf.write_text(render_cluster("c", [(1, "a", ["192.0.2.1"]), (2, "b", ["192.0.2.2"])]))
    assert engine.main(["--config", str(conf), "--nodeid", "1", "--keyfile", key,
                        "--state-dir", str(tmp_path / "s")]) == 2
    assert "cannot bind 192.0.2.1" in capsys.readouterr().err


def test_missing_arguments_exit_with_usage() -> None:
    with pytest.raises(SystemExit) as info:
        engine.main(["--nodeid", "1"])
    assert info.value.code == 2


def test_print_status(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    status = {
        "nodeid": 1, "state": "OPERATIONAL", "ring_id": [1, 14], "members": [1, 2],
        "links": [
            {"nodeid": 1, "link": 0, "state": "localhost", "address": "10.0.0.1:5405",
             "rtt_ms": None},
            {"nodeid": 2, "link": 0, "state": "up", "address": "10.0.0.2:5405", "rtt_ms": 0.2},
            {"nodeid": 3, "link": 0, "state": "down", "address": "10.0.0.3:5405",
             "rtt_ms": None},
        ],
        "transport_stats": {"drop_replay": 3, "drop_bad_mac": 0},
    }
    (tmp_path / "status.json").write_text(json.dumps(status))
    assert engine.main(["--print-status", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Ring ID: 1.e  State: OPERATIONAL  Members[2]: 1 2" in out
    assert "addr\t= 10.0.0.1:5405" in out
    assert "nodeid:   2:\tconnected (rtt 0.2 ms)" in out
    assert "nodeid:   3:\tdisconnected" in out
    assert "Dropped packets: drop_replay=3" in out
    assert engine.main(["--print-status", "--state-dir", str(tmp_path / "none")]) == 2
