"""`corral qm` without starting QEMU: create/config/set/delete/unlock/list/status on a temp
tree, task listing, and every bad-input case giving a clear message and exit status 2
(bad input) or 1 (failed operation)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from corral.guests.cli import main


@pytest.fixture
def qm(tmp_path: Path, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/storage.cfg").write_text(f"dir: local\n\tpath {tmp_path}/store\n\tcontent images\n")
    base = ["--root", str(tmp_path / "tree"), "--node", "n1", "--run-dir", str(tmp_path / "run"),
            "--task-dir", str(tmp_path / "tasks")]

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*base, *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


def test_create_config_set_list(qm) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = qm("create", "100", "--name", "web1", "--memory", "128", "--cores=2",
                      "--net0", "virtio=BC:24:11:00:00:01")
    assert code == 0 and out.startswith("UPID:n1:") and ":qmcreate:100:root@pam:" in out
    assert qm("config", "100")[1] == (
        "name: web1\nmemory: 128\ncores: 2\nnet0: virtio=BC:24:11:00:00:01\n")
    assert qm("set", "100", "--memory", "256", "--lock", "migrate", "--delete", "cores")[0] == 0
    assert qm("config", "100")[1] == (
        "name: web1\nmemory: 256\nnet0: virtio=BC:24:11:00:00:01\nlock: migrate\n")
    code, _, err = qm("start", "100")
    assert code == 1 and "VM is locked (migrate)" in err
    assert qm("unlock", "100")[0] == 0 and "lock" not in qm("config", "100")[1]
    code, out, _ = qm("list")
    assert code == 0 and "web1" in out and "stopped" in out
    assert qm("status", "100") == (0, "status: stopped\n", "")
    code, out, _ = qm("tasks")
    lines = out.splitlines()
    assert code == 0 and lines[0].endswith(":qmstart:100:root@pam: ERROR: VM is locked (migrate)")
    assert lines[-1].endswith(":qmcreate:100:root@pam: OK")
    upid = lines[-1].split()[0]
    assert qm("task-log", upid)[1] == "TASK OK\n"
    assert '"exitstatus": "OK"' in qm("task-status", upid)[1]


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img missing")
def test_create_allocates_disk(qm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert qm("create", "101", "--scsi0", "local:1,iothread=1")[0] == 0
    assert "scsi0: local:101/vm-101-disk-0.qcow2,iothread=1,size=1G" in qm("config", "101")[1]
    assert qm("set", "101", "--virtio1", "local:0.5,format=raw")[0] == 0
    assert (tmp_path / "store/images/101/vm-101-disk-1.raw").exists()
    assert qm("destroy", "101")[0] == 0
    assert list((tmp_path / "store/images/101").iterdir()) == []
    code, _, err = qm("create", "102", "--scsi0", "nostore:1")
    assert code == 1 and "storage 'nostore' does not exist" in err


@pytest.mark.parametrize(("args", "code", "message"), [
    (["frob"], 2, "unknown verb 'frob'"),
    (["start"], 2, "missing VMID"),
    (["start", "abc"], 2, "invalid VMID 'abc'"),
    (["start", "100", "extra"], 2, "unexpected argument 'extra'"),
    (["start", "100", "--timeout", "3"], 2, "unknown option --timeout"),
    (["shutdown", "100", "--timeout", "soon"], 2, "--timeout must be a number"),
    (["shutdown", "100", "--timeout", "-1"], 2, "must not be negative"),
    (["create", "100", "--memory"], 2, "option --memory needs a value"),
    (["create", "100", "--memory", "1", "--memory", "2"], 2, "given twice"),
    (["create", "100", "--bogus", "1"], 2, "bogus: unknown configuration key"),
    (["create", "100", "--memory", "x"], 2, "memory: expected an integer"),
    (["create", "99"], 1, "invalid vmid 99"),
    (["config", "555"], 1, "Configuration file 'nodes/n1/qemu-server/555.conf' does not exist"),
    (["status", "555"], 1, "does not exist"),
    (["set", "100"], 2, "nothing to set"),
    (["tasks", "--limit", "x"], 2, "--limit must be"),
    (["task-log", "UPID:bad"], 2, "invalid UPID"),
    (["task-status"], 2, "exactly one UPID"),
    (["--root"], 2, "--root needs a value"),
])
def test_bad_input(qm, args: list[str], code: int, message: str) -> None:  # type: ignore[no-untyped-def]
    if args[:2] == ["set", "100"]:
        qm("create", "100")
    got_code, _, err = qm(*args)
    assert got_code == code and message in err and err.startswith("corral qm: ")


def test_stop_of_stopped_guest_and_suspend_error(qm) -> None:  # type: ignore[no-untyped-def]
    qm("create", "100")
    code, out, _ = qm("stop", "100")
    assert code == 0 and ":qmstop:100:" in out
    code, _, err = qm("suspend", "100")
    assert code == 1 and "VM 100 not running" in err
    assert qm("tasks", "--limit", "1")[1].split()[1] == "ERROR:"


def test_list_survives_a_broken_config(qm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    qm("create", "100", "--name", "good")
    (tmp_path / "tree/nodes/n1/qemu-server/101.conf").write_text("memory: lots\n")
    code, out, _ = qm("list")
    assert code == 0 and "good" in out and "unknown" in out
    code, _, err = qm("config", "101")
    assert code == 2 and "memory: expected an integer" in err


def test_tasks_are_published_for_the_cluster_list(qm, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from corral.cli import main as corral_main

    assert qm("create", "100", "--memory", "128")[0] == 0
    # Every task begin/end publishes this node's list into the tree.
    published = json.loads((tmp_path / "tree/nodes/n1/tasks.json").read_text())
    assert "qmcreate" in json.dumps(published)
    # Another node's list, as the replicated tree would hold it.
    other = tmp_path / "tree/nodes/n2"
    other.mkdir(parents=True)
    (other / "tasks.json").write_text((tmp_path / "tree/nodes/n1/tasks.json").read_text()
                                      .replace(":n1:", ":n2:").replace('"n1"', '"n2"'))
    code, out, _ = qm("tasks", "--cluster")
    assert code == 0 and ":n1:" in out and ":n2:" in out and "qmcreate" in out
    code = corral_main(["tasks", "--root", str(tmp_path / "tree"), "--node", "n1",
                        "--task-dir", str(tmp_path / "tasks"), "--output-format", "json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and {row["node"] for row in rows} == {"n1", "n2"}
    assert qm("tasks", "--cluster", "--limit", "x")[0] == 2
