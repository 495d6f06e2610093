"""`corral qm migrate` / `migrate-cancel` without a cluster: every bad input is refused
with a message naming it and exit status 2 before anything is touched; operations that
cannot be done (no such guest, corrald not reachable, nothing to cancel) exit 1, and a
refused migration leaves a task ending in `TASK ERROR` and the config unchanged. Also the
option parsing of the Python API (storage map, validation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.guests.cli import main
from corral.guests.migrate import MigrateOptions, parse_storage_map, validate_options


@pytest.fixture
def qm(tmp_path: Path, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree/storage.cfg").write_text(
        f"dir: local\n\tpath {tmp_path}/store\n\tcontent images\n")
    base = ["--root", str(tmp_path / "tree"), "--node", "n1", "--run-dir", str(tmp_path / "run"),
            "--task-dir", str(tmp_path / "tasks"), "--state-dir", str(tmp_path / "state")]

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*base, *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


BAD = [
    (["migrate"], "missing VMID"),
    (["migrate", "abc", "n2"], "invalid VMID 'abc'"),
    (["migrate", "100"], "missing TARGET node"),
    (["migrate", "100", "--online"], "missing TARGET node"),
    (["migrate", "100", "bad_name!"], "invalid target node name 'bad_name!'"),
    (["migrate", "100", "n1"], "target is local node 'n1'"),
    (["migrate", "100", "n2", "--bogus", "1"], "unknown option --bogus"),
    (["migrate", "100", "n2", "extra"], "unexpected argument 'extra'"),
    (["migrate", "100", "n2", "--online", "--online"], "option --online given twice"),
    (["migrate", "100", "n2", "--bwlimit", "fast"], "--bwlimit must be a non-negative integer"),
    (["migrate", "100", "n2", "--bwlimit", "-5"], "--bwlimit must be a non-negative integer"),
    (["migrate", "100", "n2", "--bwlimit"], "option --bwlimit needs a value"),
    (["migrate", "100", "n2", "--migration-type", "ssh"],
     "--migration-type must be secure or insecure, got 'ssh'"),
    (["migrate", "100", "n2", "--migration-network", "10.0.0.0/33"],
     "--migration-network '10.0.0.0/33' is not a CIDR"),
    (["migrate", "100", "n2", "--migration-network", "somewhere"], "is not a CIDR"),
    (["migrate", "100", "n2", "--targetstorage", "a:b:c"], "invalid storage map entry 'a:b:c'"),
    (["migrate", "100", "n2", "--targetstorage", "a:b,a:c"], "storage 'a' mapped twice"),
    (["migrate", "100", "n2", "--targetstorage", "9bad"], "invalid storage map entry '9bad'"),
    (["migrate-cancel"], "missing VMID"),
    (["migrate-cancel", "100", "--now", "1"], "unknown option --now"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_input_exits_2(qm, tmp_path: Path, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    code, out, err = qm(*args)
    assert code == 2 and out == ""
    assert err.startswith("corral qm: ") and message in err, err
    assert not (tmp_path / "tasks" / "index").exists()      # no task was even started


def test_failed_operations_exit_1(qm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = qm("migrate", "100", "n2", "--online")
    assert code == 1 and "Configuration file 'nodes/n1/qemu-server/100.conf' does not exist" in err
    assert qm("create", "100", "--memory", "64")[0] == 0
    config = (tmp_path / "tree/nodes/n1/qemu-server/100.conf").read_text()
    code, out, err = qm("migrate", "100", "n2", "--online")
    lines = out.splitlines()
    assert code == 1 and ":qmigrate:100:root@pam:" in lines[0]
    assert "corral qm: corrald is not reachable" in err
    assert lines[-1].startswith("TASK ERROR: migration aborted: corrald is not reachable")
    assert (tmp_path / "tree/nodes/n1/qemu-server/100.conf").read_text() == config
    code, _, err = qm("migrate-cancel", "100")
    assert code == 1 and "no migration of VM 100 is running on node 'n1'" in err


def test_storage_map_and_option_validation() -> None:
    assert parse_storage_map(None) == {} and parse_storage_map("1") == {}
    assert parse_storage_map("local2") == {"": "local2"}
    assert parse_storage_map("local1:local2,other:big") == {"local1": "local2", "other": "big"}
    validate_options(MigrateOptions(migration_network="fd00::/64", bwlimit_kib=0))
    with pytest.raises(ValueError, match="bwlimit"):
        validate_options(MigrateOptions(bwlimit_kib=-1))
