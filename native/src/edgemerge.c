/* libedgemerge: version and error plumbing shared by every entry point. */
#include "edgemerge.h"
#include "edgemerge_internal.h"
#include "llama.h"

#include <stdarg.h>
#include <stdio.h>

#ifndef EDGEMERGE_VERSION
#define EDGEMERGE_VERSION "unknown"
#endif

static _Thread_local char edgemerge_error_buf[512];

const char * edgemerge_version(void) {
    return EDGEMERGE_VERSION;
}

const char * edgemerge_llama_version(void) {
    return llama_edgemerge_version();
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
