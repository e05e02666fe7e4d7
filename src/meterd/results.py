"""What the engine answers, in its own terms: the servicers turn these into
protobuf messages (meterd.wire), and the engine never sees one.

Decision and reason codes are the cores' (meterd.corespec), which have the
numbers of the API's enums; a test holds the two together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meterd.corespec import DECISION_ALLOW as ALLOW
from meterd.corespec import DECISION_DEGRADE as DEGRADE
from meterd.corespec import DECISION_DENY as DENY
from meterd.corespec import (
    REASON_INSUFFICIENT_BALANCE,
    REASON_LEDGER_UNAVAILABLE,
    REASON_NONE,
    REASON_OVERFLOW,
    REASON_UNKNOWN_CUSTOMER,
)
from meterd.state import Bucket

__all__ = ["ALLOW", "DENY", "DEGRADE", "REASON_NONE", "REASON_INSUFFICIENT_BALANCE", "REASON_UNKNOWN_CUSTOMER",
           "REASON_OVERFLOW", "REASON_LEDGER_UNAVAILABLE"]
DECISION_NAMES = {ALLOW: "allow", DEGRADE: "degrade", DENY: "deny"}


@dataclass(frozen=True)
class Keyed:
    """An idempotency key, and the request it came with in a canonical form (for the digest)."""
    key: str
    request: bytes


@dataclass(frozen=True)
class Replay:
    """A remembered answer, as it was first encoded: a retry gets it back, marked duplicate."""
    data: bytes


@dataclass(frozen=True)
class Quantity:
    """A request's quantity: whole units, or an exact decimal (``decimal`` not None)."""
    whole: int = 0
    decimal: str | None = None


@dataclass
class Authorized:
    decision: int
    credit_type: str
    available_nano: int
    reason: int = REASON_NONE
    reservation_id: str = ""
    reserved_nano: int = 0
    expires_at_ms: int = 0
    mode: str = ""
    priority: int = 0


@dataclass
class Committed:
    cost_nano: int
    released_nano: int
    balance_nano: int
    overrun_nano: int


@dataclass
class Released:
    released_nano: int
    available_nano: int


@dataclass
class SessionState:
    decision: int
    session_id: str
    credit_type: str
    closed: bool
    reason: int = REASON_NONE
    billed_quantity: str = ""
    cost_nano: int = 0
    balance_nano: int = 0
    started_at_ms: int = 0


@dataclass
class Granted:
    grant_id: str
    balance_nano: int


@dataclass
class Adjusted:
    balance_nano: int


@dataclass(frozen=True)
class Term:
    """One of a customer's own terms: its name (subscriptions.TERMS), credit type and value."""
    credit_type: str
    term: str
    value: int


@dataclass(frozen=True)
class TermsSet:
    """A SetTerm's (and a SetOverdraft's) answer: the floor and what may be spent in the
    credit type, and all the customer's own terms after the change."""
    floor_nano: int
    available_nano: int
    terms: tuple[Term, ...]


@dataclass(frozen=True)
class LeaseView:
    """Ledger mode: what a sidecar's figure of a balance is made of, and how old each part is."""
    lease_nano: int               # the lease held here, exact and current
    central_available_nano: int   # as of ledger_seen_ms
    leased_elsewhere_nano: int    # as of ledger_seen_ms, as the ledger counts other sidecars' leases
    ledger_seen_ms: int
    settled_ms: int               # this sidecar's last flush


@dataclass
class CreditBalance:
    credit_type: str
    balance_nano: int
    reserved_nano: int
    floor_nano: int
    available_nano: int
    grants: list[Bucket] = field(default_factory=list)
    ledger: LeaseView | None = None


@dataclass(frozen=True)
class LeaseRow:
    customer_id: str
    credit_type: str
    balance_nano: int
    available_nano: int
    leased_nano: int
    given_back_nano: int
    expires_at_ms: int
    rate_nano_per_s: int
    borrowed_nano: int
    outage_allowance_nano: int


@dataclass
class BalanceView:
    customer_id: str
    period_start_ms: int
    period_end_ms: int
    plan: str = ""
    balances: list[CreditBalance] = field(default_factory=list)
    usage: list[tuple[str, str]] = field(default_factory=list)  # (meter, exact quantity)
    terms: tuple[Term, ...] = ()  # the customer's own (Admin SetTerm, SetOverdraft)


@dataclass
class LedgerState:
    sidecar_id: str
    ledger: str  # its URL, without credentials
    flushed_sequence: int
    backlog_usage_rows: int
    backlog_entries: int
    last_flush_ms: int
    last_error: str
    consecutive_failures: int
    leases: list[LeaseRow] = field(default_factory=list)
    leases_held: int = 0
    leases_reachable: bool = False
    leases_error: str = ""
