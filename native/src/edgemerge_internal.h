/* Internal helpers shared by libedgemerge's translation units (not part of the C API). */
#ifndef EDGEMERGE_INTERNAL_H
#define EDGEMERGE_INTERNAL_H

#ifdef __cplusplus
extern "C" {
#endif

/* Record a printf-style message for edgemerge_last_error() and return `status`,
 * so that validation reads `return edgemerge_fail(EDGEMERGE_EINVAL, "...", ...);`. */
int edgemerge_fail(int status, const char * fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Clear the message at the start of a call that succeeds. */
void edgemerge_clear_error(void);

#ifdef __cplusplus
}
#endif

#endif /* EDGEMERGE_INTERNAL_H */
