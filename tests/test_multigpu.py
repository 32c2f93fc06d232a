"""Several GPUs (issue 19): budgets per device, one knapsack per card, the plan's devices
(per-device listing, YAML, refusal elsewhere) and the patch's pack device per layer.

No GPU here: the planner is pure and plans for assumed devices; the patch's per-layer
buffer choice is checked with CPU names. The two-card runs are `scripts/gpu_eval.sh multigpu`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from hybrid_gguf.errors import HybridError
from hybrid_gguf.header.inventory import read_inventory
from hybrid_gguf.planning import memory as mm
from hybrid_gguf.planning.budget import VRAM_RESERVE, device_budgets, parse_budget, usable_budget
from hybrid_gguf.planning.placement import EXPERT_TENSOR_RE, PlacementRule, TensorPlacement, plan_text
from hybrid_gguf.planning.plan import DeviceBudget, Plan
from hybrid_gguf.planning.calibration import Bandwidth
from hybrid_gguf.planning.planner import _layer_costs, make_plan
from hybrid_gguf.routing.profile import RoutingProfile

MIB = mm.MIB
GIB = 1024 * MIB
OPTS = mm.MemoryOptions(1024, compute_bytes=256 * 1024, margin_bytes=64 * 1024, margin_fraction=0.01)
TWO = ["CUDA0", "CUDA1"]


@pytest.fixture(scope="module")
def inv(tiny_model_factory):
    return read_inventory(tiny_model_factory("qwen3moe", n_layer=8))


def profile(inv, peaked_layers=(), seed=0) -> RoutingProfile:
    """Zipf-like routing; `peaked_layers` send nearly every token to one expert, so their
    top expert is worth far more per byte than any other layer's."""
    rng = np.random.default_rng(seed)
    L, E, k = inv.n_layer, inv.n_expert, inv.n_expert_used
    counts = np.zeros((L, E))
    w = 1.0 / np.arange(1, E + 1)
    for l in range(L):
        p = rng.permutation(w / w.sum())
        if l in peaked_layers:
            p = np.full(E, 0.01 / (E - 1))
            p[l % E] = 0.99
        counts[l] = rng.multinomial(5000 * k, p)
    return RoutingProfile(inv.fingerprint, inv.arch, L, E, k, counts, np.zeros((L, E)), np.full(L, 5000.0),
                          np.zeros(L), sessions=1)


def base(inv, split):
    """GPU bytes per device with every expert in host memory (what a budget holds first)."""
    host = TensorPlacement((PlacementRule(EXPERT_TENSOR_RE, "CPU"),))
    pred = mm.predict_memory(inv, host, OPTS, gpus=TWO, tensor_split=split)
    return {g: pred.devices[g].total for g in TWO}


def check_per_device(plan, inv):
    """What holds for every plan over several GPUs."""
    ldev = plan.layer_devices()
    for d in plan.devices:
        assert plan.predicted.memory[d.name]["total"] <= d.budget_bytes
    # each hot pack on its layer's card, and no rule moves a layer's experts to another card
    assert plan.pack_devices() == {l: ldev[l] for l in plan.hot}
    assert all(r.device == "CPU" for r in plan.rules)
    per = plan.per_device(inv)
    assert sorted(l for d in per for l in d["layers"]) == list(range(inv.n_layer))
    assert sum(d["hot_experts"] for d in per) == sum(len(v) for v in plan.hot.values())
    for d in per:
        assert all(ldev[int(l)] == d["name"] for l in d["hot"]) and all(ldev[l] == d["name"] for l in d["whole_layers"])
        assert d["bytes"] == plan.predicted.memory[d["name"]]["total"]
    return per


# -- budgets -----------------------------------------------------------------------------------


def test_gpu_budget_is_one_total_or_one_per_device():
    assert parse_budget("8GiB") == 8 * GIB and parse_budget(None) is None and parse_budget(5) == 5
    assert parse_budget("20GiB,12GiB") == [20 * GIB, 12 * GIB]
    assert parse_budget(" 20GiB , 512MiB ") == [20 * GIB, 512 * MIB]
    for bad in ("20GiB,", ",8GiB", "20GiB,,1G", "twelve"):
        with pytest.raises(HybridError):
            parse_budget(bad)


def test_a_total_is_split_by_free_memory():
    free = [("CUDA0", 30 * GIB + VRAM_RESERVE), ("CUDA1", 10 * GIB + VRAM_RESERVE)]
    devs, notes = device_budgets(20 * GIB, free)
    assert [d.name for d in devs] == ["CUDA0", "CUDA1"]
    assert [d.budget_bytes for d in devs] == [15 * GIB, 5 * GIB]  # 3:1, as their free memory
    assert devs[0].free_bytes == free[0][1] and "split by free memory" in notes[-1]
    # more than both can give: each gets what it can, and a note says so
    devs, notes = device_budgets(100 * GIB, free)
    assert [d.budget_bytes for d in devs] == [30 * GIB, 10 * GIB] and "exceeds" in notes[0]
    # None: all each can give
    assert [d.budget_bytes for d in device_budgets(None, free)[0]] == [30 * GIB, 10 * GIB]
    # free memory not known (no GPU to ask): evenly
    assert [d.budget_bytes for d in device_budgets(9, [("A", None), ("B", None)])[0]] == [5, 4]


def test_one_budget_per_device():
    free = [("CUDA0", 30 * GIB + VRAM_RESERVE), ("CUDA1", 10 * GIB + VRAM_RESERVE)]
    devs, notes = device_budgets([20 * GIB, 12 * GIB], free)
    assert [d.budget_bytes for d in devs] == [20 * GIB, 10 * GIB]  # CUDA1 lowered to what it can give
    assert len(notes) == 1 and "CUDA1" in notes[0] and "exceeds" in notes[0]
    with pytest.raises(HybridError, match="lists 3 budgets for 2 devices"):
        device_budgets([1, 2, 3], free)
    # stated sizes (plan --assume-devices): no reserve, a total split in proportion to them
    stated = [("CUDA0", 24 * GIB), ("CUDA1", 16 * GIB)]
    assert [d.budget_bytes for d in device_budgets(None, stated, stated=True)[0]] == [24 * GIB, 16 * GIB]
    assert [d.budget_bytes for d in device_budgets(20 * GIB, stated, stated=True)[0]] == [12 * GIB, 8 * GIB]
    devs, notes = device_budgets([30 * GIB, 8 * GIB], stated, stated=True)
    assert [d.budget_bytes for d in devs] == [24 * GIB, 8 * GIB] and "stated" in notes[0]


def test_one_gpu_keeps_the_one_budget_rule():
    free = 8 * GIB
    for req in (None, 4 * GIB, 9 * GIB):
        devs, notes = device_budgets(req, [("CUDA0", free)])
        budget, note = usable_budget(req, free, "CUDA0")
        assert [(d.name, d.budget_bytes, d.free_bytes) for d in devs] == [("CUDA0", budget, free)]
        assert notes == ([note] if note else [])


def test_detect_devices_plans_for_every_gpu(monkeypatch):
    from hybrid_gguf.autoplan import detect_devices
    from hybrid_gguf.llama import devices

    gpus = [devices.Device(index=i + 1, name=f"CUDA{i}", description="fake", type="gpu",
                           free_bytes=f + VRAM_RESERVE, total_bytes=80 * GIB) for i, f in enumerate((12 * GIB, 4 * GIB))]
    monkeypatch.setattr(devices, "gpu_devices", lambda: gpus)
    devs, _ = detect_devices(8 * GIB, all_gpus=True)
    assert [(d.name, d.budget_bytes) for d in devs] == [("CUDA0", 6 * GIB), ("CUDA1", 2 * GIB)]
    devs, _ = detect_devices([10 * GIB, 2 * GIB], all_gpus=True)
    assert [d.budget_bytes for d in devs] == [10 * GIB, 2 * GIB]
    # the first GPU only (the bench's placements): the total on it, as before
    devs, _ = detect_devices(8 * GIB)
    assert [(d.name, d.budget_bytes) for d in devs] == [("CUDA0", 8 * GIB)]
    monkeypatch.setattr(devices, "gpu_devices", lambda: [])
    with pytest.raises(HybridError, match="no GPU is visible here.*--assume-devices"):
        detect_devices([1, 2], all_gpus=True)


# -- the planner -------------------------------------------------------------------------------


def test_uneven_budgets_fill_each_card_with_its_own_layers(inv):
    prof = profile(inv)
    fixed = base(inv, [2, 1])
    per_layer = inv.layers[0].expert_bytes
    devs = [DeviceBudget("CUDA0", fixed["CUDA0"] + int(2.3 * per_layer)),
            DeviceBudget("CUDA1", fixed["CUDA1"] + int(0.6 * per_layer))]
    plan = make_plan(inv, 0, 1024, prof, devices=devs, memory=OPTS, promote_fraction=2.0)
    assert plan.tensor_split == [float(d.budget_bytes) for d in devs]
    assert plan.hot_device == "auto" and plan.hybrid_plan_text().startswith("buft=auto;")
    per = check_per_device(plan, inv)
    assert all(d["hot_experts"] or d["whole_layers"] for d in per)  # both cards hold experts
    # a decode step passes once from CUDA0's layers to CUDA1's; one card never does
    assert plan.predicted.speed_terms["decode_ms"]["card_hops"] == 1e3 * Bandwidth().gpu_hop_s
    one = make_plan(inv, 0, 1024, prof, devices=devs[:1], memory=OPTS, promote_fraction=2.0)
    assert "card_hops" not in one.predicted.speed_terms["decode_ms"]
    # no card leaves room for one more expert of its own layers (the knapsack spent it)
    ldev = plan.layer_devices()
    whole = {l for d in per for l in d["whole_layers"]}
    for d in plan.devices:
        room = d.budget_bytes - plan.predicted.memory[d.name]["total"]
        for layer in inv.layers:
            if ldev[layer.index] != d.name or layer.index in whole:
                continue
            n = len(plan.hot.get(layer.index, []))
            step = int(_layer_costs(inv, layer)[n + 1] - _layer_costs(inv, layer)[n])
            assert step * (1 + OPTS.margin_fraction) > room, (d.name, layer.index)


def test_a_layer_that_does_not_fit_its_card_stays_on_the_cpu(inv):
    # CUDA0 holds layers 0-4 but has room for no expert; CUDA1 (layers 5-7) has room to spare.
    # CUDA0's layers route almost every token to one expert, worth more than anything on
    # CUDA1: a single knapsack over both cards would take them, but they are not CUDA1's.
    fixed = base(inv, [1, 1])
    b0 = fixed["CUDA0"] + 64 * 1024
    devs = [DeviceBudget("CUDA0", b0), DeviceBudget("CUDA1", int(b0 / 1.1))]
    assert fixed["CUDA1"] + 4 * inv.layers[0].per_expert_bytes < devs[1].budget_bytes
    prof = profile(inv, peaked_layers=range(5))
    plan = make_plan(inv, 0, 1024, prof, devices=devs, memory=OPTS)
    assert plan.layer_devices() == ["CUDA0"] * 5 + ["CUDA1"] * 4
    per = check_per_device(plan, inv)
    assert per[0]["hot_experts"] == 0 and per[0]["whole_layers"] == []
    assert per[1]["hot_experts"] + len(per[1]["whole_layers"]) > 0
    assert not set(plan.hot) & set(range(5))
    # one card with both budgets would have spent bytes on those layers first
    one = make_plan(inv, sum(d.budget_bytes for d in devs), 1024, prof, devices=[DeviceBudget("CUDA0", b0 * 2)],
                    memory=OPTS)
    assert set(one.gpu_experts(inv)) & set(range(5))
    assert one.hot_device == "CUDA0" and one.tensor_split is None  # one GPU: as before


def test_the_previous_plan_is_kept_on_the_same_gpus_only(inv):
    fixed = base(inv, [1, 1])
    devs = [DeviceBudget(g, fixed[g] + inv.layers[0].expert_bytes) for g in TWO]
    # cheap hand-offs: the hit-rate hysteresis decides here, not the speed model's promotions
    bw = Bandwidth(handoff_s=20e-6, handoff_idle_s=20e-6)
    first = make_plan(inv, 0, 1024, profile(inv), devices=devs, memory=OPTS, bandwidth=bw)
    again = make_plan(inv, 0, 1024, profile(inv, seed=1), devices=devs, memory=OPTS, previous=first,
                      hysteresis=0.5, bandwidth=bw)
    assert again.hot == first.hot and any("kept the previous hot set" in n for n in again.notes)
    check_per_device(again, inv)
    other = [DeviceBudget("CUDA0", devs[0].budget_bytes), DeviceBudget("CUDA2", devs[1].budget_bytes)]
    moved = make_plan(inv, 0, 1024, profile(inv), devices=other, memory=OPTS, previous=first, hysteresis=0.5)
    assert any("previous plan is for other GPUs" in n for n in moved.notes)


def test_the_worker_plans_across_cards(inv):
    """handoff="worker" over two cards: the split layers of both cards go to the CPU worker
    (its split tests passed on two H200s), priced at the worker's costs."""
    fixed = base(inv, [1, 1])
    devs = [DeviceBudget(g, fixed[g] + inv.layers[0].expert_bytes) for g in TWO]
    bw = Bandwidth(handoff_s=150e-6, handoff_idle_s=100e-6, worker_handoff_s=150e-6, worker_handoff_idle_s=2e-6)
    plan = make_plan(inv, 0, 1024, profile(inv), devices=devs, memory=OPTS, bandwidth=bw, handoff="worker")
    assert plan.worker
    split = [l for l, es in plan.hot.items() if 0 < len(es) < inv.layers[l].n_expert]
    assert {plan.layer_devices()[l] for l in split} == set(TWO), "split layers on both cards"
    check_per_device(plan, inv)


def test_plan_yaml_keeps_the_devices(inv, tmp_path):
    fixed = base(inv, [1, 1])
    devs = [DeviceBudget("CUDA0", fixed["CUDA0"] + inv.layers[0].expert_bytes, free_bytes=24 * GIB),
            DeviceBudget("CUDA1", fixed["CUDA1"] + inv.layers[0].expert_bytes, free_bytes=16 * GIB)]
    plan = make_plan(inv, 0, 1024, profile(inv), devices=devs, memory=OPTS)
    again = Plan.load(plan.save(tmp_path / "two.yaml"), inv)
    assert again.devices == plan.devices and again.tensor_split == plan.tensor_split
    assert again.hot_device == "auto" and again.hot == plan.hot
    assert again.hybrid_plan_text() == plan.hybrid_plan_text()
    assert again.per_device(inv) == plan.per_device(inv)
    assert again.llama_kwargs()["tensor_split"] == plan.tensor_split
    d = json.loads(json.dumps(plan.to_json_dict()))
    assert [x["name"] for x in d["devices"]] == TWO and d["hot_device"] == "auto"


def test_plan_text_names_a_pack_device_per_layer():
    hot = {0: [3, 17], 1: [5], 4: []}
    assert plan_text(hot, "auto") == "buft=auto;0:3,17;1:5"
    assert plan_text(hot, "CUDA0", layer_buffer_types={1: "CUDA1"}) == "buft=CUDA0;0:3,17;1@CUDA1:5"
    assert plan_text(hot, None, cold_on_gpu=True, layer_buffer_types={0: "CPU"}) == "cold=gpu;0@CPU:3,17;1:5"
    for bad in ("", "CU;DA", "a@b", "GPU"):
        with pytest.raises(HybridError, match="pack device"):
            plan_text(hot, None, layer_buffer_types={0: bad})


def test_per_layer_pack_devices_need_patch_version_5(monkeypatch):
    pytest.importorskip("llama_cpp")
    from hybrid_gguf.llama import hybrid
    from hybrid_gguf.planning.placement import per_layer_pack_text

    assert per_layer_pack_text("buft=auto;0:1") and per_layer_pack_text("0@CUDA1:1,2;1:3")
    assert not per_layer_pack_text("buft=CUDA0;cold=gpu;0:1,2") and not per_layer_pack_text("")
    monkeypatch.setattr(hybrid, "capability", lambda: hybrid.Capability(True, 4, "older patch"))
    with pytest.raises(HybridError, match="version 5"):
        with hybrid.pending_plan("buft=auto;0:1"):
            pass


# -- the plan on another machine ---------------------------------------------------------------


def two_gpu_plan(inv) -> Plan:
    devs = [DeviceBudget("CUDA0", 24 * GIB), DeviceBudget("CUDA1", 16 * GIB)]
    plan = make_plan(inv, 0, 1024, profile(inv), devices=devs, memory=OPTS)
    plan.hot = {0: [1, 2], 7: [3]}  # packs on both cards whatever the budgets left
    plan.hot_device = "auto"
    return plan


def test_a_plan_refuses_other_gpus(inv):
    plan = two_gpu_plan(inv)
    plan.check_devices([("CUDA0", 80 * GIB), ("CUDA1", 80 * GIB)])
    plan.check_devices([])  # no GPU here: the plan runs on the CPU (said elsewhere)
    for here, why in (([("CUDA0", 80 * GIB)], "CUDA1 not found"),
                      ([("CUDA0", 80 * GIB), ("CUDA1", 8 * GIB)], "CUDA1 has 8.00 GiB in all")):
        with pytest.raises(HybridError) as info:
            plan.check_devices(here)
        msg = str(info.value)
        assert "\n" not in msg and why in msg and "CUDA0 24.00 GiB, CUDA1 16.00 GiB" in msg and "re-plan" in msg
    # the stand-in "GPU" (planned where no GPU was visible) runs on any machine's first GPU
    plan.devices = [DeviceBudget("GPU", 8 * GIB)]
    plan.check_devices([("CUDA3", 4 * GIB)])


def test_the_layer_split_follows_the_plan_on_any_machine(inv):
    plan = two_gpu_plan(inv)
    assert plan.tensor_split_here(TWO) == plan.tensor_split
    assert plan.tensor_split_here(TWO + ["CUDA2"]) == plan.tensor_split + [0.0]
    one = make_plan(inv, 4 * GIB, 1024, profile(inv), devices=[DeviceBudget("CUDA1", 4 * GIB)], memory=OPTS)
    assert one.tensor_split_here(["CUDA1"]) is None  # one GPU here and planned: as before
    assert one.tensor_split_here(TWO) == [0.0, 1.0]  # a one-card plan stays on its card
    one.devices = []
    assert one.tensor_split_here(TWO) == [1.0, 0.0]  # the stand-in: the first GPU


def test_run_plan_refuses_a_machine_with_other_gpus(tiny_model_factory):
    pytest.importorskip("llama_cpp")
    from hybrid_gguf.autoplan import session_plan
    from hybrid_gguf.llama import hybrid

    if not hybrid.capability().per_expert:
        pytest.skip(hybrid.STOCK_NOTICE)
    path = tiny_model_factory("qwen3moe", n_layer=8)
    inv = read_inventory(path)
    plan = two_gpu_plan(inv)

    gpus = fake_gpus
    with pytest.raises(HybridError, match="the plan is for other GPUs.*CUDA1 not found"):
        session_plan(path, inv, gpus("CUDA0"), 1024, plan=plan)
    chosen = session_plan(path, inv, gpus("CUDA0", "CUDA1", "CUDA2"), 1024, plan=plan)
    assert chosen.llama_kwargs["tensor_split"] == plan.tensor_split + [0.0]
    assert chosen.summary.pack_device == "auto"
    assert set(chosen.summary.gpu_experts) >= {0, 7}


def fake_gpus(*names, free=70 * GIB):
    from hybrid_gguf.llama import devices

    return [devices.Device(index=i + 1, name=n, description="fake", type="gpu", free_bytes=free,
                           total_bytes=80 * GIB) for i, n in enumerate(names)]


def test_a_session_on_two_gpus_splits_its_budget_and_layers(tiny_model_factory, monkeypatch):
    pytest.importorskip("llama_cpp")
    from hybrid_gguf.autoplan import session_plan
    from hybrid_gguf.llama import hybrid

    path = tiny_model_factory("qwen3moe", n_layer=8)
    inv = read_inventory(path)
    s = session_plan(path, inv, fake_gpus("CUDA0", "CUDA1"), 1024, gpu_budget="300MiB,200MiB", auto_plan=False)
    assert s.summary.gpu_budget_bytes == 500 * MIB and s.llama_kwargs["tensor_split"] == [300.0 * MIB, 200.0 * MIB]
    with pytest.raises(HybridError, match="lists 3 budgets for 2 devices"):
        session_plan(path, inv, fake_gpus("CUDA0", "CUDA1"), 1024, gpu_budget="1GiB,1GiB,1GiB", auto_plan=False)
    # hot experts by hand: packs on each layer's card where the patch can
    monkeypatch.setattr(hybrid, "capability", lambda: hybrid.Capability(True, 5, "v5"))
    s = session_plan(path, inv, fake_gpus("CUDA0", "CUDA1"), 1024, hot={0: [1], 7: [2]})
    assert s.summary.pack_device == "auto" and "each layer's GPU" in s.summary.description
    s = session_plan(path, inv, fake_gpus("CUDA0"), 1024, hot={0: [1], 7: [2]})
    assert s.summary.pack_device == "CUDA0"  # one GPU: as before
    monkeypatch.setattr(hybrid, "capability", lambda: hybrid.Capability(True, 4, "v4"))
    s = session_plan(path, inv, fake_gpus("CUDA0", "CUDA1"), 1024, hot={0: [1], 7: [2]})
    assert s.summary.pack_device == "CUDA0"


def test_a_card_without_budget_takes_no_layers(inv):
    plan = make_plan(inv, 0, 1024, profile(inv), devices=[DeviceBudget("CUDA0", 64 * MIB), DeviceBudget("CUDA1", 0)],
                     memory=OPTS)
    assert plan.device_names() == ["CUDA0"] and plan.tensor_split is None and plan.n_gpu_layers != 0
    assert any("CUDA1: no GPU budget" in n for n in plan.notes)
    assert plan.tensor_split_here(TWO) == [1.0, 0.0]


def test_plan_assume_devices_cli(tmp_path, tiny_model_factory):
    pytest.importorskip("llama_cpp")
    path = tiny_model_factory("qwen3moe", n_layer=8)
    env = dict(os.environ, HYBRID_GGUF_HOME=str(tmp_path))

    def hg(*args):
        # no profile stored: whole layers, each card's last layers first; the analytic
        # compute buffer of this model is ~15 MiB per card
        return subprocess.run([sys.executable, "-m", "hybrid_gguf.cli", "plan", str(path), "--ctx", "1024",
                               "--no-measure", "--no-calibrate", "--margin", "1MiB", *args], capture_output=True,
                              text=True, env=env, timeout=120)

    out = tmp_path / "two.yaml"
    res = hg("--assume-devices", "CUDA0:24MiB,CUDA1:20MiB", "--json", "--out", str(out))
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert [(x["name"], x["budget_bytes"]) for x in d["per_device"]] == [("CUDA0", 24 * MIB), ("CUDA1", 20 * MIB)]
    for x in d["per_device"]:
        assert 0 < x["bytes"] <= x["budget_bytes"] and x["layers"] and x["whole_layers"]
    assert Plan.load(out).device_names() == TWO
    res = hg("--assume-devices", "CUDA0:24MiB,CUDA1:24MiB", "--gpu-budget", "40MiB", "--json")
    assert [x["budget_bytes"] for x in json.loads(res.stdout)["per_device"]] == [20 * MIB, 20 * MIB]
    # the CPU worker across cards is no longer refused; the plan says it is untimed there
    # (no profile here, so no split layer to hand off: test_the_worker_plans_across_cards)
    res = hg("--assume-devices", "CUDA0:24MiB,CUDA1:24MiB", "--handoff", "worker", "--json")
    assert res.returncode == 0, res.stderr
    assert any("not yet timed there" in n for n in json.loads(res.stdout)["notes"])
    res = hg("--assume-devices", "CUDA0:24MiB,CUDA1:24MiB", "--gpu-budget", "22MiB,18MiB")
    assert res.returncode == 0 and "CUDA1: " in res.stdout and "of 18.00 MiB; layers" in res.stdout, res.stdout
    for args, msg in ((("--assume-devices", "CUDA0=6MiB,CUDA0:1G"), "names a device twice"),
                      (("--assume-devices", "6MiB"), "NAME:SIZE"),
                      (("--gpu-budget", "1GiB,1GiB,1GiB"), "budgets"),
                      ((), "give --gpu-budget")):
        res = hg(*args)
        assert res.returncode != 0 and msg in res.stderr, res.stderr
        assert "Traceback" not in res.stderr


# -- the patch: a pack buffer type per layer (CPU names here) ----------------------------------


@pytest.fixture(scope="module")
def patch_v5():
    pytest.importorskip("llama_cpp")
    from hybrid_gguf.llama import hybrid

    if hybrid.capability().version < 5:
        msg = f"the backend's hybrid patch is version {hybrid.capability().version}; per-layer packs need 5"
        if os.environ.get("HYBRID_GGUF_REQUIRE_PATCHED") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return hybrid


LOAD = dict(n_ctx=128, n_batch=64, seed=1, verbose=False, n_gpu_layers=0)


def test_each_layer_gets_its_own_pack_buffer_type(patch_v5, tiny_model_factory):
    from hybrid_gguf.llama.loader import load_llama

    from hybrid_gguf.llama.devices import gpu_devices

    # a layer the mapping leaves out goes to the first GPU (the CPU where there is none);
    # "auto" follows the layer's router, on the CPU here (n_gpu_layers=0)
    first = gpu_devices()[0].name if gpu_devices() else "CPU"
    path = tiny_model_factory("qwen3moe", n_layer=3)
    hot = {0: [1, 2], 2: [0]}
    for pack_device, last in (({0: "CPU"}, first), ({0: "CPU", 2: "CPU"}, "CPU"), ("auto", "CPU"), ("CPU", "CPU")):
        loaded = load_llama(path, None, hot=hot, pack_device=pack_device, **LOAD)
        try:
            model = loaded.llm._model.model
            assert [patch_v5.pack_buffer_type(model, l) for l in range(3)] == ["CPU", None, last]
            assert [patch_v5.n_hot(model, l) for l in range(3)] == [2, 0, 1]
            # one log line per pack buffer: the CPU's and, on a GPU machine, the first GPU's
            found = [re.search(r"hybrid: (\d+) hot experts in (\d+) layers", line) for line in loaded.log]
            per_buffer = [(int(m.group(1)), int(m.group(2))) for m in found if m]
            assert tuple(map(sum, zip(*per_buffer))) == (3, 2), per_buffer
        finally:
            loaded.close()


def test_an_unknown_pack_device_is_one_clear_error(patch_v5, tiny_model_factory):
    from hybrid_gguf.llama.loader import load_llama

    path = tiny_model_factory("qwen3moe", n_layer=3)
    for pack_device, name in (({2: "CUDA7"}, "'CUDA7' (layer 2)"), ("NPU3", "'NPU3' (layer 0)")):
        with pytest.raises(HybridError) as info:
            load_llama(path, None, hot={0: [1], 2: [0]}, pack_device=pack_device, **LOAD)
        assert "no buffer type or device named " + name in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(HybridError, match="rejected the hybrid plan text"):
        with patch_v5.pending_plan("0@:1,2"):
            pass


def test_packs_on_their_layers_device_compute_the_same(patch_v5, tiny_model_factory):
    from greedy import greedy
    from hybrid_gguf.llama.loader import load_llama

    path = tiny_model_factory("qwen3moe", n_layer=3)
    prompt = [1] + [3 + b for b in b"def main(argv):"]
    runs = []
    for hot, pack_device in (({}, None), ({0: [1, 5], 1: [0, 2, 4], 2: [7]}, "auto"),
                             ({0: [1, 5], 2: [7]}, {0: "CPU"})):
        loaded = load_llama(path, None, hot=hot, pack_device=pack_device, **LOAD)
        runs.append(greedy(loaded.llm, prompt, 6))
        loaded.close()
    for run in runs[1:]:
        assert run.tokens == runs[0].tokens
        assert np.max(np.abs(run.logits - runs[0].logits)) < 1e-3
