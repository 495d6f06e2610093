"""CPU cost per message of the CPG IPC path alone: CpgService + CpgIpcServer in
one process, benchmark clients (bench/corral_client.py's Pipeline) in others,
over a real Unix socket, with a loopback "Totem" that hands every submitted
payload back as a delivery in the next loop iteration (batched as TotemNode
does). No Totem core, transport or crypto: this isolates what the engine and
the client library spend per message.

    .venv/bin/python tests/cpg/bench_ipc.py [--messages N] [--size B] [--receivers R]

Prints the server's and each client's CPU time (user + system) per message.
Not a test (not collected by pytest): a measurement tool for docs/cpg.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from corral.cpg.core import CONF_TRANSITIONAL, EV_CONFIG, EV_DELIVER  # noqa: E402

CONF_REGULAR = 0 if CONF_TRANSITIONAL != 0 else 1
NODEID = 1


class LoopbackNode:
    """One-node Totem stand-in: submitted payloads come back as deliveries, one
    batch per loop iteration, through batch listeners when the service has one."""

    def __init__(self) -> None:
        self.nodeid = NODEID
        self.listeners: list[Callable[[tuple[object, ...]], None]] = []
        self.batch_listeners: list[Callable[[list[tuple[object, ...]]], None]] = []
        self.queue: list[bytes] = []
        self.scheduled = False

    def submit(self, payload: bytes) -> bool:
        self.queue.append(payload)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)
        return True

    async def wait_writable(self) -> None:
        return None

    def add_listener(self, callback: Callable[[tuple[object, ...]], None]) -> None:
        self.listeners.append(callback)

    def add_batch_listener(self, callback: Callable[[list[tuple[object, ...]]], None]) -> None:
        self.batch_listeners.append(callback)

    def emit(self, events: list[tuple[object, ...]]) -> None:
        for batch_listener in self.batch_listeners:
            batch_listener(events)
        for listener in self.listeners:
            for event in events:
                listener(event)

    def flush(self) -> None:
        self.scheduled = False
        queue, self.queue = self.queue, []
        self.emit([(EV_DELIVER, NODEID, payload) for payload in queue])


async def serve(path: str) -> None:
    from corral.cpg.ipc import CpgIpcServer
    from corral.cpg.service import CpgService

    node = LoopbackNode()
    service = CpgService(node)  # type: ignore[arg-type]
    node.emit([(EV_CONFIG, CONF_TRANSITIONAL, (1, 4), (1,), (), ()),
               (EV_CONFIG, CONF_REGULAR, (1, 4), (1,), (1,), ())])
    server = CpgIpcServer(service, path)
    await server.start()
    print("ready", flush=True)
    profile_to = os.environ.get("CRL_CPG_BENCH_PROFILE")
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        await asyncio.sleep(1.5)
        profiler.enable()
        await asyncio.sleep(2.0)
        profiler.disable()
        profiler.dump_stats(profile_to)
    await asyncio.get_running_loop().create_future()


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--receivers", type=int, default=0, help="extra receive-only clients")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(serve(args.serve))
        return 0
    workdir = tempfile.mkdtemp(prefix="crl-cpgbench-")
    path = os.path.join(workdir, "cpg.sock")
    server = subprocess.Popen([sys.executable, __file__, "--serve", path],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client_script = os.path.join(ROOT, "bench", "corral_client.py")
        duration_ms = 4000
        common = ["--socket", path, "--nodes", "1", "--senders", "1", "--size", str(args.size),
                  "--duration-ms", str(duration_ms), "--timeout-ms", "30000",
                  "--settle-ms", "300"]
        receivers = [subprocess.Popen([sys.executable, client_script, "bench", *common],
                                      stdout=subprocess.PIPE, text=True)
                     for _ in range(args.receivers)]
        time.sleep(0.5)
        before = cpu_s(server.pid)
        sender = subprocess.run([sys.executable, client_script, "bench", "--send", *common],
                                capture_output=True, text=True, check=True)
        server_s = cpu_s(server.pid) - before
        import json

        result = json.loads(sender.stdout)
        msgs = int(result["msgs"])
        print(f"{msgs} messages of {args.size} B, {msgs / duration_ms * 1000:.0f} msg/s, "
              f"{args.receivers} extra receivers")
        print(f"server CPU per message: {server_s / msgs * 1e6:.1f} us")
        if "cpu_s" in result:
            print(f"sending client CPU per message: {result['cpu_s'] / msgs * 1e6:.1f} us")
        for receiver in receivers:
            out, _ = receiver.communicate(timeout=30)
            other = json.loads(out)
            if "cpu_s" in other:
                print(f"receiving client CPU per message: "
                      f"{other['cpu_s'] / max(1, other['msgs']) * 1e6:.1f} us")
    finally:
        server.kill()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
