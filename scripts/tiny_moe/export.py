"""Write the tiny trained MoE (qwen3moe architecture) as a GGUF file with gguf-py.

Weights arrive as numpy arrays keyed by GGUF tensor name, in gguf-py's numpy layout:
the reverse of ggml's ``ne``. A linear layer ``y = x @ W.T`` stores ``W`` as
``(n_out, n_in)``, which is ggml ``ne = {n_in, n_out}``, the layout llama.cpp's
``ggml_mul_mat(W, x)`` expects. Expert tensors are ``(n_expert, n_out, n_in)``.

qwen3moe uses NeoX-style RoPE (rotate pairs ``i`` and ``i + head_dim/2``) on the
weights as they are, so Q/K are written unpermuted (only LLaMA-arch converters permute).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional

import numpy as np

from scripts.tiny_moe import corpus

ARCH = "qwen3moe"
TRAIN_KEY_PREFIX = "hybrid_gguf.train."


@dataclass(frozen=True)
class TinyMoeConfig:
    n_vocab: int = corpus.N_VOCAB
    n_ctx: int = 256
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 32
    n_expert: int = 16
    n_expert_used: int = 4
    n_ff_exp: int = 128
    rope_base: float = 10000.0
    rms_eps: float = 1e-6
    tied_output: bool = False


def tensor_shapes(cfg: TinyMoeConfig) -> Dict[str, tuple]:
    """Every tensor the GGUF holds, with its numpy shape."""
    d, hd = cfg.n_embd, cfg.head_dim
    shapes = {
        "token_embd.weight": (cfg.n_vocab, d),
        "output_norm.weight": (d,),
    }
    if not cfg.tied_output:
        shapes["output.weight"] = (cfg.n_vocab, d)
    for il in range(cfg.n_layer):
        b = f"blk.{il}."
        shapes.update({
            b + "attn_norm.weight": (d,),
            b + "attn_q.weight": (cfg.n_head * hd, d),
            b + "attn_k.weight": (cfg.n_head_kv * hd, d),
            b + "attn_v.weight": (cfg.n_head_kv * hd, d),
            b + "attn_output.weight": (d, cfg.n_head * hd),
            b + "attn_q_norm.weight": (hd,),
            b + "attn_k_norm.weight": (hd,),
            b + "ffn_norm.weight": (d,),
            b + "ffn_gate_inp.weight": (cfg.n_expert, d),
            b + "ffn_gate_exps.weight": (cfg.n_expert, cfg.n_ff_exp, d),
            b + "ffn_up_exps.weight": (cfg.n_expert, cfg.n_ff_exp, d),
            b + "ffn_down_exps.weight": (cfg.n_expert, d, cfg.n_ff_exp),
        })
    return shapes


def storage_type(name: str, shape: tuple) -> str:
    """"F32" or "F16" for one tensor.

    Norm weights must be F32 in llama.cpp. The router stays F32 too: it is tiny and the
    top-k choice is the thing the equivalence test compares, so it should not gain
    rounding. Everything else is F16 (about 2x smaller; Q8_0 would also quantize the
    activations inside llama.cpp's matmuls and blur the comparison with the reference).
    """
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight"):
        return "F32"
    return "F16"


def vocab_tokens():
    """SentencePiece ("llama") vocab: <unk>, <s>, </s>, 256 byte tokens, then "▁".

    With no merges, llama.cpp's SPM tokenizer maps ' ' to "▁" and every other character
    to its UTF-8 byte tokens, so text is tokenized byte by byte (stdlib_corpus.encode).
    """
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"]
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
             + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL])
    assert len(tokens) == corpus.N_VOCAB and tokens[corpus.SPACE_ID] == "\u2581"
    return tokens, [0.0] * len(tokens), [int(t) for t in types]


def _add_train_info(writer, info: Mapping[str, Any]) -> None:
    """`hybrid_gguf.train.*`: typed scalars, string lists as arrays, anything else as JSON."""
    for key, value in info.items():
        full = TRAIN_KEY_PREFIX + key
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, int):
            writer.add_uint64(full, value)
        elif isinstance(value, float):
            writer.add_float64(full, value)
        elif isinstance(value, str):
            writer.add_string(full, value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            writer.add_array(full, list(value))
        else:
            writer.add_string(full, json.dumps(value, sort_keys=True))


def write_gguf(
    path: str,
    cfg: TinyMoeConfig,
    weights: Mapping[str, np.ndarray],
    train_info: Optional[Mapping[str, Any]] = None,
    name: str = "tiny-moe-stdlib",
) -> None:
    import gguf

    shapes = tensor_shapes(cfg)
    missing = set(shapes) - set(weights)
    extra = set(weights) - set(shapes)
    if missing or extra:
        raise ValueError(f"weights do not match the config: missing {sorted(missing)}, extra {sorted(extra)}")

    w = gguf.GGUFWriter(path, arch=ARCH)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    # Qwen3-MoE convention: feed_forward_length = expert width * experts used.
    w.add_feed_forward_length(cfg.n_ff_exp * cfg.n_expert_used)
    w.add_expert_feed_forward_length(cfg.n_ff_exp)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_expert_count(cfg.n_expert)
    w.add_expert_used_count(cfg.n_expert_used)

    tokens, scores, types = vocab_tokens()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(corpus.UNK_ID)
    w.add_bos_token_id(corpus.BOS_ID)
    w.add_eos_token_id(corpus.EOS_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    # Our training text starts right after <s>, without SentencePiece's leading space.
    w.add_add_space_prefix(False)

    w.add_string(TRAIN_KEY_PREFIX + "config", json.dumps(asdict(cfg), sort_keys=True))
    if train_info:
        _add_train_info(w, train_info)

    for tname, shape in shapes.items():
        arr = np.asarray(weights[tname], dtype=np.float32)
        if arr.shape != shape:
            raise ValueError(f"{tname}: shape {arr.shape}, expected {shape}")
        dtype = np.float16 if storage_type(tname, shape) == "F16" else np.float32
        w.add_tensor(tname, np.ascontiguousarray(arr.astype(dtype)))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_train_info(path: str) -> Dict[str, Any]:
    """The `hybrid_gguf.train.*` metadata of a GGUF, keys without the prefix."""
    import gguf

    reader = gguf.GGUFReader(path)
    out: Dict[str, Any] = {}
    for field in reader.fields.values():
        if field.name.startswith(TRAIN_KEY_PREFIX):
            out[field.name[len(TRAIN_KEY_PREFIX):]] = field.contents()
    return out
