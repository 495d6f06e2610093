"""`corral qm`: the reference's guest verbs against a config tree and this node.

    corral qm [--root DIR] [--node NAME] [--run-dir DIR] [--task-dir DIR] VERB ...

Config keys are given as `--key value` (any key of config.py, e.g. `--net0 virtio=...`),
so `create` and `set` take every key without a fixed option list. Errors go to stderr
with exit status 2 for bad input and 1 for failed operations.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import Callable, Sequence
from typing import Any

from corral.guests.config import ConfigError, write_config
from corral.guests.qemu import (
    DEFAULT_RUN_DIR,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
    DEFAULT_TASK_DIR,
    GuestError,
    GuestManager,
)
from corral.guests.qmp import QmpError
from corral.guests.storage import StorageError
from corral.guests.tasks import TaskError, parse_upid

DEFAULT_ROOT = "/etc/corral"
USAGE = """usage: corral qm [--root DIR] [--node NAME] [--run-dir DIR] [--task-dir DIR] VERB ...
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
  tasks [--limit N] | task-status UPID | task-log UPID"""


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


COMMANDS: dict[str, Callable[[GuestManager, list[str]], int]] = {
    "list": _cmd_list, "create": _cmd_create, "config": _cmd_config, "set": _cmd_set,
    "status": _cmd_status, "unlock": _cmd_unlock, "tasks": _cmd_tasks,
    "task-status": _cmd_task_status, "task-log": _cmd_task_log,
    **{verb: _lifecycle(verb) for verb in ("start", "stop", "shutdown", "reboot", "suspend",
                                            "resume", "destroy")},
}


def _global_options(args: list[str]) -> dict[str, Any]:
    settings: dict[str, Any] = {"root": DEFAULT_ROOT, "node": socket.gethostname().split(".")[0],
                                "run_dir": DEFAULT_RUN_DIR, "task_dir": DEFAULT_TASK_DIR}
    names = {"--root": "root", "--node": "node", "--run-dir": "run_dir", "--task-dir": "task_dir"}
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
        return COMMANDS[verb](manager, args)
    except (UsageError, ConfigError, TaskError) as exc:
        print(f"corral qm: {exc}", file=sys.stderr)
        return 2
    except (GuestError, StorageError, QmpError, OSError) as exc:
        print(f"corral qm: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
