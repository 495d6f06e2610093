"""The explicit state enums and exit codes of the HA protocol.

The string values are the ones written to manager_status / lrm_status and shown to users, so
they match the reference's file contents.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ServiceState(StrEnum):
    """CRM-side state of one service (manager_status service_status.<sid>.state)."""

    STOPPED = "stopped"
    REQUEST_STOP = "request_stop"
    REQUEST_START = "request_start"
    REQUEST_START_BALANCE = "request_start_balance"
    STARTED = "started"
    FENCE = "fence"
    RECOVERY = "recovery"
    FREEZE = "freeze"
    MIGRATE = "migrate"
    RELOCATE = "relocate"
    ERROR = "error"


class RequestedState(StrEnum):
    """What the admin asked for in resources.cfg (`enabled` is parsed as an alias of started)."""

    STARTED = "started"
    STOPPED = "stopped"
    DISABLED = "disabled"
    IGNORED = "ignored"


class NodeState(StrEnum):
    """CRM view of a node (manager_status node_status.<node>)."""

    ONLINE = "online"
    MAINTENANCE = "maintenance"
    UNKNOWN = "unknown"
    FENCE = "fence"
    GONE = "gone"


class CrmState(StrEnum):
    STARTUP = "startup"
    WAIT_FOR_QUORUM = "wait_for_quorum"
    SLAVE = "slave"
    MASTER = "master"
    LOST_MANAGER_LOCK = "lost_manager_lock"


class LrmState(StrEnum):
    STARTUP = "startup"
    WAIT_FOR_AGENT_LOCK = "wait_for_agent_lock"
    ACTIVE = "active"
    MAINTENANCE = "maintenance"
    LOST_AGENT_LOCK = "lost_agent_lock"


class LrmMode(StrEnum):
    """Mode an LRM announces in its lrm_status; the CRM reacts to it."""

    ACTIVE = "active"
    RESTART = "restart"
    SHUTDOWN = "shutdown"
    MAINTENANCE = "maintenance"
    DISARM = "disarm"


class ExitCode(IntEnum):
    """Result codes of an LRM job, as recorded in lrm_status results."""

    SUCCESS = 0
    ERROR = 1
    ETRY_AGAIN = 2
    EWRONG_NODE = 3
    EUNKNOWN_SERVICE_TYPE = 4
    EUNKNOWN_COMMAND = 5
    EINVALID_PARAMETER = 6
    EUNKNOWN_SERVICE = 7
    IGNORED = 8


class ShutdownPolicy(StrEnum):
    CONDITIONAL = "conditional"
    FREEZE = "freeze"
    FAILOVER = "failover"
    MIGRATE = "migrate"


class CrsMode(StrEnum):
    BASIC = "basic"
    STATIC = "static"
    DYNAMIC = "dynamic"


class Preference(StrEnum):
    """How select_service_node treats the current node (section 9.1 of the anchors)."""

    NONE = "none"
    BEST_SCORE = "best-score"
    TRY_NEXT = "try-next"


# Services in these states do not keep their node's LRM busy (anchors section 4).
INACTIVE_SERVICE_STATES = frozenset(
    {ServiceState.STOPPED, ServiceState.FREEZE, ServiceState.ERROR, ServiceState.REQUEST_START}
)

# Guest locks that are safe to drop after the node that held them was reset.
SAFE_LEFTOVER_LOCKS = frozenset(
    {"backup", "mounted", "migrate", "clone", "rollback", "snapshot", "snapshot-delete",
     "suspending", "suspended"}
)
