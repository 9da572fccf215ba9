// The optional section of merged cells in a saved state (format: llama-edgemerge.h).
//
// Bias and span are written as absolute values, not as the offsets the cells keep, so
// the section does not depend on how llama_kv_cell_merge stores them.

#include "llama-edgemerge.h"

#include "edgemerge.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cells.h"

#include <cmath>

void edgemerge_kv_state_write(llama_io_write_i & io, const llama_kv_cells & cells,
                              const std::vector<std::pair<uint32_t, uint32_t>> & ranges) {
    uint32_t n_cells   = 0;
    bool     any_merge = false;
    for (const auto & range : ranges) {
        for (uint32_t i = range.first; i < range.second; ++i) {
            n_cells++;
            any_merge = any_merge || !cells.merge_get(i).is_default();
        }
    }
    // without a merged cell the state keeps llama.cpp's own format
    if (!any_merge) {
        return;
    }

    const uint32_t tag = EDGEMERGE_STATE_TAG;
    io.write(&tag, sizeof(tag));
    io.write(&n_cells, sizeof(n_cells));
    for (const auto & range : ranges) {
        for (uint32_t i = range.first; i < range.second; ++i) {
            const llama_kv_cell_merge & m = cells.merge_get(i);
            const llama_pos pos      = cells.pos_get(i);
            const llama_pos span_min = pos - m.span_lo;
            const llama_pos span_max = pos + m.span_hi;
            io.write(&m.bias, sizeof(m.bias));
            io.write(&span_min, sizeof(span_min));
            io.write(&span_max, sizeof(span_max));
        }
    }
}

bool edgemerge_kv_state_read(llama_io_read_i & io, llama_kv_cells & cells, const std::vector<uint32_t> & idxs,
                             uint32_t cell_count, uint32_t & v_trans) {
    if (v_trans != (uint32_t) EDGEMERGE_STATE_TAG) {
        return true;
    }

    uint32_t n_cells;
    io.read(&n_cells, sizeof(n_cells));
    if (n_cells != cell_count) {
        LLAMA_LOG_ERROR("%s: merge section holds %u cells, the state holds %u\n", __func__, n_cells, cell_count);
        return false;
    }

    for (uint32_t i = 0; i < cell_count; ++i) {
        float     bias;
        llama_pos span_min;
        llama_pos span_max;
        io.read(&bias, sizeof(bias));
        io.read(&span_min, sizeof(span_min));
        io.read(&span_max, sizeof(span_max));

        const uint32_t  idx = idxs[i];
        const llama_pos pos = cells.pos_get(idx);
        if (!std::isfinite(bias) || std::fabs(bias) > (float) EDGEMERGE_BIAS_MAX || span_min < 0 || span_min > pos ||
            span_max < pos) {
            LLAMA_LOG_ERROR("%s: invalid merge data for the cell at pos %d: bias %g, span [%d, %d]\n", __func__, pos,
                            bias, span_min, span_max);
            return false;
        }
        cells.merge_set(idx, { bias, pos - span_min, span_max - pos });
    }

    io.read(&v_trans, sizeof(v_trans));
    return true;
}
