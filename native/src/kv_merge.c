/* In-cache KV merging (native/patches/0004): shape, planning features, merge.
 *
 * libllama validates and reports a code plus a message (it knows the cells);
 * this layer maps the code onto an edgemerge status and keeps the message.
 */
#include "edgemerge.h"
#include "edgemerge_internal.h"
#include "llama.h"

static int status_of(int32_t code) {
    switch (code) {
        case LLAMA_EDGEMERGE_KV_ERR_CELL:
            return EDGEMERGE_ERANGE;
        case LLAMA_EDGEMERGE_KV_ERR_COMPUTE:
            return EDGEMERGE_EBACKEND;
        default:
            return EDGEMERGE_EINVAL;
    }
}

int edgemerge_kv_shape(void * ctx, int32_t * n_layer, int32_t * n_head_kv, int32_t * head_dim_k,
                       int32_t * head_dim_v, int32_t * n_cells, int32_t * layer_ids,
                       int32_t layer_ids_capacity) {
    if (ctx == NULL) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "kv_shape: ctx is NULL; pass a live llama_context");
    }
    int32_t rc = llama_edgemerge_kv_shape((struct llama_context *) ctx, n_layer, n_head_kv,
                                          head_dim_k, head_dim_v, n_cells, layer_ids,
                                          layer_ids_capacity);
    if (rc == LLAMA_EDGEMERGE_KV_ERR_LAYOUT) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "kv_shape: the cache layers differ in head count or head size; "
                              "merging supports uniform layers only");
    }
    if (rc < 0) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "kv_shape: this context's memory is not an attention KV cache");
    }
    edgemerge_clear_error();
    return EDGEMERGE_OK;
}

int edgemerge_kv_features(void * ctx, int32_t seq_id, int32_t n_cells, const uint32_t * cells,
                          int32_t centre, float * k_sim, float * k_norm, float * v_norm) {
    char msg[384] = "";
    if (ctx == NULL) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "kv_features: ctx is NULL; pass a live llama_context");
    }
    int32_t rc = llama_edgemerge_kv_features((struct llama_context *) ctx, seq_id, n_cells, cells,
                                             centre != 0, k_sim, k_norm, v_norm, msg, sizeof(msg));
    if (rc < 0) {
        return edgemerge_fail(status_of(rc), "kv_%s", msg);
    }
    edgemerge_clear_error();
    return EDGEMERGE_OK;
}

int edgemerge_kv_merge(void * ctx, int32_t seq_id, int32_t n_group, const uint32_t * dst,
                       const int32_t * offs, const uint32_t * src, const float * w_k,
                       const float * w_v, const float * bias, const int32_t * span,
                       int32_t flags_k, int32_t flags_v) {
    char msg[384] = "";
    if (ctx == NULL) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "kv_merge: ctx is NULL; pass a live llama_context");
    }
    int32_t rc = llama_edgemerge_kv_merge((struct llama_context *) ctx, seq_id, n_group, dst, offs,
                                          src, w_k, w_v, bias, span, flags_k, flags_v, msg,
                                          sizeof(msg));
    if (rc < 0) {
        return edgemerge_fail(status_of(rc), "kv_%s", msg);
    }
    edgemerge_clear_error();
    return EDGEMERGE_OK;
}
