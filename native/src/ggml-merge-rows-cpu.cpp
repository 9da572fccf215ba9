// CPU forward of GGML_OP_MERGE_ROWS (declared by native/patches/0002-ggml-merge-rows-op.patch).
//
// Compiled into llama.cpp's ggml-cpu target by edgemerge's CMakeLists, so the
// kernel stays in our tree while the patch only wires the op into ggml.
// The oracle is edgemerge/reference/merge.py (merge_rows); keep the two in step.

#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "ops.h"
#include "vec.h"

#include <cmath>
#include <cstring>

namespace {

constexpr float kSlerpLinearBelow = 1e-6f;  // sin(omega) under this: nearly parallel, lerp

// the CPU backend's SIMD conversions for f16/bf16; ggml's type traits for the rest
void load_row(const ggml_tensor * a, int64_t row, float * out) {
    const char * src = (const char *) a->data + row * a->nb[1];
    switch (a->type) {
        case GGML_TYPE_F32:
            memcpy(out, src, a->ne[0] * sizeof(float));
            break;
        case GGML_TYPE_F16:
            ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) src, out, a->ne[0]);
            break;
        case GGML_TYPE_BF16:
            ggml_cpu_bf16_to_fp32((const ggml_bf16_t *) src, out, a->ne[0]);
            break;
        default:
            ggml_get_type_traits(a->type)->to_float(src, out, a->ne[0]);
    }
}

double dot(const float * x, const float * y, int64_t n) {
    float s = 0.0f;
    ggml_vec_dot_f32((int) n, &s, 0, x, 0, y, 0, 1);
    return s;
}

// Two-member group on the sphere: interpolate the unit directions, t = w1 / (w0 + w1).
void slerp_head(const float * x0, const float * x1, double n0, double n1, float w0, float w1,
                int64_t hd, float * out) {
    const double wsum = (double) w0 + (double) w1;
    const double t = wsum > 0.0 ? (double) w1 / wsum : 0.5;
    double c = dot(x0, x1, hd) / (n0 * n1);
    c = c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c);
    const double omega = std::acos(c);
    const double s = std::sin(omega);
    double c0, c1;
    if (s < kSlerpLinearBelow) {
        c0 = 1.0 - t;
        c1 = t;
    } else {
        c0 = std::sin((1.0 - t) * omega) / s;
        c1 = std::sin(t * omega) / s;
    }
    c0 /= n0;
    c1 /= n1;
    double nn = 0.0;
    for (int64_t i = 0; i < hd; ++i) {
        out[i] = (float) (c0 * x0[i] + c1 * x1[i]);
        nn += (double) out[i] * out[i];
    }
    // the linear fallback is not unit length; the slerp branch is up to rounding
    const double inv = nn > 0.0 ? 1.0 / std::sqrt(nn) : 0.0;
    for (int64_t i = 0; i < hd; ++i) {
        out[i] = (float) (out[i] * inv);
    }
}

}  // namespace

// Per thread: two dequantized rows and one norm accumulator per head, cache-line padded.
static size_t merge_rows_rows_bytes(int64_t n_embd) {
    return (sizeof(float) * 2 * (size_t) n_embd + 7) / 8 * 8;
}

static size_t merge_rows_thread_bytes(int64_t n_embd, int64_t n_head) {
    const size_t bytes = merge_rows_rows_bytes(n_embd) + sizeof(double) * (size_t) n_head;
    return (bytes + 63) / 64 * 64;
}

size_t ggml_compute_merge_rows_wsize(const ggml_tensor * node, int n_tasks) {
    const int64_t n_head = ggml_get_op_params_i32(node, 0);
    return merge_rows_thread_bytes(node->src[0]->ne[0], n_head) * (size_t) n_tasks;
}

void ggml_compute_forward_merge_rows(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * a    = dst->src[0];
    const ggml_tensor * idx  = dst->src[1];
    const ggml_tensor * w    = dst->src[2];
    const ggml_tensor * offs = dst->src[3];

    const int32_t n_head = ggml_get_op_params_i32(dst, 0);
    const int32_t flags  = ggml_get_op_params_i32(dst, 1);
    const int64_t n_embd = a->ne[0];
    const int64_t hd     = n_embd / n_head;
    const int64_t n_group = dst->ne[1];

    const int32_t * ix = (const int32_t *) idx->data;
    const float   * wt = (const float *) w->data;
    const int32_t * of = (const int32_t *) offs->data;

    char * wbase = (char *) params->wdata + merge_rows_thread_bytes(n_embd, n_head) * params->ith;
    float * row0 = (float *) wbase;
    float * row1 = row0 + n_embd;
    double * mag = (double *) (wbase + merge_rows_rows_bytes(n_embd));

    for (int64_t g = params->ith; g < n_group; g += params->nth) {
        float * out = (float *) ((char *) dst->data + g * dst->nb[1]);
        const int32_t j0 = of[g];
        const int32_t j1 = of[g + 1];

        const bool magnitude = (flags & GGML_MERGE_ROWS_MAGNITUDE) != 0;
        const bool pair_slerp = magnitude && (flags & GGML_MERGE_ROWS_SLERP) && j1 - j0 == 2;

        if (pair_slerp) {
            load_row(a, ix[j0], row0);
            load_row(a, ix[j0 + 1], row1);
            for (int64_t h = 0; h < n_head; ++h) {
                const float * x0 = row0 + h * hd;
                const float * x1 = row1 + h * hd;
                const float w0 = wt[(int64_t) j0 * n_head + h];
                const float w1 = wt[(int64_t) (j0 + 1) * n_head + h];
                const double n0 = std::sqrt(dot(x0, x0, hd));
                const double n1 = std::sqrt(dot(x1, x1, hd));
                const double m = w0 * n0 + w1 * n1;
                float * o = out + h * hd;
                if (n0 > 0.0 && n1 > 0.0) {
                    slerp_head(x0, x1, n0, n1, w0, w1, hd, o);
                    for (int64_t i = 0; i < hd; ++i) {
                        o[i] = (float) (o[i] * m);
                    }
                } else {
                    // a zero row has no direction: keep the other one's
                    const float * x = n0 > 0.0 ? x0 : x1;
                    const double n = n0 > 0.0 ? n0 : n1;
                    for (int64_t i = 0; i < hd; ++i) {
                        o[i] = n > 0.0 ? (float) (x[i] / n * m) : 0.0f;
                    }
                }
            }
            continue;
        }

        // direction (or plain weighted sum) accumulates in the output row
        memset(out, 0, n_embd * sizeof(float));
        for (int64_t h = 0; h < n_head; ++h) {
            mag[h] = 0.0;
        }
        for (int32_t j = j0; j < j1; ++j) {
            load_row(a, ix[j], row0);
            for (int64_t h = 0; h < n_head; ++h) {
                const float * x = row0 + h * hd;
                const float wj = wt[(int64_t) j * n_head + h];
                float * o = out + h * hd;
                if (!magnitude) {
                    ggml_vec_mad_f32((int) hd, o, x, wj);
                    continue;
                }
                const double n = std::sqrt(dot(x, x, hd));
                if (n <= 0.0) {
                    continue;
                }
                mag[h] += wj * n;
                ggml_vec_mad_f32((int) hd, o, x, (float) (wj / n));
            }
        }
        if (magnitude) {
            for (int64_t h = 0; h < n_head; ++h) {
                float * o = out + h * hd;
                const double dn = std::sqrt(dot(o, o, hd));
                ggml_vec_scale_f32((int) hd, o, dn > 0.0 ? (float) (mag[h] / dn) : 0.0f);
            }
        }
    }
}
