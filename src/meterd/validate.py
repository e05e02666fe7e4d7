"""Checks of untrusted input that the components share: customer ids, meters
and their prices, quantities, dimensions and tenants. Each failure names the
field and what is wrong with it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from meterd import _fastpath_py
from meterd.config import Settings
from meterd.corespec import (
    DISCOUNT_SCALE,
    MSG_PARTS,
    QUANTITIES_MAX,
    condition_message,
    condition_value,
    no_price_message,
    no_price_position,
    part_credit_message,
    part_twice_message,
)
from meterd.errors import Forbidden, InvalidInput
from meterd.results import Quantity
from meterd.security import Tenant
from meterd.state import Live

if TYPE_CHECKING:
    from meterd.catalog import Catalog
    from meterd.core import CoreAPI

log = logging.getLogger("meterd.engine")

INT64_MAX = (1 << 63) - 1
NAME_ECHO_CHARS = 64  # at most this much of an unknown name is repeated in an error


def label_of(tenant: Tenant | None) -> str:
    """Whose quota a data-plane call uses: its tenant's, or the one tenant of a daemon without tokens."""
    return "" if tenant is None else tenant.name


def check_tenant(tenant: Tenant | None, customer_id: str, field: str) -> None:
    """A data-plane token may meter only the customers whose ids start with its prefix."""
    if tenant is not None and not customer_id.encode().startswith(tenant.prefix):
        raise Forbidden(field, "is not one of this token's customers")


def customer(settings: Settings, customer_id: str) -> bytes:
    b = customer_id.encode()
    if not b:
        raise InvalidInput("customer_id", "must not be empty")
    if len(b) > settings.customer_id_bytes_max:
        raise InvalidInput("customer_id", f"longer than {settings.customer_id_bytes_max} bytes")
    if not all(0x21 <= c <= 0x7E for c in b):
        raise InvalidInput("customer_id", "must be printable ASCII without spaces")
    return b


def rate(settings: Settings, live: Live, meter_name: str, dimensions: Mapping[str, str]) -> tuple[int, str | None, int]:
    """The meter, its price dimension's value (when it has one: older versions read it
    back) and the rate of a held amount."""
    catalog = live.catalog
    meter = meter_of(live, meter_name)
    conditions = {c.name for c in catalog.conditions}
    if sum(k not in conditions for k in dimensions) > settings.dimensions_max:  # a condition's are meterd's
        raise InvalidInput("dimensions", "too many entries")
    for k, v in dimensions.items():
        if k in conditions:
            continue  # meterd's own, as the cores set it: the catalog bounds it, not the request's limits
        if not k or len(k.encode()) > settings.dimension_key_bytes_max \
                or len(v.encode()) > settings.dimension_value_bytes_max:
            raise InvalidInput("dimensions", "too long" if k else "must not be empty")
    if catalog.meters[meter].aggregation > 1:
        raise InvalidInput("meter", "a max, latest or unique_count meter is charged at period end; report it")
    given = {k.encode(): v.encode() for k, v in dimensions.items()}
    found = live.core.find_rate(meter, given)
    keys = catalog.meters[meter].price_dimensions
    if found < 0:
        values = tuple(given.get(k.encode(), None if d is None else d.encode())
                       for k, d in zip(keys, catalog.meters[meter].defaults, strict=True))
        at = no_price_position([tuple(None if v is None else v.encode() for v in key)
                                for key in catalog.meters[meter].prices], values)
        raise InvalidInput("dimensions", no_price_message(
            meter_name.encode(), keys[at].encode() if keys else b"", values[at] if keys else None))
    return meter, dimensions.get(keys[0]) if len(keys) == 1 else None, found


def meter_of(live: Live, meter_name: str) -> int:
    meter = live.catalog.meter_index.get(meter_name)
    if meter is None:
        raise InvalidInput("meter", f"unknown meter {meter_name[:NAME_ECHO_CHARS]!r}")
    return meter


def derived(live: Live, dimensions: Mapping[str, str], units_of: Sequence[tuple[int, int]]) -> dict[str, str]:
    """A request's dimensions with those the catalog's conditions set from its quantities
    ((meter, quantity in its smallest units) each), as the cores set them; a condition whose
    meter the request has not is left unset. The request may not give one."""
    out = dict(dimensions)
    for c in live.catalog.conditions:
        if c.name in out:
            raise InvalidInput("dimensions", condition_message(c.name.encode(),
                                                               live.catalog.meters[c.meter].name.encode()))
        for meter, units in units_of:
            if meter == c.meter:
                out[c.name] = c.values[condition_value(c.bounds, units)]
                break
    return out


def request_quantity(msg: Any) -> Quantity:
    """The quantity of a request or of one of its quantities (its ``quantity_value`` oneof)."""
    if msg.WhichOneof("quantity_value") == "quantity_decimal":
        return Quantity(decimal=msg.quantity_decimal)
    return Quantity(whole=msg.quantity)


@dataclass(frozen=True)
class Held:
    """What a request of one or several meters holds: per meter (meter, price dimension value,
    rate, quantity in its smallest unit), its dimensions (its conditions' among them), and its
    credit type and the most it costs (each meter's quote, added)."""
    parts: list[tuple[int, str | None, int, int]]
    dims: dict[str, str]
    ct: int
    amount: int


def held_parts(settings: Settings, live: Live, parts: Sequence[tuple[str, Quantity]], dimensions: Mapping[str, str],
               listed: bool) -> Held:
    """The meters of an Authorize (or of an event a lease must cover): of ``quantities``
    when ``listed`` (then each once, at most QUANTITIES_MAX, in one credit type), else its
    one meter and quantity."""
    if listed and not parts:
        raise InvalidInput("quantities", "give meter and quantity, or quantities")
    if len(parts) > QUANTITIES_MAX:
        raise InvalidInput("quantities", MSG_PARTS)
    catalog = live.catalog
    units_of = []
    for k, (name, q) in enumerate(parts):
        try:
            meter = meter_of(live, name)
            units_of.append((meter, quantity(live, meter, q)))
        except InvalidInput as e:
            raise e.within(f"quantities[{k}]." if listed else "") from None
    dims = derived(live, dimensions, units_of)
    out: list[tuple[int, str | None, int, int]] = []
    for k, ((name, _), (_, units)) in enumerate(zip(parts, units_of, strict=True)):
        prefix = f"quantities[{k}]." if listed else ""
        try:
            meter, value, found = rate(settings, live, name, dims)
        except InvalidInput as e:
            raise e.within(prefix) if e.field != "dimensions" else e from None
        ct = catalog.meters[meter].credit_type
        if out and ct != catalog.meters[out[0][0]].credit_type:
            raise InvalidInput(prefix + "meter", part_credit_message(
                name.encode(), catalog.credit_types[ct].name.encode(),
                catalog.credit_types[catalog.meters[out[0][0]].credit_type].name.encode()))
        if any(m == meter for m, _, _, _ in out):
            raise InvalidInput(prefix + "meter", part_twice_message(name.encode()))
        out.append((meter, value, found, units))
    amount = 0
    for k, (meter, _, found, units) in enumerate(out):
        try:
            amount += event_quote(live, meter, found, units)[1]
        except InvalidInput as e:
            raise e.within(f"quantities[{k}]." if listed else "") from None
    if amount > INT64_MAX:
        raise InvalidInput("quantities" if listed else "quantity", "cost or quantity overflows 64 bits")
    return Held(out, dims, catalog.meters[out[0][0]].credit_type, amount)


def canonical_request(msg: Any) -> bytes:
    """A request in a canonical form, for idempotency digests: map entries sorted, and the
    quantities of several meters too, so a retry whose client serialised them in another
    order matches."""
    holder = msg.event if hasattr(msg, "event") else msg  # a ReportRequest's, or the request's own
    if len(getattr(holder, "quantities", ())) > 1:
        copy = type(msg)()
        copy.CopyFrom(msg)
        held = (copy.event if hasattr(msg, "event") else copy).quantities
        ordered = sorted(held, key=lambda q: q.SerializeToString(deterministic=True))
        del held[:]
        held.extend(ordered)
        msg = copy
    return msg.SerializeToString(deterministic=True)  # type: ignore[no-any-return]


def held_rate(live: Live, meter: int, ct: int, dims: bytes | None, value: str | None) -> int:
    """The rate of a reservation or session holding money in credit type ``ct`` (-1: none)."""
    return rate_of_hold(live.catalog, live.core, meter, ct, dims, value)


def rate_of_hold(catalog: Catalog, core: CoreAPI, meter: int, ct: int, dims: bytes | None,
                 value: str | None) -> int:
    """The rate of a hold in a catalog and its core: none (-1) when the meter now prices in
    another credit type than the hold's money, or is charged at period end. A hold written by
    an older version without a dimension set kept only its price dimension's value."""
    spec = catalog.meters[meter]
    if spec.credit_type != ct or spec.aggregation > 1:
        return -1
    keys = spec.price_dimensions
    if dims is None and value is not None and len(keys) == 1:
        return core.find_rate(meter, {keys[0].encode(): value.encode()})
    return core.find_rate(meter, {} if dims is None else _fastpath_py.set_items(dims))


def quantity(live: Live, meter: int, q: Quantity, field_prefix: str = "") -> int:
    """A request's quantity in the meter's smallest unit, exactly."""
    spec = live.catalog.meters[meter]
    if q.decimal is not None:
        try:
            return _fastpath_py.parse_decimal(q.decimal.encode(), spec.precision, spec.name.encode())
        except _fastpath_py._DecodeError as e:
            raise InvalidInput(field_prefix + "quantity_decimal", e.message) from None
    if q.whole < 0:
        raise InvalidInput(field_prefix + "quantity", "must not be negative")
    units = q.whole * 10**spec.precision
    if units > INT64_MAX:
        raise InvalidInput(field_prefix + "quantity", "cost or quantity overflows 64 bits")
    return units


def event_quote(live: Live, meter: int, rate: int, units: int) -> tuple[int, int]:
    """(credit type, the most one event of ``units`` costs): rounded up to the meter's
    increment, at least its minimum (what Authorize holds, and a lease must cover)."""
    billed_units, minimum = billed(live, meter, units)
    ct, amount = live.core.quote(rate, billed_units)
    return ct, max(amount, minimum)


def discounted(core: Any, idx: int, ct: int, amount: int) -> int:
    """What a hold of ``amount`` (quoted at list prices) needs from an account with a
    negotiated discount in the credit type: its share of it, rounded up."""
    discount = core.discount(idx, ct) if idx >= 0 else 0
    return -(-amount * (DISCOUNT_SCALE - discount) // DISCOUNT_SCALE) if discount else amount


def billed(live: Live, meter: int, units: int, field: str = "quantity") -> tuple[int, int]:
    """One event's quantity as it is billed (rounded up to the meter's increment) and the
    least it costs (the meter's minimum, when anything happened)."""
    spec = live.catalog.meters[meter]
    rounded = spec.billed(units)
    if rounded > INT64_MAX:
        raise InvalidInput(field, "cost or quantity overflows 64 bits")
    return rounded, spec.minimum_nano if rounded > 0 else 0


def dimension_set(dimensions: Mapping[str, str]) -> bytes | None:
    """A reservation's or session's dimension set, as the cores keep it; None when it has
    none. (Its price dimension alone is not left to the rate: a meter's default price
    has an empty set, whatever value the request gave.)"""
    if not dimensions:
        return None
    return _fastpath_py.canonical_set({k.encode(): v.encode() for k, v in dimensions.items()})


def settle_set(core: CoreAPI, idx: int, meter: int, dims: bytes | None, cust: bytes) -> bytes | None:
    """The set a settlement is filed under: its own, or its price dimension alone when its
    own does not fit dimension_sets_per_window_max (a settlement is never refused: the
    work was done)."""
    if dims is not None and not core.set_allowed(idx, meter, dims):
        log.warning("usage of customer %s filed under its price dimension alone: its dimension set does not "
                    "fit dimension_sets_per_window_max", cust.decode())
        return None
    return dims
