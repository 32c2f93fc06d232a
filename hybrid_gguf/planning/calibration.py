"""This machine's calibration constants for the speed model: the Bandwidth dataclass, its
fit to timed placements (`bench`), and its storage, one entry per machine in
<cache dir>/calibration.json (paths.py). Fields nobody measured keep documented defaults
and are listed as such, so a prediction says what it rests on. The measurements
themselves are bench/probe.py's.
"""

from __future__ import annotations

import json
import os
import platform
import socket
from dataclasses import MISSING, asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from hybrid_gguf.atomic import atomic_write
from hybrid_gguf.errors import HybridError
from hybrid_gguf.planning.speed import predict_speed

CALIBRATION_FORMAT = "hybrid-gguf-calibration"


ZERO_ALLOWED = ("gpu_layer_s", "gpu_step_s")  # fixed times a calibration may lack
# what a hybrid decode prediction rests on besides the CPU read rate (measured everywhere)
GPU_DECODE_FIELDS = ("gpu_bytes_per_s", "gpu_layer_s", "gpu_step_s", "handoff_s", "handoff_idle_s")
# A fitted CPU expert rate above the measured streaming read (cpu_read_bytes_per_s) by more
# than this is the fit trading bytes for fixed hand-off time (the H200's realistic 25 % row
# gave 264 GB/s against a read of 80), not the machine: fit_decode refuses it.
CPU_FIT_HEADROOM = 1.25
# the CPU worker's costs move with the patch (v8 211 us busy, v9 110, v11 70-150 by host): a stored calibration
# that never measured them takes today's defaults, not the ones saved with it, and so does one
# that measured them with a patch older than WORKER_COSTS_VERSION
FOLLOW_DEFAULTS = ("worker_handoff_s", "worker_handoff_idle_s")
WORKER_COSTS_VERSION = 11
UNKNOWN_IF_ZERO = ("cpu_read_bytes_per_s",)  # measurements a calibration may not have yet
ZERO_VALID = ("cache_upload_s",)  # costs a fit may find to be nothing


@dataclass(frozen=True)
class Bandwidth:
    cpu_bytes_per_s: float = 50e9  # the CPU backend's rate on expert weights (measured, then fitted)
    # the streaming read measured by calibrate_bandwidth, never fitted: the bound on the fit
    # above (0: not measured on this machine)
    cpu_read_bytes_per_s: float = 0.0
    gpu_bytes_per_s: float = 1.5e12  # GPU memory read in matmul kernels
    pcie_bytes_per_s: float = 25e9  # host -> GPU copies of pinned memory
    # GPU kernels reading cold experts in place from pinned host memory (patch v4, cold=gpu):
    # 24.6 GB/s effective in a realistic-routing decode on the H200 host, 2026-11-30 (well
    # under its copy engine's 47 GB/s: the matrix-vector kernels' small scattered reads)
    host_read_bytes_per_s: float = 24e9
    # extra fixed GPU time of a split layer whose cold chain also runs on the GPU (its id
    # handling and second expert chain); not measured apart yet
    gpu_chain_s: float = 15e-6
    cpu_flops: float = 1.0e12
    gpu_flops: float = 100e12  # achieved on quantized prefill matmuls, not the datasheet peak
    # per decode step and layer whose host experts have work (the sync, the copies, the CPU's
    # fixed costs), and the same when the token selected none of them. The scheduler cuts the
    # graph at every split layer, busy or idle, so the fits give both one value: 73, 90, 93 and
    # 93 us from its rows at 25 % (realistic and optimistic) on one H200 host with the spin bound
    # and patches v10-v11 (2026-11-30, eleventh lease; docs/results/h200-2026-11-30k), 160 us on
    # the twelfth lease's host. 110 us puts both leases' scheduler rows within -10..+17 %
    # (scripts/repredict.py) and stays above the worker's busy cost below: the worker, which does
    # not cut the graph, decoded faster than the scheduler at realistic 25 % in 4 of 5 such
    # A/Bs, so the planner must not be handed the opposite. The 184 and 113 us of 2026-11-28
    # came from OpenMP threads that slept between layers.
    handoff_s: float = 110e-6
    handoff_idle_s: float = 110e-6
    # the same with the CPU worker (patch v8, plan `handoff: worker`): the GPU posts each split
    # layer to mapped memory and the decoding thread answers; a layer with no cold work does not
    # wait for the CPU. Busy, fitted on realistic 25 %: 69 and 70 us with patch v11 on one H200
    # host (eleventh lease), 126-150 us with v12 on another (twelfth lease: its CPU computed the
    # same work slower). 100 us predicts both leases' worker rows within -10..+18 % (70 us:
    # -0.2..+33 %; scripts/repredict.py). Older: v10 100, v9 106-114, v8 211. Idle 22 us fitted
    # on optimistic 25 % and 17 us on a plan whose every hand-off is idle (v10: 25 and 20)
    worker_handoff_s: float = 100e-6
    worker_handoff_idle_s: float = 20e-6
    # fixed GPU times of a decode step, per layer and per step; 50 and 97 us on an H200
    # (gpu_probe, docs/benchmarks.md)
    gpu_layer_s: float = 50e-6
    gpu_step_s: float = 100e-6
    # host time of an in-session cache's step per decoded token (reading the routing, choosing,
    # queueing tables), without its uploads, and the host time each upload adds (queueing the
    # copy, the slot's table entries). H200 host with the CPU worker, 2026-12-01: ordered LFU
    # and seeded rows at 1.13 and 0.70 uploads per step took 58 and 48 us per step, background
    # LRU at 64 and 89 uploads 1.35 and 1.87 ms: about 30 us plus 21-25 us per upload. One
    # figure for all of it (0.2 ms) over-priced a cache of one upload per token four times.
    # `bench` fits both from its cache rows' `step_us` and uploads (fit_cache_step)
    cache_step_s: float = 30e-6
    cache_upload_s: float = 22e-6
    # the rest of an active cache's fixed cost, per cached layer and decoded token, on the GPU
    # side (each layer's routing written to host memory, the synchronize before the step):
    # at equal hit rates the cache rows decoded 0.48 and 0.63 ms per token slower than the
    # static packs over 48 layers, less their uploads and host step (H200, 2026-11-30, fourth
    # lease); not measured apart, so `bench` does not fit it
    cache_layer_s: float = 6e-6
    # a decode step passing from one GPU's layers to the next card's (the hidden state's copy
    # and the two streams' sync): two cards at 2 x 4 GiB decoded 0.09-0.25 ms per token slower
    # than one card at 8 GiB with the same hit rate (2 x H200, 2026-11-30); not fitted
    gpu_hop_s: float = 0.1e-3
    measured: tuple = ()  # names of the fields measured on this machine
    machine: str = ""
    measured_at: str = ""
    # ((model fingerprint, GPU bytes/s), ...): the rate `bench` fitted on that model. Kernels
    # reach different rates on different matrix shapes (1.5 TB/s on Qwen3-30B-shaped experts,
    # 2.3 on Mixtral-shaped ones on an H200); the machine-wide rate is the GPU probe's.
    model_gpu_rates: tuple = ()
    # the hybrid patch version `bench` fitted the worker's costs with (0: before this was kept)
    worker_patch_version: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["measured"] = list(self.measured)
        d["model_gpu_rates"] = dict(self.model_gpu_rates)
        if not d["model_gpu_rates"]:
            del d["model_gpu_rates"]
        return d

    def with_worker_handoffs(self) -> "Bandwidth":
        """This calibration with the CPU worker's hand-off costs in the hand-off fields, as a
        plan with `handoff: worker` pays them."""
        return replace(self, handoff_s=self.worker_handoff_s, handoff_idle_s=self.worker_handoff_idle_s)

    def for_model(self, fingerprint: Optional[str]) -> "Bandwidth":
        """This calibration for one model: its own fitted GPU rate when `bench` measured one."""
        rates = dict(self.model_gpu_rates)
        if fingerprint in rates:
            return replace(self, gpu_bytes_per_s=rates[fingerprint], model_gpu_rates=())
        return replace(self, model_gpu_rates=())

    @classmethod
    def from_dict(cls, d: Mapping) -> "Bandwidth":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["measured"] = tuple(kw.get("measured", ()))
        rates = kw.get("model_gpu_rates") or {}
        if not isinstance(rates, Mapping) or not all(isinstance(v, (int, float)) and v > 0 for v in rates.values()):
            raise HybridError(f"calibration field model_gpu_rates must map model fingerprints to positive rates, "
                              f"got {rates!r}")
        kw["model_gpu_rates"] = tuple(sorted((str(k), float(v)) for k, v in rates.items()))
        version = kw.get("worker_patch_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise HybridError(f"calibration field worker_patch_version must be a patch version (0 or more), "
                              f"got {version!r}")
        if version < WORKER_COSTS_VERSION:
            # measured with an older patch, whose one-token expert kernel was slower
            kw["measured"] = tuple(m for m in kw["measured"] if m not in FOLLOW_DEFAULTS)
        for name in FOLLOW_DEFAULTS:
            if name not in kw["measured"]:
                kw.pop(name, None)  # a stored default from an older patch: take today's
        if "cache_step_s" not in kw["measured"]:
            kw.pop("cache_step_s", None)  # a stored default (0.2 ms before the upload cost): take today's
        elif "cache_upload_s" not in kw:
            kw["cache_upload_s"] = 0.0  # fitted when the step's one figure held its uploads too
        if "handoff_idle_s" not in kw and "handoff_s" in kw:
            kw["handoff_idle_s"] = kw["handoff_s"]  # calibrations from before the split
        for name in ZERO_ALLOWED:
            if name not in kw and "gpu_bytes_per_s" in kw["measured"]:
                kw[name] = 0.0  # their GPU rate was fitted without this fixed time
        bw = cls(**kw)
        for f in fields(cls):
            v = getattr(bw, f.name)
            if f.name in ZERO_ALLOWED + UNKNOWN_IF_ZERO + ZERO_VALID and isinstance(v, float) and v == 0.0:
                continue
            if isinstance(v, float) and not (v > 0 and np.isfinite(v)):
                raise HybridError(f"calibration field {f.name} must be a positive number, got {v!r}")
        return bw

    @property
    def defaults_used(self) -> list:
        numeric = [f.name for f in fields(self) if f.type in ("float", float)]
        return [n for n in numeric if n not in self.measured]


# --- fitting --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasuredRun:
    """A timed placement: what was on the GPU and the tokens/s llama.cpp reported."""
    gpu_experts: Mapping[int, Sequence[int]]
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    n_prompt: int
    kv_fill: int


@dataclass(frozen=True)
class RunTerms:
    """The linear terms of predict_speed for one run, with the measured speeds: per decode
    step the bytes read at the GPU rate (dense, KV, GPU experts) and at the CPU rate (host
    experts), the expected busy and idle hand-offs, the layers computed on the GPU and
    whether the step runs there (1 or 0); per prefill ubatch the GPU and CPU flops and the
    PCIe bytes. Plain numbers, so a fit can be redone from saved JSON (terms saved before
    the fixed GPU times existed read as 0 layers and steps)."""
    gpu_bytes: float
    cpu_bytes: float
    handoffs_busy: float
    handoffs_idle: float
    gpu_flop: float
    cpu_flop: float
    pcie_bytes: float
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    n_prompt: int
    gpu_layers: float = 0.0
    gpu_steps: float = 0.0

    @property
    def handoffs(self) -> float:
        return self.handoffs_busy + self.handoffs_idle

    def decode_seconds(self, bw: Bandwidth) -> float:
        return (self.gpu_bytes / bw.gpu_bytes_per_s + self.gpu_layers * bw.gpu_layer_s
                + self.gpu_steps * bw.gpu_step_s
                + self.cpu_bytes / bw.cpu_bytes_per_s
                + self.handoffs_busy * bw.handoff_s + self.handoffs_idle * bw.handoff_idle_s)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "RunTerms":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d or f.default is MISSING})


def run_terms(inv, p, run: MeasuredRun, n_ctx: int) -> RunTerms:
    unit = Bandwidth(cpu_bytes_per_s=1.0, gpu_bytes_per_s=1.0, pcie_bytes_per_s=1.0,
                     cpu_flops=1.0, gpu_flops=1.0, handoff_s=0.0, handoff_idle_s=0.0, gpu_layer_s=1.0,
                     gpu_step_s=1.0)
    sp = predict_speed(inv, p, run.gpu_experts, True, unit, n_ctx, n_ubatch=run.n_prompt,
                       kv_fill=run.kv_fill)
    d, f = sp.decode_ms, sp.prefill_ms
    return RunTerms((d["dense"] + d["kv"] + d["experts_gpu"]) / 1e3, d["experts_cpu"] / 1e3,
                    sp.handoffs["busy"], sp.handoffs["idle"],
                    f["gpu_compute"] / 1e3, f["cpu_compute"] / 1e3, f["pcie_copies"] / 1e3,
                    run.decode_tokens_per_s, run.prefill_tokens_per_s, run.n_prompt,
                    d["gpu_layers"] / 1e3, d["gpu_step"] / 1e3)


def fit_decode(terms: Sequence[RunTerms], base: Bandwidth) -> dict:
    """Decode fields fitted to runs' terms: {field: value} for those the runs determine.

    All-GPU runs give gpu_bytes_per_s, and the fixed times gpu_layer_s and gpu_step_s too
    when they come from models of different shapes (`gpu_probe`); otherwise the fixed
    times stay at base's. Runs with host experts then give, by least squares weighted to
    relative error, in order of preference:
      - cpu_bytes_per_s, handoff_s (busy) and handoff_idle_s, when the runs vary enough in
        bytes per busy hand-off and in the busy share (per-expert runs at two or more
        budgets next to a stock run);
      - cpu_bytes_per_s and one hand-off for both, when they vary in host bytes per
        hand-off (a per-expert run next to stock runs); stock placements alone do not
        (each host layer brings all its selected experts and one busy hand-off);
      - the hand-off alone, with cpu_bytes_per_s from base (the CPU calibration).
    A solution with a negative rate or hand-off is refused and the next one tried, and so is
    one whose CPU rate exceeds base's measured streaming read (cpu_read_bytes_per_s) by more
    than CPU_FIT_HEADROOM.
    """
    gpu_only = [t for t in terms if t.cpu_bytes == 0 and t.handoffs == 0 and t.decode_tokens_per_s > 0]
    host = [t for t in terms if t.handoffs > 0 and t.decode_tokens_per_s > 0]
    updates = _fit_gpu(gpu_only, base) if gpu_only else {}
    if not host:
        return updates
    g = updates.get("gpu_bytes_per_s", base.gpu_bytes_per_s)
    c = updates.get("gpu_layer_s", base.gpu_layer_s)
    k = updates.get("gpu_step_s", base.gpu_step_s)
    w = np.array([t.decode_tokens_per_s for t in host])  # 1 / measured step time
    rhs = np.array([1.0 / t.decode_tokens_per_s - t.gpu_bytes / g - t.gpu_layers * c - t.gpu_steps * k
                    for t in host]) * w
    C = np.array([t.cpu_bytes for t in host]) * w
    Hb = np.array([t.handoffs_busy for t in host]) * w
    Hi = np.array([t.handoffs_idle for t in host]) * w

    cap = CPU_FIT_HEADROOM * base.cpu_read_bytes_per_s if base.cpu_read_bytes_per_s > 0 else float("inf")

    def solve(cols):
        x = _positive_lstsq(np.stack(cols, axis=1), rhs)
        return x if x is not None and 1.0 / float(x[0]) <= cap else None

    x = solve([C, Hb, Hi])
    if x is not None:
        return {**updates, "cpu_bytes_per_s": 1.0 / float(x[0]), "handoff_s": float(x[1]),
                "handoff_idle_s": float(x[2])}
    H = Hb + Hi
    x = solve([C, H])
    if x is not None:
        return {**updates, "cpu_bytes_per_s": 1.0 / float(x[0]), "handoff_s": float(x[1]),
                "handoff_idle_s": float(x[1])}
    # the hand-off alone, at base's CPU rate (bounded too: a calibration fitted before the
    # bound existed may hold an implausible one)
    rate = min(base.cpu_bytes_per_s, cap)
    if rate < base.cpu_bytes_per_s:
        updates["cpu_bytes_per_s"] = rate
    h = float((rhs - C / rate) @ H / (H @ H))
    if h > 0:
        updates.update(handoff_s=h, handoff_idle_s=h)
    return updates


def _positive_lstsq(A: np.ndarray, rhs: np.ndarray) -> Optional[np.ndarray]:
    """Least squares, or None when the columns cannot be told apart or a term comes out
    negative."""
    scale = np.linalg.norm(A, axis=0)
    if A.shape[0] < A.shape[1] or np.any(scale == 0):
        return None
    sv = np.linalg.svd(A / scale, compute_uv=False)
    if sv[-1] < 0.02 * sv[0]:  # the runs do not tell these terms apart
        return None
    x, *_ = np.linalg.lstsq(A, rhs, rcond=None)
    return x if np.all(x > 0) else None


def _fit_gpu(gpu_only: Sequence[RunTerms], base: Bandwidth) -> dict:
    """gpu_bytes_per_s from all-GPU runs, with as many of the fixed times (per step, then
    per layer) as the runs separate; least squares weighted to relative error. The fixed
    times not fitted stay at base's, or drop to 0 when base's exceed a measured step."""
    w = np.array([t.decode_tokens_per_s for t in gpu_only])
    step = np.array([1.0 / t.decode_tokens_per_s for t in gpu_only])
    x = np.array([t.gpu_bytes for t in gpu_only])
    layers = np.array([t.gpu_layers for t in gpu_only])
    steps = np.array([t.gpu_steps for t in gpu_only])
    every = _positive_lstsq(np.stack([x * w, layers * w, steps * w], axis=1), step * w)
    if every is not None:
        return {"gpu_bytes_per_s": 1.0 / float(every[0]), "gpu_layer_s": float(every[1]),
                "gpu_step_s": float(every[2])}
    two = _positive_lstsq(np.stack([x * w, layers * w], axis=1), (step - steps * base.gpu_step_s) * w)
    if two is not None and np.all(steps * base.gpu_step_s < step):
        return {"gpu_bytes_per_s": 1.0 / float(two[0]), "gpu_layer_s": float(two[1])}
    for c, k in ((base.gpu_layer_s, base.gpu_step_s), (0.0, 0.0)):
        rest = step - layers * c - steps * k
        if np.all(rest > 0):
            inv_g = float(np.sum(w * w * x * rest) / np.sum(w * w * x * x))
            zeroed = {} if (c, k) == (base.gpu_layer_s, base.gpu_step_s) else {"gpu_layer_s": 0.0, "gpu_step_s": 0.0}
            return {"gpu_bytes_per_s": 1.0 / inv_g, **zeroed}
    return {}


def fit_bandwidth(inv, p: np.ndarray, runs: Sequence[MeasuredRun], base: Bandwidth,
                  n_ctx: int) -> Bandwidth:
    """The bandwidth model's fields fitted to measured runs of this machine.

    Decode: `fit_decode`. Prefill: all-GPU runs give gpu_flops, runs with host experts give
    pcie_bytes_per_s. Fields without data keep base.
    """
    return fit_bandwidth_terms([run_terms(inv, p, r, n_ctx) for r in runs], base)


def fit_bandwidth_terms(terms: Sequence[RunTerms], base: Bandwidth,
                        fingerprint: Optional[str] = None) -> Bandwidth:
    """fit_bandwidth on runs' terms (computed, or read back from a bench's JSON).

    With the fingerprint of the model the runs come from, a GPU rate fitted on its all-GPU
    runs is stored for that model; it replaces the machine-wide rate only while no GPU
    probe has measured that (the probe's fixed times and rate belong together)."""
    terms = [t for t in terms if t.decode_tokens_per_s > 0 and t.prefill_tokens_per_s > 0]
    own = base.for_model(fingerprint) if fingerprint else base
    updates = fit_decode(terms, own)
    rates = dict(base.model_gpu_rates)
    if fingerprint and "gpu_bytes_per_s" in updates:
        rates[fingerprint] = updates["gpu_bytes_per_s"]
        probed = {"gpu_layer_s", "gpu_step_s"} <= set(base.measured)
        if probed and not {"gpu_layer_s", "gpu_step_s"} & set(updates):
            del updates["gpu_bytes_per_s"]
    fixed_layer = updates.get("gpu_layer_s", own.gpu_layer_s)
    fixed_step = updates.get("gpu_step_s", own.gpu_step_s)

    def prefill_s(t: RunTerms) -> float:
        """A ubatch's measured time less the fixed GPU times (predict_speed's gpu_fixed)."""
        return t.n_prompt / t.prefill_tokens_per_s - t.gpu_layers * fixed_layer - t.gpu_steps * fixed_step

    gpu_only = [t for t in terms if t.cpu_bytes == 0 and t.handoffs == 0]
    if gpu_only and sum(t.gpu_flop ** 2 for t in gpu_only) > 0:
        inv_f = sum(t.gpu_flop * prefill_s(t) for t in gpu_only) / sum(t.gpu_flop ** 2 for t in gpu_only)
        if inv_f > 0:
            updates["gpu_flops"] = 1.0 / inv_f
    gf = updates.get("gpu_flops", base.gpu_flops)
    copies = [(prefill_s(t) - t.gpu_flop / gf - t.cpu_flop / base.cpu_flops, t.pcie_bytes)
              for t in terms if t.handoffs > 0 and t.pcie_bytes > 0]
    if copies:
        inv_pcie = sum(x * b for x, b in copies) / sum(b * b for _, b in copies)
        if inv_pcie > 0:
            updates["pcie_bytes_per_s"] = 1.0 / inv_pcie
    measured = tuple(sorted(set(base.measured) | set(updates)))
    return replace(base, **updates, model_gpu_rates=tuple(sorted(rates.items())), measured=measured,
                   machine=base.machine or machine_id(),
                   measured_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))


# --- storage --------------------------------------------------------------------------------


def machine_id() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{socket.gethostname()}|{cpu}|{os.cpu_count()}"


def calibration_path() -> Path:
    from hybrid_gguf import paths

    return paths.calibration_path()


def load_calibration(path: Optional[Path] = None, machine: Optional[str] = None) -> Optional[Bandwidth]:
    path = Path(path) if path else calibration_path()
    machine = machine or machine_id()
    entry = _calibration_file(path)["machines"].get(machine)
    if not isinstance(entry, dict):
        return None
    try:
        return Bandwidth.from_dict(entry)
    except (HybridError, TypeError, ValueError, OverflowError):
        return None


MAX_CALIBRATION_BYTES = 16 << 20


def _calibration_file(path: Path) -> dict:
    """The calibration file's contents; a fresh one where it is missing, unreadable or not of
    this format (it is a cache: `bench` and `plan` measure again)."""
    from hybrid_gguf.readfile import read_bounded

    try:
        data = json.loads(read_bounded(path, "calibration file", MAX_CALIBRATION_BYTES))
    except (HybridError, ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT \
            or not isinstance(data.get("machines"), dict):
        return {"format": CALIBRATION_FORMAT, "version": 1, "machines": {}}
    return data


def save_calibration(bw: Bandwidth, path: Optional[Path] = None) -> Path:
    """Store (merge) this machine's entry; the GPU side can be added by a later call."""
    path = Path(path) if path else calibration_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _calibration_file(path)
    data["machines"][bw.machine or machine_id()] = bw.to_dict()
    atomic_write(path, (json.dumps(data, indent=1) + "\n").encode())
    return path
