// CUDA forward of GGML_OP_MERGE_ROWS (native/patches/0001-ggml-merge-rows-op.patch wires it in).
//
// Compiled into llama.cpp's ggml-cuda target by edgemerge's CMakeLists. Same
// semantics as the CPU kernel (native/src/ggml-merge-rows-cpu.cpp) and the numba
// oracle (edgemerge/reference/merge.py): one thread block per (group, head); each
// thread holds up to MR_PER_THREAD elements of the head in registers, so
// head_dim <= MR_THREADS * MR_PER_THREAD (supports_op checks it).

#include "common.cuh"

#define MR_THREADS 128
#define MR_PER_THREAD 8
#define MR_SLERP_LINEAR_BELOW 1e-6f

static __device__ __forceinline__ float mr_load(const char * row, int type, int i) {
    switch (type) {
        case GGML_TYPE_F32:
            return ((const float *) row)[i];
        case GGML_TYPE_F16:
            return __half2float(((const half *) row)[i]);
        case GGML_TYPE_BF16:
            return __bfloat162float(((const nv_bfloat16 *) row)[i]);
        case GGML_TYPE_Q8_0: {
            const block_q8_0 * b = (const block_q8_0 *) row + i / QK8_0;
            return __half2float(b->d) * (float) b->qs[i % QK8_0];
        }
        case GGML_TYPE_Q4_0: {
            const block_q4_0 * b = (const block_q4_0 *) row + i / QK4_0;
            const int j = i % QK4_0;
            const int q = j < QK4_0 / 2 ? (b->qs[j] & 0x0F) : (b->qs[j - QK4_0 / 2] >> 4);
            return __half2float(b->d) * (float) (q - 8);
        }
        default:
            return 0.0f;
    }
}

// Sum over the thread block; every thread gets the result.
static __device__ float mr_block_sum(float v, float * shared) {
    v = warp_reduce_sum(v);
    const int lane = threadIdx.x % WARP_SIZE;
    const int warp = threadIdx.x / WARP_SIZE;
    __syncthreads();
    if (lane == 0) {
        shared[warp] = v;
    }
    __syncthreads();
    float s = 0.0f;
    for (int i = 0; i < MR_THREADS / WARP_SIZE; ++i) {
        s += shared[i];
    }
    return s;
}

static __global__ void k_merge_rows(const char * __restrict__ a, int type, size_t nb1,
                                    const int32_t * __restrict__ idx, const float * __restrict__ w,
                                    const int32_t * __restrict__ offs, int n_head, int head_dim,
                                    int flags, float * __restrict__ dst, size_t dst_nb1) {
    __shared__ float shared[MR_THREADS / WARP_SIZE];
    const int g = blockIdx.x;  // x: groups, which can outnumber the 65535 limit of y
    const int h = blockIdx.y;
    const int j0 = offs[g];
    const int j1 = offs[g + 1];
    const bool magnitude = (flags & GGML_MERGE_ROWS_MAGNITUDE) != 0;
    const bool pair_slerp = magnitude && (flags & GGML_MERGE_ROWS_SLERP) && j1 - j0 == 2;
    const int base = h * head_dim;

    float acc[MR_PER_THREAD];
    float x[MR_PER_THREAD];
#pragma unroll
    for (int k = 0; k < MR_PER_THREAD; ++k) {
        acc[k] = 0.0f;
    }

    if (pair_slerp) {
        float y[MR_PER_THREAD];
        const char * r0 = a + (size_t) idx[j0] * nb1;
        const char * r1 = a + (size_t) idx[j0 + 1] * nb1;
        float s00 = 0.0f, s11 = 0.0f, s01 = 0.0f;
#pragma unroll
        for (int k = 0; k < MR_PER_THREAD; ++k) {
            const int e = threadIdx.x + k * MR_THREADS;
            x[k] = e < head_dim ? mr_load(r0, type, base + e) : 0.0f;
            y[k] = e < head_dim ? mr_load(r1, type, base + e) : 0.0f;
            s00 += x[k] * x[k];
            s11 += y[k] * y[k];
            s01 += x[k] * y[k];
        }
        const float n0 = sqrtf(mr_block_sum(s00, shared));
        const float n1 = sqrtf(mr_block_sum(s11, shared));
        const float d01 = mr_block_sum(s01, shared);
        const float w0 = w[(size_t) j0 * n_head + h];
        const float w1 = w[(size_t) (j0 + 1) * n_head + h];
        const float mag = w0 * n0 + w1 * n1;
        float c0, c1;
        if (n0 > 0.0f && n1 > 0.0f) {
            const float wsum = w0 + w1;
            const float t = wsum > 0.0f ? w1 / wsum : 0.5f;
            const float c = fminf(1.0f, fmaxf(-1.0f, d01 / (n0 * n1)));
            const float omega = acosf(c);
            const float s = sinf(omega);
            if (s < MR_SLERP_LINEAR_BELOW) {
                c0 = 1.0f - t;
                c1 = t;
            } else {
                c0 = sinf((1.0f - t) * omega) / s;
                c1 = sinf(t * omega) / s;
            }
            c0 /= n0;
            c1 /= n1;
        } else {
            // a zero row has no direction: keep the other one's
            c0 = n0 > 0.0f ? 1.0f / n0 : 0.0f;
            c1 = n0 > 0.0f ? 0.0f : (n1 > 0.0f ? 1.0f / n1 : 0.0f);
        }
        float snn = 0.0f;
#pragma unroll
        for (int k = 0; k < MR_PER_THREAD; ++k) {
            acc[k] = c0 * x[k] + c1 * y[k];
            snn += acc[k] * acc[k];
        }
        const float nn = sqrtf(mr_block_sum(snn, shared));
        const float scale = nn > 0.0f ? mag / nn : 0.0f;
#pragma unroll
        for (int k = 0; k < MR_PER_THREAD; ++k) {
            acc[k] *= scale;
        }
    } else {
        float mag = 0.0f;
        for (int j = j0; j < j1; ++j) {
            const char * r = a + (size_t) idx[j] * nb1;
            const float wj = w[(size_t) j * n_head + h];
            float sxx = 0.0f;
#pragma unroll
            for (int k = 0; k < MR_PER_THREAD; ++k) {
                const int e = threadIdx.x + k * MR_THREADS;
                x[k] = e < head_dim ? mr_load(r, type, base + e) : 0.0f;
                sxx += x[k] * x[k];
            }
            if (!magnitude) {
#pragma unroll
                for (int k = 0; k < MR_PER_THREAD; ++k) {
                    acc[k] += wj * x[k];
                }
                continue;
            }
            const float n = sqrtf(mr_block_sum(sxx, shared));
            if (n <= 0.0f) {
                continue;
            }
            mag += wj * n;
#pragma unroll
            for (int k = 0; k < MR_PER_THREAD; ++k) {
                acc[k] += (wj / n) * x[k];
            }
        }
        if (magnitude) {
            float sdd = 0.0f;
#pragma unroll
            for (int k = 0; k < MR_PER_THREAD; ++k) {
                sdd += acc[k] * acc[k];
            }
            const float dn = sqrtf(mr_block_sum(sdd, shared));
            const float scale = dn > 0.0f ? mag / dn : 0.0f;
#pragma unroll
            for (int k = 0; k < MR_PER_THREAD; ++k) {
                acc[k] *= scale;
            }
        }
    }

    float * out = (float *) ((char *) dst + (size_t) g * dst_nb1) + base;
#pragma unroll
    for (int k = 0; k < MR_PER_THREAD; ++k) {
        const int e = threadIdx.x + k * MR_THREADS;
        if (e < head_dim) {
            out[e] = acc[k];
        }
    }
}

void ggml_cuda_op_merge_rows(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * a = dst->src[0];
    const ggml_tensor * idx = dst->src[1];
    const ggml_tensor * w = dst->src[2];
    const ggml_tensor * offs = dst->src[3];
    const int n_head = ggml_get_op_params_i32(dst, 0);
    const int flags = ggml_get_op_params_i32(dst, 1);
    const int head_dim = (int) (a->ne[0] / n_head);
    GGML_ASSERT(head_dim <= MR_THREADS * MR_PER_THREAD);

    const dim3 grid((unsigned) dst->ne[1], n_head);
    k_merge_rows<<<grid, MR_THREADS, 0, ctx.stream()>>>(
        (const char *) a->data, (int) a->type, a->nb[1], (const int32_t *) idx->data,
        (const float *) w->data, (const int32_t *) offs->data, n_head, head_dim, flags,
        (float *) dst->data, dst->nb[1]);
    CUDA_CHECK(cudaGetLastError());
}
