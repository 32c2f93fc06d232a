"""Large synthetic MoE GGUFs for speed benchmarks, written in seconds not hours.

Everything except the routed-expert weights comes from hybrid_gguf/synth.py
(same embeddings, router with the designed Zipf skew, attention, metadata,
tokenizer and popularity table), so a bench file routes exactly like the
synth file of the same spec.  The routed experts (`ffn_{gate,up,down}_exps`)
dominate the bytes and are written directly as valid quant blocks: a fixed
per-tensor block header (scales) chosen so the dequantized weights have
synth.py's float std, followed by random quant bytes.  Nothing is generated
in float and nothing is quantized, so the speed is bounded by memory copies
and the page cache, not by numpy arithmetic.

Random bytes: each worker builds one random pool once; expert e of a tensor
is the pool window at a per-expert random offset, XOR-ed with a per-expert
random byte, so experts differ while the cost stays a single memory pass.
The output is a pure function of the spec (independent of the worker count).

Workers write their tensor ranges straight into the preallocated file with
os.pwrite (no data travels through pipes, memory per worker stays bounded);
the file is written under a temporary name and renamed at the end.

Extra metadata: `hybrid_gguf.bench.version`, `hybrid_gguf.bench.expert_type`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from hybrid_gguf import synth
from hybrid_gguf.atomic import publish
from hybrid_gguf.errors import HybridError
from hybrid_gguf.synth import SynthSpec

BENCH_VERSION = 1
KEY_BENCH_VERSION = "hybrid_gguf.bench.version"
KEY_EXPERT_TYPE = "hybrid_gguf.bench.expert_type"

EXPERT_TYPES = ("Q4_K", "Q8_0")
# Non-expert matrices (attention, embeddings, output): synth's float weights
# quantized to Q8_0 with gguf-py.  They are ~5% of the bytes of a real-shaped model.
DENSE_TYPE = "Q8_0"
_EXPERT_SUFFIXES = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")

_ALIGN = 32  # GGUF default data alignment (gguf-py pads every tensor to it)
# Random pool per worker; expert windows start anywhere in its first span bytes
# (32 MiB, less for small models so tiny files stay cheap).
_POOL_SPAN = 32 << 20
# Work unit: a run of experts of one tensor of about this many bytes.
_TASK_BYTES = 32 << 20
# Below this much tensor data, worker start-up costs more than it saves.
_PARALLEL_MIN_BYTES = 256 << 20

# Extra presets: the smallest shapes on which Q4_K is really used (rows of 256).
BENCH_PRESETS: dict[str, SynthSpec] = {
    "tiny-q4k": synth.preset("tiny", n_embd=256, n_ff_exp=256),
}


def preset_names() -> list:
    return sorted(set(synth.PRESETS) | set(BENCH_PRESETS))


def bench_spec(preset: str = "qwen3-30b-a3b-like", weight_type: str = "Q4_K", *,
               n_layer: Optional[int] = None, zipf: Optional[float] = None,
               seed: Optional[int] = None, **overrides) -> SynthSpec:
    """A synth preset (or BENCH_PRESETS entry) with the expert weight type and overrides set."""
    if weight_type not in EXPERT_TYPES:
        raise HybridError(f"bench expert type {weight_type!r} is not one of {', '.join(EXPERT_TYPES)}")
    for key, value in (("n_layer", n_layer), ("zipf", zipf), ("seed", seed)):
        if value is not None:
            overrides[key] = value
    overrides["weight_type"] = weight_type
    if preset in BENCH_PRESETS:
        spec = dataclasses.replace(BENCH_PRESETS[preset], **overrides)
    else:
        spec = synth.preset(preset, **overrides)
    spec.validate()
    if not spec.is_moe:
        raise HybridError("bench models need routed experts (n_expert > 0)")
    return spec


# ---------------------------------------------------------------------------
# Quant block formats of the expert tensors


@dataclass(frozen=True)
class BlockFormat:
    """One quant block: a fixed header (scales) then random quant bytes."""

    qtype: str
    block_size: int  # weights per block
    block_bytes: int
    header: bytes  # first len(header) bytes of every block
    std: float  # std of the dequantized weights for uniform random quant bytes


# Std of a uniform random 4-bit value (0..15) and of a uniform random int8.
_U4_STD = float(np.sqrt((16**2 - 1) / 12))
_I8_STD = float(np.sqrt((256**2 - 1) / 12))
# Q4_K sub-block scale/min: w = d*sc*q - dmin*m with dmin = d and m = 7.5*sc gives
# zero-mean weights; a small sc keeps d large enough to stay a normal f16.
_Q4K_SC, _Q4K_M = 4, 30


def pack_q4_k_scales(sc, m) -> bytes:
    """The 12 scale bytes of a Q4_K block from 8 sub-block scales and 8 mins (6 bits each)."""
    sc = [int(x) for x in sc]
    m = [int(x) for x in m]
    if len(sc) != 8 or len(m) != 8 or not all(0 <= x < 64 for x in sc + m):
        raise ValueError("Q4_K needs 8 scales and 8 mins in 0..63")
    q = [0] * 12
    for j in range(4):  # inverse of ggml's get_scale_min_k4
        q[j] = sc[j] | ((sc[j + 4] >> 4) << 6)
        q[j + 4] = m[j] | ((m[j + 4] >> 4) << 6)
        q[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4)
    return bytes(q)


def block_format(qtype: str, std: float) -> BlockFormat:
    """Block header giving dequantized weights of mean ~0 and standard deviation ~std."""
    if qtype == "Q4_K":
        d = np.float16(std / (_Q4K_SC * _U4_STD))
        header = (np.array([d, d], dtype="<f2").tobytes()
                  + pack_q4_k_scales([_Q4K_SC] * 8, [_Q4K_M] * 8))
        return BlockFormat(qtype, 256, 144, header, float(d) * _Q4K_SC * _U4_STD)
    if qtype == "Q8_0":
        d = np.float16(std / _I8_STD)
        return BlockFormat(qtype, 32, 34, np.array([d], dtype="<f2").tobytes(), float(d) * _I8_STD)
    raise HybridError(f"no random-block writer for {qtype!r}")


def _expert_std(spec: SynthSpec, name: str) -> float:
    # The same init as synth.py's float experts: unit maps in, small maps out.
    if name.endswith("ffn_down_exps.weight"):
        return synth._OUT_SCALE / np.sqrt(spec.n_ff_exp)
    return 1 / np.sqrt(spec.n_embd)


# ---------------------------------------------------------------------------
# Layout


@dataclass(frozen=True)
class BenchTensor:
    name: str
    ne: tuple  # ggml order (fastest first)
    qtype: str
    offset: int  # from the start of the data section
    n_bytes: int
    expert: bool  # a routed-expert weight written as random blocks
    plan_index: int  # index into synth's plan (source of non-expert data)

    @property
    def n_expert(self) -> int:
        return self.ne[2] if self.expert else 0

    @property
    def expert_bytes(self) -> int:
        return self.n_bytes // self.ne[2] if self.expert else 0


def _is_expert(name: str) -> bool:
    return name.startswith("blk.") and name.endswith(_EXPERT_SUFFIXES)


def _expert_qtype(ne: tuple, qtype: str) -> str:
    # Rows must hold whole blocks; fall back as llama-quantize does.
    if qtype == "Q4_K" and ne[0] % 256:
        qtype = "Q8_0"
    if qtype == "Q8_0" and ne[0] % 32:
        raise HybridError(f"expert rows of {ne[0]} weights are not a multiple of 32")
    return qtype


@functools.lru_cache(maxsize=4)
def _synth_plan(spec: SynthSpec) -> list:
    """synth.py's tensor plan with non-expert matrices in DENSE_TYPE."""
    return synth._plan(dataclasses.replace(spec, weight_type=DENSE_TYPE))


def layout(spec: SynthSpec) -> list:
    """All tensors in file order with their data-section offsets (gguf-py's padding rule)."""
    out, offset = [], 0
    for i, t in enumerate(_synth_plan(spec)):
        expert = _is_expert(t.name)
        qtype = _expert_qtype(t.ne, spec.weight_type) if expert else t.qtype
        n = synth._nbytes(t.ne, qtype)
        out.append(BenchTensor(t.name, t.ne, qtype, offset, n, expert, i))
        offset += -(-n // _ALIGN) * _ALIGN
    return out


def _pool_span(tensors: list) -> int:
    return min(_POOL_SPAN, max(1 << 20, sum(t.n_bytes for t in tensors if t.expert)))


def _synth_chunks(t):
    """Float chunks of a synth plan entry (accepts both maker conventions of synth.py)."""
    n_chunks = getattr(t, "n_chunks", None)
    if n_chunks is None:
        yield from t.make()
    else:
        for i in range(n_chunks):
            yield t.make(i)


def _tasks(tensors: list) -> list:
    """(tensor index, first expert, end expert) work units; non-expert tensors are whole."""
    # Non-expert tensors first: they need float math, so they start while experts stream.
    tasks = [(i, 0, 0) for i, t in enumerate(tensors) if not t.expert]
    for i, t in enumerate(tensors):
        if t.expert:
            step = max(1, _TASK_BYTES // t.expert_bytes)
            tasks += [(i, e, min(e + step, t.n_expert)) for e in range(0, t.n_expert, step)]
    return tasks


# ---------------------------------------------------------------------------
# Workers


class _Writer:
    """Per-process state: the open file, the layout, the random pool, a reusable buffer."""

    def __init__(self, path: str, spec: SynthSpec, data_start: int):
        self.spec = spec
        self.data_start = data_start
        self.fd = os.open(path, os.O_WRONLY)
        self.tensors = layout(spec)
        self.buf = np.empty(0, dtype=np.uint8)
        self.span = _pool_span(self.tensors)
        max_expert = max(t.expert_bytes for t in self.tensors)
        rng = np.random.Generator(np.random.PCG64([spec.seed, zlib.crc32(b"bench-pool")]))
        n = (self.span + max_expert + 7) // 8
        self.pool = rng.bit_generator.random_raw(n).view(np.uint8)

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        pos = self.data_start + offset
        while view:  # pwrite may write less than asked
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n

    def run(self, task: tuple) -> int:
        index, e0, e1 = task
        t = self.tensors[index]
        if t.expert:
            return self._experts(t, e0, e1)
        src = _synth_plan(self.spec)[t.plan_index]
        pos = t.offset
        for chunk in _synth_chunks(src):
            data = synth._encode(chunk, t.qtype)
            self.pwrite(data, pos)
            pos += data.nbytes
        if pos - t.offset != t.n_bytes:
            raise HybridError(f"{t.name}: wrote {pos - t.offset} bytes, expected {t.n_bytes}")
        return t.n_bytes

    def _experts(self, t: BenchTensor, e0: int, e1: int) -> int:
        fmt = block_format(t.qtype, _expert_std(self.spec, t.name))
        nb2 = t.expert_bytes
        # Per-expert (offset, key) for the whole tensor from one seed: any split into tasks agrees.
        rng = np.random.default_rng([self.spec.seed, zlib.crc32(t.name.encode())])
        offs = rng.integers(0, self.span, size=t.n_expert)
        keys = rng.integers(0, 256, size=t.n_expert).astype(np.uint8)
        size = (e1 - e0) * nb2
        if self.buf.size < size:
            self.buf = np.empty(size, dtype=np.uint8)  # reused: no page faults per task
        buf = self.buf[:size]
        for i, e in enumerate(range(e0, e1)):
            o = int(offs[e])
            np.bitwise_xor(self.pool[o:o + nb2], keys[e], out=buf[i * nb2:(i + 1) * nb2])
        blocks = buf.reshape(-1, fmt.block_bytes)
        blocks[:, :len(fmt.header)] = np.frombuffer(fmt.header, dtype=np.uint8)
        self.pwrite(buf, t.offset + e0 * nb2)
        return size

    def close(self) -> None:
        os.close(self.fd)


def _worker_main() -> None:
    """A generator process: init JSON on the first stdin line, then one task per line.

    Prints the bytes written after each task; exits at end of input.
    """
    job = json.loads(sys.stdin.readline())
    w = _Writer(job["path"], SynthSpec(**job["spec"]), job["data_start"])
    for line in sys.stdin:
        n = w.run(tuple(int(x) for x in line.split()))
        sys.stdout.write(f"{n}\n")
        sys.stdout.flush()
    w.close()


def _run_parallel(path: Path, spec: SynthSpec, data_start: int, tasks: list, workers: int,
                  progress: Optional[Callable[[int], None]]) -> None:
    """Hand tasks to `workers` child processes as they finish earlier ones.

    Plain subprocesses rather than multiprocessing: nothing re-imports the
    caller's __main__, nothing forks a process that may hold llama.cpp threads.
    """
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding hybrid_gguf
    env["PYTHONPATH"] = root + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else root
    env.setdefault("OMP_NUM_THREADS", "1")  # one core per worker; BLAS threads would oversubscribe
    cmd = [sys.executable, "-c", "from hybrid_gguf.bench.model_maker import _worker_main; _worker_main()"]
    job = json.dumps({"path": str(path), "spec": spec.to_dict(), "data_start": data_start}) + "\n"
    procs, errs = [], []
    todo = list(reversed(tasks))  # pop() from the end = in order
    sel = selectors.DefaultSelector()
    try:
        for _ in range(workers):
            err = tempfile.TemporaryFile()
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
            procs.append(p)
            errs.append(err)
            # Two tasks in flight per worker so it never waits for this loop.
            first = [todo.pop() for _ in range(2) if todo]
            _send(p, job + "".join(_task_line(t) for t in first))
            if not todo:
                p.stdin.close()
            sel.register(p.stdout.fileno(), selectors.EVENT_READ, [p, b"", len(first)])
        while sel.get_map():
            for key, _ in sel.select():
                state = key.data
                p = state[0]
                chunk = os.read(key.fd, 4096)
                if not chunk:
                    sel.unregister(key.fd)
                    if state[2]:  # died with work in hand
                        raise _worker_error(p, errs[procs.index(p)])
                    continue
                state[1] += chunk
                *lines, state[1] = state[1].split(b"\n")
                for line in lines:
                    state[2] -= 1
                    if progress:
                        progress(int(line))
                    if todo:
                        _send(p, _task_line(todo.pop()))
                        state[2] += 1
                    elif not p.stdin.closed:
                        p.stdin.close()  # end of input: the worker exits after its last task
        for p, err in zip(procs, errs):
            if p.wait() != 0:
                raise _worker_error(p, err)
    finally:
        sel.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for err in errs:
            err.close()


def _worker_error(p: subprocess.Popen, err) -> HybridError:
    p.wait()
    err.seek(0)
    tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
    return HybridError(f"bench generator worker failed (exit {p.returncode}): " + " | ".join(tail))


def _task_line(task: tuple) -> str:
    return " ".join(str(x) for x in task) + "\n"


def _send(p: subprocess.Popen, text: str) -> None:
    try:
        p.stdin.write(text.encode())
        p.stdin.flush()
    except BrokenPipeError:
        pass  # the worker died; its exit code is reported after the loop


# ---------------------------------------------------------------------------
# Writing


@dataclass
class BenchResult:
    path: Path
    spec: SynthSpec
    file_bytes: int
    expert_bytes: int
    seconds: float  # whole call, header and rename included
    workers: int

    @property
    def mb_per_s(self) -> float:
        return self.file_bytes / 1e6 / max(self.seconds, 1e-9)


def _write_header(path: Path, spec: SynthSpec, tensors: list) -> int:
    """Header, metadata and tensor infos; returns the data section's start offset."""
    import gguf

    writer = gguf.GGUFWriter(path, arch=spec.arch)
    synth._add_metadata(writer, spec, synth._FILE_TYPE[spec.weight_type])
    writer.add_uint32(KEY_BENCH_VERSION, BENCH_VERSION)
    writer.add_string(KEY_EXPERT_TYPE, spec.weight_type)
    for t in tensors:
        writer.add_tensor_info(t.name, tuple(reversed(t.ne)), np.dtype(np.float32), t.n_bytes,
                               raw_dtype=synth._qtype(t.qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if writer.data_alignment != _ALIGN:
        raise HybridError(f"unexpected GGUF alignment {writer.data_alignment}")
    end = writer.fout[0].tell()
    writer.close()
    return -(-end // _ALIGN) * _ALIGN


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def write_bench_model(path: Union[str, os.PathLike], spec: SynthSpec, *,
                      workers: Optional[int] = None,
                      progress: Optional[Callable[[int, int], None]] = None) -> BenchResult:
    """Write the bench model for `spec` to `path` atomically.

    workers: processes generating data (default: one per CPU for large files,
    in-process for small ones).  progress(bytes_done, bytes_total) is called
    after each work unit.
    """
    start = time.perf_counter()
    spec.validate()
    if spec.weight_type not in EXPERT_TYPES or not spec.is_moe:
        raise HybridError(f"bench models need experts of type {' or '.join(EXPERT_TYPES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = layout(spec)
    last = tensors[-1]
    data_bytes = last.offset + last.n_bytes
    total = sum(t.n_bytes for t in tensors)  # what the tasks write (padding excluded)
    free = shutil.disk_usage(path.parent).free
    if free < data_bytes + (64 << 20):
        raise HybridError(f"{path.parent} has {free / 2**30:.1f} GiB free; "
                          f"the model needs {data_bytes / 2**30:.1f} GiB")
    if workers is None:
        workers = default_workers() if data_bytes >= _PARALLEL_MIN_BYTES else 1
    tasks = _tasks(tensors)
    workers = max(1, min(workers, len(tasks)))

    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        data_start = _write_header(tmp, spec, tensors)
        os.truncate(tmp, data_start + data_bytes)  # preallocated; padding stays zero
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total)

        if workers == 1:
            w = _Writer(str(tmp), spec, data_start)
            try:
                for task in tasks:
                    advance(w.run(task))
            finally:
                w.close()
        else:
            _run_parallel(tmp, spec, data_start, tasks, workers, advance)
        if done != total:
            raise HybridError(f"bench generator wrote {done} of {total} bytes")
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return BenchResult(path, spec, path.stat().st_size,
                       sum(t.n_bytes for t in tensors if t.expert),
                       time.perf_counter() - start, workers)
