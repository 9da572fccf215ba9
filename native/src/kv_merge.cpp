// In-cache KV merging: the cache's shape, planning features and the merge call.
//
// Compiled into llama.cpp's `llama` target by edgemerge's CMakeLists and reaching the
// cache through edgemerge_access (llama_access.h). Both graph calls build a small ggml
// graph over the cache's own tensors and run it through the context's scheduler, as
// llama.cpp's K-shift does, so the cache never travels through the host and backends
// without an op fall back through ggml's scheduler.

#include "edgemerge.h"
#include "edgemerge_internal.h"
#include "llama_access.h"

#include "llama-graph.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace {

struct merge_args {
    llama_seq_id       seq_id;
    int32_t            n_group;
    const uint32_t   * dst;
    const int32_t    * offs;
    const uint32_t   * src;
    const float      * w_k;
    const float      * w_v;
    const float      * bias;
    const llama_pos  * span;
    int32_t            flags_k;
    int32_t            flags_v;
};

struct feature_args {
    llama_seq_id       seq_id;
    int32_t            n_cells;
    const uint32_t   * cells;
    bool               centre;
    float            * k_sim;
    float            * k_norm;
    float            * v_norm;
};

constexpr float kNormEps = 1e-12f;

// A view of a K or V cache tensor of one stream as rows of one element each,
// the layout llama.cpp itself uses to write a transposed V cache.
ggml_tensor * element_rows(ggml_context * ctx, ggml_tensor * t) {
    return ggml_reshape_2d(ctx, t, 1, ggml_nelements(t));
}

// Whether the backend that holds `cache` runs MERGE_ROWS over it in place. Where it does
// not (Metal, Vulkan, ...), ggml's scheduler would run the op on the CPU and copy its
// first input, the whole per-layer cache, to the host on every merge. The probe node is
// built in a scratch context so the graph's own context is not spent on it.
// EDGEMERGE_MERGE_GATHER=1 forces the gathered path (how the tests exercise it on the CPU).
bool merge_in_place(const ggml_tensor * cache, int64_t n_embd, int32_t n_head) {
    const char * force = getenv("EDGEMERGE_MERGE_GATHER");
    if (force && force[0] == '1') {
        return false;
    }
    ggml_backend_dev_t dev = cache->buffer ? ggml_backend_buft_get_device(ggml_backend_buffer_get_type(cache->buffer))
                                           : nullptr;
    if (dev == nullptr) {
        return false;
    }
    ggml_init_params ip = { ggml_tensor_overhead() * 6, nullptr, true };
    ggml_context * pctx = ggml_init(ip);
    ggml_tensor * rows = ggml_new_tensor_2d(pctx, cache->type, n_embd, 2);
    ggml_tensor * idx  = ggml_new_tensor_1d(pctx, GGML_TYPE_I32, 2);
    ggml_tensor * w    = ggml_new_tensor_2d(pctx, GGML_TYPE_F32, n_head, 2);
    ggml_tensor * offs = ggml_new_tensor_1d(pctx, GGML_TYPE_I32, 2);
    const bool ok = ggml_backend_dev_supports_op(dev, ggml_merge_rows(pctx, rows, idx, w, offs, n_head, 0));
    ggml_free(pctx);
    return ok;
}

// Per-layer sizes of a cache whose layers all share head count and head sizes (the only
// kind merging supports).
struct kv_dims {
    int32_t n_layer = 0, n_head = 0, hd_k = 0, hd_v = 0;
};

enum class shape_rc { ok, empty, layout };

shape_rc shape_of(const llama_kv_cache & kv, kv_dims & d) {
    const auto & layers  = edgemerge_access::layers(kv);
    const auto & hparams = edgemerge_access::hparams(kv);
    if (layers.empty()) {
        return shape_rc::empty;
    }
    const uint32_t il0 = layers[0].il;
    for (const auto & layer : layers) {
        if (hparams.n_head_kv(layer.il) != hparams.n_head_kv(il0) ||
            hparams.n_embd_k_gqa(layer.il) != hparams.n_embd_k_gqa(il0) ||
            hparams.n_embd_v_gqa(layer.il) != hparams.n_embd_v_gqa(il0) || layer.v == nullptr ||
            layer.v->ne[0] != (int64_t) hparams.n_embd_v_gqa(layer.il)) {
            return shape_rc::layout;
        }
    }
    d.n_layer = (int32_t) layers.size();
    d.n_head  = (int32_t) hparams.n_head_kv(il0);
    d.hd_k    = (int32_t) hparams.n_embd_k_gqa(il0) / d.n_head;
    d.hd_v    = (int32_t) hparams.n_embd_v_gqa(il0) / d.n_head;
    return shape_rc::ok;
}

// Row index of a cell of one stream in the per-layer tensors viewed as [n_embd, n_stream * kv_size].
struct stream_view {
    int64_t kv_size;
    int64_t stream;
    int64_t row(uint32_t cell) const { return stream * kv_size + cell; }
};

// Starts a graph of our own on the context's scheduler, as the K-shift does: the
// context's reserve result is reused, and graph reuse of the next decode is dropped.
struct own_graph {
    ggml_backend_sched_t sched;
    ggml_context * ctx;
    ggml_cgraph  * gf;
};

own_graph begin_graph(llama_context * lctx) {
    llama_synchronize(lctx);
    edgemerge_access::drop_graph_reuse(*lctx);
    auto * sched = lctx->get_sched();
    ggml_backend_sched_reset(sched);
    auto * res = lctx->get_gf_res_reserve();
    res->reset();
    return { sched, res->get_ctx(), res->get_gf() };
}

int features(llama_context * lctx, const llama_kv_cache & kv, const feature_args & a) {
    kv_dims d;
    if (shape_of(kv, d) != shape_rc::ok) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "kv_features: the cache layers differ in head count or size; not supported");
    }
    if (!edgemerge_access::has_seq(kv, a.seq_id)) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "kv_features: seq_id %d is not in [0, %u)", a.seq_id,
                              edgemerge_access::n_seq_max(kv));
    }
    if (a.n_cells < 2 || a.cells == nullptr) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "kv_features: need at least 2 cells, got %d", a.n_cells);
    }
    const auto & cells = edgemerge_access::cells(kv, a.seq_id);
    for (int32_t i = 0; i < a.n_cells; ++i) {
        const uint32_t c = a.cells[i];
        if (c >= cells.size()) {
            return edgemerge_fail(EDGEMERGE_ERANGE, "kv_features: cell %u is outside the cache (%u cells)", c,
                                  cells.size());
        }
        if (cells.is_empty(c) || !cells.seq_has(c, a.seq_id)) {
            return edgemerge_fail(EDGEMERGE_EINVAL, "kv_features: cell %u is not in sequence %d", c, a.seq_id);
        }
    }

    const own_graph og = begin_graph(lctx);
    ggml_context * ctx = og.ctx;
    const bool v_trans = edgemerge_access::v_trans(kv);
    const int32_t n_head = d.n_head, hd_k = d.hd_k, hd_v = d.hd_v;

    const stream_view sv{ (int64_t) kv.get_size(), (int64_t) edgemerge_access::stream(kv, a.seq_id) };
    const int64_t n = a.n_cells;
    const int64_t n_embd_v = (int64_t) hd_v * n_head;

    ggml_tensor * idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    ggml_set_input(idx);
    ggml_tensor * vidx = nullptr;
    if (v_trans) {
        vidx = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n * n_embd_v);
        ggml_set_input(vidx);
    }

    struct outputs { ggml_tensor * sim; ggml_tensor * kn; ggml_tensor * vn; };
    std::vector<outputs> outs;

    for (const auto & layer : edgemerge_access::layers(kv)) {
        ggml_tensor * k2d = ggml_reshape_2d(ctx, layer.k, layer.k->ne[0], layer.k->ne[1] * layer.k->ne[2]);
        ggml_tensor * k = ggml_get_rows(ctx, k2d, idx);                        // f32 [n_embd_k, n]
        k = ggml_reshape_3d(ctx, k, hd_k, n_head, n);
        outputs o{ nullptr, nullptr, nullptr };

        ggml_tensor * kc = k;
        if (a.centre) {
            // mean over the cells per layer and head: bring the cell axis to the front
            ggml_tensor * kt = ggml_cont(ctx, ggml_permute(ctx, k, 1, 2, 0, 3));  // [n, hd, n_head]
            ggml_tensor * mu = ggml_reshape_3d(ctx, ggml_mean(ctx, kt), hd_k, n_head, 1);
            kc = ggml_sub(ctx, k, mu);
        }
        ggml_tensor * u = ggml_l2_norm(ctx, kc, kNormEps);
        ggml_tensor * u0 = ggml_view_3d(ctx, u, hd_k, n_head, n - 1, u->nb[1], u->nb[2], 0);
        ggml_tensor * u1 = ggml_view_3d(ctx, u, hd_k, n_head, n - 1, u->nb[1], u->nb[2], u->nb[2]);
        o.sim = ggml_sum_rows(ctx, ggml_mul(ctx, u0, u1));                     // [1, n_head, n-1]
        o.kn = ggml_sqrt(ctx, ggml_sum_rows(ctx, ggml_sqr(ctx, k)));             // [1, n_head, n]

        ggml_tensor * v;
        if (v_trans) {
            v = ggml_get_rows(ctx, element_rows(ctx, layer.v), vidx);          // [1, n*n_embd_v]
        } else {
            ggml_tensor * v2d = ggml_reshape_2d(ctx, layer.v, layer.v->ne[0], layer.v->ne[1] * layer.v->ne[2]);
            v = ggml_get_rows(ctx, v2d, idx);
        }
        v = ggml_reshape_3d(ctx, v, hd_v, n_head, n);
        o.vn = ggml_sqrt(ctx, ggml_sum_rows(ctx, ggml_sqr(ctx, v)));

        // [1, n_head, m] with heads fastest -> [m, n_head], cells fastest, as the API promises
        for (ggml_tensor ** t : { &o.sim, &o.kn, &o.vn }) {
            *t = ggml_cont(ctx, ggml_transpose(ctx, ggml_reshape_2d(ctx, *t, n_head, (*t)->ne[2])));
            ggml_set_output(*t);
            ggml_build_forward_expand(og.gf, *t);
        }
        outs.push_back(o);
    }

    if (!ggml_backend_sched_alloc_graph(og.sched, og.gf)) {
        return edgemerge_fail(EDGEMERGE_EBACKEND, "kv_features: could not allocate the graph");
    }
    std::vector<int32_t> rows(n);
    for (int64_t i = 0; i < n; ++i) {
        rows[i] = (int32_t) sv.row(a.cells[i]);
    }
    ggml_backend_tensor_set(idx, rows.data(), 0, ggml_nbytes(idx));
    if (vidx) {
        // element e of cell c of stream s sits at s*kv_size*n_embd_v + e*kv_size + c
        std::vector<int32_t> vr(n * n_embd_v);
        for (int64_t i = 0; i < n; ++i) {
            for (int64_t e = 0; e < n_embd_v; ++e) {
                vr[i * n_embd_v + e] = (int32_t) (sv.stream * sv.kv_size * n_embd_v + e * sv.kv_size + a.cells[i]);
            }
        }
        ggml_backend_tensor_set(vidx, vr.data(), 0, ggml_nbytes(vidx));
    }
    if (lctx->graph_compute(og.gf, false) != GGML_STATUS_SUCCESS) {
        return edgemerge_fail(EDGEMERGE_EBACKEND, "kv_features: graph compute failed");
    }
    ggml_backend_sched_synchronize(og.sched);

    const size_t per_sim = (size_t) n_head * (n - 1), per_norm = (size_t) n_head * n;
    for (size_t il = 0; il < outs.size(); ++il) {
        if (a.k_sim)  { ggml_backend_tensor_get(outs[il].sim, a.k_sim  + il * per_sim,  0, per_sim  * sizeof(float)); }
        if (a.k_norm) { ggml_backend_tensor_get(outs[il].kn,  a.k_norm + il * per_norm, 0, per_norm * sizeof(float)); }
        if (a.v_norm) { ggml_backend_tensor_get(outs[il].vn,  a.v_norm + il * per_norm, 0, per_norm * sizeof(float)); }
    }
    return EDGEMERGE_OK;
}

// Checks every group before anything changes, so an error leaves the cache as it was.
int validate_groups(const llama_kv_cache & kv, const merge_args & a, const kv_dims & d) {
    if (!edgemerge_access::has_seq(kv, a.seq_id)) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "kv_merge: seq_id %d is not in [0, %u)", a.seq_id,
                              edgemerge_access::n_seq_max(kv));
    }
    if (a.n_group <= 0 || !a.dst || !a.offs || !a.src || !a.bias || !a.span) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "kv_merge: need n_group > 0 (got %d) and non-NULL dst, offs, src, bias and span",
                              a.n_group);
    }
    if (a.offs[0] != 0) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "kv_merge: offs[0] must be 0, got %d", a.offs[0]);
    }
    const auto & cells = edgemerge_access::cells(kv, a.seq_id);
    const int32_t n_src = a.offs[a.n_group];
    std::vector<uint8_t> seen(cells.size(), 0);
    for (int32_t g = 0; g < a.n_group; ++g) {
        if (a.offs[g + 1] <= a.offs[g]) {
            return edgemerge_fail(EDGEMERGE_EINVAL, "kv_merge: group %d is empty", g);
        }
        bool has_dst = false;
        llama_pos lo = 0, hi = 0;
        for (int32_t j = a.offs[g]; j < a.offs[g + 1]; ++j) {
            const uint32_t c = a.src[j];
            if (c >= cells.size()) {
                return edgemerge_fail(EDGEMERGE_ERANGE, "kv_merge: group %d: cell %u is outside the cache (%u cells)",
                                      g, c, cells.size());
            }
            if (cells.is_empty(c) || !cells.seq_has(c, a.seq_id)) {
                return edgemerge_fail(EDGEMERGE_EINVAL, "kv_merge: group %d: cell %u is not in sequence %d", g, c,
                                      a.seq_id);
            }
            if (cells.seq_count(c) != 1) {
                return edgemerge_fail(EDGEMERGE_EINVAL, "kv_merge: group %d: cell %u is shared with another sequence",
                                      g, c);
            }
            if (seen[c]) {
                return edgemerge_fail(EDGEMERGE_EINVAL, "kv_merge: cell %u appears in more than one group member", c);
            }
            seen[c] = 1;
            has_dst = has_dst || c == a.dst[g];
            const llama_pos p = cells.pos_get(c);
            const llama_kv_cell_merge & m = cells.merge_get(c);
            lo = j == a.offs[g] ? p - m.span_lo : std::min(lo, p - m.span_lo);
            hi = j == a.offs[g] ? p + m.span_hi : std::max(hi, p + m.span_hi);
        }
        if (!has_dst) {
            return edgemerge_fail(EDGEMERGE_EINVAL, "kv_merge: group %d: destination cell %u is not a member", g,
                                  a.dst[g]);
        }
        if (!std::isfinite(a.bias[g]) || std::fabs(a.bias[g]) > (float) EDGEMERGE_BIAS_MAX) {
            return edgemerge_fail(EDGEMERGE_EINVAL, "kv_merge: group %d: bias %g is not finite or beyond %d", g,
                                  (double) a.bias[g], (int) EDGEMERGE_BIAS_MAX);
        }
        if (a.span[2 * g] > lo || a.span[2 * g + 1] < hi) {
            return edgemerge_fail(EDGEMERGE_EINVAL,
                                  "kv_merge: group %d: span [%d, %d] must contain the members' positions [%d, %d]",
                                  g, a.span[2 * g], a.span[2 * g + 1], lo, hi);
        }
    }
    for (const float * w : { a.w_k, a.w_v }) {
        for (int64_t i = 0; w && i < (int64_t) d.n_layer * n_src * d.n_head; ++i) {
            if (!std::isfinite(w[i])) {
                return edgemerge_fail(EDGEMERGE_EINVAL, "kv_merge: %s weight %lld is not finite",
                                      w == a.w_k ? "key" : "value", (long long) i);
            }
        }
    }
    return EDGEMERGE_OK;
}

int merge(llama_context * lctx, llama_kv_cache & kv, const merge_args & a) {
    kv_dims d;
    if (shape_of(kv, d) != shape_rc::ok) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "kv_merge: the cache layers differ in head count or size; not supported");
    }
    const int rc = validate_groups(kv, a, d);
    if (rc != EDGEMERGE_OK) {
        return rc;
    }
    auto & cells = edgemerge_access::cells(kv, a.seq_id);
    const auto & layers = edgemerge_access::layers(kv);
    const bool v_trans = edgemerge_access::v_trans(kv);
    const int32_t n_layer = d.n_layer, n_head = d.n_head, hd_k = d.hd_k, hd_v = d.hd_v;
    const int32_t n_src = a.offs[a.n_group];

    const own_graph og = begin_graph(lctx);
    ggml_context * ctx = og.ctx;
    ggml_cgraph  * gf  = og.gf;

    const stream_view sv{ (int64_t) kv.get_size(), (int64_t) edgemerge_access::stream(kv, a.seq_id) };
    const int64_t n_embd_v = (int64_t) hd_v * n_head;

    ggml_tensor * t_src  = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_src);
    ggml_tensor * t_dst  = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, a.n_group);
    ggml_tensor * t_offs = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, a.n_group + 1);
    ggml_tensor * t_wk   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_head, n_src, n_layer);
    ggml_tensor * t_wv   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, n_head, n_src, n_layer);
    ggml_tensor * t_vsrc = nullptr, * t_vdst = nullptr, * t_iota = nullptr;
    for (ggml_tensor * t : { t_src, t_dst, t_offs, t_wk, t_wv }) {
        ggml_set_input(t);
    }
    const int64_t n_embd_k = (int64_t) hd_k * n_head;
    const bool k_in_place = merge_in_place(layers[0].k, n_embd_k, n_head);
    const bool v_in_place = !v_trans && merge_in_place(layers[0].v, n_embd_v, n_head);
    if (v_trans) {
        t_vsrc = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_src * n_embd_v);
        t_vdst = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, a.n_group * n_embd_v);
        for (ggml_tensor * t : { t_vsrc, t_vdst }) {
            ggml_set_input(t);
        }
    }
    if (v_trans || !k_in_place || !v_in_place) {
        // members of the gathered rows are 0..n_src-1, in order
        t_iota = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_src);
        ggml_set_input(t_iota);
    }
    // In place: MERGE_ROWS reads the member rows straight from the cache. Gathered: get_rows
    // (which every backend has) pulls the members out first, so a backend without the op
    // hands the CPU only those f32 rows, not the whole cache.
    auto merged = [&](ggml_tensor * rows2d, bool in_place, ggml_tensor * w, int32_t flags) {
        if (in_place) {
            return ggml_merge_rows(ctx, rows2d, t_src, w, t_offs, n_head, flags);
        }
        return ggml_merge_rows(ctx, ggml_get_rows(ctx, rows2d, t_src), t_iota, w, t_offs, n_head, flags);
    };

    for (int32_t il = 0; il < n_layer; ++il) {
        const auto & layer = layers[il];
        ggml_tensor * wk = ggml_view_2d(ctx, t_wk, n_head, n_src, t_wk->nb[1], il * t_wk->nb[2]);
        ggml_tensor * wv = ggml_view_2d(ctx, t_wv, n_head, n_src, t_wv->nb[1], il * t_wv->nb[2]);

        ggml_tensor * k2d = ggml_reshape_2d(ctx, layer.k, layer.k->ne[0], layer.k->ne[1] * layer.k->ne[2]);
        ggml_tensor * mk  = merged(k2d, k_in_place, wk, a.flags_k);
        ggml_build_forward_expand(gf, ggml_set_rows(ctx, k2d, mk, t_dst));

        if (v_trans) {
            ggml_tensor * vel  = element_rows(ctx, layer.v);
            ggml_tensor * rows = ggml_reshape_2d(ctx, ggml_get_rows(ctx, vel, t_vsrc), n_embd_v, n_src);
            ggml_tensor * mv   = ggml_merge_rows(ctx, rows, t_iota, wv, t_offs, n_head, a.flags_v);
            ggml_build_forward_expand(gf, ggml_set_rows(ctx, vel, ggml_reshape_2d(ctx, mv, 1, a.n_group * n_embd_v), t_vdst));
        } else {
            ggml_tensor * v2d = ggml_reshape_2d(ctx, layer.v, layer.v->ne[0], layer.v->ne[1] * layer.v->ne[2]);
            ggml_tensor * mv  = merged(v2d, v_in_place, wv, a.flags_v);
            ggml_build_forward_expand(gf, ggml_set_rows(ctx, v2d, mv, t_dst));
        }
    }

    if (!ggml_backend_sched_alloc_graph(og.sched, gf)) {
        return edgemerge_fail(EDGEMERGE_EBACKEND, "kv_merge: could not allocate the graph");
    }

    std::vector<int32_t> src_rows(n_src), dst_rows(a.n_group);
    for (int32_t j = 0; j < n_src; ++j) {
        src_rows[j] = (int32_t) sv.row(a.src[j]);
    }
    for (int32_t g = 0; g < a.n_group; ++g) {
        dst_rows[g] = (int32_t) sv.row(a.dst[g]);
    }
    ggml_backend_tensor_set(t_src, src_rows.data(), 0, ggml_nbytes(t_src));
    ggml_backend_tensor_set(t_dst, dst_rows.data(), 0, ggml_nbytes(t_dst));
    ggml_backend_tensor_set(t_offs, a.offs, 0, ggml_nbytes(t_offs));

    // equal weights within each group when none are given
    std::vector<float> uniform;
    if (!a.w_k || !a.w_v) {
        uniform.resize((size_t) n_layer * n_src * n_head);
        for (int32_t il = 0; il < n_layer; ++il) {
            for (int32_t g = 0; g < a.n_group; ++g) {
                const float w = 1.0f / (float) (a.offs[g + 1] - a.offs[g]);
                for (int32_t j = a.offs[g]; j < a.offs[g + 1]; ++j) {
                    for (int32_t h = 0; h < n_head; ++h) {
                        uniform[((size_t) il * n_src + j) * n_head + h] = w;
                    }
                }
            }
        }
    }
    ggml_backend_tensor_set(t_wk, a.w_k ? a.w_k : uniform.data(), 0, ggml_nbytes(t_wk));
    ggml_backend_tensor_set(t_wv, a.w_v ? a.w_v : uniform.data(), 0, ggml_nbytes(t_wv));

    if (t_iota) {
        std::vector<int32_t> iota(n_src);
        for (int32_t j = 0; j < n_src; ++j) {
            iota[j] = j;
        }
        ggml_backend_tensor_set(t_iota, iota.data(), 0, ggml_nbytes(t_iota));
    }
    if (v_trans) {
        const int64_t base = sv.stream * sv.kv_size * n_embd_v;
        std::vector<int32_t> vs(n_src * n_embd_v), vd(a.n_group * n_embd_v);
        for (int32_t j = 0; j < n_src; ++j) {
            for (int64_t e = 0; e < n_embd_v; ++e) {
                vs[j * n_embd_v + e] = (int32_t) (base + e * sv.kv_size + a.src[j]);
            }
        }
        for (int32_t g = 0; g < a.n_group; ++g) {
            for (int64_t e = 0; e < n_embd_v; ++e) {
                vd[g * n_embd_v + e] = (int32_t) (base + e * sv.kv_size + a.dst[g]);
            }
        }
        ggml_backend_tensor_set(t_vsrc, vs.data(), 0, ggml_nbytes(t_vsrc));
        ggml_backend_tensor_set(t_vdst, vd.data(), 0, ggml_nbytes(t_vdst));
    }

    if (lctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
        return edgemerge_fail(EDGEMERGE_EBACKEND, "kv_merge: graph compute failed");
    }
    ggml_backend_sched_synchronize(og.sched);

    // the merged rows are in place: free the other members, give the destination its bias and span
    for (int32_t g = 0; g < a.n_group; ++g) {
        for (int32_t j = a.offs[g]; j < a.offs[g + 1]; ++j) {
            if (a.src[j] != a.dst[g]) {
                cells.rm(a.src[j]);
            }
        }
        const llama_pos p = cells.pos_get(a.dst[g]);
        cells.merge_set(a.dst[g], { a.bias[g], p - a.span[2 * g], a.span[2 * g + 1] - p });
    }
    return EDGEMERGE_OK;
}

}  // namespace

int edgemerge_kv_shape(void * ctx, int32_t * n_layer, int32_t * n_head_kv, int32_t * head_dim_k,
                       int32_t * head_dim_v, int32_t * n_cells, int32_t * layer_ids, int32_t layer_ids_capacity) {
    if (ctx == nullptr) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "kv_shape: ctx is NULL; pass a live llama_context");
    }
    const llama_kv_cache * kv = edgemerge_access::mergeable_cache(static_cast<llama_context *>(ctx));
    kv_dims d;
    const shape_rc rc = kv ? shape_of(*kv, d) : shape_rc::empty;
    if (rc == shape_rc::layout) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "kv_shape: the cache layers differ in head count or head size; "
                              "merging supports uniform layers only");
    }
    if (rc != shape_rc::ok) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "kv_shape: this context's memory is not an attention KV cache");
    }
    if (n_layer)    { *n_layer    = d.n_layer; }
    if (n_head_kv)  { *n_head_kv  = d.n_head; }
    if (head_dim_k) { *head_dim_k = d.hd_k; }
    if (head_dim_v) { *head_dim_v = d.hd_v; }
    if (n_cells)    { *n_cells    = (int32_t) kv->get_size(); }
    const auto & layers = edgemerge_access::layers(*kv);
    for (int32_t i = 0; layer_ids && i < layer_ids_capacity && i < (int32_t) layers.size(); ++i) {
        layer_ids[i] = (int32_t) layers[i].il;
    }
    edgemerge_clear_error();
    return EDGEMERGE_OK;
}

int edgemerge_kv_features(void * ctx, int32_t seq_id, int32_t n_cells, const uint32_t * cells, int32_t centre,
                          float * k_sim, float * k_norm, float * v_norm) {
    if (ctx == nullptr) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "kv_features: ctx is NULL; pass a live llama_context");
    }
    auto * lctx = static_cast<llama_context *>(ctx);
    const llama_kv_cache * kv = edgemerge_access::mergeable_cache(lctx);
    if (kv == nullptr) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "kv_features: this context's memory is not an attention KV cache");
    }
    const int rc = features(lctx, *kv, { seq_id, n_cells, cells, centre != 0, k_sim, k_norm, v_norm });
    if (rc == EDGEMERGE_OK) {
        edgemerge_clear_error();
    }
    return rc;
}

int edgemerge_kv_merge(void * ctx, int32_t seq_id, int32_t n_group, const uint32_t * dst, const int32_t * offs,
                       const uint32_t * src, const float * w_k, const float * w_v, const float * bias,
                       const int32_t * span, int32_t flags_k, int32_t flags_v) {
    if (ctx == nullptr) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "kv_merge: ctx is NULL; pass a live llama_context");
    }
    auto * lctx = static_cast<llama_context *>(ctx);
    llama_kv_cache * kv = edgemerge_access::mergeable_cache(lctx);
    if (kv == nullptr) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "kv_merge: this context's memory is not an attention KV cache");
    }
    const int rc = merge(lctx, *kv, { seq_id, n_group, dst, offs, src, w_k, w_v, bias, span, flags_k, flags_v });
    if (rc == EDGEMERGE_OK) {
        edgemerge_clear_error();
    }
    return rc;
}
