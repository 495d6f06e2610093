"""`corral qm`: the reference's guest verbs against a config tree and this node.

    corral qm [--root DIR] [--node NAME] [--run-dir DIR] [--task-dir DIR] VERB ...

Config keys are given as `--key value` (any key of config.py, e.g. `--net0 virtio=...`),
so `create` and `set` take every key without a fixed option list. Errors go to stderr
with exit status 2 for bad input and 1 for failed operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from corral.guests.clustertasks import cluster_tasks_command
from corral.guests.config import ConfigError, write_config
from corral.guests.migrate import MigrateOptions, request_cancel, validate_options
from corral.guests.migrate_worker import WorkerError, WorkerSettings, fork_worker
from corral.guests.qemu import (
    DEFAULT_RUN_DIR,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    DEFAULT_TASK_DIR,
    GuestError,
    GuestManager,
)
from corral.guests.qmp import QmpError
from corral.guests.storage import StorageError
from corral.guests.tasks import TaskError, Upid, parse_upid

DEFAULT_ROOT = "/etc/corral"
FOLLOW_INTERVAL_S = 0.1
USAGE = """usage: corral qm [--root DIR] [--node NAME] [--run-dir DIR] [--task-dir DIR]
                 [--state-dir DIR] VERB ...
verbs:
  list                                   guests of this node with status
  create VMID [--KEY VALUE ...]          new guest; disks as STORAGE:SIZE_GIB allocate a volume
  config VMID                            print the config
  set VMID [--KEY VALUE ...] [--delete KEY[,KEY...]]
  start VMID [--skiplock]
  stop VMID [--skiplock]                 hard stop (QMP quit, then signals)
  shutdown VMID [--timeout S] [--forceStop]
  reboot VMID [--timeout S] [--forceStop]
  suspend VMID | resume VMID             pause / continue the vCPUs
  status VMID [--verbose]
  destroy VMID                           stop, remove volumes and config
  unlock VMID                            clear a stale lock
  migrate VMID TARGET [--online] [--with-local-disks] [--targetstorage S|SRC:DST,...]
          [--bwlimit KIB_S] [--migration-type secure|insecure] [--migration-network CIDR]
  migrate-cancel VMID                    abort a running migration (guest stays here)
  tasks [--limit N] [--cluster [--output-format text|json]] | task-status UPID | task-log UPID
global: --state-dir DIR (corrald state dir, for migrate; default $CORRAL_STATE_DIR or
        /var/lib/corral)"""


class UsageError(ValueError):
    pass


def _vmid(args: list[str]) -> int:
    if not args:
        raise UsageError("missing VMID")
    text = args.pop(0)
    if not text.isdigit():
        raise UsageError(f"invalid VMID '{text}' (an integer 100..999999999)")
    return int(text)


def _options(args: list[str], flags: tuple[str, ...] = ()) -> dict[str, str]:
    """`--key value` pairs; names in `flags` take no value (an optional 0/1 is accepted)."""
    result: dict[str, str] = {}
    while args:
        item = args.pop(0)
        if not item.startswith("--") or len(item) < 3:
            raise UsageError(f"unexpected argument '{item}'")
        name, sep, value = item[2:].partition("=")
        if name in result:
            raise UsageError(f"option --{name} given twice")
        if name in flags:
            if not sep and args and args[0] in ("0", "1"):
                value = args.pop(0)
            result[name] = value if sep or value else "1"
            continue
        if not sep:
            if not args:
                raise UsageError(f"option --{name} needs a value")
            value = args.pop(0)
        result[name] = value
    return result


def _only(options: dict[str, str], allowed: tuple[str, ...]) -> None:
    for name in options:
        if name not in allowed:
            raise UsageError(f"unknown option --{name}")


def _float(options: dict[str, str], name: str, default: float) -> float:
    try:
        value = float(options.get(name, default))
    except ValueError:
        raise UsageError(f"--{name} must be a number") from None
    if value < 0:
        raise UsageError(f"--{name} must not be negative")
    return value


def _print_upid(upid: object) -> int:
    print(upid)
    return 0


def _cmd_list(manager: GuestManager, args: list[str]) -> int:
    _only(_options(args), ())
    rows = asyncio.run(manager.list_guests())
    print(f"{'VMID':>10} {'NAME':<20} {'STATUS':<10} {'MEM(MB)':>8} {'PID':>8}")
    for row in rows:
        print(f"{row['vmid']:>10} {row['name']:<20} {row['status']:<10} "
              f"{row['maxmem'] >> 20:>8} {row.get('pid', 0):>8}")
    return 0


def _cmd_create(manager: GuestManager, args: list[str]) -> int:
    vmid = _vmid(args)
    return _print_upid(manager.create(vmid, _options(args)))


def _cmd_config(manager: GuestManager, args: list[str]) -> int:
    vmid = _vmid(args)
    _only(_options(args), ())
    sys.stdout.write(write_config(manager.load_config(vmid)))
    return 0


def _cmd_set(manager: GuestManager, args: list[str]) -> int:
    vmid = _vmid(args)
    options = _options(args)
    delete = [key for key in options.pop("delete", "").split(",") if key]
    if not options and not delete:
        raise UsageError("nothing to set (give --KEY VALUE or --delete KEY)")
    manager.set_options(vmid, options, delete)
    return 0


def _cmd_unlock(manager: GuestManager, args: list[str]) -> int:
    vmid = _vmid(args)
    _only(_options(args), ())
    manager.set_options(vmid, {}, ["lock"] if manager.load_config(vmid).get("lock") else [])
    return 0


def _lifecycle(verb: str) -> Callable[[GuestManager, list[str]], int]:
    def run(manager: GuestManager, args: list[str]) -> int:
        vmid = _vmid(args)
        options = _options(args, flags=("skiplock", "forceStop", "verbose"))
        if verb in ("start", "stop"):
            _only(options, ("skiplock",))
            action = manager.start if verb == "start" else manager.stop
            return _print_upid(asyncio.run(action(vmid, skiplock=options.get("skiplock") == "1")))
        if verb in ("shutdown", "reboot"):
            _only(options, ("timeout", "forceStop"))
            timeout_s = _float(options, "timeout", DEFAULT_SHUTDOWN_TIMEOUT_S)
            force = options.get("forceStop") == "1"
            action2 = manager.shutdown if verb == "shutdown" else manager.reboot
            return _print_upid(asyncio.run(action2(vmid, timeout_s=timeout_s, force=force)))
        _only(options, ())
        simple = {"suspend": manager.suspend, "resume": manager.resume, "destroy": manager.destroy}
        return _print_upid(asyncio.run(simple[verb](vmid)))
    return run


def _cmd_status(manager: GuestManager, args: list[str]) -> int:
    vmid = _vmid(args)
    options = _options(args, flags=("verbose",))
    _only(options, ("verbose",))
    status = asyncio.run(manager.status(vmid))
    if options.get("verbose") == "1":
        for key in sorted(status):
            print(f"{key}: {status[key]}")
    else:
        print(f"status: {status['status']}")
    return 0


def _cmd_tasks(manager: GuestManager, args: list[str]) -> int:
    if "--cluster" in args:
        args.remove("--cluster")
        return cluster_tasks_command(manager.root, manager.node, manager.tasks.task_dir, args)
    options = _options(args)
    _only(options, ("limit",))
    limit = options.get("limit", "50")
    if not limit.isdigit():
        raise UsageError("--limit must be a non-negative integer")
    for entry in manager.tasks.list_tasks(int(limit)):
        print(f"{entry['upid']} {entry.get('status', entry.get('exitstatus', ''))}")
    return 0


def _cmd_task_status(manager: GuestManager, args: list[str]) -> int:
    if len(args) != 1:
        raise UsageError("task-status needs exactly one UPID")
    print(json.dumps(manager.tasks.status(parse_upid(args[0])), sort_keys=True))
    return 0


def _cmd_task_log(manager: GuestManager, args: list[str]) -> int:
    if len(args) != 1:
        raise UsageError("task-log needs exactly one UPID")
    for line in manager.tasks.read_log(parse_upid(args[0])):
        print(line)
    return 0


_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")


def _migrate_options(options: dict[str, str]) -> MigrateOptions:
    _only(options, ("online", "with-local-disks", "targetstorage", "bwlimit", "migration-type",
                    "migration-network"))
    bwlimit = options.get("bwlimit")
    if bwlimit is not None and not bwlimit.isdigit():
        raise UsageError(f"--bwlimit must be a non-negative integer (KiB/s), got '{bwlimit}'")
    result = MigrateOptions(
        online=options.get("online") == "1", with_local_disks=options.get("with-local-disks") == "1",
        targetstorage=options.get("targetstorage"),
        bwlimit_kib=int(bwlimit) if bwlimit is not None else None,
        migration_type=options.get("migration-type", "secure"),
        migration_network=options.get("migration-network"))
    try:
        validate_options(result)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return result


def _cmd_migrate(manager: GuestManager, args: list[str]) -> int:
    vmid = _vmid(args)
    if not args or args[0].startswith("--"):
        raise UsageError("missing TARGET node")
    target = args.pop(0)
    if not _NODE_NAME_RE.match(target):
        raise UsageError(f"invalid target node name '{target}'")
    if target == manager.node:
        raise UsageError(f"target is local node '{target}'")
    options = _migrate_options(_options(args, flags=("online", "with-local-disks")))
    settings = WorkerSettings(manager.root, manager.node, manager.run_dir,
                              manager.tasks.task_dir, manager.state_dir, vmid, target, options)
    try:
        upid = fork_worker(settings)
    except WorkerError as exc:
        raise GuestError(str(exc)) from None
    print(upid, flush=True)
    return asyncio.run(_follow_migration(manager, vmid, upid))


async def _follow_migration(manager: GuestManager, vmid: int, upid: Upid) -> int:
    """Print the task log as it grows until the task ends; exit status from its last
    line. The migration runs in a detached worker: SIGINT/SIGTERM here request a cancel
    (the guest stays on this node) and the log is followed to the end; if this process
    is killed the migration goes on."""
    loop = asyncio.get_running_loop()
    cancels: list[asyncio.Task[bool]] = []

    def cancel() -> None:
        if not cancels:
            print("corral qm: cancel requested, waiting for the migration to stop",
                  file=sys.stderr, flush=True)
            cancels.append(loop.create_task(request_cancel(manager, vmid)))

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, cancel)
    printed = 0
    while True:
        running = manager.tasks.status(upid).get("status") == "running"
        lines = manager.tasks.read_log(upid)
        for line in lines[printed:]:
            print(line, flush=True)
        printed = len(lines)
        if not running:
            break
        await asyncio.sleep(FOLLOW_INTERVAL_S)
    for task in cancels:
        with contextlib.suppress(Exception):
            await task
    last = lines[-1] if lines else ""
    if last in ("TASK OK",) or last.startswith("TASK WARNINGS"):
        return 0
    message = last.removeprefix("TASK ERROR: ").removeprefix("migration aborted: ") \
        if last.startswith("TASK ERROR: ") else f"the migration worker ended without a " \
        f"result (killed?); see `corral qm unlock {vmid}` in docs/guests.md"
    print(f"corral qm: {message}", file=sys.stderr)
    return 1


def _cmd_migrate_cancel(manager: GuestManager, args: list[str]) -> int:
    vmid = _vmid(args)
    _only(_options(args), ())
    if not asyncio.run(request_cancel(manager, vmid)):
        raise GuestError(f"no migration of VM {vmid} is running on node '{manager.node}'")
    print(f"cancel requested for the migration of VM {vmid}")
    return 0


COMMANDS: dict[str, Callable[[GuestManager, list[str]], int]] = {
    "list": _cmd_list, "create": _cmd_create, "config": _cmd_config, "set": _cmd_set,
    "status": _cmd_status, "unlock": _cmd_unlock, "tasks": _cmd_tasks,
    "task-status": _cmd_task_status, "task-log": _cmd_task_log,
    "migrate": _cmd_migrate, "migrate-cancel": _cmd_migrate_cancel,
    **{verb: _lifecycle(verb) for verb in ("start", "stop", "shutdown", "reboot", "suspend",
                                            "resume", "destroy")},
}


def _global_options(args: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {"root": DEFAULT_ROOT, "node": socket.gethostname().split(".")[0],
                                "run_dir": DEFAULT_RUN_DIR, "task_dir": DEFAULT_TASK_DIR}
    names = {"--root": "root", "--node": "node", "--run-dir": "run_dir", "--task-dir": "task_dir",
             "--state-dir": "state_dir"}
    while args and args[0] in names:
        option = args.pop(0)
        if not args:
            raise UsageError(f"option {option} needs a value")
        settings[names[option]] = args.pop(0)
    return settings


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    try:
        settings = _global_options(args)
        if not args or args[0] not in COMMANDS:
            raise UsageError(f"unknown verb '{args[0] if args else ''}'")
        verb = args.pop(0)
        manager = GuestManager(settings["root"], settings["node"], settings["run_dir"],
                               settings["task_dir"])
        manager.state_dir = settings.get("state_dir")
        return COMMANDS[verb](manager, args)
    except (UsageError, ConfigError, TaskError) as exc:
        print(f"corral qm: {exc}", file=sys.stderr)
        return 2
    except (GuestError, StorageError, QmpError, OSError) as exc:
        print(f"corral qm: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
