"""Sum an ncu CSV (``--csv --page raw --metrics gpu__time_duration.sum``) of a few decode steps
per kernel name: how many launches and how many microseconds each step spends in each kernel,
and per layer. Used by ``gpu_eval.sh ncuidle`` to break a split layer down kernel by kernel.

    python scripts/ncu_layers.py ncu.csv STEPS LAYERS
"""
from __future__ import annotations

import csv
import re
import sys
from collections import defaultdict

METRIC = "gpu__time_duration.sum"
UNIT_SCALE_US = {"ns": 1e-3, "nsecond": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}


def short_name(kernel: str) -> str:
    """A kernel's name without its template arguments, parameter list and namespaces."""
    depth, out = 0, []
    for ch in kernel.strip():  # keep what lies outside every <...> and (...)
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(ch)
    words = "".join(out).split()
    return words[-1].split("::")[-1] if words else kernel[:60]


def read_rows(path: str) -> list[dict]:
    with open(path, newline="", errors="replace") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu prefixes its own messages with ==PROF==
    rows = list(csv.DictReader(lines))
    if rows and METRIC in rows[0] and not re.match(r"^[\d.,]+$", rows[0][METRIC] or ""):
        units = rows.pop(0)  # the second CSV row holds the units
        scale = UNIT_SCALE_US.get((units.get(METRIC) or "ns").strip(), 1e-3)
    else:
        scale = 1e-3
    for r in rows:
        r["_us"] = float((r.get(METRIC) or "0").replace(",", "")) * scale
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    path, steps, layers = argv[1], int(argv[2]), int(argv[3])
    rows = read_rows(path)
    if not rows:
        print(f"{path}: no kernels profiled")
        return 1
    count: dict[str, int] = defaultdict(int)
    total: dict[str, float] = defaultdict(float)
    for r in rows:
        name = short_name(r.get("Kernel Name", "?"))
        count[name] += 1
        total[name] += r["_us"]
    all_us = sum(total.values())
    print(f"{len(rows)} kernels in {steps} steps: {len(rows) / steps:.0f} per step, "
          f"{all_us / steps:.1f} us of kernel time per step, {all_us / steps / layers:.2f} us per layer")
    print(f"{'kernel':48s} {'per step':>9s} {'per layer':>9s} {'us/step':>9s} {'us each':>8s}")
    for name in sorted(total, key=total.get, reverse=True):
        print(f"{name[:48]:48s} {count[name] / steps:9.1f} {count[name] / steps / layers:9.2f} "
              f"{total[name] / steps:9.1f} {total[name] / count[name]:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
