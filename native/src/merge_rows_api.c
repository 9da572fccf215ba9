/* Validating C entry point for GGML_OP_MERGE_ROWS on a named ggml backend.
 *
 * This is the op in isolation, in the spirit of llama.cpp's test-backend-ops:
 * the same graph (one MERGE_ROWS node) runs on "CPU" or "CUDA0", so every
 * backend is checked against the numba reference from Python. Input is
 * validated here so that bad arguments return an error instead of tripping
 * a GGML_ASSERT (which aborts the process).
 */
#include "edgemerge.h"
#include "edgemerge_internal.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

#include <math.h>
#include <string.h>

/* edgemerge.h states the flags for C and Python; ggml's op defines them for the kernels. */
_Static_assert((int) EDGEMERGE_MERGE_MAGNITUDE == (int) GGML_MERGE_ROWS_MAGNITUDE,
               "EDGEMERGE_MERGE_MAGNITUDE must equal GGML_MERGE_ROWS_MAGNITUDE");
_Static_assert((int) EDGEMERGE_MERGE_SLERP == (int) GGML_MERGE_ROWS_SLERP,
               "EDGEMERGE_MERGE_SLERP must equal GGML_MERGE_ROWS_SLERP");

static int merge_rows_type_ok(int type) {
    return type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16 ||
           type == GGML_TYPE_Q8_0 || type == GGML_TYPE_Q4_0;
}

static int validate(int type, int64_t n_embd, int64_t n_rows, const int32_t * idx, int64_t n_src,
                    const float * w, const int32_t * offs, int64_t n_group, int32_t n_head) {
    if (!merge_rows_type_ok(type)) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "merge_rows: ggml type %d is not supported (f32, f16, bf16, q8_0, q4_0)",
                              type);
    }
    if (n_head <= 0 || n_embd <= 0 || n_embd % n_head != 0) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "merge_rows: n_embd=%lld must be a positive multiple of n_head=%d",
                              (long long) n_embd, n_head);
    }
    if (n_embd % ggml_blck_size((enum ggml_type) type) != 0) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "merge_rows: n_embd=%lld is not a multiple of the %s block size %lld",
                              (long long) n_embd, ggml_type_name((enum ggml_type) type),
                              (long long) ggml_blck_size((enum ggml_type) type));
    }
    if (n_rows <= 0 || n_src <= 0 || n_group <= 0) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "merge_rows: need at least one row, member and group "
                              "(n_rows=%lld, n_src=%lld, n_group=%lld)",
                              (long long) n_rows, (long long) n_src, (long long) n_group);
    }
    if (offs[0] != 0 || offs[n_group] != n_src) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "merge_rows: offsets must start at 0 and end at n_src=%lld "
                              "(got %d and %d)",
                              (long long) n_src, offs[0], offs[n_group]);
    }
    for (int64_t g = 0; g < n_group; ++g) {
        if (offs[g + 1] <= offs[g]) {
            return edgemerge_fail(EDGEMERGE_EINVAL, "merge_rows: group %lld is empty",
                                  (long long) g);
        }
    }
    for (int64_t j = 0; j < n_src; ++j) {
        if (idx[j] < 0 || idx[j] >= n_rows) {
            return edgemerge_fail(EDGEMERGE_ERANGE,
                                  "merge_rows: member %lld names row %d, outside [0, %lld)",
                                  (long long) j, idx[j], (long long) n_rows);
        }
    }
    for (int64_t i = 0; i < n_src * n_head; ++i) {
        if (!isfinite(w[i])) {
            return edgemerge_fail(EDGEMERGE_EINVAL,
                                  "merge_rows: weight %lld (member %lld, head %lld) is not finite",
                                  (long long) i, (long long) (i / n_head), (long long) (i % n_head));
        }
    }
    return EDGEMERGE_OK;
}

static int merge_rows_run(const char * backend_name, int type, const void * rows, int64_t n_embd,
                          int64_t n_rows, const int32_t * idx, int64_t n_src, const float * w,
                          const int32_t * offs, int64_t n_group, int32_t n_head, int32_t flags,
                          float * out, int32_t n_iter, int32_t n_threads,
                          double * seconds_per_iter) {
    if (!backend_name || !rows || !idx || !w || !offs || !out) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "merge_rows: a required pointer is NULL");
    }
    int rc = validate(type, n_embd, n_rows, idx, n_src, w, offs, n_group, n_head);
    if (rc != EDGEMERGE_OK) {
        return rc;
    }

    ggml_backend_load_all();
    ggml_backend_t backend = ggml_backend_init_by_name(backend_name, NULL);
    if (!backend) {
        return edgemerge_fail(EDGEMERGE_EBACKEND,
                              "merge_rows: no ggml backend named '%s' in this build", backend_name);
    }
    if (n_threads > 0) {
        /* the generic way llama.cpp sets a backend's threads: a registry proc, absent on
         * backends without threads (a GPU), where the count means nothing */
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(ggml_backend_get_device(backend));
        ggml_backend_set_n_threads_t set_threads =
            (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(
                reg, "ggml_backend_set_n_threads");
        if (set_threads) {
            set_threads(backend, n_threads);
        }
    }

    struct ggml_init_params ip = {
        /*.mem_size   =*/ggml_tensor_overhead() * 8 + ggml_graph_overhead(),
        /*.mem_buffer =*/NULL,
        /*.no_alloc   =*/true,
    };
    struct ggml_context * ctx = ggml_init(ip);
    struct ggml_tensor * a = ggml_new_tensor_2d(ctx, (enum ggml_type) type, n_embd, n_rows);
    struct ggml_tensor * ti = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_src);
    struct ggml_tensor * tw = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_head, n_src);
    struct ggml_tensor * to = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_group + 1);
    struct ggml_tensor * res = ggml_merge_rows(ctx, a, ti, tw, to, n_head, flags);

    rc = EDGEMERGE_OK;
    if (!ggml_backend_supports_op(backend, res)) {
        rc = edgemerge_fail(EDGEMERGE_EBACKEND,
                            "merge_rows: backend '%s' does not support MERGE_ROWS for %s rows",
                            backend_name, ggml_type_name((enum ggml_type) type));
        goto done_ctx;
    }

    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    if (!buf) {
        rc = edgemerge_fail(EDGEMERGE_ENOMEM, "merge_rows: could not allocate on '%s'",
                            backend_name);
        goto done_ctx;
    }
    ggml_backend_tensor_set(a, rows, 0, ggml_nbytes(a));
    ggml_backend_tensor_set(ti, idx, 0, ggml_nbytes(ti));
    ggml_backend_tensor_set(tw, w, 0, ggml_nbytes(tw));
    ggml_backend_tensor_set(to, offs, 0, ggml_nbytes(to));

    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, res);
    /* one warm-up run, then n_iter timed runs of the compute alone */
    enum ggml_status st = ggml_backend_graph_compute(backend, gf);
    const int64_t t0 = ggml_time_us();
    for (int32_t i = 0; i < n_iter && st == GGML_STATUS_SUCCESS; ++i) {
        st = ggml_backend_graph_compute(backend, gf);
    }
    ggml_backend_synchronize(backend);
    if (seconds_per_iter && n_iter > 0) {
        *seconds_per_iter = (double) (ggml_time_us() - t0) * 1e-6 / n_iter;
    }
    if (st != GGML_STATUS_SUCCESS) {
        rc = edgemerge_fail(EDGEMERGE_EBACKEND, "merge_rows: graph compute failed on '%s'",
                            backend_name);
    } else {
        ggml_backend_tensor_get(res, out, 0, ggml_nbytes(res));
        edgemerge_clear_error();
    }
    ggml_backend_buffer_free(buf);
done_ctx:
    ggml_free(ctx);
    ggml_backend_free(backend);
    return rc;
}

int edgemerge_merge_rows(const char * backend_name, int type, const void * rows, int64_t n_embd,
                         int64_t n_rows, const int32_t * idx, int64_t n_src, const float * w,
                         const int32_t * offs, int64_t n_group, int32_t n_head, int32_t flags,
                         float * out) {
    return merge_rows_run(backend_name, type, rows, n_embd, n_rows, idx, n_src, w, offs, n_group,
                          n_head, flags, out, 0, 0, NULL);
}

int edgemerge_merge_rows_bench(const char * backend_name, int type, const void * rows,
                               int64_t n_embd, int64_t n_rows, const int32_t * idx, int64_t n_src,
                               const float * w, const int32_t * offs, int64_t n_group,
                               int32_t n_head, int32_t flags, float * out, int32_t n_iter,
                               int32_t n_threads, double * seconds_per_iter) {
    if (n_iter < 1 || seconds_per_iter == NULL) {
        return edgemerge_fail(EDGEMERGE_EINVAL, "merge_rows_bench: need n_iter >= 1 (got %d) and "
                              "a seconds_per_iter pointer", n_iter);
    }
    if (n_threads < 0) {
        return edgemerge_fail(EDGEMERGE_EINVAL,
                              "merge_rows_bench: n_threads must be >= 0 (0: the backend's "
                              "default), got %d", n_threads);
    }
    return merge_rows_run(backend_name, type, rows, n_embd, n_rows, idx, n_src, w, offs, n_group,
                          n_head, flags, out, n_iter, n_threads, seconds_per_iter);
}
