#!/usr/bin/env python3
"""Write a random-weight MoE GGUF that llama.cpp loads (see hybrid_gguf/synth.py).

Examples:
  python scripts/make_synthetic_moe.py tiny.gguf
  python scripts/make_synthetic_moe.py big.gguf --preset qwen3-30b-a3b-like --type Q4_K --zipf 1.2
  python scripts/make_synthetic_moe.py layout.gguf --preset qwen3-30b-a3b-like --zero-data
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_gguf.errors import HybridError  # noqa: E402
from hybrid_gguf.synth import PRESETS, SynthSpec, preset, write_synthetic_moe  # noqa: E402

# Spec fields settable from the command line, with their option names.
_FIELDS = [f for f in dataclasses.fields(SynthSpec) if f.name not in ("weight_type",)]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", type=Path, help="GGUF file to write")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="starting shape (default tiny)")
    ap.add_argument("--type", dest="weight_type", choices=["F32", "F16", "Q8_0", "Q4_K"],
                    help="weight type; Q4_K goes through llama.cpp's quantizer (Q4_K_M)")
    ap.add_argument("--zero-data", action="store_true",
                    help="exact header and layout, zero (sparse) tensor data: fast, for inspect tests")
    for f in _FIELDS:
        ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                        type=str if f.name == "arch" else type(f.default))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in _FIELDS if getattr(args, f.name) is not None}
    if args.weight_type:
        overrides["weight_type"] = args.weight_type
    try:
        spec = preset(args.preset, **overrides)
        start = time.perf_counter()
        path = write_synthetic_moe(args.output, spec, zero_data=args.zero_data)
    except HybridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    size = path.stat().st_size
    print(f"wrote {path} ({size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s): "
          f"{spec.arch}, {spec.n_layer} layers, {spec.n_expert} experts top-{spec.n_expert_used}, "
          f"{spec.weight_type}, zipf {spec.zipf}, seed {spec.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
