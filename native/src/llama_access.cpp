// The parts of edgemerge_access (llama_access.h) that are more than a field read.

#include "llama_access.h"

#include "edgemerge_internal.h"
#include "llama-kv-cache-iswa.h"

llama_kv_cache * edgemerge_access::mergeable_cache(llama_context * ctx) {
    llama_memory_t mem = llama_get_memory(ctx);
    if (auto * kv = dynamic_cast<llama_kv_cache *>(mem)) {
        return kv;
    }
    if (auto * kv_iswa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        return kv_iswa->get_base();
    }
    return nullptr;
}

void edgemerge_access::drop_graph_reuse(llama_context & ctx) {
    for (auto & res : ctx.gf_res_prev) {
        if (res) {
            res->reset();
        }
    }
    ctx.gf_res_prev_active = nullptr;
}

void edgemerge_access::set_eval_callback(llama_context & ctx, ggml_backend_sched_eval_callback cb, void * user_data) {
    ctx.cparams.cb_eval           = cb;
    ctx.cparams.cb_eval_user_data = user_data;
    // a reused graph skips the scheduler reset that installs cparams.cb_eval
    ggml_backend_sched_set_eval_callback(ctx.sched.get(), cb, user_data);
}

void edgemerge_set_eval_callback(void * ctx, ggml_backend_sched_eval_callback cb, void * user_data) {
    edgemerge_access::set_eval_callback(*static_cast<llama_context *>(ctx), cb, user_data);
}
