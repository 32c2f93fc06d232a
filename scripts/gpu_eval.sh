#!/usr/bin/env bash
# The GPU evaluation on the lent H200 machine, by steps:
#   1. build the hybrid-patched llama-cpp-python for CUDA (sm_90) from the trimmed sdist
#   2. per-expert split equivalence with the hot packs in VRAM (tests/test_hybrid_split.py;
#      HYBRID_GGUF_TEST_FLASH_ATTN=1 runs all of it with flash attention)
#   3. routing-recorder overhead (scripts/bench_recorder.py)
#   4. placement A/B on a synthetic Qwen3-30B-A3B-shaped Q4_K model (`hybrid-gguf bench`)
#   4b. the same A/B on a Mixtral-8x7B-shaped Q4_K model (bench2)
#   5. planned runs at two budgets: VRAM within budget, predicted vs measured decode (plan);
#      "bench" before "plan" stores the GPU calibration the plan's prediction uses (the
#      other bench steps do not store theirs); without "bench", CALIBRATION=FILE installs
#      one, e.g. docs/results/h200-2026-11-28c/calibration_h200.json (probe + Q30B bench)
#   (probe: the GPU's bandwidth and fixed times on three generated models; before "bench")
#   (probeshapes: three more generated shapes timed all on the GPU, to check the probe)
#   (skipab: prefill with the GPU chains' repeats vs -1 skips)
#   (threads: per-expert and whole-layer decode at 8, 12, 16 CPU threads)
#   (diag: scripts/split_diag.py, chain-by-chain comparison with a numpy reference)
#   (routing / routing2: every placement at 10/25/50 % on the realistic, flat and optimistic
#    routing presets, Q30B-shaped / Mixtral-shaped; ROUTINGS= picks presets)
#   (workersplit: the split equivalence tests with LLAMA_HYBRID_WORKER=1, patch v6, with
#    the launcher thread off (LLAMA_HYBRID_WORKER_LAUNCHER=0) and on (=1; patch v8's default);
#    workerab: the plan's scheduler hand-offs against the CPU worker, answered by the decoding
#    thread and by the worker thread, ROUTINGS= SHARES=; WD_CONFIGS=per-expert-scheduler,
#    per-expert-worker with workerdiag's WD_MODES=default is the plain A/B of patch v8;
#    WA_CONFIGS=per-expert-worker,per-expert-worker-hugepages times patch v13's pinned host
#    buffers on 2 MiB pages against 4 KiB ones; per-expert-worker-prefetch patch v17's worker
#    reading the next split layer's likely experts between posts, LLAMA_HYBRID_WORKER_PREFETCH)
#   (workerdiag: patch v7, the worker row alone in one process per setting of WD_MODES, with
#    its counters: each thread's compute per hand-off, the decoding thread's arrival, the
#    backend's graph messages, and with LLAMA_HYBRID_WORKER_PROFILE=1 the cold graphs' time
#    per op; WD_CONFIGS= adds rows, e.g. per-expert,per-expert-worker; outputs numbered as
#    the modes, workerdiag_ROUTING_N.json; a mode with LLAMA_HYBRID_WORKER_TIMES=1 (patch v23)
#    prints each busy hand-off's compute by its count of cold experts, and with
#    +LLAMA_HYBRID_MMID_DYNAMIC=alt the CPU's equal shares and claimed chunks alternate in one
#    process, each timed)
#   (schedops: the per-expert plan's CPU splits timed per op, LLAMA_HYBRID_SCHED_OPS, patch v7;
#    about 60 s)
#   (fusesplit: the split tests on CUDA with LLAMA_HYBRID_MOE_FUSE=1, patch v9, with the
#    scheduler's hand-off and with the CPU worker, and tests/test_cpu_mmid_flat.py)
#   (cpumoe: scripts/cpu_moe_probe.c, the CPU's rate on K experts of one token against a dense
#    matrix of the same bytes, plain and repacked Q4_K, CPUMOE_RUNS="THREADS K GAP_US [repack];...";
#    PROBE_REUSE=0.68 adds the "ahead" row, patch v17's worker prefetch in the gap; the "ping"
#    row times a one-node graph, the team's start alone)
#   (pollprobe: scripts/pcie_poll_probe.cu, the CPU's read of a busy hand-off's bytes while a GPU
#    kernel polls pinned host memory as the collect kernel does, and without it; about 10 s)
#   (ompprobe: scripts/omp_team_probe.cpp, the cost of an OpenMP region of 16 threads before
#    and after a second live thread makes its own team; about 10 s)
#   (cpupack: the split tests with the packs on the CPU in the CUDA build, fused chain off and on)
#   (savelibs: the built package in parts of 15 MiB, 00_prebuilt-KEY.tar.xz.NN in $OUT; copied
#    to .device-prebuilt/ and carried, a later call's "build" unpacks them instead of building
#    while the patch is the same: KEY is the patch's hash; ~210 s saved per fresh machine)
#   (crashtrace: native stacks of the known crashes, scripts/segv_trace.c preloaded, ~1 min)
#   (stockab: all-gpu decode with a stock CUDA tree against the patched one, alternating, ROUNDS=)
#   (cpuread: the CPU's streaming read at 64 MiB..4 GiB and the calibration's default size)
#   (importorder: a CUDA model load after importing numpy, torch, jaxtyping or hypothesis first, ~20 s)
#   (bothab: patch v10's cold=both, the worker plan with and without its GPU reading a share of
#    the cold experts in place; ROUTINGS= SHARES= TG= REPS= BOTH_CONFIGS=)
#   (traceab: all-gpu decode on the model's own router, a fixed and a uniformly random replayed
#    trace and the presets: what a replayed trace costs against what its routing costs)
#   (ncuidle: ncu's time of every kernel in 2 decode steps of all-gpu, all in packs and the idle
#    worker, scripts/ncu_layers.py sums them; NCU_STEPS= NCU_CONFIGS=)
#   (allhot: every expert on the GPU, all-gpu against hot packs, ROUTINGS= ALLHOT_MODES= ALLHOT_CONFIGS=; TG= REPS= ROUNDS=)
#   (coldsplit: the split equivalence tests again with cold=gpu: the GPU reads the cold
#    experts from pinned host memory, patch v4)
#   (coldab: the planner's per-expert plan with its cold experts on the CPU and read by the
#    GPU, beside whole layers; SHARES= and ROUTINGS= pick budgets and presets (the GPU's
#    LLAMA_HYBRID_COLD_GATHER=1 is off since patch v9, so GATHER=1 is gone); WORKER=1 adds the
#    plan's cold=cpu variant with the CPU worker (patch v6) to the same bench; TIMERS=1 adds a
#    run with the scheduler's per-split breakdown, LLAMA_HYBRID_SCHED_TIMERS; OFFLOAD=1 a run
#    where each decode step uploads its cold experts, llama.cpp's op offload from one token)
#   (cachesplit: the in-session cache's equivalence tests on CUDA, cold experts on the CPU
#    and read by the GPU; cacheab: the planner's plan static and as lru/lfu/seeded caches beside
#    whole layers, ROUTINGS= SHARES= TG=; CACHE_CONFIGS= names the cache rows, e.g.
#    per-expert-cache-lru-q64 for 64 uploads per step, per-expert-cache-auto[-worker] for what
#    `plan --cache auto` picks from the profile's routing; realtrace: the same on a gpt-oss-20b-shaped
#    model driven by the real gpt-oss-20b trace of tests/data/routing, SHARES= PP= TG= REPS= CACHE_CONFIGS=
#    REALTRACE_BASE= (the rows before the cache rows, default whole-layer,per-expert);
#    TIMERS=1 adds a run with the scheduler's per-split breakdown)
#   (prefill: prompts of PROMPTS= tokens (512 2048 8192) at ubatch 512 and at the whole prompt
#    (at most 4096), whole-layer and per-expert plans made for each at one total VRAM per prompt
#    (SHARES= of the expert bytes at ubatch 512), ROUTINGS=; UBATCHES="512 2048" picks the
#    ubatches, FLASH=1 plans and loads with flash attention (budgets then measured with it))
#   (upstream: upstream llama.cpp b11549's own GPU expert cache, --moe-cache-mib, and its
#    --n-cpu-moe on the Q30B-shaped model at SHARES= of the expert bytes, with its own router
#    (= optimistic); built from .upstream/ (scripts/prepare_upstream.sh) into /tmp/upstream-build;
#    UPSTREAM_ARGS= adds flags to every upstream run, UP_WINDOWS= the decode windows per run)
#   (amx: CPU-only prefill/decode with llama.cpp's extra CPU buffer types on and off)
#   (multisplit: on a machine with two GPUs, patch v5: the split equivalence tests with the
#    layers split over both cards and each layer's pack on its own card (buft=auto), with the
#    cold experts on the CPU and read by each card; tests/test_multigpu.py)
#   (multigpu: on a machine with two GPUs: plans at 2 x B over both cards, at 2 x B on one card
#    and at B on one card (MG_BUDGET=B, default 4GiB), each run MG_REPS times (2); decode speed and VRAM
#    per card (llama.cpp's buffers, and nvidia-smi's peak) against each card's budget; a
#    two-card plan on one visible card must be refused. Summary: multigpu_summary.md)
# One call does not fit every step in 10 minutes. Measured 2026-11-28 (wall time per call):
#   "build,diag,split,recorder"  ~5 min (build 203-257 s)
#   "probe"                      8 s (two shapes; three now)
#   "bench"                      3 budgets, tg 64, 2 reps: 1.9-2.3 min
#   "plan"                       profile on the GPU + 2 plans with two runs each: 86-89 s
#                                (now 2 planner variants per budget: about 2.5 min)
# A call returns at most 8 files from $OUT (a ninth was left out once); keep steps' outputs few.
#   "bench2,skipab"              bench2 ~2.5 min, skipab ~2 min
# Chain the calls within 30 s (the machine stays warm that long; a helper polling the device
# status can start the next call the moment one ends). "build" again after a patch change
# rebuilds incrementally while the machine is warm.
# Results go to $OUT. Prepare the carried folder first on a machine with PyPI
# (scripts/prepare_device.sh does both steps):
#   python scripts/build_backend.py --trim-sdist .device/llama_cpp_python-0.3.36-trimmed.tar.gz
#   pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .device/whl gguf==0.19.0 diskcache
# and call the device tool with carry=[".device"] and: bash scripts/gpu_eval.sh [steps]
set -uo pipefail
STEPS=${1:-build,diag,split,recorder,probe,bench,plan}
OUT=${OUT:-/tmp/hybrid-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HYBRID_GGUF_HOME=/tmp/hgcache
# a call that carries only .upstream/ reuses the wheels an earlier call of this warm machine installed
if [ -d .device/whl ] || [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
log() { echo "[$(date +%T)] $*"; }
# a call brings back at most 8 files of $OUT, the first by name: every output but the build log
# also goes into 0_outputs.tar.gz, whatever the steps wrote and however the script ends
bundle() {
    ( cd "$OUT" && ls | grep -v -e '^0_outputs.tar.gz$' -e '^build.log$' -e '^00_prebuilt-' | tar czf 0_outputs.tar.gz -T - ) 2>/dev/null
}
trap bundle EXIT
FAILED=""
failed() { FAILED="$FAILED $1"; log "FAILED: $1"; }
has() { [[ ",$STEPS," == *",$1,"* ]]; }
# a file-name tag for an environment mode: "LLAMA_HYBRID_A=1+LLAMA_HYBRID_B=x" -> "A_1_B_x"
mode_tag() { local t=${1//LLAMA_HYBRID_/}; echo "${t//[^A-Za-z0-9]/_}"; }
# `hybrid-gguf bench` as the steps below have always run it: context 2048, and no GPU probe
# inside a bench step (the "probe" step runs it); budget lists are space-separated here
# (REVERSE=1: every bench times its placements last to first, against drift within a call;
# ROUNDS=N: every placement timed N times in alternating order, `bench --rounds`)
# ISOLATE=1: every placement timed in its own process (`bench --isolate`)
run_bench() { python3 -m hybrid_gguf.cli bench "$@" --ctx 2048 --no-probe-gpu ${REVERSE:+--reverse} ${ROUNDS:+--rounds $ROUNDS} ${ISOLATE:+--isolate}; }
commas() { echo "$*" | tr ' ' ,; }
# tests/test_hybrid_split.py on CUDA in its own process: split_suite NAME LABEL [VAR=VALUE ...];
# output in $OUT/NAME.txt, a failure recorded as LABEL
split_suite() {
    local name=$1 label=$2
    shift 2
    if env HYBRID_GGUF_TEST_PACK_DEVICE=CUDA0 HYBRID_GGUF_REQUIRE_PATCHED=1 "$@" \
        python3 -c "import llama_cpp, sys, pytest; sys.exit(pytest.main(['-q', '-rA', '-s', '-p', 'no:cacheprovider', 'tests/test_hybrid_split.py']))" \
        > "$OUT/$name.txt" 2>&1; then
        log "$label: split equivalence PASSED"; grep -E "passed|failed" "$OUT/$name.txt" | tail -2
    else
        grep -E "^FAILED|passed|failed|Error" "$OUT/$name.txt" | tail -12; failed "$label"
    fi
}

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee "$OUT/machine.txt"
nproc >> "$OUT/machine.txt"; free -g >> "$OUT/machine.txt"
# how the CPUs are lent: a CFS quota (cpu.max) stalls every thread once the cgroup has spent it
{ lscpu | grep -E "^(Model name|Socket|Core|Thread|CPU\(s\)|NUMA node\(s\))"
  for f in cpu.max cpuset.cpus.effective; do echo "$f: $(cat /sys/fs/cgroup/$f 2>/dev/null || echo none)"; done
  # transparent huge pages: the bench rows log how much of the process they back
  for f in enabled defrag; do echo "thp $f: $(cat /sys/kernel/mm/transparent_hugepage/$f 2>/dev/null || echo none)"; done
  # profilers, for a kernel-level look at a split layer next time
  for t in nsys ncu gdb perf; do echo "$t: $(command -v $t || echo none)"; done
} >> "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" | tail -10
# the cgroup's throttling so far: "nr_throttled throttled_usec" (nothing without a quota)
cpu_throttled() { awk '/^nr_throttled|^throttled_usec/ {printf "%s=%s ", $1, $2}' /sys/fs/cgroup/cpu.stat 2>/dev/null; }

# Libraries built by an earlier call for this very patch (`savelibs`, below) skip the build:
# a fresh machine spent ~210 s of every call's device time building (tenth lease: 4 of 5 calls).
# They travel as .device-prebuilt/00_prebuilt-KEY.tar.xz.NN (carry ".device-prebuilt", and
# ".device/whl" instead of all of .device: the sdist is needed only to build). "-native": the CPU
# backend is -march=native since the twelfth lease; older parts were built for AVX2.
PREBUILT_KEY="$(sha256sum patches/llama-cpp-hybrid.patch | cut -c1-16)-cuda-sm90-native"
PREBUILT_PARTS=(.device-prebuilt/00_prebuilt-"$PREBUILT_KEY".tar.xz.*)
if has build; then
    t0=$(date +%s)
    if [ -f "/tmp/lldev/prebuilt-$PREBUILT_KEY" ] && [ -d /tmp/lldev/src/llama_cpp/lib ]; then
        # a warm machine that unpacked these parts already (it has no tree to rebuild in)
        log "build: prebuilt libraries $PREBUILT_KEY already unpacked"
    elif [ -f "${PREBUILT_PARTS[0]}" ] && { [ ! -d /tmp/lldev/src/llama_cpp/lib ] || compgen -G "/tmp/lldev/prebuilt-*" > /dev/null; }; then
        # a fresh machine, or one holding another patch's unpacked parts
        log "build: prebuilt libraries $PREBUILT_KEY (${#PREBUILT_PARTS[@]} parts)"
        rm -rf /tmp/lldev/src/llama_cpp /tmp/lldev/prebuilt-*
        mkdir -p /tmp/lldev/src && cat "${PREBUILT_PARTS[@]}" | xz -d | tar -C /tmp/lldev/src -xf - \
            || { log "prebuilt libraries unreadable"; exit 1; }
        touch "/tmp/lldev/prebuilt-$PREBUILT_KEY"
    elif [ ! -f .device/llama_cpp_python-0.3.36-trimmed.tar.gz ]; then
        log "build: no prebuilt libraries for patch $PREBUILT_KEY and no .device/ sdist to build from (carry .device)"
        exit 1
    else
        rm -f /tmp/lldev/prebuilt-*  # the tree's build replaces what was unpacked
        # An incremental CMake tree in /tmp (kept while the machine stays warm): the first build
        # takes ~5 min, a rebuild after a small patch change about a minute. No wheel: the CUDA
        # wheel is 253 MB and could not come back anyway.
        log "build (incremental dev tree /tmp/lldev)"
        # 90-real: SASS for the H200 alone, no embedded PTX, so savelibs' parts stay small
        python3 scripts/build_backend.py --cuda --cuda-arch 90-real --dev-tree /tmp/lldev \
            --sdist .device/llama_cpp_python-0.3.36-trimmed.tar.gz > "$OUT/build.log" 2>&1 \
            || { tail -40 "$OUT/build.log"; exit 1; }
    fi
    log "build done in $(( $(date +%s) - t0 )) s"
fi
if has savelibs; then
    # the built package (Python, libraries, the public headers the probes compile against) in
    # parts of at most 15 MiB, named to come back before other outputs (8 files, 16 MiB each);
    # stripped, since a later call carries them inside the 64 MiB working-tree limit
    find /tmp/lldev/src/llama_cpp/lib -name '*.so*' -type f -exec strip --strip-unneeded {} + 2>/dev/null
    ( cd /tmp/lldev/src && tar -cf - --exclude=__pycache__ llama_cpp vendor/llama.cpp/include vendor/llama.cpp/ggml/include ) \
        | xz -T0 -6 | split -b 15m -d -a 2 - "$OUT/00_prebuilt-$PREBUILT_KEY.tar.xz."
    log "savelibs: $(ls "$OUT"/00_prebuilt-* | wc -l) parts, $(du -ch "$OUT"/00_prebuilt-* | tail -1 | cut -f1); copy them to .device-prebuilt/"
fi
[ -d /tmp/lldev/src/llama_cpp/lib ] && export PYTHONPATH=/tmp/lldev/src:$PYTHONPATH

python3 -c "import llama_cpp; from hybrid_gguf.llama import hybrid as h; print('llama_cpp', llama_cpp.__version__, h.capability())"

if has diag; then
    log "split diagnostics: which chain differs from a numpy reference"
    for tokens in 15 48; do
        for hot in "0:7" "0:7,3,5,1;1:2,6;2:0,1,2,3,4,5,6"; do
            log "diag: $tokens tokens, hot $hot"
            python3 scripts/split_diag.py --pack-device CUDA0 --hot "$hot" --tokens $tokens 2>&1 \
                | grep -v "ggml_cuda_init\|Device 0" | tee -a "$OUT/split_diag.txt"
        done
    done
fi

if has split; then
    # the split must match the unsplit model (MAPS="pack cpu" also tries the tables on the CPU)
    split_ok=0
    for maps in ${MAPS:-pack}; do
        log "split equivalence on CUDA, lookup tables on: $maps"
        if LLAMA_HYBRID_MAPS=$maps HYBRID_GGUF_TEST_PACK_DEVICE=CUDA0 HYBRID_GGUF_REQUIRE_PATCHED=1 \
            python3 -c "import llama_cpp, sys, pytest; sys.exit(pytest.main(['-q', '-rA', '-s', '-p', 'no:cacheprovider', 'tests/test_hybrid_split.py', 'tests/test_routing_process.py']))" \
            > "$OUT/split_cuda_$maps.txt" 2>&1; then
            log "split equivalence PASSED with tables on $maps"; echo "$maps" > /tmp/hybrid_variant
            grep -E "passed|failed" "$OUT/split_cuda_$maps.txt" | tail -2
            split_ok=1
            break
        fi
        grep -E "^FAILED|passed|failed|Error" "$OUT/split_cuda_$maps.txt" | tail -8
    done
    [ $split_ok = 1 ] || failed split
fi
[ -f /tmp/hybrid_variant ] && export LLAMA_HYBRID_MAPS=$(cat /tmp/hybrid_variant) && log "using LLAMA_HYBRID_MAPS=$LLAMA_HYBRID_MAPS"

if has workersplit; then
    # patch v6: every split test with the cold chains on the CPU worker (LLAMA_HYBRID_WORKER=1:
    # decode steps, and the short prompt where a test raises the token limit); again with the
    # launcher thread making the compute calls (patch v7's LLAMA_HYBRID_WORKER_LAUNCHER=1,
    # patch v8's default)
    for launcher in 0 1; do
        name=split_cuda_worker$([ $launcher = 1 ] && echo _launcher)
        log "split equivalence on CUDA with the CPU worker, LLAMA_HYBRID_WORKER_LAUNCHER=$launcher"
        split_suite "$name" "workersplit launcher $launcher" LLAMA_HYBRID_WORKER=1 LLAMA_HYBRID_WORKER_LAUNCHER=$launcher
        grep -E "worker \(max" "$OUT/$name.txt" | head -6
    done
fi

if has fusesplit; then
    # patch v9: the split tests with LLAMA_HYBRID_MOE_FUSE=1 (one token's gate, up, swiglu and
    # down on the CPU as one pass), with the scheduler's hand-off and with the CPU worker, and
    # tests/test_cpu_mmid_flat.py (stock, shares and fused against each other, CPU-only models)
    for worker in 0 1; do
        name=split_cuda_fused$([ $worker = 1 ] && echo _worker)
        log "split equivalence on CUDA with the fused CPU chain, LLAMA_HYBRID_WORKER=$worker"
        split_suite "$name" "fusesplit worker $worker" LLAMA_HYBRID_MOE_FUSE=1 LLAMA_HYBRID_WORKER=$worker
    done
    python3 -c "import llama_cpp, sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_cpu_mmid_flat.py']))" \
        > "$OUT/cpu_mmid_flat.txt" 2>&1 \
        || failed "test_cpu_mmid_flat"
    tail -3 "$OUT/cpu_mmid_flat.txt"
fi

if has cpupack; then
    # the split tests with the packs on the CPU in the CUDA build (n_gpu_layers 0, the GPU only
    # for op offload), with the fused chain off and on. In the ninth lease `python3 -m pytest`
    # crashed here in the first model load, fused chain or not: pytest's plugins import numpy
    # before llama_cpp (docs/backend-patch.md, "Import order"), so llama_cpp goes first.
    for fuse in 0 1; do
        log "split equivalence, packs on the CPU in the CUDA build, LLAMA_HYBRID_MOE_FUSE=$fuse"
        if env LLAMA_HYBRID_MOE_FUSE=$fuse python3 -X faulthandler -c "import llama_cpp, sys, pytest; \
                sys.exit(pytest.main(['-v', '-x', '-p', 'no:cacheprovider', 'tests/test_hybrid_split.py']))" \
                > "$OUT/split_cpupack_fuse$fuse.txt" 2>&1; then
            tail -1 "$OUT/split_cpupack_fuse$fuse.txt"
        else
            grep -E "PASSED|FAILED|Fatal|File \"|Error" "$OUT/split_cpupack_fuse$fuse.txt" | tail -25
            failed "cpupack fuse $fuse"
        fi
    done
    # the open float cold=both delta (tenth and eleventh leases: 8.9e-3 on the 64-token ubatch
    # that op offload sends to the GPU): ggml-cuda's cuBLAS handle computes F32 GEMMs in TF32;
    # NVIDIA_TF32_OVERRIDE=0 turns TF32 off in cuBLAS (not in ggml's own mma kernels)
    log "cpupack: the both-readers test with NVIDIA_TF32_OVERRIDE=0"
    NVIDIA_TF32_OVERRIDE=0 python3 -c "import llama_cpp, sys, pytest; \
        sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/test_hybrid_split.py', '-k', 'both_readers']))" \
        > "$OUT/split_cpupack_notf32.txt" 2>&1
    grep -E "passed|failed|logit delta" "$OUT/split_cpupack_notf32.txt" | tail -4
fi

if has crashtrace; then
    # the native stack of the crashes the ninth and tenth leases met (the CUDA build with the
    # packs on the CPU, gpt-oss under the CPU worker; a CUDA load after numpy), by
    # scripts/segv_trace.c (no debugger here), resolved with addr2line; plus which C++ and
    # OpenMP runtimes numpy and torch bring into the process
    cc -O1 -shared -fPIC -o /tmp/segv_trace.so scripts/segv_trace.c || failed "segv_trace build"
    CT="$OUT/crashtrace.txt"
    { echo "gdb: $(command -v gdb || echo none)"; ldd /tmp/lldev/src/llama_cpp/lib/libllama.so 2>&1 | grep -E "stdc|gomp|gcc_s"; } > "$CT"
    for first in numpy torch; do
        echo "== runtimes after import $first" >> "$CT"
        python3 -c "import $first; import llama_cpp; print('\n'.join(sorted({l.split()[-1] for l in open('/proc/self/maps') if any(k in l for k in ('stdc++', 'gomp', 'gcc_s', 'openblas', 'gfortran', 'iomp'))})))" >> "$CT" 2>&1
    done
    if [ -f /tmp/io.gguf ] || python3 -c "from hybrid_gguf.synth import preset, write_synthetic_moe as w; w('/tmp/io.gguf', preset('tiny', n_layer=2))"; then
        for pre in "" "/usr/lib/x86_64-linux-gnu/libstdc++.so.6"; do
            echo "== CUDA load after numpy, LD_PRELOAD=$pre segv_trace" >> "$CT"
            LD_PRELOAD="$pre /tmp/segv_trace.so" python3 -c "import numpy; import llama_cpp
m = llama_cpp.Llama('/tmp/io.gguf', n_gpu_layers=99, n_ctx=64, verbose=False); print('loaded')" >> "$CT" 2>&1
            echo "exit $?" >> "$CT"
        done
    fi
    for fuse in 0 1; do
        echo "== packs on the CPU, gpt-oss worker test, LLAMA_HYBRID_MOE_FUSE=$fuse" >> "$CT"
        LD_PRELOAD=/tmp/segv_trace.so LLAMA_HYBRID_MOE_FUSE=$fuse python3 -c "import llama_cpp, sys, pytest; \
            sys.exit(pytest.main(['-q', '-x', '-s', '-p', 'no:cacheprovider', 'tests/test_hybrid_split.py', '-k', 'test_cpu_worker_computes_the_same and gpt-oss']))" \
            2>&1 | grep -v "^E  *File" | tail -60 >> "$CT"
    done
    # library(+0xOFFSET) frames to function names (symbol tables; the build has no line info)
    python3 - "$CT" <<'PYEOF'
import re, subprocess, sys
path = sys.argv[1]
lines = open(path).read().splitlines()
out = []
for line in lines:
    m = re.match(r"(/\S+?)\(\+(0x[0-9a-f]+)\)\[", line)
    if m:
        try:
            fn = subprocess.run(["addr2line", "-f", "-C", "-e", m.group(1), m.group(2)], capture_output=True,
                                text=True, timeout=20).stdout.split("\n")[0]
        except Exception as exc:
            fn = f"? ({exc})"
        line = f"{line}  {fn}"
    out.append(line)
open(path, "w").write("\n".join(out) + "\n")
PYEOF
    grep -E "^==|segv_trace|libggml|libllama|exit|passed|failed" "$CT" | cut -c1-220 | head -80
fi

if has cpuread; then
    # the CPU's streaming read over buffers below and beyond the last-level cache: the
    # calibration's DRAM rate must not be the cache's
    log "cpuread: streaming read by buffer size"
    python3 - <<'PYEOF' 2>&1 | tee "$OUT/cpuread.txt"
from hybrid_gguf.bench.probe import cpu_read_size, last_level_cache_bytes, measure_cpu_read
from hybrid_gguf.llama.devices import cpu_ram
llc = last_level_cache_bytes()
default = cpu_read_size(llc, cpu_ram().available_bytes)
print(f"last-level cache {llc / 2**20:.0f} MiB, default read {default / 2**20:.0f} MiB")
for n in (64 * 2**20, 256 * 2**20, 1 * 2**30, 2 * 2**30, 4 * 2**30, default):
    rates = [measure_cpu_read(n) / 1e9 for _ in range(3)]
    print(f"{n / 2**20:6.0f} MiB: " + ", ".join(f"{r:6.1f}" for r in rates) + " GB/s")
PYEOF
fi

if has importorder; then
    # which module imported before llama_cpp makes a CUDA model load crash on this machine
    # (docs/backend-patch.md, "Import order"; in the ninth lease `python -m pytest`, whose
    # plugins import numpy and more, crashed in the first load): one process per first import
    python3 -c "from hybrid_gguf.synth import preset, write_synthetic_moe as w; w('/tmp/io.gguf', preset('tiny', n_layer=2))" \
        || failed "importorder model"
    for first in none numpy torch jaxtyping hypothesis; do
        pre=""; [ "$first" = none ] || pre="import $first; "
        if python3 -X faulthandler -c "${pre}import llama_cpp
m = llama_cpp.Llama('/tmp/io.gguf', n_gpu_layers=99, n_ctx=64, verbose=False); print('loaded')" > "$OUT/importorder_$first.txt" 2>&1; then
            log "importorder: $first first: loads"
        else
            log "importorder: $first first: exit $? ($(grep -m1 -E 'Fatal|Error' "$OUT/importorder_$first.txt"))"
        fi
    done
    # what keeps a load after numpy alive (preloading the system libstdc++ did, tenth lease):
    # NAME|shell prefix|python before `import llama_cpp`; one line each in importorder_variants.txt
    LOADPY="import llama_cpp; m = llama_cpp.Llama('/tmp/io.gguf', n_gpu_layers=NGL, n_ctx=64, verbose=False); print('loaded')"
    while IFS='|' read -r name prefix pre ngl; do
        code="$pre; ${LOADPY/NGL/$ngl}"
        bash -c "$prefix python3 -c \"\$0\"" "$code" > /tmp/io_variant.txt 2>&1
        rc=$?
        log "importorder variant $name: exit $rc $(grep -m1 -E 'loaded|Error' /tmp/io_variant.txt)" | tee -a "$OUT/importorder_variants.txt"
    done <<'VARIANTS'
numpy, CPU load||import numpy|0
numpy, libstdc++ global after it||import numpy, ctypes, os; ctypes.CDLL('libstdc++.so.6', mode=os.RTLD_GLOBAL)|99
libstdc++ global, then numpy||import ctypes, os; ctypes.CDLL('libstdc++.so.6', mode=os.RTLD_GLOBAL); import numpy|99
numpy, one OpenBLAS thread|OPENBLAS_NUM_THREADS=1|import numpy|99
numpy, 64 MiB stacks|ulimit -s 65536;|import numpy|99
numpy, then hybrid_gguf||import numpy, hybrid_gguf|99
numpy.libs' openblas alone||import ctypes, glob; ctypes.CDLL(glob.glob('/opt/torch/.venv/lib/python3.12/site-packages/numpy.libs/libscipy_openblas*')[0])|99
numpy.libs' gfortran alone||import ctypes, glob; ctypes.CDLL(glob.glob('/opt/torch/.venv/lib/python3.12/site-packages/numpy.libs/libgfortran*')[0])|99
VARIANTS
fi

if has coldsplit; then
    log "split equivalence on CUDA with cold=gpu (zero-copy cold experts)"
    split_suite split_cuda_coldgpu coldsplit HYBRID_GGUF_TEST_COLD=gpu
fi

BIG=/tmp/models/q30b-like-q4k.gguf
if has recorder || has bench || has plan || has skipab || has threads || has routing || has coldab || has cacheab || has multigpu || has workerab || has workerdiag || has schedops || has allhot || has ncuidle || has bothab || has traceab \
    || has upstream || has prefill || has stockab; then
    log "make the Qwen3-30B-A3B-shaped Q4_K model"
    t0=$(date +%s)
    [ -f "$BIG" ] || python3 scripts/make_bench_model.py --preset qwen3-30b-a3b-like --weight-type Q4_K --workers 16 --out "$BIG" 2>&1 | tail -2
    log "model made in $(( $(date +%s) - t0 )) s: $(du -h "$BIG" | cut -f1)"
fi

if has recorder; then
    log "recorder overhead, everything on the GPU (48 layers)"
    python3 scripts/bench_recorder.py --model "$BIG" --n-gpu-layers 99 --pp 512 --tg 256 --reps 3 --modes off,on,sampled \
        --json "$OUT/recorder_gpu.json" 2>&1 | tail -12 || failed recorder
    for stride in ${REC_STRIDES:-}; do  # other decode strides, as `run` would sample them
        log "recorder: sampled 1 decoded token in $stride"
        python3 scripts/bench_recorder.py --model "$BIG" --n-gpu-layers 99 --pp 512 --tg $(( stride * 8 * 2 )) --reps 3 \
            --modes off,sampled --decode-stride "$stride" --json "$OUT/recorder_gpu_s$stride.json" 2>&1 | tail -6 \
            || failed "recorder stride $stride"
    done
fi

if has probe; then
    # the GPU's bandwidth and fixed times from three generated shapes, stored in the
    # calibration before "bench" fits the rest (its one model cannot separate them)
    log "GPU probe"
    python3 -m hybrid_gguf.cli bench --probe-only --probe-gpu --threads 16 --json > "$OUT/gpu_probe.json" || failed probe
    python3 -c "import json; d = json.load(open('$OUT/gpu_probe.json')); print({k: d[k] for k in ('gpu_bytes_per_s', 'gpu_layer_s', 'gpu_step_s')}); [print(n, round(t['decode_tokens_per_s'], 1), 'tok/s') for n, t in d['probes'].items()]"
fi

if has probeshapes; then
    # more shapes than the probe uses, to check its fit out of sample (call 5 of 2026-11-28)
    log "probe shapes: tiny2, deep16, wide8"
    python3 -c "
import llama_cpp, json
from hybrid_gguf.bench.probe import measure_probe
from hybrid_gguf.bench.model_maker import bench_spec, write_bench_model
small = dict(n_embd=1024, n_head=16, n_head_kv=4, head_dim=64, n_expert=32, n_expert_used=8, n_ff_exp=256)
out = {}
for name, preset, kw in [('tiny2', 'qwen3-30b-a3b-like', dict(small, n_layer=2)),
                         ('deep16', 'qwen3-30b-a3b-like', dict(small, n_layer=16)),
                         ('wide8', 'mixtral-8x7b-like', dict(n_layer=8))]:
    p = '/tmp/models/probe_' + name + '.gguf'
    write_bench_model(p, bench_spec(preset, 'Q4_K', **kw))
    t = measure_probe(p, 64, 3, 16)
    out[name] = t.to_dict()
    print(name, round(t.decode_tokens_per_s, 1), flush=True)
json.dump(out, open('$OUT/probe_extra.json', 'w'), indent=1)
" || failed probeshapes
fi

if has bench; then
    log "placement A/B"
    run_bench "$BIG" --expert-share "$(commas ${BUDGETS:-0.25 0.10 0.50})" --pp 512 --tg ${TG:-48} \
        --reps ${REPS:-2} --threads 16 --json-detail "$OUT/bench_q30b.json" 2>&1 | tee "$OUT/bench_q30b.txt" || failed bench
fi
if has bench2; then
    MX=/tmp/models/mixtral-like-q4k.gguf
    log "second arch: Mixtral-8x7B-shaped Q4_K (8 large experts, top-2)"
    [ -f "$MX" ] || python3 scripts/make_bench_model.py --preset mixtral-8x7b-like --weight-type Q4_K --workers 16 --out "$MX" 2>&1 | tail -1
    run_bench "$MX" --expert-share "$(commas ${BUDGETS2:-0.25})" --pp 512 --tg ${TG:-48} \
        --reps ${REPS:-2} --threads 16 --no-calibrate --json-detail "$OUT/bench_mixtral.json" 2>&1 | tee "$OUT/bench_mixtral.txt" || failed bench2
fi

if has routing || has routing2; then
    # every placement at 10/25/50 % of the expert bytes on each routing preset (docs/routing.md);
    # one compact summary (scripts/bench_summary.py) instead of the raw per-token JSON
    MX=/tmp/models/mixtral-like-q4k.gguf
    if has routing2; then
        [ -f "$MX" ] || python3 scripts/make_bench_model.py --preset mixtral-8x7b-like --weight-type Q4_K --workers 16 --out "$MX" 2>&1 | tail -1
    fi
    for M in $(has routing && echo q30b) $(has routing2 && echo mixtral); do
        MODEL=$BIG; [ $M = mixtral ] && MODEL=$MX
        for R in ${ROUTINGS:-realistic flat optimistic}; do
            log "placements on $M, $R routing"
            # the first run of a call stores the GPU calibration for later plans; the rest do not
            CAL=--no-calibrate; [ "$M-$R" = "q30b-realistic" ] && CAL=
            run_bench "$MODEL" --routing "$R" --expert-share "$(commas ${BUDGETS:-0.10 0.25 0.50})" \
                --pp 512 --tg ${TG:-48} --reps ${REPS:-2} --threads 16 $CAL --json-detail "/tmp/routing_${M}_$R.json" 2>&1 \
                | grep -E "^(cpu|whole|per|all)-|_vs_|^== |profiled" || failed "routing $M $R"
            # after each run, so a call cut short still returns what it measured
            python3 scripts/bench_summary.py "$OUT/routing_summary.json" /tmp/routing_*.json > "$OUT/routing_summary.md"
        done
    done
    cat "$OUT/routing_summary.md"
fi

if has amx; then
    # CPU-only prefill and decode with llama.cpp's extra CPU buffers (AMX where the CPU has it)
    # on and off, on a CPU-only build of the same patch
    log "CPU features: $(grep -o -w 'avx512f\|avx512_vnni\|amx_tile\|amx_int8\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    python3 scripts/build_backend.py --cpu --dev-tree /tmp/llcpu --sdist .device/llama_cpp_python-0.3.36-trimmed.tar.gz \
        > "$OUT/build_cpu.log" 2>&1 || { tail -20 "$OUT/build_cpu.log"; failed "amx build"; }
    SMALL=/tmp/models/q30b-like-8l-q4k.gguf
    [ -f "$SMALL" ] || python3 scripts/make_bench_model.py --preset qwen3-30b-a3b-like --weight-type Q4_K --n-layer 8 --workers 16 --out "$SMALL" 2>&1 | tail -1
    # the native CPU build crashed in llama_model::print_info (std::ostream inside libggml)
    # under that machine's Python until the system libstdc++ was preloaded (2026-11-30)
    PYTHONPATH=/tmp/llcpu/src:/tmp/site:$PWD LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 \
        python3 -m pytest -q -p no:cacheprovider tests/test_cpu_amx.py 2>&1 | tail -1
    PYTHONPATH=/tmp/llcpu/src:/tmp/site:$PWD LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libstdc++.so.6 \
        python3 scripts/cpu_extra_ab.py "$SMALL" --pp 512 --tg 32 --reps 2 --threads 16 \
        --json "$OUT/cpu_extra_ab.json" || failed amx
fi

if has threads; then
    # decode of a split placement is bound by hand-offs; fewer CPU threads may wake and
    # synchronize faster than all 16 (the CUDA launch thread competes with them too)
    for t in ${THREADS_SWEEP:-8 12 16}; do
        log "per-expert vs whole-layer at 25 %, $t CPU threads"
        run_bench "$BIG" --expert-share 0.25 --configs whole-layer,per-expert \
            --pp 512 --tg ${TG:-64} --reps 2 --threads "$t" --no-calibrate --json-detail "/tmp/threads_$t.json" 2>&1 | grep -E "^(whole|per)" \
            || failed "threads $t"
    done
    python3 -c "import json, sys; json.dump({t: json.load(open(f'/tmp/threads_{t}.json')) for t in sys.argv[1:]}, open('$OUT/threads.json', 'w'), indent=1)" ${THREADS_SWEEP:-8 12 16}
fi

if has skipab; then
    # prefill with the GPU chains' unowned slots as weight-0 repeats (=0) or as -1 skips (=1)
    for v in 0 1; do
        log "per-expert vs whole-layer at 25 %, LLAMA_HYBRID_GPU_SKIP=$v"
        LLAMA_HYBRID_GPU_SKIP=$v run_bench "$BIG" --expert-share 0.25 \
            --configs whole-layer,per-expert --pp 512 --tg 16 --reps 2 --threads 16 --no-calibrate \
            --json-detail "$OUT/skipab_$v.json" 2>&1 | grep -E "^(whole|per)|_vs_"
    done
fi

if has plan; then
    log "planned runs: VRAM within budget, predicted vs measured decode"
    if [ -n "${CALIBRATION:-}" ]; then
        # a calibration fitted by "bench" in an earlier call (the machine may be a fresh one
        # of the same kind): stored under this machine's id for `plan`
        python3 -c "import json, sys; from dataclasses import replace; from hybrid_gguf.planning import calibration as p
bw = p.Bandwidth.from_dict(json.load(open(sys.argv[1]))); p.save_calibration(replace(bw, machine=p.machine_id()))
print('calibration from', sys.argv[1], bw.machine)" "$CALIBRATION"
    fi
    python3 -c "from hybrid_gguf.bench.runner import package_text, PROFILE_PACKAGES as P, EVAL_PACKAGES as E
open('/tmp/prof.txt', 'w').write(package_text(P, 8000)); open('/tmp/eval.txt', 'w').write(package_text(E, 3000))"
    # short prompts and sampled decodes, like the timed runs below (prefill of source text
    # routes differently from sampled tokens of random weights); profiled on the GPU
    # a fresh profile per call (KEEP_STORE=1 merges into the last call's, as the loop would)
    [ -n "${KEEP_STORE:-}" ] || rm -rf /tmp/store
    python3 -m hybrid_gguf.cli profile "$BIG" --text /tmp/prof.txt --chunk-chars 200 -n 128 --temp 1.0 \
        --store /tmp/store --json > "$OUT/profile_q30b.json" || failed profile
    for B in ${PLAN_BUDGETS:-6GiB 10GiB}; do
      # planner variants: --promote-from 0.9 (the default) and 0 (the speed model weighs
      # promoting any layer whole); one file per budget and variant
      for P in ${PROMOTE_FROMS:-0.9 0}; do
        rm -f "/tmp/plan_${B}_p$P.yaml"  # a plan left by an earlier call would be kept as "previous"
        python3 -m hybrid_gguf.cli plan "$BIG" --gpu-budget "$B" --ctx 4096 --store /tmp/store --promote-from "$P" \
            --out "/tmp/plan_${B}_p$P.yaml" --json > "/tmp/plan_${B}_p$P.json"
        # sampled decode (greedy decoding of random weights repeats one token, one routing
        # pattern); recording on, as `run` is by default, to report the session's hit rate;
        # twice (the same plan measured 11 % apart in two calls of one lease)
        for rep in 1 2; do
            python3 -m hybrid_gguf.cli run "$BIG" --plan "/tmp/plan_${B}_p$P.yaml" --ctx 4096 -n 128 --temp 1.0 --seed 1 \
                -t 16 --json -p "$(head -c 1500 /tmp/eval.txt)" > "/tmp/run_${B}_p${P}_$rep.json"
            python3 scripts/check_plan_run.py "/tmp/plan_${B}_p$P.json" "/tmp/run_${B}_p${P}_$rep.json" || failed "plan $B p$P"
        done
        python3 -c "import json, sys; json.dump({'plan': json.load(open(sys.argv[1])), 'runs': [json.load(open(f)) for f in sys.argv[3:]]}, open(sys.argv[2], 'w'), indent=1)" \
            "/tmp/plan_${B}_p$P.json" "$OUT/planned_${B}_p$P.json" /tmp/run_${B}_p${P}_1.json /tmp/run_${B}_p${P}_2.json
      done
    done
fi
if has coldab; then
    # per-expert with the cold experts on the CPU (hand-offs) and read by the GPU, beside whole
    # layers, at one budget; OFFLOAD=1: op offload from one token with pinned host weights (each
    # decode step uploads the cold experts it uses, no cache); TIMERS=1: the scheduler's
    # per-split breakdown of every timed decode window (slower: a sync per split)
    for R in ${ROUTINGS:-realistic optimistic}; do
        for S in ${SHARES:-0.25}; do
            log "cold on CPU vs read by the GPU: $R routing, $S of the expert bytes"
            run_bench "$BIG" --routing "$R" --expert-share "$S" --pp 256 --tg 32 --reps 2 --threads 16 --no-calibrate \
                --configs whole-layer,per-expert,per-expert-cold-cpu,per-expert-cold-gpu${WORKER:+,per-expert-worker} \
                --json-detail "$OUT/coldab_${R}_$S.json" 2>&1 | grep -E "^ *(cpu|whole|per|all)-|_vs_|cold experts" \
                || failed "coldab $R $S"
            if [ -n "${OFFLOAD:-}" ]; then
                log "the same, op offload from one token (each step uploads its cold experts)"
                GGML_OP_OFFLOAD_MIN_BATCH=1 run_bench "$BIG" --routing "$R" --expert-share "$S" --pp 256 --tg 32 --reps 2 \
                    --threads 16 --no-calibrate --no-repack --configs whole-layer,per-expert-cold-cpu \
                    --json-detail "$OUT/coldab_offload_${R}_$S.json" 2>&1 | grep -E "^ *(whole|per)-" || failed "offload $R $S"
            fi
            if [ -n "${TIMERS:-}" ]; then
                log "scheduler timers per decode window"
                LLAMA_HYBRID_SCHED_TIMERS=1000000 run_bench "$BIG" --routing "$R" --expert-share "$S" --pp 256 --tg 32 \
                    --reps 1 --threads 16 --no-calibrate --configs whole-layer,per-expert-cold-cpu,per-expert-cold-gpu${WORKER:+,per-expert-worker} 2>&1 \
                    | grep -E "hybrid-sched|^ *(whole|per)-" | tee "$OUT/sched_timers_${R}_$S.txt"
            fi
        done
    done
fi
if has stockab; then
    # every expert on the GPU, the stock llama.cpp against the patched one, alternating: does
    # the patch slow a plan that has no packs? (all on the GPU the Q30B shape decoded 258 tok/s
    # on 2026-11-28 with patch v2-v3, and 208-217 from 2026-11-30 on.) The stock tree builds
    # once per machine (~4 min), --portable: a stock native build crashes in its AMX prompt path
    # on this host (the tile-config bug the patch fixes), and the untimed profile load is on
    # the CPU; all-gpu decode runs nothing of weight on the CPU
    log "stockab: stock CUDA dev tree"
    t0=$(date +%s)
    python3 scripts/build_backend.py --cuda --cuda-arch 90-real --stock --portable --dev-tree /tmp/llstock \
        --sdist .device/llama_cpp_python-0.3.36-trimmed.tar.gz > "$OUT/build_stock.log" 2>&1 \
        || { tail -20 "$OUT/build_stock.log"; failed "stock build"; }
    log "stock tree built in $(( $(date +%s) - t0 )) s"
    for round in $(seq "${ROUNDS:-2}"); do
        for tree in stock patched; do
            src=/tmp/lldev/src; [ "$tree" = stock ] && src=/tmp/llstock/src
            PYTHONPATH=$src:/tmp/site:$PWD ROUNDS= run_bench "$BIG" --routing optimistic --expert-share 1.0 --configs all-gpu \
                --pp 256 --tg ${TG:-64} --reps ${REPS:-2} --threads 16 --no-calibrate \
                --json-detail "$OUT/stockab_${tree}_$round.json" 2>&1 | sed "s/^/$tree, round $round: /" \
                | grep -E ": +all-gpu" | cut -c1-140 || failed "stockab $tree $round"
        done
    done
fi

if has allhot; then
    # issue 20's "every expert in the pack within 5 % of all on the GPU": at a budget that holds
    # every expert, all on the GPU against the same experts as hot packs (per-expert-unpromoted:
    # each layer split, nothing cold), ROUTINGS= (default optimistic). ALLHOT_MODES= runs it once
    # per environment, e.g. "default GGML_CUDA_DISABLE_FUSION=1": is the split's 9.3 us per layer
    # (ninth lease) lost CUDA fusion? ALLHOT_CONFIGS= sets the rows. per-expert-idle-worker keeps
    # each layer's rarest expert on the CPU behind the worker: nearly every hand-off idle, so
    # beside per-expert-unpromoted it prices an idle hand-off (issue 20: at most 10 us a layer);
    # per-expert-idle-worker-half does it in every second layer, which parts a per-layer cost
    # from a per-token one. With LLAMA_HYBRID_WORKER_PROFILE=1 exported, the log's profile lines
    # time the launcher thread (v19: its wake-up too; v21: each one-token step, its compute call
    # on the launcher or the caller, and the caller's time between steps).
    for R in ${ROUTINGS:-optimistic}; do
        for MODE in ${ALLHOT_MODES:-default}; do
            ENVS=(); [ "$MODE" = default ] || IFS=+ read -r -a ENVS <<< "$MODE"
            TAG=$(mode_tag "$MODE")
            log "all experts on the GPU: all-gpu against hot packs, $R routing, $MODE"
            env "${ENVS[@]}" python3 -m hybrid_gguf.cli bench "$BIG" --ctx 2048 --no-probe-gpu --routing "$R" \
                --expert-share 1.0 --pp 256 --tg ${TG:-64} --reps ${REPS:-3} --threads 16 --no-calibrate ${ROUNDS:+--rounds $ROUNDS} \
                --configs ${ALLHOT_CONFIGS:-all-gpu,per-expert-unpromoted,per-expert-idle-worker} \
                --json-detail "$OUT/allhot_${R}_$TAG.json" > "$OUT/allhot_${R}_$TAG.log" 2>&1 \
                || failed "allhot $R $MODE"
            grep -vE "^ *$" "$OUT/allhot_${R}_$TAG.log" | grep -v "hybrid-worker profile" | tail -8
            grep "hybrid-worker profile" "$OUT/allhot_${R}_$TAG.log" | grep -oE "launcher: .*|one-token steps: .*" | head -4
        done
    done
fi

if has traceab; then
    # is a replayed trace's cost the replay or the routing? all-gpu decode (no hand-offs) on the
    # model's own router (optimistic), on traces of one fixed top-8 per layer (fixed: the replay
    # alone) and of uniformly random experts (spread alone), and on the presets. Sixteenth lease:
    # v17 fixed 190, random 190, own router 207 (the replay's cost); v18 fixed 213, realistic 215,
    # own router 214. TRACEAB_ROUTINGS= TG= REPS=
    mkdir -p /tmp/traces
    python3 - <<'PY'
import numpy as np
from hybrid_gguf.routing.replay import Trace, save_trace
rows, layers, experts, used = 2048, 48, 128, 8  # the timed rows: 256 + 64 into the second half
fixed = np.broadcast_to(np.arange(used, dtype=np.int32), (rows, layers, used)).copy()
save_trace("/tmp/traces/fixed.npz", Trace(fixed, experts))
rng = np.random.default_rng(0)
spread = np.argsort(rng.random((rows, layers, experts)), axis=2)[:, :, :used].astype(np.int32)
save_trace("/tmp/traces/random.npz", Trace(spread, experts))
PY
    for R in ${TRACEAB_ROUTINGS:-optimistic trace:/tmp/traces/fixed.npz trace:/tmp/traces/random.npz flat realistic}; do
        N=$(basename "${R#trace:}" .npz)
        log "all-gpu decode, $R routing"
        run_bench "$BIG" --routing "$R" --expert-share 1.0 --pp 256 --tg ${TG:-64} --reps ${REPS:-3} --threads 16 \
            --no-calibrate --configs all-gpu --json-detail "$OUT/traceab_$N.json" 2>&1 | grep -E "^ *all-gpu " | cut -c1-160 \
            || failed "traceab $R"
    done
fi

if has ncuidle; then
    # issue 20's breakdown of a split layer, kernel by kernel: ncu's duration of every kernel in
    # NCU_STEPS (2) untimed decode steps (bench brackets them with cuProfilerStart/Stop), for
    # all-gpu, every expert in a pack, and the idle worker (each layer's rarest expert cold);
    # scripts/ncu_layers.py sums them per kernel name. One metric, so no kernel replays (the
    # hand-off kernels write host memory). ROUTINGS= (default optimistic)
    NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
    for R in ${ROUTINGS:-optimistic}; do
        for C in ${NCU_CONFIGS:-all-gpu per-expert-unpromoted per-expert-idle-worker}; do
            log "ncu: $C, $R routing, ${NCU_STEPS:-2} decode steps"
            HYBRID_GGUF_CUDA_PROFILE_STEPS=${NCU_STEPS:-2} timeout 240 "$NCU" --profile-from-start off \
                --graph-profiling node --metrics gpu__time_duration.sum --csv --page raw \
                --log-file "$OUT/ncu_${R}_$C.csv" \
                python3 -m hybrid_gguf.cli bench "$BIG" --ctx 2048 --no-probe-gpu --routing "$R" \
                --expert-share 1.0 --pp 32 --tg 8 --reps 1 --threads 16 --no-calibrate --configs "$C" \
                > "$OUT/ncu_${R}_$C.out" 2>&1 || { tail -5 "$OUT/ncu_${R}_$C.out"; failed "ncu $C"; }
            python3 scripts/ncu_layers.py "$OUT/ncu_${R}_$C.csv" ${NCU_STEPS:-2} 48 | tee "$OUT/ncu_${R}_$C.txt"
        done
    done
fi

if has bothab; then
    # patch v10, cold=both: the planner's plan with the CPU worker, against the same plan where each
    # split layer's GPU also reads a share of its cold experts in place (per-expert-both: the share
    # the stored calibration's two rates balance; -S: S of the cold selections), beside whole
    # layers and all on the GPU (that row fits this host's GPU rate; without it the rooflines
    # take the default, 1.08x (realistic) to 1.22x (optimistic) too fast in the nineteenth lease).
    # ROUTINGS= SHARES= TG= REPS= BOTH_CONFIGS=
    for R in ${ROUTINGS:-realistic optimistic}; do
        for S in ${SHARES:-0.25}; do
            log "both readers: $R routing, $S of the expert bytes"
            run_bench "$BIG" --routing "$R" --expert-share "$S" --pp 256 --tg ${TG:-64} --reps ${REPS:-3} --threads 16 \
                --no-calibrate --configs ${BOTH_CONFIGS:-whole-layer,per-expert-worker,per-expert-both,per-expert-both-0.2,per-expert-both-0.4,all-gpu} \
                --json-detail "$OUT/bothab_${R}_$S.json" 2>&1 | grep -E "^ *(whole|per|all)-|CPU worker|default GPU rate" | cut -c1-200 \
                || failed "bothab $R $S"
        done
    done
fi

if has workerab; then
    # patch v6: the planner's plan with its cold experts on the CPU, hand-offs through the
    # scheduler (per-expert-scheduler) against the CPU worker (per-expert-worker), beside the
    # planner's own choice (per-expert: from patch v8 it may be either, or the GPU reading
    # the cold experts), answered by the decoding thread (default) and, in a second process,
    # by the worker thread alone (LLAMA_HYBRID_WORKER_INLINE=0; WA_MODES= picks, e.g. "default").
    # The bench logs the worker's counters per row. WA_CONFIGS= sets the rows (keep all-gpu in
    # it: that row fits this host's GPU rate, which the rooflines need; without it they take the
    # default, 1.2x too fast on the thirteenth lease's host); TG= REPS= the decode length and
    # reps (32 and 2: two rows of one plan differed by 10 % in the ninth lease).
    for R in ${ROUTINGS:-realistic optimistic}; do
        for S in ${SHARES:-0.25}; do
            for MODE in ${WA_MODES:-default 0}; do
                # a mode is LLAMA_HYBRID_WORKER_INLINE's value, or VAR=value[+VAR=value...]
                ENVS=("LLAMA_HYBRID_WORKER_INLINE=$MODE")
                case "$MODE" in *=*) IFS=+ read -r -a ENVS <<< "$MODE" ;; esac
                TAG=$(mode_tag "$MODE")
                log "worker A/B: $R routing, $S of the expert bytes, ${ENVS[*]}"
                ( export "${ENVS[@]}"; run_bench "$BIG" --routing "$R" --expert-share "$S" --pp 256 --tg ${TG:-32} \
                    --reps ${REPS:-2} --threads 16 --no-calibrate \
                    --configs ${WA_CONFIGS:-whole-layer,per-expert,per-expert-scheduler,per-expert-worker,all-gpu} \
                    --json-detail "$OUT/workerab_${TAG}_${R}_$S.json" > "$OUT/workerab_${TAG}_${R}_$S.log" 2>&1 ) \
                    || failed "workerab $MODE $R $S"
                grep -E "^ *(whole|per|all)-|CPU worker|default GPU rate" "$OUT/workerab_${TAG}_${R}_$S.log" | cut -c1-200
                grep "hybrid-worker profile" "$OUT/workerab_${TAG}_${R}_$S.log" | grep -oE "launcher: .*|one-token steps: .*" | head -4
            done
        done
    done
fi
if has ompprobe; then
    # libgomp's spin throttle: an empty parallel region's cost with one team, then with a
    # second live team (what a worker takeover makes); 16 threads, 100 and 300 us apart
    g++ -O2 -fopenmp scripts/omp_team_probe.cpp -o /tmp/omp_team_probe || failed "ompprobe build"
    for gap in 100 300; do /tmp/omp_team_probe 16 $gap || failed "ompprobe $gap"; done
fi
if has pollprobe; then
    # the CPU's read of one busy hand-off's bytes with and without a GPU kernel polling pinned
    # host memory as the collect kernel does (scripts/pcie_poll_probe.cu; no build needed, ~10 s)
    "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" -O3 -arch=sm_90 -Xcompiler -fopenmp,-march=native scripts/pcie_poll_probe.cu -lgomp -o /tmp/pcie_poll_probe \
        || failed "pollprobe build"
    { /tmp/pcie_poll_probe 15 11.4 80 && /tmp/pcie_poll_probe 15 3.1 230; } | tee "$OUT/pcie_poll_probe.txt" || failed "pollprobe"
fi
if has cpumoe; then
    # the CPU's rate on a busy hand-off's work alone (scripts/cpu_moe_probe.c): K experts of
    # one token from DRAM, one graph per layer, beside a dense matrix of the same bytes; with and
    # without a busy gap before each graph (the GPU's part of a layer), plain and repacked Q4_K;
    # the "product" row is the worker's cold graph (8 slots, -1 in the unselected ones, the
    # weighted sum as v22's OUT_PROD; "prodv21": as CONT + MUL_MAT, v9-v21): beside a workerab row
    # on the same machine it tells whether the product's busy hand-off costs more than its graph
    # (nineteenth lease: 202 us for 10.1 MB in the product, v21)
    G=/tmp/lldev/src/vendor/llama.cpp/ggml/include; L=/tmp/lldev/src/llama_cpp/lib
    cc -O2 -fopenmp scripts/cpu_moe_probe.c -I$G -L$L -lggml -lggml-base -lggml-cpu -lm -Wl,-rpath,$L \
        -o /tmp/cpu_moe_probe || failed "cpumoe build"
    IFS=';' read -ra CPUMOE < <(echo "${CPUMOE_RUNS:-15 4 0;15 4 150;15 4 150 repack;15 1 150;15 1 150 repack;15 8 150;15 8 150 repack;8 4 150;16 4 150}")
    for args in "${CPUMOE[@]}"; do
        /tmp/cpu_moe_probe $args 2>/dev/null || failed "cpumoe $args"
    done > "$OUT/cpu_moe_probe.txt"
    # the chain's weighted sum alone, v22's OUT_PROD against v21's CONT + MUL_MAT (scripts/weighted_sum_probe.c)
    cc -O2 scripts/weighted_sum_probe.c -I$G -L$L -lggml -lggml-base -lggml-cpu -lm -Wl,-rpath,$L -o /tmp/weighted_sum_probe \
        && /tmp/weighted_sum_probe 15 >> "$OUT/cpu_moe_probe.txt" 2>&1 || failed "weighted sum probe"
    cat "$OUT/cpu_moe_probe.txt"
fi
if has schedops; then
    # the scheduler's hand-off, per op: the per-expert plan's CPU splits computed node by node
    # (LLAMA_HYBRID_SCHED_OPS, patch v7) over each rep's decode steps, to set beside the worker's
    # LLAMA_HYBRID_WORKER_PROFILE line; realistic routing, 25 %
    for R in ${ROUTINGS:-realistic}; do
        log "scheduler per-op timers: per-expert, $R routing, 0.25 of the expert bytes"
        LLAMA_HYBRID_SCHED_TIMERS=100000 LLAMA_HYBRID_SCHED_OPS=1 python3 -m hybrid_gguf.cli bench "$BIG" \
            --routing "$R" --expert-share 0.25 --pp 256 --tg 32 --reps 2 --threads 16 --no-calibrate \
            --configs per-expert --ctx 2048 --no-probe-gpu 2>&1 | grep -E "^ *per-|hybrid-sched" | cut -c1-900 \
            || failed "schedops $R"
    done
fi
if has workerdiag; then
    # patch v7: where the worker's time goes (counters of each thread's compute and of the
    # decoding thread's arrival, the backend's graph messages), one process per setting:
    # WD_MODES names them, each a space-free list of VAR=VALUE joined by "+" ("default": none).
    # The default modes (patch v8): the defaults; the per-op profile, whose line also says how
    # long the launcher thread's compute calls last; the same with the answering team on all
    # 16 CPUs (the oversubscribed case: does the launcher's call last while the team works?);
    # the launcher off
    for R in ${ROUTINGS:-realistic}; do
        i=0
        for MODE in ${WD_MODES:-default LLAMA_HYBRID_WORKER_PROFILE=1 LLAMA_HYBRID_WORKER_PROFILE=1+LLAMA_HYBRID_WORKER_THREADS=16 LLAMA_HYBRID_WORKER_LAUNCHER=0}; do
            i=$((i + 1))
            log "worker diagnosis $i: $R routing, 0.25 of the expert bytes, $MODE"
            ENVS=(); [ "$MODE" = default ] || IFS=+ read -r -a ENVS <<< "$MODE"
            log "cgroup before: $(cpu_throttled)"
            env "${ENVS[@]}" python3 -m hybrid_gguf.cli bench "$BIG" --routing "$R" --expert-share 0.25 --pp 256 --tg ${TG:-32} \
                --reps ${REPS:-2} --threads 16 --no-calibrate --configs ${WD_CONFIGS:-per-expert-worker} --ctx 2048 --no-probe-gpu \
                --json-detail "$OUT/workerdiag_${R}_$i.json" 2>&1 \
                | grep -E "^ *(whole|per)-|CPU worker|decoding thread|graph messages|hybrid-worker (profile|times)" | cut -c1-1600 \
                || failed "workerdiag $R $MODE"
            log "cgroup after: $(cpu_throttled)"
        done
    done
fi
if has multisplit; then
    NGPU=$(nvidia-smi -L | wc -l)
    [ "$NGPU" -ge 2 ] || log "multisplit: only $NGPU GPU visible; the layers will not be split over cards"
    # cold "worker": the CPU worker answers every card's split layers (patch v6; its slots are
    # the first card's pinned memory, which unified addressing lets every card reach)
    for cold in cpu gpu worker; do
        log "split equivalence over $NGPU cards, packs on each layer's card, cold experts: $cold"
        WORKER_ENV=(); [ $cold = worker ] && WORKER_ENV=(LLAMA_HYBRID_WORKER=1)
        if env "${WORKER_ENV[@]}" HYBRID_GGUF_TEST_PACK_DEVICE=auto HYBRID_GGUF_TEST_COLD=${cold/worker/cpu} \
            HYBRID_GGUF_REQUIRE_PATCHED=1 python3 -c "import llama_cpp, sys, pytest; sys.exit(pytest.main(['-q', '-rA', '-s', '-p', 'no:cacheprovider', 'tests/test_hybrid_split.py', 'tests/test_routing_process.py', 'tests/test_multigpu.py']))" \
            > "$OUT/split_multigpu_cold$cold.txt" 2>&1; then
            log "two-card split equivalence PASSED (cold $cold)"; grep -E "passed|failed" "$OUT/split_multigpu_cold$cold.txt" | tail -2
        else
            grep -E "^FAILED|passed|failed|Error" "$OUT/split_multigpu_cold$cold.txt" | tail -12; failed "multisplit $cold"
        fi
    done
fi

if has multigpu; then
    # B on one card, 2 x B on one card, 2 x B over two cards (B each): same profile, context and
    # prompt; the one-card plans and runs see GPU 0 only
    B=${MG_BUDGET:-4GiB}
    B2=$(python3 -c "from hybrid_gguf.sizes import parse_size as p; import sys; print(f'{2 * p(sys.argv[1]) // 2**20}MiB')" "$B")
    python3 -c "from hybrid_gguf.bench.runner import package_text, PROFILE_PACKAGES as P, EVAL_PACKAGES as E
open('/tmp/prof.txt', 'w').write(package_text(P, 8000)); open('/tmp/eval.txt', 'w').write(package_text(E, 3000))"
    rm -rf /tmp/mgstore /tmp/mg_*
    log "multigpu: profile on GPU 0"
    CUDA_VISIBLE_DEVICES=0 python3 -m hybrid_gguf.cli profile "$BIG" --text /tmp/prof.txt --chunk-chars 200 -n 128 \
        --temp 1.0 --store /tmp/mgstore --json > "$OUT/mg_profile.json" || failed "multigpu profile"
    plan_for() {  # NAME VISIBLE BUDGET
        CUDA_VISIBLE_DEVICES=$2 python3 -m hybrid_gguf.cli plan "$BIG" --gpu-budget "$3" --ctx 4096 --store /tmp/mgstore \
            --out "/tmp/mg_$1.yaml" --json > "/tmp/mg_plan_$1.json" || failed "multigpu plan $1"
        python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[2], 'predicted', round(d['predicted_decode_tokens_per_s'], 1), 'tok/s, hit', d['predicted_hit_rate'], [(x['name'], x['budget_bytes'] >> 20, x['bytes'] >> 20, x['hot_experts'], len(x['layers'])) for x in d['per_device']])" "/tmp/mg_plan_$1.json" "$1"
    }
    plan_for two 0,1 "$B,$B"
    plan_for one2b 0 "$B2"
    plan_for one1b 0 "$B"
    for rep in $(seq ${MG_REPS:-2}); do
        for cfg in two:0,1 one2b:0 one1b:0; do
            name=${cfg%%:*}; vis=${cfg#*:}
            nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 > "/tmp/mg_smi_${name}_$rep.csv" &
            SMI=$!
            CUDA_VISIBLE_DEVICES=$vis python3 -m hybrid_gguf.cli run "$BIG" --plan "/tmp/mg_$name.yaml" --ctx 4096 -n 128 \
                --temp 1.0 --seed 1 -t 16 --json -p "$(head -c 1500 /tmp/eval.txt)" > "/tmp/mg_run_${name}_$rep.json" \
                || failed "multigpu run $name"
            kill $SMI
            log "$name rep $rep: $(python3 -c "import json, sys; print(round(json.load(open(sys.argv[1]))['gen_tokens_per_s'], 1), 'tok/s')" "/tmp/mg_run_${name}_$rep.json")"
            python3 scripts/check_plan_run.py "/tmp/mg_plan_$name.json" "/tmp/mg_run_${name}_$rep.json" || failed "multigpu VRAM $name"
        done
    done
    log "a two-card plan where one card is visible: refused in one line"
    if CUDA_VISIBLE_DEVICES=0 python3 -m hybrid_gguf.cli run "$BIG" --plan /tmp/mg_two.yaml -n 4 -p hi > /tmp/mg_refused.txt 2>&1; then
        failed "multigpu refusal"
    else
        tail -1 /tmp/mg_refused.txt; grep -q "the plan is for other GPUs" /tmp/mg_refused.txt || failed "multigpu refusal message"
    fi
    python3 scripts/multigpu_summary.py /tmp "$B" > "$OUT/multigpu_summary.md" || failed "multigpu summary"
    cat "$OUT/multigpu_summary.md"
    cp /tmp/mg_two.yaml "$OUT/mg_plan_two.yaml"
fi
if has cachesplit; then
    # the in-session cache's equivalence tests with the packs in VRAM (slots change between
    # ubatches; the id sinks in zero-copy memory), cold experts on the CPU and read by the GPU
    # (uploads queued ahead of the next ubatch, and in the background with cold=cpu)
    for RUN in cpu:ordered gpu:ordered cpu:background; do
        COLD=${RUN%%:*} UPLOADS=${RUN##*:}
        log "cache split equivalence on CUDA, cold=$COLD, $UPLOADS uploads"
        HYBRID_GGUF_TEST_COLD=$COLD HYBRID_GGUF_TEST_CACHE_UPLOADS=$UPLOADS HYBRID_GGUF_TEST_PACK_DEVICE=CUDA0 HYBRID_GGUF_REQUIRE_PATCHED=1 \
            python3 -c "import llama_cpp, sys, pytest; sys.exit(pytest.main(['-q', '-rA', '-p', 'no:cacheprovider', '-k', 'cache', 'tests/test_hybrid_split.py']))" \
            > "$OUT/split_cuda_cache_${COLD}_$UPLOADS.txt" 2>&1 && grep -E "passed|failed" "$OUT/split_cuda_cache_${COLD}_$UPLOADS.txt" | tail -1 \
            || { grep -E "^FAILED|passed|failed" "$OUT/split_cuda_cache_${COLD}_$UPLOADS.txt" | tail -8; failed "cachesplit $RUN"; }
    done
fi

if has prefill; then
    # the prompt's micro-batch: prompts of PROMPTS tokens timed at ubatch 512 (what `run` uses
    # by default) and at the whole prompt (at most 4096), per-expert and whole-layer plans made
    # for that ubatch, at SHARES; issue 20's prefill target is >= 1.3x at 2048+ tokens
    # (one total VRAM per prompt for both ubatches: the share's budget at ubatch 512, so the
    # larger ubatch pays its bigger compute buffer out of the same memory)
    for S in ${SHARES:-0.25}; do
        for P in ${PROMPTS:-512 2048 8192}; do
            FA=$([ -n "${FLASH:-}" ] && echo True || echo False)
            B=$(python3 -c "from hybrid_gguf.bench.plans import share_budgets; print(share_budgets('$BIG', [$S], max(2048, $P + 80), $P, 512, $FA)[0])")
            for U in ${UBATCHES:-512 $(( P < 4096 ? P : 4096 ))}; do
                [ "$U" -gt "$P" ] && continue
                log "prefill: $P-token prompt in ubatches of $U, $B bytes of VRAM ($S of the expert bytes at ubatch 512; ${ROUTINGS:-realistic}${FLASH:+; flash attention})"
                run_bench "$BIG" --routing ${ROUTINGS:-realistic} --gpu-budget "$B" --pp "$P" --tg 16 --reps 2 \
                    --threads 16 --no-calibrate --ubatch "$U" --profile-tokens 2048 --configs whole-layer,per-expert \
                    ${FLASH:+--flash-attn} --json-detail "$OUT/prefill_${S}_p${P}_u$U${FLASH:+_fa}.json" 2>&1 \
                    | grep -E "^ *(whole|per)-" || failed "prefill $S $P $U"
                [ "$P" = 512 ] && [ -z "${UBATCHES:-}" ] && break  # one ubatch for the 512-token prompt
            done
        done
    done
fi

if has realtrace; then
    # the cache on real routing: a gpt-oss-20b-shaped Q4_K model driven by the real gpt-oss-20b
    # decode trace (tests/data/routing; first half profiles, second half is timed)
    OSS=/tmp/models/gpt-oss-20b-shaped-q4k.gguf
    [ -f "$OSS" ] || python3 scripts/make_bench_model.py --preset gpt-oss-20b-shaped --weight-type Q4_K --workers 16 \
        --out "$OSS" 2>&1 | tail -1
    for S in ${SHARES:-0.25}; do
        log "in-session cache on the real gpt-oss-20b trace, $S of the expert bytes"
        # the decode window is trace rows PP..PP+TG of the second half (the trace is indexed by
        # position): PP=32 TG=1024 crosses most of its answers, the default one boundary
        run_bench "$OSS" --routing trace:tests/data/routing/gpt-oss-20b_mixed10.npz --expert-share "$S" --pp ${PP:-256} \
            --tg ${TG:-128} --reps ${REPS:-2} --threads 16 --no-calibrate \
            --configs ${REALTRACE_BASE-whole-layer,per-expert},${CACHE_CONFIGS:-per-expert-cache-lru-q4,per-expert-cache-lru-q16,per-expert-cache-lfu-q16,per-expert-cache-seeded-q16} \
            --json-detail "$OUT/realtrace_$S.json" 2>&1 | grep -E "^ *(whole|per)-|_vs_" || failed "realtrace $S"
        if [ -n "${TIMERS:-}" ]; then
            # where a split layer's time goes with and without the cache: does the CPU's part
            # shrink with its cold experts? (fourth lease: 10 more hits per token saved 0.35 ms)
            log "scheduler timers per decode window, real trace"
            LLAMA_HYBRID_SCHED_TIMERS=1000000 run_bench "$OSS" --routing trace:tests/data/routing/gpt-oss-20b_mixed10.npz \
                --expert-share "$S" --pp 256 --tg 64 --reps 1 --threads 16 --no-calibrate \
                --configs whole-layer,per-expert,${CACHE_CONFIGS:-per-expert-cache-lfu-q16} 2>&1 \
                | grep -E "hybrid-sched|^ *(whole|per)-" | tee "$OUT/sched_timers_realtrace_$S.txt"
        fi
    done
fi

if has cacheab; then
    # the planner's per-expert plan static and as an in-session cache, beside whole layers, at
    # the same budget (ROUTINGS=, SHARES=); the cache rows report its hit rate and uploads
    for R in ${ROUTINGS:-realistic optimistic}; do
        for S in ${SHARES:-0.25}; do
            log "in-session cache: $R routing, $S of the expert bytes"
            run_bench "$BIG" --routing "$R" --expert-share "$S" --pp 256 --tg ${TG:-64} --reps 2 --threads 16 --no-calibrate \
                --configs whole-layer,per-expert,${CACHE_CONFIGS:-per-expert-cache-lru,per-expert-cache-lfu,per-expert-cache-seeded} \
                --json-detail "$OUT/cacheab_${R}_$S.json" 2>&1 | grep -E "^ *(whole|per)-|_vs_" || failed "cacheab $R $S"
        done
    done
fi
if has upstream; then
    # the anchor of issue 16: upstream llama.cpp b11549's own GPU expert cache (--moe-cache-mib:
    # one LRU over each device's layers, every decode miss uploaded) and its --n-cpu-moe, on $BIG
    # at the expert-byte shares of coldab/cacheab (SHARES=). llama-bench has no --moe-cache-mib
    # in b11549; llama-batched-bench takes every common flag and prints its timings as JSON lines.
    # Upstream runs the model's own router: on this synthetic model that is our "optimistic"
    # preset (the --routing presets replay through our patch only), so compare with the
    # optimistic rows. Built once per warm machine into /tmp/upstream-build (a build cut short
    # goes on in the next call); .upstream/ comes from scripts/prepare_upstream.sh.
    UPB=/tmp/upstream-build
    UPSRC=/tmp/upstream-src/llama.cpp-b11549
    if [ ! -f "$UPSRC/CMakeLists.txt" ]; then
        mkdir -p /tmp/upstream-src && tar xzf .upstream/llama.cpp-b11549-trimmed.tar.gz -C /tmp/upstream-src
    fi
    log "upstream: llama-batched-bench of llama.cpp b11549 for CUDA sm_90"
    t0=$(date +%s)
    # CPU flags as our CUDA build (GGML_NATIVE=ON since the twelfth lease); no downloads, no server
    { [ -f $UPB/CMakeCache.txt ] || cmake -S "$UPSRC" -B $UPB -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
          -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
          -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON; } \
        > "$OUT/upstream_build.log" 2>&1 && cmake --build $UPB --target llama-batched-bench -j "$(nproc)" >> "$OUT/upstream_build.log" 2>&1
    if [ -x $UPB/bin/llama-batched-bench ]; then
        log "upstream built (or up to date) in $(( $(date +%s) - t0 )) s"
        read -r EXPERT_BYTES N_LAYER < <(python3 -c "from hybrid_gguf.header.inventory import read_inventory
import sys; i = read_inventory(sys.argv[1]); print(i.expert_bytes_total, i.n_layer)" "$BIG")
        # the first timed window starts with an empty cache (the 16-token warm-up and the 256-token
        # prefills are large batches, which only read it); the later windows see it warm
        WINDOWS=$(python3 -c "print(','.join(['${TG:-64}'] * ${UP_WINDOWS:-3}))")
        rm -f /tmp/up_runs.tsv
        up_run() {  # NAME KIND SHARE MIB NCMOE, then llama-batched-bench flags
            local name=$1 kind=$2 share=$3 mib=$4 ncmoe=$5; shift 5
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 > "/tmp/up_$name.csv" &
            local smi=$!
            # context, batch and threads as run_bench loads its timed runs (ctx 2048, n_batch =
            # n_ubatch = 512 for a 256-token prompt, 16 threads); fit off: the flags are the placement
            $UPB/bin/llama-batched-bench -m "$BIG" -c 2048 -b 512 -ub 512 -npp 256 -ntg "$WINDOWS" -npl 1 \
                -t 16 -ngl 99 -fit off --output-format jsonl "$@" ${UPSTREAM_ARGS:-} \
                > "/tmp/up_$name.out" 2> "/tmp/up_$name.err" || { tail -5 "/tmp/up_$name.err"; failed "upstream $name"; }
            kill $smi
            printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$share" "$mib" "$ncmoe" "/tmp/up_$name" >> /tmp/up_runs.tsv
            grep -h "MoE cache size\|hit rate\|MoE cache is disabled\|not cached" "/tmp/up_$name.err"
            python3 scripts/upstream_summary.py "$OUT/upstream_summary.json" /tmp/up_runs.tsv > "$OUT/upstream_summary.md"
        }
        # every expert in host memory, no cache: the floor
        up_run cpu-moe cpu-moe 0 - - --cpu-moe
        for S in ${SHARES:-0.10 0.25 0.50}; do
            MIB=$(python3 -c "import sys; print(int(float(sys.argv[1]) * int(sys.argv[2]) / 2**20))" "$S" "$EXPERT_BYTES")
            NCMOE=$(python3 -c "import sys; print(round(int(sys.argv[2]) * (1 - float(sys.argv[1]))))" "$S" "$N_LAYER")
            log "upstream at $S of the expert bytes: --moe-cache-mib $MIB; --n-cpu-moe $NCMOE"
            # the cache takes the layers whose experts all lie in host buffers: with a GPU, upstream
            # puts CPU weights in its pinned host buffer before any repacked one (unless --no-host)
            up_run "cache_$S" moe-cache "$S" "$MIB" - --cpu-moe --moe-cache-mib "$MIB"
            up_run "ncmoe_$S" n-cpu-moe "$S" - "$NCMOE" --n-cpu-moe "$NCMOE"
        done
        cat "$OUT/upstream_summary.md"
    else
        tail -30 "$OUT/upstream_build.log"; failed "upstream build"
    fi
fi
[ -z "$FAILED" ] || { log "done, with failures:$FAILED"; exit 1; }
log "done"
