/*
 * edgemerge.h: the one flat C API of libedgemerge.
 *
 * The Python bindings (edgemerge/native.py, cffi ABI mode) read their cdef
 * from the text between the CDEF markers below, so that block must stay
 * plain C declarations: no macros, no preprocessor lines, no inline code.
 *
 * Conventions: functions return 0 on success and a negative EDGEMERGE_E*
 * code on failure; edgemerge_last_error() then describes the failure for the
 * calling thread. No function aborts the process on bad input.
 */
#ifndef EDGEMERGE_H
#define EDGEMERGE_H

#if defined(_WIN32)
#  define EDGEMERGE_API __declspec(dllexport)
#else
#  define EDGEMERGE_API __attribute__((visibility("default")))
#endif

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

/* Version of libedgemerge itself, e.g. "0.1.0". */
EDGEMERGE_API const char * edgemerge_version(void);

/* Version reported by the patched libllama this library is linked against
 * (llama_edgemerge_version() from native/patches/0001). */
EDGEMERGE_API const char * edgemerge_llama_version(void);

/* Message for the last failed call on this thread ("" if none). */
EDGEMERGE_API const char * edgemerge_last_error(void);
/* EDGEMERGE_CDEF_END */

#ifdef __cplusplus
}
#endif

#endif /* EDGEMERGE_H */
