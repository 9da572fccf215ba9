/* Internal helpers shared by native/src's translation units (not part of the C API). */
#ifndef EDGEMERGE_INTERNAL_H
#define EDGEMERGE_INTERNAL_H

#include "ggml-backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Everything here lives inside libllama next to the exported API; keep it out of the
 * library's symbol table. */
#if defined(__GNUC__)
#  define EDGEMERGE_INTERNAL __attribute__((visibility("hidden")))
#else
#  define EDGEMERGE_INTERNAL
#endif

/* Record a printf-style message for edgemerge_last_error() and return `status`,
 * so that validation reads `return edgemerge_fail(EDGEMERGE_EINVAL, "...", ...);`. */
EDGEMERGE_INTERNAL int edgemerge_fail(int status, const char * fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Clear the message at the start of a call that succeeds. */
EDGEMERGE_INTERNAL void edgemerge_clear_error(void);

/* Replace the graph evaluation callback of a live llama_context (`ctx`), which
 * llama.cpp otherwise fixes at creation; NULL removes it (native/src/llama_access.cpp,
 * for the C code of query_capture.c). */
EDGEMERGE_INTERNAL void edgemerge_set_eval_callback(void * ctx, ggml_backend_sched_eval_callback cb,
                                                    void * user_data);

#ifdef __cplusplus
}
#endif

#endif /* EDGEMERGE_INTERNAL_H */
