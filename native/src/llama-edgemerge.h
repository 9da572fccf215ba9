// Hooks that edgemerge's patches call from inside llama.cpp's own files.
//
// The patched files include this header (it is on the llama target's include path)
// and make one call where llama.cpp has to hand over; what the call does lives in
// native/src, so a rebase of the patch series only has to keep the call sites.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

class llama_io_read_i;
class llama_io_write_i;
class llama_kv_cells;

// native/patches/0004-kv-state-merge-section.patch, implemented in native/src/kv_state.cpp.
//
// A stream block of a saved state is cell_count, the per-cell meta, then u32 v_trans.
// When some written cell is merged, an optional section sits between the meta and
// v_trans:
//     u32 tag = EDGEMERGE_STATE_TAG ("EGM1")
//     u32 n   = cell_count of the block
//     n x { f32 bias; i32 span_min; i32 span_max }   (in meta order, absolute)
// The tag can never be a valid v_trans (0 or 1), so states written before the patch,
// and states without a merged cell (still written in exactly the stock format), load
// as before.

// Writes the section for the cells of `ranges` ([from, to) pairs, the order of
// state_write_meta), or nothing when none of them is merged.
void edgemerge_kv_state_write(llama_io_write_i & io, const llama_kv_cells & cells,
                              const std::vector<std::pair<uint32_t, uint32_t>> & ranges);

// Called with the u32 just read where v_trans belongs. If it is the tag, reads the
// section into the restored cells `idxs` (state_read_meta has placed them) and then the
// real v_trans into `v_trans`. Returns false, after logging why, when the section is
// invalid (wrong count, bias not finite or beyond EDGEMERGE_BIAS_MAX, span not
// containing pos); the restore then fails.
bool edgemerge_kv_state_read(llama_io_read_i & io, llama_kv_cells & cells, const std::vector<uint32_t> & idxs,
                             uint32_t cell_count, uint32_t & v_trans);
