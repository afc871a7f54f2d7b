"""The one place that writes bytes and durations for people: pages, CLI output, plan reasons and error messages.

Pure standard library, so the web process, the command-line client and the planner can all import it.
"""
from __future__ import annotations

import math

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _number(value) -> float | None:
    """The value as a finite float, or None for missing or non-numeric input (a template may pass anything)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) or math.isinf(number) else number


def format_bytes(n, *, digits: int = 1, unit: str | None = None, smallest: str = "B", byte_word: str = "B",
                 missing: str = "-") -> str:
    """Binary units: '512 B', '1.5 KiB', '3.2 GiB'; whole bytes have no decimals.

    unit fixes the unit ('2.50 GiB' with digits=2); smallest starts the scale higher ('0.5 MiB' rather than
    '512.0 KiB'); byte_word names single bytes ('1000 bytes' in sentences); missing is shown for None or non-numbers.
    """
    number = _number(n)
    if number is None:
        return missing
    if unit is not None:
        return f"{number / 1024 ** BYTE_UNITS.index(unit):.{digits}f} {unit}"
    scale = BYTE_UNITS[BYTE_UNITS.index(smallest):]
    number /= 1024 ** BYTE_UNITS.index(smallest)
    for name in scale:
        if abs(number) < 1024 or name == BYTE_UNITS[-1]:
            break
        number /= 1024
    if name == "B":
        return f"{number:.0f} {byte_word}"
    return f"{number:.{digits}f} {name}"


def format_duration(seconds, *, approximate: bool = False, missing: str = "") -> str:
    """Exact, for what was measured: '3s', '4m 05s', '2h 03m', '3d 4h'.

    approximate, for estimates: '45 s', '19 min', '1.5 h'. missing is shown for None or non-numbers; a negative
    duration (clock skew) shows as 0.
    """
    number = _number(seconds)
    if number is None:
        return missing
    number = max(0.0, number)
    return _approximate(number) if approximate else _exact(number)


def _exact(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {(s % 3600) // 60:02d}m"
    return f"{s // 86400}d {(s % 86400) // 3600}h"


def _approximate(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
