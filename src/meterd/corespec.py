"""The twin contract: what the compiled core (``_fastpath.pyx``) and its
pure-Python twin (``_fastpath_py.py``) share, defined once.

Both cores take from here their codes (reasons, decisions, aggregations), the
limits their tables and buffers are sized for, every error message they both
raise, and the priority hint of a degraded decision. The compiled core reads
the messages from this module (error paths are not hot); the values it needs
in C are repeated in ``corespec.pxd``, and the compiled core refuses to import
when they differ from these (tests/test_core_contract.py checks them too).
The API itself is ``meterd.core.CoreAPI``.
"""

from __future__ import annotations

# ---- codes -----------------------------------------------------------------

# Reasons, as meterd.v1.Reason. OUT_DEGRADED is no reason on the wire: it is what
# a debit answers for an event served in its plan's fallback mode.
REASON_NONE = 0
REASON_INSUFFICIENT_BALANCE = 1
REASON_UNKNOWN_CUSTOMER = 2
REASON_OVERFLOW = 3
REASON_LEDGER_UNAVAILABLE = 4  # the engine's, in ledger mode (a lease not topped up in time); no core answers it
OUT_DEGRADED = 100

# Decisions, as meterd.v1.Decision.
DECISION_ALLOW = 1
DECISION_DENY = 2
DECISION_DEGRADE = 3

# How a meter's usage adds up in a period: indices of catalog.AGGREGATIONS.
AGG_SUM = 0
AGG_COUNT = 1
AGG_MAX = 2
AGG_LATEST = 3
AGG_UNIQUE = 4

# ---- limits ----------------------------------------------------------------

# Names of credit types (catalog.NAME_RE) and of fallback modes (plans.py): the
# cores refuse longer ones, and size the responses they encode for these. A name
# is written with a one-byte length, so both stay below 128.
NAME_BYTES_MAX = 64
MODE_BYTES_MAX = 32
# The largest customer_id_bytes_max (config.py): a customer id's length is one byte.
CUSTOMER_ID_BYTES_LIMIT = 255
# The largest dimensions_max, dimension_key_bytes_max and dimension_value_bytes_max.
DIMENSIONS_LIMIT = 1024
DIMENSION_KEY_BYTES_LIMIT = 65536
DIMENSION_VALUE_BYTES_LIMIT = 65536
# A negotiated discount (Core.set_discount) is in 1/DISCOUNT_SCALE of a price
# (basis points). So that a discounted charge is exact, with its remainder
# carried like any other, a catalog's denominators are multiples of it: the
# catalog's own common denominator of a credit type's prices times DISCOUNT_SCALE.
DISCOUNT_SCALE = 10_000
# A credit type's denominator in the cores (a remainder below it is an int64);
# catalog.py simplifies prices to a common denominator of at most
# DENOMINATOR_MAX // DISCOUNT_SCALE.
DENOMINATOR_MAX = 10**18
# Decimals of a meter's quantities.
PRECISION_MAX = 9
# The dimensions a meter's price table is keyed by.
PRICE_DIMENSIONS_MAX = 4
# Tiers of one price.
TIERS_PER_PRICE_MAX = 16
# Meters of one event (UsageEvent.quantities) and of one reservation.
QUANTITIES_MAX = 8
# Conditions of a catalog (dimensions the cores set from a request's quantities), and values of one.
CONDITIONS_MAX = 4
CONDITION_VALUES_MAX = 16
# A meter's minimum charge per event (catalog amounts are at most this).
MINIMUM_NANO_MAX = 1 << 62
# Plans, "no plan" included: an account's plan is 16 bits.
PLANS_MAX = 65535
# Low-balance alerts kept between two take_alerts; past it, take_alerts scans.
ALERTS_MAX = 4096
# How much of a caller's bytes (a meter name, a dimension value) an error quotes.
QUOTE_BYTES_MAX = 64

INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)

# ---- field names -----------------------------------------------------------

# UsageEvent's fields by number (0: none), and ReportBatchRequest's header fields.
EVENT_FIELDS = ("", "customer_id", "meter", "quantity", "quantity_decimal", "dimensions", "timestamp_ms",
                "idempotency_key", "quantities")
# Quantity's fields by number (0: none), as a UsageEvent's quantities[k] has them.
QUANTITY_FIELDS = ("", "meter", "quantity", "quantity_decimal")
BATCH_FIELDS = ("batch", "client_id", "sequence", "events")

# ---- messages --------------------------------------------------------------
# Those with a %-placeholder take the value named in their comment.

# The wire decoder.
MSG_TRUNCATED = "malformed protobuf: truncated"
MSG_WIRE_TYPE = "malformed protobuf: wrong wire type"
MSG_VARINT = "malformed protobuf: bad varint"
MSG_FIELD0 = "malformed protobuf: field number 0"
MSG_EMPTY = "must not be empty"
MSG_TOO_LONG = "too long"
MSG_CHARSET = "must be printable ASCII without spaces"
MSG_NEGATIVE = "must not be negative"
MSG_DECIMAL = "must be a decimal like 12 or 1.25 with no more decimals than the meter's precision"
MSG_OVERFLOW = "cost or quantity overflows 64 bits"
MSG_TOO_MANY = "too many entries"
MSG_UTF8 = "must be valid UTF-8"
MSG_TENANT = "is not one of this token's customers"  # raised as Forbidden
MSG_ID_TOO_LONG = "longer than %d bytes"  # customer_id_bytes_max
MSG_BATCH_TOO_LONG = "more than %d events in one batch (each quantity of an event counts as one)"  # batch_events_max
MSG_PARTS = "more than %d quantities in one event" % QUANTITIES_MAX
MSG_BOTH_QUANTITIES = "give meter and quantity, or quantities, not both"
MSG_PART_GAUGE = ("a max, latest or unique_count meter is charged at period end: report it in an event of its "
                  "own, not among quantities")
MSG_CLIENT_ID = "must be at most %d printable ASCII characters"  # client_id_bytes_max
MSG_EVENT_TWICE = "appears more than once in the request"
MSG_REQUIRED = "is required"

# Accounts, money and rating.
MSG_CUSTOMER_ID = "must be 1 to %d printable ASCII characters"  # customer_id_bytes_max
MSG_CLOSED = "core is closed"
MSG_NO_ACCOUNT = "no account %d"
MSG_NO_CREDIT_TYPE = "no credit type %d"
MSG_NO_METER = "no meter %d"
MSG_NO_RATE = "no rate %d"
MSG_NO_PLAN = "no plan %d"
MSG_BALANCE_OVERFLOW = "balance would overflow"
MSG_COST_OVERFLOW = "cost overflows 64 bits"
MSG_RESERVED_OVERFLOW = "reserved total would overflow"
MSG_RELEASE_TOO_MUCH = "release of more than is reserved"
MSG_SETTLE_TOO_MUCH = "settle of more than is reserved"
MSG_SETTLE_GAUGE = "a max, latest or unique_count meter is charged at period end"
MSG_SETTLE_OVERFLOW = "balance or usage would overflow"
MSG_MINIMUM = "must be 0 to 2^62"
MSG_FORCE_CHARGE = "no such rate, or a negative quantity"
MSG_DISCOUNT = "a discount is 0 to %d (all of the price)" % DISCOUNT_SCALE
MSG_NOT_DISCOUNTABLE = ("credit type %d cannot be discounted exactly: its denominator and its prices' factors "
                        "are not multiples of DISCOUNT_SCALE (catalog.py makes them so)")
MSG_NOT_UNIQUE = "meter %d does not count distinct values"
MSG_WINDOW = "the usage window must be at least 1 ms"
MSG_LATE_LATEST = ("a latest meter's value is its last report: an event of an earlier usage window is refused "
                   "(report the value of now, without timestamp_ms)")
MSG_LATE_GAUGE = ("a max or unique_count meter counts in the period it is served in: an event dated before the "
                  "previous usage window is refused (report it without timestamp_ms)")
MSG_EVENT_TIMES = "how far an event's time may be from the clock is not negative"

# Snapshots.
MSG_STATE_SHAPE = "state shape does not match the catalog"
MSG_STATE_RANGE = "account state out of range"
MSG_STATE_PLAN = "account state names a plan that does not exist"
MSG_STATE_UNIQUE = "account state counts distinct values of a meter that does not"
MSG_STATE_SIZE = "state record has the wrong size for this catalog"

# Building a core (ValueError: the engine's catalog compiler never makes these).
MSG_ID_LIMIT = "customer_id_bytes_max is at most %d" % CUSTOMER_ID_BYTES_LIMIT
MSG_SETS_LIMIT = "dimension_sets_per_window_max is at least 1"
MSG_DIMS_LIMITS = "dimension limits out of range"
MSG_CREDIT_NAMES = "one name of at most %d bytes per credit type" % NAME_BYTES_MAX
MSG_MODE_NAMES = "mode names are at most %d bytes" % MODE_BYTES_MAX
MSG_PLANS = "too many plans"
MSG_FREE_PLANS = "free units for more plans than there are"
MSG_FREE_METERS = "plan %d: free units for every meter"  # plan
MSG_FREE_NEGATIVE = "free units must not be negative"
MSG_PLAN_ENTRIES = "plan %d: one entry per credit type"  # plan
MSG_PLAN_RANGE = "plan %d: mode or step out of range"  # plan
MSG_DENOMINATOR = "denominator out of range"
MSG_METER_RANGE = "meter %d: credit type, precision, aggregation, increment or minimum out of range"  # meter
MSG_METER_UNIQUE = "meter %d: a unique_count meter, and only one, names its dimension"  # meter
MSG_RATE_RANGE = "rate %d out of range"  # rate
MSG_METER_DIMS = "meter %d: at most %d distinct price dimensions"  # meter, PRICE_DIMENSIONS_MAX
MSG_RATE_KEY = "rate %d: one value (or None, any value) per price dimension of its meter"  # rate
MSG_RATES_GROUPED = "rates must be grouped by meter"
MSG_CONDITIONS = ("at most %d conditions, each a dimension key, a summed meter and 2 to %d values with a bound "
                  "for each but the last, growing" % (CONDITIONS_MAX, CONDITION_VALUES_MAX))


MSG_POOLS = ("pools: one entry per meter, -1 or a credit type that no meter is charged in and no other "
             "meter's free units are held in, for a sum or count meter without tiers")


def check_pools(pools: list[int], meter_cts: list[int], aggs: list[int], tiered: list[bool],
                rate_meters: list[int], n_ct: int) -> list[int]:
    """Per meter, the credit type holding its free units as a balance (-1: none), checked;
    the same check in both cores (set_pools)."""
    pools = [int(p) for p in pools]
    used = [p for p in pools if p >= 0]
    if len(pools) != len(meter_cts) or len(set(used)) != len(used) or set(used) & set(meter_cts):
        raise ValueError(MSG_POOLS)
    for m, p in enumerate(pools):
        if p < -1 or p >= n_ct or (p >= 0 and (aggs[m] > AGG_COUNT or any(
                t for t, rm in zip(tiered, rate_meters, strict=True) if rm == m))):
            raise ValueError(MSG_POOLS)
    return pools


def _quote(b: bytes) -> str:
    return b[:QUOTE_BYTES_MAX].decode("utf-8", "replace")


def unknown_meter_message(meter: bytes) -> str:
    return "unknown meter %r" % _quote(meter)


def no_price_message(meter: bytes, key: bytes, value: bytes | None) -> str:
    """Why an event has no price: its meter, the price dimension and the value it
    had, or that it had none."""
    name, dim = meter.decode("utf-8", "replace"), key.decode("utf-8", "replace")
    if not dim:
        return "meter %r has no price" % name
    if value is None:
        return "meter %r needs the %r dimension: it has no default price" % (name, dim)
    return "meter %r has no price for %s=%r and no default" % (name, dim, _quote(value))


def no_price_position(keys: list[tuple[bytes | None, ...]], values: tuple[bytes | None, ...]) -> int:
    """Which price dimension an event without a price is refused for: the first
    whose value (or absence) no rate matches, together with the dimensions
    before it. A rate's None matches any value and none. The compiled core has
    the same rule in C (``_no_price_pos`` in _fastpath_accounts.pxi)."""
    for i in range(len(values)):
        if not any(all(k[j] is None or k[j] == values[j] for j in range(i + 1)) for k in keys):
            return i
    return max(len(values) - 1, 0)


def rate_mask(key: tuple[bytes | None, ...]) -> int:
    """Which price dimensions a rate names a value of: bit n-1-i for dimension i, so
    that the most specific rate, the first dimension weighing most, has the largest
    mask (a price table tries its masks from the largest down)."""
    n = len(key)
    return sum(1 << (n - 1 - i) for i, v in enumerate(key) if v is not None)


def event_time_message(timestamp_ms: int, now_ms: int, late_ms: int) -> str:
    """Why an event's timestamp_ms is refused: too far before the sidecar's clock
    (more than ``late_ms``), or else too far after it."""
    if timestamp_ms < now_ms and now_ms - timestamp_ms > late_ms:
        return ("is %d ms before the sidecar's clock (%d): events older than event_late_max_s (%d s) are refused"
                % (now_ms - timestamp_ms, now_ms, late_ms // 1000))
    return ("is %d ms after the sidecar's clock (%d): events further ahead than event_early_max_s are refused"
            % (timestamp_ms - now_ms, now_ms))


def no_unique_message(key: bytes) -> str:
    """A unique_count meter's event without the dimension whose values it counts."""
    return "a unique_count meter needs the %r dimension" % key.decode()


def condition_message(key: bytes, meter: bytes) -> str:
    """A request that gives a dimension the cores set themselves."""
    return ("%r is set by meterd from the request's %s: do not send it" % (key.decode("utf-8", "replace"),
                                                                         meter.decode("utf-8", "replace")))


def condition_value(bounds: tuple[int, ...] | list[int], quantity: int) -> int:
    """The index of a condition's value for a request's quantity: the first whose bound (up to,
    inclusive) it does not pass, else the last."""
    for i, bound in enumerate(bounds):
        if quantity <= bound:
            return i
    return len(bounds)


def part_twice_message(meter: bytes) -> str:
    return "meter %r appears more than once among the event's quantities" % _quote(meter)


def part_credit_message(meter: bytes, credit_type: bytes, first: bytes) -> str:
    """A quantity whose meter prices in another credit type than the event's first."""
    return ("meter %r prices in credit type %r, the first quantity's meter in %r: the quantities of one event "
            "are in one credit type" % (_quote(meter), credit_type.decode(), first.decode()))


def precision_message(meter: bytes, precision: int) -> str:
    name = meter.decode("utf-8", "replace")
    if precision == 0:
        return "meter %r counts whole units (precision 0): no decimals" % name
    return "meter %r has precision %d: at most %d decimals" % (name, precision, precision)


def sets_message(customer: bytes, limit: int) -> str:
    return ("customer %r has %d distinct dimension sets in this usage window, as many as "
            "dimension_sets_per_window_max allows (a set counts once per meter); keep one-off values "
            "such as request ids out of dimensions" % (customer.decode(), limit))


# ---- formulas --------------------------------------------------------------

PRIORITY_MAX = 100


def format_nano(v: int) -> str:
    """Nano-units as an exact decimal: 2500000000 -> 2.5."""
    whole, frac = divmod(abs(v), 10**9)
    text = f"{whole}.{frac:09d}".rstrip("0").rstrip(".")
    return ("-" if v < 0 else "") + text


def relax_priority(degraded_nano: int, step_nano: int) -> int:
    """The queue-priority hint of a degraded decision (Midjourney's relax mode):
    100, falling by one per ``step_nano`` of usage degraded this period, down to
    0; always 100 when the plan sets no step (0). ``degraded_nano`` is never
    negative. The compiled core has the same formula in C (``relax_priority`` in
    _fastpath_accounts.pxi), which tests/test_core_contract.py holds to this one."""
    if step_nano <= 0:
        return PRIORITY_MAX
    return max(PRIORITY_MAX - degraded_nano // step_nano, 0)


def unique_order(entry: tuple[int, bytes | int]) -> tuple[int, int, int, bytes]:
    """Distinct values in snapshot order: by meter, hashes (from older snapshots) first."""
    meter, value = entry
    return (meter, 0, value, b"") if isinstance(value, int) else (meter, 1, 0, value)


# ---- shapes ------------------------------------------------------------------

# A meter as the cores take it: name, credit type, precision, price dimensions, aggregation,
# unique dimension, per price dimension the value an event without it is priced as (or None),
# the increment its quantities are rounded up to (smallest units; 1: none), the least an
# event that is not free costs (nano; 0: none), and how its tiers price (TIER_GRADUATED, TIER_VOLUME).
MeterRow = tuple[bytes, int, int, tuple[bytes, ...], int, bytes, tuple[bytes | None, ...], int, int, int]
# A rate: its meter, a value per price dimension (None: any), amount_nano and factor (of its
# dearest tier, when it has tiers), and its tiers: (up to, in smallest units (INT64_MAX: the
# rest), amount_nano, factor), none for a rate with one price.
RateRow = tuple[int, tuple[bytes | None, ...], int, int, tuple[tuple[int, int, int], ...]]
# A condition: the dimension it sets, the meter whose quantity in a request decides, the bound
# (up to, inclusive, in the meter's smallest units) of each value but the last, and the values.
ConditionRow = tuple[bytes, int, tuple[int, ...], tuple[bytes, ...]]
TIER_GRADUATED = 0  # each unit at the tier its place in the period's usage falls in
TIER_VOLUME = 1     # every unit of the period's value at the tier the value falls in

# Per credit type: (balance, reserved, floor, remainder, degraded, alert threshold or INT64_MIN).
CreditState = tuple[int, int, int, int, int, int]
# (customer_id, meter, dimension set: UsageEvent field 5 entries sorted by key, window_start_ms,
#  quantity, cost_nano, events, balance_nano)
UsageAggregate = tuple[bytes, int, bytes, int, int, int, int, int]
