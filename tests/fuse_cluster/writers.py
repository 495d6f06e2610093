"""Writer threads for the mount tests: each creates files through one node's mount
and records which writes returned success (acknowledged)."""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

RECORD_BYTES = 300


def payload(writer: str, index: int) -> bytes:
    """A file body that cannot be confused with a prefix or a neighbour's body."""
    head = f"{writer}-{index:06d}:".encode()
    return (head + b"x" * RECORD_BYTES)[:RECORD_BYTES - 1] + b"\n"


def write_file(path: Path, data: bytes) -> None:
    """open(O_CREAT|O_EXCL), one write, close: acknowledged only if all three succeed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.EIO, f"short write {written}/{len(data)}")
    finally:
        os.close(fd)


@dataclass
class Writer:
    """Writes `<dir>/<name>-<n>` files until stopped (or until `stop_on_error`)."""

    name: str
    directory: Path
    stop_on_error: bool = False
    pause_s: float = 0.0
    acked: dict[str, bytes] = field(default_factory=dict)
    attempted: dict[str, bytes] = field(default_factory=dict)
    errors: list[tuple[str, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"writer-{self.name}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        index = 0
        while not self.stop.is_set():
            file_name = f"{self.name}-{index:06d}"
            data = payload(self.name, index)
            self.attempted[file_name] = data
            try:
                write_file(self.directory / file_name, data)
            except OSError as error:
                self.errors.append((file_name, error.errno or 0))
                if self.stop_on_error:
                    return
                time.sleep(0.05)  # a mount without quorum or mid-resync: try again soon
            else:
                self.acked[file_name] = data
            index += 1
            if self.pause_s:
                time.sleep(self.pause_s)

    def finish(self, timeout_s: float = 60.0) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout_s)
            assert not self.thread.is_alive(), f"writer {self.name} hangs in a file call"
