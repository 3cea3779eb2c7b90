"""The C kernels of a decode step on x86 CPUs with AVX2: products with fp32 / bf16 / int8 weights, RMSNorm,
attention, a whole Llama layer in one call, and the server's per-row LoRA.

    y[m, o] = Σᵢ W[o, i] · x[m, i]                            fp32 (3 x 4 register tiles for 9-64 rows; q, k, v
                                                             in one call, gate and up with the silu in one)
    y[m, o] = Σᵢ float(W[o, i]) · x[m, i]                     bf16: float(w) is w's 16 bits shifted up by 16
    y[m, o] = Σ_g scale[o, g] · Σ_{i in g} Q[o, i] · x[m, i]    int8: groups of 32 inputs (llama.cpp's Q8_0 block)
    rms_norm(x) = x / √(mean(x²) + ε) · w                      Llama's RMSNorm, fp32
    attend: rope(q), rope(k) at each row's position; k, v written into the static cache there;
            o = softmax(q Kᵀ · scale) V over the row's slots 0..pos: chunks of 64 slots, a running maximum, each
            key and value read once for the heads of its group
    layer:  x += attend(rms(x)) Woᵀ; x += (silu(rms(x) Wgᵀ) · rms(x) Wuᵀ) Wdᵀ   one OpenMP region
    lora_rows: out[b, t] += (x[b, t] · Aᵀ[idx[b]]) · (sB)ᵀ[idx[b]]   each row's adapter read in place in the stacks,
            rows on one adapter in pairs (its A and B read once for two rows)

A decode step multiplies each weight by a few activation rows, so it is bound by reading the weights: stored in
bf16 or int8 it reads half or a quarter of fp32's bytes. PyTorch has no CPU kernel for bf16 or int8 weights times
fp32 activations that reads only the stored bytes (its bf16 products run emulated on AVX2-only CPUs, and widening
blocks of rows to fp32 first, `StoredWeight`'s fallback, costs a conversion pass). These widen in registers:
each output row's weights are read once and fused into the dot products of every activation row (at most
`MAX_ROWS`; prefills take the fallback's blocked matmul). fp32 weights come here too where torch's products are
not MKL's on an Intel CPU (`FP32`: MKL reads them at half the memory's speed on AMD). The rest of a decode step is
many small ops, each costing more to dispatch than to compute: RMSNorm and the attention block become two calls,
and a layer whose rows have no adapter one call. The server's batches give each row its own adapter:
`lora_rows` reads every row's A and B where they lie in the stacked weights (Punica's SGMV), with no gathered
copies, and adds the delta into the base layer's output, in fp32 or bf16, in one call a layer.

Built once per machine with the system's C compiler (`cc -O3 -mavx2 -mfma -fopenmp`) into `CACHE`,
$LORAFORGE_CACHE/kernels (default ~/.cache/loraforge/kernels; written atomically: processes may race), and called
through ctypes on contiguous tensors; loops over output rows or heads run on `torch.get_num_threads()` OpenMP
threads (the process's one libgomp). Where there is no compiler, no AVX2/FMA, or LORAFORGE_CPU_KERNELS=0,
`available()` is False and the torch ops run instead; where the cache folder cannot be written, too, after one
warning line that names the folder and the fix. Sums run in another order than torch's: results agree to fp32 rounding
(tests/inference/test_cpu_kernels.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from loraforge.models import cache_dir
from loraforge.utils.files import DiskError, fsync_tree

MAX_ROWS = 16
"""Activation rows a call takes; more (prefills) go to the blocked matmul, which reuses each weight block better."""
MAX_TILED_ROWS = 64
"""fp32 weights: rows `linear` takes through the tiled product (a server's batch); more go to MKL. On the 2-core
AMD EPYC, SmolLM2's shapes: 17-64 rows 80-124 GFLOP/s against MKL's 42-108; at 128-256 rows about even."""
TILED_FROM = 8
"""fp32 weights: more rows than this take the tiled product, fewer one dot product per row (12-16 rows: the tiles
1.1-1.6x faster; 2-8 rows: even or slower, same machine)."""

SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#define PREFETCH 2048  /* bytes ahead in the weight stream (past a row's end: the next row's, as rows are contiguous) */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {  /* the sums of four vectors, as 4 floats */
    __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d), abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

static inline __m256 widen_bf16(const uint16_t *p) {  /* 8 bf16 -> 8 fp32: the bits shifted up by 16 */
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

static inline __m256 widen_i8(const int8_t *p) {  /* 8 int8 -> 8 fp32 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* dot products of one weight row with M activation rows: every accumulator in a register (the row is read from
   memory for m = 0 and from L1 after) */
static inline float dot_bf16(const uint16_t *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 32) {  /* 64 bytes of weights: one cache line, the one PREFETCH ahead asked for */
        _mm_prefetch((const char *)(w + i) + PREFETCH, _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(widen_bf16(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(widen_bf16(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(widen_bf16(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(widen_bf16(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

static inline float dot_f32(const float *w, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 32) {  /* no software prefetch: it measured slower than the hardware's alone */
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

static inline float dot_int8(const int8_t *q, const float *s, const float *x, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t g = 0; g < n / 32; g++) {
        const int8_t *qg = q + g * 32;
        const float *xg = x + g * 32;
        _mm_prefetch((const char *)qg + PREFETCH, _MM_HINT_T0);
        __m256 d0 = _mm256_mul_ps(widen_i8(qg), _mm256_loadu_ps(xg));
        __m256 d1 = _mm256_mul_ps(widen_i8(qg + 8), _mm256_loadu_ps(xg + 8));
        d0 = _mm256_fmadd_ps(widen_i8(qg + 16), _mm256_loadu_ps(xg + 16), d0);
        d1 = _mm256_fmadd_ps(widen_i8(qg + 24), _mm256_loadu_ps(xg + 24), d1);
        if (g & 1) a1 = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), _mm256_add_ps(d0, d1), a1);
        else a0 = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), _mm256_add_ps(d0, d1), a0);
    }
    return hsum(_mm256_add_ps(a0, a1));
}

/* row o of W (out, in) stored as kind 0 fp32, 1 bf16 or 2 int8 with group scales S (out, in / 32), dotted with x */
static inline float dot_row(int kind, const void *W, const float *S, int64_t o, const float *x, int64_t in) {
    if (kind == 0) return dot_f32((const float *)W + o * in, x, in);
    if (kind == 1) return dot_bf16((const uint16_t *)W + o * in, x, in);
    return dot_int8((const int8_t *)W + o * in, S + o * (in / 32), x, in);
}

/* The bodies below share out their loops with `omp for` (orphaned): called inside a parallel region they split
   the loop over its threads and end at a barrier; the exported functions wrap each in a region of its own, and
   `layer` runs a whole decoder layer's decode step in one region (no Python or thread start-up between its parts). */

/* Three products of one input (q, k, v): y_k (M, n_k) = x (M, in) W_k^T, the weights stored alike (kind); a weight
   with n_k = 0 is skipped. in % 32 == 0. */
static void gemv3_for(int kind, const void *W0, const float *S0, int64_t n0, const void *W1, const float *S1,
                      int64_t n1, const void *W2, const float *S2, int64_t n2, const float *x, float *y0, float *y1,
                      float *y2, int64_t in, int64_t M) {
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < n0 + n1 + n2; t++) {
        const void *W = W0; const float *S = S0; float *y = y0; int64_t o = t, n = n0;
        if (o >= n0) { o -= n0; W = W1; S = S1; y = y1; n = n1;
            if (o >= n1) { o -= n1; W = W2; S = S2; y = y2; n = n2; } }
        for (int64_t m = 0; m < M; m++) y[m * n + o] = dot_row(kind, W, S, o, x + m * in, in);
    }
}

void gemv3(int kind, const void *W0, const float *S0, int64_t n0, const void *W1, const float *S1, int64_t n1,
           const void *W2, const float *S2, int64_t n2, const float *x, float *y0, float *y1, float *y2, int64_t in,
           int64_t M, int threads) {
    #pragma omp parallel num_threads(threads)
    gemv3_for(kind, W0, S0, n0, W1, S1, n1, W2, S2, n2, x, y0, y1, y2, in, M);
}

/* Llama's MLP input in one pass: y (M, n) = silu(x Wg^T) * (x Wu^T), both weights stored alike; in % 32 == 0 */
static void gate_up_for(int kind, const void *Wg, const float *Sg, const void *Wu, const float *Su, const float *x,
                        float *y, int64_t n, int64_t in, int64_t M) {
    #pragma omp for schedule(static)
    for (int64_t o = 0; o < n; o++)
        for (int64_t m = 0; m < M; m++) {
            float g = dot_row(kind, Wg, Sg, o, x + m * in, in), u = dot_row(kind, Wu, Su, o, x + m * in, in);
            y[m * n + o] = g / (1.0f + expf(-g)) * u;
        }
}

void gate_up(int kind, const void *Wg, const float *Sg, const void *Wu, const float *Su, const float *x, float *y,
             int64_t n, int64_t in, int64_t M, int threads) {
    #pragma omp parallel num_threads(threads)
    gate_up_for(kind, Wg, Sg, Wu, Su, x, y, n, in, M);
}

/* y (M, out) = x (M, in) W^T (add: y += it, a residual), W (out, in) stored as `kind` (dot_row); in % 32 == 0 */
static void gemv_for(int kind, const void *W, const float *S, const float *x, float *y, int64_t out, int64_t in,
                     int64_t M, int add) {
    #pragma omp for schedule(static)
    for (int64_t o = 0; o < out; o++)
        for (int64_t m = 0; m < M; m++) {
            float d = dot_row(kind, W, S, o, x + m * in, in);
            y[m * out + o] = add ? y[m * out + o] + d : d;
        }
}

void gemv(int kind, const void *W, const float *S, const float *x, float *y, int64_t out, int64_t in, int64_t M,
          int threads) {
    #pragma omp parallel num_threads(threads)
    gemv_for(kind, W, S, x, y, out, in, M, 0);
}

/* y (M, out) = x (M, in) W^T for W (out, in) fp32 and a few dozen rows of x (a server's batch): tiles of 3 rows of
   x by 4 rows of W, the 12 sums in registers, each 4-row block of W read from memory once (and from L1 for every
   tile of x), no packed copy of W (MKL's products pack the weight on every call). in % 8 == 0. While a block's
   tiles run, the next block's rows are prefetched, a share per tile (`pf`: `n` floats, one line in two steps): the
   hardware's prefetchers alone left the tiles waiting on the weight stream (SmolLM2's shapes at 33 rows, 2 threads,
   2-core AMD EPYC: 91 -> 112 GFLOP/s; 12 rows 57 -> 91; 63 rows 123 -> 128; scratch C, medians of 11 rounds). */
static inline const float *share(const float *next, int64_t in, int64_t per, int64_t t, int64_t *n) {
    /* tile t's share of the next block (4 rows from `next`, none where NULL): `per` floats each, *n of them here */
    int64_t off = t * per;
    *n = next && off < 4 * in ? (4 * in - off < per ? 4 * in - off : per) : 0;
    return *n ? next + off : next;
}

static inline int64_t per_tile(int64_t in, int64_t M) {  /* the floats of the next block each 3-row tile prefetches */
    int64_t tiles = M / 3;
    return tiles ? ((4 * in + tiles - 1) / tiles + 15) / 16 * 16 : 0;
}

static inline void tile34(const float *W, const float *x, float *y, int64_t o, int64_t m, int64_t out, int64_t in,
                          const float *pf, int64_t n) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00,
           c20 = c00, c21 = c00, c22 = c00, c23 = c00;
    const float *w0 = W + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in, *x0 = x + m * in, *x1 = x0 + in,
                *x2 = x1 + in;
    int64_t ahead = 0;
    for (int64_t i = 0; i < in; i += 8) {
        if (ahead < n && (i & 15) == 0) { _mm_prefetch((const char *)(pf + ahead), _MM_HINT_T0); ahead += 16; }
        __m256 a0 = _mm256_loadu_ps(x0 + i), a1 = _mm256_loadu_ps(x1 + i), a2 = _mm256_loadu_ps(x2 + i), b;
        b = _mm256_loadu_ps(w0 + i);
        c00 = _mm256_fmadd_ps(a0, b, c00); c10 = _mm256_fmadd_ps(a1, b, c10); c20 = _mm256_fmadd_ps(a2, b, c20);
        b = _mm256_loadu_ps(w1 + i);
        c01 = _mm256_fmadd_ps(a0, b, c01); c11 = _mm256_fmadd_ps(a1, b, c11); c21 = _mm256_fmadd_ps(a2, b, c21);
        b = _mm256_loadu_ps(w2 + i);
        c02 = _mm256_fmadd_ps(a0, b, c02); c12 = _mm256_fmadd_ps(a1, b, c12); c22 = _mm256_fmadd_ps(a2, b, c22);
        b = _mm256_loadu_ps(w3 + i);
        c03 = _mm256_fmadd_ps(a0, b, c03); c13 = _mm256_fmadd_ps(a1, b, c13); c23 = _mm256_fmadd_ps(a2, b, c23);
    }
    float *y0 = y + m * out + o;  /* the 12 horizontal sums four at a time */
    _mm_storeu_ps(y0, hsum4(c00, c01, c02, c03));
    _mm_storeu_ps(y0 + out, hsum4(c10, c11, c12, c13));
    _mm_storeu_ps(y0 + 2 * out, hsum4(c20, c21, c22, c23));
}

/* the one or two rows of x left over by the 3-row tiles, against the same 4 rows of W (8 or 4 sums) */
static inline void tile_last(const float *W, const float *x, float *y, int64_t o, int64_t m, int64_t out, int64_t in,
                             int rows) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
    const float *w0 = W + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in, *x0 = x + m * in,
                *x1 = rows == 2 ? x0 + in : x0;
    for (int64_t i = 0; i < in; i += 8) {
        __m256 a0 = _mm256_loadu_ps(x0 + i), a1 = _mm256_loadu_ps(x1 + i), b;
        b = _mm256_loadu_ps(w0 + i); c00 = _mm256_fmadd_ps(a0, b, c00); c10 = _mm256_fmadd_ps(a1, b, c10);
        b = _mm256_loadu_ps(w1 + i); c01 = _mm256_fmadd_ps(a0, b, c01); c11 = _mm256_fmadd_ps(a1, b, c11);
        b = _mm256_loadu_ps(w2 + i); c02 = _mm256_fmadd_ps(a0, b, c02); c12 = _mm256_fmadd_ps(a1, b, c12);
        b = _mm256_loadu_ps(w3 + i); c03 = _mm256_fmadd_ps(a0, b, c03); c13 = _mm256_fmadd_ps(a1, b, c13);
    }
    _mm_storeu_ps(y + m * out + o, hsum4(c00, c01, c02, c03));
    if (rows == 2) _mm_storeu_ps(y + (m + 1) * out + o, hsum4(c10, c11, c12, c13));
}

/* One block of w <= 4 rows of W (from Wo) against `rows` <= 3 rows of x (from xm), into yo (its rows ys apart):
   three rows the 3 x 4 tile, prefetching its share (pf, k) of the next block; one or two the narrower tile; a
   block of fewer than 4 rows (the last, out % 4) plain dot products. */
static inline void block_tile(const float *Wo, const float *xm, float *yo, int64_t ys, int64_t w, int rows,
                              int64_t in, const float *pf, int64_t k) {
    if (w < 4) {
        for (int r = 0; r < rows; r++)
            for (int64_t j = 0; j < w; j++) yo[r * ys + j] = dot_f32(Wo + j * in, xm + r * in, in);
    } else if (rows == 3) {
        tile34(Wo, xm, yo, 0, 0, ys, in, pf, k);
    } else {
        tile_last(Wo, xm, yo, 0, 0, ys, in, rows);
    }
}

/* the tiled product's loop, shared out over a parallel region's threads (`omp for`, no barrier at its end: the
   products of gemm3_f32 go one after another without waiting) */
static void gemm_f32_for(const float *W, const float *x, float *y, int64_t out, int64_t in, int64_t M) {
    int64_t per = per_tile(in, M);
    #pragma omp for schedule(static) nowait
    for (int64_t ob = 0; ob < (out + 3) / 4; ob++) {
        int64_t o = ob * 4, w = out - o < 4 ? out - o : 4, k;
        const float *next = o + 8 <= out ? W + (o + 4) * in : NULL;  /* a next block of 4 rows: prefetched */
        for (int64_t m = 0; m < M; m += 3) {
            const float *pf = share(next, in, per, m / 3, &k);
            block_tile(W + o * in, x + m * in, y + m * out + o, out, w, M - m < 3 ? (int)(M - m) : 3, in, pf, k);
        }
    }
}

void gemm_f32(const float *W, const float *x, float *y, int64_t out, int64_t in, int64_t M, int threads) {
    #pragma omp parallel num_threads(threads)
    gemm_f32_for(W, x, y, out, in, M);
}

/* q, k and v of a batch's rows (fp32 weights, tiled): three products of one x in one parallel region */
void gemm3_f32(const float *W0, int64_t n0, const float *W1, int64_t n1, const float *W2, int64_t n2, const float *x,
               float *y0, float *y1, float *y2, int64_t in, int64_t M, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        gemm_f32_for(W0, x, y0, n0, in, M);
        if (n1) gemm_f32_for(W1, x, y1, n1, in, M);
        if (n2) gemm_f32_for(W2, x, y2, n2, in, M);
    }
}

/* y (rows, d) = x / sqrt(mean(x^2) + eps) * w (Llama's RMSNorm in fp32); d % 8 == 0 */
void rms_norm(const float *x, const float *w, float *y, int64_t rows, int64_t d, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        float *yr = y + r * d;
        __m256 a = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i += 8) { __m256 v = _mm256_loadu_ps(xr + i); a = _mm256_fmadd_ps(v, v, a); }
        __m256 s = _mm256_set1_ps(1.0f / sqrtf(hsum(a) / (float)d + eps));
        for (int64_t i = 0; i < d; i += 8)
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), s), _mm256_loadu_ps(w + i)));
    }
}

static inline void rope(const float *x, const float *cos, const float *sin, float *out, int64_t D) {
    /* out = x cos + swap_halves(x) sin, sin's first half already negated: rotate_half in one pass */
    int64_t half = D / 2;
    for (int64_t i = 0; i < D; i++) out[i] = x[i] * cos[i] + x[i < half ? i + half : i - half] * sin[i];
}

/* e^x, 8 at a time, for x <= 0 (the softmax's s - max): Cephes' expf, 2^n p(r) with |r| <= ln2/2, within 2 ulp;
   below -87.3 (and -inf): 0 */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.33654f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* x - n ln2, ln2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* silu(g) * u, 8 at a time (exp8, e^-g capped at e^88; below g = -88 silu(g) is -0 in float, as torch gives it:
   g / (1 + e^88) would leave g * 6e-39, e.g. -6e-9 for g = -1e30) */
static inline __m256 silu_mul8(__m256 g, __m256 u) {
    __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(88.0f)));
    __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    s = _mm256_blendv_ps(s, _mm256_set1_ps(-0.0f), _mm256_cmp_ps(g, _mm256_set1_ps(-88.0f), _CMP_LT_OQ));
    return _mm256_mul_ps(s, u);
}

/* Llama's MLP input for a batch's rows (fp32 weights, tiled): y (M, n) = silu(x Wg^T) * (x Wu^T), each 4 rows of
   Wg and of Wu against every 3 rows of x (the same tiles as gemm_f32's) into 3 x 4 buffers, then silu and product */
void gate_up_f32(const float *Wg, const float *Wu, const float *x, float *y, int64_t n, int64_t in, int64_t M,
                 int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float g[16] = {0}, u[16] = {0}, r[16];
        int64_t per = per_tile(in, M), k;
        #pragma omp for schedule(static)
        for (int64_t ob = 0; ob < (n + 3) / 4; ob++) {
            int64_t o = ob * 4, w = n - o < 4 ? n - o : 4;
            int more = o + 8 <= n;  /* a next block of 4 rows of each weight: prefetched while this one runs */
            for (int64_t m = 0; m < M; m += 3) {
                int rows = M - m < 3 ? (int)(M - m) : 3;
                const float *xm = x + m * in, *pf = share(more ? Wg + (o + 4) * in : NULL, in, per, m / 3, &k);
                block_tile(Wg + o * in, xm, g, 4, w, rows, in, pf, k);
                pf = share(more ? Wu + (o + 4) * in : NULL, in, per, m / 3, &k);
                block_tile(Wu + o * in, xm, u, 4, w, rows, in, pf, k);
                _mm256_storeu_ps(r, silu_mul8(_mm256_loadu_ps(g), _mm256_loadu_ps(u)));
                _mm256_storeu_ps(r + 8, silu_mul8(_mm256_loadu_ps(g + 8), _mm256_loadu_ps(u + 8)));
                for (int k = 0; k < rows; k++)
                    for (int j = 0; j < w; j++) y[(m + k) * n + o + j] = r[k * 4 + j];
            }
        }
    }
}

/* y = silu(g) * u over n floats (a prefill's MLP input, gate and up computed apart): 8 at a time */
void silu_mul(const float *g, const float *u, float *y, int64_t n, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < n / 8; b++)
        _mm256_storeu_ps(y + b * 8, silu_mul8(_mm256_loadu_ps(g + b * 8), _mm256_loadu_ps(u + b * 8)));
    for (int64_t i = n / 8 * 8; i < n; i++) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

#define CHUNK 64  /* cache slots a pass takes: their keys and values (16 KB each at D = 64) stay in L1 */

/* One decode token per row: rope on q and k at the row's position, k and v written into the cache there, then
   o = softmax(q K^T * scale) V over the row's slots 0..pos. The heads of a group share their K and V: an item of
   work is one row's group (or one of its heads, where rows x groups are too few to share out among the threads)
   and reads each slot's key and value once for all its heads. Slots go in chunks of CHUNK: the scores of a chunk
   (four dot products at a time), one rescale of the running sums by the new maximum, the chunk's e^(s - max) eight
   at a time (exp8), then its values weighted into the sums.
   q (B, H*D), k, v (B, Hkv*D), cos, sin (B, D), pos (B,), cache (max_batch, Hkv, max_len, D) for this layer,
   rows row0..row0+B-1; o (B, H*D). D % 8 == 0, D <= 256. */
static void attend_for(const float *q, const float *k, const float *v, const float *cos, const float *sin,
                       const int64_t *pos, float *keys, float *values, float *o, int64_t B, int64_t H, int64_t Hkv,
                       int64_t D, int64_t max_len, int64_t row0, float scale) {
    #pragma omp for schedule(static)
    for (int64_t bg = 0; bg < B * Hkv; bg++) {  /* rope k, write k and v, before any head reads the cache */
        int64_t b = bg / Hkv, g = bg % Hkv, at = (((row0 + b) * Hkv + g) * max_len + pos[b]) * D;
        rope(k + bg * D, cos + b * D, sin + b * D, keys + at, D);
        for (int64_t i = 0; i < D; i++) values[at + i] = v[bg * D + i];
    }  /* the loop's barrier: every row's key and value are in the cache */
    int64_t G = H / Hkv, split = B * Hkv < 4 * omp_get_num_threads() ? G : 1, per = G / split;
    #pragma omp for schedule(static)
    for (int64_t item = 0; item < B * Hkv * split; item++) {
        int64_t b = item / (Hkv * split), g = item / split % Hkv, h0 = g * G + item % split * per, n = pos[b] + 1;
        float qr[per * D], acc[per * D], sc[per * CHUNK], m[per], l[per];
        for (int64_t h = 0; h < per; h++) {
            rope(q + (b * H + h0 + h) * D, cos + b * D, sin + b * D, qr + h * D, D);
            for (int64_t i = 0; i < D; i++) { qr[h * D + i] *= scale; acc[h * D + i] = 0.0f; }
            m[h] = -INFINITY; l[h] = 0.0f;
        }
        const float *K = keys + ((row0 + b) * Hkv + g) * max_len * D,
                    *V = values + ((row0 + b) * Hkv + g) * max_len * D;
        for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
            int64_t c = n - j0 < CHUNK ? n - j0 : CHUNK, c8 = (c + 7) & ~7;
            const float *Kc = K + j0 * D, *Vc = V + j0 * D;
            for (int64_t h = 0; h < per; h++) {
                const float *qh = qr + h * D;
                float *s = sc + h * CHUNK, top = m[h];
                int64_t j = 0;
                for (; j + 4 <= c; j += 4) {
                    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                    for (int64_t i = 0; i < D; i += 8) {
                        __m256 qv = _mm256_loadu_ps(qh + i);
                        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(Kc + j * D + i), a0);
                        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(Kc + (j + 1) * D + i), a1);
                        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(Kc + (j + 2) * D + i), a2);
                        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(Kc + (j + 3) * D + i), a3);
                    }
                    _mm_storeu_ps(s + j, hsum4(a0, a1, a2, a3));
                }
                for (; j < c; j++) {
                    __m256 a = _mm256_setzero_ps();
                    for (int64_t i = 0; i < D; i += 8)
                        a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(Kc + j * D + i), a);
                    s[j] = hsum(a);
                }
                for (j = 0; j < c; j++) top = s[j] > top ? s[j] : top;
                for (j = c; j < c8; j++) s[j] = -INFINITY;  /* e^-inf = 0: the last vector's padding adds nothing */
                float shrink = expf(m[h] - top);  /* the sums so far, rescaled to the new maximum (0 at first) */
                m[h] = top;
                __m256 mv = _mm256_set1_ps(top), lv = _mm256_setzero_ps();
                for (j = 0; j < c8; j += 8) {
                    __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
                    _mm256_storeu_ps(s + j, p);
                    lv = _mm256_add_ps(lv, p);
                }
                l[h] = l[h] * shrink + hsum(lv);
                float *ah = acc + h * D;
                __m256 sv = _mm256_set1_ps(shrink);
                int64_t i = 0;
                for (; i + 32 <= D; i += 32) {  /* four vectors of the sums in registers over the chunk */
                    __m256 c0 = _mm256_mul_ps(_mm256_loadu_ps(ah + i), sv),
                           c1 = _mm256_mul_ps(_mm256_loadu_ps(ah + i + 8), sv),
                           c2 = _mm256_mul_ps(_mm256_loadu_ps(ah + i + 16), sv),
                           c3 = _mm256_mul_ps(_mm256_loadu_ps(ah + i + 24), sv);
                    for (j = 0; j < c; j++) {
                        __m256 p = _mm256_set1_ps(s[j]);
                        const float *vj = Vc + j * D + i;
                        c0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj), c0);
                        c1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 8), c1);
                        c2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 16), c2);
                        c3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vj + 24), c3);
                    }
                    _mm256_storeu_ps(ah + i, c0); _mm256_storeu_ps(ah + i + 8, c1);
                    _mm256_storeu_ps(ah + i + 16, c2); _mm256_storeu_ps(ah + i + 24, c3);
                }
                for (; i < D; i += 8) {
                    __m256 c0 = _mm256_mul_ps(_mm256_loadu_ps(ah + i), sv);
                    for (j = 0; j < c; j++)
                        c0 = _mm256_fmadd_ps(_mm256_set1_ps(s[j]), _mm256_loadu_ps(Vc + j * D + i), c0);
                    _mm256_storeu_ps(ah + i, c0);
                }
            }
        }
        for (int64_t h = 0; h < per; h++) {
            float *out = o + (b * H + h0 + h) * D, inv = 1.0f / l[h];
            for (int64_t i = 0; i < D; i++) out[i] = acc[h * D + i] * inv;
        }
    }
}

void attend(const float *q, const float *k, const float *v, const float *cos, const float *sin, const int64_t *pos,
            float *keys, float *values, float *o, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t max_len,
            int64_t row0, float scale, int threads) {
    #pragma omp parallel num_threads(threads)
    attend_for(q, k, v, cos, sin, pos, keys, values, o, B, H, Hkv, D, max_len, row0, scale);
}

/* A whole Llama decoder layer's decode step (one token per row), in place on x (B, d):
       h = rms(x) n1;  q, k, v = h Wq^T, h Wk^T, h Wv^T;  o = attend(q, k, v) (as above)
       x += o Wo^T;    h = rms(x) n2;  x += (silu(h Wg^T) * (h Wu^T)) Wd^T
   W[7] = q, k, v, o, gate, up, down (out, in), all stored as `kind`, S[7] their int8 scales (or NULL);
   work: B * (d + 2 H D + 2 Hkv D + inter) floats. Shapes as `attend` says; d, H D, inter % 32 == 0. */
void layer(int kind, float *x, const float *n1, const float *n2, float eps, const void **W, const float **S,
           const float *cos, const float *sin, const int64_t *pos, float *keys, float *values, float *work, int64_t B,
           int64_t d, int64_t H, int64_t Hkv, int64_t D, int64_t inter, int64_t max_len, int64_t row0, float scale,
           int threads) {
    float *h = work, *q = h + B * d, *k = q + B * H * D, *v = k + B * Hkv * D, *o = v + B * Hkv * D, *g = o + B * H * D;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp single
        rms_norm(x, n1, h, B, d, eps);
        gemv3_for(kind, W[0], S[0], H * D, W[1], S[1], Hkv * D, W[2], S[2], Hkv * D, h, q, k, v, d, B);
        attend_for(q, k, v, cos, sin, pos, keys, values, o, B, H, Hkv, D, max_len, row0, scale);
        gemv_for(kind, W[3], S[3], o, x, d, H * D, B, 1);
        #pragma omp single
        rms_norm(x, n2, h, B, d, eps);
        gate_up_for(kind, W[4], S[4], W[5], S[5], h, g, inter, d, B);
        gemv_for(kind, W[6], S[6], g, x, d, inter, B, 1);
    }
}
/* Per-row LoRA (Punica's SGMV on a CPU): out[b, t] += (x[b, t] At[idx[b]]) Bt[idx[b]] for every token t of row b,
   each row's adapter read where it lies in the stacks (no gathered copies; a row's later tokens find it in cache).
   x (B, T, in), At (slots, in, R), Bt (slots, R, n), idx (B,), out (B, T, n); each of x, the stacks and out fp32
   or bf16 (XB, WB, OB: the eight combinations are compiled apart below; bf16 is widened in registers and out is
   rounded to nearest even once). R % 8 == 0, R <= 64, n % 8 == 0. Slot 0 is the base: its rows are left as they are. */
static inline __m256 load8(const void *p, int64_t i, int bf) {
    return bf ? widen_bf16((const uint16_t *)p + i) : _mm256_loadu_ps((const float *)p + i);
}

static inline float load1(const void *p, int64_t i, int bf) {
    if (!bf) return ((const float *)p)[i];
    union { uint32_t u; float f; } v = { (uint32_t)((const uint16_t *)p)[i] << 16 };
    return v.f;
}

static inline void add8(void *p, int64_t i, __m256 d, int bf) {  /* p[i..i+8] += d */
    if (!bf) { float *f = (float *)p + i; _mm256_storeu_ps(f, _mm256_add_ps(_mm256_loadu_ps(f), d)); return; }
    uint16_t *h = (uint16_t *)p + i;
    __m256i s = _mm256_castps_si256(_mm256_add_ps(widen_bf16(h), d));
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(s, 16), _mm256_set1_epi32(1));  /* round to nearest even */
    s = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(s, _mm256_set1_epi32(0x7FFF)), odd), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    _mm_storeu_si128((__m128i *)h, packed);
}

/* elements i and i + 16 of p (fp32 or bf16) into cache: the lines of 32 fp32 elements, or of 32 bf16 ones */
static inline void prefetch32(const void *p, int64_t i, int bf) {
    const char *a = bf ? (const char *)((const uint16_t *)p + i) : (const char *)((const float *)p + i);
    _mm_prefetch(a, _MM_HINT_T0);
    _mm_prefetch(a + (bf ? 32 : 64), _MM_HINT_T0);
}

/* row bt's delta from slot s: u = x A (R), then out += u (sB); slot ns >= 0: the next item's, whose A and B lines
   are prefetched alongside the ones read here (rank 8) */
static inline void lora_one(const void *x, const void *At, const void *Bt, void *out, int64_t bt, int64_t s,
                            int64_t ns, int64_t in, int64_t R, int64_t n, int XB, int WB, int OB) {
    const int64_t A = s * in * R, Bm = s * R * n, xr = bt * in, orow = bt * n, NA = ns * in * R, NB = ns * R * n;
    float u[64];
    if (R == 8) {  /* the usual rank: the product in one register, four partial sums over i */
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 4 <= in; i += 4) {
            if (ns >= 0) prefetch32(At, NA + i * 8, WB);
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xr + i, XB)), load8(At, A + i * 8, WB), a0);
            a1 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xr + i + 1, XB)), load8(At, A + i * 8 + 8, WB), a1);
            a2 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xr + i + 2, XB)), load8(At, A + i * 8 + 16, WB), a2);
            a3 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xr + i + 3, XB)), load8(At, A + i * 8 + 24, WB), a3);
        }
        for (; i < in; i++) a0 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xr + i, XB)), load8(At, A + i * 8, WB), a0);
        _mm256_storeu_ps(u, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    } else {
        for (int64_t j = 0; j < R; j++) u[j] = 0.0f;
        for (int64_t i = 0; i < in; i++) {
            __m256 xi = _mm256_set1_ps(load1(x, xr + i, XB));
            for (int64_t j = 0; j < R; j += 8)
                _mm256_storeu_ps(u + j, _mm256_fmadd_ps(xi, load8(At, A + i * R + j, WB), _mm256_loadu_ps(u + j)));
        }
    }
    int64_t o = 0;
    for (; o + 32 <= n; o += 32) {  /* four independent sums of R products each */
        __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(),
               c3 = _mm256_setzero_ps();
        for (int64_t j = 0; j < R; j++) {
            __m256 uj = _mm256_set1_ps(u[j]);
            int64_t row = Bm + j * n + o;
            if (ns >= 0 && R == 8) prefetch32(Bt, NB + j * n + o, WB);
            c0 = _mm256_fmadd_ps(uj, load8(Bt, row, WB), c0);
            c1 = _mm256_fmadd_ps(uj, load8(Bt, row + 8, WB), c1);
            c2 = _mm256_fmadd_ps(uj, load8(Bt, row + 16, WB), c2);
            c3 = _mm256_fmadd_ps(uj, load8(Bt, row + 24, WB), c3);
        }
        add8(out, orow + o, c0, OB);
        add8(out, orow + o + 8, c1, OB);
        add8(out, orow + o + 16, c2, OB);
        add8(out, orow + o + 24, c3, OB);
    }
    for (; o < n; o += 8) {
        __m256 c = _mm256_setzero_ps();
        for (int64_t j = 0; j < R; j++) c = _mm256_fmadd_ps(_mm256_set1_ps(u[j]), load8(Bt, Bm + j * n + o, WB), c);
        add8(out, orow + o, c, OB);
    }
}

/* rows p and q on one slot s, rank 8: each reads A and B once for both rows; every sum of each row in the order
   lora_one takes (a row's delta does not depend on whether it had a partner) */
static inline void lora_two(const void *x, const void *At, const void *Bt, void *out, int64_t p, int64_t q,
                            int64_t s, int64_t ns, int64_t in, int64_t n, int XB, int WB, int OB) {
    const int64_t A = s * in * 8, Bm = s * 8 * n, xp = p * in, xq = q * in, NA = ns * in * 8, NB = ns * 8 * n;
    float u[8], v[8];
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0, w;
    int64_t i = 0;
    for (; i + 4 <= in; i += 4) {
        if (ns >= 0) prefetch32(At, NA + i * 8, WB);
        w = load8(At, A + i * 8, WB);
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xp + i, XB)), w, a0);
        b0 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xq + i, XB)), w, b0);
        w = load8(At, A + i * 8 + 8, WB);
        a1 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xp + i + 1, XB)), w, a1);
        b1 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xq + i + 1, XB)), w, b1);
        w = load8(At, A + i * 8 + 16, WB);
        a2 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xp + i + 2, XB)), w, a2);
        b2 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xq + i + 2, XB)), w, b2);
        w = load8(At, A + i * 8 + 24, WB);
        a3 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xp + i + 3, XB)), w, a3);
        b3 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xq + i + 3, XB)), w, b3);
    }
    for (; i < in; i++) {
        w = load8(At, A + i * 8, WB);
        a0 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xp + i, XB)), w, a0);
        b0 = _mm256_fmadd_ps(_mm256_set1_ps(load1(x, xq + i, XB)), w, b0);
    }
    _mm256_storeu_ps(u, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    _mm256_storeu_ps(v, _mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
    int64_t o = 0;
    for (; o + 32 <= n; o += 32) {
        __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, d0 = c0, d1 = c0, d2 = c0, d3 = c0;
        for (int64_t j = 0; j < 8; j++) {
            __m256 uj = _mm256_set1_ps(u[j]), vj = _mm256_set1_ps(v[j]);
            int64_t row = Bm + j * n + o;
            if (ns >= 0) prefetch32(Bt, NB + j * n + o, WB);
            w = load8(Bt, row, WB); c0 = _mm256_fmadd_ps(uj, w, c0); d0 = _mm256_fmadd_ps(vj, w, d0);
            w = load8(Bt, row + 8, WB); c1 = _mm256_fmadd_ps(uj, w, c1); d1 = _mm256_fmadd_ps(vj, w, d1);
            w = load8(Bt, row + 16, WB); c2 = _mm256_fmadd_ps(uj, w, c2); d2 = _mm256_fmadd_ps(vj, w, d2);
            w = load8(Bt, row + 24, WB); c3 = _mm256_fmadd_ps(uj, w, c3); d3 = _mm256_fmadd_ps(vj, w, d3);
        }
        add8(out, p * n + o, c0, OB); add8(out, p * n + o + 8, c1, OB);
        add8(out, p * n + o + 16, c2, OB); add8(out, p * n + o + 24, c3, OB);
        add8(out, q * n + o, d0, OB); add8(out, q * n + o + 8, d1, OB);
        add8(out, q * n + o + 16, d2, OB); add8(out, q * n + o + 24, d3, OB);
    }
    for (; o < n; o += 8) {
        __m256 c = _mm256_setzero_ps(), d = c;
        for (int64_t j = 0; j < 8; j++) {
            w = load8(Bt, Bm + j * n + o, WB);
            c = _mm256_fmadd_ps(_mm256_set1_ps(u[j]), w, c);
            d = _mm256_fmadd_ps(_mm256_set1_ps(v[j]), w, d);
        }
        add8(out, p * n + o, c, OB);
        add8(out, q * n + o, d, OB);
    }
}

/* Every row's delta: the rows (b, t) with a slot sorted by slot (counting sort, in order within a slot) and paired,
   so that two rows on one adapter read its A and B once (rank 8) and each thread's rows share adapters; slots < S */
static inline int lora_rows(const void *x, const void *At, const void *Bt, const int64_t *idx, void *out, int64_t B,
                            int64_t T, int64_t in, int64_t R, int64_t n, int64_t S, int threads, int XB, int WB,
                             int OB) {
    for (int64_t b = 0; b < B; b++)
        if (idx[b] < 0 || idx[b] >= S) return -1;
    int64_t N = B * T, used = 0, *count = calloc(S + 1, sizeof(int64_t)), *order = malloc((N + 1) * sizeof(int64_t)),
            *item = malloc((N + 1) * sizeof(int64_t));  /* item: where each one row or pair starts in order */
    if (!count || !order || !item) {
        free(count); free(order); free(item);
        return -2;
    }
    for (int64_t b = 0; b < B; b++) count[idx[b] + 1] += T;
    for (int64_t k = 1; k <= S; k++) count[k] += count[k - 1];
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) order[count[idx[b]]++] = b * T + t;
    int64_t first = count[0];  /* the rows of slot 0 (no adapter) come first: skipped */
    for (int64_t k = first; k < N; ) {
        int two = R == 8 && k + 1 < N && idx[order[k] / T] == idx[order[k + 1] / T];
        item[used++] = k;
        k += two ? 2 : 1;
    }
    item[used] = N;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t it = 0; it < used; it++) {
        int64_t k = item[it], p = order[k], s = idx[p / T], ns = it + 1 < used ? idx[order[item[it + 1]] / T] : -1;
        ns = ns == s ? -1 : ns;  /* the next item's adapter, unless it is this one (in cache already) */
        if (item[it + 1] - k == 2) lora_two(x, At, Bt, out, p, order[k + 1], s, ns, in, n, XB, WB, OB);
        else lora_one(x, At, Bt, out, p, s, ns, in, R, n, XB, WB, OB);
    }
    free(count); free(order); free(item);
    return 0;
}

#define LORA_ROWS(name, XB, WB, OB) \
int name(const void *x, const void *At, const void *Bt, const int64_t *idx, void *out, int64_t B, int64_t T, \
         int64_t in, int64_t R, int64_t n, int64_t S, int threads) { \
    return lora_rows(x, At, Bt, idx, out, B, T, in, R, n, S, threads, XB, WB, OB); }
LORA_ROWS(lora_rows_000, 0, 0, 0) LORA_ROWS(lora_rows_001, 0, 0, 1) LORA_ROWS(lora_rows_010, 0, 1, 0)
LORA_ROWS(lora_rows_011, 0, 1, 1) LORA_ROWS(lora_rows_100, 1, 0, 0) LORA_ROWS(lora_rows_101, 1, 0, 1)
LORA_ROWS(lora_rows_110, 1, 1, 0) LORA_ROWS(lora_rows_111, 1, 1, 1)
"""
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-lm"]
NO_CACHE: DiskError | None = None
try:
    CACHE: Path | None = cache_dir() / "kernels"
except DiskError as e:  # no home directory: every command, on a local model too, ended here (at parse time)
    CACHE, NO_CACHE = None, e
"""Where the built library lives: under the project's one cache root (loraforge.models.cache_dir, read as the
process starts: $LORAFORGE_CACHE, else $XDG_CACHE_HOME/loraforge, else ~/.cache/loraforge); None where there is
none (NO_CACHE says why), and decoding runs without the kernels."""

_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: not available here


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(path: Path) -> bool:
    """Whether the cached library is the one built: its SHA-256 is the one written beside it (`.sha256`). A cut
    short or damaged one would kill the process with SIGBUS when loaded."""
    try:
        return path.with_suffix(".sha256").read_text().strip() == _digest(path)
    except OSError:
        return False


def _compile(path: Path) -> bool:
    """Compile SOURCE into `path`: the files are flushed and renamed into place, so processes can race. False where
    the compiler is missing or fails; an OSError where CACHE refuses a write."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        src, out, digest = Path(tmp) / "decode.c", Path(tmp) / "decode.so", Path(tmp) / "decode.sha256"
        src.write_text(SOURCE)
        try:
            done = subprocess.run([os.environ.get("CC", "cc"), *FLAGS, str(src), "-o", str(out)],
                                  capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError):  # no compiler, or one that hung
            return False
        if done.returncode != 0:
            return False
        digest.write_text(_digest(out) + "\n")
        fsync_tree(Path(tmp))
        os.replace(out, path)
        os.replace(digest, path.with_suffix(".sha256"))  # last: the library is whole before it is vouched for
    return True


def _unwritable(e: OSError) -> str:
    """The one warning line for a kernel cache that refused a write."""
    reason = e.strerror or str(e)  # the errno's text: "Permission denied", "Read-only file system"
    return (f"warning: cannot write the CPU kernel cache {CACHE} ({reason}): decoding falls back to the slower plain "
            f"PyTorch path; make {CACHE} writable or set LORAFORGE_CACHE to a folder this user can write")


def _build() -> ctypes.CDLL | None:
    """Compile (once per source and flags) and load. A cached library that does not match its SHA-256 is built
    again. A cache that cannot be written is said in one line (available() builds once per process)."""
    if CACHE is None:
        print(f"warning: {NO_CACHE}; decoding falls back to the slower plain PyTorch path", file=sys.stderr,
              flush=True)
        return None
    key = hashlib.sha256((SOURCE + " ".join(FLAGS)).encode()).hexdigest()[:16]
    path = CACHE / f"decode-{key}.so"
    if not _intact(path):
        try:
            built = _compile(path)
        except OSError as e:
            print(_unwritable(e), file=sys.stderr, flush=True)
            return None
        if not built:
            return None
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gemv.argtypes = [ctypes.c_int] + [ptr] * 4 + [i64] * 3 + [ctypes.c_int]
    lib.gemm_f32.argtypes = [ptr] * 3 + [i64] * 3 + [ctypes.c_int]
    lib.gemm3_f32.argtypes = [ptr, i64] * 3 + [ptr] * 4 + [i64, i64, ctypes.c_int]
    lib.gate_up_f32.argtypes = [ptr] * 4 + [i64] * 3 + [ctypes.c_int]
    lib.silu_mul.argtypes = [ptr] * 3 + [i64, ctypes.c_int]
    lib.gemv3.argtypes = [ctypes.c_int] + [ptr, ptr, i64] * 3 + [ptr] * 4 + [i64, i64, ctypes.c_int]
    lib.gate_up.argtypes = [ctypes.c_int] + [ptr] * 6 + [i64] * 3 + [ctypes.c_int]
    lib.rms_norm.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_float]
    lib.attend.argtypes = [ptr] * 9 + [i64] * 6 + [ctypes.c_float, ctypes.c_int]
    lib.layer.argtypes = [ctypes.c_int, ptr, ptr, ptr, ctypes.c_float] + [ptr] * 8 + [i64] * 8 + [ctypes.c_float,
                                                                                                  ctypes.c_int]
    for flags in ("000", "001", "010", "011", "100", "101", "110", "111"):
        getattr(lib, "lora_rows_" + flags).argtypes = [ptr] * 5 + [i64] * 6 + [ctypes.c_int]
        getattr(lib, "lora_rows_" + flags).restype = ctypes.c_int
    return lib


def _switch(name: str, default: str, off: str, on: str) -> bool:
    """An environment switch that takes 0 or 1 only ("false" or "no" must not read as on)."""
    value = os.environ.get(name, default)
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 ({off}) or 1 ({on}), got {value!r}; unset it for the default")
    return value == "1"


ENABLED = _switch("LORAFORGE_CPU_KERNELS", "1", "torch's ops only", "these kernels where the CPU has AVX2")
"""LORAFORGE_CPU_KERNELS: 1 (the default) builds and uses the kernels where the CPU has AVX2; 0 never."""


def available() -> bool:
    """Whether the kernels run here (built on first call)."""
    global _lib
    if _lib is False:
        _lib = None
        # torch's cpuinfo, as loraforge.precision asks it (every AVX2 CPU has FMA: Haswell and Zen on)
        if ENABLED and torch.cpu._is_avx2_supported():
            try:
                _lib = _build()
            except (OSError, subprocess.SubprocessError):
                _lib = None
    return _lib is not None


def _mkl_on_intel() -> bool:
    """Whether torch's fp32 products are MKL's on an Intel CPU (read from /proc/cpuinfo; False where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            intel = any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        intel = False
    return intel and torch.backends.mkl.is_available()


FP32 = _switch("LORAFORGE_FP32_KERNELS", "0" if _mkl_on_intel() else "1", "fp32 products with torch's BLAS",
               "with these kernels")
"""Whether fp32 weights go through these kernels too (up to MAX_TILED_ROWS rows). MKL's products reach
the memory's speed on Intel CPUs (Xeon, AVX-512: this file's fp32 dot measured 0.98x of it), but not on AMD's: on
a 2-core AMD EPYC (Zen, AVX2) MKL's 1-16-row fp32 products read 6-11 GB/s and this file's 15-20 GB/s (2-3x;
bench/decode.py's fp32 rows). LORAFORGE_FP32_KERNELS=0 or 1 overrides."""

_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
_KINDS = tuple(_KIND) if FP32 else (torch.bfloat16, torch.int8)


def fits_weight(weight: torch.Tensor) -> bool:
    """Whether `linear` takes this stored weight: a contiguous CPU (out, in) bf16 or int8 tensor (or fp32, where
    FP32), in % 32 == 0."""
    return (weight.device.type == "cpu" and weight.dtype in _KINDS and weight.dim() == 2
            and weight.shape[1] % 32 == 0 and weight.is_contiguous())


def linear_rows(dtype: torch.dtype) -> int:
    """The most activation rows `linear` takes with weights of this dtype: fp32 up to MAX_TILED_ROWS (tiled past
    TILED_FROM), bf16 and int8 up to MAX_ROWS."""
    return MAX_TILED_ROWS if dtype == torch.float32 else MAX_ROWS


def dot_rows(dtype: torch.dtype) -> int:
    """The most activation rows the one-dot-per-row `layer` takes with weights of this dtype: fp32 up to TILED_FROM
    (more rows are faster tiled), bf16 and int8 MAX_ROWS."""
    return TILED_FROM if dtype == torch.float32 else MAX_ROWS


def fits_input(x: torch.Tensor, in_features: int, max_rows: int = MAX_ROWS) -> bool:
    """Whether `linear` takes these activations: fp32 on the CPU, at most `max_rows` rows (MAX_ROWS; fp32 weights:
    MAX_TILED_ROWS); and the kernels run here."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() <= max_rows * in_features \
        and available()


def fits(weight: torch.Tensor, x: torch.Tensor) -> bool:
    return fits_weight(weight) and fits_input(x, weight.shape[1])


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) fp32 times weight (out, in) fp32, bf16, or int8 with group scales (out, in / 32): (..., out)
    fp32."""
    out_features, in_features = weight.shape
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], out_features)
    rows = x.numel() // in_features
    if weight.dtype == torch.float32 and rows > TILED_FROM:  # a server's batch: the tiled product
        _lib.gemm_f32(weight.data_ptr(), x.data_ptr(), y.data_ptr(), out_features, in_features, rows,
                      torch.get_num_threads())
        return y
    _lib.gemv(_KIND[weight.dtype], weight.data_ptr(), None if scale is None else scale.data_ptr(), x.data_ptr(),
              y.data_ptr(), out_features, in_features, rows, torch.get_num_threads())
    return y


def fits_many(weights: list[torch.Tensor], x: torch.Tensor) -> bool:
    """Whether `linear3` / `gate_up` take these weights (one storage dtype, as `fits_weight` takes; contiguous CPU
    (out, in), in % 32 == 0, one input width) and x (fp32, at most `linear_rows` rows); and the kernels run here."""
    w0 = weights[0]
    return (all(fits_weight(w) and w.dtype == w0.dtype and w.shape[1] == w0.shape[1] for w in weights)
            and fits_input(x, w0.shape[1], linear_rows(w0.dtype)))


def linear3(x: torch.Tensor, weights: list[torch.Tensor], scales: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Up to three products of one input in one call (a layer's q, k and v): [x Wₖᵀ], each (..., outₖ) fp32. fp32
    weights and more than TILED_FROM rows (a server's batch): the tiled products, the same sums as `linear`'s."""
    x = x.contiguous()
    rows, in_features = x.numel() // x.shape[-1], x.shape[-1]
    ys = [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]
    if weights[0].dtype == torch.float32 and rows > TILED_FROM:
        args = [a for w in weights for a in (w.data_ptr(), w.shape[0])] + [None, 0] * (3 - len(weights))
        outs = [y.data_ptr() for y in ys] + [None] * (3 - len(ys))
        _lib.gemm3_f32(*args, x.data_ptr(), *outs, in_features, rows, torch.get_num_threads())
        return ys
    args = []
    for i in range(3):
        if i < len(weights):
            s = scales[i]
            args += [weights[i].data_ptr(), None if s is None else s.data_ptr(), weights[i].shape[0]]
        else:
            args += [None, None, 0]
    outs = [y.data_ptr() for y in ys] + [None] * (3 - len(ys))
    _lib.gemv3(_KIND[weights[0].dtype], *args, x.data_ptr(), *outs, in_features, rows, torch.get_num_threads())
    return ys


def gate_up(x: torch.Tensor, gate: torch.Tensor, gate_scale: torch.Tensor | None, up: torch.Tensor,
            up_scale: torch.Tensor | None) -> torch.Tensor:
    """Llama's MLP input in one call: silu(x Wgᵀ) · (x Wuᵀ), (..., n) fp32 (fp32 weights and more than TILED_FROM
    rows: the tiled products)."""
    x = x.contiguous()
    y = x.new_empty(*x.shape[:-1], gate.shape[0])
    rows = x.numel() // x.shape[-1]
    if gate.dtype == torch.float32 and rows > TILED_FROM:
        _lib.gate_up_f32(gate.data_ptr(), up.data_ptr(), x.data_ptr(), y.data_ptr(), gate.shape[0], x.shape[-1], rows,
                         torch.get_num_threads())
        return y
    _lib.gate_up(_KIND[gate.dtype], gate.data_ptr(), None if gate_scale is None else gate_scale.data_ptr(),
                 up.data_ptr(), None if up_scale is None else up_scale.data_ptr(), x.data_ptr(), y.data_ptr(),
                 gate.shape[0], x.shape[-1], x.numel() // x.shape[-1], torch.get_num_threads())
    return y


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for fp32 CPU tensors of one shape (a prefill's MLP input): one vectorised pass, where torch's
    silu and product take two (708 tokens × 1,536: 0.40 against 1.02 ms; 2-core AMD EPYC)."""
    gate, up = gate.contiguous(), up.contiguous()
    y = torch.empty_like(gate)
    _lib.silu_mul(gate.data_ptr(), up.data_ptr(), y.data_ptr(), gate.numel(), torch.get_num_threads())
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm of fp32 rows x (..., d), d % 8 == 0: x / √(mean(x²) + eps) · weight (contiguous)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    _lib.rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return y


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, row0: int, heads: int, scale: float
           ) -> torch.Tensor:
    """One decode token per row (fp32): rope(q), rope(k) at `pos`, k and v into the layer's cache (max_batch, Hkv,
    max_len, D) at rows row0.., and softmax(q Kᵀ · scale) V over each row's slots 0..pos. q (B, ..., H·D),
    k, v (B, ..., Hkv·D); cos, sin (B, D) contiguous (sin's first half negated); pos (B,) int64 contiguous.
    Returns o shaped like q."""
    _, kv_heads, max_len, dim = keys.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = torch.empty_like(q)
    _lib.attend(q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), pos.data_ptr(),
                keys.data_ptr(), values.data_ptr(), o.data_ptr(), q.shape[0], heads, kv_heads, dim, max_len, row0,
                scale, torch.get_num_threads())
    return o


class LayerWeights:
    """A decoder layer's seven weights (q, k, v, o, gate, up, down; (out, in) each) for `layer`, or `ok` False where
    the kernel does not take them (not one storage dtype that `fits_weight` takes). Holds the tensors, so the
    pointers handed to C stay valid."""

    def __init__(self, weights: list[torch.Tensor], scales: list[torch.Tensor | None]):
        self.tensors = [*weights, *(s for s in scales if s is not None)]
        w0 = weights[0]
        self.ok = len(weights) == 7 and available() and all(fits_weight(w) and w.dtype == w0.dtype for w in weights)
        if self.ok:
            self.kind = _KIND[w0.dtype]
            self.W = (ctypes.c_void_p * 7)(*(w.data_ptr() for w in weights))
            self.S = (ctypes.c_void_p * 7)(*(None if s is None else s.data_ptr() for s in scales))
            self.inter = weights[4].shape[0]
            self.max_rows = dot_rows(w0.dtype)


def layer(x: torch.Tensor, weights: LayerWeights, norms: tuple[torch.Tensor, torch.Tensor], eps: float,
          cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, row0: int,
          heads: int, scale: float) -> None:
    """A Llama decoder layer's decode step in one call, in place on x (B, 1, d) fp32 contiguous (B <= max_rows):
    x += attention(rms(x)) Woᵀ, then x += mlp(rms(x)), with the cache written as `attend` does; every part as this
    file's other kernels compute it (same sums, same order)."""
    _, kv_heads, max_len, dim = keys.shape
    B, d = x.shape[0], x.shape[-1]
    work = x.new_empty(B * (d + 2 * heads * dim + 2 * kv_heads * dim + weights.inter))
    _lib.layer(weights.kind, x.data_ptr(), norms[0].data_ptr(), norms[1].data_ptr(), eps, weights.W, weights.S,
               cos.data_ptr(), sin.data_ptr(), pos.data_ptr(), keys.data_ptr(), values.data_ptr(), work.data_ptr(),
               B, d, heads, kv_heads, dim, weights.inter, max_len, row0, scale, torch.get_num_threads())


MAX_RANK = 64
"""The largest rank `lora_rows` takes (a multiple of 8: the server's stacks pad their rank to one)."""
_HALF = {torch.float32: "0", torch.bfloat16: "1"}


def fits_rows(x: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `lora_rows` takes rows x (B, T, in) against stacks At (slots, in, R), Bt (slots, R, n) into
    out (B, T, n): all on the CPU, each fp32 or bf16 (the stacks one dtype), the stacks and out contiguous,
    R % 8 == 0 and at most MAX_RANK, n % 8 == 0; and the kernels run here."""
    return (x.dim() == 3 and out.shape == (*x.shape[:2], Bt.shape[2]) and x.device.type == "cpu"
            and At.device.type == "cpu" and out.device.type == "cpu" and x.dtype in _HALF and out.dtype in _HALF
            and At.dtype in _HALF and Bt.dtype == At.dtype and At.is_contiguous() and Bt.is_contiguous()
            and out.is_contiguous() and At.shape[2] % 8 == 0 and At.shape[2] <= MAX_RANK and Bt.shape[2] % 8 == 0
            and available())


def lora_rows(x: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """Add each row's LoRA delta into `out`, in place: out[b, t] += (x[b, t] · At[index[b]]) · Bt[index[b]], rows
    with index 0 left alone. Shapes and dtypes as `fits_rows` says; index (B,) int64 on the CPU, each in
    0 .. slots - 1 (else ValueError). Rows on one adapter go in pairs, each pair reading the adapter once; a row's
    delta is the same sums whichever rows share its call."""
    slots, in_features, rank = At.shape
    x, index = x.contiguous(), index.contiguous()
    fn = getattr(_lib, "lora_rows_" + _HALF[x.dtype] + _HALF[At.dtype] + _HALF[out.dtype])
    status = fn(x.data_ptr(), At.data_ptr(), Bt.data_ptr(), index.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1],
                in_features, rank, Bt.shape[2], slots, torch.get_num_threads())
    if status == -1:
        bad = index[(index < 0) | (index >= slots)].unique().tolist()
        raise ValueError(f"lora_rows: index {bad} outside the stacks' {slots} slots (0 .. {slots - 1})")
    if status:
        raise MemoryError(f"lora_rows: no memory to order {index.numel()} rows by adapter")
