/* The batched eq. 1 sum (nas.search_model._EdgeWeightedSum) in one pass, for channels_last float32 tensors
   (search.speed.native_sum).

   The m edges of a group leave `sources` states, r = m / sources edges each, edge-major by state. Candidate k's
   output x_k has, per pixel, either m blocks of C channels (one per edge) or, for a candidate computed once per
   state (search.speed.weightless_once), `sources` blocks (one per state, shared by that state's r edges). Where the
   candidate's closing batch norm is inside the sum its batch mean and 1/sigma are given (computed beforehand by
   nas/norm_cl.c), else mean NULL. Then for each pixel p, edge e, channel c:

     total[p, e, c] = sum over k of w[k, e] * (x_k[p, b_k(e), c] - mean_k[b_k(e), c]) * invstd_k[b_k(e), c]

   with b_k(e) = e, or e / r for a candidate given once per state. PyTorch's operators write each normalized output
   and then read it, and read and write the sum once per candidate; this reads each candidate once and writes the
   sum once. Each thread takes a run of pixels. Built and loaded by nas/kernels.py. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

/* xs[k], means[k], invstds[k]: candidate k's input and statistics (means[k] NULL: no norm); once[k]: 1 where its
   input has `sources` blocks; w: (K, m) weights; coef, centre: scratch of K * m * C floats. */
void edge_sum_forward_f32(const float* const* xs, const float* const* means, const float* const* invstds,
                          const uint8_t* once, const float* w, float* total, float* coef, float* centre, int64_t K,
                          int64_t P, int64_t m, int64_t sources, int64_t C, int threads) {
    const int64_t r = m / sources, mC = m * C;
    for (int64_t k = 0; k < K; k++)
        for (int64_t e = 0; e < m; e++)
            for (int64_t c = 0; c < C; c++) {
                const int64_t i = (once[k] ? e / r : e) * C + c;
                coef[k * mC + e * C + c] = w[k * m + e] * (means[k] ? invstds[k][i] : 1.0f);
                centre[k * mC + e * C + c] = means[k] ? means[k][i] : 0.0f;
            }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < P; p++) {
        float* out = total + p * mC;
        for (int64_t k = 0; k < K; k++) {
            const float* a = coef + k * mC;
            const float* z = centre + k * mC;
            if (once[k]) {
                const float* x = xs[k] + p * sources * C;
                for (int64_t e = 0; e < m; e++) {
                    const float* xe = x + (e / r) * C;
                    float* o = out + e * C;
                    const float* ae = a + e * C;
                    const float* ze = z + e * C;
                    if (k == 0)
                        for (int64_t c = 0; c < C; c++) o[c] = ae[c] * (xe[c] - ze[c]);
                    else
                        for (int64_t c = 0; c < C; c++) o[c] += ae[c] * (xe[c] - ze[c]);
                }
            } else {
                const float* x = xs[k] + p * mC;
                if (k == 0)
                    for (int64_t j = 0; j < mC; j++) out[j] = a[j] * (x[j] - z[j]);
                else
                    for (int64_t j = 0; j < mC; j++) out[j] += a[j] * (x[j] - z[j]);
            }
        }
    }
}
