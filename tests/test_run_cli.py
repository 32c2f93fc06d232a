"""`hybrid-gguf run`: JSON contract, per-expert placement by hand, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("llama_cpp")

from hybrid_gguf.errors import HybridError  # noqa: E402
from hybrid_gguf.llama import hybrid as hybrid_backend  # noqa: E402


def run_cli(*args, env_extra=None):
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "run", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_json_contract_on_the_default_model(tmp_path):
    res = run_cli("-p", "def main():", "-n", "8", "--json", "--threads", "1",
                  env_extra={"HYBRID_GGUF_HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for key in ("text", "tokens", "prompt_tokens", "gen_tokens_per_s", "prompt_tokens_per_s", "placement"):
        assert key in out
    assert len(out["tokens"]) == 8 and all(isinstance(t, int) for t in out["tokens"])
    assert out["prompt_tokens"] > 0 and out["gen_tokens_per_s"] > 0
    assert out["placement"]["mode"] == "cpu"
    # the session's routing went into the profile store under HYBRID_GGUF_HOME
    assert out["profile_sessions"] == 1
    # and is reported against the placement: nothing is in GPU memory here
    routing = out["routing"]
    assert routing["prompt_selections"] > 0 and routing["prompt_hit_rate"] == 0.0
    assert list((tmp_path / "profiles").glob("*.json"))


@pytest.mark.skipif(not hybrid_backend.capability().per_expert, reason=hybrid_backend.STOCK_NOTICE)
def test_hot_by_hand_gives_the_same_tokens(tmp_path):
    env = {"HYBRID_GGUF_HOME": str(tmp_path)}
    plain = json.loads(run_cli("-p", "import os", "-n", "12", "--json", "--no-record", "--threads", "1",
                               env_extra=env).stdout)
    res = run_cli("-p", "import os", "-n", "12", "--json", "--no-record", "--threads", "1",
                  "--hot", "0:1,2,3;2:0,15", env_extra=env)
    assert res.returncode == 0, res.stderr
    split = json.loads(res.stdout)
    assert split["placement"]["mode"] == "per-expert" and split["placement"]["hot_pack_bytes"] > 0
    assert split["tokens"] == plain["tokens"]


@pytest.mark.skipif(hybrid_backend.capability().version < 5, reason="needs hybrid patch version 5 (the cache)")
def test_run_with_an_in_session_cache_reports_it(tmp_path):
    env = {"HYBRID_GGUF_HOME": str(tmp_path)}
    plain = json.loads(run_cli("-p", "import os", "-n", "12", "--json", "--no-record", "--threads", "1",
                               env_extra=env).stdout)
    res = run_cli("-p", "import os", "-n", "12", "--json", "--no-record", "--threads", "1",
                  "--hot", "0:1;1:2;2:0", "--cache", "lru", "--cache-quota", "100", env_extra=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    cache = out["cache"]
    assert cache["policy"] == "lru" and cache["uploads"] > 0 and cache["evictions"] == cache["uploads"]
    assert cache["hits"] + cache["misses"] > 0 and 0.0 <= cache["hit_rate"] <= 1.0
    assert "in-session cache lru" in out["placement"]["description"]
    assert out["tokens"] == plain["tokens"]
    # the line a person reads at the end of the session
    text = run_cli("-p", "import os", "-n", "4", "--no-record", "--threads", "1", "--hot", "0:1",
                   "--cache", "seeded", env_extra=env)
    assert text.returncode == 0 and "in-session cache seeded" in text.stderr
    bad = run_cli("-p", "x", "--hot", "0:1", "--cache", "fifo", env_extra=env)
    assert bad.returncode == 2 and "cache policy" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("args, message", [
    (["/no/such/model.gguf", "-p", "x"], "not found"),
    (["-p", "x", "--gpu-budget", "8QB"], "size"),
    (["-p", "x", "--hot", "0:99"], "expert 99"),
    (["-p", "x", "--hot", "zz"], "--hot"),
    (["-p", "x", "--plan", "/no/such/plan.yaml"], "not found"),
    (["-p", "x", "-ub", "big"], "--ubatch must be a positive integer or auto"),
    (["-p", "x", "--ubatch", "0"], "--ubatch must be a positive integer or auto"),
    (["-p", "x", "-ub", "100000"], "--ubatch must be between 1 and 65536"),
    (["-p", "x", "-c", "256", "-ub", "1024"], "--ubatch 1024 exceeds the context of 256 tokens"),
    (["-p", "x", "-ctk", "f8"], "--cache-type-k: unknown KV cache type 'f8'; known: f32, f16, bf16, q8_0"),
    (["-p", "x", "--cache-type-v", "q9"], "--cache-type-v: unknown KV cache type 'q9'; known: f32, f16"),
    (["-p", "x", "-ctv", "q8_0"], "a quantized V cache (q8_0) needs flash attention (-fa/--flash-attn"),
    (["-p", "x", "-ctk", "q8_0", "-ctv", "Q4_0", "--cpu-moe"], "a quantized V cache (q4_0) needs flash attention"),
])
def test_bad_input_is_one_clear_line(args, message):
    res = run_cli(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    if hybrid_backend.capability().per_expert or "--hot" not in args or "zz" in args:
        assert message in res.stderr


def test_a_plan_for_another_model_is_refused(tmp_path, tiny_model_factory):
    from hybrid_gguf.autoplan import plan_model

    other = tiny_model_factory("qwen2moe")
    plan = plan_model(other, 64 * 2**20, 256, out=tmp_path / "other.yaml", measure=False, calibrate=False).plan
    assert plan.fingerprint
    res = run_cli("-p", "x", "--plan", str(tmp_path / "other.yaml"))
    assert res.returncode == 2
    assert "another model" in res.stderr


def test_a_hot_set_larger_than_free_vram_is_refused_before_loading(tiny_model, monkeypatch):
    from hybrid_gguf.llama import devices
    from hybrid_gguf.errors import HybridError
    from hybrid_gguf.model import HybridModel

    if not hybrid_backend.capability().per_expert:
        pytest.skip(hybrid_backend.STOCK_NOTICE)
    small_gpu = devices.Device(index=1, name="CUDA0", description="fake", type="gpu",
                               free_bytes=256 << 20, total_bytes=1 << 30)
    monkeypatch.setattr(devices, "gpu_devices", lambda: [small_gpu])
    with pytest.raises(HybridError, match="hot set needs .* CUDA0 has"):
        HybridModel(str(tiny_model), hot={0: [0, 1]}, record=False)


def test_gpu_experts_of_each_kind_of_placement(tiny_model_factory):
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.autoplan import _gpu_experts
    from hybrid_gguf.planning.placement import cpu_moe, n_cpu_moe

    inv = read_inventory(tiny_model_factory("qwen3moe", n_layer=4, n_expert=8))
    every = list(range(8))
    assert _gpu_experts(inv, None, {}, -1, None) == {l: every for l in range(4)}
    assert _gpu_experts(inv, None, {}, 0, None) == {}
    assert _gpu_experts(inv, n_cpu_moe(3), {}, -1, None) == {3: every}
    assert _gpu_experts(inv, cpu_moe(), {1: [2, 5]}, -1, "CUDA0") == {1: [2, 5]}
    assert _gpu_experts(inv, cpu_moe(), {1: [2, 5]}, -1, "CPU") == {}  # a pack in host memory


def _smallest_split_plan(tiny_model_factory, tmp_path, **plan_kw):
    """A 3-layer model's plan at the smallest budget that has hot packs (a skewed profile),
    saved; (plan, `run` arguments that apply it with --json, the environment)."""
    import numpy as np

    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.planning.planner import make_plan
    from hybrid_gguf.routing.profile import RoutingProfile

    path = tiny_model_factory("qwen3moe", n_layer=3)
    inv = read_inventory(path)
    counts = np.tile(1.0 / np.arange(1, inv.n_expert + 1), (inv.n_layer, 1)) * 1000
    prof = RoutingProfile(inv.fingerprint, inv.arch, inv.n_layer, inv.n_expert, inv.n_expert_used, counts,
                          np.zeros_like(counts), np.full(inv.n_layer, 1000.0 / inv.n_expert_used),
                          np.zeros(inv.n_layer), sessions=1)
    for mib in range(4, 256, 4):
        plan = make_plan(inv, mib << 20, 256, prof, devices=["GPU"], promote_fraction=2.0, **plan_kw)
        if plan.hot:
            break
    file = tmp_path / "plan.yaml"
    plan.save(file)
    base = ["-m", str(path), "-p", "import os", "-n", "6", "--json", "--no-record", "--threads", "1", "--ctx", "256",
            "--plan", str(file)]
    return plan, base, {"HYBRID_GGUF_HOME": str(tmp_path)}


@pytest.mark.skipif(hybrid_backend.capability().version < 5, reason="needs hybrid patch version 5 (the cache)")
def test_a_plan_file_carries_its_cache_to_the_run(tmp_path, tiny_model_factory):
    """`cache:` in a plan file is what its runs use; `run --cache` overrides it."""
    plan, base, env = _smallest_split_plan(tiny_model_factory, tmp_path, cache="lru")
    assert plan.hot and plan.cache.policy == "lru"
    res = run_cli(*base, env_extra=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["cache"]["policy"] == "lru"
    res = run_cli(*base, "--cache", "static", env_extra=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["cache"] is None


@pytest.mark.skipif(hybrid_backend.capability().version < 6, reason="needs hybrid patch version 6 (the CPU worker)")
def test_a_plan_file_carries_its_handoff_to_the_run(tmp_path, tiny_model_factory):
    """`handoff: worker` in a plan file gives the run's split layers to the CPU worker where
    there is a GPU (without one it says it does not, since the whole graph is the CPU's);
    `run --handoff` overrides the plan either way, and the tokens are the same."""
    from hybrid_gguf.llama.devices import gpu_devices

    plan, base, env = _smallest_split_plan(tiny_model_factory, tmp_path, handoff="worker")
    assert plan.hot and plan.worker
    res = run_cli(*base, env_extra=env)
    assert res.returncode == 0, res.stderr
    as_planned = json.loads(res.stdout)
    if gpu_devices():
        assert as_planned["placement"]["handoff"] == "worker" and as_planned["worker"]["busy"] > 0
    else:
        assert as_planned["placement"]["handoff"] == "scheduler" and as_planned["worker"] is None
        assert any("`handoff: worker` is not used" in n for n in as_planned["placement"]["notices"])
    res = run_cli(*base, "--handoff", "worker", env_extra=env)
    assert res.returncode == 0, res.stderr
    by_worker = json.loads(res.stdout)
    assert by_worker["placement"]["handoff"] == "worker" and by_worker["worker"]["busy"] > 0, by_worker["worker"]
    res = run_cli(*base, "--handoff", "scheduler", env_extra=env)
    assert res.returncode == 0, res.stderr
    by_scheduler = json.loads(res.stdout)
    assert by_scheduler["placement"]["handoff"] == "scheduler" and by_scheduler["worker"] is None
    assert by_scheduler["tokens"] == by_worker["tokens"] == as_planned["tokens"]
    res = run_cli(*base, "--handoff", "thread", env_extra=env)
    assert res.returncode != 0 and "handoff must be scheduler or worker" in res.stderr


def test_the_end_of_a_session_says_what_the_next_plan_changes(tmp_path, tiny_model_factory):
    """A run of a per-expert plan re-plans with its updated profile (pure, no reload) and
    says what the next plan would change: --json `next_plan`, and a line on stderr."""
    import numpy as np

    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.planning.planner import make_plan
    from hybrid_gguf.routing.profile import RoutingProfile

    if not hybrid_backend.capability().per_expert:
        pytest.skip("needs the hybrid patch (per-expert plans)")
    path = tiny_model_factory("qwen3moe", n_layer=3)
    inv = read_inventory(path)
    # a profile that favours the last experts; the run's own routing will disagree somewhere
    counts = np.tile(np.arange(1, inv.n_expert + 1, dtype=float), (inv.n_layer, 1)) * 100
    prof = RoutingProfile(inv.fingerprint, inv.arch, inv.n_layer, inv.n_expert, inv.n_expert_used, counts,
                          np.zeros_like(counts), np.full(inv.n_layer, counts[0].sum() / inv.n_expert_used),
                          np.zeros(inv.n_layer), sessions=1)
    for mib in range(4, 256, 4):
        plan = make_plan(inv, mib << 20, 256, prof, devices=["GPU"], promote_fraction=2.0)
        if plan.hot:
            break
    file = tmp_path / "plan.yaml"
    plan.save(file)
    env = {"HYBRID_GGUF_HOME": str(tmp_path)}
    base = ["-m", str(path), "-p", "def main():", "-n", "8", "--threads", "1", "--ctx", "256", "--plan", str(file)]
    res = run_cli(*base, "--json", env_extra=env)
    assert res.returncode == 0, res.stderr
    nxt = json.loads(res.stdout)["next_plan"]
    assert nxt is not None and "predicted hit rate" in nxt["summary"]
    assert set(nxt) >= {"promoted", "demoted", "hit_before", "hit_after"}
    res = run_cli(*base, env_extra=env)
    assert res.returncode == 0 and "re-planned with this session's routing" in res.stderr, res.stderr


# --- the prompt micro-batch and flash attention (-ub/--ubatch, -fa/--flash-attn) ---------------


def _diff_notices(notices) -> list:
    """An auto plan's 'what changed since the last session' line (autoplan._auto_plan)."""
    return [n for n in notices if n.startswith("plan unchanged") or " promoted in " in n]


def test_ubatch_and_flash_attn_reach_llama_cpp(tiny_model_factory):
    import llama_cpp

    from hybrid_gguf.model import HybridModel

    path = str(tiny_model_factory("qwen3moe", n_layer=2))
    with HybridModel(path, n_ctx=512, n_threads=1, record=False, n_ubatch=64, flash_attn=True) as hm:
        params = hm.llm.context_params
        assert params.n_ubatch == 64 and llama_cpp.llama_n_ubatch(hm.llm._ctx.ctx) == 64
        assert params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        placement = hm.placement.to_dict()
        assert (placement["n_ubatch"], placement["n_batch"], placement["flash_attn"]) == (64, 512, True)
        assert len(hm.generate("def main():", max_tokens=3).tokens) == 3
    with HybridModel(path, n_ctx=1024, n_threads=1, record=False) as hm:  # the defaults, as before
        assert (hm.placement.n_ubatch, hm.placement.n_batch, hm.placement.flash_attn) == (512, 512, False)
    with HybridModel(path, n_ctx=2048, n_threads=1, record=False, n_ubatch=1024) as hm:
        assert (hm.placement.n_ubatch, hm.placement.n_batch) == (1024, 1024)
    with pytest.raises(HybridError, match="positive integer or auto"):
        HybridModel(path, n_ctx=256, record=False, n_ubatch="big")
    with pytest.raises(HybridError, match="exceeds the context of 256"):
        HybridModel(path, n_ctx=256, record=False, n_ubatch=512)


def test_run_json_reports_the_ubatch_and_flash_attn_used(tmp_path, tiny_model_factory):
    path = tiny_model_factory("qwen3moe", n_layer=2)
    base = ["-m", str(path), "-p", "def main():", "-n", "3", "--json", "--no-record", "-t", "1", "-c", "256"]
    env = {"HYBRID_GGUF_HOME": str(tmp_path)}
    res = run_cli(*base, "-ub", "32", "-fa", env_extra=env)
    assert res.returncode == 0, res.stderr
    placement = json.loads(res.stdout)["placement"]
    assert (placement["n_ubatch"], placement["flash_attn"]) == (32, True)
    res = run_cli(*base[:-2], "--ctx", "256", "--ubatch", "auto", env_extra=env)  # not planned here: 512, cut to 256
    assert res.returncode == 0, res.stderr
    placement = json.loads(res.stdout)["placement"]
    assert (placement["n_ubatch"], placement["flash_attn"]) == (256, False)
    assert any("--ubatch auto" in n and "not planned" in n for n in placement["notices"])


def test_a_plan_file_fixes_the_ubatch_and_flash_attn(tmp_path, tiny_model_factory):
    from hybrid_gguf.autoplan import plan_model

    path = tiny_model_factory("qwen3moe", n_layer=3)
    file = tmp_path / "plan.yaml"
    plan_model(path, 64 * 2**20, 256, out=file, measure=False, calibrate=False, n_ubatch=128)
    env = {"HYBRID_GGUF_HOME": str(tmp_path)}
    base = ["-m", str(path), "-p", "x", "-n", "1", "--json", "--no-record", "-t", "1", "-c", "256", "--plan", str(file)]
    res = run_cli(*base, env_extra=env)
    assert res.returncode == 0, res.stderr
    placement = json.loads(res.stdout)["placement"]
    assert (placement["n_ubatch"], placement["flash_attn"]) == (128, False)
    assert run_cli(*base, "-ub", "128", env_extra=env).returncode == 0  # the plan's own: fine
    for extra in (["-ub", "64"], ["--ubatch", "auto"], ["-fa"]):
        res = run_cli(*base, *extra, env_extra=env)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert "fixes ubatch 128 and flash attention off" in res.stderr and "hybrid-gguf plan" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_placements_that_are_not_planned_take_the_ubatch_as_given(tiny_model_factory):
    from hybrid_gguf.autoplan import session_plan
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.llama import devices

    gpu = devices.Device(index=1, name="CUDA0", description="fake", type="gpu", free_bytes=8 << 30,
                         total_bytes=8 << 30)
    path = tiny_model_factory("qwen3moe", n_layer=4)
    inv = read_inventory(path)
    want = {"n_ubatch": 128, "n_batch": 512, "flash_attn": True}
    for kw in (dict(n_cpu_moe=2), dict(cpu_moe=True), dict(auto_plan=False)):
        s = session_plan(path, inv, [gpu], 1024, n_ubatch=128, flash_attn=True, **kw)
        assert {k: s.llama_kwargs[k] for k in want} == want, kw
    s = session_plan(path, inv, [], 1024, n_ubatch=2048, flash_attn=True)  # no GPU
    assert {k: s.llama_kwargs[k] for k in want} == {"n_ubatch": 2048, "n_batch": 2048, "flash_attn": True}
    s = session_plan(path, inv, [gpu], 1024, n_cpu_moe=1)  # nothing asked: llama.cpp's defaults
    assert {k: s.llama_kwargs[k] for k in want} == {"n_ubatch": 512, "n_batch": 512, "flash_attn": False}
    # the whole-layer plan is a plan: auto is the planner's pick there
    s = session_plan(path, inv, [gpu], 2048, n_ubatch="auto", auto_plan=False)
    assert s.llama_kwargs["n_ubatch"] in (512, 1024, 2048)
    assert any(n.startswith(f"ubatch {s.llama_kwargs['n_ubatch']} (predicted") for n in s.summary.notices)


def _sessions_on_a_fake_gpu(tmp_path, monkeypatch, tiny_model_factory):
    """(inventory, session(**kw)): session_plan on one fake 8 GiB GPU at a 24 MiB budget, for
    a tiny model with a skewed stored profile; plans and profiles under tmp_path."""
    from hybrid_gguf import paths
    from hybrid_gguf.autoplan import session_plan
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.llama import devices
    from hybrid_gguf.routing.profile import ProfileStore, RoutingProfile
    import numpy as np

    monkeypatch.setenv("HYBRID_GGUF_CACHE", str(paths.cache_dir()))  # the calibration, measured once
    monkeypatch.setenv("HYBRID_GGUF_HOME", str(tmp_path))
    gpu = devices.Device(index=1, name="CUDA0", description="fake", type="gpu", free_bytes=8 << 30,
                         total_bytes=8 << 30)
    path = tiny_model_factory("qwen3moe", n_layer=3, n_expert=8)
    inv = read_inventory(path)
    counts = np.tile(1.0 / np.arange(1, inv.n_expert + 1), (inv.n_layer, 1)) * 3000  # a skewed profile
    ProfileStore().merge_session(RoutingProfile(inv.fingerprint, inv.arch, inv.n_layer, inv.n_expert, inv.n_expert_used,
                                                counts, np.zeros_like(counts), np.full(inv.n_layer, 3000.0),
                                                np.zeros(inv.n_layer), sessions=1))

    def session(**kw):
        return session_plan(path, inv, [gpu], 2048, gpu_budget="24MiB", **kw)

    return inv, session


def test_a_stored_session_plan_is_kept_per_ubatch_and_flash_attn(tmp_path, monkeypatch, tiny_model_factory):
    """The plan a session keeps for the next is the previous plan of a session asking for the
    same ubatch and flash attention only: one made for ubatch 512 is not re-used for 1024."""
    from hybrid_gguf.autoplan import default_plan_path
    from hybrid_gguf.planning.plan import Plan

    inv, session = _sessions_on_a_fake_gpu(tmp_path, monkeypatch, tiny_model_factory)

    first = session()
    f512 = default_plan_path(inv.fingerprint)
    assert f512 == default_plan_path(inv.fingerprint, 512, False) and f512.name == f"{inv.fingerprint[:32]}.yaml"
    assert f512.exists() and not _diff_notices(first.summary.notices)
    assert _diff_notices(session(n_ubatch=512).summary.notices)  # the same settings: re-used
    other = session(n_ubatch=1024)
    f1024 = default_plan_path(inv.fingerprint, 1024)
    assert f1024 != f512 and f1024.exists() and f1024.name.endswith("-ub1024.yaml")
    assert not _diff_notices(other.summary.notices)  # a first plan for 1024, not a diff against 512's
    assert other.plan.memory.n_ubatch == other.llama_kwargs["n_ubatch"] == 1024
    assert Plan.load(f512, inv).memory.n_ubatch == 512 and Plan.load(f1024, inv).memory.n_ubatch == 1024
    assert _diff_notices(session(n_ubatch=1024).summary.notices)  # and 1024's is re-used for 1024
    fa = session(flash_attn=True)
    assert not _diff_notices(fa.summary.notices) and fa.llama_kwargs["flash_attn"] is True
    assert default_plan_path(inv.fingerprint, 512, True).name.endswith("-ub512-fa.yaml")
    assert Plan.load(default_plan_path(inv.fingerprint, 512, True), inv).memory.flash_attn


# --- the KV cache types (-ctk/--cache-type-k, -ctv/--cache-type-v) ------------------------------


def _kv_bytes(placement: dict) -> int:
    return sum(v for k, v in placement["buffers"].items() if k.startswith("kv "))


def test_cache_types_reach_llama_cpp(tiny_model_factory):
    """A placement that is not planned (no GPU here) passes the types to llama.cpp: its context
    has them, its KV buffer shrinks, and a q8_0 cache (K and V, with flash attention) generates."""
    import llama_cpp

    from hybrid_gguf.model import HybridModel

    path = str(tiny_model_factory("qwen3moe", n_layer=2))
    with HybridModel(path, n_ctx=512, n_threads=1, record=False) as hm:  # the default: f16, as before
        params = hm.llm.context_params
        assert (params.type_k, params.type_v) == (llama_cpp.GGML_TYPE_F16, llama_cpp.GGML_TYPE_F16)
        assert (hm.placement.type_k, hm.placement.type_v) == ("f16", "f16")
        f16_kv = _kv_bytes(hm.placement.to_dict())
        f16_tokens = hm.generate("def main():", max_tokens=6).tokens
    with HybridModel(path, n_ctx=512, n_threads=1, record=False, type_k="Q8_0", type_v="q8_0",
                     flash_attn=True) as hm:
        params = hm.llm.context_params
        assert (params.type_k, params.type_v) == (llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q8_0)
        placement = hm.placement.to_dict()
        assert (placement["type_k"], placement["type_v"], placement["flash_attn"]) == ("q8_0", "q8_0", True)
        assert 0 < _kv_bytes(placement) < 0.6 * f16_kv  # 34 bytes per 32 values instead of 64
        tokens = hm.generate("def main():", max_tokens=6).tokens
        assert len(tokens) == 6 and tokens[:2] == f16_tokens[:2]
    with HybridModel(path, n_ctx=512, n_threads=1, record=False, type_k="q4_0") as hm:  # a quantized K alone
        assert (hm.llm.context_params.type_k, hm.llm.context_params.type_v) == (llama_cpp.GGML_TYPE_Q4_0,
                                                                                 llama_cpp.GGML_TYPE_F16)
        assert (hm.placement.type_k, hm.placement.type_v, hm.placement.flash_attn) == ("q4_0", "f16", False)
        assert len(hm.generate("def main():", max_tokens=2).tokens) == 2
    with pytest.raises(HybridError, match="needs flash attention"):
        HybridModel(path, n_ctx=256, record=False, type_v="q8_0")
    with pytest.raises(HybridError, match="unknown KV cache type 'f8'"):
        HybridModel(path, n_ctx=256, record=False, type_k="f8")


def test_run_json_reports_the_cache_types_used(tmp_path, tiny_model_factory):
    path = tiny_model_factory("qwen3moe", n_layer=2)
    base = ["-m", str(path), "-p", "def main():", "-n", "3", "--json", "--no-record", "-t", "1", "-c", "256"]
    env = {"HYBRID_GGUF_HOME": str(tmp_path)}
    res = run_cli(*base, "-ctk", "q8_0", "-ctv", "Q8_0", "-fa", env_extra=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["placement"]["type_k"], out["placement"]["type_v"]) == ("q8_0", "q8_0") and out["gen_tokens"] == 3
    res = run_cli(*base, "--cache-type-k", "bf16", "--cpu-moe", env_extra=env)  # the long name; --cpu-moe
    assert res.returncode == 0, res.stderr
    assert (json.loads(res.stdout)["placement"]["type_k"], json.loads(res.stdout)["placement"]["type_v"]) == \
        ("bf16", "f16")
    res = run_cli(*base, env_extra=env)
    assert res.returncode == 0, res.stderr
    assert (json.loads(res.stdout)["placement"]["type_k"], json.loads(res.stdout)["placement"]["type_v"]) == \
        ("f16", "f16")


def test_a_plan_file_fixes_the_cache_types(tmp_path, tiny_model_factory):
    """A planned placement loads with its plan's KV cache types; asking for others is one line."""
    from hybrid_gguf.autoplan import plan_model

    path = tiny_model_factory("qwen3moe", n_layer=3)
    file = tmp_path / "plan.yaml"
    plan_model(path, 64 * 2**20, 256, out=file, measure=False, calibrate=False, type_k="q8_0", type_v="q4_0",
               flash_attn=True)
    env = {"HYBRID_GGUF_HOME": str(tmp_path)}
    base = ["-m", str(path), "-p", "def main():", "-n", "2", "--json", "--no-record", "-t", "1", "-c", "256",
            "--plan", str(file)]
    res = run_cli(*base, env_extra=env)
    assert res.returncode == 0, res.stderr
    placement = json.loads(res.stdout)["placement"]
    assert (placement["type_k"], placement["type_v"], placement["flash_attn"]) == ("q8_0", "q4_0", True)
    # the plan's own types (any case), and its quantized V without -fa: the plan has flash attention
    assert run_cli(*base, "-ctk", "Q8_0", "-ctv", "q4_0", env_extra=env).returncode == 0
    for extra in (["-ctk", "f16"], ["--cache-type-v", "q8_0"], ["-ctk", "q8_0", "-ctv", "f16"]):
        res = run_cli(*base, *extra, env_extra=env)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert "fixes ubatch 512 and flash attention on (KV cache K q8_0, V q4_0), not --cache-type" in res.stderr
        assert "-ctk TYPE" in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_placements_that_are_not_planned_take_the_cache_types_as_given(tiny_model_factory):
    from hybrid_gguf.autoplan import session_plan
    from hybrid_gguf.header.inventory import read_inventory
    from hybrid_gguf.llama import devices
    from hybrid_gguf.planning.memory import CACHE_TYPE_IDS

    gpu = devices.Device(index=1, name="CUDA0", description="fake", type="gpu", free_bytes=8 << 30,
                         total_bytes=8 << 30)
    path = tiny_model_factory("qwen3moe", n_layer=4)
    inv = read_inventory(path)
    q8 = CACHE_TYPE_IDS["q8_0"]
    f16 = CACHE_TYPE_IDS["f16"]
    for gpus, kw in (([gpu], dict(n_cpu_moe=2)), ([gpu], dict(cpu_moe=True)), ([gpu], dict(hot={0: [1]})),
                     ([], {})):  # no GPU
        if "hot" in kw and not hybrid_backend.capability().per_expert:
            continue
        s = session_plan(path, inv, gpus, 1024, type_k="q8_0", type_v="q8_0", flash_attn=True, **kw)
        assert (s.llama_kwargs["type_k"], s.llama_kwargs["type_v"], s.llama_kwargs["flash_attn"]) == (q8, q8, True)
        s = session_plan(path, inv, gpus, 1024, **kw)  # nothing asked: f16
        assert (s.llama_kwargs["type_k"], s.llama_kwargs["type_v"]) == (f16, f16), kw
        with pytest.raises(HybridError, match="needs flash attention"):
            session_plan(path, inv, gpus, 1024, type_v="q8_0", **kw)
    # the whole-layer plan is a plan: made for the cache asked for
    s = session_plan(path, inv, [gpu], 1024, type_k="q4_0", auto_plan=False)
    assert (s.llama_kwargs["type_k"], s.llama_kwargs["type_v"]) == (CACHE_TYPE_IDS["q4_0"], CACHE_TYPE_IDS["f16"])


def test_a_stored_session_plan_is_kept_per_cache_type(tmp_path, monkeypatch, tiny_model_factory):
    """The automatic plan is made for the KV cache types asked for (a q8_0 cache leaves more of
    the budget to experts) and kept apart from the f16 one."""
    from hybrid_gguf.autoplan import default_plan_path
    from hybrid_gguf.planning.memory import CACHE_TYPE_IDS, kv_cache_bytes, predict_memory
    from hybrid_gguf.planning.plan import Plan

    inv, session = _sessions_on_a_fake_gpu(tmp_path, monkeypatch, tiny_model_factory)

    plain = session()
    f16 = default_plan_path(inv.fingerprint)
    assert f16 == default_plan_path(inv.fingerprint, 512, False, "f16", "f16") and f16.exists()
    q8 = session(type_k="q8_0", type_v="Q8_0", flash_attn=True)
    fq8 = default_plan_path(inv.fingerprint, 512, True, "q8_0", "q8_0")
    assert fq8.name == f"{inv.fingerprint[:32]}-ub512-fa-ctkq8_0-ctvq8_0.yaml" and fq8.exists()
    assert not _diff_notices(q8.summary.notices)  # a first plan for q8_0, not a diff against f16's
    assert (q8.plan.memory.type_k, q8.plan.memory.type_v) == ("q8_0", "q8_0")
    assert (q8.llama_kwargs["type_k"], q8.llama_kwargs["type_v"]) == (CACHE_TYPE_IDS["q8_0"],) * 2
    assert (plain.llama_kwargs["type_k"], plain.llama_kwargs["type_v"]) == (CACHE_TYPE_IDS["f16"],) * 2
    assert Plan.load(fq8, inv).memory.type_v == "q8_0" and Plan.load(f16, inv).memory.type_v == "f16"
    # the plan's memory prediction (its budget) counts the smaller cache
    kv = [predict_memory(inv, None, s.plan.memory).devices["GPU"].kv for s in (plain, q8)]
    assert kv == [kv_cache_bytes(inv, 2048), kv_cache_bytes(inv, 2048, "q8_0", "q8_0")] and kv[1] < kv[0]
    assert _diff_notices(session(type_k="q8_0", type_v="q8_0", flash_attn=True).summary.notices)  # re-used
    assert default_plan_path(inv.fingerprint, 512, False, "q4_0").name.endswith("-ub512-ctkq4_0.yaml")
