"""What is in a GGUF file, read from its header and tensor table only.

Tensor data is never touched: the reader maps the file and parses the key/value
section and the tensor infos; sizes, per-expert strides and absolute data offsets
are computed from types and shapes.  Routed experts of one projection live in
one 3-D tensor whose slowest dimension is the expert index, so expert e is the
contiguous range [data_offset + e*nb2, data_offset + (e+1)*nb2).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.checks import check_header, check_regular_file

KINDS = (
    "attention", "norm", "embedding", "output", "router",
    "expert_gate", "expert_up", "expert_down", "expert_gate_up", "expert_bias",
    "shared_expert", "dense_ffn", "other",
)
# Kinds whose bytes belong to routed experts (and are split per expert).
EXPERT_KINDS = ("expert_gate", "expert_up", "expert_down", "expert_gate_up", "expert_bias")

# Architectures whose tensor naming has been checked against llama.cpp's loader.
KNOWN_MOE_ARCHS = ("qwen3moe", "qwen2moe", "llama", "olmoe", "deepseek2", "gpt-oss",
                   "glm4moe", "granitemoe")

_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
_EXPS = re.compile(r"^ffn_(gate|up|down|gate_up)_exps$")
_SHEXP = re.compile(r"^ffn_(gate_inp|gate|up|down)_shexp$")
GGUF_MAGIC = b"GGUF"

# ggml types newer than gguf-py 0.19 (id: name, block size, bytes per block), from
# ggml-common.h of the llama.cpp that llama-cpp-python 0.3.36 vendors.
_EXTRA_TYPES = {40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18)}


@dataclass
class TensorInfo:
    name: str
    layer: Optional[int]
    kind: str
    ggml_type: str
    shape: tuple  # ggml `ne` order: fastest dimension first
    n_bytes: int
    data_offset: int  # absolute byte offset in the file
    n_expert: int = 0  # routed-expert tensors: size of the expert (slowest) dimension
    per_expert_bytes: int = 0  # routed-expert tensors: bytes of one expert (nb2 for 3-D weights)

    @property
    def is_expert(self) -> bool:
        return self.kind in EXPERT_KINDS

    def expert_range(self, e: int) -> tuple:
        """Absolute [start, end) file byte range of expert e in this tensor."""
        if not self.is_expert or not 0 <= e < self.n_expert:
            raise IndexError(f"{self.name} has no expert {e}")
        start = self.data_offset + e * self.per_expert_bytes
        return start, start + self.per_expert_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class LayerInfo:
    index: int
    n_expert: int
    n_expert_used: int
    is_moe: bool
    expert_bytes: int  # all routed-expert bytes of the layer
    per_expert_bytes: int  # one expert: its gate/up/down (or gate_up/down) slices plus biases
    expert_tensors: list = field(default_factory=list)  # names
    has_shared_expert: bool = False
    n_bytes: int = 0  # every tensor of the layer

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Inventory:
    path: str
    file_size: int
    arch: str
    n_layer: int
    n_expert: int
    n_expert_used: int  # the largest per-layer value
    n_expert_used_per_layer: Optional[list]  # only when the file stores an array
    n_expert_shared: int
    n_embd: int
    expert_ff_length: Union[int, list, None]  # scalar, or per layer when it varies
    n_leading_dense: int
    dense_layers: list  # layers without routed experts (in an MoE model)
    has_shared_experts: bool
    n_head: Union[int, list]
    n_head_kv: Union[int, list]
    head_dim_k: int
    head_dim_v: int
    sliding_window: Optional[int]
    kv_bytes_per_token: int  # f16 K+V cache over all layers (MLA: compressed latent only)
    tensors: list
    layers: list
    total_bytes: int
    expert_bytes_total: int
    fingerprint: str
    metadata: dict = field(default_factory=dict)  # header KVs except tokenizer arrays

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0 and self.expert_bytes_total > 0

    @property
    def non_expert_bytes(self) -> int:
        return self.total_bytes - self.expert_bytes_total

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def layer_tensors(self, index: int) -> list:
        return [t for t in self.tensors if t.layer == index]

    def to_dict(self, with_tensors: bool = True) -> dict:
        d = {
            "path": self.path,
            "file_size": self.file_size,
            "arch": self.arch,
            "is_moe": self.is_moe,
            "n_layer": self.n_layer,
            "n_expert": self.n_expert,
            "n_expert_used": self.n_expert_used,
            "n_expert_used_per_layer": self.n_expert_used_per_layer,
            "n_expert_shared": self.n_expert_shared,
            "n_embd": self.n_embd,
            "expert_ff_length": self.expert_ff_length,
            "n_leading_dense": self.n_leading_dense,
            "dense_layers": self.dense_layers,
            "has_shared_experts": self.has_shared_experts,
            "n_head": self.n_head,
            "n_head_kv": self.n_head_kv,
            "head_dim_k": self.head_dim_k,
            "head_dim_v": self.head_dim_v,
            "sliding_window": self.sliding_window,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "total_bytes": self.total_bytes,
            "expert_bytes_total": self.expert_bytes_total,
            "non_expert_bytes": self.non_expert_bytes,
            "fingerprint": self.fingerprint,
            "layers": [layer.to_dict() for layer in self.layers],
        }
        if with_tensors:
            d["tensors"] = [t.to_dict() for t in self.tensors]
        return d


# ---------------------------------------------------------------------------
# Tensor naming


def classify(name: str) -> tuple:
    """(layer index or None, kind) of a tensor name."""
    m = _BLK.match(name)
    if m is None:
        stem = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
        if stem == "token_embd":
            return None, "embedding"
        if stem == "output":
            return None, "output"
        if stem.endswith("norm"):
            return None, "norm"
        return None, "other"
    layer, rest = int(m.group(1)), m.group(2)
    stem, _, suffix = rest.rpartition(".")
    if not stem:  # a name without a .weight/.bias suffix
        stem, suffix = rest, ""
    e = _EXPS.match(stem)
    if e:
        # Per-expert biases (gpt-oss) and per-expert scales ride along with the expert.
        return layer, ("expert_" + e.group(1)) if suffix == "weight" else "expert_bias"
    if _SHEXP.match(stem):
        return layer, "shared_expert"
    if stem in ("ffn_gate_inp", "exp_probs_b"):
        return layer, "router"
    if stem in ("ffn_gate", "ffn_up", "ffn_down", "ffn_gate_up"):
        return layer, "dense_ffn"
    if stem.endswith("norm") or "_norm" in stem:
        return layer, "norm"
    if stem.startswith("attn_"):
        return layer, "attention"
    return layer, "other"


# ---------------------------------------------------------------------------
# Reading


def _gguf():
    import gguf

    return gguf


# String arrays longer than this (vocabularies, merges) are skipped, not decoded.
_MAX_DECODED_STRINGS = 4096


def _open_reader(path: Path):
    """A gguf-py GGUFReader made fast enough for real headers.

    Stock GGUFReader builds one numpy view per array element: a 150k-token
    vocabulary plus merges takes ~10 s.  Here numeric arrays become one view and
    long string arrays are stepped over with struct, and no views of tensor data
    are built at all.
    """
    import struct

    import numpy as np

    gguf = _gguf()
    VT = gguf.GGUFValueType

    class HeaderReader(gguf.GGUFReader):
        # the vocabulary when long (stepped over, not decoded):
        # value offset -> _vocabulary_summary(...)
        vocabulary: dict

        def __init__(self, *args, **kwargs):
            self.vocabulary = {}
            super().__init__(*args, **kwargs)

        def _key_before(self, value_offs: int) -> bytes:
            """The key of the KV whose value starts at value_offs (after the u32 type)."""
            n = len(_TOKENS_KEY)
            start = value_offs - 4 - n
            if start < 8 or int.from_bytes(bytes(self.data[start - 8:start]), "little") != n:
                return b""
            return bytes(self.data[start:start + n])

        def _get_field_parts(self, orig_offs, raw_type):
            if VT(raw_type) != VT.ARRAY or self.byte_order == "S":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            offs = orig_offs + 12
            itype = VT(int(raw_itype[0]))
            count = int(alen[0])
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is not None:
                # contents() flattens all parts listed in data: one part holds them all.
                values = self._get(offs, nptype, count)
                if len(values) != count:
                    raise ValueError("array runs past the end of the file")
                return offs + int(values.nbytes) - orig_offs, [raw_itype, alen, values], [2], [VT.ARRAY, itype]
            if itype == VT.STRING and count > _MAX_DECODED_STRINGS:
                buf = memoryview(self.data)
                unpack = struct.Struct("<Q").unpack_from
                for _ in range(count):
                    offs += 8 + unpack(buf, offs)[0]
                if offs > len(buf):
                    raise ValueError("string array runs past the end of the file")
                if self._key_before(orig_offs) == _TOKENS_KEY:
                    self.vocabulary[orig_offs] = _vocabulary_summary(
                        bytes(buf[orig_offs + 12:offs]), count)
                return offs - orig_offs, [raw_itype, alen], [], [VT.ARRAY, itype]
            return super()._get_field_parts(orig_offs, raw_type)

        def _build_tensors(self, start_offs, fields):
            self.tensor_fields = fields  # keep the infos; never map tensor data

    return HeaderReader(path, "r")


def _check_file(path: Path) -> int:
    size = check_regular_file(path)  # before open(): a FIFO would block, /dev/zero never ends
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise HybridError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head[:4] != GGUF_MAGIC:
        what = "an empty file" if size == 0 else f"magic {head[:4]!r}, expected b'GGUF'"
        raise HybridError(f"{path} is not a GGUF file ({what})")
    if len(head) == 8:
        version = int.from_bytes(head[4:], "little")
        if version not in (2, 3) and int.from_bytes(head[4:], "big") not in (2, 3):
            raise HybridError(f"{path} has GGUF version {version}; only versions 2 and 3 are supported")
    return size


_TOKENS_KEY = b"tokenizer.ggml.tokens"
# The 256 byte tokens an SPM ("llama") vocabulary falls back to, as llama.cpp names them.
_SPM_BYTE_TOKENS = tuple(b"<0x%02X>" % b for b in range(256))


def _vocabulary_summary(packed: bytes, count: int) -> tuple:
    """(first repeat, byte tokens missing) of a packed GGUF string array (u64 length +
    bytes each): first repeat is (first id, repeated id, token) or None."""
    import struct

    unpack = struct.Struct("<Q").unpack_from
    seen: set = set()
    add = seen.add
    offs = 0
    for _ in range(count):
        n = unpack(packed, offs)[0]
        add(packed[offs + 8:offs + 8 + n])
        offs += 8 + n
    missing = [t for t in _SPM_BYTE_TOKENS if t not in seen]
    if len(seen) == count:
        return None, missing
    first: dict = {}
    offs = 0
    for i in range(count):
        n = unpack(packed, offs)[0]
        s = packed[offs + 8:offs + 8 + n]
        if s in first:
            return (first[s], i, s), missing
        first[s] = i
        offs += 8 + n
    return None, missing


def _check_vocabulary(path: Path, reader, metadata: dict) -> None:
    """Vocabularies llama.cpp aborts on: a repeated token (GGML_ASSERT while loading), an
    SPM vocabulary without its byte tokens (std::out_of_range, uncaught, when a prompt
    needs the byte fallback)."""
    gguf = _gguf()
    fld = reader.fields.get("tokenizer.ggml.tokens")
    if fld is None or fld.types[:2] != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]:
        return  # absent or mistyped: llama.cpp reports those itself
    if fld.data:
        packed = b"".join(len(fld.parts[i]).to_bytes(8, "little") + bytes(fld.parts[i]) for i in fld.data)
        dup, missing = _vocabulary_summary(packed, len(fld.data))
    else:
        value_offset = fld.offset + sum(int(p.nbytes) for p in fld.parts[:3])
        dup, missing = getattr(reader, "vocabulary", {}).get(value_offset, (None, []))
    if dup is not None:
        first, again, text = dup
        raise HybridError(f"{path}: tokenizer.ggml.tokens repeats token {text[:40]!r} "
                          f"(ids {first} and {again}); every token must be distinct")
    if metadata.get("tokenizer.ggml.model") == "llama" and missing:
        raise HybridError(f"{path}: the SPM ('llama') vocabulary lacks byte token "
                          f"{missing[0].decode()}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                          + "; llama.cpp needs all 256 (<0x00>..<0xFF>) for its byte fallback")


def _field_value(fld) -> Any:
    gguf = _gguf()
    if not fld.types:
        return None
    value = fld.contents()
    if fld.types[0] == gguf.GGUFValueType.ARRAY:
        return list(value)
    return value


def _per_layer(value, n_layer: int, default=0) -> list:
    if value is None:
        return [default] * n_layer
    if isinstance(value, list):
        return [int(v) for v in value] + [default] * max(0, n_layer - len(value))
    return [int(value)] * n_layer


def _scalar_or_list(values: list):
    if not values:
        return None
    return values[0] if all(v == values[0] for v in values) else values


def read_inventory(path: Union[str, os.PathLike]) -> Inventory:
    """Inventory of a GGUF model from its header; raises HybridError on bad input."""
    gguf = _gguf()
    path = Path(path)
    size = _check_file(path)
    try:
        reader = _open_reader(path)
    except Exception as exc:  # gguf-py raises ValueError/IndexError/... on cut headers
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if "alignment" in reason:  # gguf-py checks general.alignment while parsing
            raise HybridError(f"{path}: general.alignment must be a UINT32 power of two ({reason})") from None
        raise HybridError(f"{path} is truncated or corrupt: cannot parse the GGUF header ({reason})") from None

    metadata: dict = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if key.startswith("tokenizer.") and fld.types and fld.types[0] == gguf.GGUFValueType.ARRAY:
            continue  # vocabularies: large and irrelevant to placement
        try:
            metadata[key] = _field_value(fld)
        except Exception:  # an undecodable value does not stop the inventory
            metadata[key] = None
    arch = metadata.get("general.architecture")
    arch = arch if isinstance(arch, str) and arch else "unknown"

    def kv(name, default=None):
        return metadata.get(f"{arch}.{name}", default)

    tensors = []
    for fld in reader.tensor_fields:
        _, name_data, _, dims, raw_type, rel_offset = fld.parts
        name = bytes(name_data).decode("utf-8", errors="replace")
        type_name, block, type_size = _type_info(int(raw_type[0]), path, name)
        ne = tuple(int(d) for d in dims)
        if ne and ne[0] % block:
            raise HybridError(f"{path}: tensor {name} has rows of {ne[0]} values, not a multiple of "
                              f"the {type_name} block size ({block})")
        n_elem = 1
        for d in ne:
            n_elem *= d
        n_bytes = n_elem // block * type_size
        offset = int(reader.data_offset) + int(rel_offset[0])
        if offset + n_bytes > size:
            raise HybridError(
                f"{path} is truncated: tensor {name} needs bytes up to {offset + n_bytes} "
                f"but the file has {size}")
        layer, kind = classify(name)
        t = TensorInfo(name, layer, kind, type_name, ne, n_bytes, offset)
        if t.is_expert and ne:
            t.n_expert = ne[-1]  # expert index is the slowest dimension
            t.per_expert_bytes = n_bytes // ne[-1] if ne[-1] else 0
        tensors.append(t)

    # Bound every count and index before anything is sized from them.
    check_header(path, reader.fields, metadata, arch, tensors, int(reader.data_offset))
    _check_vocabulary(path, reader, metadata)
    if int(metadata.get("split.count") or 1) > 1:
        warnings.warn(f"{path.name} is shard {int(metadata.get('split.no') or 0) + 1} of "
                      f"{metadata['split.count']}: only this shard's tensors are listed", stacklevel=2)

    has_exps = any(t.is_expert for t in tensors)
    if has_exps and arch not in KNOWN_MOE_ARCHS:
        warnings.warn(f"architecture {arch!r} is not known to hybrid-gguf; "
                      f"reading its experts with the generic *_exps naming", stacklevel=2)

    block_count = int(kv("block_count", 0) or 0)
    seen = [t.layer for t in tensors if t.layer is not None]
    n_layer = max([block_count] + [i + 1 for i in seen])
    used = kv("expert_used_count")
    used_per_layer = _per_layer(used, n_layer)

    by_layer: dict = {}
    for t in tensors:
        by_layer.setdefault(t.layer, []).append(t)
    layers = []
    for i in range(n_layer):
        mine = by_layer.get(i, [])
        exps = [t for t in mine if t.is_expert]
        n_exp = max((t.n_expert for t in exps), default=0)
        layers.append(LayerInfo(
            index=i,
            n_expert=n_exp,
            n_expert_used=used_per_layer[i] if n_exp else 0,
            is_moe=n_exp > 0,
            expert_bytes=sum(t.n_bytes for t in exps),
            per_expert_bytes=sum(t.per_expert_bytes for t in exps),
            expert_tensors=[t.name for t in exps],
            has_shared_expert=any(t.kind == "shared_expert" for t in mine),
            n_bytes=sum(t.n_bytes for t in mine),
        ))

    n_expert = int(kv("expert_count", 0) or 0) or max((layer.n_expert for layer in layers), default=0)
    if not has_exps:
        n_expert = 0  # expert_count without expert tensors: nothing to place
    moe_layers = [layer for layer in layers if layer.is_moe]
    dense_layers = [layer.index for layer in layers if not layer.is_moe] if moe_layers else []
    lead = kv("leading_dense_block_count")
    if lead is None:
        lead = 0
        while moe_layers and lead < n_layer and not layers[lead].is_moe:
            lead += 1

    ff = kv("expert_feed_forward_length")
    if ff is None or ff == 0:
        ff = _scalar_or_list([_expert_width(tensors, layer.index) for layer in moe_layers])
    elif isinstance(ff, list):
        ff = _scalar_or_list([int(v) for v in ff])
    else:
        ff = int(ff)
    if not moe_layers:
        ff = None

    has_shexp = any(t.kind == "shared_expert" for t in tensors)
    n_shared = int(kv("expert_shared_count", 0) or 0) or (1 if has_shexp else 0)

    embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
    n_embd = int(kv("embedding_length", 0) or 0) or (embd.shape[0] if embd else 0)

    heads = _per_layer(kv("attention.head_count"), n_layer)
    heads_kv_raw = kv("attention.head_count_kv")
    heads_kv = heads if heads_kv_raw is None else _per_layer(heads_kv_raw, n_layer)
    h0 = max(heads, default=0)
    hd_k = int(kv("attention.key_length", 0) or 0) or (n_embd // h0 if h0 else 0)
    hd_v = int(kv("attention.value_length", 0) or 0) or (n_embd // h0 if h0 else 0)
    kv_per_token = 0
    # MLA (deepseek2 converted with key_length_mla): the cache holds only the
    # compressed latent + rope part as K (key_length per kv head), no separate V.
    mla = kv("attention.key_length_mla") is not None and kv("attention.kv_lora_rank") is not None
    for i in range(n_layer):
        per_head = hd_k if mla else hd_k + hd_v
        kv_per_token += 2 * per_head * heads_kv[i]  # f16: 2 bytes

    total = sum(t.n_bytes for t in tensors)
    expert_total = sum(t.n_bytes for t in tensors if t.is_expert)

    return Inventory(
        path=str(path),
        file_size=size,
        arch=arch,
        n_layer=n_layer,
        n_expert=n_expert,
        n_expert_used=max(used_per_layer, default=0) if n_expert else 0,
        n_expert_used_per_layer=used_per_layer if isinstance(used, list) else None,
        n_expert_shared=n_shared,
        n_embd=n_embd,
        expert_ff_length=ff,
        n_leading_dense=int(lead),
        dense_layers=dense_layers,
        has_shared_experts=has_shexp,
        n_head=_scalar_or_list(heads) if heads else 0,
        n_head_kv=_scalar_or_list(heads_kv) if heads_kv else 0,
        head_dim_k=hd_k,
        head_dim_v=hd_v,
        sliding_window=int(kv("attention.sliding_window")) if kv("attention.sliding_window") else None,
        kv_bytes_per_token=kv_per_token,
        tensors=tensors,
        layers=layers,
        total_bytes=total,
        expert_bytes_total=expert_total,
        fingerprint=_fingerprint(reader),
        metadata=metadata,
    )


def _type_info(raw: int, path: Path, tensor: str) -> tuple:
    """(name, block size, bytes per block) of a ggml type id."""
    gguf = _gguf()
    try:
        qtype = gguf.GGMLQuantizationType(raw)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return qtype.name, block, size
    except (ValueError, KeyError):
        pass
    if raw in _EXTRA_TYPES:
        return _EXTRA_TYPES[raw]
    raise HybridError(f"{path}: tensor {tensor} has unknown ggml type {raw}")


def _expert_width(tensors: list, layer: int) -> int:
    for t in tensors:
        if t.layer == layer and t.kind in ("expert_gate", "expert_up") and len(t.shape) == 3:
            return t.shape[1]
        if t.layer == layer and t.kind == "expert_gate_up" and len(t.shape) == 3:
            return t.shape[1] // 2
    for t in tensors:
        if t.layer == layer and t.kind == "expert_down" and len(t.shape) == 3:
            return t.shape[0]
    return 0


def _fingerprint(reader) -> str:
    """sha256 of the whole header: every key/value and the tensor table (names,
    types, shapes, offsets), i.e. the file bytes before the tensor data."""
    return hashlib.sha256(reader.data[: int(reader.data_offset)].tobytes()).hexdigest()
