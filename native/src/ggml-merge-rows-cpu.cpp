// CPU forward of GGML_OP_MERGE_ROWS (declared by native/patches/0001-ggml-merge-rows-op.patch).
//
// Compiled into llama.cpp's ggml-cpu target by edgemerge's CMakeLists, so the
// kernel stays in our tree while the patch only wires the op into ggml.
// The oracle is edgemerge/reference/merge.py (merge_rows); keep the two in step.
//
// Layout of the work (memory-bound: each member row is read once):
// - each member row is turned into f32 once: f32 rows are used in place, f16/bf16
//   go through the CPU backend's SIMD row conversions, q8_0/q4_0 through the block
//   loops below, into a thread-local scratch row;
// - the per-head sums (norms, weighted direction) accumulate straight into the
//   output row. On x86 with AVX2, FMA and F16C (where this kernel is built and
//   checked) and a head_dim that is a multiple of GGML_F32_STEP, they are inline
//   loops of ggml's SIMD macros, every member read in its own type and converted
//   in registers, not into a scratch row;
//   elsewhere they call the CPU backend's vec helpers (ggml_vec_dot_f32,
//   ggml_vec_mad_f32), whose call and remainder overhead is most of the op's time
//   at head_dim 64;
// - threads split the members, not the groups: thread t owns the members
//   [t*n_src/nth, (t+1)*n_src/nth) and the groups that start there, so a few
//   large groups load the threads as evenly as many small ones. A large group
//   that crosses a thread boundary is summed in per-thread partials and combined
//   after one barrier (the sums are linear in the members); small groups and
//   SLERP pairs stay whole with the thread where they start.

#define GGML_COMMON_DECL_CPP
#include "ggml-common.h"

#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "ggml-impl.h"
#include "ops.h"
#include "simd-mappings.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

// The fused per-head path needs ggml's 8-wide AVX mappings with FMA and F16C; AVX-512
// builds (16-wide) and other targets keep the vec-helper path, which is the one checked
// there by the same tests.
#if defined(GGML_SIMD) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && \
    !defined(__AVX512F__)
#define EDGEMERGE_MERGE_ROWS_FUSED 1
#endif

namespace {

constexpr float kSlerpLinearBelow = 1e-6f;  // sin(omega) under this: nearly parallel, lerp
// groups with at least this many members are split across threads when they
// cross a thread boundary; smaller ones stay with one thread (imbalance < this many rows)
constexpr int32_t kSplitMin = 32;
// members dequantized and normed together (scratch rows per thread)
constexpr int32_t kChunk = 8;
// how many members ahead a row is prefetched (random rows: hide the memory latency)
constexpr int32_t kPrefetchAhead = 16;
// heads per row up to which the chunked norm path is used (its coefficient table is on the stack)
constexpr int64_t kMaxHeadsFast = 32;

struct merge_args {
    const ggml_tensor * a;
    const int32_t * ix;   // [n_src] member rows
    const float   * wt;   // [n_src, n_head] weights
    const int32_t * of;   // [n_group + 1] CSR offsets
    int64_t n_embd;
    int64_t n_head;
    int64_t hd;
    bool magnitude;
    bool slerp;
    ggml_to_float_t to_float;
    size_t row_bytes;
    int64_t n_src;
    bool fused;  // the fused per-head path applies (see EDGEMERGE_MERGE_ROWS_FUSED)
};

float dot(const float * x, const float * y, int64_t n) {
    float s = 0.0f;
    ggml_vec_dot_f32((int) n, &s, 0, x, 0, y, 0, 1);
    return s;
}

// q8_0/q4_0 rows to f32 here, not through ggml's type traits: those are compiled into
// ggml-base without the host's SIMD flags and took half the op's time. This file is built
// with ggml-cpu's flags, where each block's fixed-length loop becomes vector code
// (int8 -> f32 conversion and one multiply per 8 values on AVX2).
void q8_0_to_f32(const block_q8_0 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t n) {
    for (int64_t b = 0; b < n / QK8_0; ++b) {
        const float d = GGML_CPU_FP16_TO_FP32(x[b].d);
        const int8_t * GGML_RESTRICT q = x[b].qs;
        float * GGML_RESTRICT o = y + b * QK8_0;
        for (int j = 0; j < QK8_0; ++j) {
            o[j] = d * (float) q[j];
        }
    }
}

// q4_0 packs value j in the low nibble of byte j and value j + 16 in its high nibble.
static_assert(QK4_0 == 32, "the nibble split below handles 16 bytes per block");
void q4_0_to_f32(const block_q4_0 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t n) {
    for (int64_t b = 0; b < n / QK4_0; ++b) {
        const float d = GGML_CPU_FP16_TO_FP32(x[b].d);
        const uint8_t * q = x[b].qs;
        float * GGML_RESTRICT o = y + b * QK4_0;
        // split the nibbles 8 bytes at a time in two 64-bit words, then bytes to floats
        // as q8_0 does; gcc turned byte-wise nibble loops into byte-by-byte scalar code
        constexpr uint64_t kLow = 0x0F0F0F0F0F0F0F0FULL;
        uint64_t w[2];
        memcpy(w, q, sizeof(w));
        const uint64_t nib[4] = {w[0] & kLow, w[1] & kLow, (w[0] >> 4) & kLow, (w[1] >> 4) & kLow};
        uint8_t t[QK4_0];
        memcpy(t, nib, sizeof(t));
        for (int j = 0; j < QK4_0; ++j) {
            o[j] = d * (float) ((int) t[j] - 8);
        }
    }
}

const char * row_ptr(const merge_args & m, int32_t row) {
    return (const char *) m.a->data + (int64_t) row * m.a->nb[1];
}

// The member row as f32: f32 rows in place, the others converted once into scratch.
const float * load_row(const merge_args & m, int32_t row, float * scratch) {
    const char * src = row_ptr(m, row);
    switch (m.a->type) {
        case GGML_TYPE_F32:
            return (const float *) src;
        case GGML_TYPE_F16:
            ggml_cpu_fp16_to_fp32((const ggml_fp16_t *) src, scratch, m.n_embd);
            return scratch;
        case GGML_TYPE_BF16:
            ggml_cpu_bf16_to_fp32((const ggml_bf16_t *) src, scratch, m.n_embd);
            return scratch;
        case GGML_TYPE_Q8_0:
            q8_0_to_f32((const block_q8_0 *) src, scratch, m.n_embd);
            return scratch;
        case GGML_TYPE_Q4_0:
            q4_0_to_f32((const block_q4_0 *) src, scratch, m.n_embd);
            return scratch;
        default:  // the C API admits no other type; kept for a new one added there first
            m.to_float(src, scratch, m.n_embd);
            return scratch;
    }
}

// Members are scattered rows: ask for the next one while this one is summed.
// always_inline: GCC 12 finds a void function whose body is only __builtin_prefetch
// "looping pure" and deletes its calls, so out of line no prefetch was ever issued
// (seen in the disassembly: accumulate() had none).
#define EDGEMERGE_PREFETCH_INLINE inline __attribute__((always_inline))
EDGEMERGE_PREFETCH_INLINE void prefetch_row(const merge_args & m, int32_t row) {
    const char * p = row_ptr(m, row);
    for (size_t off = 0; off < m.row_bytes; off += 64) {
        __builtin_prefetch(p + off, 0, 1);
    }
}

// Members are scattered rows, the next groups' included: while member j is summed, ask
// for the one kPrefetchAhead later.
EDGEMERGE_PREFETCH_INLINE void prefetch_ahead(const merge_args & m, int32_t j) {
    if (j + kPrefetchAhead < m.n_src) {
        prefetch_row(m, m.ix[j + kPrefetchAhead]);
    }
}

// acc[n_embd] = 0 and mag[n_head] = 0: the sums accumulate() adds to
void clear_sums(const merge_args & m, float * acc, double * mag) {
    memset(acc, 0, m.n_embd * sizeof(float));
    for (int64_t h = 0; h < m.n_head; ++h) {
        mag[h] = 0.0;
    }
}

// coef[c, h] holds the squared norm of member c0 + c's head h; turn it into the weight of
// its unit direction, w / |x| (0 for a zero row), and add w |x| to mag[h]. Independent
// sqrt/divides for a whole chunk, so their latency chains overlap.
void norm_coefs(const merge_args & m, int32_t c0, int32_t nc, float * coef, double * mag) {
    for (int32_t c = 0; c < nc; ++c) {
        const float * wj = m.wt + (int64_t) (c0 + c) * m.n_head;
        for (int64_t h = 0; h < m.n_head; ++h) {
            const float n = std::sqrt(coef[c * m.n_head + h]);
            mag[h] += (double) wj[h] * n;
            coef[c * m.n_head + h] = n > 0.0f ? wj[h] / n : 0.0f;  // zero rows add nothing
        }
    }
}

#ifdef EDGEMERGE_MERGE_ROWS_FUSED
// Elements [i, i + 8) of a member row as f32, converted in registers: no scratch row.
GGML_F32_VEC load_vec(const float * x, int64_t i) {
    return GGML_F32_VEC_LOAD(x + i);
}

GGML_F32_VEC load_vec(const ggml_fp16_t * x, int64_t i) {
    return GGML_F16_VEC_LOAD(x + i, 0);
}

// bf16 is the high half of an f32
GGML_F32_VEC load_vec(const ggml_bf16_t * x, int64_t i) {
    const __m128i h = _mm_loadu_si128((const __m128i *) (x + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// x*x summed over the head at elements [i0, i0 + hd) (hd a multiple of GGML_F32_STEP), left
// as 8 lanes: sum8() reduces a chunk's members together, not one at a time
template <typename T>
__m256 head_sq(const T * GGML_RESTRICT x, int64_t i0, int64_t hd) {
    GGML_F32_VEC s[GGML_F32_ARR];
    for (int k = 0; k < GGML_F32_ARR; ++k) {
        s[k] = GGML_F32_VEC_ZERO;
    }
    for (int64_t i = i0; i < i0 + hd; i += GGML_F32_STEP) {
        for (int k = 0; k < GGML_F32_ARR; ++k) {
            const GGML_F32_VEC v = load_vec(x, i + k * GGML_F32_EPR);
            s[k] = GGML_F32_VEC_FMA(s[k], v, v);
        }
    }
    return _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]));
}

// lane c of the result is the sum of v[c]'s 8 lanes: eight horizontal sums in 7 shuffles
// and adds, where one at a time each took a dependent chain of its own
__m256 sum8(const __m256 * v) {
    const __m256 t0 = _mm256_hadd_ps(v[0], v[1]);
    const __m256 t1 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 t2 = _mm256_hadd_ps(v[4], v[5]);
    const __m256 t3 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1);  // per 128-bit half: v0..v3's partial sums
    const __m256 u1 = _mm256_hadd_ps(t2, t3);  // and v4..v7's
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                         _mm256_permute2f128_ps(u0, u1, 0x31));
}

// One slice of 32 values: the accumulator stays in 4 registers across a chunk's members.
constexpr int64_t kSlice = 32;
constexpr int kSliceVecs = kSlice / GGML_F32_EPR;

// acc += k * x[i, i + 32)
template <typename T>
void slice_mad(GGML_F32_VEC * acc, const T * GGML_RESTRICT x, int64_t i, float k) {
    const GGML_F32_VEC vk = GGML_F32_VEC_SET1(k);
    for (int v = 0; v < kSliceVecs; ++v) {
        acc[v] = GGML_F32_VEC_FMA(acc[v], load_vec(x, i + v * GGML_F32_EPR), vk);
    }
}

// Quantized heads: the norm pass squares the integers (a block's sum times d^2, no
// conversion), and only the accumulate pass converts, with d folded into the weight.
// Heads span whole blocks: hd is a multiple of GGML_F32_STEP (32) = QK8_0 = QK4_0.
static_assert(GGML_F32_EPR == 8 && GGML_F32_ARR == 4 && QK8_0 == 32 && QK4_0 == 32,
              "blocks of 32, 8-wide vectors, 4 of them per reduction");

// sum over a block of q*q, q signed bytes in [-127, 127] (sign trick: |q| * |q| pairwise)
__m256 block_sum_sq(__m256i q, float d) {
    const __m256i a = _mm256_sign_epi8(q, q);
    const __m256i pairs = _mm256_maddubs_epi16(a, a);
    const __m256i quads = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(quads), _mm256_set1_ps(d * d));
}

// the 32 values of a q4_0 block as signed bytes in [-8, 7], in element order
__m256i q4_0_bytes(const block_q4_0 & b) {
    const __m128i raw = _mm_loadu_si128((const __m128i *) b.qs);
    const __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
    return _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
}

__m256 head_sq(const block_q8_0 * GGML_RESTRICT x, int64_t i0, int64_t hd) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t b = i0 / QK8_0; b < (i0 + hd) / QK8_0; ++b) {
        const __m256i q = _mm256_loadu_si256((const __m256i *) x[b].qs);
        s = _mm256_add_ps(s, block_sum_sq(q, GGML_CPU_FP16_TO_FP32(x[b].d)));
    }
    return s;
}

__m256 head_sq(const block_q4_0 * GGML_RESTRICT x, int64_t i0, int64_t hd) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t b = i0 / QK4_0; b < (i0 + hd) / QK4_0; ++b) {
        s = _mm256_add_ps(s, block_sum_sq(q4_0_bytes(x[b]), GGML_CPU_FP16_TO_FP32(x[b].d)));
    }
    return s;
}

// acc += kd * q for one block's 32 signed bytes (d folded into kd)
void block_mad(GGML_F32_VEC * acc, __m256i q, float kd) {
    const GGML_F32_VEC vk = GGML_F32_VEC_SET1(kd);
    const __m128i lo = _mm256_castsi256_si128(q);
    const __m128i hi = _mm256_extracti128_si256(q, 1);
    const __m128i part[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int v = 0; v < 4; ++v) {
        const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part[v]));
        acc[v] = GGML_F32_VEC_FMA(acc[v], x, vk);
    }
}

void slice_mad(GGML_F32_VEC * acc, const block_q8_0 * GGML_RESTRICT x, int64_t i, float k) {
    const block_q8_0 & b = x[i / QK8_0];
    block_mad(acc, _mm256_loadu_si256((const __m256i *) b.qs), k * GGML_CPU_FP16_TO_FP32(b.d));
}

void slice_mad(GGML_F32_VEC * acc, const block_q4_0 * GGML_RESTRICT x, int64_t i, float k) {
    const block_q4_0 & b = x[i / QK4_0];
    block_mad(acc, q4_0_bytes(b), k * GGML_CPU_FP16_TO_FP32(b.d));
}

// out[n_embd] += sum over the chunk's members c of coef[c, h] * row_c, slice by slice
template <typename T>
void chunk_mad(const merge_args & m, float * out, const T * const * rows, const float * coef,
               int32_t nc) {
    for (int64_t h = 0; h < m.n_head; ++h) {
        for (int64_t i = h * m.hd; i < (h + 1) * m.hd; i += kSlice) {
            GGML_F32_VEC acc[kSliceVecs];
            for (int v = 0; v < kSliceVecs; ++v) {
                acc[v] = GGML_F32_VEC_LOAD(out + i + v * GGML_F32_EPR);
            }
            for (int32_t c = 0; c < nc; ++c) {
                const float k = coef[c * m.n_head + h];
                if (k != 0.0f) {  // zero rows (magnitude) add nothing
                    slice_mad(acc, rows[c], i, k);
                }
            }
            for (int v = 0; v < kSliceVecs; ++v) {
                GGML_F32_VEC_STORE(out + i + v * GGML_F32_EPR, acc[v]);
            }
        }
    }
}

// norm_coefs() for a chunk on the fused path: per head, the chunk's squared norms as the
// lanes of one vector, then their square roots and weights w / |x| 8 at a time
static_assert(kChunk == GGML_F32_EPR, "a chunk's norms are the lanes of one vector");
template <typename T>
void chunk_coefs(const merge_args & m, const T * const * rows, int32_t c0, int32_t nc,
                 float * coef, double * mag) {
    for (int64_t h = 0; h < m.n_head; ++h) {
        __m256 sq[kChunk];
        alignas(32) float w[kChunk];
        for (int32_t c = 0; c < kChunk; ++c) {
            sq[c] = c < nc ? head_sq(rows[c], h * m.hd, m.hd) : _mm256_setzero_ps();
            w[c] = c < nc ? m.wt[(int64_t) (c0 + c) * m.n_head + h] : 0.0f;
        }
        const __m256 n = _mm256_sqrt_ps(sum8(sq));
        // zero rows add nothing: w / 0 is masked to 0
        const __m256 k = _mm256_and_ps(_mm256_div_ps(_mm256_load_ps(w), n),
                                       _mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_GT_OQ));
        alignas(32) float nv[kChunk];
        alignas(32) float kv[kChunk];
        _mm256_store_ps(nv, n);
        _mm256_store_ps(kv, k);
        for (int32_t c = 0; c < nc; ++c) {
            mag[h] += (double) w[c] * nv[c];
            coef[c * m.n_head + h] = kv[c];
        }
    }
}

// accumulate() on the fused path: the same sums, chunked the same way, the members read
// in their own type
template <typename T>
void accumulate_fused(const merge_args & m, int32_t j0, int32_t j1, float * acc, double * mag) {
    clear_sums(m, acc, mag);
    const T * rows[kChunk];
    float coef[kChunk * kMaxHeadsFast];
    for (int32_t c0 = j0; c0 < j1; c0 += kChunk) {
        const int32_t nc = std::min<int32_t>(kChunk, j1 - c0);
        for (int32_t c = 0; c < nc; ++c) {
            prefetch_ahead(m, c0 + c);
            rows[c] = (const T *) row_ptr(m, m.ix[c0 + c]);
        }
        if (!m.magnitude) {
            chunk_mad(m, acc, rows, m.wt + (int64_t) c0 * m.n_head, nc);
            continue;
        }
        chunk_coefs(m, rows, c0, nc, coef, mag);
        chunk_mad(m, acc, rows, coef, nc);
    }
}
#endif

// acc[n_embd] = the members [j0, j1) per head: sum w x, or with magnitude the direction
// sum w x/|x|, and mag[h] = sum w |x|. Members go in chunks of kChunk so that their
// norms (dot, sqrt, divide: a latency chain per head) overlap instead of serialising.
void accumulate(const merge_args & m, int32_t j0, int32_t j1, float * acc, double * mag,
                float * scratch) {
#ifdef EDGEMERGE_MERGE_ROWS_FUSED
    if (m.fused) {
        switch (m.a->type) {
            case GGML_TYPE_F32:
                return accumulate_fused<float>(m, j0, j1, acc, mag);
            case GGML_TYPE_F16:
                return accumulate_fused<ggml_fp16_t>(m, j0, j1, acc, mag);
            case GGML_TYPE_BF16:
                return accumulate_fused<ggml_bf16_t>(m, j0, j1, acc, mag);
            case GGML_TYPE_Q8_0:
                return accumulate_fused<block_q8_0>(m, j0, j1, acc, mag);
            case GGML_TYPE_Q4_0:
                return accumulate_fused<block_q4_0>(m, j0, j1, acc, mag);
            default:
                break;  // fused is false for other types
        }
    }
#endif
    clear_sums(m, acc, mag);
    const float * rows[kChunk];
    float coef[kChunk * kMaxHeadsFast];
    const bool chunked = m.magnitude && m.n_head <= kMaxHeadsFast;
    for (int32_t c0 = j0; c0 < j1; c0 += kChunk) {
        const int32_t nc = std::min<int32_t>(kChunk, j1 - c0);
        for (int32_t c = 0; c < nc; ++c) {
            prefetch_ahead(m, c0 + c);
            rows[c] = load_row(m, m.ix[c0 + c], scratch + (int64_t) c * m.n_embd);
        }
        for (int32_t c = 0; c < nc; ++c) {
            const float * x = rows[c];
            const float * wj = m.wt + (int64_t) (c0 + c) * m.n_head;
            if (!m.magnitude) {
                for (int64_t h = 0; h < m.n_head; ++h) {
                    ggml_vec_mad_f32((int) m.hd, acc + h * m.hd, x + h * m.hd, wj[h]);
                }
            } else if (!chunked) {
                for (int64_t h = 0; h < m.n_head; ++h) {
                    const double n = std::sqrt((double) dot(x + h * m.hd, x + h * m.hd, m.hd));
                    if (n > 0.0) {  // a zero row has no direction
                        mag[h] += wj[h] * n;
                        ggml_vec_mad_f32((int) m.hd, acc + h * m.hd, x + h * m.hd, (float) (wj[h] / n));
                    }
                }
            } else {
                for (int64_t h = 0; h < m.n_head; ++h) {
                    coef[c * m.n_head + h] = dot(x + h * m.hd, x + h * m.hd, m.hd);
                }
            }
        }
        if (!chunked) {
            continue;
        }
        // the norms' weights for the whole chunk, then the weighted direction sums
        norm_coefs(m, c0, nc, coef, mag);
        for (int32_t c = 0; c < nc; ++c) {
            for (int64_t h = 0; h < m.n_head; ++h) {
                const float k = coef[c * m.n_head + h];
                if (k != 0.0f) {
                    ggml_vec_mad_f32((int) m.hd, acc + h * m.hd, rows[c] + h * m.hd, k);
                }
            }
        }
    }
}

// With magnitude: rescale each head's direction sum to the merged norm.
void finish(const merge_args & m, float * acc, const double * mag) {
    if (!m.magnitude) {
        return;
    }
#ifdef EDGEMERGE_MERGE_ROWS_FUSED
    if (m.fused) {  // inline: the vec helpers' calls were a tenth of the op at head_dim 64
        for (int64_t h0 = 0; h0 < m.n_head; h0 += kChunk) {
            const int64_t nh = std::min<int64_t>(kChunk, m.n_head - h0);
            __m256 sq[kChunk];
            for (int64_t c = 0; c < kChunk; ++c) {
                sq[c] = c < nh ? head_sq(acc + (h0 + c) * m.hd, 0, m.hd) : _mm256_setzero_ps();
            }
            alignas(32) float ss[kChunk];
            _mm256_store_ps(ss, sum8(sq));
            for (int64_t c = 0; c < nh; ++c) {
                float * oh = acc + (h0 + c) * m.hd;
                const double dn = std::sqrt((double) ss[c]);
                const float k = dn > 0.0 ? (float) (mag[h0 + c] / dn) : 0.0f;
                const GGML_F32_VEC f = GGML_F32_VEC_SET1(k);
                for (int64_t i = 0; i < m.hd; i += GGML_F32_EPR) {
                    GGML_F32_VEC_STORE(oh + i, GGML_F32_VEC_MUL(GGML_F32_VEC_LOAD(oh + i), f));
                }
            }
        }
        return;
    }
#endif
    for (int64_t h = 0; h < m.n_head; ++h) {
        float * oh = acc + h * m.hd;
        const double dn = std::sqrt((double) dot(oh, oh, m.hd));
        ggml_vec_scale_f32((int) m.hd, oh, dn > 0.0 ? (float) (mag[h] / dn) : 0.0f);
    }
}

// Two-member group on the sphere: interpolate the unit directions, t = w1 / (w0 + w1),
// and give the result the weighted mean norm.
void slerp_pair(const merge_args & m, int32_t j0, float * out, float * scratch0, float * scratch1) {
    if (j0 + kPrefetchAhead < m.n_src) {
        prefetch_row(m, m.ix[j0 + kPrefetchAhead]);
        prefetch_row(m, m.ix[j0 + kPrefetchAhead - 1]);
    }
    const float * r0 = load_row(m, m.ix[j0], scratch0);
    const float * r1 = load_row(m, m.ix[j0 + 1], scratch1);
    const int hd = (int) m.hd;
    for (int64_t h = 0; h < m.n_head; ++h) {
        const float * x0 = r0 + h * m.hd;
        const float * x1 = r1 + h * m.hd;
        float * o = out + h * m.hd;
        const double w0 = m.wt[(int64_t) j0 * m.n_head + h];
        const double w1 = m.wt[(int64_t) (j0 + 1) * m.n_head + h];
        const double n0 = std::sqrt((double) dot(x0, x0, hd));
        const double n1 = std::sqrt((double) dot(x1, x1, hd));
        const double mag = w0 * n0 + w1 * n1;
        if (!(n0 > 0.0 && n1 > 0.0)) {
            // a zero row has no direction: keep the other one's (or 0 if both are zero)
            const float * x = n0 > 0.0 ? x0 : x1;
            const double n = n0 > 0.0 ? n0 : n1;
            memcpy(o, x, hd * sizeof(float));
            ggml_vec_scale_f32(hd, o, n > 0.0 ? (float) (mag / n) : 0.0f);
            continue;
        }
        const double wsum = w0 + w1;
        const double t = wsum > 0.0 ? w1 / wsum : 0.5;
        double c = dot(x0, x1, hd) / (n0 * n1);
        c = c > 1.0 ? 1.0 : (c < -1.0 ? -1.0 : c);
        const double omega = std::acos(c);
        const double s = std::sin(omega);
        double c0 = 1.0 - t, c1 = t;
        if (s >= kSlerpLinearBelow) {
            c0 = std::sin((1.0 - t) * omega) / s;
            c1 = std::sin(t * omega) / s;
        }
        // e = c0 u0 + c1 u1; the linear fallback is not unit length, so renormalise
        memcpy(o, x0, hd * sizeof(float));
        ggml_vec_scale_f32(hd, o, (float) (c0 / n0));
        ggml_vec_mad_f32(hd, o, x1, (float) (c1 / n1));
        const double ne = std::sqrt((double) dot(o, o, hd));
        ggml_vec_scale_f32(hd, o, ne > 0.0 ? (float) (mag / ne) : 0.0f);
    }
}

// One whole group, written straight into its output row.
void merge_group(const merge_args & m, int64_t g, float * out, float * scratch0, float * scratch1,
                 double * mag) {
    const int32_t j0 = m.of[g];
    const int32_t j1 = m.of[g + 1];
    if (m.magnitude && m.slerp && j1 - j0 == 2) {
        slerp_pair(m, j0, out, scratch0, scratch1);
        return;
    }
    accumulate(m, j0, j1, out, mag, scratch0);
    finish(m, out, mag);
}

// Per-thread scratch, each part 64-byte aligned: kChunk + 1 f32 rows for dequantized members,
// two partial-sum slots (f32 row + per-head norm sums) for split groups.
struct thread_scratch {
    float * row0;
    float * row1;
    float * part[2];
    double * mag[2];
    double * mag_whole;
};

size_t align64(size_t n) {
    return (n + 63) / 64 * 64;
}

size_t row_part_bytes(int64_t n_embd) {
    return align64(sizeof(float) * (size_t) n_embd);
}

size_t mag_part_bytes(int64_t n_head) {
    return align64(sizeof(double) * (size_t) n_head);
}

size_t thread_bytes(int64_t n_embd, int64_t n_head) {
    return (kChunk + 3) * row_part_bytes(n_embd) + 3 * mag_part_bytes(n_head);
}

thread_scratch scratch_of(void * wdata, int ith, int64_t n_embd, int64_t n_head) {
    char * p = (char *) wdata + thread_bytes(n_embd, n_head) * (size_t) ith;
    const size_t rb = row_part_bytes(n_embd);
    const size_t mb = mag_part_bytes(n_head);
    thread_scratch s;
    s.row0 = (float *) p;
    s.row1 = (float *) (p + kChunk * rb);
    s.part[0] = (float *) (p + (kChunk + 1) * rb);
    s.part[1] = (float *) (p + (kChunk + 2) * rb);
    s.mag[0] = (double *) (p + (kChunk + 3) * rb);
    s.mag[1] = (double *) (p + (kChunk + 3) * rb + mb);
    s.mag_whole = (double *) (p + (kChunk + 3) * rb + 2 * mb);
    return s;
}

// The first member of thread t's slice of [0, n_src).
int64_t slice_begin(int64_t n_src, int t, int nth) {
    return n_src * t / nth;
}

// The group that holds member j (offsets are strictly increasing).
int64_t group_of(const int32_t * of, int64_t n_group, int64_t j) {
    return std::upper_bound(of, of + n_group + 1, (int32_t) j) - of - 1;
}

}  // namespace

size_t ggml_compute_merge_rows_wsize(const ggml_tensor * node, int n_tasks) {
    const int64_t n_head = ggml_get_op_params_i32(node, 0);
    // + 64: the work buffer itself is not promised to be cache-line aligned
    return thread_bytes(node->src[0]->ne[0], n_head) * (size_t) n_tasks + 64;
}

void ggml_compute_forward_merge_rows(const ggml_compute_params * params, ggml_tensor * dst) {
    const ggml_tensor * a = dst->src[0];
    const int32_t flags = ggml_get_op_params_i32(dst, 1);

    merge_args m;
    m.a = a;
    m.ix = (const int32_t *) dst->src[1]->data;
    m.wt = (const float *) dst->src[2]->data;
    m.of = (const int32_t *) dst->src[3]->data;
    m.n_embd = a->ne[0];
    m.n_head = ggml_get_op_params_i32(dst, 0);
    m.hd = m.n_embd / m.n_head;
    m.magnitude = (flags & GGML_MERGE_ROWS_MAGNITUDE) != 0;
    m.slerp = (flags & GGML_MERGE_ROWS_SLERP) != 0;
    m.to_float = ggml_get_type_traits(a->type)->to_float;
    m.row_bytes = ggml_row_size(a->type, m.n_embd);

    const int64_t n_group = dst->ne[1];
    const int64_t n_src = m.of[n_group];
    m.n_src = n_src;
    m.fused = false;
#ifdef EDGEMERGE_MERGE_ROWS_FUSED
    // EDGEMERGE_MERGE_ROWS_VEC=1 takes the vec-helper path: how the tests check it and
    // the benchmark compares the two on one machine
    const char * force_vec = getenv("EDGEMERGE_MERGE_ROWS_VEC");
    const bool fused_type = a->type == GGML_TYPE_F32 || a->type == GGML_TYPE_F16 ||
                            a->type == GGML_TYPE_BF16 || a->type == GGML_TYPE_Q8_0 ||
                            a->type == GGML_TYPE_Q4_0;
    m.fused = fused_type && m.hd % GGML_F32_STEP == 0 && m.n_head <= kMaxHeadsFast &&
              !(force_vec && strcmp(force_vec, "1") == 0);
#endif
    const int ith = params->ith;
    const int nth = params->nth;

    void * wbase = (void *) (((uintptr_t) params->wdata + 63) & ~(uintptr_t) 63);
    const thread_scratch s = scratch_of(wbase, ith, m.n_embd, m.n_head);
    auto out_row = [&](int64_t g) { return (float *) ((char *) dst->data + g * dst->nb[1]); };
    auto split = [&](int64_t g) { return m.of[g + 1] - m.of[g] >= kSplitMin; };

    const int64_t lo = slice_begin(n_src, ith, nth);
    const int64_t hi = slice_begin(n_src, ith + 1, nth);

    // a split group that started before this slice and reaches into it: partial in slot 0
    if (lo < hi) {
        const int64_t g = group_of(m.of, n_group, lo);
        if (m.of[g] < lo && split(g)) {
            const int32_t end = (int32_t) std::min<int64_t>(hi, m.of[g + 1]);
            accumulate(m, (int32_t) lo, end, s.part[0], s.mag[0], s.row0);
        }
    }

    // groups that start in this slice: whole, or a split group's head part in slot 1
    int64_t g_carry = -1;
    const int64_t g_begin = std::lower_bound(m.of, m.of + n_group, (int32_t) lo) - m.of;
    const int64_t g_end = std::lower_bound(m.of, m.of + n_group, (int32_t) hi) - m.of;
    for (int64_t g = g_begin; g < g_end; ++g) {
        if (m.of[g + 1] > hi && split(g)) {
            accumulate(m, m.of[g], (int32_t) hi, s.part[1], s.mag[1], s.row0);
            g_carry = g;
        } else {
            merge_group(m, g, out_row(g), s.row0, s.row1, s.mag_whole);
        }
    }

    // every thread takes the same decision: is any split group crossing a boundary?
    bool any_split = false;
    for (int t = 1; t < nth && !any_split; ++t) {
        const int64_t b = slice_begin(n_src, t, nth);
        if (b <= 0 || b >= n_src) {
            continue;
        }
        const int64_t g = group_of(m.of, n_group, b);
        any_split = m.of[g] < b && split(g);
    }
    if (!any_split) {
        return;
    }
    ggml_barrier(params->threadpool);

    if (g_carry < 0) {
        return;
    }
    // the thread where the split group starts sums the later threads' slot 0 and finishes it
    float * out = out_row(g_carry);
    memcpy(out, s.part[1], m.n_embd * sizeof(float));
    for (int64_t h = 0; h < m.n_head; ++h) {
        s.mag_whole[h] = s.mag[1][h];
    }
    for (int t = ith + 1; t < nth; ++t) {
        const int64_t b = slice_begin(n_src, t, nth);
        if (b >= m.of[g_carry + 1]) {
            break;
        }
        if (b == slice_begin(n_src, t + 1, nth)) {
            continue;  // empty slice (more threads than members)
        }
        const thread_scratch o = scratch_of(wbase, t, m.n_embd, m.n_head);
        ggml_vec_acc_f32((int) m.n_embd, out, o.part[0]);
        for (int64_t h = 0; h < m.n_head; ++h) {
            s.mag_whole[h] += o.mag[0][h];
        }
    }
    finish(m, out, s.mag_whole);
}
