"""`corral ha` on a plain tree: edits are validated before anything is written (missing
guest, bad state, duplicate, unknown group, unknown node), set merges with the existing
properties, remove, commands are queued as crm_commands lines, status in the ha-manager
layout; `corral-ha` refuses unsafe timing settings naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from corral.ha.cli import main

from .harness import make_guest


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    make_guest(root, "n1", 100)
    (root / "nodes/n2").mkdir(parents=True)
    return root


def _run(root: Path, *args: str) -> int:
    return main(["--root", str(root), *args])


def test_edits_are_validated(tmp_path: Path, capsys: object) -> None:
    root = _tree(tmp_path)
    resources = root / "ha/resources.cfg"
    assert _run(root, "add", "vm:101") == 2  # no such guest
    assert _run(root, "add", "vm:100", "--state", "running") == 2
    assert _run(root, "add", "vm:100", "--max_restart", "11") == 2
    assert _run(root, "add", "vm:100", "--group", "nope") == 2
    assert not resources.exists()
    assert _run(root, "add", "vm:100", "--max_relocate", "2") == 0
    assert _run(root, "add", "vm:100") == 2
    assert _run(root, "set", "vm:100", "--state", "stopped", "--comment", "db") == 0
    text = resources.read_text()
    assert "max_relocate 2" in text and "state stopped" in text and "comment db" in text
    assert _run(root, "set", "vm:100", "--failback", "maybe") == 2
    assert resources.read_text() == text
    assert _run(root, "remove", "vm:100") == 0
    assert "vm: 100" not in resources.read_text()
    assert _run(root, "remove", "vm:100") == 2
    assert not (root / "priv/lock/domain-ha").exists()  # the edit lock is released


def test_commands_are_queued(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert _run(root, "add", "vm:100") == 0
    assert _run(root, "migrate", "vm:100", "n9") == 2
    assert _run(root, "migrate", "vm:101", "n2") == 2
    assert _run(root, "migrate", "vm:100", "n2") == 0
    assert _run(root, "relocate", "vm:100", "n2") == 0
    assert _run(root, "node-maintenance", "enable", "n1") == 0
    assert _run(root, "node-maintenance", "disable", "n1") == 0
    assert _run(root, "disarm", "freeze") == 0
    assert _run(root, "arm") == 0
    assert (root / "ha/crm_commands").read_text().splitlines() == [
        "migrate vm:100 n2", "relocate vm:100 n2", "enable-node-maintenance n1",
        "disable-node-maintenance n1", "disarm-ha freeze", "arm-ha"]


def test_status_layout(tmp_path: Path, capsys: object) -> None:
    root = _tree(tmp_path)
    assert _run(root, "add", "vm:100") == 0
    assert _run(root, "status") == 0
    out = capsys.readouterr().out.splitlines()  # type: ignore[attr-defined]
    assert out == ["quorum OK", "fencing standby", "service vm:100 (n1, queued)"]
    assert main(["--root", str(tmp_path / "missing"), "status"]) == 1


def test_daemon_refuses_unsafe_timings(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "datacenter.cfg").write_text("ha-timing: profile=fast,lock_timeout_s=10\n")
    result = subprocess.run([sys.executable, "-m", "corral.ha.daemon.main", "--node", "n1",
                             "--root", str(root), "--run-dir", str(tmp_path / "run"),
                             "--watchdog", "fallback"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "lock_timeout_s: 10 s is unsafe" in result.stderr
