/* Max and average pooling over float32 tensors whose channels are dense (channels_last, or a run of channels cut
   from a channels_last tensor), forward (nas.ops.pool2d, search.speed.native_pool).

   PyTorch's channels_last pooling vectorizes along the channels: at the 4, 8 or 12 channels of PC-DARTS's
   candidates (C/K) a 3x3 pooling of [16, 4, 32, 32] takes 100 times as long as copying it (bench/README.md). Here
   a stride-1 pooling runs over one output row at a time as a flat array of OW*C values: each input row inside the
   window is copied into a buffer padded by p pixels on either side (-inf for the max, 0 for the average), and then
   window column kw of output value j is buffer value j + kw*C, the same offset for every value, so the inner loops
   run over the flat row whatever C is and the compiler vectorizes them. At a larger stride (a reduction's 3x3,
   PC-DARTS's 2x2 of the passed-by channels) the row is pooled so at stride 1 and every s-th pixel kept. Only where
   ceil_mode clips a last window past the padded row does a pooling loop pixel by pixel, the channels innermost.

   The results are PyTorch's: the maximum is the first one in the window's row-major order, a NaN taking the place
   of whatever came before it (PyTorch's rule), and its index is the input position ih*W + iw within the plane, as
   max_pool2d_with_indices writes it, so PyTorch's backward takes it; where every input of a window is -inf the index
   is the window's first position inside the input. The average adds the window's inputs in the same order and
   divides by how many lie inside the input (count_include_pad=False); with ceil_mode's clipped last windows the same.
   Output rows are shared out among the threads. A failed allocation leaves NaN in the output. Built and loaded by
   nas/kernels.py. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Input row (W pixels at stride sw, C dense channels each) into a dense one; the channel counts PC-DARTS's candidates
   have as fixed-length copies (a loop of unknown length C per pixel costs more than the pooling). */
static void copy_row(float* into, const float* row, int64_t C, int64_t W, int64_t sw) {
    if (sw == C) {
        memcpy(into, row, (size_t)(W * C) * sizeof(float));
    } else if (C == 4) {
        for (int64_t iw = 0; iw < W; iw++) memcpy(into + iw * 4, row + iw * sw, 4 * sizeof(float));
    } else if (C == 8) {
        for (int64_t iw = 0; iw < W; iw++) memcpy(into + iw * 8, row + iw * sw, 8 * sizeof(float));
    } else if (C == 16) {
        for (int64_t iw = 0; iw < W; iw++) memcpy(into + iw * 16, row + iw * sw, 16 * sizeof(float));
    } else {
        for (int64_t iw = 0; iw < W; iw++) memcpy(into + iw * C, row + iw * sw, (size_t)C * sizeof(float));
    }
}

/* One output row by the flat padded buffers (see above): the row at stride 1 over J1 = OW1*C values into v (and
   at), then, at stride s, every s-th pixel of it into y (and idx); at stride 1 v and at are y and idx. */
static void row_flat(const float* x, float* y, int64_t* idx, float* v, int64_t* at, const int64_t* column,
                     const float* inside, float* buf, int64_t C, int64_t H, int64_t W, int64_t sh, int64_t sw,
                     int64_t OW, int64_t OW1, int64_t k, int64_t s, int64_t p, int64_t oh, int is_max) {
    const int64_t J1 = OW1 * C, hs = max64(oh * s - p, 0), he = min64(oh * s - p + k, H);
    const float fill = is_max ? -INFINITY : 0.0f;
    for (int64_t j = 0; j < p * C; j++) buf[j] = buf[(p + W) * C + j] = fill;
    for (int64_t j = 0; j < J1; j++) v[j] = fill;
    if (is_max)
        for (int64_t j = 0; j < J1; j++) at[j] = hs * W + max64(column[j] - p, 0);
    for (int64_t ih = hs; ih < he; ih++) {
        const float* row = x + ih * sh;
        float* into = buf + p * C;
        copy_row(into, row, C, W, sw);
        for (int64_t kw = 0; kw < k; kw++) {
            const float* b = buf + kw * C;
            if (is_max) {
                const int64_t base = ih * W + kw - p;
                for (int64_t j = 0; j < J1; j++) {
                    const float u = b[j];
                    const int take = (u > v[j]) | (u != u);
                    v[j] = take ? u : v[j];
                    at[j] = take ? base + column[j] : at[j];
                }
            } else {
                for (int64_t j = 0; j < J1; j++) v[j] += b[j];
            }
        }
    }
    if (!is_max) {
        const float rows = (float)(he - hs);
        for (int64_t j = 0; j < J1; j++) v[j] = v[j] / (rows * inside[j]);
    }
    if (s == 1) return;
    for (int64_t ow = 0; ow < OW; ow++)
        for (int64_t c = 0; c < C; c++) {
            y[ow * C + c] = v[ow * s * C + c];
            if (is_max) idx[ow * C + c] = at[ow * s * C + c];
        }
}

/* One output row of any other pooling: pixel by pixel, the channels innermost. */
static void row_general(const float* x, float* y, int64_t* idx, int64_t C, int64_t H, int64_t W, int64_t sh,
                        int64_t sw, int64_t OW, int64_t k, int64_t s, int64_t p, int64_t oh, int is_max) {
    const int64_t hs = max64(oh * s - p, 0), he = min64(oh * s - p + k, H);
    for (int64_t ow = 0; ow < OW; ow++) {
        const int64_t ws = max64(ow * s - p, 0), we = min64(ow * s - p + k, W);
        float* out = y + ow * C;
        int64_t* at = is_max ? idx + ow * C : NULL;
        for (int64_t c = 0; c < C; c++) out[c] = is_max ? -INFINITY : 0.0f;
        if (is_max)
            for (int64_t c = 0; c < C; c++) at[c] = hs * W + ws;
        for (int64_t ih = hs; ih < he; ih++)
            for (int64_t iw = ws; iw < we; iw++) {
                const float* in = x + ih * sh + iw * sw;
                if (is_max) {
                    const int64_t here = ih * W + iw;
                    for (int64_t c = 0; c < C; c++) {
                        const float v = in[c];
                        const int take = (v > out[c]) | (v != v);
                        out[c] = take ? v : out[c];
                        at[c] = take ? here : at[c];
                    }
                } else {
                    for (int64_t c = 0; c < C; c++) out[c] += in[c];
                }
            }
        if (!is_max) {
            const float count = (float)((he - hs) * (we - ws));
            for (int64_t c = 0; c < C; c++) out[c] = out[c] / count;
        }
    }
}

/* x: N x H x W x C at strides sn, sh, sw (the channels dense); y and, for the max, idx: N x OH x OW x C, dense. A
   k x k window at stride s with padding p; is_max: max pooling (with idx), else the average. */
void pool2d_forward_f32(const float* x, float* y, int64_t* idx, int64_t N, int64_t C, int64_t H, int64_t W,
                        int64_t sn, int64_t sh, int64_t sw, int64_t OH, int64_t OW, int64_t k, int64_t s, int64_t p,
                        int is_max, int threads) {
    const int64_t J = OW * C, OW1 = W + 2 * p - k + 1, J1 = OW1 * C;
    /* the flat rows hold every window the output needs (ceil_mode's clipped last windows do not fit them) */
    const int flat = k <= W + 2 * p && (OW - 1) * s + k <= W + 2 * p;
    int64_t* column = NULL;
    float* inside = NULL;
    if (flat) {
        column = malloc((size_t)J1 * sizeof(int64_t));
        inside = malloc((size_t)J1 * sizeof(float));
        if (column == NULL || inside == NULL) goto failed;
        for (int64_t j = 0; j < J1; j++) {
            const int64_t ow = j / C;
            column[j] = ow;
            inside[j] = (float)(min64(ow - p + k, W) - max64(ow - p, 0));
        }
    }
    int lost = 0;
#pragma omp parallel num_threads(threads) reduction(| : lost)
    {
        float* buf = flat ? malloc((size_t)((W + 2 * p) * C) * sizeof(float)) : NULL;
        float* v = flat && s > 1 ? malloc((size_t)J1 * sizeof(float)) : NULL;
        int64_t* at = flat && s > 1 && is_max ? malloc((size_t)J1 * sizeof(int64_t)) : NULL;
        const int ready = flat && buf != NULL && (s == 1 || (v != NULL && (!is_max || at != NULL)));
        if (flat && !ready) lost = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < N * OH; r++) {
            const int64_t n = r / OH, oh = r % OH;
            float* out = y + r * J;
            int64_t* where = is_max ? idx + r * J : NULL;
            if (!flat)
                row_general(x + n * sn, out, where, C, H, W, sh, sw, OW, k, s, p, oh, is_max);
            else if (ready)
                row_flat(x + n * sn, out, where, s == 1 ? out : v, s == 1 ? where : at, column, inside, buf, C, H, W,
                         sh, sw, OW, OW1, k, s, p, oh, is_max);
        }
        free(buf);
        free(v);
        free(at);
    }
    if (!lost) {
        free(column);
        free(inside);
        return;
    }
failed:
    free(column);
    free(inside);
    for (int64_t j = 0; j < N * OH * J; j++) y[j] = NAN;
}
