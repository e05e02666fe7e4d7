from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GrantRequest(_message.Message):
    __slots__ = ("customer_id", "credit_type", "amount_nano", "expires_at_ms", "priority", "source", "idempotency_key")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    credit_type: str
    amount_nano: int
    expires_at_ms: int
    priority: int
    source: str
    idempotency_key: str
    def __init__(self, customer_id: _Optional[str] = ..., credit_type: _Optional[str] = ..., amount_nano: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., priority: _Optional[int] = ..., source: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class GrantResponse(_message.Message):
    __slots__ = ("grant_id", "balance_nano", "duplicate")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    BALANCE_NANO_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    balance_nano: int
    duplicate: bool
    def __init__(self, grant_id: _Optional[str] = ..., balance_nano: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class AdjustRequest(_message.Message):
    __slots__ = ("customer_id", "credit_type", "amount_nano", "reason", "idempotency_key")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    credit_type: str
    amount_nano: int
    reason: str
    idempotency_key: str
    def __init__(self, customer_id: _Optional[str] = ..., credit_type: _Optional[str] = ..., amount_nano: _Optional[int] = ..., reason: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class AdjustResponse(_message.Message):
    __slots__ = ("balance_nano", "duplicate")
    BALANCE_NANO_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    balance_nano: int
    duplicate: bool
    def __init__(self, balance_nano: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class SetOverdraftRequest(_message.Message):
    __slots__ = ("customer_id", "credit_type", "amount_nano", "clear", "reason")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    credit_type: str
    amount_nano: int
    clear: bool
    reason: str
    def __init__(self, customer_id: _Optional[str] = ..., credit_type: _Optional[str] = ..., amount_nano: _Optional[int] = ..., clear: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class SetOverdraftResponse(_message.Message):
    __slots__ = ("floor_nano", "available_nano")
    FLOOR_NANO_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_NANO_FIELD_NUMBER: _ClassVar[int]
    floor_nano: int
    available_nano: int
    def __init__(self, floor_nano: _Optional[int] = ..., available_nano: _Optional[int] = ...) -> None: ...

class SetTermRequest(_message.Message):
    __slots__ = ("customer_id", "credit_type", "term", "value", "clear", "reason")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    credit_type: str
    term: str
    value: int
    clear: bool
    reason: str
    def __init__(self, customer_id: _Optional[str] = ..., credit_type: _Optional[str] = ..., term: _Optional[str] = ..., value: _Optional[int] = ..., clear: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class SetTermResponse(_message.Message):
    __slots__ = ("floor_nano", "available_nano", "terms")
    FLOOR_NANO_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_NANO_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    floor_nano: int
    available_nano: int
    terms: _containers.RepeatedCompositeFieldContainer[CustomerTerm]
    def __init__(self, floor_nano: _Optional[int] = ..., available_nano: _Optional[int] = ..., terms: _Optional[_Iterable[_Union[CustomerTerm, _Mapping]]] = ...) -> None: ...

class CustomerTerm(_message.Message):
    __slots__ = ("credit_type", "term", "value")
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    credit_type: str
    term: str
    value: int
    def __init__(self, credit_type: _Optional[str] = ..., term: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("customer_id", "after_sequence", "limit")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    after_sequence: int
    limit: int
    def __init__(self, customer_id: _Optional[str] = ..., after_sequence: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("sequence", "time_ms", "kind", "credit_type", "amount_nano", "balance_before_nano", "balance_after_nano", "reference", "customer_id", "charge_nano", "charge_credit_type", "source", "tiers", "effective_ms", "period_end_ms", "meter", "quantity")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    BALANCE_BEFORE_NANO_FIELD_NUMBER: _ClassVar[int]
    BALANCE_AFTER_NANO_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CHARGE_NANO_FIELD_NUMBER: _ClassVar[int]
    CHARGE_CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_MS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_MS_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time_ms: int
    kind: str
    credit_type: str
    amount_nano: int
    balance_before_nano: int
    balance_after_nano: int
    reference: str
    customer_id: str
    charge_nano: int
    charge_credit_type: str
    source: str
    tiers: _containers.RepeatedCompositeFieldContainer[ChargeTier]
    effective_ms: int
    period_end_ms: int
    meter: str
    quantity: str
    def __init__(self, sequence: _Optional[int] = ..., time_ms: _Optional[int] = ..., kind: _Optional[str] = ..., credit_type: _Optional[str] = ..., amount_nano: _Optional[int] = ..., balance_before_nano: _Optional[int] = ..., balance_after_nano: _Optional[int] = ..., reference: _Optional[str] = ..., customer_id: _Optional[str] = ..., charge_nano: _Optional[int] = ..., charge_credit_type: _Optional[str] = ..., source: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[ChargeTier, _Mapping]]] = ..., effective_ms: _Optional[int] = ..., period_end_ms: _Optional[int] = ..., meter: _Optional[str] = ..., quantity: _Optional[str] = ...) -> None: ...

class ChargeTier(_message.Message):
    __slots__ = ("tier", "units_nano", "unit_price", "charge_nano")
    TIER_FIELD_NUMBER: _ClassVar[int]
    UNITS_NANO_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    CHARGE_NANO_FIELD_NUMBER: _ClassVar[int]
    tier: int
    units_nano: int
    unit_price: str
    charge_nano: int
    def __init__(self, tier: _Optional[int] = ..., units_nano: _Optional[int] = ..., unit_price: _Optional[str] = ..., charge_nano: _Optional[int] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("customer_id", "plan", "start_ms", "idempotency_key")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    plan: str
    start_ms: int
    idempotency_key: str
    def __init__(self, customer_id: _Optional[str] = ..., plan: _Optional[str] = ..., start_ms: _Optional[int] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class Subscription(_message.Message):
    __slots__ = ("customer_id", "plan", "anchor_ms", "period_start_ms", "period_end_ms", "cancel_at_period_end", "next_plan", "credit_period_start_ms", "credit_period_end_ms")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_MS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_MS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_MS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_AT_PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    NEXT_PLAN_FIELD_NUMBER: _ClassVar[int]
    CREDIT_PERIOD_START_MS_FIELD_NUMBER: _ClassVar[int]
    CREDIT_PERIOD_END_MS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    plan: str
    anchor_ms: int
    period_start_ms: int
    period_end_ms: int
    cancel_at_period_end: bool
    next_plan: str
    credit_period_start_ms: int
    credit_period_end_ms: int
    def __init__(self, customer_id: _Optional[str] = ..., plan: _Optional[str] = ..., anchor_ms: _Optional[int] = ..., period_start_ms: _Optional[int] = ..., period_end_ms: _Optional[int] = ..., cancel_at_period_end: _Optional[bool] = ..., next_plan: _Optional[str] = ..., credit_period_start_ms: _Optional[int] = ..., credit_period_end_ms: _Optional[int] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("customer_id", "at_period_end")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    AT_PERIOD_END_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    at_period_end: bool
    def __init__(self, customer_id: _Optional[str] = ..., at_period_end: _Optional[bool] = ...) -> None: ...

class ChangePlanRequest(_message.Message):
    __slots__ = ("customer_id", "plan")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    plan: str
    def __init__(self, customer_id: _Optional[str] = ..., plan: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("kinds",)
    KINDS_FIELD_NUMBER: _ClassVar[int]
    kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kinds: _Optional[_Iterable[str]] = ...) -> None: ...

class ReloadCatalogRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadCatalogResponse(_message.Message):
    __slots__ = ("source", "credit_types", "meters", "plans")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CREDIT_TYPES_FIELD_NUMBER: _ClassVar[int]
    METERS_FIELD_NUMBER: _ClassVar[int]
    PLANS_FIELD_NUMBER: _ClassVar[int]
    source: str
    credit_types: int
    meters: int
    plans: int
    def __init__(self, source: _Optional[str] = ..., credit_types: _Optional[int] = ..., meters: _Optional[int] = ..., plans: _Optional[int] = ...) -> None: ...

class StatementRequest(_message.Message):
    __slots__ = ("customer_id", "period")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    period: str
    def __init__(self, customer_id: _Optional[str] = ..., period: _Optional[str] = ...) -> None: ...

class StatementLine(_message.Message):
    __slots__ = ("section", "description", "credit_type", "amount_nano", "quantity", "events", "tiers")
    SECTION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_NANO_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    section: str
    description: str
    credit_type: str
    amount_nano: int
    quantity: str
    events: int
    tiers: _containers.RepeatedCompositeFieldContainer[ChargeTier]
    def __init__(self, section: _Optional[str] = ..., description: _Optional[str] = ..., credit_type: _Optional[str] = ..., amount_nano: _Optional[int] = ..., quantity: _Optional[str] = ..., events: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[ChargeTier, _Mapping]]] = ...) -> None: ...

class StatementTotal(_message.Message):
    __slots__ = ("credit_type", "currency", "minor_decimals", "fees_nano", "overage_nano", "usage_nano", "credits_applied_nano", "usage_billed_nano", "total_nano", "carried_in_nano", "carried_out_nano", "due_minor")
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    MINOR_DECIMALS_FIELD_NUMBER: _ClassVar[int]
    FEES_NANO_FIELD_NUMBER: _ClassVar[int]
    OVERAGE_NANO_FIELD_NUMBER: _ClassVar[int]
    USAGE_NANO_FIELD_NUMBER: _ClassVar[int]
    CREDITS_APPLIED_NANO_FIELD_NUMBER: _ClassVar[int]
    USAGE_BILLED_NANO_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NANO_FIELD_NUMBER: _ClassVar[int]
    CARRIED_IN_NANO_FIELD_NUMBER: _ClassVar[int]
    CARRIED_OUT_NANO_FIELD_NUMBER: _ClassVar[int]
    DUE_MINOR_FIELD_NUMBER: _ClassVar[int]
    credit_type: str
    currency: str
    minor_decimals: int
    fees_nano: int
    overage_nano: int
    usage_nano: int
    credits_applied_nano: int
    usage_billed_nano: int
    total_nano: int
    carried_in_nano: int
    carried_out_nano: int
    due_minor: int
    def __init__(self, credit_type: _Optional[str] = ..., currency: _Optional[str] = ..., minor_decimals: _Optional[int] = ..., fees_nano: _Optional[int] = ..., overage_nano: _Optional[int] = ..., usage_nano: _Optional[int] = ..., credits_applied_nano: _Optional[int] = ..., usage_billed_nano: _Optional[int] = ..., total_nano: _Optional[int] = ..., carried_in_nano: _Optional[int] = ..., carried_out_nano: _Optional[int] = ..., due_minor: _Optional[int] = ...) -> None: ...

class StatementBalance(_message.Message):
    __slots__ = ("credit_type", "opening_nano", "granted_nano", "included_nano", "adjusted_nano", "forfeited_nano", "used_nano", "billed_nano", "other_nano", "closing_nano", "rolled_over_nano")
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    OPENING_NANO_FIELD_NUMBER: _ClassVar[int]
    GRANTED_NANO_FIELD_NUMBER: _ClassVar[int]
    INCLUDED_NANO_FIELD_NUMBER: _ClassVar[int]
    ADJUSTED_NANO_FIELD_NUMBER: _ClassVar[int]
    FORFEITED_NANO_FIELD_NUMBER: _ClassVar[int]
    USED_NANO_FIELD_NUMBER: _ClassVar[int]
    BILLED_NANO_FIELD_NUMBER: _ClassVar[int]
    OTHER_NANO_FIELD_NUMBER: _ClassVar[int]
    CLOSING_NANO_FIELD_NUMBER: _ClassVar[int]
    ROLLED_OVER_NANO_FIELD_NUMBER: _ClassVar[int]
    credit_type: str
    opening_nano: int
    granted_nano: int
    included_nano: int
    adjusted_nano: int
    forfeited_nano: int
    used_nano: int
    billed_nano: int
    other_nano: int
    closing_nano: int
    rolled_over_nano: int
    def __init__(self, credit_type: _Optional[str] = ..., opening_nano: _Optional[int] = ..., granted_nano: _Optional[int] = ..., included_nano: _Optional[int] = ..., adjusted_nano: _Optional[int] = ..., forfeited_nano: _Optional[int] = ..., used_nano: _Optional[int] = ..., billed_nano: _Optional[int] = ..., other_nano: _Optional[int] = ..., closing_nano: _Optional[int] = ..., rolled_over_nano: _Optional[int] = ...) -> None: ...

class Statement(_message.Message):
    __slots__ = ("customer_id", "period", "from_ms", "to_ms", "lines", "totals", "balances", "activity", "label")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    FROM_MS_FIELD_NUMBER: _ClassVar[int]
    TO_MS_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    ACTIVITY_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    period: str
    from_ms: int
    to_ms: int
    lines: _containers.RepeatedCompositeFieldContainer[StatementLine]
    totals: _containers.RepeatedCompositeFieldContainer[StatementTotal]
    balances: _containers.RepeatedCompositeFieldContainer[StatementBalance]
    activity: _containers.RepeatedCompositeFieldContainer[StatementLine]
    label: str
    def __init__(self, customer_id: _Optional[str] = ..., period: _Optional[str] = ..., from_ms: _Optional[int] = ..., to_ms: _Optional[int] = ..., lines: _Optional[_Iterable[_Union[StatementLine, _Mapping]]] = ..., totals: _Optional[_Iterable[_Union[StatementTotal, _Mapping]]] = ..., balances: _Optional[_Iterable[_Union[StatementBalance, _Mapping]]] = ..., activity: _Optional[_Iterable[_Union[StatementLine, _Mapping]]] = ..., label: _Optional[str] = ...) -> None: ...

class LedgerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LedgerStatus(_message.Message):
    __slots__ = ("sidecar_id", "ledger", "flushed_sequence", "backlog_usage_rows", "backlog_entries", "last_flush_ms", "last_error", "consecutive_failures", "leases", "leases_held", "leases_reachable", "leases_error")
    SIDECAR_ID_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    FLUSHED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_USAGE_ROWS_FIELD_NUMBER: _ClassVar[int]
    BACKLOG_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LAST_FLUSH_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    LEASES_HELD_FIELD_NUMBER: _ClassVar[int]
    LEASES_REACHABLE_FIELD_NUMBER: _ClassVar[int]
    LEASES_ERROR_FIELD_NUMBER: _ClassVar[int]
    sidecar_id: str
    ledger: str
    flushed_sequence: int
    backlog_usage_rows: int
    backlog_entries: int
    last_flush_ms: int
    last_error: str
    consecutive_failures: int
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    leases_held: int
    leases_reachable: bool
    leases_error: str
    def __init__(self, sidecar_id: _Optional[str] = ..., ledger: _Optional[str] = ..., flushed_sequence: _Optional[int] = ..., backlog_usage_rows: _Optional[int] = ..., backlog_entries: _Optional[int] = ..., last_flush_ms: _Optional[int] = ..., last_error: _Optional[str] = ..., consecutive_failures: _Optional[int] = ..., leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., leases_held: _Optional[int] = ..., leases_reachable: _Optional[bool] = ..., leases_error: _Optional[str] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("customer_id", "credit_type", "balance_nano", "available_nano", "leased_nano", "given_back_nano", "expires_at_ms", "rate_nano_per_s", "borrowed_nano", "outage_allowance_nano")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    BALANCE_NANO_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_NANO_FIELD_NUMBER: _ClassVar[int]
    LEASED_NANO_FIELD_NUMBER: _ClassVar[int]
    GIVEN_BACK_NANO_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    RATE_NANO_PER_S_FIELD_NUMBER: _ClassVar[int]
    BORROWED_NANO_FIELD_NUMBER: _ClassVar[int]
    OUTAGE_ALLOWANCE_NANO_FIELD_NUMBER: _ClassVar[int]
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
    def __init__(self, customer_id: _Optional[str] = ..., credit_type: _Optional[str] = ..., balance_nano: _Optional[int] = ..., available_nano: _Optional[int] = ..., leased_nano: _Optional[int] = ..., given_back_nano: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., rate_nano_per_s: _Optional[int] = ..., borrowed_nano: _Optional[int] = ..., outage_allowance_nano: _Optional[int] = ...) -> None: ...

class AdvanceClockRequest(_message.Message):
    __slots__ = ("by_ms", "to_ms")
    BY_MS_FIELD_NUMBER: _ClassVar[int]
    TO_MS_FIELD_NUMBER: _ClassVar[int]
    by_ms: int
    to_ms: int
    def __init__(self, by_ms: _Optional[int] = ..., to_ms: _Optional[int] = ...) -> None: ...

class AdvanceClockResponse(_message.Message):
    __slots__ = ("now_ms",)
    NOW_MS_FIELD_NUMBER: _ClassVar[int]
    now_ms: int
    def __init__(self, now_ms: _Optional[int] = ...) -> None: ...
