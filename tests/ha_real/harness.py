"""The real-process HA test helpers live in corral.ha.testing (the failover benchmark uses
them too); re-exported here for the tests of this directory."""

from corral.ha.testing import (
    PYTHON,
    HaNode,
    HaOnCluster,
    SafetyChecker,
    guest_pids,
    ha_cli,
    make_guest,
    wait_for,
    write_members,
)

__all__ = ["PYTHON", "HaNode", "HaOnCluster", "SafetyChecker", "guest_pids", "ha_cli", "make_guest",
           "wait_for", "write_members"]
