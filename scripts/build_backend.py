#!/usr/bin/env python3
"""Build and install the hybrid-patched llama-cpp-python: a thin wrapper of
`python -m hybrid_gguf.backend` (the logic and the patch ship inside the package, so an
installed hybrid-gguf does the same with `hybrid-gguf backend install`).

  python scripts/build_backend.py                     # CPU, or CUDA when a GPU is visible
  python scripts/build_backend.py --cuda --cuda-arch 90
  python scripts/build_backend.py --stock             # unpatched, for A/B runs
  python scripts/build_backend.py --trim-sdist OUT    # small source tarball for the GPU machine
  python scripts/build_backend.py --dev-tree DIR      # incremental build for patch work (no wheel)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybrid_gguf.backend import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
