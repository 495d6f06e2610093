"""The command line: one seed, a soak over a seed range, and shrink.

Runs `corral.sim.__main__.main` in-process on short fault-free runs of the real
core and checks the exit status and the lines users rely on (summary, digest,
failing-seed list, usage errors).
"""

from __future__ import annotations

import pytest

from corral.sim.__main__ import main

pytest.importorskip("corral.totem._core")


def test_single_seed_prints_summary_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seed", "3", "--faults", "none", "--duration-ms", "600", "--token-ms", "300"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("seed 3: OK; faults: none")
    assert "trace digest" in out and "converged" in out


def test_soak_over_a_range_reports_counts(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["soak", "--seeds", "1:4", "--nodes", "2:3", "--faults", "loss", "--duration-ms", "600", "--token-ms", "300"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 seeds in" in out and "0 failed" in out
    assert "convergence after heal: median" in out


def test_shrink_on_a_passing_seed_has_nothing_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["shrink", "--seed", "3", "--faults", "none", "--duration-ms", "600"]) == 0
    assert "nothing to shrink" in capsys.readouterr().out


def test_unknown_fault_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as error:
        main(["--seed", "1", "--faults", "meteor"])
    assert error.value.code == 2
