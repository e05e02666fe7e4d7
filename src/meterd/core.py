"""Chooses the compiled core or its pure-Python twin, once, at import.

``METERD_NO_EXTENSIONS=1`` selects the twin; so does a missing extension,
with a warning, so that a source checkout still runs.
"""

from __future__ import annotations

import logging
import os

from meterd import _fastpath_py

REASON_NONE = _fastpath_py.REASON_NONE
REASON_INSUFFICIENT_BALANCE = _fastpath_py.REASON_INSUFFICIENT_BALANCE
REASON_UNKNOWN_CUSTOMER = _fastpath_py.REASON_UNKNOWN_CUSTOMER
REASON_OVERFLOW = _fastpath_py.REASON_OVERFLOW

if os.environ.get("METERD_NO_EXTENSIONS", "") not in ("", "0"):
    Core = _fastpath_py.Core
    COMPILED = False
else:
    try:
        from meterd._fastpath import Core  # type: ignore[no-redef,assignment]

        COMPILED = True
    except ImportError:  # pragma: no cover - depends on the build
        logging.getLogger("meterd").warning("compiled core missing; using the pure-Python twin")
        Core = _fastpath_py.Core  # type: ignore[misc]
        COMPILED = False

__all__ = ["Core", "COMPILED"]
