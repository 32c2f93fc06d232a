"""Scripts that read the GPU machine's outputs: scripts/ncu_layers.py (an ncu CSV of a few decode
steps summed per kernel, gpu_eval.sh ncuidle) and scripts/repredict.py (saved bench rows
predicted again with today's hand-off defaults) and scripts/cache_windows.py (the cache replayed
on windows of a real trace, and what `plan --cache auto` picks)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "ncu_layers.py"

CSV = """==PROF== Connected to process 7 (/usr/bin/python3.12)
==PROF== Profiling "k_hybrid_post" - 0: 0%....50%....100% - 1 pass
"ID","Process ID","Process Name","Kernel Name","gpu__time_duration.sum"
"","","","","usecond"
"0","7","python3","k_hybrid_post(const float *, const int *, const float *)","4.5"
"1","7","python3","void mul_mat_vec_q<(ggml_type)12, 1, false>(const void *, const void *, float *, int)","8.0"
"2","7","python3","k_hybrid_post(const float *, const int *, const float *)","5.5"
"3","7","python3","void (anonymous namespace)::topk<int>(int)","1,000"
"""


def test_kernels_are_summed_by_short_name_per_step_and_layer(tmp_path):
    path = tmp_path / "ncu.csv"
    path.write_text(CSV)
    out = subprocess.run([sys.executable, str(SCRIPT), str(path), "2", "1"], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0].startswith("4 kernels in 2 steps: 2 per step, 509.0 us of kernel time per step")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert set(rows) == {"k_hybrid_post", "mul_mat_vec_q", "topk"}
    assert rows["k_hybrid_post"] == ["1.0", "1.00", "5.0", "5.00"]
    assert rows["topk"][2:] == ["500.0", "1000.00"]  # "1,000" us, thousands separator and all


def test_no_kernels_and_bad_arguments_say_so(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("==PROF== Disconnected\n")
    res = subprocess.run([sys.executable, str(SCRIPT), str(empty), "2", "48"], capture_output=True, text=True)
    assert res.returncode == 1 and "no kernels profiled" in res.stdout
    res = subprocess.run([sys.executable, str(SCRIPT), str(empty)], capture_output=True, text=True)
    assert res.returncode == 2 and "ncu_layers.py" in res.stderr


def test_saved_rows_are_predicted_again_with_each_rows_own_hand_off():
    """A worker row is priced with the worker's hand-off, a scheduler row with the scheduler's:
    raising only the worker's busy cost slows only the worker row."""
    import json
    from dataclasses import replace

    sys.path.insert(0, str(SCRIPT.parent))
    import repredict
    from hybrid_gguf.planning.calibration import Bandwidth

    path = SCRIPT.parents[1] / "docs" / "results" / "h200-2026-11-30k" / "workerab_default_realistic_0.25_v11_call6.slim.json"
    bench = json.loads(path.read_text())
    rows = {name: (measured, now) for name, measured, _, now in repredict.repredict(bench, Bandwidth())}
    assert set(rows) == {"per-expert-worker", "per-expert-scheduler"}
    slower = {name: now for name, _, _, now in repredict.repredict(bench, replace(Bandwidth(), worker_handoff_s=1e-3))}
    assert slower["per-expert-worker"] < rows["per-expert-worker"][1]
    assert slower["per-expert-scheduler"] == rows["per-expert-scheduler"][1]
    out = subprocess.run([sys.executable, str(SCRIPT.parent / "repredict.py"), str(path)], capture_output=True,
                         text=True, check=True, cwd=SCRIPT.parents[1]).stdout
    assert "per-expert-scheduler" in out and "hand-off defaults" in out


def test_rooflines_are_priced_again_at_the_hosts_gpu_rate():
    """--gpu-from: a run without an all-GPU row priced its GPU at the default rate; the same
    host's all-GPU row (another call, same model) fits a slower one, and every roofline of the
    run falls with it (the thirteenth lease: optimistic 25 % from 0.65x to 0.78x of roofline)."""
    import json

    sys.path.insert(0, str(SCRIPT.parent))
    import repredict

    results = SCRIPT.parents[1] / "docs" / "results" / "h200-2026-12-01b"
    allhot = json.loads((results / "allhot_optimistic_call5.slim.json").read_text())
    rate = repredict.host_gpu_rate(allhot)
    assert 0.5e12 < rate < 1.5e12  # 211 tok/s all on the GPU where the default predicts 258
    bench = json.loads((results / "workerab_hugepages_optimistic_0.25_call3.slim.json").read_text())
    roofs = {name: (saved, host) for name, _, saved, host in repredict.rooflines(bench, rate)}
    assert set(roofs) == {"per-expert-worker", "per-expert-worker-hugepages", "per-expert-scheduler"}
    assert all(host < saved for saved, host in roofs.values())
    out = subprocess.run([sys.executable, str(SCRIPT.parent / "repredict.py"), "--gpu-from",
                          str(results / "allhot_optimistic_call5.slim.json"),
                          str(results / "workerab_hugepages_optimistic_0.25_call3.slim.json")],
                         capture_output=True, text=True, check=True, cwd=SCRIPT.parents[1]).stdout
    assert "at the host's GPU rate" in out and "(0.782x)" in out


def test_saved_benches_of_several_budgets_are_predicted_again():
    """A bench run at several budgets saves a list of runs: each run's rows are priced again
    (the script used to stop on such a file with an AttributeError)."""
    path = SCRIPT.parents[1] / "docs" / "results" / "h200-2026-11-30b" / "coldab_realistic_10_50_call9.slim.json"
    out = subprocess.run([sys.executable, str(SCRIPT.parent / "repredict.py"), str(path)], capture_output=True,
                         text=True, check=True, cwd=SCRIPT.parents[1]).stdout
    rows = [line for line in out.splitlines() if " measured " in line]
    assert len(rows) >= 4 and "hand-off defaults" in out


def test_cache_windows_reproduce_the_fourteenth_lease_replays():
    """scripts/cache_windows.py on the saved real-trace bench: the static packs hit 0.271 of the
    timed window (as measured) and 0.46 over 1024 rows, and `auto`, priced with a host cost per
    upload, picks a seeded cache there."""
    bench = REPO / "docs/results/h200-2026-12-01c/realtrace_0.25_call4.slim.json"
    script = str(SCRIPT.parent / "cache_windows.py")
    out = subprocess.run([sys.executable, script, "windows", str(bench), "--pp", "256", "--also", "32:1024"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in out.splitlines()[1:]}
    assert rows["256..320"][0] == 0.271 and rows["32..1056"][0] == 0.46
    assert rows["256..320"][1] > rows["256..320"][0] + 0.15  # lfu q16 recovers the change of subject
    out = subprocess.run([sys.executable, script, "auto", str(bench)], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    assert out.splitlines()[0] == "PCIe 25 GB/s: seeded q4"


def test_cache_windows_reuse_gives_what_the_worker_prefetch_can_find():
    """scripts/cache_windows.py reuse: of a busy split layer's cold experts, the share its
    previous busy post named too (what patch v17's prefetch reads), with the plans that ran in
    the fifteenth lease: 0.374 over 1024 rows of the real gpt-oss trace, 0.68 on the realistic
    preset's measured stream (docs/backend-patch.md quotes both)."""
    script = str(SCRIPT.parent / "cache_windows.py")
    results = REPO / "docs/results/h200-2026-12-01d"
    out = subprocess.run([sys.executable, script, "reuse", str(results / "realtrace_long_0.25_call3.slim.json"),
                          "--window", "32:1024"], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.startswith("24 split layers") and "2.40 cold experts each, 0.374 of them" in out, out
    out = subprocess.run([sys.executable, script, "reuse", str(results / "workerab_realistic_v16_call7.slim.json"),
                          "--routing", "realistic", "--window", "256:1024"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.startswith("48 split layers") and "4.34 cold experts each, 0.681 of them" in out, out


def test_bench_json_rows_say_whether_the_roofline_had_a_measured_gpu_rate():
    """`bench --json` rows from saved GPU runs: the nineteenth lease's cold=both run had no
    all-gpu row (its rooflines took the default GPU rate, 1.08-1.22x too fast on that host),
    its workerab run had one."""
    import json

    from hybrid_gguf.bench.runner import llama_bench_rows

    results = REPO / "docs" / "results" / "h200-2026-12-02"
    for name, want in (("bothab_realistic_0.25_call3.slim.json", "default"),
                       ("workerab_default_realistic_0.25_call8.slim.json", "measured")):
        rows = llama_bench_rows([json.loads((results / name).read_text())])
        decode = [r for r in rows if r["n_gen"] > 0]
        assert decode and {r["roofline_gpu_rate"] for r in decode} == {want}, name
        assert all("roofline_gpu_rate" not in r for r in rows if r["n_gen"] == 0)
