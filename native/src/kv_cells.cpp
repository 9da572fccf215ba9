// Per-cell bias and span of the patched KV cache (native/patches/0002-0003): listing the
// cells of a sequence and setting one cell's metadata.
//
// Validation happens here, where the cells are, so every message names the offending
// value and the valid range.

#include "edgemerge.h"
#include "edgemerge_internal.h"
#include "llama_access.h"

#include <cmath>

namespace {

int fail_no_seq(const char * fn, const llama_context * lctx, int32_t seq_id) {
    return edgemerge_fail(EDGEMERGE_EINVAL,
                          "%s: sequence %d does not exist; this context has %u sequence(s), "
                          "ids 0..%u (set n_seq_max when creating it for more)",
                          fn, seq_id, llama_n_seq_max(lctx), llama_n_seq_max(lctx) - 1);
}

int fail_no_cache(const char * fn) {
    return edgemerge_fail(EDGEMERGE_EINVAL,
                          "%s: this context's memory is not an attention KV cache "
                          "(recurrent or hybrid model), so it has no cells to address",
                          fn);
}

}  // namespace

int edgemerge_kv_cells_list(void * ctx, int32_t seq_id, int32_t capacity, uint32_t * cell, int32_t * pos,
                            int32_t * span_min, int32_t * span_max, float * bias, int32_t * n_cells) {
    static const char fn[] = "edgemerge_kv_cells_list";
    if (ctx == nullptr) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "%s: ctx is NULL; pass a live llama_context", fn);
    }
    if (n_cells == nullptr) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "%s: n_cells is NULL; pass where to store the count", fn);
    }
    if (capacity < 0) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "%s: capacity is %d; it must be >= 0", fn, (int) capacity);
    }
    auto * lctx = static_cast<llama_context *>(ctx);
    const llama_kv_cache * kv = edgemerge_access::mergeable_cache(lctx);
    if (kv == nullptr) {
        return fail_no_cache(fn);
    }
    if (!edgemerge_access::has_seq(*kv, seq_id)) {
        return fail_no_seq(fn, lctx, seq_id);
    }

    const llama_kv_cells & cells = edgemerge_access::cells(*kv, seq_id);
    // seq_pos_get is ordered by position, then cell index
    int32_t n = 0;
    for (const auto & [p, i] : cells.seq_pos_get(seq_id)) {
        if (n < capacity) {
            const llama_kv_cell_merge & m = cells.merge_get(i);
            if (cell)     { cell[n]     = i; }
            if (pos)      { pos[n]      = p; }
            if (span_min) { span_min[n] = p - m.span_lo; }
            if (span_max) { span_max[n] = p + m.span_hi; }
            if (bias)     { bias[n]     = m.bias; }
        }
        n++;
    }
    *n_cells = n;
    edgemerge_clear_error();
    return EDGEMERGE_OK;
}

int edgemerge_kv_cell_set(void * ctx, int32_t seq_id, uint32_t cell, float bias, int32_t span_min,
                          int32_t span_max) {
    static const char fn[] = "edgemerge_kv_cell_set";
    if (ctx == nullptr) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "%s: ctx is NULL; pass a live llama_context", fn);
    }
    auto * lctx = static_cast<llama_context *>(ctx);
    llama_kv_cache * kv = edgemerge_access::mergeable_cache(lctx);
    if (kv == nullptr) {
        return fail_no_cache(fn);
    }
    if (!edgemerge_access::has_seq(*kv, seq_id)) {
        return fail_no_seq(fn, lctx, seq_id);
    }

    llama_kv_cells & cells = edgemerge_access::cells(*kv, seq_id);
    if (cell >= cells.size()) {
        return edgemerge_fail(EDGEMERGE_ERANGE,
                              "%s: cell index %u is outside the KV cache, which has %u cells "
                              "per sequence stream",
                              fn, cell, llama_n_ctx_seq(lctx));
    }
    if (cells.is_empty(cell) || !cells.seq_has(cell, seq_id)) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "%s: cell %u is not part of sequence %d (it is empty or holds "
                              "other sequences); list the sequence's cells to find its indices",
                              fn, cell, seq_id);
    }
    if (!std::isfinite(bias) || std::fabs(bias) > (float) EDGEMERGE_BIAS_MAX) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "%s: bias %g is not allowed; it must be finite and within "
                              "+-%d (the f16 range of the flash-attention mask)",
                              fn, (double) bias, (int) EDGEMERGE_BIAS_MAX);
    }
    const llama_pos p = cells.pos_get(cell);
    if (span_min < 0 || span_min > p || span_max < p) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "%s: span [%d, %d] of cell %u must satisfy "
                              "0 <= span_min <= pos <= span_max, and the cell's pos is %d",
                              fn, (int) span_min, (int) span_max, cell, (int) p);
    }

    cells.merge_set(cell, { bias, p - span_min, span_max - p });
    edgemerge_clear_error();
    return EDGEMERGE_OK;
}
