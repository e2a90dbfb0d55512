/* A grouped 1x1 convolution whose groups are a few channels wide, for channels_last float32 tensors
   (nas.ops.grouped_pointwise, search.speed.native_pointwise).

   The batched edges (nas/batched.py) run each candidate's pointwise convolution as one convolution over the edges'
   stacked channels, a group per edge; under PC-DARTS a group is C/K = 2, 4 or 8 channels wide, and oneDNN's
   grouped kernel then runs at a fraction of the memory's speed (at 16, DARTS's width, it is 1.2-1.5x slower than
   this one). The tensor is x[p, c]: P pixels of C channels each,
   channels innermost, in groups of w channels; the weight is W[j, i], output channel j, input i of its group.

     forward:               y[p, j] = sum over i < w of W[j, i] * x[p, g(j) + i]             g(j) = j - j % w
     input gradient:        y[p, j] = sum over o < w of W[g(j) + o, j % w] * x[p, g(j) + o]  (W transposed)
     weight gradient:  dW[j, i] = sum over p of x[p, g(j) + i] * dy[p, j]

   With w = 2, 4, 8 or 16 (dividing 16) and C a multiple of w, the whole tensor, read flat, is a run of groups of w
   values, so every block of 16 consecutive values holds whole groups whatever C is, and x[p, g(j) + i] over a
   block's lanes is one permutation of the block (lane l takes lane l - l % w + i): each output block is w
   permutations and w fused multiply-adds by per-lane weights. Lane l of block b is channel (16 b + l) % C, so the
   lane weights repeat every S = C / gcd(C, 16) blocks. The last values, fewer than a block, are read zero-padded.
   With w = 16 a block is one group, and the permutation is a broadcast of one input value, read from memory. The
   weight gradient keeps each period position's w sums in registers over 256 periods at a time, then in double,
   and adds the threads' sums in a fixed order, so the result does not depend on timing. A failed allocation, or a
   width that is not 2, 4, 8 or 16, leaves NaN in the output.
   Built and loaded by nas/kernels.py. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define LANES 16
#define CHUNK 256 /* periods summed in float before they go into double */
typedef float vec __attribute__((vector_size(LANES * sizeof(float)), aligned(4), may_alias));
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline vec load(const float* p) { return *(const vec*)p; }

/* Lane l of the result is lane index[l] of v: one instruction with AVX-512 (gcc and clang alike), else lane by lane. */
static inline vec permute(vec v, ivec index) {
#if defined(__AVX512F__)
    return (vec)_mm512_permutexvar_ps((__m512i)index, (__m512)v);
#else
    vec r;
    for (int l = 0; l < LANES; l++) r[l] = v[index[l]];
    return r;
#endif
}
static inline void store(float* p, vec v) { *(vec*)p = v; }

/* The weight of output channel j for input (or, transposed, output) i of its group: what multiplies x[g(j) + i]. */
static inline float tap(const float* W, int64_t j, int64_t i, int64_t w, int transposed) {
    const int64_t g = j - j % w;
    return transposed ? W[(g + i) * w + j % w] : W[j * w + i];
}

static int64_t gcd64(int64_t a, int64_t b) { return b ? gcd64(b, a % b) : a; }

static inline void index_vectors(ivec* index, int64_t w) {
    for (int64_t i = 0; i < w; i++)
        for (int l = 0; l < LANES; l++) index[i][l] = (int32_t)(l - l % w + i);
}

/* The per-lane weights of the S blocks of a period: Wv[s][i][l] multiplies lane l - l % w + i of a block s mod S,
   whose lane l is channel (16 s + l) % C. */
static float* lane_weights(const float* W, int64_t C, int64_t w, int64_t S, int transposed) {
    float* Wv = malloc((size_t)S * (size_t)w * LANES * sizeof(float));
    if (Wv)
        for (int64_t s = 0; s < S; s++)
            for (int64_t i = 0; i < w; i++)
                for (int l = 0; l < LANES; l++)
                    Wv[(s * w + i) * LANES + l] = tap(W, (s * LANES + l) % C, i, w, transposed);
    return Wv;
}

static inline vec load_part(const float* p, int64_t n) {
    vec v = {0};
    for (int64_t l = 0; l < n; l++) v[l] = p[l];
    return v;
}

/* One block: w (a constant where inlined) permutations and multiply-adds. */
/* One block of a 16-wide group: each input value broadcast from memory times its weights. */
static inline __attribute__((always_inline)) vec block_wide(const float* xb, const float* wb) {
    vec acc = load(wb) * xb[0];
    for (int64_t i = 1; i < LANES; i++) acc += load(wb + i * LANES) * xb[i];
    return acc;
}

static inline __attribute__((always_inline)) vec block_out(vec xv, const float* wb, const ivec* index, const int64_t w) {
    vec acc = load(wb) * permute(xv, index[0]);
    for (int64_t i = 1; i < w; i++) acc += load(wb + i * LANES) * permute(xv, index[i]);
    return acc;
}

/* y = the forward (transposed 0) or the input gradient (transposed 1) of x; W: (C, w), w = 2, 4, 8 or 16, C a
   multiple of w. */
void pointwise_grouped_f32(const float* x, const float* W, float* y, int64_t P, int64_t C, int64_t w, int transposed,
                           int threads) {
    const int64_t S = C / gcd64(C, LANES), n = P * C, blocks = n / LANES;
    float* Wv = (LANES % w || C % w) ? NULL : lane_weights(W, C, w, S, transposed);
    if (!Wv) {
        for (int64_t v = 0; v < n; v++) y[v] = NAN;
        return;
    }
    ivec index[16];
    index_vectors(index, w);
    if (w == LANES) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < blocks; b++) store(y + b * LANES, block_wide(x + b * LANES, Wv + (b % S) * w * LANES));
        free(Wv);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const vec xv = load(x + b * LANES);
        const float* wb = Wv + (b % S) * w * LANES;
        store(y + b * LANES, w == 2 ? block_out(xv, wb, index, 2)
                             : w == 4 ? block_out(xv, wb, index, 4)
                                      : block_out(xv, wb, index, 8));
    }
    if (n % LANES) { /* the last values, fewer than a block: whole groups, read zero-padded */
        const vec acc = block_out(load_part(x + blocks * LANES, n % LANES), Wv + (blocks % S) * w * LANES, index, w);
        for (int64_t l = 0; l < n % LANES; l++) y[blocks * LANES + l] = acc[l];
    }
    free(Wv);
}

/* Blocks [b0, b1) of one period position s (every S-th block): their w sums, in registers where w is a constant. */
static inline __attribute__((always_inline)) void position_sums(const float* x, const float* dy, float* f,
                                                                const ivec* index, int64_t b0, int64_t b1, int64_t S,
                                                                const int64_t w) {
    vec acc[16];
    for (int64_t i = 0; i < w; i++) acc[i] = (vec){0};
    if (w == LANES) {
        for (int64_t b = b0; b < b1; b += S) {
            const float* xb = x + b * LANES;
            const vec gv = load(dy + b * LANES);
            for (int64_t i = 0; i < LANES; i++) acc[i] += gv * xb[i];
        }
    } else {
        for (int64_t b = b0; b < b1; b += S) {
            const vec xv = load(x + b * LANES), gv = load(dy + b * LANES);
            for (int64_t i = 0; i < w; i++) acc[i] += gv * permute(xv, index[i]);
        }
    }
    for (int64_t i = 0; i < w; i++) store(f + i * LANES, load(f + i * LANES) + acc[i]);
}

/* dW (C, w) = the weight gradient, from the input x and the output's gradient dy. */
void pointwise_grouped_weight_grad_f32(const float* x, const float* dy, float* dW, int64_t P, int64_t C, int64_t w,
                                       int threads) {
    const int64_t S = C / gcd64(C, LANES), n = P * C, periods = n / (S * LANES), size = S * w * LANES;
    double* sums = calloc((size_t)threads * (size_t)size, sizeof(double));
    float* partial = malloc((size_t)threads * (size_t)size * sizeof(float));
    if (!sums || !partial || LANES % w || C % w) {
        for (int64_t v = 0; v < C * w; v++) dW[v] = NAN;
        free(sums);
        free(partial);
        return;
    }
    ivec index[16];
    index_vectors(index, w);
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        double* sum = sums + (size_t)t * (size_t)size;
        float* f = partial + (size_t)t * (size_t)size; /* [s][i][lane] */
        const int64_t begin = periods * t / nt, end = periods * (t + 1) / nt;
        for (int64_t q0 = begin; q0 < end; q0 += CHUNK) { /* CHUNK periods at a time in float, then in double */
            const int64_t q1 = q0 + CHUNK < end ? q0 + CHUNK : end;
            for (int64_t v = 0; v < size; v++) f[v] = 0.0f;
            for (int64_t s = 0; s < S; s++) {
                float* fs = f + s * w * LANES;
                const int64_t b0 = q0 * S + s, b1 = q1 * S;
                if (w == 2)
                    position_sums(x, dy, fs, index, b0, b1, S, 2);
                else if (w == 4)
                    position_sums(x, dy, fs, index, b0, b1, S, 4);
                else if (w == 8)
                    position_sums(x, dy, fs, index, b0, b1, S, 8);
                else
                    position_sums(x, dy, fs, index, b0, b1, S, 16);
            }
            for (int64_t v = 0; v < size; v++) sum[v] += f[v];
        }
        if (t == nt - 1) /* the values past the last whole period, zero-padded to whole blocks */
            for (int64_t b = periods * S; b * LANES < n; b++) {
                const int64_t left = n - b * LANES;
                const vec xv = load_part(x + b * LANES, left < LANES ? left : LANES);
                const vec gv = load_part(dy + b * LANES, left < LANES ? left : LANES);
                for (int64_t i = 0; i < w; i++) {
                    const vec product = gv * permute(xv, index[i]);
                    for (int l = 0; l < LANES; l++) sum[((b % S) * w + i) * LANES + l] += product[l];
                }
            }
    }
    for (int64_t j = 0; j < C; j++)
        for (int64_t i = 0; i < w; i++) dW[j * w + i] = 0.0f;
    double* total = calloc((size_t)size, sizeof(double));
    if (!total) {
        for (int64_t v = 0; v < C * w; v++) dW[v] = NAN;
    } else {
        for (int t = 0; t < threads; t++)
            for (int64_t v = 0; v < size; v++) total[v] += sums[(size_t)t * (size_t)size + (size_t)v];
        double* by_channel = calloc((size_t)C * (size_t)w, sizeof(double));
        if (by_channel) {
            for (int64_t s = 0; s < S; s++)
                for (int64_t i = 0; i < w; i++)
                    for (int l = 0; l < LANES; l++)
                        by_channel[((s * LANES + l) % C) * w + i] += total[(s * w + i) * LANES + l];
            for (int64_t v = 0; v < C * w; v++) dW[v] = (float)by_channel[v];
        } else {
            for (int64_t v = 0; v < C * w; v++) dW[v] = NAN;
        }
        free(by_channel);
    }
    free(total);
    free(sums);
    free(partial);
}
