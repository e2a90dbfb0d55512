/* Training batch norm over a channels_last float32 tensor, forward and backward (nas.ops.train_norm,
   search.speed.native_norm).

   The tensor is x[p, c]: P = N*H*W pixels of C channels each, channels innermost. PyTorch's channels_last kernel
   vectorizes along the channels and, where C is not a multiple of the vector width (PC-DARTS's mixed operations
   on 4, 8 or 12 channels), runs several times slower than its channels-first one; at multiples of 16 it is as
   fast as this one (a DARTS step is no faster with this one at every width, bench/README.md), so the search calls
   this one for the others only (nas.ops.native_norm_applies). Here every pass runs over the
   flat array in blocks of B = k*C values (k whole pixels, B at least 64): the channel of value b in a block is
   b % C, the same in every block, so each pass is an inner loop of fixed length B over per-block patterns
   (accumulators, mean, scale), which the compiler vectorizes whatever C is.

   Forward:  mean = sum x / P, var = sum (x - mean)^2 / P (two passes; with y NULL, the statistics alone), invstd = 1 / sqrt(var + eps),
             y = (x - mean) * invstd * scale + shift; the running statistics, where given, move by momentum
             towards mean and the unbiased variance, as PyTorch's kernel moves them.
   Backward: with g the output's gradient, xh = (x - mean) * invstd, Sg = sum g, Sgx = sum g * (x - mean):
             d_shift = Sg, d_scale = Sgx * invstd,
             dx = scale * invstd * (g - Sg / P - (x - mean) * invstd^2 * Sgx / P).
   Both write their output as (x - mean) times a per-channel factor plus per-channel terms, not x times one, so
   that a large mean does not cancel digits.

   Each thread sums its own run of pixels into its own buffer; the buffers are added at the end in a fixed order,
   so the result does not depend on timing. A failed allocation leaves NaN in the outputs. Built and loaded by
   nas/kernels.py. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

/* Sums run in float over CHUNK blocks at a time, in the vector registers' own width, then go into double: as fast as
   float sums, and as exact as double ones to within a float sum of CHUNK terms. */
#define CHUNK 32

static int64_t block_pixels(int64_t C) { return C >= 64 ? 1 : (64 + C - 1) / C; }

/* The threads' block accumulators acc[thread][B] added channel by channel, in a fixed order. */
static void fold(const double* acc, int threads, int64_t B, int64_t C, double* out) {
    for (int64_t c = 0; c < C; c++) out[c] = 0.0;
    for (int t = 0; t < threads; t++)
        for (int64_t b = 0; b < B; b++) out[b % C] += acc[(size_t)t * (size_t)B + (size_t)b];
}

static void fill_nan(float* p, int64_t n) {
    if (p)
        for (int64_t i = 0; i < n; i++) p[i] = NAN;
}

/* acc[thread][B]: each thread's sums, block position by block position, over its run of pixels of x (centre NULL)
   or of (x - centre)^2 (centre: the per-block pattern of the mean); the pixels past the last whole block go to the
   last thread. */
static void channel_sums(const float* x, const float* centre, double* acc, float* scratch, int64_t P, int64_t C,
                         int64_t k, int threads) {
    const int64_t B = k * C, blocks = P / k;
    for (size_t i = 0; i < (size_t)threads * (size_t)B; i++) acc[i] = 0.0;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        double* a = acc + (size_t)t * (size_t)B;
        const int64_t begin = blocks * t / nt, end = blocks * (t + 1) / nt;
        float* f = scratch + (size_t)t * (size_t)B;
        for (int64_t i0 = begin; i0 < end; i0 += CHUNK) {
            const int64_t i1 = i0 + CHUNK < end ? i0 + CHUNK : end;
            for (int64_t b = 0; b < B; b++) f[b] = 0.0f;
            for (int64_t i = i0; i < i1; i++) {
                const float* xb = x + i * B;
                if (centre) {
                    for (int64_t b = 0; b < B; b++) {
                        const float d = xb[b] - centre[b];
                        f[b] += d * d;
                    }
                } else {
                    for (int64_t b = 0; b < B; b++) f[b] += xb[b];
                }
            }
            for (int64_t b = 0; b < B; b++) a[b] += f[b];
        }
        if (t == nt - 1)
            for (int64_t v = blocks * B; v < P * C; v++) {
                const double d = centre ? (double)x[v] - (double)centre[v % C] : 0.0;
                a[v % C] += centre ? d * d : (double)x[v];
            }
    }
}

void norm_cl_forward_f32(const float* x, const float* scale, const float* shift, float* y, float* mean_out,
                         float* invstd_out, float* running_mean, float* running_var, int64_t P, int64_t C, double eps,
                         double momentum, int threads) {
    const int64_t k = block_pixels(C), B = k * C, blocks = P / k;
    double* acc = malloc((size_t)threads * (size_t)B * sizeof(double));
    float* scratch = malloc((size_t)threads * (size_t)B * sizeof(float));
    double* mean = malloc((size_t)C * sizeof(double));
    double* var = malloc((size_t)C * sizeof(double));
    float* pm = malloc((size_t)B * sizeof(float));
    float* pa = malloc((size_t)B * sizeof(float));
    float* pc = malloc((size_t)B * sizeof(float));
    if (!acc || !scratch || !mean || !var || !pm || !pa || !pc) {
        fill_nan(y, P * C);
        fill_nan(mean_out, C);
        fill_nan(invstd_out, C);
        goto done;
    }
    channel_sums(x, NULL, acc, scratch, P, C, k, threads);
    fold(acc, threads, B, C, mean);
    for (int64_t c = 0; c < C; c++) mean[c] /= (double)P;
    for (int64_t b = 0; b < B; b++) pm[b] = (float)mean[b % C];
    channel_sums(x, pm, acc, scratch, P, C, k, threads);
    fold(acc, threads, B, C, var);
    for (int64_t c = 0; c < C; c++) {
        const double invstd = 1.0 / sqrt(var[c] / (double)P + eps);
        const double s = scale ? (double)scale[c] : 1.0, h = shift ? (double)shift[c] : 0.0;
        mean_out[c] = (float)mean[c];
        invstd_out[c] = (float)invstd;
        for (int64_t j = 0; j < k; j++) {
            pa[j * C + c] = (float)(invstd * s);
            pc[j * C + c] = (float)h;
        }
        if (running_mean)
            running_mean[c] = (float)((1.0 - momentum) * running_mean[c] + momentum * mean[c]);
        if (running_var)
            running_var[c] = (float)((1.0 - momentum) * running_var[c] + momentum * var[c] / (double)(P > 1 ? P - 1 : 1));
    }
#pragma omp parallel num_threads(threads) if (y)
    if (y) {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t begin = blocks * t / nt, end = blocks * (t + 1) / nt;
        for (int64_t i = begin; i < end; i++) {
            const float* xb = x + i * B;
            float* yb = y + i * B;
            for (int64_t b = 0; b < B; b++) yb[b] = (xb[b] - pm[b]) * pa[b] + pc[b];
        }
        if (t == nt - 1)
            for (int64_t v = blocks * B; v < P * C; v++) y[v] = (x[v] - pm[v % C]) * pa[v % C] + pc[v % C];
    }
done:
    free(acc);
    free(scratch);
    free(mean);
    free(var);
    free(pm);
    free(pa);
    free(pc);
}

/* d_x, d_scale, d_shift each NULL where not wanted; scale NULL for an affine-free norm (a scale of 1). */
void norm_cl_backward_f32(const float* g, const float* x, const float* scale, const float* mean_in,
                          const float* invstd_in, float* d_x, float* d_scale, float* d_shift, int64_t P, int64_t C,
                          int threads) {
    const int64_t k = block_pixels(C), B = k * C, blocks = P / k;
    double* acc = calloc((size_t)threads * (size_t)B * 2, sizeof(double));
    float* scratch = malloc((size_t)threads * (size_t)B * 2 * sizeof(float));
    double* sg = malloc((size_t)C * sizeof(double));
    double* sgx = malloc((size_t)C * sizeof(double));
    float* pm = malloc((size_t)B * sizeof(float));
    float* pa = malloc((size_t)B * sizeof(float));
    float* pb = malloc((size_t)B * sizeof(float));
    float* pc = malloc((size_t)B * sizeof(float));
    if (!acc || !scratch || !sg || !sgx || !pm || !pa || !pb || !pc) {
        fill_nan(d_x, P * C);
        fill_nan(d_scale, C);
        fill_nan(d_shift, C);
        goto done;
    }
    for (int64_t b = 0; b < B; b++) pm[b] = mean_in[b % C];
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        double* a = acc + (size_t)t * (size_t)B * 2;
        double* ax = a + B;
        const int64_t begin = blocks * t / nt, end = blocks * (t + 1) / nt;
        float* f = scratch + (size_t)t * (size_t)B * 2;
        float* fx = f + B;
        for (int64_t i0 = begin; i0 < end; i0 += CHUNK) {
            const int64_t i1 = i0 + CHUNK < end ? i0 + CHUNK : end;
            for (int64_t b = 0; b < 2 * B; b++) f[b] = 0.0f;
            for (int64_t i = i0; i < i1; i++) {
                const float* gb = g + i * B;
                const float* xb = x + i * B;
                for (int64_t b = 0; b < B; b++) {
                    f[b] += gb[b];
                    fx[b] += gb[b] * (xb[b] - pm[b]);
                }
            }
            for (int64_t b = 0; b < B; b++) {
                a[b] += f[b];
                ax[b] += fx[b];
            }
        }
        if (t == nt - 1)
            for (int64_t v = blocks * B; v < P * C; v++) {
                a[v % C] += g[v];
                ax[v % C] += (double)g[v] * (double)(x[v] - pm[v % C]);
            }
    }
    for (int64_t c = 0; c < C; c++) sg[c] = sgx[c] = 0.0;
    for (int t = 0; t < threads; t++)
        for (int64_t b = 0; b < B; b++) {
            sg[b % C] += acc[(size_t)t * (size_t)B * 2 + (size_t)b];
            sgx[b % C] += acc[(size_t)t * (size_t)B * 2 + (size_t)B + (size_t)b];
        }
    for (int64_t c = 0; c < C; c++) {
        const double invstd = (double)invstd_in[c], s = scale ? (double)scale[c] : 1.0;
        if (d_shift) d_shift[c] = (float)sg[c];
        if (d_scale) d_scale[c] = (float)(sgx[c] * invstd);
        const double a = s * invstd, bx = -a * invstd * invstd * sgx[c] / (double)P;
        const double cc = -a * sg[c] / (double)P;
        for (int64_t j = 0; j < k; j++) {
            pa[j * C + c] = (float)a;
            pb[j * C + c] = (float)bx;
            pc[j * C + c] = (float)cc;
        }
    }
    if (d_x) {
#pragma omp parallel num_threads(threads)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            const int64_t begin = blocks * t / nt, end = blocks * (t + 1) / nt;
            for (int64_t i = begin; i < end; i++) {
                const float* gb = g + i * B;
                const float* xb = x + i * B;
                float* db = d_x + i * B;
                for (int64_t b = 0; b < B; b++) db[b] = gb[b] * pa[b] + (xb[b] - pm[b]) * pb[b] + pc[b];
            }
            if (t == nt - 1)
                for (int64_t v = blocks * B; v < P * C; v++) d_x[v] = g[v] * pa[v % C] + (x[v] - pm[v % C]) * pb[v % C] + pc[v % C];
        }
    }
done:
    free(acc);
    free(scratch);
    free(sg);
    free(sgx);
    free(pm);
    free(pa);
    free(pb);
    free(pc);
}
