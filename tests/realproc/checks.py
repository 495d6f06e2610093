"""Checks over the delivery logs that `corral engine --log-deliveries` writes.

A log is a sequence of lines `C <ring> <members>` (a regular configuration) and
`D <sender> <life> <counter>` (one delivered load message; `life` changes when
the sender restarts). A stream is (sender, life).

- `check_streams`: on every node each stream's counters strictly increase (no
  duplicate, no reordering); with `gap_free` they also increase by exactly 1.
- `check_total_order`: for every pair of nodes, the messages both delivered
  appear in the same relative order on both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Message = tuple[int, int, int]  # sender, life, counter


@dataclass
class DeliveryLog:
    nodeid: int
    messages: list[Message] = field(default_factory=list)
    configurations: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)


def parse_log(nodeid: int, text: str) -> DeliveryLog:
    log = DeliveryLog(nodeid)
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "D":
            log.messages.append((int(parts[1]), int(parts[2]), int(parts[3])))
        elif len(parts) == 3 and parts[0] == "C":
            members = tuple(int(m) for m in parts[2].split(",") if m)
            log.configurations.append((parts[1], members))
        # a truncated last line (killed process) is ignored
    return log


def read_log(nodeid: int, path: str) -> DeliveryLog:
    with open(path, encoding="ascii") as handle:
        return parse_log(nodeid, handle.read())


def check_streams(log: DeliveryLog, gap_free: bool = False) -> list[str]:
    problems: list[str] = []
    last: dict[tuple[int, int], int] = {}
    for sender, life, counter in log.messages:
        stream = (sender, life)
        previous = last.get(stream)
        if previous is not None and counter <= previous:
            problems.append(f"node {log.nodeid}: stream {stream} went {previous} -> {counter}")
        elif gap_free and counter != (previous or 0) + 1 and previous is not None:
            problems.append(f"node {log.nodeid}: stream {stream} gap {previous} -> {counter}")
        last[stream] = counter
    return problems[:20]


def check_total_order(logs: list[DeliveryLog]) -> list[str]:
    problems: list[str] = []
    for index, first in enumerate(logs):
        for second in logs[index + 1 :]:
            common = set(first.messages) & set(second.messages)
            order_first = [m for m in first.messages if m in common]
            order_second = [m for m in second.messages if m in common]
            if order_first != order_second:
                at = next(i for i, (a, b) in enumerate(zip(order_first, order_second, strict=False))
                          if a != b) if order_first and order_second else 0
                problems.append(f"nodes {first.nodeid} and {second.nodeid} disagree at common "
                                f"message #{at}: {order_first[at:at + 3]} vs {order_second[at:at + 3]}")
    return problems


def streams_delivered(log: DeliveryLog) -> dict[tuple[int, int], int]:
    counts: dict[tuple[int, int], int] = {}
    for sender, life, _ in log.messages:
        counts[(sender, life)] = counts.get((sender, life), 0) + 1
    return counts
