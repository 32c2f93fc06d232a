"""Bytes on each device for a placement: weights by class, hot packs, KV cache, compute
buffers, the op-offload scratch copy and a safety margin.

Weights and the KV cache are computed exactly from the inventory, the way llama.cpp
allocates them (CUDA pads quantized rows and aligns tensors to 128 bytes; the KV cache
has n_ctx rounded up to 256 cells). The compute buffer is the one number llama.cpp only
knows after building the graph: llama/dry_run.py asks llama.cpp itself with a no-alloc
dry run (header only, milliseconds) and the caller passes the number in
(MemoryOptions.compute_bytes); `estimate_compute_bytes()` is the analytic fallback,
fitted to ~800 such dry runs (median error ~0, 90% within 11%). Nothing here imports
llama_cpp.

Every device is named as llama.cpp names its buffers: "CPU" for host memory (CPU,
CPU_Mapped, CUDA_Host, CPU_REPACK buffers all count as "CPU"), "CUDA0", ... for GPUs;
"GPU" is a stand-in for the first GPU when the real name is not known.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Sequence

from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import EXPERT_KINDS
from hybrid_gguf.planning.placement import EXPERT_TENSOR_RE, PACK_AUTO, TensorPlacement

MIB = 1024 * 1024
CPU = "CPU"

# ggml alignment and CUDA's row padding for quantized matrices (MATRIX_ROW_PADDING).
CPU_ALIGN = 32
GPU_ALIGN = 128
CUDA_ROW_PAD = 512
KV_CELL_PAD = 256  # llama.cpp rounds the KV cache size up to a multiple of 256 cells

# (bytes per block, elements per block) of the KV cache types llama.cpp accepts.
CACHE_TYPES = {
    "f32": (4, 1), "f16": (2, 1), "bf16": (2, 1),
    "q8_0": (34, 32), "q4_0": (18, 32), "q4_1": (20, 32),
    "q5_0": (22, 32), "q5_1": (24, 32), "iq4_nl": (18, 32),
}
# ggml_type ids, for llama_cpp.Llama(type_k=..., type_v=...)
CACHE_TYPE_IDS = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7,
                  "q8_0": 8, "iq4_nl": 20, "bf16": 30}

# Quantized ggml types: everything but these get CUDA's row padding.
_UNQUANTIZED = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}
_INPUT_TENSOR_RE = re.compile(r"^(token_embd|position_embd|token_types|per_layer_token_embd)\.")
_EXPERT_RE = re.compile(EXPERT_TENSOR_RE)

WEIGHT_CLASSES = ("attention", "norm", "embedding", "output", "router", "shared_expert",
                  "dense_ffn", "experts", "other")


def _align(n: int, a: int) -> int:
    return (int(n) + a - 1) // a * a


def is_host(device: str) -> bool:
    """A buffer or device in host memory: the CPU's, a GPU's pinned one (CUDA_Host) or the one
    a GPU reads in place (CUDA0_ZeroCopy, `cold: gpu`)."""
    low = device.lower()
    return low == "cpu" or low.startswith("cpu_") or low.endswith("_host") or low.endswith("_zerocopy")


def device_of_buffer(buffer_name: str) -> str:
    """The device a llama.cpp buffer name belongs to ("CPU_Mapped" -> "CPU")."""
    return CPU if is_host(buffer_name) else buffer_name


def weight_class(kind: str) -> str:
    return "experts" if kind in EXPERT_KINDS else (kind if kind in WEIGHT_CLASSES else "other")


# --- tensor sizes ---------------------------------------------------------------------


def gpu_alloc_bytes(t, n_expert: Optional[int] = None) -> int:
    """CUDA buffer bytes of a tensor (or of its first n_expert experts, for a hot pack)."""
    n = int(t.n_bytes) if n_expert is None else int(t.per_expert_bytes) * int(n_expert)
    if t.ggml_type not in _UNQUANTIZED and t.shape and t.shape[0] % CUDA_ROW_PAD:
        # ggml_backend_cuda_buffer_type_get_alloc_size: one padding row per tensor
        n += _row_bytes(t, CUDA_ROW_PAD - t.shape[0] % CUDA_ROW_PAD)
    return _align(n, GPU_ALIGN)


def cpu_alloc_bytes(t) -> int:
    return _align(int(t.n_bytes), CPU_ALIGN)


def _row_bytes(t, n_elements: int) -> int:
    row = t.n_bytes
    for d in t.shape[1:]:
        row //= max(int(d), 1)
    return row * n_elements // max(int(t.shape[0]), 1)


def vocab_size(inv) -> int:
    for t in inv.tensors:
        if t.name in ("token_embd.weight", "output.weight") and len(t.shape) >= 2:
            return int(t.shape[1])
    return int(inv.metadata.get(f"{inv.arch}.vocab_size") or 32000)


# --- KV cache -------------------------------------------------------------------------


def kv_cells(n_ctx: int) -> int:
    return _align(max(int(n_ctx), 1), KV_CELL_PAD)


def cache_row_bytes(n_elements: int, cache_type: str) -> int:
    try:
        block_bytes, block = CACHE_TYPES[cache_type.lower()]
    except KeyError:
        raise HybridError(f"unknown KV cache type {cache_type!r}; known: {', '.join(CACHE_TYPES)}") from None
    if n_elements % block:
        raise HybridError(f"KV cache type {cache_type} needs rows that are a multiple of {block} elements, "
                          f"this model has {n_elements}")
    return n_elements // block * block_bytes


def kv_bytes_per_layer(inv, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> list:
    """KV cache bytes of each layer for n_ctx (rounded up to 256 cells).

    SWA layers are counted at full size: llama-cpp-python builds contexts with
    swa_full (its log says "using full-size SWA cache"). MLA models (deepseek2) cache only
    the compressed latent as K.
    """
    cells = kv_cells(n_ctx)
    heads_kv = inv.n_head_kv if isinstance(inv.n_head_kv, list) else [inv.n_head_kv] * inv.n_layer
    mla = inv.metadata.get(f"{inv.arch}.attention.kv_lora_rank") is not None and \
        inv.metadata.get(f"{inv.arch}.attention.key_length_mla") is not None
    out = []
    for i in range(inv.n_layer):
        hkv = int(heads_kv[i]) if i < len(heads_kv) else 0
        if hkv == 0:
            out.append(0)
            continue
        k = cache_row_bytes(hkv * inv.head_dim_k, type_k)
        v = 0 if mla else cache_row_bytes(hkv * inv.head_dim_v, type_v)
        out.append(cells * (k + v))
    return out


def kv_cache_bytes(inv, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
    return sum(kv_bytes_per_layer(inv, n_ctx, type_k, type_v))


# --- compute buffer ----------------------------------------------------------------------


def estimate_compute_bytes(inv, n_ctx: int, n_ubatch: int = 512, flash_attn: bool = False) -> int:
    """Analytic size of llama.cpp's compute buffer for one ubatch (the largest of the
    prompt and the one-token graph), when the whole model runs on one device.

    The buffer is the high-water mark of the graph allocator: persistent inputs (the KQ
    mask) plus the largest of four phases' live tensors. Coefficients are bytes per token,
    fitted to ~800 no-alloc dry runs of llama.cpp over random shapes (vocab 259..152k,
    n_embd 64..2048, 1..32 heads, 4..128 experts); 90% are within 11%, the worst case
    under-estimates by 23%. Prefer llama/dry_run.py's measurement when llama.cpp is at hand.
    """
    T = max(1, min(int(n_ubatch), kv_cells(n_ctx)))
    C = kv_cells(n_ctx)
    E = int(inv.n_embd or 0)
    H = int(max(inv.n_head) if isinstance(inv.n_head, list) else inv.n_head or 0)
    H_kv = int(max(inv.n_head_kv) if isinstance(inv.n_head_kv, list) else inv.n_head_kv or 0)
    Hd, Hkvd = H * int(inv.head_dim_k or 0), H_kv * int(inv.head_dim_v or 0)
    V = vocab_size(inv)
    k = int(inv.n_expert_used or 0)
    ff = inv.expert_ff_length
    ff = int(max(ff) if isinstance(ff, list) else ff or 0)
    n_exp = int(inv.n_expert or 0)
    ff_sh = _shared_ff(inv)
    ff_dense = _dense_ff(inv)
    n_mask = 2 if inv.sliding_window else 1  # SWA models keep a second mask
    mask = (2 if flash_attn else 4) * C * T * n_mask
    kq = 0 if flash_attn else 4 * C * T * H  # KQ scores; softmax runs in place
    v_idx = 0 if flash_attn else Hkvd  # transposed V cache: one i64 index per element
    phases = [
        mask + kq + T * (12 * E + 8 * Hd + 4 * v_idx + 6 * Hkvd + 64),  # attention
        T * (4 * V + 11 * E + 320),  # output logits
    ]
    if k and ff:
        phases.append(mask + T * (12 * k * ff + 8 * E + 16 * n_exp))  # gate/up/swiglu
        phases.append(mask + T * (6 * k * ff + 13 * E + 5 * k * E))  # down + weighting
    if ff_sh:
        phases.append(mask + T * (12 * ff_sh + 14 * E + 400))  # shared expert
    if ff_dense:
        phases.append(mask + T * (12 * ff_dense + 8 * E + 32))  # dense FFN layers
    return int(max(phases))


def _shared_ff(inv) -> int:
    for t in inv.tensors:
        if t.kind == "shared_expert" and t.name.endswith("ffn_up_shexp.weight") and len(t.shape) >= 2:
            return int(t.shape[1])
    return 0


def _dense_ff(inv) -> int:
    for t in inv.tensors:
        if t.kind == "dense_ffn" and t.name.endswith("ffn_up.weight") and len(t.shape) >= 2:
            return int(t.shape[1])
    return 0


# --- placement -> bytes per device ------------------------------------------------------


@dataclass
class DeviceMemory:
    device: str
    weights: dict = field(default_factory=dict)  # weight class -> bytes
    hot_pack: int = 0
    kv: int = 0
    compute: int = 0
    offload_scratch: int = 0
    output: int = 0  # logits buffer (host)
    margin: int = 0

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        return (self.weight_bytes + self.hot_pack + self.kv + self.compute + self.offload_scratch
                + self.output + self.margin)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weight_bytes"] = self.weight_bytes
        d["total"] = self.total
        return d


@dataclass
class MemoryPrediction:
    devices: dict  # name -> DeviceMemory
    n_ctx: int
    cpu_mapped_span: int = 0  # what llama.cpp logs as the CPU_Mapped model buffer (mmap)
    notes: list = field(default_factory=list)

    def device(self, name: str) -> DeviceMemory:
        return self.devices.setdefault(name, DeviceMemory(name))

    @property
    def gpu_bytes(self) -> int:
        return sum(d.total for n, d in self.devices.items() if not is_host(n))

    @property
    def host_bytes(self) -> int:
        return sum(d.total for n, d in self.devices.items() if is_host(n))

    def to_dict(self) -> dict:
        return {"n_ctx": self.n_ctx, "gpu_bytes": self.gpu_bytes, "host_bytes": self.host_bytes,
                "devices": {n: d.to_dict() for n, d in self.devices.items()}}


@dataclass(frozen=True)
class MemoryOptions:
    n_ctx: int
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    op_offload: bool = True
    use_mmap: bool = True
    # Compute buffer of one GPU (without op-offload scratch): measured (dry run or a real
    # load's log) if known, else estimate_compute_bytes x compute_factor.
    compute_bytes: Optional[int] = None
    compute_factor: float = 1.25
    # Safety margin per GPU: margin_bytes + margin_fraction x that GPU's other bytes.
    margin_bytes: int = 64 * MIB
    margin_fraction: float = 0.02

    def __post_init__(self) -> None:
        if self.n_ctx <= 0:
            raise HybridError(f"context length must be positive, got {self.n_ctx}")
        if self.n_ubatch <= 0:
            raise HybridError(f"n_ubatch must be positive, got {self.n_ubatch}")
        check_cache_types(self.type_k, self.type_v, self.flash_attn)
        if self.margin_bytes < 0 or self.margin_fraction < 0 or self.compute_factor <= 0:
            raise HybridError("safety margins must not be negative")

    def gpu_compute_bytes(self, inv) -> int:
        if self.compute_bytes is not None:
            return int(self.compute_bytes)
        est = estimate_compute_bytes(inv, self.n_ctx, self.n_ubatch, self.flash_attn)
        return int(est * self.compute_factor)


def cache_type(name: str, option: str = "") -> str:
    """A KV cache type as CACHE_TYPES spells it (any case given); `option` names where it came
    from in the error."""
    value = name.lower() if isinstance(name, str) else None
    if value not in CACHE_TYPES:
        where = f"{option}: " if option else ""
        raise HybridError(f"{where}unknown KV cache type {name!r}; known: {', '.join(CACHE_TYPES)}")
    return value


def check_cache_types(type_k: str, type_v: str, flash_attn: bool) -> None:
    """KV cache types llama.cpp takes: known ones, and a quantized V only with flash attention."""
    cache_type(type_k)
    if cache_type(type_v) not in ("f32", "f16", "bf16") and not flash_attn:
        raise HybridError(f"a quantized V cache ({type_v}) needs flash attention (-fa/--flash-attn; llama.cpp "
                          "refuses it without)")


def cache_kwargs(type_k: str, type_v: str) -> dict:
    """The llama_cpp.Llama arguments of the KV cache types (ggml type ids)."""
    return {"type_k": CACHE_TYPE_IDS[cache_type(type_k)], "type_v": CACHE_TYPE_IDS[cache_type(type_v)]}


def batch_kwargs(n_ubatch: int, flash_attn: bool) -> dict:
    """The llama_cpp.Llama arguments of a prompt micro-batch and flash attention: the logical
    batch is the ubatch, at least 512 (llama-cpp-python cuts both to the context)."""
    return {"n_ubatch": int(n_ubatch), "n_batch": max(int(n_ubatch), 512), "flash_attn": bool(flash_attn)}


def layer_devices(n_layer: int, gpus: Sequence[str], tensor_split: Optional[Sequence[float]] = None) -> list:
    """Device of each layer (index n_layer = the output layer) under llama.cpp's layer
    split with all layers offloaded: layer i goes to the first GPU j whose cumulative
    share exceeds i / (n_layer + 1)."""
    if not gpus:
        return [CPU] * (n_layer + 1)
    shares = list(tensor_split) if tensor_split else [1.0] * len(gpus)
    if len(shares) != len(gpus) or any(s < 0 for s in shares) or sum(shares) <= 0:
        raise HybridError(f"tensor_split {shares} does not fit {len(gpus)} GPUs")
    total, cum, acc = sum(shares), [], 0.0
    for s in shares:
        acc += s / total
        cum.append(acc)
    out = []
    for i in range(n_layer + 1):
        x = i / (n_layer + 1)
        out.append(next((gpus[j] for j, c in enumerate(cum) if c > x), gpus[-1]))
    return out


def predict_memory(inv, placement: Optional[TensorPlacement], opts: MemoryOptions,
                   hot: Optional[Mapping[int, Sequence[int]]] = None,
                   gpus: Sequence[str] = ("GPU",), hot_device: Optional[str] = None,
                   tensor_split: Optional[Sequence[float]] = None) -> MemoryPrediction:
    """Bytes per device of a load: whole-tensor `placement` rules (first match wins, as
    llama.cpp applies them) + per-layer `hot` packs on `hot_device` (None: the first GPU;
    PACK_AUTO: each layer's pack on the GPU of its layer, as the patch's `buft=auto`).

    gpus=() predicts a CPU-only load (n_gpu_layers ignored). A placement with
    n_gpu_layers == 0 keeps everything on the CPU too.
    """
    hot = {int(k): list(v) for k, v in (hot or {}).items() if len(v)}
    gpus = list(gpus)
    if placement is not None and placement.n_gpu_layers == 0:
        gpus = []
    if placement is not None and placement.n_gpu_layers not in (-1, 0) and \
            placement.n_gpu_layers < inv.n_layer + 1:
        raise HybridError("predict_memory handles all layers or no layers on the GPU "
                          f"(n_gpu_layers={placement.n_gpu_layers})")
    pred = MemoryPrediction({}, opts.n_ctx)
    cpu = pred.device(CPU)
    ldev = layer_devices(inv.n_layer, gpus, tensor_split)
    names = {t.name for t in inv.tensors}
    host_experts = []  # expert tensors left in host memory (op-offload streams them)
    cpu_ranges = []

    def add(dev: str, cls: str, n: int) -> None:
        d = pred.device(dev)
        d.weights[cls] = d.weights.get(cls, 0) + int(n)

    for t in inv.tensors:
        cls = weight_class(t.kind)
        target = placement.target_for(t.name) if placement is not None else None
        if not gpus:
            dev = CPU
        elif target is not None:
            dev = CPU if is_host(target) else _gpu_name(target, gpus)
        elif _INPUT_TENSOR_RE.match(t.name):
            dev = CPU  # llama.cpp keeps input embeddings in host memory
        else:
            dev = ldev[t.layer] if t.layer is not None else ldev[-1]
        if is_host(dev):
            add(CPU, cls, t.n_bytes)
            cpu_ranges.append((t.data_offset, t.data_offset + t.n_bytes))
            if t.is_expert and gpus:
                host_experts.append(t)
        else:
            add(dev, cls, gpu_alloc_bytes(t))
    if gpus and "output.weight" not in names:
        # tied embeddings: llama.cpp duplicates token_embd as the output matrix on the GPU
        for t in inv.tensors:
            if t.name == "token_embd.weight":
                add(ldev[-1], "output", gpu_alloc_bytes(t))
    if cpu_ranges:
        pred.cpu_mapped_span = max(e for _, e in cpu_ranges) - min(s for s, _ in cpu_ranges)

    # hot packs: the hot experts' slices of every expert tensor + three F32 lookup tables
    if hot:
        by_layer = {}
        for t in inv.tensors:
            if t.is_expert and t.layer is not None:
                by_layer.setdefault(t.layer, []).append(t)
        for layer, experts in hot.items():
            if not gpus:
                pack_dev = CPU
            elif hot_device == PACK_AUTO:
                pack_dev = ldev[layer]
            else:
                pack_dev = _gpu_name(hot_device or gpus[0], gpus)
            tensors = by_layer.get(layer, [])
            if not tensors:
                raise HybridError(f"hot set names layer {layer}, which has no routed experts")
            n_exp = max(t.n_expert for t in tensors)
            total = 0
            for t in tensors:
                total += gpu_alloc_bytes(t, len(experts)) if not is_host(pack_dev) else \
                    _align(t.per_expert_bytes * len(experts), CPU_ALIGN)
            total += 3 * _align(4 * n_exp, GPU_ALIGN if not is_host(pack_dev) else CPU_ALIGN)
            pred.device(pack_dev).hot_pack += total

    # KV cache follows its layer's device (offload_kqv)
    for i, n in enumerate(kv_bytes_per_layer(inv, opts.n_ctx, opts.type_k, opts.type_v)):
        pred.device(ldev[i]).kv += n

    if gpus:
        compute = opts.gpu_compute_bytes(inv)
        for g in dict.fromkeys(ldev):
            pred.device(g).compute += compute
        if host_experts and opts.op_offload and opts.n_ubatch >= 32:
            # prompt batches copy a host expert tensor into VRAM scratch to run it there
            scratch = max(gpu_alloc_bytes(t) for t in host_experts)
            pred.device(ldev[0]).offload_scratch += scratch
        cpu.compute += 4 * inv.n_embd * min(opts.n_ubatch, kv_cells(opts.n_ctx)) * 2
        for g in dict.fromkeys(ldev):
            d = pred.device(g)
            d.margin = int(opts.margin_bytes + opts.margin_fraction * (d.total - d.margin))
    else:
        cpu.compute += int(opts.compute_bytes if opts.compute_bytes is not None else
                           estimate_compute_bytes(inv, opts.n_ctx, opts.n_ubatch, opts.flash_attn))
    cpu.output = 4 * vocab_size(inv)  # logits of the last token, one sequence
    return pred


def _gpu_name(target: str, gpus: Sequence[str]) -> str:
    """A rule target as one of our GPU names ("GPU" means the first GPU)."""
    if target in gpus:
        return target
    if target.lower() == "gpu":
        return gpus[0]
    for g in gpus:
        if g.lower() == target.lower():
            return g
    return target


# --- checking predictions against llama.cpp ------------------------------------------------


@dataclass
class Comparison:
    kind: str  # model | kv | compute | hot_pack
    device: str
    predicted: int
    reported: int

    @property
    def error(self) -> float:
        """Relative error of the prediction (positive = over-estimate)."""
        return (self.predicted - self.reported) / self.reported if self.reported else \
            (0.0 if self.predicted == 0 else float("inf"))


_HOT_PACK_RE = re.compile(r"hot-pack buffer size\s*=\s*([0-9.]+) MiB")
_HOT_PACK_BUF_RE = re.compile(r"layers,\s+(\S+) hot-pack buffer size")


def hot_pack_reported(lines: Sequence[str]) -> dict:
    """{device: bytes} from the patched loader's "hybrid: ... hot-pack buffer size" line."""
    out: dict = {}
    for line in lines:
        m = _HOT_PACK_RE.search(line)
        if m:
            b = _HOT_PACK_BUF_RE.search(line)
            dev = device_of_buffer(b.group(1)) if b else "GPU"
            out[dev] = out.get(dev, 0) + round(float(m.group(1)) * MIB)
    return out


def compare_with_report(pred: MemoryPrediction, report, lines: Sequence[str] = ()) -> list:
    """Prediction vs llama.cpp's logged buffer sizes (a llama_log.BufferReport), per kind
    and device. Host model bytes are compared with the mapped span when the report has a
    CPU_Mapped buffer (llama.cpp logs the mapped range, not the resident bytes)."""
    out = []
    for kind, sizes in (("model", report.model), ("kv", report.kv), ("compute", report.compute)):
        per_dev: dict = {}
        mapped = False
        for name, n in sizes.items():
            dev = device_of_buffer(name)
            per_dev[dev] = per_dev.get(dev, 0) + n
            mapped |= kind == "model" and name.endswith("_Mapped")
        for dev, reported in per_dev.items():
            d = pred.devices.get(dev) or pred.devices.get("GPU") or DeviceMemory(dev)
            if kind == "model":
                value = pred.cpu_mapped_span if (is_host(dev) and mapped) else d.weight_bytes
            elif kind == "kv":
                value = d.kv
            else:
                value = d.compute + (d.offload_scratch if not is_host(dev) else 0)
            out.append(Comparison(kind, dev, int(value), int(reported)))
    for dev, reported in hot_pack_reported(lines).items():
        d = pred.devices.get(dev) or DeviceMemory(dev)
        out.append(Comparison("hot_pack", dev, d.hot_pack, reported))
    return out
