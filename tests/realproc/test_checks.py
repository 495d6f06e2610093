"""The delivery-log checkers used by the real-process tests catch what they claim:
duplicates, reordering, gaps and total-order disagreement (planted in synthetic logs),
and accept correct logs including truncated ones."""

from __future__ import annotations

from .checks import check_streams, check_total_order, parse_log

GOOD_A = "C 1.4 1,2\nD 1 7 1\nD 2 9 1\nD 1 7 2\nD 2 9 2\n"
GOOD_B = "C 1.4 1,2\nD 1 7 1\nD 2 9 1\nD 1 7 2\nD 2 9 2\nD 1 7 3\nD 2"


def test_good_logs_pass() -> None:
    a, b = parse_log(1, GOOD_A), parse_log(2, GOOD_B)
    assert a.configurations == [("1.4", (1, 2))]
    assert len(b.messages) == 5  # truncated last line ignored
    assert check_streams(a, gap_free=True) == []
    assert check_streams(b, gap_free=True) == []
    assert check_total_order([a, b]) == []


def test_planted_faults_are_found() -> None:
    duplicate = parse_log(1, "D 1 7 1\nD 1 7 1\n")
    assert check_streams(duplicate)
    gap = parse_log(1, "D 1 7 1\nD 1 7 3\n")
    assert check_streams(gap) == []
    assert check_streams(gap, gap_free=True)
    restarted = parse_log(1, "D 1 7 1\nD 1 7 2\nD 1 8 1\n")  # new life restarts counters
    assert check_streams(restarted, gap_free=True) == []
    swapped = parse_log(2, "C 1.4 1,2\nD 2 9 1\nD 1 7 1\nD 1 7 2\nD 2 9 2\n")
    assert check_total_order([parse_log(1, GOOD_A), swapped])
