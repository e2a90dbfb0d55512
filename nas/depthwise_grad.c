/* The weight gradient of a depthwise (one filter per channel) 2-d convolution, for channels_last float32 tensors.

   grad_w[c, i, j] = sum over n, ho, wo of x[n, ho*s - p + i*d, wo*s - p + j*d, c] * g[n, ho, wo, c]

   oneDNN's CPU kernel for this is a generic one for any kernel larger than 3x3: at the search's shapes its 5x5
   weight gradient takes ten times its forward (bench/README.md). Here every (n, ho) row of the output gradient is
   one unit of work: for each kernel row i, the K taps of that row accumulate in K vector registers of 16 channels
   while the row's columns stream by, so each loaded gradient vector feeds K fused multiply-adds. Each thread sums
   into its own [K*K, C] buffer; the buffers are added at the end in a fixed order, so the result does not depend
   on timing. Built and loaded by nas/kernels.py. */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#define LANES 16
typedef float vec __attribute__((vector_size(LANES * sizeof(float)), aligned(4), may_alias));

static inline vec load(const float* p) { return *(const vec*)p; }
static inline void store(float* p, vec v) { *(vec*)p = v; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The output columns wo whose input column wo*s + offset lies in [0, W): [first_column, end_column). */
static inline int64_t first_column(int64_t offset, int64_t s) { return offset >= 0 ? 0 : (-offset + s - 1) / s; }
static inline int64_t end_column(int64_t offset, int64_t s, int64_t W, int64_t Wo) {
    return W - 1 - offset >= 0 ? min64((W - 1 - offset) / s + 1, Wo) : 0;
}

/* One kernel row: a[j*C + c] += sum over wo of x_row[wo*s - p + j*d, c] * g_row[wo, c], for the K taps j. */
static inline __attribute__((always_inline)) void kernel_row(
    const float* x_row, const float* g_row, float* a, int64_t C, int64_t W, int64_t Wo, int64_t xsw, int64_t gsw,
    const int K, int64_t s, int64_t p, int64_t d) {
    int64_t lo = 0, hi = Wo; /* the columns where every tap lies inside the image */
    for (int j = 0; j < K; j++) {
        lo = max64(lo, first_column(j * d - p, s));
        hi = min64(hi, end_column(j * d - p, s, W, Wo));
    }
    if (hi < lo) hi = lo;
    int64_t c0 = 0;
    for (; c0 + LANES <= C; c0 += LANES) {
        vec v[K];
        for (int j = 0; j < K; j++) v[j] = load(a + j * C + c0);
        for (int64_t wo = lo; wo < hi; wo++) {
            vec gv = load(g_row + wo * gsw + c0);
            const float* xp = x_row + (wo * s - p) * xsw + c0;
            for (int j = 0; j < K; j++) v[j] += load(xp + j * d * xsw) * gv;
        }
        for (int j = 0; j < K; j++) store(a + j * C + c0, v[j]);
    }
    for (int j = 0; j < K; j++) {
        int64_t offset = j * d - p, first = first_column(offset, s), end = end_column(offset, s, W, Wo);
        for (int64_t wo = first; wo < end; wo++) {
            const float* xp = x_row + (wo * s + offset) * xsw;
            const float* gp = g_row + wo * gsw;
            /* the border columns of the full vectors, then every column of the channels past them */
            int64_t c = (wo >= lo && wo < hi) ? c0 : 0;
            for (; c < C; c++) a[j * C + c] += xp[c] * gp[c];
        }
    }
}

/* x: [N, C, H, W] and g: [N, C, Ho, Wo], each with channel stride 1 and the given element strides of n, h, w;
   out: [C, K, K] contiguous, overwritten. */
void depthwise_weight_grad_f32(const float* x, const float* g, float* out, int64_t N, int64_t C, int64_t H,
                               int64_t W, int64_t Ho, int64_t Wo, int64_t xsn, int64_t xsh, int64_t xsw, int64_t gsn,
                               int64_t gsh, int64_t gsw, int64_t K, int64_t s, int64_t p, int64_t d, int threads) {
    int64_t taps = K * K;
    if (threads < 1) threads = 1;
    float* sums = (float*)calloc((size_t)threads * taps * C, sizeof(float));
    if (!sums) return; /* the caller's buffer is NaN-filled: a failed allocation cannot pass for a gradient */
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), team = omp_get_num_threads();
        float* a = sums + (int64_t)t * taps * C;
        int64_t rows = N * Ho, begin = rows * t / team, end = rows * (t + 1) / team;
        for (int64_t r = begin; r < end; r++) {
            int64_t n = r / Ho, ho = r % Ho;
            const float* g_row = g + n * gsn + ho * gsh;
            for (int64_t i = 0; i < K; i++) {
                int64_t h = ho * s - p + i * d;
                if (h < 0 || h >= H) continue;
                const float* x_row = x + n * xsn + h * xsh;
                float* a_row = a + i * K * C;
                if (K == 5) kernel_row(x_row, g_row, a_row, C, W, Wo, xsw, gsw, 5, s, p, d);
                else if (K == 7) kernel_row(x_row, g_row, a_row, C, W, Wo, xsw, gsw, 7, s, p, d);
                else if (K == 3) kernel_row(x_row, g_row, a_row, C, W, Wo, xsw, gsw, 3, s, p, d);
                else kernel_row(x_row, g_row, a_row, C, W, Wo, xsw, gsw, (int)K, s, p, d);
            }
        }
    }
    for (int64_t c = 0; c < C; c++)
        for (int64_t k = 0; k < taps; k++) {
            float v = 0;
            for (int t = 0; t < threads; t++) v += sums[(int64_t)t * taps * C + k * C + c];
            out[c * taps + k] = v;
        }
    free(sums);
}
