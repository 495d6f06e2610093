"""Error kinds shared by every layer.

Two kinds of protocol error, as in h11: the peer broke the protocol
(`RemoteProtocolError`: count it, drop the packet) and the caller misused an API
(`UsageError`). `ConfigError` is a configuration value out of its bounds or
inconsistent with another one; it names the key.
"""


class CorralError(Exception):
    """Base class of every error Corral raises on purpose."""


class UsageError(CorralError):
    """The caller misused an API (wrong state, bad argument)."""


class RemoteProtocolError(CorralError):
    """A peer sent something the protocol does not allow; drop it and count it."""


class DecodeError(RemoteProtocolError):
    """A packet is short, malformed or of an unknown version."""


class ConfigError(CorralError):
    """A configuration value is out of bounds or contradicts another one."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class InvariantError(CorralError):
    """An internal invariant broke: stop the daemon rather than continue wrong."""
