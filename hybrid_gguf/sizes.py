"""Human size strings: "8GiB", "8G", "512MiB", "1.5GB", "123" <-> bytes.

Convention: the IEC forms (KiB, MiB, GiB, TiB) and the bare single letters
(K, M, G, T, as in `ls -h` and llama.cpp's own logs) are binary; the SI forms
(kB, MB, GB, TB) are decimal.
"""

from __future__ import annotations

import math
import re

from hybrid_gguf.errors import HybridError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024, "ki": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mi": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gi": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "ti": 1024**4, "tib": 1024**4, "tb": 1000**4,
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes for a size string; raises HybridError when it cannot be read."""
    if isinstance(text, bool):
        raise HybridError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise HybridError(f"size must not be negative: {text}")
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise HybridError(
            f"cannot read size {text!r}: expected a number with an optional unit, "
            "e.g. 8GiB, 8G, 512MiB, 1.5GB or 123"
        )
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise HybridError(
            f"unknown size unit {unit!r} in {text!r}: use B, KiB/MiB/GiB/TiB (or K/M/G/T), "
            "or kB/MB/GB/TB"
        )
    value = float(number) * factor
    if not math.isfinite(value):
        raise HybridError(f"size {text!r} is too large")
    return int(round(value))


def format_size(n: int | float) -> str:
    """Binary-unit rendering with two decimals above bytes, e.g. '1.50 GiB'."""
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{int(n)} B" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
