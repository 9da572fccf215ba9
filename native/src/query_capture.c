/* Capture of post-RoPE queries while a context decodes (recall, edgemerge/recall.py).
 *
 * The model graphs name the query of layer il "Qcur-<il>" on several nodes (projection,
 * bias, reshape, RoPE); the RoPE node is the post-RoPE query, f32
 * [head_dim, n_head, n_tokens]. While armed, the graph evaluation callback (installed on
 * the live context by edgemerge_set_eval_callback, native/src/llama_access.cpp) asks only
 * for those nodes and copies the last tokens of each into a per-layer ring of `window`
 * tokens, so after a turn the ring holds the queries of its last `window` tokens whatever the
 * ubatch split. Only the queries are read off the backend; the cache never moves.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "edgemerge.h"
#include "edgemerge_internal.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

struct edgemerge_qcapture {
    struct llama_context * ctx;
    int32_t n_layer;
    int32_t n_head;
    int32_t head_dim;
    int32_t window;
    int32_t armed;
    int64_t * seen;   /* [n_layer] tokens captured since arming */
    float * ring;     /* [n_layer][window][n_head * head_dim] */
    char problem[256]; /* the first mismatch met while armed ("" if none) */
};

/* The layer of a "Qcur-<il>" RoPE node, or -1 for any other node. */
static int query_layer(const struct ggml_tensor * t) {
    if (t->op != GGML_OP_ROPE || strncmp(t->name, "Qcur-", 5) != 0) {
        return -1;
    }
    char * end = NULL;
    long il = strtol(t->name + 5, &end, 10);
    if (end == t->name + 5 || *end != '\0' || il < 0) {
        return -1;
    }
    return (int) il;
}

static bool capture_cb(struct ggml_tensor * t, bool ask, void * user_data) {
    struct edgemerge_qcapture * qc = (struct edgemerge_qcapture *) user_data;
    int il = query_layer(t);
    if (ask) {
        return il >= 0;
    }
    if (il < 0 || qc->problem[0] != '\0') {
        return true;
    }
    if (il >= qc->n_layer) {
        snprintf(qc->problem, sizeof(qc->problem), "query of layer %d beyond the %d layers", il,
                 qc->n_layer);
        return true;
    }
    if (t->type != GGML_TYPE_F32 || t->ne[0] != qc->head_dim || t->ne[1] != qc->n_head ||
        t->ne[3] != 1 || !ggml_is_contiguous(t)) {
        snprintf(qc->problem, sizeof(qc->problem),
                 "query of layer %d is %s [%lld, %lld, %lld, %lld], expected contiguous f32 "
                 "[%d, %d, n_tokens, 1]",
                 il, ggml_type_name(t->type), (long long) t->ne[0], (long long) t->ne[1],
                 (long long) t->ne[2], (long long) t->ne[3], qc->head_dim, qc->n_head);
        return true;
    }
    const int64_t n_tok = t->ne[2];
    const int64_t keep = n_tok < qc->window ? n_tok : qc->window;
    const size_t row = (size_t) qc->n_head * (size_t) qc->head_dim;
    float * ring = qc->ring + (size_t) il * (size_t) qc->window * row;
    for (int64_t i = n_tok - keep; i < n_tok; ++i) {
        int64_t slot = (qc->seen[il] + (i - (n_tok - keep))) % qc->window;
        ggml_backend_tensor_get(t, ring + (size_t) slot * row, (size_t) i * t->nb[2],
                                row * sizeof(float));
    }
    qc->seen[il] += keep;
    return true;
}

int edgemerge_qcapture_new(void * ctx, int32_t n_layer, int32_t n_head, int32_t head_dim,
                           int32_t window, edgemerge_qcapture ** out) {
    if (ctx == NULL || out == NULL) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "qcapture_new: ctx and out must not be NULL");
    }
    if (n_layer < 1 || n_head < 1 || head_dim < 1 || window < 1 || window > 65536) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "qcapture_new: n_layer=%d n_head=%d head_dim=%d window=%d; each must "
                              "be >= 1 and window <= 65536",
                              n_layer, n_head, head_dim, window);
    }
    struct edgemerge_qcapture * qc = calloc(1, sizeof(*qc));
    size_t n = (size_t) n_layer * (size_t) window * (size_t) n_head * (size_t) head_dim;
    if (qc != NULL) {
        qc->seen = calloc((size_t) n_layer, sizeof(int64_t));
        qc->ring = calloc(n, sizeof(float));
    }
    if (qc == NULL || qc->seen == NULL || qc->ring == NULL) {
        if (qc != NULL) {
            free(qc->seen);
            free(qc->ring);
            free(qc);
        }
        return edgemerge_fail(EDGEMERGE_ENOMEM, "qcapture_new: cannot allocate %zu floats", n);
    }
    qc->ctx = (struct llama_context *) ctx;
    qc->n_layer = n_layer;
    qc->n_head = n_head;
    qc->head_dim = head_dim;
    qc->window = window;
    *out = qc;
    edgemerge_clear_error();
    return EDGEMERGE_OK;
}

int edgemerge_qcapture_arm(edgemerge_qcapture * qc, int32_t on) {
    if (qc == NULL) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "qcapture_arm: qc is NULL");
    }
    if (on) {
        memset(qc->seen, 0, (size_t) qc->n_layer * sizeof(int64_t));
        qc->problem[0] = '\0';
        edgemerge_set_eval_callback(qc->ctx, capture_cb, qc);
    } else {
        edgemerge_set_eval_callback(qc->ctx, NULL, NULL);
    }
    qc->armed = on != 0;
    edgemerge_clear_error();
    return EDGEMERGE_OK;
}

int edgemerge_qcapture_read(edgemerge_qcapture * qc, float * out, int32_t * n_tokens) {
    if (qc == NULL || out == NULL || n_tokens == NULL) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "qcapture_read: arguments must not be NULL");
    }
    if (qc->problem[0] != '\0') {
        return edgemerge_fail(EDGEMERGE_EINVAL, "qcapture_read: %s", qc->problem);
    }
    const size_t row = (size_t) qc->n_head * (size_t) qc->head_dim;
    for (int32_t il = 0; il < qc->n_layer; ++il) {
        int64_t seen = qc->seen[il];
        int64_t have = seen < qc->window ? seen : qc->window;
        const float * ring = qc->ring + (size_t) il * (size_t) qc->window * row;
        float * dst = out + (size_t) il * (size_t) qc->window * row;
        /* oldest first: the ring's next slot holds the oldest token once it has wrapped */
        for (int64_t j = 0; j < have; ++j) {
            int64_t slot = (seen - have + j) % qc->window;
            memcpy(dst + (size_t) j * row, ring + (size_t) slot * row, row * sizeof(float));
        }
        n_tokens[il] = (int32_t) have;
    }
    edgemerge_clear_error();
    return EDGEMERGE_OK;
}

void edgemerge_qcapture_free(edgemerge_qcapture * qc) {
    if (qc == NULL) {
        return;
    }
    if (qc->armed) {
        edgemerge_set_eval_callback(qc->ctx, NULL, NULL);
    }
    free(qc->seen);
    free(qc->ring);
    free(qc);
}
