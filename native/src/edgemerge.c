/* edgemerge's version and the error plumbing shared by every entry point.
 *
 * One convention for all of native/src: a function returns an EDGEMERGE_E* code, and
 * the code that detected the problem records the message through edgemerge_fail(),
 * naming the offending value and what would be valid. The message is per thread, so
 * concurrent callers never read each other's errors.
 */
#include "edgemerge.h"
#include "edgemerge_internal.h"

#include <stdarg.h>
#include <stdio.h>

#ifndef EDGEMERGE_VERSION
#define EDGEMERGE_VERSION "unknown"
#endif

static _Thread_local char edgemerge_error_buf[512];

const char * edgemerge_version(void) {
    return EDGEMERGE_VERSION;
}

const char * edgemerge_last_error(void) {
    return edgemerge_error_buf;
}

int edgemerge_fail(int status, const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(edgemerge_error_buf, sizeof(edgemerge_error_buf), fmt, ap);
    va_end(ap);
    return status;
}

void edgemerge_clear_error(void) {
    edgemerge_error_buf[0] = '\0';
}
