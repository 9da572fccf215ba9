/*
 * edgemerge.h: edgemerge's flat C API.
 *
 * Everything declared here is compiled from native/src into edgemerge's patched
 * libllama (CMakeLists.txt), next to the llama.cpp code it reads, so a call crosses
 * no further layer: the function that validates an argument is the one that knows
 * why it is wrong and says so.
 *
 * The Python bindings (edgemerge/native/__init__.py, cffi ABI mode) read their cdef from the
 * text between the CDEF markers below, so that block must stay plain C declarations:
 * no macros, no preprocessor lines, no inline code. Constants the Python layer needs
 * are enum members there, so that they are written once.
 *
 * Conventions: functions return 0 on success and a negative EDGEMERGE_E* code on
 * failure; edgemerge_last_error() then describes the failure for the calling thread.
 * No function aborts the process on bad input.
 */
#ifndef EDGEMERGE_H
#define EDGEMERGE_H

#if defined(_WIN32)
#  define EDGEMERGE_API __declspec(dllexport)
#else
#  define EDGEMERGE_API __attribute__((visibility("default")))
#endif

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* EDGEMERGE_CDEF_BEGIN */
enum edgemerge_status {
    EDGEMERGE_OK = 0,
    EDGEMERGE_EINVAL = -1,
    EDGEMERGE_ERANGE = -2,
    EDGEMERGE_ENOMEM = -3,
    EDGEMERGE_EBACKEND = -4
};

/* Limits and tags that the C code and the Python layer share. */
enum edgemerge_limits {
    /* Largest |bias| of a KV cell: under flash attention the KQ mask is f16, whose
     * largest finite value is 65504 (an integer, so it can be an enum member). */
    EDGEMERGE_BIAS_MAX = 65504,
    /* Tag of the optional section of merged cells in a saved state's stream block:
     * "EGM1" as little-endian bytes (native/src/kv_state.cpp, edgemerge/native/kvstate.py). */
    EDGEMERGE_STATE_TAG = 0x314d4745
};

/* edgemerge's version, e.g. "0.1.0": its presence in libllama proves that the patched
 * library, not a stock one, is the one loaded. */
EDGEMERGE_API const char * edgemerge_version(void);

/* Message for the last failed call on this thread ("" if none). */
EDGEMERGE_API const char * edgemerge_last_error(void);

/* Flags of edgemerge_merge_rows and edgemerge_kv_merge (the values of ggml's
 * GGML_MERGE_ROWS_*, checked at compile time in native/src/merge_rows_api.c). */
enum edgemerge_merge_flags {
    EDGEMERGE_MERGE_MAGNITUDE = 1, /* unit-direction mean times mean norm, per head */
    EDGEMERGE_MERGE_SLERP = 2      /* two-member groups: spherical interpolation */
};

/* Run GGML_OP_MERGE_ROWS once on the ggml backend `backend` ("CPU", "CUDA0", ...).
 *
 *   rows: n_rows rows of n_embd elements of ggml type `type` (f32=0, f16=1, q4_0=2,
 *         q8_0=8, bf16=30), in ggml's row layout (ggml_row_size(type, n_embd) bytes each)
 *   idx:  int32[n_src]           row of each member; groups stored back to back
 *   w:    float[n_src][n_head]   weight of each member for each head
 *   offs: int32[n_group + 1]     group g has members offs[g] .. offs[g+1]-1 (non-empty)
 *   out:  float[n_group][n_embd] merged rows
 *
 * n_embd = n_head * head_dim. Returns EDGEMERGE_OK, EDGEMERGE_EINVAL (bad shape, type,
 * offsets or a non-finite weight), EDGEMERGE_ERANGE (a member outside the rows) or
 * EDGEMERGE_EBACKEND (no such backend, or it does not support the op). */
EDGEMERGE_API int edgemerge_merge_rows(const char * backend, int type, const void * rows,
                                       int64_t n_embd, int64_t n_rows, const int32_t * idx,
                                       int64_t n_src, const float * w, const int32_t * offs,
                                       int64_t n_group, int32_t n_head, int32_t flags,
                                       float * out);

/* edgemerge_merge_rows, then n_iter more runs of the compute alone (inputs stay on the
 * backend), reporting the mean seconds per run: the kernel benchmark's entry point.
 * n_threads > 0 sets the backend's threads (as llama.cpp sets them from its context);
 * 0 keeps the backend's default (ggml's CPU backend: 4, however many cores there are). */
EDGEMERGE_API int edgemerge_merge_rows_bench(const char * backend, int type, const void * rows,
                                             int64_t n_embd, int64_t n_rows,
                                             const int32_t * idx, int64_t n_src,
                                             const float * w, const int32_t * offs,
                                             int64_t n_group, int32_t n_head, int32_t flags,
                                             float * out, int32_t n_iter, int32_t n_threads,
                                             double * seconds_per_iter);
/* Per-cell metadata of the patched KV cache (native/patches/0002-0003): every cell has an
 * attention bias added to its KQ-mask entry (0 by default) and the span
 * [span_min, span_max] of positions it covers (default: its own position).
 * `ctx` is a `struct llama_context *` (llama-cpp-python: `Llama._ctx.ctx`). For models
 * with sliding-window layers the full-attention cache is addressed. */

/* The cells of sequence seq_id, ordered by position: fills the first
 * min(*n_cells, capacity) entries of each non-NULL array and sets *n_cells to the number
 * of cells in the sequence (call with capacity 0 to size the arrays). Returns
 * EDGEMERGE_OK or EDGEMERGE_EINVAL (NULL ctx or n_cells, capacity < 0, seq_id outside
 * [0, n_seq_max), or a context without a KV cache). */
EDGEMERGE_API int edgemerge_kv_cells_list(void * ctx, int32_t seq_id, int32_t capacity,
                                          uint32_t * cell, int32_t * pos, int32_t * span_min,
                                          int32_t * span_max, float * bias, int32_t * n_cells);

/* Set the bias and span of cell `cell` of sequence seq_id (shared by every sequence
 * that holds the cell). Returns EDGEMERGE_OK, EDGEMERGE_ERANGE (cell index outside the
 * cache) or EDGEMERGE_EINVAL (unknown sequence, cell not in the sequence, bias not
 * finite or beyond +-EDGEMERGE_BIAS_MAX, span not 0 <= span_min <= pos <= span_max); on error
 * nothing changes. */
EDGEMERGE_API int edgemerge_kv_cell_set(void * ctx, int32_t seq_id, uint32_t cell, float bias,
                                        int32_t span_min, int32_t span_max);

/* Shape of the mergeable (full-attention) cache: layers, KV heads, head sizes of K and V,
 * cells; layer_ids (may be NULL) gets the model layer of each cache layer. */
EDGEMERGE_API int edgemerge_kv_shape(void * ctx, int32_t * n_layer, int32_t * n_head_kv,
                                     int32_t * head_dim_k, int32_t * head_dim_v,
                                     int32_t * n_cells, int32_t * layer_ids,
                                     int32_t layer_ids_capacity);

/* Planning features of n_cells cells of seq_id (cells in position order), computed on the
 * cache's backend (native/src/kv_merge.cpp):
 *   k_sim  float[n_layer][n_head_kv][n_cells-1]  cosine of adjacent keys, centred on the
 *                                                cells' mean key when centre != 0
 *   k_norm, v_norm float[n_layer][n_head_kv][n_cells]
 * Any output may be NULL. Returns EDGEMERGE_OK, EDGEMERGE_ERANGE (a cell outside the
 * cache), EDGEMERGE_EINVAL (unknown sequence, a cell not in it, fewer than 2 cells) or
 * EDGEMERGE_EBACKEND. */
EDGEMERGE_API int edgemerge_kv_features(void * ctx, int32_t seq_id, int32_t n_cells,
                                        const uint32_t * cells, int32_t centre, float * k_sim,
                                        float * k_norm, float * v_norm);

/* Merge groups of cells of seq_id in place on the cache's backend. Group g: members
 * src[offs[g]] .. src[offs[g+1]-1] (offs[0] == 0, non-empty), destination dst[g] (a
 * member), weights w_k/w_v float[n_layer][n_src][n_head_kv] (NULL: equal weights), new
 * bias[g] and span [span[2g], span[2g+1]] covering every member's span. flags_k/flags_v:
 * EDGEMERGE_MERGE_*. The other members are freed. Errors change nothing:
 * EDGEMERGE_ERANGE (cell outside the cache), EDGEMERGE_EINVAL (unknown sequence, cell
 * not in it or shared with another, empty or overlapping group, destination not a member,
 * non-finite weight or bias, span too small), EDGEMERGE_EBACKEND (graph failed). */
EDGEMERGE_API int edgemerge_kv_merge(void * ctx, int32_t seq_id, int32_t n_group,
                                     const uint32_t * dst, const int32_t * offs,
                                     const uint32_t * src, const float * w_k, const float * w_v,
                                     const float * bias, const int32_t * span, int32_t flags_k,
                                     int32_t flags_v);

/* Capture of post-RoPE queries while the context decodes (recall). While armed, the
 * context's graph evaluation callback (native/src/query_capture.c) copies the query of every
 * layer ("Qcur-<il>" after RoPE, f32 [head_dim, n_head, n_tokens]) into a per-layer ring
 * of the last `window` tokens; nothing else leaves the backend. One capture per context;
 * arm it only around the decodes whose queries are wanted, and free it before the
 * context. */
typedef struct edgemerge_qcapture edgemerge_qcapture;

/* n_layer: the model's layers; n_head: query heads; head_dim: query head size. Returns
 * EDGEMERGE_OK, EDGEMERGE_EINVAL (NULL ctx/out, a size < 1, window > 65536) or
 * EDGEMERGE_ENOMEM. */
EDGEMERGE_API int edgemerge_qcapture_new(void * ctx, int32_t n_layer, int32_t n_head,
                                         int32_t head_dim, int32_t window,
                                         edgemerge_qcapture ** out);

/* on != 0: empty the rings and install the callback; on == 0: remove it. */
EDGEMERGE_API int edgemerge_qcapture_arm(edgemerge_qcapture * qc, int32_t on);

/* Queries captured since arming, oldest first:
 *   out      float[n_layer][window][n_head][head_dim]  (rows past n_tokens[il] untouched)
 *   n_tokens int32[n_layer]                            tokens captured per layer (<= window)
 * Returns EDGEMERGE_OK, or EDGEMERGE_EINVAL if a query tensor had an unexpected shape. */
EDGEMERGE_API int edgemerge_qcapture_read(edgemerge_qcapture * qc, float * out,
                                          int32_t * n_tokens);

EDGEMERGE_API void edgemerge_qcapture_free(edgemerge_qcapture * qc);
/* EDGEMERGE_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* EDGEMERGE_H */
