// The weighted sum of one token's expert outputs over the slots, timed alone on the CPU: the
// op a CPU expert chain ends with. Three forms of the same sum over [N_EMBD, N_SLOTS] F32:
// patch v22's OUT_PROD, v9-v21's CONT of the transposed experts + MUL_MAT, and stock
// llama.cpp's MUL + N_SLOTS-1 ADDs. Each is its own graph, computed N_CALLS times, twice in
// turn; prints the median µs per graph and checks that the three agree.
//   weighted_sum_probe THREADS
// Build: cc -O2 weighted_sum_probe.c -I.../ggml/include -L.../lib -lggml -lggml-base -lggml-cpu
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define N_EMBD 2048
#define N_SLOTS 8
#define N_CALLS 2000

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static int cmp_double(const void * a, const void * b) {
    const double x = *(const double *) a, y = *(const double *) b;
    return x < y ? -1 : x > y;
}

int main(int argc, char ** argv) {
    const int n_threads = argc > 1 ? atoi(argv[1]) : 1;
    if (n_threads < 1) {
        fprintf(stderr, "usage: %s THREADS\n", argv[0]);
        return 2;
    }
    ggml_backend_t backend = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(backend, n_threads);
    struct ggml_init_params params = { ggml_tensor_overhead() * 64 + 3 * ggml_graph_overhead(), NULL, true };
    struct ggml_context * ctx = ggml_init(params);
    struct ggml_tensor * experts = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, N_EMBD, N_SLOTS, 1);
    struct ggml_tensor * w = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 1, N_SLOTS, 1);
    struct ggml_tensor * sums[3];
    sums[0] = ggml_out_prod(ctx, experts, w);
    sums[1] = ggml_mul_mat(ctx, ggml_cont(ctx, ggml_permute(ctx, experts, 1, 0, 2, 3)),
                           ggml_reshape_3d(ctx, w, N_SLOTS, 1, 1));
    struct ggml_tensor * weighted = ggml_mul(ctx, experts, w);
    struct ggml_tensor * acc = ggml_view_2d(ctx, weighted, N_EMBD, 1, weighted->nb[1], 0);
    for (int i = 1; i < N_SLOTS; i++) {
        acc = ggml_add(ctx, acc, ggml_view_2d(ctx, weighted, N_EMBD, 1, weighted->nb[1], i * weighted->nb[1]));
    }
    sums[2] = acc;
    static const char * names[3] = { "out_prod (v22)", "cont + mul_mat (v9-v21)", "mul + adds (stock)" };
    struct ggml_cgraph * graphs[3];
    for (int i = 0; i < 3; i++) {
        graphs[i] = ggml_new_graph(ctx);
        ggml_build_forward_expand(graphs[i], sums[i]);
    }
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    if (!buf) {
        fprintf(stderr, "could not allocate the tensors\n");
        return 1;
    }
    float * e = (float *) experts->data;
    for (int i = 0; i < N_EMBD * N_SLOTS; i++) {
        e[i] = (float) ((i * 7) % 13 - 6) / 8.0f;
    }
    for (int i = 0; i < N_SLOTS; i++) {
        ((float *) w->data)[i] = 0.1f * (float) (i + 1);
    }
    double * t = malloc(sizeof(double) * N_CALLS);
    for (int round = 0; round < 2; round++) {
        for (int g = 0; g < 3; g++) {
            for (int c = 0; c < N_CALLS; c++) {
                const double t0 = now_us();
                ggml_backend_graph_compute(backend, graphs[g]);
                t[c] = now_us() - t0;
            }
            qsort(t, N_CALLS, sizeof(double), cmp_double);
            printf("threads=%d %-24s median %.2f us, p10 %.2f, p90 %.2f\n", n_threads, names[g],
                   t[N_CALLS / 2], t[N_CALLS / 10], t[N_CALLS * 9 / 10]);
        }
    }
    double max_diff = 0, max_ref = 0;
    for (int i = 0; i < N_EMBD; i++) {
        const double ref = ((const float *) sums[2]->data)[i];
        max_ref = fmax(max_ref, fabs(ref));
        for (int g = 0; g < 2; g++) {
            max_diff = fmax(max_diff, fabs(ref - ((const float *) sums[g]->data)[i]));
        }
    }
    printf("the three sums agree: max |diff| %.3g of max |sum| %.3g\n", max_diff, max_ref);
    free(t);
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    ggml_backend_free(backend);
    return max_diff <= 1e-4 * max_ref ? 0 : 1;
}
