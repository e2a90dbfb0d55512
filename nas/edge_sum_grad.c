/* Gradients of the batched eq. 1 sum (nas.search_model._EdgeWeightedSum) for a candidate computed once per state
   (search.speed.weightless_once), for channels_last float32 tensors.

   The sum's gradient is G[p, u, j, c]: pixels p, the states u the group's edges leave, the r edges leaving each
   state j, channels c. The candidate's input is x[p, u, c], seen as xh = (x - mean[u, c]) * invstd[u, c] when its
   batch norm is inside the sum (mean NULL: xh = x). Then

     d_w[u, j] = sum over p, c of G[p, u, j, c] * xh[p, u, c]     each edge's weight
     g[p, u, c] = sum over j of w[u, j] * G[p, u, j, c]            what reaches the candidate's (normalized) output

   both in one pass over G. In PyTorch operators each is a product of G's size written out and summed again. Each
   thread takes a run of pixels and sums d_w into its own [U*r, C] buffer; the buffers are added at the end in a
   fixed order, so the result does not depend on timing. Built and loaded by nas/kernels.py. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

void edge_sum_once_grad_f32(const float* G, const float* x, const float* mean, const float* invstd, const float* w,
                            float* d_w, float* g, int64_t P, int64_t U, int64_t R, int64_t C, int threads) {
    const int64_t UC = U * C, M = U * R * C;
    float* partial = NULL;
    if (d_w) {
        partial = calloc((size_t)threads * (size_t)M, sizeof(float));
        if (!partial) {
            for (int64_t i = 0; i < U * R; i++) d_w[i] = NAN;
            return;
        }
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float* acc = partial ? partial + (size_t)t * (size_t)M : NULL;
        float* xh = malloc((size_t)C * sizeof(float));
        if (!xh) {
#pragma omp atomic write
            failed = 1;
        } else {
            const int64_t begin = P * t / nt, end = P * (t + 1) / nt;
            for (int64_t p = begin; p < end; p++) {
                for (int64_t u = 0; u < U; u++) {
                    const float* xp = x + p * UC + u * C;
                    const float* gp = G + p * M + u * R * C;
                    if (acc) {
                        if (mean) {
                            const float* mu = mean + u * C;
                            const float* is = invstd + u * C;
                            for (int64_t c = 0; c < C; c++) xh[c] = (xp[c] - mu[c]) * is[c];
                        } else {
                            for (int64_t c = 0; c < C; c++) xh[c] = xp[c];
                        }
                        for (int64_t j = 0; j < R; j++) {
                            float* a = acc + (u * R + j) * C;
                            const float* gj = gp + j * C;
                            for (int64_t c = 0; c < C; c++) a[c] += gj[c] * xh[c];
                        }
                    }
                    if (g) {
                        float* out = g + p * UC + u * C;
                        const float w0 = w[u * R];
                        for (int64_t c = 0; c < C; c++) out[c] = w0 * gp[c];
                        for (int64_t j = 1; j < R; j++) {
                            const float wj = w[u * R + j];
                            const float* gj = gp + j * C;
                            for (int64_t c = 0; c < C; c++) out[c] += wj * gj[c];
                        }
                    }
                }
            }
            free(xh);
        }
    }
    if (d_w) {
        for (int64_t i = 0; i < U * R; i++) {
            float s = 0.0f;
            for (int t = 0; t < threads; t++)
                for (int64_t c = 0; c < C; c++) s += partial[(size_t)t * (size_t)M + i * C + c];
            d_w[i] = failed ? NAN : s;
        }
        free(partial);
    }
    if (failed && g)
        for (int64_t i = 0; i < P * UC; i++) g[i] = NAN;
}
