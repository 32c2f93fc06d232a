"""Random-weight Mixture-of-Experts GGUF files that stock llama.cpp loads.

The files use the real tensor layout of each architecture (qwen3moe, qwen2moe,
Mixtral-style llama, gpt-oss, plus a dense llama for bad-input tests) so the
inventory, placement and routing code see what they would see on a real model.

Routing skew is designed in, not hoped for.  Every token embedding shares one
direction `u`; each router row is `beta_e * u + noise_e` with the noise orthogonal
to `u`.  After RMS-norm the `u` component of the hidden state is nearly constant,
so expert e gets a fixed logit offset `-zipf * ln(1 + rank_e)` (Zipf-like selection
frequencies) plus token-dependent noise of standard deviation `router_noise`.
Attention and expert outputs are scaled down so they do not wash out the shared
direction in deeper layers.  The per-layer ranking is stored in the file.
The output rows of <unk>, <s> and </s> point against `u`, so sampling never picks
them and test generations always run to their token limit.

Metadata written (all under `hybrid_gguf.synth.`):
  popularity  int32 array, n_layer * n_expert, row-major: row l lists layer l's
              expert ids from most to least popular (designed rank order)
  zipf        float32, the Zipf exponent s (0 = uniform)
  seed        uint32
  spec        JSON string of the SynthSpec
  version     uint32, generator version (bumped when the output changes)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from hybrid_gguf.atomic import publish
from hybrid_gguf.errors import HybridError

SYNTH_VERSION = 2
KEY_PREFIX = "hybrid_gguf.synth."
KEY_POPULARITY = KEY_PREFIX + "popularity"
KEY_ZIPF = KEY_PREFIX + "zipf"
KEY_SEED = KEY_PREFIX + "seed"
KEY_SPEC = KEY_PREFIX + "spec"
KEY_VERSION = KEY_PREFIX + "version"

# SPM byte tokenizer: <unk>, <s>, </s> and one token per byte.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = 3 + 256

ARCHS = ("qwen3moe", "qwen2moe", "llama", "gpt-oss")
WEIGHT_TYPES = ("F32", "F16", "Q8_0", "Q4_K")

# Cosine between every embedding row and the shared direction u.
_RHO = 0.8
# Scale of attention-output and expert-down projections relative to a unit map:
# small, so the residual stream stays dominated by the embedding (keeps the skew).
_OUT_SCALE = 0.1
# Logit given to <unk>/<s>/</s> so sampling never ends a test generation early.
_SPECIAL_LOGIT = -30.0


@dataclass(frozen=True)
class SynthSpec:
    """Shape and content of a synthetic model.

    n_expert == 0 makes a dense model (arch "llama" only).  For "llama" the expert
    width is written as feed_forward_length, as Mixtral GGUFs do.  vocab is fixed:
    the 259-token SPM byte tokenizer.
    """

    arch: str = "qwen3moe"
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 32
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 128
    n_ff_shared: int = 0  # shared-expert width (qwen2moe); 0 means n_ff_exp
    n_ff_dense: int = 256  # FFN width of a dense (n_expert == 0) model
    n_ctx_train: int = 4096
    weight_type: str = "F32"
    zipf: float = 1.0
    router_noise: float = 1.0  # std of the token-dependent router logit noise
    sliding_window: int = 128  # gpt-oss only
    seed: int = 0
    # a routing preset (routing_process.PRESETS) that a patched backend replays instead of
    # the router's choice; "" keeps the weights' own routing
    routing: str = ""

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def shared_ff(self) -> int:
        return self.n_ff_shared or self.n_ff_exp

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise HybridError(f"invalid synthetic model spec: {msg}")

        if self.arch not in ARCHS:
            bad(f"arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.weight_type not in WEIGHT_TYPES:
            bad(f"weight_type {self.weight_type!r} is not one of {', '.join(WEIGHT_TYPES)}")
        for name in ("n_layer", "n_embd", "n_head", "n_head_kv", "head_dim", "n_ctx_train"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive")
        if self.n_head % self.n_head_kv:
            bad("n_head must be a multiple of n_head_kv")
        if self.head_dim % 2:
            bad("head_dim must be even (RoPE)")
        if self.n_expert < 0 or self.n_expert_used < 0:
            bad("expert counts must not be negative")
        if self.is_moe:
            if not 0 < self.n_expert_used <= self.n_expert:
                bad("need 0 < n_expert_used <= n_expert")
            if self.n_expert > 512:
                bad("llama.cpp supports at most 512 experts")
            if self.n_ff_exp <= 0:
                bad("n_ff_exp must be positive")
        elif self.arch != "llama":
            bad(f"a dense model (n_expert=0) must use arch 'llama', not {self.arch!r}")
        if self.arch == "qwen2moe" and self.head_dim * self.n_head != self.n_embd:
            bad("qwen2moe needs head_dim * n_head == n_embd")
        if self.zipf < 0 or self.router_noise < 0:
            bad("zipf and router_noise must not be negative")
        if self.routing:
            from hybrid_gguf.routing.process import preset as routing_preset

            if not self.is_moe:
                bad("a routing preset needs routed experts")
            routing_preset(self.routing)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["routing"]:
            del d["routing"]  # models without a preset keep the keys (and files) they had
        return d

    def key(self) -> str:
        """Stable hash of everything that determines the file's bytes."""
        text = json.dumps({"spec": self.to_dict(), "version": SYNTH_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


PRESETS: dict[str, SynthSpec] = {
    # Tests: a few MB, loads in milliseconds.
    "tiny": SynthSpec(),
    "tiny-qwen2moe": SynthSpec(arch="qwen2moe", n_ff_shared=256),
    "tiny-mixtral": SynthSpec(arch="llama"),
    "tiny-gpt-oss": SynthSpec(arch="gpt-oss", n_head=4, n_head_kv=2, head_dim=32),
    "tiny-dense": SynthSpec(arch="llama", n_expert=0, n_expert_used=0),
    # Benchmarks on a small machine: tens of MB, enough experts for skew to matter.
    "small": SynthSpec(n_layer=8, n_embd=256, n_head=8, n_head_kv=2, head_dim=32,
                       n_expert=32, n_expert_used=4, n_ff_exp=256, weight_type="Q8_0"),
    # Shapes of Qwen3-30B-A3B (48 layers, 128 experts top-8, width 768).
    "qwen3-30b-a3b-like": SynthSpec(n_layer=48, n_embd=2048, n_head=32, n_head_kv=4,
                                    head_dim=128, n_expert=128, n_expert_used=8,
                                    n_ff_exp=768, n_ctx_train=32768, weight_type="Q8_0"),
    # gpt-oss-20b's expert geometry (24 layers, 32 experts top-4, width 2880, here 2816 so
    # that Q4_K rows fit) on the qwen3moe graph: a bench model that the real gpt-oss-20b
    # traces of tests/data/routing can drive (bench --routing trace:FILE)
    "gpt-oss-20b-shaped": SynthSpec(n_layer=24, n_embd=2816, n_head=64, n_head_kv=8, head_dim=64,
                                    n_expert=32, n_expert_used=4, n_ff_exp=2816, n_ctx_train=32768,
                                    weight_type="Q8_0"),
    # Shapes of Mixtral-8x7B (32 layers, 8 experts top-2, width 14336): few, large experts.
    "mixtral-8x7b-like": SynthSpec(arch="llama", n_layer=32, n_embd=4096, n_head=32, n_head_kv=8,
                                   head_dim=128, n_expert=8, n_expert_used=2, n_ff_exp=14336,
                                   n_ctx_train=32768, weight_type="Q8_0"),
}


def preset(name: str, **overrides) -> SynthSpec:
    """A preset spec with fields replaced by `overrides`."""
    if name not in PRESETS:
        raise HybridError(f"unknown synthetic preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------
# Designed routing


def popularity(spec: SynthSpec) -> np.ndarray:
    """(n_layer, n_expert) int32: row l = layer l's expert ids, most popular first."""
    if not spec.is_moe:
        return np.zeros((spec.n_layer, 0), dtype=np.int32)
    rng = _rng(spec, "popularity")
    return np.stack([rng.permutation(spec.n_expert) for _ in range(spec.n_layer)]).astype(np.int32)


def designed_logit_offsets(spec: SynthSpec) -> np.ndarray:
    """(n_layer, n_expert) router logit offset of each expert: -zipf*ln(1+rank), centred."""
    pop = popularity(spec)
    offsets = np.zeros(pop.shape, dtype=np.float64)
    if not spec.is_moe:
        return offsets
    by_rank = -spec.zipf * np.log1p(np.arange(spec.n_expert))
    by_rank -= by_rank.mean()
    for layer in range(spec.n_layer):
        offsets[layer, pop[layer]] = by_rank
    return offsets


def read_popularity(path: Union[str, os.PathLike]) -> Optional[np.ndarray]:
    """The (n_layer, n_expert) popularity table of a synthetic file, or None."""
    from hybrid_gguf.header.inventory import read_inventory  # its header reader is fast on real vocabularies

    meta = read_inventory(path).metadata
    if meta.get(KEY_POPULARITY) is None or meta.get(KEY_SPEC) is None:
        return None
    spec = json.loads(meta[KEY_SPEC])
    flat = np.asarray(meta[KEY_POPULARITY], dtype=np.int32)
    return flat.reshape(spec["n_layer"], spec["n_expert"])


# ---------------------------------------------------------------------------
# Tensor plan


@dataclass
class _Tensor:
    name: str
    ne: tuple  # ggml order (fastest first)
    qtype: str  # F32 / F16 / Q8_0 (Q4_K only in zero-data files)
    make: Callable[[int], np.ndarray]  # float32 data of chunk i along the slowest dim
    n_chunks: int = 1


def _rng(spec: SynthSpec, name: str) -> np.random.Generator:
    # Seed per tensor name so the stream does not depend on generation order.
    return np.random.default_rng([spec.seed, zlib.crc32(name.encode())])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _shared_direction(spec: SynthSpec) -> np.ndarray:
    return _unit(_rng(spec, "shared-direction").standard_normal(spec.n_embd))


def _orthogonal_noise(rng, shape, u: np.ndarray) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    return x - np.outer(x @ u, u).astype(np.float32).reshape(x.shape)


def _plan(spec: SynthSpec, zero_data: bool = False) -> list:
    """All tensors of the model in file order, each with a chunked data maker."""
    D, H, Hkv, hd = spec.n_embd, spec.n_head, spec.n_head_kv, spec.head_dim
    E, F, V = spec.n_expert, spec.n_ff_exp, VOCAB_SIZE
    u = _shared_direction(spec)
    offsets = designed_logit_offsets(spec)
    big = spec.weight_type
    if big == "Q4_K" and not zero_data:
        big = _q4k_source_type(spec)  # llama.cpp's quantizer makes the Q4_K data afterwards
    plan: list = []

    def add(name, ne, make, qtype=None, n_chunks=1):
        ne = tuple(int(x) for x in ne)
        if qtype is None:
            qtype = big if len(ne) >= 2 else "F32"
        # Quant types need rows of whole blocks; fall back as llama-quantize does.
        if qtype == "Q4_K" and ne[0] % 256:
            qtype = "Q8_0"
        if qtype == "Q8_0" and ne[0] % 32:
            qtype = "F16"
        plan.append(_Tensor(name, ne, qtype, make, n_chunks))

    def const(ne, value):
        return lambda _: np.full(tuple(reversed(ne)), value, dtype=np.float32)

    def w(name, ne, std, qtype=None):
        # 3-D tensors are made one expert at a time, each from its own seed, so
        # experts can be generated in parallel and never all sit in memory.
        shape = tuple(reversed(ne))
        if len(shape) == 3:
            def make(e):
                rng = _rng(spec, f"{name}#{e}")
                return rng.standard_normal(shape[1:], dtype=np.float32) * np.float32(std)
            add(name, ne, make, qtype, n_chunks=shape[0])
        else:
            add(name, ne, lambda _: _rng(spec, name).standard_normal(shape, dtype=np.float32)
                * np.float32(std), qtype)

    def embeddings(_):
        rng = _rng(spec, "token_embd")
        noise = _orthogonal_noise(rng, (V, D), u)
        noise /= np.linalg.norm(noise, axis=1, keepdims=True)
        rows = _RHO * u[None, :] + np.sqrt(1 - _RHO**2) * noise
        return (rows * np.sqrt(D)).astype(np.float32)

    def output(_):
        rng = _rng(spec, "output")
        W = rng.standard_normal((V, D), dtype=np.float32) / np.float32(np.sqrt(D))
        # Hidden states point along u, so -c*u gives a large negative logit.
        W[[UNK_ID, BOS_ID, EOS_ID]] = (_SPECIAL_LOGIT / (_RHO * np.sqrt(D))) * u
        return W.astype(np.float32)

    def router(layer):
        def make(_):
            rng = _rng(spec, f"router.{layer}")
            noise = _orthogonal_noise(rng, (E, D), u)
            # logit = x.w with |x| ~ sqrt(D): noise part has std router_noise,
            # the u part gives exactly the designed offset.
            noise *= np.float32(spec.router_noise / (np.sqrt(D) * np.sqrt(1 - _RHO**2)))
            beta = offsets[layer] / (np.sqrt(D) * _RHO)
            return (beta[:, None] * u[None, :] + noise).astype(np.float32)
        return make

    add("token_embd.weight", (D, V), embeddings)
    for i in range(spec.n_layer):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (D,), const((D,), 1.0))
        q_out = D if spec.arch == "qwen2moe" else H * hd
        w(p + "attn_q.weight", (D, q_out), 1 / np.sqrt(D))
        w(p + "attn_k.weight", (D, Hkv * hd), 1 / np.sqrt(D))
        w(p + "attn_v.weight", (D, Hkv * hd), 1 / np.sqrt(D))
        if spec.arch in ("qwen2moe", "gpt-oss"):
            w(p + "attn_q.bias", (q_out,), 0.02)
            w(p + "attn_k.bias", (Hkv * hd,), 0.02)
            w(p + "attn_v.bias", (Hkv * hd,), 0.02)
        w(p + "attn_output.weight", (q_out, D), _OUT_SCALE / np.sqrt(q_out))
        if spec.arch == "qwen3moe":
            add(p + "attn_q_norm.weight", (hd,), const((hd,), 1.0))
            add(p + "attn_k_norm.weight", (hd,), const((hd,), 1.0))
        if spec.arch == "gpt-oss":
            w(p + "attn_output.bias", (D,), 0.02)
            add(p + "attn_sinks.weight", (H,), const((H,), 0.0))
            add(p + "post_attention_norm.weight", (D,), const((D,), 1.0))
        else:
            add(p + "ffn_norm.weight", (D,), const((D,), 1.0))

        if not spec.is_moe:
            Ff = spec.n_ff_dense
            w(p + "ffn_gate.weight", (D, Ff), 1 / np.sqrt(D))
            w(p + "ffn_up.weight", (D, Ff), 1 / np.sqrt(D))
            w(p + "ffn_down.weight", (Ff, D), _OUT_SCALE / np.sqrt(Ff))
            continue

        # Router stays F32 (as converters keep it) so the designed skew is exact.
        add(p + "ffn_gate_inp.weight", (D, E), router(i), "F32")
        if spec.arch == "gpt-oss":
            add(p + "ffn_gate_inp.bias", (E,), const((E,), 0.0))
        w(p + "ffn_gate_exps.weight", (D, F, E), 1 / np.sqrt(D))
        w(p + "ffn_up_exps.weight", (D, F, E), 1 / np.sqrt(D))
        w(p + "ffn_down_exps.weight", (F, D, E), _OUT_SCALE / np.sqrt(F))
        if spec.arch == "gpt-oss":
            w(p + "ffn_gate_exps.bias", (F, E), 0.02, "F32")
            w(p + "ffn_up_exps.bias", (F, E), 0.02, "F32")
            w(p + "ffn_down_exps.bias", (D, E), 0.02, "F32")
        if spec.arch == "qwen2moe":
            S = spec.shared_ff
            w(p + "ffn_gate_inp_shexp.weight", (D,), 1 / np.sqrt(D))
            w(p + "ffn_gate_shexp.weight", (D, S), 1 / np.sqrt(D))
            w(p + "ffn_up_shexp.weight", (D, S), 1 / np.sqrt(D))
            w(p + "ffn_down_shexp.weight", (S, D), _OUT_SCALE / np.sqrt(S))
    add("output_norm.weight", (D,), const((D,), 1.0))
    add("output.weight", (D, V), output)
    return plan


# ---------------------------------------------------------------------------
# Writing


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name]


def _nbytes(ne: tuple, qtype: str) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[_qtype(qtype)]
    return int(np.prod(ne)) // block * size


def _encode(chunk: np.ndarray, qtype: str) -> np.ndarray:
    if qtype == "F32":
        return np.ascontiguousarray(chunk, dtype=np.float32)
    if qtype == "F16":
        return np.ascontiguousarray(chunk, dtype=np.float16)
    from gguf import quants

    return quants.quantize(np.ascontiguousarray(chunk, dtype=np.float32), _qtype(qtype))


_FILE_TYPE = {"F32": 0, "F16": 1, "Q8_0": 7, "Q4_K": 15}


def _add_metadata(writer, spec: SynthSpec, file_type: int) -> None:
    from gguf import TokenType

    a = spec.arch
    writer.add_name(f"hybrid-gguf synthetic {a} {spec.key()}")
    writer.add_uint32(f"{a}.context_length", spec.n_ctx_train)
    writer.add_uint32(f"{a}.embedding_length", spec.n_embd)
    writer.add_uint32(f"{a}.block_count", spec.n_layer)
    ff = spec.n_ff_exp if spec.is_moe else spec.n_ff_dense
    writer.add_uint32(f"{a}.feed_forward_length", ff)
    writer.add_uint32(f"{a}.attention.head_count", spec.n_head)
    writer.add_uint32(f"{a}.attention.head_count_kv", spec.n_head_kv)
    writer.add_uint32(f"{a}.attention.key_length", spec.head_dim)
    writer.add_uint32(f"{a}.attention.value_length", spec.head_dim)
    writer.add_uint32(f"{a}.rope.dimension_count", spec.head_dim)
    writer.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{a}.rope.freq_base", 150000.0 if a == "gpt-oss" else 10000.0)
    if a == "llama":
        writer.add_uint32(f"{a}.vocab_size", VOCAB_SIZE)
    if a == "gpt-oss":
        writer.add_uint32(f"{a}.attention.sliding_window", spec.sliding_window)
    if spec.is_moe:
        writer.add_uint32(f"{a}.expert_count", spec.n_expert)
        writer.add_uint32(f"{a}.expert_used_count", spec.n_expert_used)
        if a != "llama":  # Mixtral GGUFs carry the expert width as feed_forward_length
            writer.add_uint32(f"{a}.expert_feed_forward_length", spec.n_ff_exp)
        if a == "qwen2moe":
            writer.add_uint32(f"{a}.expert_shared_feed_forward_length", spec.shared_ff)
    writer.add_uint32("general.file_type", file_type)

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([int(t) for t in types])
    writer.add_unk_token_id(UNK_ID)
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    if spec.is_moe:
        writer.add_array(KEY_POPULARITY, popularity(spec).reshape(-1).tolist())
    writer.add_float32(KEY_ZIPF, float(spec.zipf))
    writer.add_uint32(KEY_SEED, int(spec.seed) & 0xFFFFFFFF)
    writer.add_string(KEY_SPEC, json.dumps(spec.to_dict(), sort_keys=True))
    writer.add_uint32(KEY_VERSION, SYNTH_VERSION)
    if spec.routing:
        from hybrid_gguf.routing.process import ROUTING_KEY

        writer.add_string(ROUTING_KEY, spec.routing)
        writer.add_uint32(ROUTING_KEY + ".seed", int(spec.seed) & 0xFFFFFFFF)


# Above this many bytes an F16 source for Q4_K would not fit next to its output on a
# small disk (qwen3-30b-a3b-like: 58 GiB), so the source is Q8_0 and llama.cpp requantizes.
_F16_SOURCE_LIMIT = 8 * 2**30


def _q4k_source_type(spec: SynthSpec) -> str:
    expert_params = spec.n_layer * spec.n_expert * 3 * spec.n_embd * spec.n_ff_exp
    return "F16" if 2 * expert_params <= _F16_SOURCE_LIMIT else "Q8_0"


def _write_gguf(path: Path, spec: SynthSpec, zero_data: bool) -> None:
    """Write the (F32/F16/Q8_0) model to `path`, streaming one expert at a time."""
    import gguf

    plan = _plan(spec, zero_data)
    writer = gguf.GGUFWriter(path, arch=spec.arch)
    wt = spec.weight_type
    if wt == "Q4_K" and not zero_data:
        wt = _q4k_source_type(spec)
    _add_metadata(writer, spec, _FILE_TYPE[wt])
    for t in plan:
        writer.add_tensor_info(t.name, tuple(reversed(t.ne)), np.dtype(np.float32),
                               _nbytes(t.ne, t.qtype), raw_dtype=_qtype(t.qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    align = writer.data_alignment
    pad = lambda n: (-n) % align  # noqa: E731
    fout.write(b"\0" * pad(fout.tell()))
    if zero_data:
        # Same header and layout, data left as a hole: for header-only tools at real sizes.
        total = sum(_nbytes(t.ne, t.qtype) + pad(_nbytes(t.ne, t.qtype)) for t in plan)
        fout.truncate(fout.tell() + total)
    else:
        # numpy releases the GIL in RNG and quantization, so threads scale; chunks are
        # handed out in windows to bound memory, and written in order.
        workers = min(16, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            for t in plan:
                written = 0
                encode = lambda i, t=t: _encode(t.make(i), t.qtype)  # noqa: E731
                for lo in range(0, t.n_chunks, 2 * workers):
                    for data in pool.map(encode, range(lo, min(t.n_chunks, lo + 2 * workers))):
                        data.tofile(fout)
                        written += data.nbytes
                assert written == _nbytes(t.ne, t.qtype), t.name
                fout.write(b"\0" * pad(written))
    writer.close()


def quantize_gguf(src: Union[str, os.PathLike], dst: Union[str, os.PathLike],
                  ftype: str = "Q4_K_M", nthread: int = 0) -> Path:
    """Quantize an F32/F16 GGUF with llama.cpp's own quantizer (metadata is kept)."""
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise HybridError(f"quantizing to {ftype} needs llama-cpp-python: {exc}") from None
    ftype_id = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}", None)
    if ftype_id is None:
        raise HybridError(f"llama.cpp has no file type {ftype!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_id
    params.nthread = nthread
    params.allow_requantize = True  # big synthetic sources are Q8_0, not F16
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), params)
    if rc != 0:
        raise HybridError(f"llama.cpp failed to quantize {src} to {ftype} (code {rc})")
    return Path(dst)


def write_synthetic_moe(path: Union[str, os.PathLike], spec: SynthSpec, *,
                        zero_data: bool = False) -> Path:
    """Write a synthetic model to `path` atomically and return the path.

    Output is a pure function of `spec` (seed included).  zero_data=True keeps the
    exact header and tensor layout but leaves tensor data as zeros (a sparse file):
    useful to test header-only code at full size without generating weights.
    Q4_K data is produced by llama.cpp's quantizer (Q4_K_M mix) from an F16 file
    (Q8_0 above 8 GiB of F16, to save disk); with zero_data, Q4_K means every
    matrix is Q4_K (a "pure" layout).
    """
    spec.validate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if spec.weight_type == "Q4_K" and not zero_data:
            source = tmp.with_suffix(".src.tmp")
            try:
                _write_gguf(source, spec, zero_data=False)
                quantize_gguf(source, tmp, "Q4_K_M")
            finally:
                source.unlink(missing_ok=True)
        else:
            _write_gguf(tmp, spec, zero_data=zero_data)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def default_cache_dir() -> Path:
    from hybrid_gguf import paths

    return paths.synth_dir()


def synthetic_filename(spec: SynthSpec) -> str:
    return f"synth-{spec.arch}-{spec.weight_type}-{spec.key()}.gguf"


def ensure_synthetic(spec: SynthSpec, cache_dir: Union[str, os.PathLike, None] = None) -> Path:
    """Path of the model for `spec` in the cache, building it on first use."""
    spec.validate()
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / synthetic_filename(spec)
    if not path.exists():
        write_synthetic_moe(path, spec)  # atomic: concurrent builders write identical bytes
    return path
