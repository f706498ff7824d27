"""Byte and time quantities as people write them: fmt_bytes, fmt_time and parse_bytes ("16GiB")."""

from __future__ import annotations

__all__ = ["fmt_bytes", "fmt_time", "parse_bytes"]

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def fmt_bytes(n: float) -> str:
    """Bytes in the largest binary unit that fits: 1536 -> '1.50 KiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_time(s: float) -> str:
    """Seconds in s, ms or us: 0.0042 -> '4.200 ms'."""
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def parse_bytes(text: str) -> int:
    """'16GiB' -> 17179869184; '1e9' -> 1000000000. Raises ValueError on bad text."""
    t = text.strip().lower().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            value = float(t[: -len(unit)])
            break
    else:
        unit, value = "b", float(t)
    if not value == value or value <= 0 or value == float("inf"):  # NaN, <= 0 and inf are not sizes
        raise ValueError(f"{text!r} is not a positive size")
    return int(value * _UNITS[unit])
