"""The status broadcast's sans-I/O core: reports round-trip through encode/decode; the
size bound leaves out the highest vmids and counts them; malformed, oversized or
ill-typed reports raise ReportError (never another exception); the table keeps the
latest report per node, drops reports of nodes that left the membership or are older
than 5 minutes, and shows a guest `unknown` when its node's report is missing or stale;
`.rrd` lines in the reference's key formats; the /proc parsers; and the module imports nothing that does I/O."""

from __future__ import annotations

import ast
import json
import pathlib

import pytest

from corral.daemon import statuscore
from corral.daemon.statuscore import (
    NodeReport,
    ReportError,
    StatusTable,
    decode_report,
    encode_report,
)

S = 1_000_000_000


def _report(node: str = "node1", guests: int = 2, seq: int = 1) -> NodeReport:
    rows = {100 + i: {"status": "running", "name": f"vm{i}", "cpu": 0.25, "mem": 1 << 20,
                      "maxmem": 128 << 20, "netin": 10 * i, "netout": 5, "uptime": 7,
                      "pid": 1234, "qmpstatus": "running", "ignored": [1]}
            for i in range(guests)}
    return NodeReport(node, seq, {"uptime": 100, "cpu": 0.5, "maxcpu": 2, "mem": 1, "maxmem": 2},
                      (0.1, 0.2, 0.3), rows, 0,
                      {"local": {"disk": 1, "maxdisk": 2, "shared": 0, "content": "images",
                                 "active": 1}})


def test_round_trip_keeps_known_fields_only() -> None:
    decoded = decode_report(encode_report(_report()))
    assert decoded.node == "node1" and decoded.seq == 1 and decoded.omitted == 0
    assert decoded.loadavg == (0.1, 0.2, 0.3)
    assert decoded.figures["maxcpu"] == 2
    assert decoded.guests[101]["netin"] == 10 and decoded.guests[101]["name"] == "vm1"
    assert "ignored" not in decoded.guests[100]
    assert decoded.storages["local"] == {"disk": 1, "maxdisk": 2, "shared": 0,
                                         "content": "images", "active": 1}


def test_size_bound_leaves_out_highest_vmids() -> None:
    report = _report(guests=3000)
    data = encode_report(report, max_bytes=64 * 1024)
    assert len(data) <= 64 * 1024
    decoded = decode_report(data, max_bytes=64 * 1024)
    assert decoded.omitted == 3000 - len(decoded.guests) > 0
    assert sorted(decoded.guests) == list(range(100, 100 + len(decoded.guests)))
    table = StatusTable()
    table.apply(1, decoded, 0)
    assert table.guest(100, "node1", 0)["status"] == "running"
    assert table.guest(3099, "node1", 0) == {"status": "unknown"}   # left out: not "stopped"


def _mutated(change: object) -> bytes:
    message = json.loads(encode_report(_report()))
    assert callable(change)
    change(message)
    return json.dumps(message).encode()


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"[]", b"\xff\xfe", b'{"v": 2}',
    _mutated(lambda m: m.update(node="../etc")),
    _mutated(lambda m: m.update(node=7)),
    _mutated(lambda m: m.update(seq=-1)),
    _mutated(lambda m: m.update(seq=True)),
    _mutated(lambda m: m.update(figures=[])),
    _mutated(lambda m: m["figures"].update(cpu="x")),
    _mutated(lambda m: m["figures"].update(mem=-5)),
    _mutated(lambda m: m.update(loadavg=[1, 2])),
    _mutated(lambda m: m.update(guests={"12": {"status": "running"}})),
    _mutated(lambda m: m.update(guests={"abc": {"status": "running"}})),
    _mutated(lambda m: m["guests"]["100"].update(status="exploded")),
    _mutated(lambda m: m["guests"]["100"].update(cpu=float("nan"))),
    _mutated(lambda m: m["guests"]["100"].update(name="x" * 1000)),
    _mutated(lambda m: m["guests"].update({"101": "running"})),
    _mutated(lambda m: m.update(storages={"bad id!": {}})),
    _mutated(lambda m: m["storages"]["local"].update(content=5)),
])
def test_malformed_reports_raise_report_error(payload: bytes) -> None:
    with pytest.raises(ReportError):
        decode_report(payload)


def test_oversized_payload_refused_before_parsing() -> None:
    with pytest.raises(ReportError, match="over the limit"):
        decode_report(b" " * (statuscore.MAX_REPORT_BYTES + 1))


def test_table_membership_expiry_and_freshness() -> None:
    table = StatusTable(max_age_ns=300 * S, fresh_ns=35 * S)
    table.apply(1, decode_report(encode_report(_report("node1"))), 0)
    table.apply(2, decode_report(encode_report(_report("node2", guests=0))), 0)
    assert table.guest(100, "node1", 10 * S)["status"] == "running"
    assert table.guest(100, "node2", 10 * S) == {"status": "stopped"}   # fresh, not there
    assert table.guest(100, "node3", 10 * S) == {"status": "unknown"}   # no report
    assert table.guest(100, "node1", 36 * S) == {"status": "unknown"}   # stale
    assert [e.report.node for e in table.fresh_reports(10 * S)] == ["node1", "node2"]
    assert table.membership([1]) == [2]
    assert table.by_node("node2") is None and table.dropped_left == 1
    table.apply(1, decode_report(encode_report(_report("node1", seq=2))), 100 * S)
    assert table.expire(399 * S) == []
    assert table.expire(401 * S) == [1] and table.entries == {}


def test_vmlist_runtime_keys() -> None:
    table = StatusTable()
    table.apply(1, decode_report(encode_report(_report())), 0)
    row = statuscore.vmlist_runtime(table, 100, "node1", 1 * S)
    assert set(row) <= set(statuscore.VMLIST_RUNTIME_KEYS)
    assert row["status"] == "running" and row["maxmem"] == 128 << 20
    assert statuscore.vmlist_runtime(table, 555, "nodeX", 1 * S) == {"status": "unknown"}


def test_proc_parsers() -> None:
    meminfo = "MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 400 kB\nSwapTotal: 50 kB\n" \
              "SwapFree: 20 kB\n"
    assert statuscore.parse_meminfo(meminfo) == {"maxmem": 1024000, "mem": 614400,
                                                 "maxswap": 51200, "swap": 30720}
    first = statuscore.parse_cpu_ticks("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n")
    second = statuscore.parse_cpu_ticks("cpu  200 0 200 800 200 0 0 0 0 0\n")
    assert first == (200, 100, 1000)
    assert statuscore.cpu_fractions(first, second) == (0.5, 0.25)
    assert statuscore.cpu_fractions(None, second) == (0.0, 0.0)
    with pytest.raises(ValueError):
        statuscore.parse_cpu_ticks("intr 5\n")


def test_core_is_sans_io() -> None:
    path = pathlib.Path(statuscore.__file__)
    banned = {"asyncio", "socket", "time", "random", "threading", "subprocess", "os"}
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & banned, imported & banned


def test_rrd_lines_in_reference_format() -> None:
    report = _report()
    figures = dict(report.figures, ctime=1795720872, wait=0.01, maxswap=0, swap=0,
                   maxdisk=100, disk=50, netin=1000, netout=2000)
    report = NodeReport(report.node, 1, figures, (0.5, 0.2, 0.1), {100: report.guests[100]}, 0,
                        report.storages)
    table = StatusTable()
    table.apply(1, decode_report(encode_report(report)), 0)
    lines = statuscore.rrd_lines(table)
    assert lines[0] == "pve2-node/node1:100:0:1795720872:0.5:2:0.5:0.01:2:1:0:0:100:50:1000:2000"
    assert lines[1] == ("pve2.3-vm/100:7:vm0:running:0:1795720872:0:0.25:134217728:1048576:"
                        "0:0:0:5:0:0")
    assert lines[2] == "pve2-storage/node1/local:1795720872:2:1"
    assert len(lines[0].split(":")) == 16 and len(lines[1].split(":")) == 16
