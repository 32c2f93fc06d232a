"""Prompt workloads for profiling: a prompts file, a text file cut into chunks, or built-in.

Prompts file formats:
  *.jsonl  one JSON value per line: a string, or an object with "prompt" (or "text")
           and optionally "label"
  other    one prompt per non-empty line (use .jsonl for multi-line prompts)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hybrid_gguf.errors import HybridError
from hybrid_gguf.readfile import read_bounded_text

BUILTIN_PATH = Path(__file__).resolve().parent.parent / "data" / "profile_workload.txt"  # JSONL content


@dataclass(frozen=True)
class Prompt:
    text: str
    label: str = ""


@dataclass(frozen=True)
class Workload:
    label: str  # workload label recorded in the profile
    prompts: list


# a profiling run reads its whole workload into memory and runs every prompt
MAX_WORKLOAD_BYTES = 64 << 20


def _read_text(path: Path, what: str) -> str:
    return read_bounded_text(path, what, MAX_WORKLOAD_BYTES)


def _parse_jsonl(text: str, origin: str) -> list:
    prompts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise HybridError(f"{origin}:{lineno}: not JSON ({exc.msg})") from None
        except RecursionError:
            raise HybridError(f"{origin}:{lineno}: JSON nested too deeply") from None
        if isinstance(item, str):
            prompts.append(Prompt(item))
        elif isinstance(item, dict) and isinstance(item.get("prompt", item.get("text")), str):
            prompts.append(Prompt(item.get("prompt", item.get("text")),
                                  str(item.get("label", ""))))
        else:
            raise HybridError(f'{origin}:{lineno}: expected a string or {{"prompt": ...}}')
    return [p for p in prompts if p.text.strip()]


def load_prompts_file(path: Path) -> Workload:
    text = _read_text(path, "prompts file")
    if path.suffix.lower() == ".jsonl":
        prompts = _parse_jsonl(text, str(path))
    else:
        prompts = [Prompt(line) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise HybridError(f"prompts file {path} has no prompts")
    return Workload(path.stem, prompts)


def chunk_text(text: str, chunk_chars: int) -> list:
    """Cut text into pieces of about chunk_chars, preferring paragraph, then line breaks."""
    if chunk_chars <= 0:
        raise HybridError("chunk size must be positive")
    chunks, start, n = [], 0, len(text)
    while start < n:
        end = min(n, start + chunk_chars)
        if end < n:
            for sep in ("\n\n", "\n", " "):
                cut = text.rfind(sep, start + chunk_chars // 2, end)
                if cut > start:
                    end = cut + len(sep)
                    break
        piece = text[start:end]
        if piece.strip():
            chunks.append(piece)
        start = end
    return chunks


def load_text_file(path: Path, chunk_chars: int = 2000) -> Workload:
    text = _read_text(path, "text file")
    prompts = [Prompt(c) for c in chunk_text(text, chunk_chars)]
    if not prompts:
        raise HybridError(f"text file {path} is empty")
    return Workload(path.stem, prompts)


def builtin_workload() -> Workload:
    """About thirty short prompts: chat, code, math, prose, facts, tables, five languages."""
    return Workload("mixed", _parse_jsonl(BUILTIN_PATH.read_text(encoding="utf-8"), "builtin"))


def select_workload(prompts_file: Optional[Path], text_file: Optional[Path],
                    chunk_chars: int = 2000) -> Workload:
    if prompts_file is not None and text_file is not None:
        raise HybridError("give either --prompts or --text, not both")
    if prompts_file is not None:
        return load_prompts_file(prompts_file)
    if text_file is not None:
        return load_text_file(text_file, chunk_chars)
    return builtin_workload()
