#!/usr/bin/env bash
# Fill the git-ignored .upstream/ folder that `scripts/gpu_eval.sh upstream` needs on the GPU
# machine (no internet there): upstream llama.cpp b11549, whose GPU expert cache
# (`--moe-cache-mib`) is the anchor of issue 16, taken from the xllamacpp sdist on PyPI, which
# vendors it under thirdparty/llama.cpp. Only that tree is kept, without the parts a build of
# llama-batched-bench never reads (the sdist is 37.7 MB packed, 179 MB unpacked; the device
# tool carries 64 MiB per call and .device/ travels in a call of its own). Run here, where
# PyPI works.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
VERSION=2026.10.11549  # llama.cpp b11549
OUT=.upstream/llama.cpp-b11549-trimmed.tar.gz
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# --no-binary for this package only: ":all:" would also build its build requirements
# (Cython among them) from source just to read the sdist's metadata
"$PY" -m pip download -q --no-deps --no-binary xllamacpp "xllamacpp==$VERSION" -d "$TMP"
mkdir -p .upstream
"$PY" - "$TMP/xllamacpp-$VERSION.tar.gz" "$OUT" <<'EOF'
import os, sys, tarfile, tempfile

src, out = sys.argv[1], sys.argv[2]
inner = f"{os.path.basename(src)[:-len('.tar.gz')]}/thirdparty/llama.cpp/"
# top-level parts that a build with tests, examples, server and app off never reads
# (tools/ stays: its CMakeLists adds every tool, but ui, server and cli only with the server)
drop = ("docs/", "models/", "media/", "examples/", "tests/", "benches/", "pocs/", "gguf-py/",
        "conversion/", "requirements/", "skills/", "ci/", "app/",
        "tools/ui/", "tools/server/", "tools/cli/")
tmp = tempfile.NamedTemporaryFile(dir=os.path.dirname(out), suffix=".part", delete=False)
with tarfile.open(src) as tin, tarfile.open(fileobj=tmp, mode="w:gz") as tout:
    for m in tin:
        if not m.name.startswith(inner):
            continue
        rel = m.name[len(inner):]
        if (rel + "/").startswith(drop) or rel.endswith(".py") and "/" not in rel:
            continue
        m.name = "llama.cpp-b11549/" + rel
        m.pax_headers.pop("path", None)  # a long name's header would keep the old path
        tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
tmp.close()
os.chmod(tmp.name, 0o644)
os.replace(tmp.name, out)
EOF
du -sh .upstream
