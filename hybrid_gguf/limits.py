"""Bounds on the numbers handed to llama.cpp, checked before anything is allocated.

llama.cpp trusts its callers: too many threads overrun a fixed-size array, a context of
2**40 overflows a ctypes field, a context of ten million first allocates gigabytes of KV
cache and only then fails on the compute buffer. Every path that builds a `Llama` goes
through `placement.load_llama`, which calls `check_llama_kwargs` here; the CLI checks its
own options with the same functions first, so errors name the option the user typed.

Bounds:
  threads       1 .. min(512, 4 per CPU core, at least 4); 512 is GGML_MAX_N_THREADS
  context       8 .. 2**31 - 1 tokens, and KV cache + compute buffer (estimated) must fit
                the memory available (host RAM available + free GPU memory)
  batch/ubatch  1 .. 65536; a ubatch asked for (run/serve --ubatch) at most the context
  new tokens    >= 1
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from hybrid_gguf.errors import HybridError

GGML_MAX_N_THREADS = 512
MIN_CTX = 8
MAX_CTX = 2**31 - 1  # llama.cpp keeps positions in int32
MAX_BATCH = 65536
MAX_BENCH_ROUNDS = 20  # `bench --rounds`: each round reloads every placement
HOST_BYTES_PER_KV_CELL = 64


def max_threads() -> int:
    return min(GGML_MAX_N_THREADS, max(4, 4 * (os.cpu_count() or 1)))


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_threads(n: Optional[int], name: str = "n_threads") -> None:
    """None means llama.cpp's default."""
    if n is None:
        return
    top = max_threads()
    if not _whole(n) or not 1 <= n <= top:
        raise HybridError(f"{name} must be between 1 and {top} (4 per CPU core here, at most "
                          f"{GGML_MAX_N_THREADS}), got {n!r}")


# The one context default of every command and of the API: the model's training context,
# at most this (a longer one costs KV memory up front).
DEFAULT_CTX = 4096


def default_ctx(inventory, n_ctx: Optional[int] = None) -> int:
    """n_ctx when given, else DEFAULT_CTX capped by the model's training context."""
    if n_ctx is not None:
        return int(n_ctx)
    meta = getattr(inventory, "metadata", None) or {}
    trained = meta.get(f"{getattr(inventory, 'arch', '')}.context_length")
    try:
        trained = int(trained) if trained else 0
    except (TypeError, ValueError):
        trained = 0
    return max(MIN_CTX, min(DEFAULT_CTX, trained)) if trained > 0 else DEFAULT_CTX


def check_ctx(n: Optional[int], name: str = "n_ctx") -> None:
    if n is None:
        return
    if not _whole(n) or not MIN_CTX <= n <= MAX_CTX:
        raise HybridError(f"the context length ({name}) must be between {MIN_CTX} and {MAX_CTX} tokens, "
                          f"got {n!r}")


def check_batch(n: Optional[int], name: str = "n_batch") -> None:
    if n is None:
        return
    if not _whole(n) or not 1 <= n <= MAX_BATCH:
        raise HybridError(f"{name} must be between 1 and {MAX_BATCH}, got {n!r}")


def check_ubatch(n: Any, n_ctx: Optional[int] = None, name: str = "n_ubatch") -> None:
    """A prompt micro-batch asked for: None (the default) or "auto" (the planner's pick), or
    a whole number in check_batch's bounds and, with `n_ctx`, no larger than the context
    (llama.cpp would quietly cut it to the context)."""
    if n is None or n == "auto":
        return
    if not _whole(n) or n < 1:
        raise HybridError(f"{name} must be a positive integer or auto, got {n!r}")
    check_batch(n, name)
    if n_ctx is not None and n > n_ctx:
        raise HybridError(f"{name} {n} exceeds the context of {n_ctx} tokens; pass a smaller ubatch or a "
                          "larger context (-c/--ctx)")


def check_new_tokens(n: Any, name: str = "max_tokens") -> None:
    if not _whole(n) or n < 1:
        raise HybridError(f"{name} must be at least 1, got {n!r}")


def available_memory() -> int:
    """Host RAM available plus the free memory of every GPU llama.cpp sees."""
    from hybrid_gguf.llama.devices import cpu_ram, gpu_devices

    total = cpu_ram().available_bytes
    try:
        total += sum(int(g.free_bytes) for g in gpu_devices())
    except Exception:  # no llama_cpp: host memory only
        pass
    return total


def check_context_memory(inventory, n_ctx: int, n_ubatch: int = 512, flash_attn: bool = False,
                         type_k: str = "f16", type_v: str = "f16", name: str = "n_ctx") -> None:
    """Refuse a context whose KV cache and compute buffer cannot fit the memory there is."""
    from hybrid_gguf.planning.memory import estimate_compute_bytes, kv_cache_bytes
    from hybrid_gguf.sizes import format_size

    try:
        kv = kv_cache_bytes(inventory, n_ctx, type_k, type_v)
        compute = estimate_compute_bytes(inventory, n_ctx, n_ubatch, flash_attn)
    except (HybridError, TypeError, ValueError, AttributeError):
        return  # a model the estimate does not understand: llama.cpp decides
    # llama.cpp's bookkeeping per KV cell (positions, sequence sets) in host memory, even in a
    # no-alloc dry run: about 50 bytes (`hybrid-gguf plan tiny-moe-stdlib.gguf -c 100000000
    # -ub 65536` peaked at 5 GB resident on the development machine, 2026-12-02)
    cells = HOST_BYTES_PER_KV_CELL * int(n_ctx)
    have = available_memory()
    if kv + compute + cells > have:
        raise HybridError(
            f"a context of {n_ctx} tokens ({name}) needs about {format_size(kv)} of KV cache, "
            f"{format_size(compute)} of compute buffer and {format_size(cells)} of llama.cpp's bookkeeping, "
            f"more than the {format_size(have)} of memory available; use a smaller context")


_CACHE_NAMES = None


def _cache_name(value: Any) -> str:
    global _CACHE_NAMES
    if isinstance(value, str):
        return value.lower()
    if _CACHE_NAMES is None:
        from hybrid_gguf.planning.memory import CACHE_TYPE_IDS

        _CACHE_NAMES = {v: k for k, v in CACHE_TYPE_IDS.items()}
    return _CACHE_NAMES.get(value, "f16")


def check_llama_kwargs(kwargs: Mapping[str, Any], inventory=None) -> None:
    """The `llama_cpp.Llama` keyword arguments that can crash or stall llama.cpp."""
    for key in ("n_threads", "n_threads_batch"):
        check_threads(kwargs.get(key), key)
    n_ctx = kwargs.get("n_ctx", 512)
    check_ctx(n_ctx, "n_ctx")
    for key in ("n_batch", "n_ubatch"):
        check_batch(kwargs.get(key), key)
    if inventory is not None:
        n_batch = min(int(kwargs.get("n_batch", 512)), n_ctx)
        n_ubatch = min(int(kwargs.get("n_ubatch", 512)), n_batch)
        check_context_memory(inventory, n_ctx, n_ubatch, bool(kwargs.get("flash_attn", False)),
                             _cache_name(kwargs.get("type_k", "f16")), _cache_name(kwargs.get("type_v", "f16")))


def context_size(llm) -> int:
    """The context a prompt must fit: llama-cpp-python sizes its token and logit arrays by
    the n_ctx it was asked for, while llama.cpp pads its own (llm.n_ctx()) up to 256."""
    asked = int(getattr(getattr(llm, "context_params", None), "n_ctx", 0) or 0)
    held = len(getattr(llm, "input_ids", ())) or asked
    sizes = [n for n in (llm.n_ctx(), asked, held) if n]
    return min(sizes)
