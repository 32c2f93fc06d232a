"""Refuse GGUF headers that llama.cpp would abort on, before anything is sized from them.

llama.cpp checks many header values with GGML_ASSERT, which kills the process
(SIGABRT) instead of returning an error, and some values (a layer index of 2**32 in
a tensor name, a context length of 2**32-1) make Python allocate or compute absurd
things.  `read_inventory` calls the checks here, so `inspect`, `run` and the API
refuse such files alike, with one line naming the file, the key and what is valid.

The limits mirror the llama.cpp that llama-cpp-python 0.3.36 vendors:
src/llama-model.cpp (load_hparams), src/llama-hparams.h, src/models/*.cpp (graph
asserts on head sizes), ggml/src/gguf.cpp (tensor table) and ggml-backend.cpp
(32-byte aligned tensor data).
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from hybrid_gguf.errors import HybridError

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
MAX_NAME = 64  # GGML_MAX_NAME: tensor names must be shorter
MAX_DIMS = 4  # GGML_MAX_DIMS
TENSOR_ALIGNMENT = 32  # ggml-backend maps tensor data in place and needs this
MAX_INT32 = 2**31 - 1
# llama-cpp-python sizes a token buffer (4 bytes a token) from the training context on
# every tokenize call; the longest real contexts are ~10M tokens.
MAX_CONTEXT = 2**25

# GGUF value type ids (gguf.GGUFValueType)
_UINT32, _INT32, _BOOL, _STRING, _ARRAY = 4, 5, 7, 8, 9
_INT_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}
_TYPE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32",
               7: "BOOL", 8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}

# Architecture keys llama.cpp reads as uint32: (smallest, largest valid value, per-layer array allowed).
# Keys absent from the file are not checked here (llama.cpp reports required ones itself).
U32_KEYS = {
    "block_count": (1, MAX_LAYERS, False),
    "context_length": (1, MAX_CONTEXT, False),
    "embedding_length": (1, MAX_INT32, False),
    "feed_forward_length": (0, MAX_INT32, True),
    "expert_feed_forward_length": (0, MAX_INT32, True),
    "expert_shared_feed_forward_length": (0, MAX_INT32, False),
    "attention.head_count": (0, MAX_INT32, True),
    "attention.head_count_kv": (0, MAX_INT32, True),
    "attention.key_length": (0, MAX_INT32, False),
    "attention.value_length": (0, MAX_INT32, False),
    "rope.dimension_count": (0, MAX_INT32, False),
    "expert_count": (0, MAX_EXPERTS, False),
    "expert_used_count": (0, MAX_EXPERTS, True),
    "expert_shared_count": (0, MAX_EXPERTS, False),
    "expert_group_count": (0, MAX_EXPERTS, False),
    "expert_group_used_count": (0, MAX_EXPERTS, False),
    "leading_dense_block_count": (0, MAX_LAYERS, False),
    "nextn_predict_layers": (0, MAX_LAYERS, False),
    "attention.sliding_window": (0, MAX_INT32, False),
    "attention.key_length_mla": (0, MAX_INT32, False),
    "attention.value_length_mla": (0, MAX_INT32, False),
    "attention.kv_lora_rank": (0, MAX_INT32, False),
    "attention.q_lora_rank": (0, MAX_INT32, False),
}

# Architectures whose graph asserts head size == key length == rope dimension
# (GGML_ASSERT in src/models/<arch>.cpp); glm4moe asserts only the first equality.
_HEAD_DIM_ROPE_ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe", "granitemoe", "granite")
_HEAD_DIM_ARCHS = _HEAD_DIM_ROPE_ARCHS + ("glm4moe",)
# Architectures with plain Q/K/V/output projections (not MLA): their shapes follow
# from embedding_length, the head counts and key/value_length.
_STD_ATTN_ARCHS = ("llama", "qwen2moe", "qwen3moe", "olmoe", "granitemoe", "gpt-oss", "glm4moe")

_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_regular_file(path: Path) -> int:
    """Size of `path`; HybridError when it is missing or not a regular file.

    Uses stat only, so a FIFO or a device is refused without being opened
    (opening a FIFO blocks until a writer appears)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise HybridError(f"model file not found: {path}") from None
    except OSError as exc:
        raise HybridError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise HybridError(f"{path} is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        what = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "a special file")
        raise HybridError(f"{path} is not a regular file ({what}); pass a .gguf file")
    return st.st_size


class HeaderChecker:
    """Checks on one file's decoded header; every failure is a one-line HybridError."""

    def __init__(self, path: Path, fields: dict, metadata: dict, arch: str) -> None:
        self.path = path
        self.fields = fields  # gguf-py ReaderField by key
        self.metadata = metadata
        self.arch = arch

    def fail(self, message: str) -> None:
        raise HybridError(f"{self.path}: {message}")

    # -- key/value section ---------------------------------------------------------------

    def _types(self, key: str) -> list:
        fld = self.fields.get(key)
        return [int(t) for t in fld.types] if fld is not None and fld.types else []

    def uint(self, key: str, lo: int = 0, hi: int = MAX_INT32, per_layer: bool = False,
             any_int: bool = False) -> Any:
        """The value of an integer key (None when absent): an int, or a list where allowed.

        llama.cpp reads hyper-parameters only as UINT32 (any_int: any integer type)."""
        if key not in self.metadata and key not in self.fields:
            return None
        types = self._types(key)
        value = self.metadata.get(key)
        if types and types[0] == _ARRAY:
            if not per_layer:
                self.fail(f"{key} is an array; it must be a single UINT32 value in {lo}..{hi}")
            if len(types) < 2 or types[1] not in (_UINT32, _INT32):
                self.fail(f"{key} is an array of {_type_name(types[1:])}; "
                          f"it must be UINT32 or an array of UINT32/INT32")
            if not isinstance(value, list):
                self.fail(f"{key} cannot be decoded")
            for v in value:
                if not lo <= int(v) <= hi:
                    self.fail(f"{key} holds {int(v)}; every entry must be in {lo}..{hi}")
            return [int(v) for v in value]
        ok_types = _INT_TYPES if any_int else {_UINT32}
        if types[:1] == [] or types[0] not in ok_types or not isinstance(value, int) or isinstance(value, bool):
            shown = f" ({_short(value)})" if value is not None else ""
            wanted = "an integer" if any_int else "UINT32"
            self.fail(f"{key} is stored as {_type_name(types)}{shown}; it must be {wanted} in {lo}..{hi}")
        if not lo <= value <= hi:
            self.fail(f"{key} is {value}; valid: {lo}..{hi}")
        return int(value)

    def check_alignment(self) -> int:
        if "general.alignment" not in self.fields:
            return TENSOR_ALIGNMENT
        value = self.uint("general.alignment", 1, 2**31)
        if value & (value - 1):
            self.fail(f"general.alignment is {value}; it must be a power of two")
        return value

    # -- the whole header against the tensor table ----------------------------------------

    def check(self, tensors: list, data_offset: int) -> None:
        """tensors: inventory TensorInfos (name, layer, kind, shape, n_bytes, data_offset)."""
        alignment = self.check_alignment()
        self.check_tensor_table(tensors, data_offset, alignment)
        values = {}
        prefix = f"{self.arch}."
        for name, (lo, hi, per_layer) in U32_KEYS.items():
            values[name] = self.uint(prefix + name, lo, hi, per_layer)
        for key in ("split.count", "split.no"):
            if key in self.fields:
                self.uint(key, 0, 65535, any_int=True)
        self.check_layers(tensors, values)
        self.check_experts(tensors, values)
        self.check_shapes(tensors, values)

    def check_tensor_table(self, tensors: list, data_offset: int, alignment: int) -> None:
        seen = set()
        expected = 0  # gguf.cpp: tensors follow each other in table order, padded to the alignment
        for t in tensors:
            if not t.name:
                self.fail("a tensor has an empty name")
            if len(t.name.encode()) >= MAX_NAME:
                self.fail(f"tensor name {t.name[:40]!r}... is {len(t.name.encode())} bytes; "
                          f"llama.cpp allows at most {MAX_NAME - 1}")
            if t.name in seen:
                self.fail(f"tensor {t.name} appears twice")
            seen.add(t.name)
            if len(t.shape) > MAX_DIMS:
                self.fail(f"tensor {t.name} has {len(t.shape)} dimensions; at most {MAX_DIMS} are allowed")
            n = 1
            for d in t.shape:
                n *= d
            if n >= 2**63:
                self.fail(f"tensor {t.name} has shape {list(t.shape)}: too many elements")
            if t.data_offset - data_offset != expected:
                self.fail(f"tensor {t.name} data is at offset {t.data_offset - data_offset} of the data "
                          f"section, expected {expected} (tensors follow each other in table order, "
                          f"padded to general.alignment = {alignment})")
            expected += -(-t.n_bytes // alignment) * alignment
            if t.data_offset % TENSOR_ALIGNMENT:
                self.fail(f"tensor {t.name} data starts at file offset {t.data_offset}, not a multiple of "
                          f"{TENSOR_ALIGNMENT}; llama.cpp maps tensor data in place and needs "
                          f"{TENSOR_ALIGNMENT}-byte alignment (general.alignment or the header is wrong)")
        if data_offset % TENSOR_ALIGNMENT and tensors:
            self.fail(f"the tensor data section starts at file offset {data_offset}, not a multiple of "
                      f"{TENSOR_ALIGNMENT} (general.alignment or the header is wrong)")

    def check_layers(self, tensors: list, values: dict) -> None:
        layers = set()
        for t in tensors:
            if t.layer is None:
                continue
            if t.layer >= MAX_LAYERS:
                self.fail(f"tensor {t.name[:MAX_NAME]} has layer index {t.layer}; "
                          f"llama.cpp supports at most {MAX_LAYERS} layers")
            layers.add(t.layer)
        block_count = values["block_count"]
        key = f"{self.arch}.block_count"
        if block_count is not None:
            beyond = [t for t in tensors if t.layer is not None and t.layer >= block_count]
            if beyond:
                self.fail(f"tensor {beyond[0].name} belongs to layer {beyond[0].layer} but {key} is "
                          f"{block_count} (layers 0..{block_count - 1})")
            # next-token-prediction layers (counted last) may be left out of a file
            nextn = values["nextn_predict_layers"] or 0
            missing = sorted(set(range(max(block_count - nextn, 0))) - layers)
            if missing and layers:
                self.fail(f"{key} is {block_count} but no tensor belongs to layer {missing[0]} "
                          f"(tensors cover layers {_ranges(sorted(layers))})")
        elif layers and tensors:
            block_count = max(layers) + 1
        nextn = values["nextn_predict_layers"]
        if nextn is not None and block_count is not None and nextn > block_count:
            self.fail(f"{self.arch}.nextn_predict_layers is {nextn}, more than "
                      f"{key} ({block_count})")
        lead = values["leading_dense_block_count"]
        if lead is not None and block_count is not None and lead > block_count:
            self.fail(f"{self.arch}.leading_dense_block_count is {lead}, more than {key} ({block_count})")
        n_layer = block_count or 0
        for name, (_, _, per_layer) in U32_KEYS.items():
            value = values[name]
            if per_layer and isinstance(value, list) and block_count is not None and len(value) != n_layer:
                self.fail(f"{self.arch}.{name} has {len(value)} entries; it needs one per layer "
                          f"({key} = {n_layer})")

    def check_experts(self, tensors: list, values: dict) -> None:
        a = self.arch
        exps = [t for t in tensors if t.is_expert]
        count = values["expert_count"]
        used = values["expert_used_count"]
        used_max = max(used, default=0) if isinstance(used, list) else (used or 0)
        if exps:
            first = exps[0]
            if count is None:
                self.fail(f"{a}.expert_count is missing, but tensor {first.name} holds "
                          f"{first.shape[-1] if first.shape else 0} routed experts")
            for t in exps:
                if not t.shape or t.shape[-1] != count:
                    n = t.shape[-1] if t.shape else 0
                    self.fail(f"{a}.expert_count is {count} but tensor {t.name} holds {n} "
                              f"expert{'' if n == 1 else 's'} (its last dimension)")
            if used is None:
                self.fail(f"{a}.expert_used_count is missing; a model with {count} routed experts "
                          f"needs it (valid: 1..{count})")
        count = count or 0
        if count > 0:
            if used_max == 0:
                self.fail(f"{a}.expert_used_count is 0; with {count} experts it must be in 1..{count}")
            if used_max > count:
                self.fail(f"{a}.expert_used_count is {used_max}, more than {a}.expert_count "
                          f"({count}); valid: 1..{count}")
            groups = values["expert_group_count"] or 0
            group_used = values["expert_group_used_count"] or 0
            if groups >= count:
                self.fail(f"{a}.expert_group_count is {groups}; it must be less than "
                          f"{a}.expert_count ({count})")
            if groups > 1:
                if count % groups:
                    self.fail(f"{a}.expert_group_count ({groups}) does not divide "
                              f"{a}.expert_count ({count})")
                if not 0 < group_used < groups:
                    self.fail(f"{a}.expert_group_used_count is {group_used}; with {groups} groups "
                              f"it must be in 1..{groups - 1}")
        else:
            if used_max:
                self.fail(f"{a}.expert_used_count is {used_max} but the model has no routed experts "
                          f"({a}.expert_count is 0 or missing)")
            if values["expert_group_count"]:
                self.fail(f"{a}.expert_group_count is {values['expert_group_count']} but the model "
                          f"has no routed experts")

    def check_shapes(self, tensors: list, values: dict) -> None:
        a = self.arch
        n_embd = values["embedding_length"]
        embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
        if n_embd is not None and embd is not None and embd.shape and embd.shape[0] != n_embd:
            self.fail(f"{a}.embedding_length is {n_embd} but token_embd.weight has rows of "
                      f"{embd.shape[0]}")
        heads = values["attention.head_count"]
        heads_kv = values["attention.head_count_kv"]
        for i, (h, hkv) in enumerate(zip(_as_list(heads), _as_list(heads_kv, len(_as_list(heads))))):
            if hkv and h % hkv:
                self.fail(f"{a}.attention.head_count ({h}) is not a multiple of "
                          f"attention.head_count_kv ({hkv})" + (f" in layer {i}" if isinstance(heads, list) else ""))
            if h and not hkv and heads_kv is not None and not isinstance(heads_kv, list):
                self.fail(f"{a}.attention.head_count_kv is 0 in layer {i}; valid: a divisor of "
                          f"attention.head_count ({h})")
        h0 = _as_list(heads)[0] if heads else 0
        if a in _HEAD_DIM_ARCHS and h0 and n_embd:
            k = values["attention.key_length"]
            v = values["attention.value_length"]
            default = n_embd // h0
            k = default if k is None else k
            v = default if v is None else v
            if k != v:
                self.fail(f"{a}.attention.key_length ({k}) and attention.value_length ({v}) differ; "
                          f"llama.cpp's {a} graph needs them equal")
            rot = values["rope.dimension_count"]
            if a in _HEAD_DIM_ROPE_ARCHS and rot is not None and rot != k:
                self.fail(f"{a}.rope.dimension_count is {rot}; llama.cpp's {a} graph needs it equal to "
                          f"the head size ({k})")
            if not k:
                self.fail(f"{a}: the attention head size is 0 (embedding_length {n_embd}, "
                          f"head_count {h0})")
        if a in _STD_ATTN_ARCHS and h0 and n_embd:
            self.check_attention(tensors, values, n_embd)
        window, ctx = values["attention.sliding_window"], values["context_length"]
        if window and ctx and window > ctx:
            self.fail(f"{a}.attention.sliding_window is {window}, longer than "
                      f"{a}.context_length ({ctx})")

    def check_attention(self, tensors: list, values: dict, n_embd: int) -> None:
        """Q/K/V/output projection shapes against head counts and head sizes: llama.cpp
        checks only some of them while loading and asserts on the rest in the graph."""
        a = self.arch
        heads = _as_list(values["attention.head_count"])
        heads_kv = values["attention.head_count_kv"]
        heads_kv = heads if heads_kv is None else _as_list(heads_kv, len(heads))
        k = values["attention.key_length"]
        v = values["attention.value_length"]
        k = n_embd // heads[0] if k is None else k
        v = n_embd // heads[0] if v is None else v
        shapes = {t.name: list(t.shape) for t in tensors}
        for i in sorted({t.layer for t in tensors if t.layer is not None}):  # < MAX_LAYERS by now
            h = heads[min(i, len(heads) - 1)]  # a per-layer list has one entry per layer
            hkv = heads_kv[min(i, len(heads_kv) - 1)] if heads_kv else h
            if not h:
                continue
            want = {"attn_q": ([n_embd, h * k], "head_count x key_length"),
                    "attn_k": ([n_embd, hkv * k], "head_count_kv x key_length"),
                    "attn_v": ([n_embd, hkv * v], "head_count_kv x value_length"),
                    "attn_output": ([h * v, n_embd], "head_count x value_length")}
            for stem, (shape, why) in want.items():
                name = f"blk.{i}.{stem}.weight"
                got = shapes.get(name)
                if got is not None and got != shape:
                    self.fail(f"tensor {name} has shape {got}; {a}.embedding_length, head counts and "
                              f"head sizes imply {shape} ({why})")


def _as_list(value, n: int = 1) -> list:
    if value is None:
        return []
    if isinstance(value, list):
        return value
    return [value] * max(n, 1)


def _type_name(types: list) -> str:
    if not types:
        return "an unreadable value"
    if types[0] == _ARRAY:
        return "ARRAY of " + (_TYPE_NAMES.get(types[1], str(types[1])) if len(types) > 1 else "?")
    return _TYPE_NAMES.get(types[0], str(types[0]))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _ranges(values: list) -> str:
    if not values:
        return "none"
    if values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}-{values[-1]}" if len(values) > 1 else str(values[0])
    return ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")


def check_header(path: Path, fields: dict, metadata: dict, arch: str, tensors: list,
                 data_offset: int) -> None:
    HeaderChecker(path, fields, metadata, arch).check(tensors, data_offset)


__all__ = ["check_regular_file", "check_header", "HeaderChecker", "U32_KEYS", "MAX_LAYERS",
           "MAX_EXPERTS", "TENSOR_ALIGNMENT"]
