"""`corral demo` on corrald: builds a quorate 3-node cluster through create/join,
prints the status and where things are, stops every daemon cleanly and removes its
network namespaces (as root) and its temporary directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("netns", [True, False], ids=["netns", "loopback"])
def test_demo_runs_and_cleans_up(tmp_path: Path, netns: bool) -> None:
    if netns and os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    prefix = f"crl-ndd{os.getpid() % 100}"
    extra = [] if netns else ["--no-netns"]
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli", "demo", "--nodes", "3", "--duration", "1",
         "--prefix", prefix, "--dir", str(workdir), *extra],
        capture_output=True, text=True, timeout=120)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-2000:]
    assert "corral demo: quorate 3-node cluster in" in out
    assert "Quorate:          Yes" in out and "Nodes:            3" in out
    assert "where things are:" in out
    assert "exit statuses {1: 0, 2: 0, 3: 0}" in out or \
        all(f"{n}: 0" in out.split("exit statuses")[-1] for n in (1, 2, 3))
    assert ("network namespaces" in out) == netns
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in namespaces
    links = subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
    assert prefix not in links
