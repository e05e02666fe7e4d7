from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ALLOW: _ClassVar[Decision]
    DECISION_DENY: _ClassVar[Decision]
    DECISION_DEGRADE: _ClassVar[Decision]

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    REASON_INSUFFICIENT_BALANCE: _ClassVar[Reason]
    REASON_UNKNOWN_CUSTOMER: _ClassVar[Reason]
    REASON_OVERFLOW: _ClassVar[Reason]
    REASON_LEDGER_UNAVAILABLE: _ClassVar[Reason]
DECISION_UNSPECIFIED: Decision
DECISION_ALLOW: Decision
DECISION_DENY: Decision
DECISION_DEGRADE: Decision
REASON_UNSPECIFIED: Reason
REASON_INSUFFICIENT_BALANCE: Reason
REASON_UNKNOWN_CUSTOMER: Reason
REASON_OVERFLOW: Reason
REASON_LEDGER_UNAVAILABLE: Reason

class Quantity(_message.Message):
    __slots__ = ("meter", "quantity", "quantity_decimal")
    METER_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_DECIMAL_FIELD_NUMBER: _ClassVar[int]
    meter: str
    quantity: int
    quantity_decimal: str
    def __init__(self, meter: _Optional[str] = ..., quantity: _Optional[int] = ..., quantity_decimal: _Optional[str] = ...) -> None: ...

class UsageEvent(_message.Message):
    __slots__ = ("customer_id", "meter", "quantity", "quantity_decimal", "dimensions", "timestamp_ms", "idempotency_key", "quantities")
    class DimensionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_DECIMAL_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    QUANTITIES_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    meter: str
    quantity: int
    quantity_decimal: str
    dimensions: _containers.ScalarMap[str, str]
    timestamp_ms: int
    idempotency_key: str
    quantities: _containers.RepeatedCompositeFieldContainer[Quantity]
    def __init__(self, customer_id: _Optional[str] = ..., meter: _Optional[str] = ..., quantity: _Optional[int] = ..., quantity_decimal: _Optional[str] = ..., dimensions: _Optional[_Mapping[str, str]] = ..., timestamp_ms: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., quantities: _Optional[_Iterable[_Union[Quantity, _Mapping]]] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: UsageEvent
    def __init__(self, event: _Optional[_Union[UsageEvent, _Mapping]] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("decision", "reason", "credit_type", "cost_nano", "balance_nano", "duplicate", "mode", "priority")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    COST_NANO_FIELD_NUMBER: _ClassVar[int]
    BALANCE_NANO_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    reason: Reason
    credit_type: str
    cost_nano: int
    balance_nano: int
    duplicate: bool
    mode: str
    priority: int
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[_Union[Reason, str]] = ..., credit_type: _Optional[str] = ..., cost_nano: _Optional[int] = ..., balance_nano: _Optional[int] = ..., duplicate: _Optional[bool] = ..., mode: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class ReportBatchRequest(_message.Message):
    __slots__ = ("client_id", "sequence", "events", "details")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    sequence: int
    events: _containers.RepeatedCompositeFieldContainer[UsageEvent]
    details: bool
    def __init__(self, client_id: _Optional[str] = ..., sequence: _Optional[int] = ..., events: _Optional[_Iterable[_Union[UsageEvent, _Mapping]]] = ..., details: _Optional[bool] = ...) -> None: ...

class EventResult(_message.Message):
    __slots__ = ("index", "decision", "reason", "credit_type", "cost_nano", "balance_nano", "mode", "priority")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    COST_NANO_FIELD_NUMBER: _ClassVar[int]
    BALANCE_NANO_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    decision: Decision
    reason: Reason
    credit_type: str
    cost_nano: int
    balance_nano: int
    mode: str
    priority: int
    def __init__(self, index: _Optional[int] = ..., decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[_Union[Reason, str]] = ..., credit_type: _Optional[str] = ..., cost_nano: _Optional[int] = ..., balance_nano: _Optional[int] = ..., mode: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class Denial(_message.Message):
    __slots__ = ("index", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    reason: Reason
    def __init__(self, index: _Optional[int] = ..., reason: _Optional[_Union[Reason, str]] = ...) -> None: ...

class Degradation(_message.Message):
    __slots__ = ("index", "mode", "priority")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    mode: str
    priority: int
    def __init__(self, index: _Optional[int] = ..., mode: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class ReportBatchResponse(_message.Message):
    __slots__ = ("accepted", "denied", "denials", "sequence", "duplicate", "degraded", "degradations", "results")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DENIED_FIELD_NUMBER: _ClassVar[int]
    DENIALS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    DEGRADATIONS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    denied: int
    denials: _containers.RepeatedCompositeFieldContainer[Denial]
    sequence: int
    duplicate: bool
    degraded: int
    degradations: _containers.RepeatedCompositeFieldContainer[Degradation]
    results: _containers.RepeatedCompositeFieldContainer[EventResult]
    def __init__(self, accepted: _Optional[int] = ..., denied: _Optional[int] = ..., denials: _Optional[_Iterable[_Union[Denial, _Mapping]]] = ..., sequence: _Optional[int] = ..., duplicate: _Optional[bool] = ..., degraded: _Optional[int] = ..., degradations: _Optional[_Iterable[_Union[Degradation, _Mapping]]] = ..., results: _Optional[_Iterable[_Union[EventResult, _Mapping]]] = ...) -> None: ...

class AuthorizeRequest(_message.Message):
    __slots__ = ("customer_id", "meter", "quantity", "quantity_decimal", "dimensions", "ttl_ms", "idempotency_key", "quantities")
    class DimensionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_DECIMAL_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    QUANTITIES_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    meter: str
    quantity: int
    quantity_decimal: str
    dimensions: _containers.ScalarMap[str, str]
    ttl_ms: int
    idempotency_key: str
    quantities: _containers.RepeatedCompositeFieldContainer[Quantity]
    def __init__(self, customer_id: _Optional[str] = ..., meter: _Optional[str] = ..., quantity: _Optional[int] = ..., quantity_decimal: _Optional[str] = ..., dimensions: _Optional[_Mapping[str, str]] = ..., ttl_ms: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., quantities: _Optional[_Iterable[_Union[Quantity, _Mapping]]] = ...) -> None: ...

class AuthorizeResponse(_message.Message):
    __slots__ = ("decision", "reason", "reservation_id", "credit_type", "reserved_nano", "available_nano", "expires_at_ms", "duplicate", "mode", "priority")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    RESERVED_NANO_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_NANO_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    reason: Reason
    reservation_id: str
    credit_type: str
    reserved_nano: int
    available_nano: int
    expires_at_ms: int
    duplicate: bool
    mode: str
    priority: int
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[_Union[Reason, str]] = ..., reservation_id: _Optional[str] = ..., credit_type: _Optional[str] = ..., reserved_nano: _Optional[int] = ..., available_nano: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., duplicate: _Optional[bool] = ..., mode: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("reservation_id", "quantity", "quantity_decimal", "quantities")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_DECIMAL_FIELD_NUMBER: _ClassVar[int]
    QUANTITIES_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    quantity: int
    quantity_decimal: str
    quantities: _containers.RepeatedCompositeFieldContainer[Quantity]
    def __init__(self, reservation_id: _Optional[str] = ..., quantity: _Optional[int] = ..., quantity_decimal: _Optional[str] = ..., quantities: _Optional[_Iterable[_Union[Quantity, _Mapping]]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("cost_nano", "released_nano", "balance_nano", "overrun_nano", "duplicate")
    COST_NANO_FIELD_NUMBER: _ClassVar[int]
    RELEASED_NANO_FIELD_NUMBER: _ClassVar[int]
    BALANCE_NANO_FIELD_NUMBER: _ClassVar[int]
    OVERRUN_NANO_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    cost_nano: int
    released_nano: int
    balance_nano: int
    overrun_nano: int
    duplicate: bool
    def __init__(self, cost_nano: _Optional[int] = ..., released_nano: _Optional[int] = ..., balance_nano: _Optional[int] = ..., overrun_nano: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released_nano", "available_nano", "duplicate")
    RELEASED_NANO_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_NANO_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    released_nano: int
    available_nano: int
    duplicate: bool
    def __init__(self, released_nano: _Optional[int] = ..., available_nano: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class GetBalanceRequest(_message.Message):
    __slots__ = ("customer_id",)
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    def __init__(self, customer_id: _Optional[str] = ...) -> None: ...

class Grant(_message.Message):
    __slots__ = ("grant_id", "remaining_nano", "expires_at_ms", "priority", "source")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    REMAINING_NANO_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    remaining_nano: int
    expires_at_ms: int
    priority: int
    source: str
    def __init__(self, grant_id: _Optional[str] = ..., remaining_nano: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., priority: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class CreditBalance(_message.Message):
    __slots__ = ("credit_type", "balance_nano", "reserved_nano", "available_nano", "floor_nano", "grants", "ledger", "lease_nano", "central_available_nano", "leased_elsewhere_nano", "ledger_seen_ms", "settled_ms")
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    BALANCE_NANO_FIELD_NUMBER: _ClassVar[int]
    RESERVED_NANO_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_NANO_FIELD_NUMBER: _ClassVar[int]
    FLOOR_NANO_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    LEASE_NANO_FIELD_NUMBER: _ClassVar[int]
    CENTRAL_AVAILABLE_NANO_FIELD_NUMBER: _ClassVar[int]
    LEASED_ELSEWHERE_NANO_FIELD_NUMBER: _ClassVar[int]
    LEDGER_SEEN_MS_FIELD_NUMBER: _ClassVar[int]
    SETTLED_MS_FIELD_NUMBER: _ClassVar[int]
    credit_type: str
    balance_nano: int
    reserved_nano: int
    available_nano: int
    floor_nano: int
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    ledger: bool
    lease_nano: int
    central_available_nano: int
    leased_elsewhere_nano: int
    ledger_seen_ms: int
    settled_ms: int
    def __init__(self, credit_type: _Optional[str] = ..., balance_nano: _Optional[int] = ..., reserved_nano: _Optional[int] = ..., available_nano: _Optional[int] = ..., floor_nano: _Optional[int] = ..., grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., ledger: _Optional[bool] = ..., lease_nano: _Optional[int] = ..., central_available_nano: _Optional[int] = ..., leased_elsewhere_nano: _Optional[int] = ..., ledger_seen_ms: _Optional[int] = ..., settled_ms: _Optional[int] = ...) -> None: ...

class MeterUsage(_message.Message):
    __slots__ = ("meter", "quantity")
    METER_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    meter: str
    quantity: str
    def __init__(self, meter: _Optional[str] = ..., quantity: _Optional[str] = ...) -> None: ...

class GetBalanceResponse(_message.Message):
    __slots__ = ("customer_id", "balances", "usage", "period_start_ms", "period_end_ms", "plan", "terms")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    BALANCES_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_MS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_END_MS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    TERMS_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    balances: _containers.RepeatedCompositeFieldContainer[CreditBalance]
    usage: _containers.RepeatedCompositeFieldContainer[MeterUsage]
    period_start_ms: int
    period_end_ms: int
    plan: str
    terms: _containers.RepeatedCompositeFieldContainer[OwnTerm]
    def __init__(self, customer_id: _Optional[str] = ..., balances: _Optional[_Iterable[_Union[CreditBalance, _Mapping]]] = ..., usage: _Optional[_Iterable[_Union[MeterUsage, _Mapping]]] = ..., period_start_ms: _Optional[int] = ..., period_end_ms: _Optional[int] = ..., plan: _Optional[str] = ..., terms: _Optional[_Iterable[_Union[OwnTerm, _Mapping]]] = ...) -> None: ...

class OwnTerm(_message.Message):
    __slots__ = ("credit_type", "term", "value")
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    credit_type: str
    term: str
    value: int
    def __init__(self, credit_type: _Optional[str] = ..., term: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...

class StartSessionRequest(_message.Message):
    __slots__ = ("customer_id", "meter", "dimensions", "heartbeat_timeout_ms", "session_id")
    class DimensionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    METER_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    meter: str
    dimensions: _containers.ScalarMap[str, str]
    heartbeat_timeout_ms: int
    session_id: str
    def __init__(self, customer_id: _Optional[str] = ..., meter: _Optional[str] = ..., dimensions: _Optional[_Mapping[str, str]] = ..., heartbeat_timeout_ms: _Optional[int] = ..., session_id: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("decision", "reason", "session_id", "credit_type", "billed_quantity", "cost_nano", "balance_nano", "closed", "started_at_ms", "duplicate")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CREDIT_TYPE_FIELD_NUMBER: _ClassVar[int]
    BILLED_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    COST_NANO_FIELD_NUMBER: _ClassVar[int]
    BALANCE_NANO_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    reason: Reason
    session_id: str
    credit_type: str
    billed_quantity: str
    cost_nano: int
    balance_nano: int
    closed: bool
    started_at_ms: int
    duplicate: bool
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[_Union[Reason, str]] = ..., session_id: _Optional[str] = ..., credit_type: _Optional[str] = ..., billed_quantity: _Optional[str] = ..., cost_nano: _Optional[int] = ..., balance_nano: _Optional[int] = ..., closed: _Optional[bool] = ..., started_at_ms: _Optional[int] = ..., duplicate: _Optional[bool] = ...) -> None: ...
