"""The package's layout follows its data flow (issue 14), read statically: ast over
hybrid_gguf/**/*.py, nothing imported.

- No module does two of four duties: reads GGUF, chooses placement, loads llama.cpp, times runs.
- Imports point down the flow: routing/ uses nothing of planning/, llama/ or bench/;
  planning/ nothing of llama/ or bench/; neither imports llama_cpp; header/ uses only
  itself, errors, limits, sizes and atomic.

KNOWN holds the violations the code has today. A new violation fails, and so does a KNOWN
entry that no longer holds (delete it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "hybrid_gguf"

READS_GGUF = "reads GGUF"
CHOOSES = "chooses placement"
LOADS = "loads llama.cpp"
TIMES = "times runs"

# reads GGUF: uses gguf-py's reader (GGUFReader, gguf.gguf_reader), tests the GGUF magic bytes
# itself, or imports header.inventory's private reader internals. Calling read_inventory()
# uses the inventory; writing GGUF (GGUFWriter) is not reading it.
# chooses placement: defines or calls one of these, the planner and the older choosers.
CHOOSERS = {"make_plan", "plan_model", "choose_counts", "fit_n_cpu_moe", "hot_from_counts",
            "whole_layer_gpu_layers"}
# loads llama.cpp: imports llama_cpp and constructs a Llama (hooks.construct_llama only wraps
# Llama()) or calls llama.cpp's model load. Calling llama.loader.load_llama hands the load to
# llama/ and is not loading.
LOAD_CALLS = {"Llama", "construct_llama", "llama_model_load_from_file", "llama_load_model_from_file"}
# times runs: reads a measuring clock, or llama.cpp's own timings (llama_perf_context);
# time.time() is the wall clock, and a monotonic stamp inside a file name measures nothing.
CLOCKS = {"perf_counter", "perf_counter_ns"}          # exist only to measure
MONOTONIC = {"monotonic", "monotonic_ns"}             # measure when kept or subtracted

HEADER_MAY_USE = ("hybrid_gguf.header", "hybrid_gguf.errors", "hybrid_gguf.limits", "hybrid_gguf.sizes",
                  "hybrid_gguf.atomic")
FORBIDDEN = {
    "routing": ("hybrid_gguf.planning", "hybrid_gguf.llama", "hybrid_gguf.bench", "llama_cpp"),
    "planning": ("hybrid_gguf.llama", "hybrid_gguf.bench", "llama_cpp"),
    "header": ("llama_cpp",),
}

# violations allowed while a refactor removes them (none since #14)
KNOWN: set = set()


def _called(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def _imports(tree: ast.Module) -> set:
    """Dotted names a module imports, anywhere in it (lazy imports count):
    `from a.b import c` gives a.b.c."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "the package uses absolute imports"
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def duties(source: str) -> set:
    tree = ast.parse(source)
    found = set()
    imports_llama = any(name == "llama_cpp" or name.startswith("llama_cpp.") for name in _imports(tree))
    kept = set()  # calls assigned to a name or subtracted: t0 = monotonic(); monotonic() - t0
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            kept.add(id(node.value))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Sub):
            kept |= {id(node.left), id(node.right)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)):
            if (node.id if isinstance(node, ast.Name) else node.attr) == "GGUFReader":
                found.add(READS_GGUF)
        elif isinstance(node, ast.Constant) and node.value == b"GGUF":
            found.add(READS_GGUF)
        elif isinstance(node, ast.ImportFrom):
            if node.module == "gguf.gguf_reader" or (
                    node.module == "hybrid_gguf.header.inventory" and any(a.name.startswith("_") for a in node.names)):
                found.add(READS_GGUF)
        elif isinstance(node, ast.FunctionDef) and node.name in CHOOSERS:
            found.add(CHOOSES)
        elif isinstance(node, ast.Call):
            name = _called(node)
            if name in CHOOSERS:
                found.add(CHOOSES)
            if name in LOAD_CALLS and imports_llama:
                found.add(LOADS)
            if name in CLOCKS or name == "llama_perf_context" or (name in MONOTONIC and id(node) in kept):
                found.add(TIMES)
    return found


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(REPO).as_posix(), path.read_text()


def violations(rel: str, source: str) -> set:
    """(rel, rule) for each rule the module at `rel` (hybrid_gguf/...) breaks."""
    out = set()
    found = duties(source)
    if len(found) > 1:
        out.add((rel, "duties: " + " + ".join(sorted(found))))
    folder = rel.split("/")[1]
    names = _imports(ast.parse(source))
    for prefix in FORBIDDEN.get(folder, ()):
        if any(n == prefix or n.startswith(prefix + ".") for n in names):
            out.add((rel, f"imports {prefix}"))
    if folder == "header":
        for n in names:
            if n.startswith("hybrid_gguf.") and not any(n == p or n.startswith(p + ".") for p in HEADER_MAY_USE):
                out.add((rel, "imports " + ".".join(n.split(".")[:2])))
    return out


def _violations() -> set:
    return set().union(*(violations(rel, source) for rel, source in _modules()))


@pytest.mark.parametrize("source, expected", [
    ("import llama_cpp\nllm = llama_cpp.Llama(model_path='m.gguf')\n", {LOADS}),
    ("from hybrid_gguf.llama.loader import load_llama\nload_llama('m.gguf')\n", set()),
    ("def f():\n    import llama_cpp.llama_cpp as b\n    b.llama_model_load_from_file(p, mp)\n", {LOADS}),
    ("import gguf\nclass R(gguf.GGUFReader): pass\n", {READS_GGUF}),
    ("if head[:4] != b'GGUF': raise ValueError\n", {READS_GGUF}),
    ("from hybrid_gguf.header.inventory import _open_reader\n", {READS_GGUF}),
    ("from hybrid_gguf.header.inventory import read_inventory\ninv = read_inventory(p)\n", set()),
    ("import gguf\nw = gguf.GGUFWriter(p, 'qwen3moe')\n", set()),
    ("from hybrid_gguf.planning.planner import make_plan\nplan = make_plan(inv, b, 4096)\n", {CHOOSES}),
    ("def hot_from_counts(inv, counts, budget):\n    return {}\n", {CHOOSES}),
    ("import time\nt0 = time.perf_counter()\n", {TIMES}),
    ("import time\nelapsed = time.monotonic() - t0\n", {TIMES}),
    ("import os, time\nname = f'{os.getpid()}-{time.monotonic_ns()}'\n", set()),
    ("import time\nstarted = time.time()\n", set()),
    ("import llama_cpp\np = llama_cpp.llama_perf_context(ctx)\nfit_n_cpu_moe(inv, b, 4096)\n", {TIMES, CHOOSES}),
])
def test_duties_are_told_apart(source, expected):
    assert duties(source) == expected


@pytest.mark.parametrize("rel, source, expected", [
    ("hybrid_gguf/routing/x.py", "from hybrid_gguf.planning.speed import selection_probs\n",
     {"imports hybrid_gguf.planning"}),
    ("hybrid_gguf/routing/x.py", "from hybrid_gguf.routing.stats import lru_hit_rate\n", set()),
    ("hybrid_gguf/planning/x.py", "def f():\n    import llama_cpp.llama_cpp as b\n", {"imports llama_cpp"}),
    ("hybrid_gguf/planning/x.py", "from hybrid_gguf.bench import runner\n", {"imports hybrid_gguf.bench"}),
    ("hybrid_gguf/planning/x.py", "from hybrid_gguf.header.inventory import EXPERT_KINDS\n", set()),
    ("hybrid_gguf/header/x.py", "from hybrid_gguf import paths\n", {"imports hybrid_gguf.paths"}),
    ("hybrid_gguf/header/x.py", "from hybrid_gguf.errors import HybridError\n"
                                "from hybrid_gguf.header.checks import check_header\nimport gguf\n", set()),
    ("hybrid_gguf/model.py", "import llama_cpp\nfrom hybrid_gguf.planning.plan import Plan\n", set()),
    ("hybrid_gguf/x.py", "import time\nt0 = time.perf_counter()\nmake_plan(inv, b, 4096)\n",
     {"duties: chooses placement + times runs"}),
])
def test_rules_are_told_apart(rel, source, expected):
    assert violations(rel, source) == {(rel, rule) for rule in expected}


def test_every_duty_is_found_in_the_package():
    found = set().union(*(duties(source) for _, source in _modules()))
    assert found == {READS_GGUF, CHOOSES, LOADS, TIMES}


def test_no_new_duty_mix_or_upward_import():
    new = sorted(_violations() - KNOWN)
    assert not new, "modules that break the layout (one duty each, imports down the flow):\n" + \
        "\n".join(f"  {rel}: {rule}" for rel, rule in new)


def test_known_violations_still_hold():
    fixed = sorted(KNOWN - _violations())
    assert not fixed, "fixed, delete from KNOWN:\n" + "\n".join(f"  {rel}: {rule}" for rel, rule in fixed)


def test_docs_results_hold_no_file_over_100_kb():
    """Raw outputs over 100 KB stay out of git as NAME.raw.json (docs/results/README.md)."""
    big = [p.relative_to(REPO).as_posix() for p in (REPO / "docs" / "results").rglob("*")
           if p.is_file() and not p.name.endswith(".raw.json") and p.stat().st_size > 100_000]
    assert not big, f"over 100 KB, commit a .slim.json instead: {big}"
