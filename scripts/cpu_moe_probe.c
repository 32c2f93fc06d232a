// How fast the CPU computes a few experts of one token, the work of a busy CPU hand-off.
// Q30B-shaped Q4_K experts (hidden 2048, expert FFN 768, 128 experts per layer), one graph
// per layer (gate, up, swiglu, down: as the split's cold graph), layers taken in turn so the
// weights come from DRAM, with an optional busy gap between graphs standing in for the GPU's
// part of a layer. Prints µs per graph and the weight bytes per second it reached, beside one
// dense matrix of the same bytes per call (a long stream; N_DENSE of them in turn, so from DRAM
// too), and beside a fused kernel doing the
// graph's work with two barriers, without and with software prefetch (PROBE_PF rows ahead, 4),
// and beside the same rows only read ("read": the access pattern's ceiling). The "product" row
// is the CPU worker's cold graph as the patch builds it for a busy hand-off: 8 slots, the K
// selected experts in random slots and -1 in the others (the GPU's hot experts), and the
// weighted sum over the slots as one OUT_PROD (patch v22); "prodv21" the same with v9-v21's
// sum, CONT of the transposed experts + MUL_MAT. "ping" times a one-node graph (the team's
// start); "product ... alternating" runs the product graph with patch v23's two one-token
// MUL_MAT_ID splits switched call by call (equal shares, claimed chunks), so both see the same
// host; LLAMA_HYBRID_MMID_CHUNK_KIB / _STATIC_PCT shape the chunks.
// PROBE_REUSE=R (0..1) adds the "ahead" row, patch v17's worker prefetch: R*K of each call's
// experts are those of the call 48 back (the same layer one token earlier in a 48-layer model,
// with ~500 MB read in between, more than a last-level cache), and the gap is spent reading
// those 48-back experts, cut when the gap ends; the "experts" row then gets the same ids.
//   cpu_moe_probe THREADS K GAP_US [cpu|repack|host|small|huge]   (K experts per token)
// Build: cc -O2 -fopenmp cpu_moe_probe.c -I.../ggml/include -L.../lib -lggml -lggml-base -lggml-cpu
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <math.h>
#include <omp.h>

#define N_EMBD 2048
#define N_FF 768
#define N_EXPERT 128
#define N_LAYER 8
// dense matrices the dense row cycles through: 96 of K experts' bytes (1-1.3 GB) keep it out
// of the last-level cache, as the experts are (8 would fit one and time the cache, not DRAM)
#define N_DENSE 96
#define N_CALLS 400
#define N_SLOTS 8  // the model's experts per token: the worker's cold graph has one slot each

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static void spin_us(double us) {
    const double end = now_us() + us;
    while (now_us() < end) {
    }
}

// random Q4_K blocks whose scales are small normal halves (no NaN, no denormals)
static void fill_q4_k(struct ggml_tensor * t) {
    const size_t n = ggml_nbytes(t);
    const size_t block = ggml_type_size(GGML_TYPE_Q4_K);
    unsigned char * buf = malloc(n);
    unsigned int s = 12345u;
    for (size_t i = 0; i < n; i++) {
        s = s * 1103515245u + 12345u;
        buf[i] = (unsigned char) (s >> 16);
    }
    for (size_t off = 0; off + 4 <= n; off += block) {
        buf[off + 0] = 0x00; buf[off + 1] = 0x20;  // d    = 2^-7 as fp16
        buf[off + 2] = 0x00; buf[off + 3] = 0x20;  // dmin = 2^-7 as fp16
    }
    ggml_backend_tensor_set(t, buf, 0, n);
    free(buf);
}

static int cmp_double(const void * a, const void * b) {
    const double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

// The same work as the graph, done the way a hand-off could do it: gate and up of every
// selected expert in one pass over (expert, row) pairs split evenly across the threads (each
// thread one contiguous stretch, swiglu applied as soon as a row's two dots exist), then down
// the same way; two barriers per call, and the next rows prefetched PF rows ahead (0: none).
struct fused_args {
    const char * gate, * up, * down;   // layer tensors' data [N_EXPERT][rows][row bytes]
    const int32_t * ids;
    int k, pf;
    char * xq;                          // x as the vec_dot type
    float * h;                          // [k][N_FF]
    char * hq;                          // h as the vec_dot type, [k]
    float * out;                        // [k][N_EMBD]
};

static void prefetch_row(const char * p, size_t n) {
    for (size_t o = 0; o < n; o += 64) {
        __builtin_prefetch(p + o, 0, 3);
    }
}

static void fused_moe(const struct fused_args * a, int n_threads) {
    const struct ggml_type_traits_cpu * tt = ggml_get_type_traits_cpu(GGML_TYPE_Q4_K);
    const struct ggml_type_traits_cpu * qt = ggml_get_type_traits_cpu(tt->vec_dot_type);
    const size_t row_up = ggml_row_size(GGML_TYPE_Q4_K, N_EMBD);   // gate/up rows
    const size_t row_dn = ggml_row_size(GGML_TYPE_Q4_K, N_FF);     // down rows
    const size_t mat_up = row_up * N_FF, mat_dn = row_dn * N_EMBD;
    const size_t hq_row = ggml_row_size(tt->vec_dot_type, N_FF);
    #pragma omp parallel num_threads(n_threads)
    {
        const int nth = omp_get_num_threads(), ith = omp_get_thread_num();
        const int64_t r1 = (int64_t) a->k * N_FF;
        const int64_t b1 = r1 * ith / nth, e1 = r1 * (ith + 1) / nth;
        for (int64_t r = b1; r < e1; r++) {
            const int e = (int) (r / N_FF), i = (int) (r % N_FF);
            const char * g = a->gate + a->ids[e] * mat_up + i * row_up;
            const char * u = a->up + a->ids[e] * mat_up + i * row_up;
            if (a->pf && r + a->pf < e1) {
                const int64_t q = r + a->pf;
                const int eq = (int) (q / N_FF), iq = (int) (q % N_FF);
                prefetch_row(a->gate + a->ids[eq] * mat_up + iq * row_up, row_up);
                prefetch_row(a->up + a->ids[eq] * mat_up + iq * row_up, row_up);
            }
            float gv, uv;
            tt->vec_dot(N_EMBD, &gv, 0, g, 0, a->xq, 0, 1);
            tt->vec_dot(N_EMBD, &uv, 0, u, 0, a->xq, 0, 1);
            a->h[r] = gv / (1.0f + expf(-gv)) * uv;
        }
        #pragma omp barrier
        for (int e = ith; e < a->k; e += nth) {
            qt->from_float(a->h + (int64_t) e * N_FF, a->hq + e * hq_row, N_FF);
        }
        #pragma omp barrier
        const int64_t r2 = (int64_t) a->k * N_EMBD;
        const int64_t b2 = r2 * ith / nth, e2 = r2 * (ith + 1) / nth;
        for (int64_t r = b2; r < e2; r++) {
            const int e = (int) (r / N_EMBD), i = (int) (r % N_EMBD);
            if (a->pf && r + a->pf < e2) {
                const int64_t q = r + a->pf;
                prefetch_row(a->down + a->ids[q / N_EMBD] * mat_dn + (q % N_EMBD) * row_dn, row_dn);
            }
            tt->vec_dot(N_FF, a->out + r, 0, a->down + a->ids[e] * mat_dn + i * row_dn, 0,
                        a->hq + e * hq_row, 0, 1);
        }
    }
}

// The ceiling of that access pattern: the same (expert, row) shares and barriers, each row
// only read (summed as 64-bit words), no arithmetic. What a busy hand-off's bytes could take
// if the dot products were free.
static uint64_t read_sink;

static uint64_t sum_row(const char * p, size_t n) {
    const uint64_t * w = (const uint64_t *) p;
    uint64_t acc = 0;
    for (size_t i = 0; i < n / 8; i++) {
        acc += w[i];
    }
    return acc;
}

static void read_moe(const struct fused_args * a, int n_threads) {
    const size_t row_up = ggml_row_size(GGML_TYPE_Q4_K, N_EMBD);
    const size_t row_dn = ggml_row_size(GGML_TYPE_Q4_K, N_FF);
    const size_t mat_up = row_up * N_FF, mat_dn = row_dn * N_EMBD;
    uint64_t total = 0;
    #pragma omp parallel num_threads(n_threads) reduction(+:total)
    {
        const int nth = omp_get_num_threads(), ith = omp_get_thread_num();
        const int64_t r1 = (int64_t) a->k * N_FF;
        for (int64_t r = r1 * ith / nth; r < r1 * (ith + 1) / nth; r++) {
            const int e = (int) (r / N_FF), i = (int) (r % N_FF);
            total += sum_row(a->gate + a->ids[e] * mat_up + i * row_up, row_up);
            total += sum_row(a->up + a->ids[e] * mat_up + i * row_up, row_up);
        }
        #pragma omp barrier
        const int64_t r2 = (int64_t) a->k * N_EMBD;
        for (int64_t r = r2 * ith / nth; r < r2 * (ith + 1) / nth; r++) {
            total += sum_row(a->down + a->ids[r / N_EMBD] * mat_dn + (r % N_EMBD) * row_dn, row_dn);
        }
    }
    read_sink += total;
}

// the worker's prefetch in the gap: all threads read the experts `ids` names (gate, up, down
// laid end to end, a contiguous slice each, one load per cache line) until `until_us`
static volatile uint8_t ahead_sink;

static void read_ahead(const char * gate, const char * up, const char * down, const int32_t * ids, int k,
                       double until_us, int n_threads) {
    const size_t mat_up = ggml_row_size(GGML_TYPE_Q4_K, N_EMBD) * N_FF;
    const size_t mat_dn = ggml_row_size(GGML_TYPE_Q4_K, N_FF) * N_EMBD;
    const size_t total = (size_t) k * (2 * mat_up + mat_dn);
    #pragma omp parallel num_threads(n_threads)
    {
        const int nth = omp_get_num_threads(), ith = omp_get_thread_num();
        const size_t b = total * ith / nth, e = total * (ith + 1) / nth;
        uint8_t acc = 0;
        for (size_t off = b; off < e; off += 4096) {
            if (now_us() >= until_us) {
                break;
            }
            for (size_t o = off; o < off + 4096 && o < e; o += 64) {
                // which expert matrix byte `o` falls in: gate of all k, then up of all k, then down
                const char * p;
                if (o < k * mat_up) {
                    p = gate + ids[o / mat_up] * mat_up + o % mat_up;
                } else if (o < 2 * k * mat_up) {
                    const size_t q = o - k * mat_up;
                    p = up + ids[q / mat_up] * mat_up + q % mat_up;
                } else {
                    const size_t q = o - 2 * k * mat_up;
                    p = down + ids[q / mat_dn] * mat_dn + q % mat_dn;
                }
                acc += *(const volatile uint8_t *) p;
            }
        }
        ahead_sink += acc;
    }
    while (now_us() < until_us) {
    }
}

// the worker's slots for one call: the K experts of `id` in random slots, -1 elsewhere, and
// weight 1 on the selected slots (0 elsewhere, as a hot slot's output is zero anyway)
static void fill_slots(int32_t * slots, float * w, const int32_t * id, int k, unsigned int * s) {
    for (int j = 0; j < N_SLOTS; j++) {
        slots[j] = -1;
        w[j] = 0.0f;
    }
    for (int j = 0; j < k; j++) {
        int at;
        do {
            *s = *s * 1103515245u + 12345u;
            at = (int) ((*s >> 8) % N_SLOTS);
        } while (slots[at] >= 0);
        slots[at] = id[j];
        w[at] = 1.0f;
    }
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s THREADS K GAP_US [cpu|repack|host|small|huge]\n", argv[0]);
        return 2;
    }
    const int n_threads = atoi(argv[1]);
    const int k = atoi(argv[2]);
    const double gap_us = atof(argv[3]);
    // weights: "cpu" (ggml's CPU buffer), "repack" (CPU_REPACK), "host" (the GPU's pinned host
    // buffer type, where llama.cpp keeps CPU weights when a GPU is present), "small" (the CPU
    // buffer with transparent huge pages refused: 4 KiB pages), "huge" (the CPU buffer with
    // transparent huge pages asked for: 2 MiB pages where the kernel allows madvise)
    const char * mode = argc > 4 ? argv[4] : "cpu";
    const int repack = strcmp(mode, "repack") == 0;
    if (n_threads < 1 || k < 1 || k > 8) {
        fprintf(stderr, "THREADS >= 1, 1 <= K <= 8\n");
        return 2;
    }

    ggml_backend_t backend = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(backend, n_threads);
    ggml_backend_buffer_type_t weight_buft = ggml_backend_cpu_buffer_type();
    if (strcmp(mode, "host") == 0) {
        ggml_backend_dev_t gpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU);
        weight_buft = gpu ? ggml_backend_dev_host_buffer_type(gpu) : NULL;
        if (!weight_buft) {
            fprintf(stderr, "no GPU host buffer type in this build\n");
            return 1;
        }
    }
    if (repack) {
        ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
        ggml_backend_dev_get_extra_bufts_t get_extra =
            (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
        weight_buft = NULL;
        for (ggml_backend_buffer_type_t * b = get_extra ? get_extra(dev) : NULL; b && *b; b++) {
            if (strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) {
                weight_buft = *b;
            }
        }
        if (!weight_buft) {
            fprintf(stderr, "no CPU_REPACK buffer type in this build\n");
            return 1;
        }
    }

    // weights: per layer gate, up [N_EMBD, N_FF, N_EXPERT], down [N_FF, N_EMBD, N_EXPERT];
    // N_DENSE dense [N_EMBD, rows] matrices, each holding the bytes of K experts
    struct ggml_init_params wp = { ggml_tensor_overhead() * (3 * N_LAYER + N_DENSE + 4), NULL, true };
    struct ggml_context * wctx = ggml_init(wp);
    struct ggml_tensor * gate[N_LAYER], * up[N_LAYER], * down[N_LAYER], * dense[N_DENSE];
    const int dense_rows = 3 * k * N_FF;  // k experts of gate + up + down, as rows of N_EMBD
    for (int l = 0; l < N_LAYER; l++) {
        gate[l] = ggml_new_tensor_3d(wctx, GGML_TYPE_Q4_K, N_EMBD, N_FF, N_EXPERT);
        up[l] = ggml_new_tensor_3d(wctx, GGML_TYPE_Q4_K, N_EMBD, N_FF, N_EXPERT);
        down[l] = ggml_new_tensor_3d(wctx, GGML_TYPE_Q4_K, N_FF, N_EMBD, N_EXPERT);
    }
    for (int d = 0; d < N_DENSE; d++) {
        dense[d] = ggml_new_tensor_2d(wctx, GGML_TYPE_Q4_K, N_EMBD, dense_rows);
    }
    ggml_backend_buffer_t wbuf = ggml_backend_alloc_ctx_tensors_from_buft(wctx, weight_buft);
    if (!wbuf) {
        fprintf(stderr, "could not allocate the weights\n");
        return 1;
    }
    if (strcmp(mode, "small") == 0 || strcmp(mode, "huge") == 0) {
        const size_t page = 4096;
        uintptr_t base = (uintptr_t) ggml_backend_buffer_get_base(wbuf);
        uintptr_t lo = (base + page - 1) & ~(page - 1);
        madvise((void *) lo, ggml_backend_buffer_get_size(wbuf) - (lo - base) - page,
                strcmp(mode, "huge") == 0 ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    }
    for (int l = 0; l < N_LAYER; l++) {
        fill_q4_k(gate[l]); fill_q4_k(up[l]); fill_q4_k(down[l]);
    }
    for (int d = 0; d < N_DENSE; d++) {
        fill_q4_k(dense[d]);
    }
    // whether the kernel granted what "huge" asked for: the weights' 2 MiB pages, once filled
    {
        FILE * f = fopen("/proc/self/smaps_rollup", "r");
        char line[256];
        while (f && fgets(line, sizeof line, f)) {
            if (strncmp(line, "Rss:", 4) == 0 || strncmp(line, "AnonHugePages:", 14) == 0) {
                printf("weights=%s %s", mode, line);
            }
        }
        if (f) {
            fclose(f);
        }
    }

    // one graph per layer (experts) and per dense matrix: inputs x [N_EMBD, 1], ids [K, 1]
    struct ggml_init_params gp = { ggml_tensor_overhead() * (64 * N_LAYER + 4 * N_DENSE)
                                   + (3 * N_LAYER + N_DENSE + 1) * ggml_graph_overhead(), NULL, true };
    struct ggml_context * gctx = ggml_init(gp);
    struct ggml_cgraph * moe[N_LAYER], * lin[N_DENSE], * prod[N_LAYER], * prod21[N_LAYER];
    struct ggml_tensor * ids[N_LAYER], * xs[N_LAYER + 1], * outs[N_LAYER];
    struct ggml_tensor * ids8[N_LAYER], * wts8[N_LAYER], * prod_outs[N_LAYER], * prod21_outs[N_LAYER];
    for (int l = 0; l < N_LAYER; l++) {
        struct ggml_tensor * x = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, N_EMBD, 1, 1);
        ids[l] = ggml_new_tensor_2d(gctx, GGML_TYPE_I32, k, 1);
        struct ggml_tensor * g = ggml_mul_mat_id(gctx, gate[l], x, ids[l]);
        struct ggml_tensor * u = ggml_mul_mat_id(gctx, up[l], x, ids[l]);
        struct ggml_tensor * h = ggml_swiglu_split(gctx, g, u);
        struct ggml_tensor * d = ggml_mul_mat_id(gctx, down[l], h, ids[l]);
        moe[l] = ggml_new_graph(gctx);
        ggml_build_forward_expand(moe[l], d);
        outs[l] = d;
        xs[l] = x;
        // the worker's cold graph: N_SLOTS slots, unselected ones -1, weights [1, N_SLOTS, 1]
        ids8[l] = ggml_new_tensor_2d(gctx, GGML_TYPE_I32, N_SLOTS, 1);
        wts8[l] = ggml_new_tensor_3d(gctx, GGML_TYPE_F32, 1, N_SLOTS, 1);
        struct ggml_tensor * g8 = ggml_mul_mat_id(gctx, gate[l], x, ids8[l]);
        struct ggml_tensor * u8 = ggml_mul_mat_id(gctx, up[l], x, ids8[l]);
        struct ggml_tensor * d8 = ggml_mul_mat_id(gctx, down[l], ggml_swiglu_split(gctx, g8, u8), ids8[l]);
        prod_outs[l] = ggml_out_prod(gctx, d8, wts8[l]);                                      // [N_EMBD, 1, 1]
        prod[l] = ggml_new_graph(gctx);
        ggml_build_forward_expand(prod[l], prod_outs[l]);
        struct ggml_tensor * per_slot = ggml_cont(gctx, ggml_permute(gctx, d8, 1, 0, 2, 3));  // [N_SLOTS, N_EMBD, 1]
        prod21_outs[l] = ggml_mul_mat(gctx, per_slot, ggml_reshape_3d(gctx, wts8[l], N_SLOTS, 1, 1));
        prod21[l] = ggml_new_graph(gctx);
        ggml_build_forward_expand(prod21[l], prod21_outs[l]);
    }
    struct ggml_cgraph * ping = ggml_new_graph(gctx);
    ggml_build_forward_expand(ping, ggml_scale(gctx, ggml_new_tensor_1d(gctx, GGML_TYPE_F32, 64), 1.0f));
    struct ggml_tensor * x_dense = ggml_new_tensor_2d(gctx, GGML_TYPE_F32, N_EMBD, 1);
    xs[N_LAYER] = x_dense;
    for (int d = 0; d < N_DENSE; d++) {
        lin[d] = ggml_new_graph(gctx);
        ggml_build_forward_expand(lin[d], ggml_mul_mat(gctx, dense[d], x_dense));
    }
    ggml_backend_buffer_t gbuf = ggml_backend_alloc_ctx_tensors_from_buft(gctx, ggml_backend_cpu_buffer_type());
    if (!gbuf) {
        fprintf(stderr, "could not allocate the graphs\n");
        return 1;
    }
    for (int i = 0; i <= N_LAYER; i++) {
        float * p = (float *) xs[i]->data;
        for (int j = 0; j < N_EMBD; j++) {
            p[j] = (float) ((j % 17) - 8) / 16.0f;
        }
    }

    const double bytes_moe = 3.0 * k * ggml_row_size(GGML_TYPE_Q4_K, N_EMBD) * N_FF;
    const double bytes_lin = (double) ggml_nbytes(dense[0]);
    double * t = malloc(sizeof(double) * N_CALLS);
    // the fused kernel's buffers (not for repacked weights: their layout is not ggml's rows)
    const struct ggml_type_traits_cpu * tt = ggml_get_type_traits_cpu(GGML_TYPE_Q4_K);
    const struct ggml_type_traits_cpu * qt = ggml_get_type_traits_cpu(tt->vec_dot_type);
    struct fused_args fa = { 0 };
    fa.k = k;
    fa.xq = malloc(ggml_row_size(tt->vec_dot_type, N_EMBD));
    fa.h = malloc(sizeof(float) * k * N_FF);
    fa.hq = malloc(ggml_row_size(tt->vec_dot_type, N_FF) * k);
    fa.out = malloc(sizeof(float) * k * N_EMBD);
    const int pf_rows = getenv("PROBE_PF") ? atoi(getenv("PROBE_PF")) : 4;
    const double reuse = getenv("PROBE_REUSE") ? atof(getenv("PROBE_REUSE")) : 0.0;
    static const char * kind_names[] = { "experts", "dense  ", "fused  ", "fusedpf", "read   ", "ahead  ", "product",
                                         "prodv21", "ping   ", "product" };
    // PROBE_REUSE: every call's ids drawn once, shared by the "experts" and "ahead" rows
    enum { BACK = 48 };
    int32_t (*idtab)[8] = NULL;
    if (reuse > 0) {
        if (reuse > 1 || BACK % N_LAYER != 0) {
            fprintf(stderr, "PROBE_REUSE is a share from 0 to 1\n");
            return 2;
        }
        idtab = calloc(N_CALLS + N_LAYER, sizeof *idtab);
        const int n_reuse = (int) (reuse * k + 0.5);
        unsigned int r = 4242u;
        for (int c = 0; c < N_CALLS + N_LAYER; c++) {
            int n = 0;
            for (; c >= BACK && n < n_reuse; n++) {
                idtab[c][n] = idtab[c - BACK][n];  // the same layer, one token back
            }
            while (n < k) {
                int e, dup = 0;
                r = r * 1103515245u + 12345u;
                e = (int) ((r >> 8) % N_EXPERT);
                for (int q = 0; q < n; q++) dup |= idtab[c][q] == e;
                for (int q = 0; c >= BACK && q < k; q++) dup |= idtab[c - BACK][q] == e;  // fresh: not 48 back
                if (!dup) {
                    idtab[c][n++] = e;
                }
            }
        }
    }

    // the fused kernel computes what the graph computes (layer 0, the first K experts)
    if (!repack) {
        for (int j = 0; j < k; j++) ((int32_t *) ids[0]->data)[j] = 3 * j + 1;
        ggml_backend_graph_compute(backend, moe[0]);
        fa.gate = gate[0]->data; fa.up = up[0]->data; fa.down = down[0]->data;
        fa.ids = (const int32_t *) ids[0]->data;
        qt->from_float((const float *) xs[0]->data, fa.xq, N_EMBD);
        fused_moe(&fa, n_threads);
        double max_ref = 0, max_diff = 0;
        for (int64_t i = 0; i < (int64_t) k * N_EMBD; i++) {
            const double ref = ((const float *) outs[0]->data)[i];
            max_ref = fmax(max_ref, fabs(ref));
            max_diff = fmax(max_diff, fabs(ref - fa.out[i]));
        }
        printf("fused kernel against the graph: max |diff| %.3g of max |out| %.3g\n", max_diff, max_ref);
        if (!(max_diff <= 1e-3 * max_ref)) {
            fprintf(stderr, "the fused kernel disagrees with the graph\n");
            return 1;
        }
    }

    // the product-shaped graph computes the sum of the experts' outputs (layer 0, the same K)
    {
        unsigned int s0 = 99u;
        for (int j = 0; j < k; j++) ((int32_t *) ids[0]->data)[j] = 3 * j + 1;
        ggml_backend_graph_compute(backend, moe[0]);
        fill_slots((int32_t *) ids8[0]->data, (float *) wts8[0]->data, (const int32_t *) ids[0]->data, k, &s0);
        ggml_backend_graph_compute(backend, prod[0]);
        ggml_backend_graph_compute(backend, prod21[0]);
        double max_ref = 0, max_diff = 0;
        for (int i = 0; i < N_EMBD; i++) {
            double ref = 0;
            for (int j = 0; j < k; j++) ref += ((const float *) outs[0]->data)[(int64_t) j * N_EMBD + i];
            max_ref = fmax(max_ref, fabs(ref));
            max_diff = fmax(max_diff, fabs(ref - ((const float *) prod_outs[0]->data)[i]));
            max_diff = fmax(max_diff, fabs(ref - ((const float *) prod21_outs[0]->data)[i]));
        }
        printf("product-shaped graphs (v22, v21) against the experts' sum: max |diff| %.3g of max |out| %.3g\n", max_diff, max_ref);
        if (!(max_diff <= 1e-3 * max_ref)) {
            fprintf(stderr, "the product-shaped graph disagrees with the experts' sum\n");
            return 1;
        }
    }

    unsigned int s = 777u;
    // with PROBE_REUSE, "ahead" and "experts" alternate twice, "ahead" first: on the development
    // machine whichever row ran later was faster by up to 25 % (a reading-ahead row of experts
    // that were not reused then matched "experts" only once they alternated)
    // "product" and "prodv21" right after "experts" and again at the end, so drift shows
    // "ping" last: a one-node graph on the same team, its start and end alone (patch v23's
    // LLAMA_HYBRID_WORKER_TIMES=ping times the same in the product)
    // "alt" last: the product graph with the patch's two one-token MUL_MAT_ID splits alternating
    // call by call (v23, ggml_cpu_hybrid_mmid_set_dynamic), so the host's drift hits both alike
    static const int plain_order[] = { 0, 6, 7, 1, 2, 3, 4, 7, 6, 8, 9 }, reuse_order[] = { 5, 0, 5, 0, 1, 2, 3, 4 };
    const int * order = idtab != NULL ? reuse_order : plain_order;
    const int n_order = idtab != NULL ? 8 : 11;
    double * t_alt[2] = { malloc(sizeof(double) * N_CALLS), malloc(sizeof(double) * N_CALLS) };
    for (int oi = 0; oi < n_order; oi++) {
        const int kind = order[oi];
        if (repack && kind != 0 && kind != 1 && kind != 6 && kind != 7 && kind != 8) {
            continue;  // repacked weights: the graph rows only
        }
        for (int call = 0; call < N_CALLS + N_LAYER; call++) {
            const int l = call % N_LAYER;
            int32_t * id = (int32_t *) ids[l]->data;
            if (idtab != NULL && (kind == 0 || kind == 5)) {
                memcpy(id, idtab[call], sizeof(int32_t) * k);
            } else {
                for (int j = 0; j < k; j++) {
                    int e, dup;
                    do {
                        s = s * 1103515245u + 12345u;
                        e = (int) ((s >> 8) % N_EXPERT);
                        dup = 0;
                        for (int q = 0; q < j; q++) dup |= id[q] == e;
                    } while (dup);
                    id[j] = e;
                }
            }
            if (kind == 6 || kind == 7 || kind == 9) {
                fill_slots((int32_t *) ids8[l]->data, (float *) wts8[l]->data, id, k, &s);
            }
            if (kind == 5 && call >= BACK) {
                read_ahead(gate[l]->data, up[l]->data, down[l]->data, idtab[call - BACK], k, now_us() + gap_us, n_threads);
            } else if (gap_us > 0) {
                spin_us(gap_us);
            }
            const double t0 = now_us();
            if (kind == 9) {
                ggml_cpu_hybrid_mmid_set_dynamic(call & 1);
                ggml_backend_graph_compute(backend, prod[l]);
            } else if (kind == 8) {
                ggml_backend_graph_compute(backend, ping);
            } else if (kind < 2 || kind >= 5) {
                ggml_backend_graph_compute(backend, kind == 1 ? lin[call % N_DENSE] : kind == 6 ? prod[l]
                                                    : kind == 7 ? prod21[l] : moe[l]);
            } else if (kind == 4) {
                fa.gate = gate[l]->data; fa.up = up[l]->data; fa.down = down[l]->data;
                fa.ids = id;
                read_moe(&fa, n_threads);
            } else {
                fa.gate = gate[l]->data; fa.up = up[l]->data; fa.down = down[l]->data;
                fa.ids = id;
                fa.pf = kind == 3 ? pf_rows : 0;
                qt->from_float((const float *) xs[l]->data, fa.xq, N_EMBD);
                fused_moe(&fa, n_threads);
            }
            if (kind == 9 && call >= N_LAYER) {
                t_alt[call & 1][(call - N_LAYER) / 2] = now_us() - t0;
            } else if (call >= N_LAYER) {
                t[call - N_LAYER] = now_us() - t0;  // the first round warms the threads
            }
        }
        if (kind == 9) {
            const char * env = getenv("LLAMA_HYBRID_MMID_DYNAMIC");
            ggml_cpu_hybrid_mmid_set_dynamic(env != NULL && strcmp(env, "1") == 0);
            for (int m = 0; m < 2; m++) {
                const int n = N_CALLS / 2;
                qsort(t_alt[m], n, sizeof(double), cmp_double);
                const double med = t_alt[m][n / 2];
                printf("%s threads=%d k=%d gap_us=%.0f weights=%s, alternating, %s: median %.1f us, p10 %.1f, p90 %.1f, %.1f MB per call, %.1f GB/s\n",
                       kind_names[kind], n_threads, k, gap_us, ggml_backend_buft_name(weight_buft),
                       m ? "claimed chunks" : "equal shares", med, t_alt[m][n / 10], t_alt[m][n * 9 / 10],
                       bytes_moe / 1e6, bytes_moe / med / 1e3);
            }
            continue;
        }
        qsort(t, N_CALLS, sizeof(double), cmp_double);
        const double med = t[N_CALLS / 2];
        const double bytes = kind == 8 ? 0.0 : kind == 1 ? bytes_lin : bytes_moe;
        printf("%s threads=%d k=%d gap_us=%.0f weights=%s%s: median %.1f us, p10 %.1f, p90 %.1f, %.1f MB per call, %.1f GB/s\n",
               kind_names[kind], n_threads, k, gap_us, ggml_backend_buft_name(weight_buft),
               idtab != NULL && (kind == 0 || kind == 5) ? " reuse" : "",
               med, t[N_CALLS / 10], t[N_CALLS * 9 / 10], bytes / 1e6, bytes / med / 1e3);
    }
    free(t);
    free(t_alt[0]);
    free(t_alt[1]);
    free(idtab);
    free(fa.xq); free(fa.h); free(fa.hq); free(fa.out);
    ggml_backend_buffer_free(gbuf);
    ggml_backend_buffer_free(wbuf);
    ggml_free(gctx);
    ggml_free(wctx);
    ggml_backend_free(backend);
    return 0;
}
