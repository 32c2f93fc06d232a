"""The Python standard library's own source as an offline text corpus.

Every machine that runs hybrid-gguf has a stdlib, so its .py files are the corpus of the
bundled tiny MoE and the source of "workloads": one workload per top-level package or
module (``asyncio``, ``email``, ``argparse``, ...). Different packages exercise the
experts differently, which is what profiling on one workload and evaluating on another
needs.

Test suites and machine-specific files are left out: distributions split or strip them
(Debian ships ``test``, ``tkinter`` or ``lib2to3`` separately), and a corpus that differs
between machines would make training irreproducible. `corpus_digest` lets a caller check
that it sees the same text the bundled model was trained on.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

# Token ids of the byte vocabulary shared with the GGUF export (see tiny_moe_export).
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3  # token of byte b is b + 3
SPACE_ID = 259  # SentencePiece's "▁" (U+2581): llama.cpp's SPM tokenizer turns ' ' into it
N_VOCAB = 260

# Directory names that hold test suites, build configuration or binaries.
_SKIP_DIRS = {
    "site-packages", "dist-packages", "__pycache__", "lib-dynload",
    "test", "tests", "idle_test", "__phello__",
}
_SKIP_TOP_PREFIXES = ("config-", "_sysconfigdata_")


@dataclass
class CorpusUnit:
    """One workload: a top-level package (many files) or a top-level module (one file)."""

    name: str
    files: List[str] = field(default_factory=list)  # paths relative to the stdlib root
    n_bytes: int = 0


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _keep_top(name: str) -> bool:
    return not name.startswith(_SKIP_TOP_PREFIXES) and name not in _SKIP_DIRS


def list_units(root: Optional[str] = None) -> Dict[str, CorpusUnit]:
    """All workloads under the stdlib root, with their files in a fixed (sorted) order."""
    root = root or stdlib_root()
    units: Dict[str, CorpusUnit] = {}
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if not _keep_top(entry):
            continue
        if os.path.isfile(path) and entry.endswith(".py"):
            unit = CorpusUnit(entry[:-3], [entry], os.path.getsize(path))
        elif os.path.isdir(path):
            unit = CorpusUnit(entry)
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
                for fn in sorted(filenames):
                    if fn.endswith(".py"):
                        full = os.path.join(dirpath, fn)
                        unit.files.append(os.path.relpath(full, root))
                        unit.n_bytes += os.path.getsize(full)
            if not unit.files:
                continue
        else:
            continue
        units[unit.name] = unit
    return units


def read_text(relpath: str, root: Optional[str] = None) -> Optional[str]:
    """File text, or None when the file is not UTF-8 (llama.cpp tokenizes UTF-8 text)."""
    with open(os.path.join(root or stdlib_root(), relpath), "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def encode(text: str) -> np.ndarray:
    """Token ids for `text`, exactly as llama.cpp's SPM tokenizer produces them for our vocab.

    llama.cpp escapes every ' ' to '▁' before tokenizing; '▁' is a vocab token, every
    other character falls back to its UTF-8 bytes. A literal '▁' in the text therefore
    also becomes SPACE_ID. No BOS, no space prefix (the GGUF sets add_space_prefix=false).
    """
    data = text.replace(" ", "\u2581").encode("utf-8")
    parts = data.split("\u2581".encode("utf-8"))
    out = np.empty(len(data), dtype=np.int32)
    n = 0
    for i, part in enumerate(parts):
        if i:
            out[n] = SPACE_ID
            n += 1
        arr = np.frombuffer(part, dtype=np.uint8)
        out[n:n + len(arr)] = arr.astype(np.int32) + BYTE_OFFSET
        n += len(arr)
    return out[:n]


def decode(tokens: Iterable[int]) -> str:
    """Inverse of `encode` for byte and space tokens; control tokens are dropped."""
    buf = bytearray()
    for t in tokens:
        t = int(t)
        if t == SPACE_ID:
            buf += b" "
        elif BYTE_OFFSET <= t < BYTE_OFFSET + 256:
            buf.append(t - BYTE_OFFSET)
    return buf.decode("utf-8", errors="replace")


def unit_tokens(unit: CorpusUnit, root: Optional[str] = None) -> np.ndarray:
    """One workload as a token stream: each file is BOS + its tokens + EOS."""
    pieces = []
    for rel in unit.files:
        text = read_text(rel, root)
        if text is None:
            continue
        pieces.append(np.array([BOS_ID], dtype=np.int32))
        pieces.append(encode(text))
        pieces.append(np.array([EOS_ID], dtype=np.int32))
    if not pieces:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(pieces)


def stream(units: Sequence[CorpusUnit], root: Optional[str] = None) -> np.ndarray:
    parts = [unit_tokens(u, root) for u in units]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def corpus_digest(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()
