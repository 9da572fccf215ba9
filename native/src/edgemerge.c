/* libedgemerge: version and error plumbing shared by every entry point. */
#include "edgemerge.h"
#include "llama.h"

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
