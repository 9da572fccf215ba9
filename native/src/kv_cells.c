/* Per-cell bias and span of the patched KV cache (native/patches/0002).
 *
 * Thin wrappers over llama_edgemerge_kv_cells_get/_cell_set: libllama reports a
 * bare error code, and this layer turns it into an edgemerge status plus a message
 * that names the offending value and the valid range.
 */
#include "edgemerge.h"
#include "edgemerge_internal.h"
#include "llama.h"

#include <math.h>
#include <stdlib.h>

static int fail_common(int32_t code, const char * fn, const struct llama_context * lctx,
                       int32_t seq_id) {
    switch (code) {
        case LLAMA_EDGEMERGE_KV_ERR_SEQ:
            return edgemerge_fail(EDGEMERGE_EINVAL,
                                  "%s: sequence %d does not exist; this context has %u sequence(s), "
                                  "ids 0..%u (set n_seq_max when creating it for more)",
                                  fn, seq_id, llama_n_seq_max(lctx), llama_n_seq_max(lctx) - 1);
        case LLAMA_EDGEMERGE_KV_ERR_MEMORY:
            return edgemerge_fail(EDGEMERGE_EINVAL,
                                  "%s: this context's memory is not an attention KV cache "
                                  "(recurrent or hybrid model), so it has no cells to address",
                                  fn);
        default:
            return edgemerge_fail(EDGEMERGE_EBACKEND, "%s: libllama returned error %d", fn,
                                  (int) code);
    }
}

int edgemerge_kv_cells_list(void * ctx, int32_t seq_id, int32_t capacity, uint32_t * cell,
                            int32_t * pos, int32_t * span_min, int32_t * span_max, float * bias,
                            int32_t * n_cells) {
    static const char fn[] = "edgemerge_kv_cells_list";
    if (ctx == NULL) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "%s: ctx is NULL; pass a live llama_context", fn);
    }
    if (n_cells == NULL) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "%s: n_cells is NULL; pass where to store the count",
                              fn);
    }
    if (capacity < 0) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "%s: capacity is %d; it must be >= 0", fn,
                              (int) capacity);
    }
    struct llama_context * lctx = (struct llama_context *) ctx;
    const int32_t n =
        llama_edgemerge_kv_cells_get(lctx, seq_id, capacity, cell, pos, span_min, span_max, bias);
    if (n < 0) {
        return fail_common(n, fn, lctx, seq_id);
    }
    *n_cells = n;
    edgemerge_clear_error();
    return EDGEMERGE_OK;
}

/* Position of `cell` in sequence seq_id, or -1 if it is not there; only for messages. */
static int32_t cell_position(struct llama_context * lctx, int32_t seq_id, uint32_t cell) {
    const int32_t n = llama_edgemerge_kv_cells_get(lctx, seq_id, 0, NULL, NULL, NULL, NULL, NULL);
    if (n <= 0) {
        return -1;
    }
    uint32_t * cells = malloc(sizeof(uint32_t) * (size_t) n);
    int32_t * positions = malloc(sizeof(int32_t) * (size_t) n);
    int32_t found = -1;
    if (cells != NULL && positions != NULL &&
        llama_edgemerge_kv_cells_get(lctx, seq_id, n, cells, positions, NULL, NULL, NULL) == n) {
        for (int32_t i = 0; i < n; ++i) {
            if (cells[i] == cell) {
                found = positions[i];
                break;
            }
        }
    }
    free(cells);
    free(positions);
    return found;
}

int edgemerge_kv_cell_set(void * ctx, int32_t seq_id, uint32_t cell, float bias, int32_t span_min,
                          int32_t span_max) {
    static const char fn[] = "edgemerge_kv_cell_set";
    if (ctx == NULL) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "%s: ctx is NULL; pass a live llama_context", fn);
    }
    struct llama_context * lctx = (struct llama_context *) ctx;
    const int32_t rc = llama_edgemerge_kv_cell_set(lctx, seq_id, cell, bias, span_min, span_max);
    switch (rc) {
        case 0:
            edgemerge_clear_error();
            return EDGEMERGE_OK;
        case LLAMA_EDGEMERGE_KV_ERR_CELL:
            return edgemerge_fail(EDGEMERGE_ERANGE,
                                  "%s: cell index %u is outside the KV cache, which has %u cells "
                                  "per sequence stream",
                                  fn, cell, llama_n_ctx_seq(lctx));
        case LLAMA_EDGEMERGE_KV_ERR_NOT_IN_SEQ:
            return edgemerge_fail(EDGEMERGE_EINVAL,
                                  "%s: cell %u is not part of sequence %d (it is empty or holds "
                                  "other sequences); list the sequence's cells to find its indices",
                                  fn, cell, seq_id);
        case LLAMA_EDGEMERGE_KV_ERR_BIAS:
            return edgemerge_fail(EDGEMERGE_EINVAL,
                                  "%s: bias %g is not allowed; it must be finite and within "
                                  "+-65504 (the f16 range of the flash-attention mask)",
                                  fn, (double) bias);
        case LLAMA_EDGEMERGE_KV_ERR_SPAN:
            return edgemerge_fail(EDGEMERGE_EINVAL,
                                  "%s: span [%d, %d] of cell %u must satisfy "
                                  "0 <= span_min <= pos <= span_max, and the cell's pos is %d",
                                  fn, (int) span_min, (int) span_max, cell,
                                  (int) cell_position(lctx, seq_id, cell));
        default:
            return fail_common(rc, fn, lctx, seq_id);
    }
}
