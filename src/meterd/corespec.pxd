# The values of meterd/corespec.py that the compiled core needs in C, for
# ``from meterd.corespec cimport ...``. They are repeated here because C needs
# them at compile time; _fastpath.pyx refuses to import when one differs from
# corespec.py, and tests/test_core_contract.py checks them all.

cdef enum:
    REASON_NONE = 0
    REASON_INSUFFICIENT_BALANCE = 1
    REASON_UNKNOWN_CUSTOMER = 2
    REASON_OVERFLOW = 3
    OUT_DEGRADED = 100

cdef enum:
    DECISION_ALLOW = 1
    DECISION_DENY = 2
    DECISION_DEGRADE = 3

cdef enum:
    AGG_SUM = 0
    AGG_COUNT = 1
    AGG_MAX = 2
    AGG_LATEST = 3
    AGG_UNIQUE = 4

cdef enum:
    NAME_BYTES_MAX = 64
    MODE_BYTES_MAX = 32
    CUSTOMER_ID_BYTES_LIMIT = 255
    PLANS_MAX = 65535
    ALERTS_MAX = 4096
    QUOTE_BYTES_MAX = 64
    PRIORITY_MAX = 100
    PRICE_DIMENSIONS_MAX = 4
    QUANTITIES_MAX = 8
    CONDITIONS_MAX = 4
    CONDITION_VALUES_MAX = 16
    DISCOUNT_SCALE = 10000

cdef enum:
    TIER_GRADUATED = 0
    TIER_VOLUME = 1
