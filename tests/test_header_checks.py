"""Headers llama.cpp aborts on (or Python chokes on) are refused first, in one line.

Each case is the project's tiny qwen3moe model with one thing changed, as the
malformed files of issue 13 were.  `inspect` and the API share read_inventory,
so refusing there covers `run` too; the subprocess tests check the CLI end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import read_inventory

from gguf_mutants import ARR, F32, STR, U32, U64, GGUFModel, KV

REPO = Path(__file__).resolve().parents[1]

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama_cpp (llama-cpp-python) is not importable")


def cli(*args, timeout=120, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=cwd)


def assert_one_line_refusal(res, match):
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], res.stderr


@pytest.fixture(scope="module")
def base(tiny_model):
    return GGUFModel.parse(tiny_model.read_bytes())


@pytest.fixture
def make(base, tmp_path):
    """make(edit) -> path of the tiny model after edit(model) (a GGUFModel copy)."""
    import copy

    def build(edit, name="m.gguf"):
        m = copy.deepcopy(base)
        edit(m)
        path = tmp_path / name
        path.write_bytes(m.to_bytes())
        return path

    return build


def set_key(key, value, vtype=U32):
    def edit(m):
        kv = m.find(key.encode())
        if kv is None:
            m.kvs.append(KV(key.encode(), vtype, value))
        else:
            kv.vtype, kv.value, kv.itype = vtype, value, None
    return edit


def drop_key(key):
    def edit(m):
        m.kvs.remove(m.find(key.encode()))
    return edit


def refused(path, *fragments):
    with pytest.raises(HybridError) as info:
        read_inventory(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_the_unchanged_model_passes(make):
    inv = read_inventory(make(lambda m: None))
    assert (inv.n_layer, inv.n_expert, inv.n_expert_used) == (2, 8, 2)


# --- experts ------------------------------------------------------------------------------


@pytest.mark.parametrize("used", [9, 2**32 - 1])
def test_expert_used_count_above_expert_count(make, used):
    refused(make(set_key("qwen3moe.expert_used_count", used)),
            "qwen3moe.expert_used_count", "valid: 1..8" if used == 9 else "valid: 0..1024")


@pytest.mark.parametrize("edit", [set_key("qwen3moe.expert_used_count", 0),
                                  drop_key("qwen3moe.expert_used_count")], ids=["zero", "missing"])
def test_expert_used_count_zero_or_missing(make, edit):
    refused(make(edit), "qwen3moe.expert_used_count", "1..8")


@pytest.mark.parametrize("count", [0, 1, 7, 2**32 - 1])
def test_expert_count_not_the_tensors(make, count):
    msg = refused(make(set_key("qwen3moe.expert_count", count)), "qwen3moe.expert_count")
    if count < 1025:
        assert "holds 8 experts" in msg or "more than qwen3moe.expert_count" in msg


def test_expert_count_missing_with_expert_tensors(make):
    refused(make(drop_key("qwen3moe.expert_count")), "qwen3moe.expert_count is missing",
            "8 routed experts")


def test_expert_groups(make):
    refused(make(set_key("qwen3moe.expert_group_count", 3)), "expert_group_count (3) does not divide")
    refused(make(set_key("qwen3moe.expert_group_count", 8)), "must be less than")


# --- layers -------------------------------------------------------------------------------


@pytest.mark.parametrize("count, fragment", [(0, "valid: 1..512"), (2**32 - 1, "valid: 1..512"),
                                             (300, "no tensor belongs to layer 2"),
                                             (3, "no tensor belongs to layer 2"),
                                             (1, "belongs to layer 1")])
def test_block_count(make, count, fragment):
    refused(make(set_key("qwen3moe.block_count", count)), "qwen3moe.block_count", fragment)


@pytest.mark.parametrize("index", [512, 2**32 - 1, 10**30])
def test_huge_layer_index_in_a_tensor_name(make, index):
    # used to build per-layer lists of that length: MemoryError / OverflowError
    def edit(m):
        m.tensors[-3].name = b"blk.%d.ffn_norm.weight" % index
    refused(make(edit), f"layer index {index}", "at most 512 layers")


def test_next_token_prediction_layers_may_be_left_out(make):
    # block_count counts nextn layers last; a file without their tensors is not refused
    def edit(m):
        set_key("qwen3moe.block_count", 3)(m)
        set_key("qwen3moe.nextn_predict_layers", 1)(m)
    assert read_inventory(make(edit)).n_layer == 3


def test_nextn_layers_above_block_count(make):
    refused(make(set_key("qwen3moe.nextn_predict_layers", 3)), "nextn_predict_layers is 3")


# --- value types and ranges ---------------------------------------------------------------


def test_embedding_length_as_a_string(make):
    # used to be a ValueError traceback from int("...")
    refused(make(set_key("qwen3moe.embedding_length", b"128", STR)),
            "qwen3moe.embedding_length is stored as STRING", "UINT32")


@pytest.mark.parametrize("vtype, value", [(F32, 8.0), (U64, 8), (STR, b"eight")])
def test_expert_count_of_the_wrong_type(make, vtype, value):
    refused(make(set_key("qwen3moe.expert_count", value, vtype)), "qwen3moe.expert_count is stored as")


def test_scalar_key_as_an_array(make):
    def edit(m):
        kv = m.find(b"qwen3moe.attention.value_length")
        kv.vtype, kv.itype, kv.value = ARR, U32, [32, 32]
    refused(make(edit), "qwen3moe.attention.value_length is an array")


def test_per_layer_array_of_the_wrong_length(make):
    def edit(m):
        kv = m.find(b"qwen3moe.expert_used_count")
        kv.vtype, kv.itype, kv.value = ARR, U32, [2, 2, 2]
    refused(make(edit), "expert_used_count has 3 entries", "one per layer")


def test_context_length_out_of_range(make):
    refused(make(set_key("qwen3moe.context_length", 2**32 - 1)), "qwen3moe.context_length is 4294967295")
    # llama-cpp-python allocates context_length tokens per tokenize call: 8 GiB here
    refused(make(set_key("qwen3moe.context_length", 2**31 - 1)), "valid: 1..33554432")
    refused(make(set_key("qwen3moe.context_length", 0)), "qwen3moe.context_length is 0")


def test_embedding_length_against_token_embd(make):
    refused(make(set_key("qwen3moe.embedding_length", 64)), "token_embd.weight has rows of 128")


def test_rope_dimension_against_head_size(make):
    refused(make(set_key("qwen3moe.rope.dimension_count", 16)), "rope.dimension_count is 16", "(32)")


@pytest.mark.parametrize("key, value", [("attention.key_length", 16), ("attention.value_length", 64),
                                        ("attention.head_count", 8)])
def test_attention_shapes_against_head_sizes(tiny_model_factory, tmp_path, key, value):
    # gpt-oss: llama.cpp loaded these and then asserted in ggml while building the graph
    import copy

    m = copy.deepcopy(GGUFModel.parse(tiny_model_factory("gpt-oss").read_bytes()))
    m.find(f"gpt-oss.{key}".encode()).value = value
    path = tmp_path / "g.gguf"
    path.write_bytes(m.to_bytes())
    refused(path, "tensor blk.0.attn_", "head counts and head sizes imply")


def test_sliding_window_longer_than_the_context(tiny_model_factory, tmp_path):
    m = GGUFModel.parse(tiny_model_factory("gpt-oss").read_bytes())
    m.find(b"gpt-oss.attention.sliding_window").value = 2**31 - 1  # std::bad_alloc in llama.cpp
    path = tmp_path / "w.gguf"
    path.write_bytes(m.to_bytes())
    refused(path, "gpt-oss.attention.sliding_window is 2147483647, longer than")


def test_head_count_kv_must_divide_head_count(make):
    refused(make(set_key("qwen3moe.attention.head_count_kv", 3)), "not a multiple")


# --- layout -------------------------------------------------------------------------------


@pytest.mark.parametrize("alignment", [1, 2, 4])
def test_small_alignment_misplaces_tensor_data(make, alignment):
    # gguf accepts these, but the tensor data then is not 32-byte aligned: ggml asserts
    def edit(m):
        m.kvs.insert(0, KV(b"general.alignment", U32, alignment))
    refused(make(edit), "not a multiple of 32")


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_alignment_not_a_power_of_two(make, alignment):
    def edit(m):
        m.kvs.insert(0, KV(b"general.alignment", U32, alignment))
    refused(make(edit), "general.alignment")


def test_tensor_offsets_out_of_order(make):
    def edit(m):
        m.tensors[1].offset, m.tensors[2].offset = m.tensors[2].offset, m.tensors[1].offset
    refused(make(edit), "tensor blk.0.attn_norm.weight data is at offset", "table order")


def test_repeated_vocabulary_token(make):
    def edit(m):
        m.find(b"tokenizer.ggml.tokens").value[113] = b"<0x6D>"
    refused(make(edit), "tokenizer.ggml.tokens repeats token b'<0x6D>'", "ids 112 and 113")


def test_spm_vocabulary_without_a_byte_token(make):
    # llama.cpp's SPM tokenizer falls back to <0xXX> tokens: a missing one is an
    # uncaught std::out_of_range (SIGABRT) once a prompt needs it ("hi" needs <0x68>)
    def edit(m):
        m.find(b"tokenizer.ggml.tokens").value[3 + 0x68] = b"<0x6<>"
    refused(make(edit), "lacks byte token <0x68>", "all 256")


def test_duplicate_and_overlong_tensor_names(make):
    def dup(m):
        m.tensors[2].name = m.tensors[1].name
    # gguf-py itself refuses duplicates while parsing
    with pytest.raises(HybridError, match="blk.0.attn_norm.weight"):
        read_inventory(make(dup, "dup.gguf"))

    def long(m):
        m.tensors[1].name = b"blk.0." + b"x" * 70 + b".weight"
    refused(make(long, "long.gguf"), "at most 63")


# --- special files ------------------------------------------------------------------------


@pytest.mark.parametrize("dev", ["/dev/zero", "/dev/urandom"])
def test_character_devices(dev):
    if not os.path.exists(dev):
        pytest.skip(f"no {dev}")
    with pytest.raises(HybridError, match=r"is not a regular file \(a character device\)"):
        read_inventory(dev)


@pytest.mark.parametrize("command", ["inspect", "run"])
def test_fifo_is_refused_without_blocking(tmp_path, command):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    args = [command, str(fifo)] + (["-p", "hi", "-n", "1", "--no-record"] if command == "run" else [])
    res = cli(*args, timeout=60)  # blocked in open() forever before
    assert_one_line_refusal(res, "is not a regular file (a FIFO)")


def test_inspect_cli_refuses_in_one_line(make):
    res = cli("inspect", str(make(set_key("qwen3moe.expert_used_count", 9))))
    assert_one_line_refusal(res, "qwen3moe.expert_used_count is 9, more than qwen3moe.expert_count (8)")


def test_error_line_is_not_wrapped_and_escapes_control_characters():
    from hybrid_gguf.cli import one_line

    assert one_line("tensor a\nb\x1b[31m") == "tensor a b\\x1b[31m"


# --- llama.cpp's own failures -------------------------------------------------------------


def test_load_error_detail_keeps_the_cause():
    from hybrid_gguf.llama.loader import load_error_detail

    errors = ["gguf_init_from_reader: tensor 'blk.0.attn_k.weight' has offset 198656, expected 165888",
              "gguf_init_from_reader: failed to read tensor data",
              "llama_model_load: error loading model: llama_model_loader: failed to load model from m.gguf",
              "llama_model_load_from_file_impl: failed to load model"]
    assert load_error_detail(errors, "Failed to load model from file") == errors[0]
    assert load_error_detail([], "Failed to load\nmodel") == "Failed to load model"
    assert load_error_detail(errors[1:2], "x") == errors[1]


def test_abort_message_is_one_line():
    from hybrid_gguf.llama.log import abort_message

    msg = abort_message(b"/build/x/ggml/src/ggml-backend.cpp:2533: GGML_ASSERT(p % 32 == 0) failed\n",
                        ["load: something went wrong"])
    assert msg == ("llama.cpp aborted: GGML_ASSERT(p % 32 == 0) failed (ggml-backend.cpp:2533); "
                   "last llama.cpp error: load: something went wrong")


@needs_llama
def test_run_shows_llama_cpp_error_without_verbose(make, tmp_path):
    # header checks pass, llama.cpp refuses: its reason is in the one error line
    path = make(drop_key("qwen3moe.attention.layer_norm_rms_epsilon"))
    res = cli("run", str(path), "-p", "hi", "-n", "1", "--no-record", "--threads", "1")
    assert_one_line_refusal(res, "key not found in model: qwen3moe.attention.layer_norm_rms_epsilon")


@needs_llama
def test_an_abort_that_slips_through_is_one_line(make):
    # load_llama directly (no header checks) on a file ggml asserts on
    def edit(m):
        m.kvs.insert(0, KV(b"general.alignment", U32, 4))
    path = make(edit)
    code = ("import sys; from hybrid_gguf.llama import log as llama_log; llama_log.set_abort_exit_status(3); "
            "from hybrid_gguf.llama.loader import load_llama; load_llama(sys.argv[1], verbose=False)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 3, (res.returncode, res.stderr[-2000:])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == ["error: llama.cpp aborted: GGML_ASSERT((uintptr_t)ptr % TENSOR_ALIGNMENT == 0 && "
                     "\"buffer pointer must be aligned\") failed (ggml-backend.cpp:2533)"] or \
        (len(lines) == 1 and lines[0].startswith("error: llama.cpp aborted: GGML_ASSERT")), res.stderr
