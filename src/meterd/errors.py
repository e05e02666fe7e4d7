"""Domain errors shared by the compiled core, its pure-Python twin and the server.

The server maps each class to one gRPC status code in a single place
(``meterd.server._status_for``); nothing else decides status codes.
"""

from __future__ import annotations


class MeterdError(Exception):
    """Base class of every error meterd raises on purpose."""


class InvalidInput(MeterdError):
    """A request field is malformed or out of range (gRPC INVALID_ARGUMENT).

    ``field`` names the offending field the way a client wrote it, for example
    ``events[3].quantity``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def within(self, prefix: str) -> InvalidInput:
        """The same error about a field inside ``prefix`` (such as ``quantities[1].``)."""
        return InvalidInput(prefix + self.field, self.message)


class Forbidden(MeterdError):
    """The caller's token does not cover this customer (PERMISSION_DENIED)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(MeterdError):
    """The customer, reservation or credit type does not exist (NOT_FOUND)."""


class Conflict(MeterdError):
    """The request contradicts what already happened, for example committing a
    reservation that was released (FAILED_PRECONDITION)."""


class Unauthenticated(MeterdError):
    """The call carries no credentials this daemon accepts (UNAUTHENTICATED)."""


class TimedOut(MeterdError):
    """The peer let a time limit pass, such as a stream that sends or reads nothing (DEADLINE_EXCEEDED)."""


class StorageFull(MeterdError):
    """LMDB has no room left (RESOURCE_EXHAUSTED); reads are still served."""


class LimitReached(MeterdError):
    """A bounded table or quota (a tenant's, or the daemon's) is full of live
    entries (RESOURCE_EXHAUSTED); the message names the limit. Nothing was applied."""


class Unavailable(MeterdError):
    """The daemon is shutting down or recovering (UNAVAILABLE); retry."""


class ConfigError(MeterdError):
    """The configuration or catalog is invalid; the message names file and key."""


class InvariantBroken(MeterdError):
    """What meterd holds true of its own state is not: a bug, or a damaged data
    directory. Raised before anything built on it is written (gRPC INTERNAL)."""


def invariant(holds: bool, what: str) -> None:
    """Assert ``what`` of meterd's own state, always (not only in debug runs)."""
    if not holds:
        raise InvariantBroken(what)
