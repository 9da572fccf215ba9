// edgemerge's view of llama.cpp internals (C++, compiled into libllama only).
//
// native/patches/0005-native-access.patch makes edgemerge_access a friend of
// llama_kv_cache and llama_context; every read or write of their private state by
// native/src goes through this struct, so the patch stays one line per class and what
// we depend on in llama.cpp's internals is listed in one place.
#pragma once

#include "llama-context.h"
#include "llama-kv-cache.h"
#include "llama-kv-cells.h"

#include <cstdint>

struct edgemerge_access {
    // the cache that holds mergeable cells: the full-attention one when the model also
    // has sliding-window layers; nullptr when the memory is not an attention KV cache
    static llama_kv_cache * mergeable_cache(llama_context * ctx);

    static bool has_seq(const llama_kv_cache & kv, llama_seq_id seq_id) {
        // seq_to_stream has LLAMA_MAX_SEQ entries in a unified cache, so check n_seq_max
        return seq_id >= 0 && (uint32_t) seq_id < kv.n_seq_max;
    }
    static uint32_t n_seq_max(const llama_kv_cache & kv) { return kv.n_seq_max; }
    static uint32_t stream(const llama_kv_cache & kv, llama_seq_id seq_id) { return kv.seq_to_stream[seq_id]; }
    static llama_kv_cells & cells(llama_kv_cache & kv, llama_seq_id seq_id) {
        return kv.v_cells[kv.seq_to_stream[seq_id]];
    }
    static const llama_kv_cells & cells(const llama_kv_cache & kv, llama_seq_id seq_id) {
        return kv.v_cells[kv.seq_to_stream[seq_id]];
    }
    static const auto & layers(const llama_kv_cache & kv) { return kv.layers; }
    static const llama_hparams & hparams(const llama_kv_cache & kv) { return kv.hparams; }
    static bool v_trans(const llama_kv_cache & kv) { return kv.v_trans; }

    // after a graph of our own ran on the context's scheduler (a merge), the previous
    // graphs' allocations are stale and must not be reused by the next decode
    static void drop_graph_reuse(llama_context & ctx);

    // cb_eval of llama_context_params, otherwise fixed at creation
    static void set_eval_callback(llama_context & ctx, ggml_backend_sched_eval_callback cb, void * user_data);
};
