"""The ack round trip histogram's text form, as ``status`` carries it (SPEC §4.5).

``status.ack_histogram`` is one string of per-bucket counts by upper bound,
``"25us:3 50us:10 2.5ms:1"``: hmmd writes it (``hmmirror.daemon.histogram``) and
hmmctl reads it (``hmmirror.tools.ackhistogram``). The bounds and their names live
here, in the one package both sides have, so that a client-only install can read
what hmmd writes without a copy of either.
"""

from __future__ import annotations

import math
import re

#: Upper bounds (``le``) in seconds: 25 µs (an agent on the same host acking at once)
#: to 10 s (past any ack deadline), about three per decade; ``+Inf`` follows them.
BOUNDS_S = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

#: Each unit as an exponent: ``float("25e-6")`` is the literal ``25e-6`` of the bounds,
#: where ``25 * 1e-6`` is not.
_UNITS = {"us": "e-6", "ms": "e-3", "s": ""}
_BOUND = re.compile(r"^(?P<num>[0-9.]+)(?P<unit>us|ms|s)$")


def bound_label(bound_s: float) -> str:
    """A bucket's upper bound as ``status`` names it: ``25us``, ``2.5ms``, ``1s``, ``+Inf``."""
    if math.isinf(bound_s):
        return "+Inf"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if bound_s >= scale or unit == "us":
            return f"{round(bound_s / scale, 6):g}{unit}"
    raise AssertionError("unreachable")


def bound_seconds(label: str) -> float:
    """A bucket's label (``25us``, ``2.5ms``, ``1s``, ``+Inf``) in seconds; ValueError if
    it is not one."""
    if label == "+Inf":
        return math.inf
    found = _BOUND.match(label)
    if found is None:
        raise ValueError(f"not a bucket bound: {label!r}")
    return float(found["num"] + _UNITS[found["unit"]])
