/*
 * hybrid-gguf routing recorder: a ggml graph eval callback (llama_context_params.cb_eval).
 *
 * The scheduler asks the callback about every graph node; for each node we say yes to it
 * computes up to that node, synchronizes, and calls again with ask=false.  Every "yes"
 * therefore costs a synchronization, so we only ever say yes to `ffn_moe_topk-<il>`
 * (and `ffn_moe_weights-<il>` when weight-mass recording is on).
 *
 * Phase split: a graph is one llama.cpp ubatch.  Its phase is decided by the FIRST MoE
 * layer observed in it: more than one token routed there means prompt processing,
 * exactly one means decode.  The last layer alone cannot tell: during prompt processing
 * it only routes the output rows (usually 1).  A new graph starts whenever the layer
 * index does not increase.  (A one-token prompt chunk is counted as decode.)
 *
 * One recorder belongs to one llama_context; Python may snapshot/reset it from another
 * thread while the context decodes (all state behind one mutex).
 *
 * The observe call never returns false: that would abort the graph.
 */

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "ggml-backend.h"

#define HG_API __attribute__((visibility("default")))

#define HG_ABI_VERSION 2

enum { PHASE_PROMPT = 0, PHASE_DECODE = 1 };

/* stats[] slots returned by hg_rec_stats */
enum {
    ST_GRAPHS = 0,      /* graphs (ubatches) observed */
    ST_OBSERVED,        /* topk nodes observed */
    ST_ANOMALIES,       /* topk nodes skipped: bad layer, shape or type */
    ST_BAD_IDS,         /* ids outside [0, n_expert) (not counted) */
    ST_TRACE_WRITTEN,   /* trace records written since reset (ring keeps the newest) */
    ST_TOKENS_SEEN,     /* tokens routed by first MoE layers since creation (= next token index) */
    ST_DEVICE_READS,    /* ggml_backend_tensor_get calls (non-host buffers) */
    ST_WEIGHT_NODES,    /* ffn_moe_weights nodes observed */
    ST_COUNT
};

typedef struct hg_rec {
    pthread_mutex_t mu;
    int n_layer, n_expert, n_used;

    volatile int enabled;      /* 0: answer no to everything (recording paused) */
    volatile int want_weights; /* also observe ffn_moe_weights-<il> */

    /* Decode sampling: each observed node costs a GPU sync, so by default only one decode
     * graph in decode_stride is observed (prompt graphs always are). Touched only by the
     * ask calls, which come from the decoding thread. */
    volatile int decode_stride;
    int ask_last_il;
    int64_t ask_graphs;
    int ask_take;

    int64_t *counts;        /* [2][n_layer][n_expert] selections by phase */
    int64_t *tokens;        /* [2][n_layer] routed tokens by phase */
    uint32_t *coact;        /* [n_layer][n_expert][n_expert] or NULL */
    double *mass_sum;       /* [2][n_layer] summed top-k weight per token */
    int64_t *mass_tokens;   /* [2][n_layer] tokens contributing to mass_sum */

    /* ring buffer trace: rec i holds token index, layer, n_used ids */
    int64_t trace_cap;
    int64_t trace_written;
    int64_t *tr_token;
    int32_t *tr_layer;
    int32_t *tr_ids;

    /* graph tracking */
    int last_layer;       /* layer of the previous topk node, -1 before any */
    int graph_phase;
    int64_t graph_tokens; /* rows routed by the first MoE layer of this graph */
    int64_t token_base;   /* token index of the first row of this graph */

    int64_t stats[ST_COUNT];

    /* scratch for non-host reads */
    void *scratch;
    size_t scratch_size;
    int32_t *row_ids; /* n_used */
} hg_rec;

static const char TOPK_PREFIX[] = "ffn_moe_topk-";
static const char WEIGHTS_PREFIX[] = "ffn_moe_weights-";

/* Parse "<prefix><digits>" exactly; returns the layer or -1. */
static int parse_layer(const char *name, const char *prefix, size_t plen) {
    if (strncmp(name, prefix, plen) != 0) {
        return -1;
    }
    const char *p = name + plen;
    if (*p < '0' || *p > '9') {
        return -1;
    }
    long v = 0;
    while (*p >= '0' && *p <= '9') {
        v = v * 10 + (*p - '0');
        if (v > 1000000) {
            return -1;
        }
        p++;
    }
    return *p == '\0' ? (int) v : -1;
}

HG_API int hg_rec_abi_version(void) { return HG_ABI_VERSION; }

HG_API void hg_rec_destroy(hg_rec *r);
static void trace_free(hg_rec *r);

HG_API hg_rec *hg_rec_create(int n_layer, int n_expert, int n_expert_used) {
    if (n_layer <= 0 || n_expert <= 0 || n_expert_used <= 0 || n_expert_used > n_expert) {
        return NULL;
    }
    hg_rec *r = calloc(1, sizeof(*r));
    if (!r) {
        return NULL;
    }
    pthread_mutex_init(&r->mu, NULL);
    r->n_layer = n_layer;
    r->n_expert = n_expert;
    r->n_used = n_expert_used;
    r->enabled = 1;
    r->decode_stride = 1;
    r->ask_last_il = 1 << 30;
    r->ask_take = 1;
    r->last_layer = -1;
    r->counts = calloc((size_t) 2 * n_layer * n_expert, sizeof(int64_t));
    r->tokens = calloc((size_t) 2 * n_layer, sizeof(int64_t));
    r->mass_sum = calloc((size_t) 2 * n_layer, sizeof(double));
    r->mass_tokens = calloc((size_t) 2 * n_layer, sizeof(int64_t));
    r->row_ids = calloc((size_t) n_expert_used, sizeof(int32_t));
    if (!r->counts || !r->tokens || !r->mass_sum || !r->mass_tokens || !r->row_ids) {
        hg_rec_destroy(r);
        return NULL;
    }
    return r;
}

HG_API void hg_rec_destroy(hg_rec *r) {
    if (!r) {
        return;
    }
    pthread_mutex_destroy(&r->mu);
    free(r->counts);
    free(r->tokens);
    free(r->coact);
    free(r->mass_sum);
    free(r->mass_tokens);
    trace_free(r);
    free(r->scratch);
    free(r->row_ids);
    free(r);
}

/* Zero all accumulated data; keeps options and the graph tracking state, so a reset in
 * the middle of a graph does not misclassify its remaining layers. */
HG_API void hg_rec_reset(hg_rec *r) {
    pthread_mutex_lock(&r->mu);
    memset(r->counts, 0, sizeof(int64_t) * 2 * r->n_layer * r->n_expert);
    memset(r->tokens, 0, sizeof(int64_t) * 2 * r->n_layer);
    memset(r->mass_sum, 0, sizeof(double) * 2 * r->n_layer);
    memset(r->mass_tokens, 0, sizeof(int64_t) * 2 * r->n_layer);
    if (r->coact) {
        memset(r->coact, 0, sizeof(uint32_t) * r->n_layer * r->n_expert * r->n_expert);
    }
    r->trace_written = 0;
    memset(r->stats, 0, sizeof(r->stats));
    /* token indices keep counting from the recorder's creation */
    pthread_mutex_unlock(&r->mu);
}

HG_API void hg_rec_set_enabled(hg_rec *r, int on) { r->enabled = on ? 1 : 0; }

/* Observe one decode graph in `stride` (1 = every one). */
HG_API void hg_rec_set_decode_stride(hg_rec *r, int stride) { r->decode_stride = stride > 1 ? stride : 1; }

HG_API void hg_rec_enable_weights(hg_rec *r, int on) { r->want_weights = on ? 1 : 0; }

/* Frees the trace ring and marks it off. Caller holds the lock (or owns r). */
static void trace_free(hg_rec *r) {
    free(r->tr_token);
    free(r->tr_layer);
    free(r->tr_ids);
    r->tr_token = NULL;
    r->tr_layer = NULL;
    r->tr_ids = NULL;
    r->trace_cap = 0;
}

/* capacity 0 turns the trace off.  Returns 0, or -1 when out of memory. */
HG_API int hg_rec_enable_trace(hg_rec *r, int64_t capacity) {
    int rc = 0;
    pthread_mutex_lock(&r->mu);
    trace_free(r);
    r->trace_written = 0;
    if (capacity > 0) {
        r->tr_token = malloc(sizeof(int64_t) * capacity);
        r->tr_layer = malloc(sizeof(int32_t) * capacity);
        r->tr_ids = malloc(sizeof(int32_t) * capacity * r->n_used);
        if (r->tr_token && r->tr_layer && r->tr_ids) {
            r->trace_cap = capacity;
        } else {
            trace_free(r);
            rc = -1;
        }
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

HG_API int hg_rec_enable_coact(hg_rec *r, int on) {
    int rc = 0;
    pthread_mutex_lock(&r->mu);
    if (on && !r->coact) {
        r->coact = calloc((size_t) r->n_layer * r->n_expert * r->n_expert, sizeof(uint32_t));
        rc = r->coact ? 0 : -1;
    } else if (!on) {
        free(r->coact);
        r->coact = NULL;
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

/* Pointer to the first byte of t's data in host memory (copying from the device when
 * needed), or NULL.  Called with the mutex held. */
static const char *host_bytes(hg_rec *r, const struct ggml_tensor *t) {
    if (t->data == NULL) {
        return NULL;
    }
    if (t->buffer == NULL || ggml_backend_buffer_is_host(t->buffer)) {
        return (const char *) t->data;
    }
    /* ggml_nbytes of a strided view spans first..last element, so one get covers it. */
    size_t n = ggml_nbytes(t);
    if (n == 0) {
        return NULL;
    }
    if (n > r->scratch_size) {
        void *p = realloc(r->scratch, n);
        if (!p) {
            return NULL;
        }
        r->scratch = p;
        r->scratch_size = n;
    }
    ggml_backend_tensor_get(t, r->scratch, 0, n);
    r->stats[ST_DEVICE_READS]++;
    return (const char *) r->scratch;
}

static void observe_topk(hg_rec *r, const struct ggml_tensor *t, int il) {
    const int64_t k = t->ne[0];
    const int64_t rows = t->ne[1] * t->ne[2] * t->ne[3];
    if (il >= r->n_layer || k != r->n_used || t->type != GGML_TYPE_I32 || rows <= 0) {
        r->stats[ST_ANOMALIES]++;
        return;
    }

    if (r->last_layer < 0 || il <= r->last_layer) {
        /* first MoE layer of a new graph: it routes every token of the ubatch */
        r->token_base += r->graph_tokens;
        r->graph_tokens = rows;
        r->graph_phase = rows > 1 ? PHASE_PROMPT : PHASE_DECODE;
        r->stats[ST_GRAPHS]++;
    }
    r->last_layer = il;

    const char *base = host_bytes(r, t);
    if (!base) {
        r->stats[ST_ANOMALIES]++;
        return;
    }
    r->stats[ST_OBSERVED]++;

    const int ph = r->graph_phase;
    const int E = r->n_expert;
    int64_t *cnt = r->counts + ((size_t) ph * r->n_layer + il) * E;
    r->tokens[ph * r->n_layer + il] += rows;
    /* Rows beyond the first layer's are output rows; assume they are the trailing tokens
     * (true for llama-cpp-python, which asks for the last token's logits). */
    int64_t first_tok = r->token_base + (r->graph_tokens > rows ? r->graph_tokens - rows : 0);
    uint32_t *co = r->coact ? r->coact + (size_t) il * E * E : NULL;

    for (int64_t row = 0; row < rows; row++) {
        const int64_t i1 = row % t->ne[1];
        const int64_t i2 = (row / t->ne[1]) % t->ne[2];
        const int64_t i3 = row / (t->ne[1] * t->ne[2]);
        const char *rp = base + i1 * t->nb[1] + i2 * t->nb[2] + i3 * t->nb[3];
        int ok = 1;
        for (int64_t j = 0; j < k; j++) {
            int32_t id;
            memcpy(&id, rp + j * t->nb[0], sizeof(id));
            r->row_ids[j] = id;
            if (id < 0 || id >= E) {
                ok = 0;
            }
        }
        if (!ok) {
            r->stats[ST_BAD_IDS]++;
            continue;
        }
        for (int64_t j = 0; j < k; j++) {
            cnt[r->row_ids[j]]++;
        }
        if (co) {
            for (int64_t a = 0; a < k; a++) {
                const int32_t ea = r->row_ids[a];
                co[(size_t) ea * E + ea]++;
                for (int64_t b = a + 1; b < k; b++) {
                    const int32_t eb = r->row_ids[b];
                    co[(size_t) ea * E + eb]++;
                    co[(size_t) eb * E + ea]++;
                }
            }
        }
        if (r->trace_cap > 0) {
            const int64_t slot = r->trace_written % r->trace_cap;
            r->tr_token[slot] = first_tok + row;
            r->tr_layer[slot] = il;
            memcpy(r->tr_ids + slot * k, r->row_ids, sizeof(int32_t) * k);
            r->trace_written++;
        }
    }
    r->stats[ST_TRACE_WRITTEN] = r->trace_written;
}

/* ffn_moe_weights-<il>: F32 [1, n_used, n_tokens], the router probabilities of the
 * selected experts (before any renormalisation).  Their per-token sum is the top-k mass. */
static void observe_weights(hg_rec *r, const struct ggml_tensor *t, int il) {
    if (il >= r->n_layer || t->type != GGML_TYPE_F32 || t->ne[0] != 1 || t->ne[1] != r->n_used) {
        r->stats[ST_ANOMALIES]++;
        return;
    }
    const char *base = host_bytes(r, t);
    if (!base) {
        r->stats[ST_ANOMALIES]++;
        return;
    }
    r->stats[ST_WEIGHT_NODES]++;
    const int ph = r->graph_phase; /* weights follow topk of the same layer and graph */
    double total = 0.0;
    const int64_t rows = t->ne[2] * t->ne[3];
    for (int64_t row = 0; row < rows; row++) {
        const char *rp = base + (row % t->ne[2]) * t->nb[2] + (row / t->ne[2]) * t->nb[3];
        for (int64_t j = 0; j < t->ne[1]; j++) {
            float w;
            memcpy(&w, rp + j * t->nb[1], sizeof(w));
            total += w;
        }
    }
    r->mass_sum[ph * r->n_layer + il] += total;
    r->mass_tokens[ph * r->n_layer + il] += rows;
}

/* The cb_eval entry point. */
HG_API bool hg_rec_cb(struct ggml_tensor *t, bool ask, void *user_data) {
    hg_rec *r = (hg_rec *) user_data;
    if (r == NULL || !r->enabled) {
        return ask ? false : true;
    }
    /* cheap reject: every name we want starts with "ffn_moe_" */
    const char *name = t->name;
    if (name[0] != 'f' || strncmp(name, "ffn_moe_", 8) != 0) {
        return ask ? false : true;
    }
    int il = parse_layer(name, TOPK_PREFIX, sizeof(TOPK_PREFIX) - 1);
    int is_topk = il >= 0;
    if (!is_topk && r->want_weights) {
        il = parse_layer(name, WEIGHTS_PREFIX, sizeof(WEIGHTS_PREFIX) - 1);
    }
    if (il < 0) {
        return ask ? false : true;
    }
    if (ask) {
        if (is_topk) {
            if (il <= r->ask_last_il) {
                /* layer index did not increase: a new graph. Decide for the whole graph from
                 * its first MoE layer (the last one routes only output rows in a prompt). */
                r->ask_graphs++;
                r->ask_take = t->ne[1] > 1 || r->decode_stride <= 1 || r->ask_graphs % r->decode_stride == 0;
            }
            r->ask_last_il = il;
        }
        return r->ask_take != 0;
    }
    pthread_mutex_lock(&r->mu);
    if (is_topk) {
        observe_topk(r, t, il);
    } else {
        observe_weights(r, t, il);
    }
    pthread_mutex_unlock(&r->mu);
    return true;
}

HG_API int hg_rec_dims(const hg_rec *r, int32_t *out3) {
    out3[0] = r->n_layer;
    out3[1] = r->n_expert;
    out3[2] = r->n_used;
    return 0;
}

/* Copy counts [2][n_layer][n_expert], tokens [2][n_layer], top-k mass sums and token
 * counts [2][n_layer] and stats [ST_COUNT] (any pointer may be NULL). */
HG_API void hg_rec_snapshot(hg_rec *r, int64_t *counts, int64_t *tokens, double *mass_sum,
                            int64_t *mass_tokens, int64_t *stats, int n_stats) {
    pthread_mutex_lock(&r->mu);
    if (counts) {
        memcpy(counts, r->counts, sizeof(int64_t) * 2 * r->n_layer * r->n_expert);
    }
    if (tokens) {
        memcpy(tokens, r->tokens, sizeof(int64_t) * 2 * r->n_layer);
    }
    if (mass_sum) {
        memcpy(mass_sum, r->mass_sum, sizeof(double) * 2 * r->n_layer);
    }
    if (mass_tokens) {
        memcpy(mass_tokens, r->mass_tokens, sizeof(int64_t) * 2 * r->n_layer);
    }
    r->stats[ST_TOKENS_SEEN] = r->token_base + r->graph_tokens;
    if (stats) {
        for (int i = 0; i < n_stats && i < ST_COUNT; i++) {
            stats[i] = r->stats[i];
        }
    }
    pthread_mutex_unlock(&r->mu);
}

HG_API int hg_rec_n_stats(void) { return ST_COUNT; }

/* Copy co-activation counts [n_layer][n_expert][n_expert]; returns -1 when off. */
HG_API int hg_rec_snapshot_coact(hg_rec *r, uint32_t *out) {
    int rc = -1;
    pthread_mutex_lock(&r->mu);
    if (r->coact) {
        memcpy(out, r->coact, sizeof(uint32_t) * r->n_layer * r->n_expert * r->n_expert);
        rc = 0;
    }
    pthread_mutex_unlock(&r->mu);
    return rc;
}

/* Copy up to max_records trace records, oldest first.  Returns the number copied and
 * stores the total written since reset in *written (older ones were overwritten). */
HG_API int64_t hg_rec_snapshot_trace(hg_rec *r, int64_t *token, int32_t *layer, int32_t *ids,
                                     int64_t max_records, int64_t *written) {
    pthread_mutex_lock(&r->mu);
    int64_t have = r->trace_written < r->trace_cap ? r->trace_written : r->trace_cap;
    int64_t n = have < max_records ? have : max_records;
    int64_t start = r->trace_written - have; /* oldest record still held */
    start += have - n;                       /* keep the newest n when truncating */
    for (int64_t i = 0; i < n; i++) {
        const int64_t slot = (start + i) % r->trace_cap;
        token[i] = r->tr_token[slot];
        layer[i] = r->tr_layer[slot];
        memcpy(ids + i * r->n_used, r->tr_ids + slot * r->n_used, sizeof(int32_t) * r->n_used);
    }
    if (written) {
        *written = r->trace_written;
    }
    pthread_mutex_unlock(&r->mu);
    return n;
}
