"""Malformed GGUF files made from a good one: a small GGUF (de)serializer and seeded mutators.

`GGUFModel.parse(bytes)` splits a file into header values, tensor infos and the data
section; `to_bytes()` writes it back byte for byte.  Each mutator edits one thing
(a value, a type, a key, a tensor info, the raw header bytes) and says what it did,
so a failing mutant can be rebuilt from its seed and description.
"""

from __future__ import annotations

import copy
import random
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?",
        U64: "Q", I64: "q", F64: "d"}
_INT_BITS = {U8: 8, I8: 8, U16: 16, I16: 16, U32: 32, I32: 32, U64: 64, I64: 64}
INT_TYPES = tuple(_INT_BITS)


def _fit(vtype: int, value):
    """value coerced into what vtype can hold (ints wrap like a C cast)."""
    if vtype in _INT_BITS:
        bits = _INT_BITS[vtype]
        v = int(value) & ((1 << bits) - 1)
        if vtype in (I8, I16, I32, I64) and v >= 1 << (bits - 1):
            v -= 1 << bits
        return v
    if vtype in (F32, F64):
        return float(value)
    if vtype == BOOL:
        return bool(value)
    if vtype == STR:
        return value if isinstance(value, bytes) else str(value).encode()
    raise ValueError(vtype)


@dataclass
class KV:
    key: bytes
    vtype: int
    value: Any  # scalar, bytes for strings; for arrays: list
    itype: Optional[int] = None  # arrays: element type


@dataclass
class TensorInfo:
    name: bytes
    dims: list
    ttype: int
    offset: int


@dataclass
class GGUFModel:
    version: int
    kvs: list
    tensors: list
    data: bytes  # everything after the tensor infos and their padding
    align: int = 32  # padding actually used before the data section
    n_tensors: Optional[int] = None  # header counts; None = the real counts
    n_kv: Optional[int] = None
    notes: list = field(default_factory=list)

    # -- reading ---------------------------------------------------------------------

    @classmethod
    def parse(cls, raw: bytes) -> "GGUFModel":
        pos = 0

        def take(fmt):
            nonlocal pos
            vals = struct.unpack_from("<" + fmt, raw, pos)
            pos += struct.calcsize("<" + fmt)
            return vals[0]

        def string():
            nonlocal pos
            n = take("Q")
            s = raw[pos:pos + n]
            pos += n
            return s

        def value(vtype):
            if vtype == STR:
                return string()
            return take(_FMT[vtype])

        assert raw[:4] == b"GGUF"
        pos = 4
        version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
        kvs = []
        for _ in range(n_kv):
            key = string()
            vtype = take("I")
            if vtype == ARR:
                itype, n = take("I"), take("Q")
                kvs.append(KV(key, ARR, [value(itype) for _ in range(n)], itype))
            else:
                kvs.append(KV(key, vtype, value(vtype)))
        tensors = []
        for _ in range(n_tensors):
            name = string()
            nd = take("I")
            dims = [take("Q") for _ in range(nd)]
            tensors.append(TensorInfo(name, dims, take("I"), take("Q")))
        align = 32
        for kv in kvs:
            if kv.key == b"general.alignment" and kv.vtype == U32:
                align = kv.value
        pos += (-pos) % align
        return cls(version, kvs, tensors, raw[pos:], align)

    # -- writing ---------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        out = bytearray(b"GGUF")

        def put(fmt, v):
            out.extend(struct.pack("<" + fmt, v))

        def put_str(s: bytes):
            put("Q", len(s))
            out.extend(s)

        def put_value(vtype, v):
            if vtype == STR:
                put_str(_fit(STR, v))
            else:
                put(_FMT[vtype], _fit(vtype, v))

        put("I", self.version)
        put("Q", len(self.tensors) if self.n_tensors is None else self.n_tensors)
        put("Q", len(self.kvs) if self.n_kv is None else self.n_kv)
        for kv in self.kvs:
            put_str(kv.key)
            put("I", kv.vtype)
            if kv.vtype == ARR:
                put("I", kv.itype)
                put("Q", len(kv.value))
                for v in kv.value:
                    put_value(kv.itype, v)
            else:
                put_value(kv.vtype, kv.value)
        for t in self.tensors:
            put_str(t.name)
            put("I", len(t.dims))
            for d in t.dims:
                put("Q", d & (2**64 - 1))
            put("I", t.ttype & (2**32 - 1))
            put("Q", t.offset & (2**64 - 1))
        out.extend(b"\0" * ((-len(out)) % max(self.align, 1)))
        out.extend(self.data)
        return bytes(out)

    # -- helpers ---------------------------------------------------------------------

    @property
    def arch(self) -> bytes:
        for kv in self.kvs:
            if kv.key == b"general.architecture":
                return kv.value
        return b"unknown"

    def find(self, key: bytes) -> Optional[KV]:
        return next((kv for kv in self.kvs if kv.key == key), None)

    def arch_key(self, name: str) -> bytes:
        return self.arch + b"." + name.encode()


# ---------------------------------------------------------------------------
# Mutators: each edits a deep copy in place and returns a description

EXTREMES = (0, 1, 2, 3, 7, 9, 64, 511, 512, 513, 1024, 1025, 4096, 65535, 2**31 - 1, 2**31,
            2**32 - 1, 2**32, 2**63 - 1, -1, -2)
HPARAMS = ("expert_count", "expert_used_count", "block_count", "context_length", "embedding_length",
           "feed_forward_length", "expert_feed_forward_length", "attention.head_count",
           "attention.head_count_kv", "attention.key_length", "attention.value_length",
           "rope.dimension_count", "expert_shared_count", "leading_dense_block_count",
           "expert_group_count", "expert_group_used_count", "nextn_predict_layers",
           "attention.sliding_window", "expert_shared_feed_forward_length")


def _pick_key(rng: random.Random, m: GGUFModel) -> KV:
    arch_keys = [kv for kv in m.kvs if kv.key.startswith(m.arch + b".")]
    if arch_keys and rng.random() < 0.8:
        return rng.choice(arch_keys)
    return rng.choice(m.kvs)


def set_hparam(rng, m: GGUFModel) -> str:
    """An arch hyper-parameter (present or not) set to an extreme value."""
    key = m.arch_key(rng.choice(HPARAMS))
    value = rng.choice(EXTREMES)
    kv = m.find(key)
    if kv is None:
        kv = KV(key, U32, 0)
        m.kvs.append(kv)
    if kv.vtype == ARR:
        kv.value = [value] * len(kv.value)
    else:
        if kv.vtype not in INT_TYPES:
            kv.vtype = U32
        kv.value = _fit(kv.vtype, value)
    return f"set {key.decode(errors='replace')} = {value}"


def retype_key(rng, m: GGUFModel) -> str:
    """A key's value stored under another type (string, float, narrower/wider int, bool, array)."""
    kv = _pick_key(rng, m)
    new = rng.choice((STR, F32, F64, BOOL, I8, U16, I32, U64, I64, ARR))
    old = kv.value
    if kv.vtype == ARR:
        kv.vtype, kv.itype = (rng.choice((STR, U32, F32)), None)
        kv.value = _fit(kv.vtype, 7 if kv.vtype != STR else b"seven")
        return f"array {kv.key.decode(errors='replace')} replaced by a scalar of type {kv.vtype}"
    if new == ARR:
        kv.vtype, kv.itype = ARR, (kv.vtype if kv.vtype != BOOL else U32)
        kv.value = [old] * rng.choice((0, 1, 2, 3, 600))
        return f"{kv.key.decode(errors='replace')} made an array of {len(kv.value)}"
    if new == STR:
        kv.value = rng.choice((str(old).encode() if not isinstance(old, bytes) else old, b"", b"\xff\xfe"))
    elif kv.vtype == STR:
        kv.value = _fit(new, rng.choice((0, 1, 8, 2**31)))
    else:
        kv.value = _fit(new, old if not isinstance(old, float) else int(old))
    kv.vtype = new
    return f"{kv.key.decode(errors='replace')} retyped to {new}"


def drop_key(rng, m: GGUFModel) -> str:
    kv = _pick_key(rng, m)
    m.kvs.remove(kv)
    return f"dropped {kv.key.decode(errors='replace')}"


def set_string(rng, m: GGUFModel) -> str:
    """general.architecture or another string key changed."""
    strs = [kv for kv in m.kvs if kv.vtype == STR]
    kv = rng.choice(strs)
    kv.value = rng.choice((b"", b"llama", b"qwen2moe", b"gpt-oss", b"nonsense", b"\xff" * 3, b"x" * 5000))
    return f"{kv.key.decode(errors='replace')} = {kv.value[:20]!r}"


def set_alignment(rng, m: GGUFModel) -> str:
    """general.alignment added or changed (the layout itself is not moved)."""
    value = rng.choice((0, 1, 2, 3, 4, 8, 16, 24, 31, 64, 4096, 2**31, 2**32 - 1))
    vtype = rng.choice((U32, U32, U32, U64, I32, STR))
    kv = m.find(b"general.alignment")
    if kv is None:
        kv = KV(b"general.alignment", vtype, 0)
        m.kvs.insert(0, kv)
    kv.vtype, kv.value = vtype, _fit(vtype, value)
    return f"general.alignment = {value} (type {vtype})"


def tensor_dims(rng, m: GGUFModel) -> str:
    t = rng.choice(m.tensors)
    i = rng.randrange(len(t.dims))
    how = rng.choice(("zero", "one", "huge", "plus", "drop", "add", "swap"))
    if how == "zero":
        t.dims[i] = 0
    elif how == "one":
        t.dims[i] = 1
    elif how == "huge":
        t.dims[i] = rng.choice((2**31, 2**32 - 1, 2**62, 2**64 - 1))
    elif how == "plus":
        t.dims[i] += rng.choice((1, 32, -1))
    elif how == "drop":
        t.dims.pop(i)
    elif how == "add":
        t.dims.append(rng.choice((1, 2, 8)))
    else:
        t.dims.reverse()
    return f"tensor {t.name.decode(errors='replace')} dims {how} -> {t.dims}"


def tensor_type(rng, m: GGUFModel) -> str:
    t = rng.choice(m.tensors)
    t.ttype = rng.choice((1, 2, 8, 12, 30, 4, 5, 39, 40, 43, 99, 2**31, 2**32 - 1))
    return f"tensor {t.name.decode(errors='replace')} type {t.ttype}"


def tensor_offset(rng, m: GGUFModel) -> str:
    t = rng.choice(m.tensors)
    t.offset = rng.choice((t.offset + 1, t.offset + 32, t.offset - 32, 0, 2**40, 2**64 - 1))
    return f"tensor {t.name.decode(errors='replace')} offset {t.offset}"


def tensor_name(rng, m: GGUFModel) -> str:
    t = rng.choice(m.tensors)
    old = t.name
    how = rng.choice(("layer", "layer", "dup", "drop", "empty", "long", "nolayer"))
    if how == "layer":
        big = rng.choice((2, 3, 7, 100, 511, 512, 4096, 10**6, 10**9, 2**32 - 1, 10**30))
        parts = old.split(b".")
        if parts[0] == b"blk":
            parts[1] = str(big).encode()
            t.name = b".".join(parts)
        else:
            t.name = b"blk.%d." % big + old
    elif how == "dup":
        t.name = rng.choice(m.tensors).name
    elif how == "drop":
        m.tensors.remove(t)
        return f"dropped tensor {old.decode(errors='replace')}"
    elif how == "empty":
        t.name = b""
    elif how == "long":
        t.name = b"blk.0." + b"x" * 80 + b".weight"
    else:
        t.name = old.replace(b"blk.0.", b"").replace(b"blk.1.", b"")
    return f"tensor {old.decode(errors='replace')} renamed {t.name[:40]!r}"


def header_counts(rng, m: GGUFModel) -> str:
    which = rng.choice(("n_tensors", "n_kv"))
    real = len(m.tensors) if which == "n_tensors" else len(m.kvs)
    value = rng.choice((0, real - 1, real + 1, 2**32, 2**63, 2**64 - 1))
    setattr(m, which, value & (2**64 - 1))
    return f"header {which} = {value}"


def set_version(rng, m: GGUFModel) -> str:
    m.version = rng.choice((0, 1, 2, 4, 2**24, 2**32 - 1))
    return f"version {m.version}"


STRUCTURED: tuple[Callable, ...] = (
    set_hparam, set_hparam, set_hparam, set_hparam, retype_key, retype_key, drop_key, drop_key,
    set_string, set_alignment, tensor_dims, tensor_dims, tensor_type, tensor_offset,
    tensor_name, tensor_name, header_counts, set_version,
)


def mutate(base: GGUFModel, raw: bytes, header_len: int, rng: random.Random) -> tuple[bytes, str]:
    """One mutant (file bytes, description): one to three structured edits, or raw damage."""
    r = rng.random()
    if r < 0.12:  # cut somewhere: in the header or in the data
        cut = rng.choice((rng.randrange(4, header_len), rng.randrange(header_len, len(raw))))
        return raw[:cut], f"truncated at {cut}"
    if r < 0.25:  # flip bits in the header
        b = bytearray(raw)
        flips = [rng.randrange(4, header_len) for _ in range(rng.randint(1, 4))]
        for pos in flips:
            b[pos] ^= 1 << rng.randrange(8)
        return bytes(b), f"bit flips at {flips}"
    m = copy.deepcopy(base)
    notes = [rng.choice(STRUCTURED)(rng, m) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
    return m.to_bytes(), "; ".join(notes)


def header_length(raw: bytes) -> int:
    m = GGUFModel.parse(raw)
    return len(raw) - len(m.data)
