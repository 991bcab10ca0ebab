/* The int8 screen of fedpatch.screened_search as one native pass per query tile.
 *
 * The Python/torch screen writes every query's int8 products with the whole bank (16 MiB per
 * chunk, 111 MB per 1000x750 efficientnet_lite0 image) and then reads them back some twenty
 * times: block maxima, bounds, candidates, their gathering and the final pick. Here each
 * tile of TILE queries takes its block maxima while the sums are still in registers
 * (AVX512-VNNI), so the products never go to memory in bulk; the bounds, the passing blocks'
 * products (kept in L2 for a small bank, recomputed a block of 32 rows at a time for a large
 * one), the candidates' float32 distances and the pick follow while the query's numbers are
 * in cache.
 *
 * The arithmetic is that of screened_search.py, operation for operation in float32 (built
 * with -ffp-contract=off, so no multiply-add is fused where torch rounds twice); see that
 * module's docstring for the bound. The product is exact: the bank's codes are stored
 * unsigned (code + 128) for vpdpbusd, and 128 times the query's code sum is subtracted.
 *
 * Only plain C types cross the boundary (no Python objects): fedpatch/native_screen.py loads
 * this library with ctypes, which releases the GIL, and splits the rows over torch's OpenMP
 * threads (fp_nearest_team) or, failing that, over Python threads (fp_nearest per part).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32   /* bank rows per block: two 16-lane int32 vectors */
#define TILE 8     /* queries per register tile: 16 accumulators */
#define PANEL 64   /* queries whose block maxima are kept at a time */
#define CODE_MAX 127.0f
#define U_FP32 5.9604644775390625e-08f /* 2^-24 */
#define INT32_BELOW 2147483520.0f      /* 2^31 - 128, the largest float32 below 2^31 */

typedef struct {
    int64_t dim;            /* float32 values per vector */
    int64_t padded_dim;     /* dim rounded up to a multiple of 4 (vpdpbusd takes 4 bytes) */
    int64_t blocks;         /* blocks of BLOCK sorted rows */
    int64_t panel_blocks;   /* blocks whose codes are swept per query tile (fit in L2) */
    int64_t keep_products;  /* 1: the bank is small; a tile's products are kept, not recomputed */
    const uint8_t *packed;  /* [blocks][padded_dim / 4][BLOCK][4]: code + 128 */
    const float *mean;      /* [dim] the bank's mean, subtracted from every query */
    const float *lo, *hi, *unit, *norm_term, *low_term; /* [blocks] as in ScreenedSearch */
    float squares_max, norm_term_max, low_term_max, reach, gamma;
    float margin;           /* units of P the thresholds are lowered by */
    const float *vectors;   /* [rows][dim] the float32 bank, unsorted */
    const int64_t *order;   /* sorted row -> bank row */
} fp_bank;

/* Four int8 codes as one int32, the operand vpdpbusd broadcasts (memcpy: no aliasing or
 * alignment assumption; it compiles to a single load). */
static inline int32_t four_codes(const int8_t *codes) {
    int32_t value;
    memcpy(&value, codes, sizeof value);
    return value;
}

/* The lanes of a 16-lane vector that hold values when `remaining` are left (all 16 if more). */
static inline __mmask16 lanes(int64_t remaining) {
    return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1);
}

/* Per-query numbers of screened_search._quantise. */
typedef struct {
    float scale, high_bound, low_bound, magnitude, slack;
    int32_t code_sum;
    int finite;
} fp_query;

/* Step 1 for one query row: codes (padded with zeros) and the numbers its bounds need, 16
 * values at a time. The norms are float32 sums in another order than torch's; their rounding
 * is what gamma bounds, for any order. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void quantise(const fp_bank *bank, const float *row, int8_t *codes, float *work, fp_query *out) {
    const int64_t dim = bank->dim;
    __m512 peak_v = _mm512_setzero_ps();
    __mmask16 finite = 0xFFFF;
    for (int64_t i = 0; i < dim; i += 16) {
        const __mmask16 m = lanes(dim - i);
        const __m512 c = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + i), _mm512_maskz_loadu_ps(m, bank->mean + i));
        _mm512_storeu_ps(work + i, c); /* work holds dim rounded up to 16 */
        /* finite: |c| <= FLT_MAX, false for inf and NaN */
        finite &= _mm512_cmp_ps_mask(_mm512_abs_ps(c), _mm512_set1_ps(3.4028234663852886e38f), _CMP_LE_OQ) | (__mmask16)~m;
        peak_v = _mm512_max_ps(peak_v, _mm512_abs_ps(c));
    }
    memset(codes, 0, (size_t)bank->padded_dim);
    memset(out, 0, sizeof *out);
    if (finite != 0xFFFF) return; /* out->finite stays 0: no candidates for NaN/inf rows */
    out->finite = 1;
    const float peak = _mm512_reduce_max_ps(peak_v);
    const float scale = peak > 0.0f ? peak / CODE_MAX : 1.0f;
    const __m512 scale_v = _mm512_set1_ps(scale);
    __m512i sum_v = _mm512_setzero_si512();
    __m512 high_v = _mm512_setzero_ps(), low_v = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += 16) {
        const __mmask16 m = lanes(dim - i);
        const __m512 c = _mm512_maskz_loadu_ps(m, work + i);
        /* half to even, as torch.round */
        const __m512 rounded = _mm512_roundscale_ps(_mm512_div_ps(c, scale_v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i code = _mm512_cvtps_epi32(rounded);
        _mm512_mask_cvtepi32_storeu_epi8(codes + i, m, code);
        sum_v = _mm512_add_epi32(sum_v, code);
        const __m512 dequantised = _mm512_mul_ps(rounded, scale_v);
        const __m512 residue = _mm512_sub_ps(c, dequantised);
        high_v = _mm512_add_ps(high_v, _mm512_mul_ps(dequantised, dequantised));
        low_v = _mm512_add_ps(low_v, _mm512_mul_ps(residue, residue));
    }
    const float high = sqrtf(_mm512_reduce_add_ps(high_v)), low = sqrtf(_mm512_reduce_add_ps(low_v));
    const float high_bound = high * (1.0f + bank->gamma);
    const float low_bound = low * (1.0f + bank->gamma) + 4.0f * U_FP32 * (high_bound + low);
    const float error_max = low_bound * bank->norm_term_max + high_bound * bank->low_term_max;
    out->scale = scale;
    out->high_bound = high_bound;
    out->low_bound = low_bound;
    out->magnitude = bank->squares_max + error_max;
    out->slack = 8.0f * U_FP32 * (out->magnitude + 2.0f * high_bound * bank->reach);
    out->code_sum = _mm512_reduce_add_epi32(sum_v);
}

/* Block maxima of TILE queries' products with blocks [first, last): out[q * stride + k]. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void tile_block_max(const fp_bank *bank, const int8_t *codes, int64_t first, int64_t last,
                           int32_t *out, int64_t stride, int32_t *products) {
    const int64_t groups = bank->padded_dim / 4, pd = bank->padded_dim;
    for (int64_t k = first; k < last; k++) {
        const uint8_t *b = bank->packed + k * groups * (4 * BLOCK);
        __m512i acc[TILE][2];
        for (int i = 0; i < TILE; i++) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
        for (int64_t g = 0; g < groups; g++) {
            const __m512i b0 = _mm512_loadu_si512(b + g * (4 * BLOCK));
            const __m512i b1 = _mm512_loadu_si512(b + g * (4 * BLOCK) + 64);
            for (int i = 0; i < TILE; i++) {
                const __m512i a = _mm512_set1_epi32(four_codes(codes + i * pd + g * 4));
                acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], b0, a);
                acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], b1, a);
            }
        }
        for (int i = 0; i < TILE; i++)
            out[i * stride + k] = _mm512_reduce_max_epi32(_mm512_max_epi32(acc[i][0], acc[i][1]));
        if (products) { /* [TILE][blocks * BLOCK], read back for the passing blocks only */
            for (int i = 0; i < TILE; i++) {
                _mm512_store_si512(products + (i * bank->blocks + k) * BLOCK, acc[i][0]);
                _mm512_store_si512(products + (i * bank->blocks + k) * BLOCK + 16, acc[i][1]);
            }
        }
    }
}

/* The 32 products of one query with block k (before the code-sum correction), in four
 * independent sums per half so that the additions' latency overlaps. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void block_products(const fp_bank *bank, const int8_t *codes, int64_t k, __m512i *p0, __m512i *p1) {
    const int64_t groups = bank->padded_dim / 4;
    const uint8_t *b = bank->packed + k * groups * (4 * BLOCK);
    __m512i acc[4][2];
    for (int j = 0; j < 4; j++) acc[j][0] = acc[j][1] = _mm512_setzero_si512();
    int64_t g = 0;
    for (; g + 4 <= groups; g += 4) {
        for (int j = 0; j < 4; j++) {
            const __m512i a = _mm512_set1_epi32(four_codes(codes + (g + j) * 4));
            acc[j][0] = _mm512_dpbusd_epi32(acc[j][0], _mm512_loadu_si512(b + (g + j) * (4 * BLOCK)), a);
            acc[j][1] = _mm512_dpbusd_epi32(acc[j][1], _mm512_loadu_si512(b + (g + j) * (4 * BLOCK) + 64), a);
        }
    }
    for (; g < groups; g++) {
        const __m512i a = _mm512_set1_epi32(four_codes(codes + g * 4));
        acc[0][0] = _mm512_dpbusd_epi32(acc[0][0], _mm512_loadu_si512(b + g * (4 * BLOCK)), a);
        acc[0][1] = _mm512_dpbusd_epi32(acc[0][1], _mm512_loadu_si512(b + g * (4 * BLOCK) + 64), a);
    }
    *p0 = _mm512_add_epi32(_mm512_add_epi32(acc[0][0], acc[1][0]), _mm512_add_epi32(acc[2][0], acc[3][0]));
    *p1 = _mm512_add_epi32(_mm512_add_epi32(acc[0][1], acc[1][1]), _mm512_add_epi32(acc[2][1], acc[3][1]));
}

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static float squared_distance(const float *x, const float *y, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(d, d));
    }
    if (i < n) {
        const __mmask16 m = lanes(n - i);
        __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(d, d));
    }
    return _mm512_reduce_add_ps(acc);
}

/* Steps 3 and 4 for one query: its bounds from the block maxima (the float32 arithmetic of
 * ScreenedSearch._screen, 16 blocks at a time), then each passing block's rows against their
 * threshold, the candidates' float32 distances and the nearest (lowest bank row on ties).
 * Returns the number of candidates. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static int64_t finish_query(const fp_bank *bank, const fp_query *q, const int8_t *codes, const int32_t *products,
                            int32_t *maxima, int32_t *limits, int32_t *passing, const float *row, float *distance,
                            int64_t *index) {
    const int64_t blocks = bank->blocks;
    const __m512i correction = _mm512_set1_epi32(128 * q->code_sum);
    const __m512 low_bound = _mm512_set1_ps(q->low_bound), high_bound = _mm512_set1_ps(q->high_bound);
    const __m512 scale = _mm512_set1_ps(q->scale);
    __m512 upper_v = _mm512_set1_ps(INFINITY);
    for (int64_t k = 0; k < blocks; k += 16) {
        const __mmask16 m = lanes(blocks - k);
        const __m512i bmax = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(m, maxima + k), correction);
        _mm512_mask_storeu_epi32(maxima + k, m, bmax);
        const __m512 error = _mm512_add_ps(_mm512_mul_ps(low_bound, _mm512_maskz_loadu_ps(m, bank->norm_term + k)),
                                           _mm512_mul_ps(high_bound, _mm512_maskz_loadu_ps(m, bank->low_term + k)));
        const __m512 unit = _mm512_mul_ps(scale, _mm512_maskz_loadu_ps(m, bank->unit + k));
        const __m512 value = _mm512_sub_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(m, bank->hi + k), error),
                                           _mm512_mul_ps(unit, _mm512_cvtepi32_ps(bmax)));
        upper_v = _mm512_mask_min_ps(upper_v, m, upper_v, value);
    }
    float upper = _mm512_reduce_min_ps(upper_v);
    upper += q->slack;
    upper += 5.0f * U_FP32 * (q->magnitude + fabsf(upper));
    const __m512 upper_b = _mm512_set1_ps(upper), margin = _mm512_set1_ps(bank->margin);
    const __m512 floor_min = _mm512_set1_ps(-2147483648.0f), ceiling = _mm512_set1_ps(INT32_BELOW);
    int64_t count = 0;
    for (int64_t k = 0; k < blocks; k += 16) {
        const __mmask16 m = lanes(blocks - k);
        const __m512 error = _mm512_add_ps(_mm512_mul_ps(low_bound, _mm512_maskz_loadu_ps(m, bank->norm_term + k)),
                                           _mm512_mul_ps(high_bound, _mm512_maskz_loadu_ps(m, bank->low_term + k)));
        const __m512 unit = _mm512_mul_ps(scale, _mm512_maskz_loadu_ps(m, bank->unit + k));
        const __m512 gap = _mm512_sub_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, bank->lo + k), error), upper_b);
        __m512 limit = _mm512_sub_ps(_mm512_roundscale_ps(_mm512_div_ps(gap, unit), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), margin);
        limit = _mm512_min_ps(_mm512_max_ps(limit, floor_min), ceiling);
        const __m512i threshold = _mm512_cvttps_epi32(limit);
        _mm512_mask_storeu_epi32(limits + k, m, threshold);
        /* blocks whose largest product reaches their threshold; the others are skipped whole
         * (compressed in a register: a compressing store is microcoded on Zen 4) */
        const __mmask16 pass = _mm512_mask_cmpge_epi32_mask(m, _mm512_maskz_loadu_epi32(m, maxima + k), threshold);
        const __m512i ids = _mm512_add_epi32(_mm512_set1_epi32((int32_t)k), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        _mm512_storeu_si512(passing + count, _mm512_maskz_compress_epi32(pass, ids));
        count += __builtin_popcount(pass);
    }
    uint64_t best = UINT64_MAX;
    int64_t candidates = 0;
    for (int64_t j = 0; j < count; j++) {
        const int64_t k = passing[j];
        __m512i p0, p1;
        if (products) {
            p0 = _mm512_load_si512(products + k * BLOCK);
            p1 = _mm512_load_si512(products + k * BLOCK + 16);
        } else {
            block_products(bank, codes, k, &p0, &p1);
        }
        const __m512i limit = _mm512_set1_epi32(limits[k]);
        uint32_t pass = (uint32_t)_mm512_cmpge_epi32_mask(_mm512_sub_epi32(p0, correction), limit)
                      | (uint32_t)_mm512_cmpge_epi32_mask(_mm512_sub_epi32(p1, correction), limit) << 16;
        while (pass) {
            const int r = __builtin_ctz(pass);
            pass &= pass - 1;
            const int64_t bank_row = bank->order[k * BLOCK + r];
            const float squared = squared_distance(row, bank->vectors + bank_row * bank->dim, bank->dim);
            uint32_t bits;
            memcpy(&bits, &squared, sizeof bits);
            const uint64_t key = (uint64_t)bits << 32 | (uint64_t)bank_row;
            best = key < best ? key : best;
            candidates++;
        }
    }
    if (best == UINT64_MAX) return candidates; /* left unmatched by the caller's defaults */
    const uint32_t bits = (uint32_t)(best >> 32);
    float squared;
    memcpy(&squared, &bits, sizeof squared);
    *distance = sqrtf(squared);
    *index = (int64_t)(best & 0xFFFFFFFFu);
    return candidates;
}

/* Whether this CPU (and its operating system) runs the AVX-512 VNNI code above. */
int fp_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}

/* Exact nearest bank row of query rows [0, n): distances[i] and indices[i] are written for
 * rows that find one (the caller fills NaN / -1 first). Returns the number of candidate
 * pairs whose distances were computed, or -1 if the scratch memory could not be had. */
int64_t fp_nearest(const fp_bank *bank, const float *query, int64_t n, float *distances, int64_t *indices) {
    const int64_t pd = bank->padded_dim, blocks = bank->blocks;
    const int64_t stride = (blocks + 15) / 16 * 16;
    /* a small bank: one tile at a time over the whole bank, its products kept; a large one:
     * PANEL queries per sweep of panel_blocks blocks, so each panel of codes is read from L2
     * for PANEL queries, and a passing block's products are recomputed */
    const int64_t panel = bank->keep_products ? TILE : PANEL;
    int8_t *codes = aligned_alloc(64, (size_t)(PANEL * pd + 63) / 64 * 64);
    float *work = aligned_alloc(64, sizeof(float) * (size_t)((bank->dim + 15) / 16 * 16));
    int32_t *maxima = aligned_alloc(64, sizeof(int32_t) * (size_t)(PANEL * stride));
    int32_t *limits = aligned_alloc(64, sizeof(int32_t) * (size_t)stride);
    int32_t *passing = aligned_alloc(64, sizeof(int32_t) * (size_t)(stride + 16));
    int32_t *products = bank->keep_products ? aligned_alloc(64, sizeof(int32_t) * (size_t)(TILE * blocks * BLOCK)) : NULL;
    fp_query numbers[PANEL];
    int64_t candidates = 0;
    if (!codes || !work || !maxima || !limits || !passing || (bank->keep_products && !products)) {
        candidates = -1;
        goto done;
    }
    for (int64_t start = 0; start < n; start += panel) {
        const int64_t rows = n - start < panel ? n - start : panel;
        const int64_t tiles = (rows + TILE - 1) / TILE;
        for (int64_t i = 0; i < rows; i++)
            quantise(bank, query + (start + i) * bank->dim, codes + i * pd, work, &numbers[i]);
        memset(codes + rows * pd, 0, (size_t)((tiles * TILE - rows) * pd)); /* the last tile's spare rows */
        for (int64_t first = 0; first < blocks; first += bank->panel_blocks) {
            const int64_t last = first + bank->panel_blocks < blocks ? first + bank->panel_blocks : blocks;
            for (int64_t t = 0; t < tiles; t++)
                tile_block_max(bank, codes + t * TILE * pd, first, last, maxima + t * TILE * stride, stride, products);
        }
        for (int64_t i = 0; i < rows; i++) {
            if (!numbers[i].finite) continue;
            candidates += finish_query(bank, &numbers[i], codes + i * pd, products ? products + i * blocks * BLOCK : NULL,
                                       maxima + i * stride, limits, passing, query + (start + i) * bank->dim, distances + start + i,
                                       indices + start + i);
        }
    }
done:
    free(codes);
    free(work);
    free(maxima);
    free(limits);
    free(passing);
    free(products);
    return candidates;
}

/* One search split over an OpenMP team: the caller passes libgomp's GOMP_parallel and
 * omp_get_thread_num / omp_get_num_threads from the copy torch loaded, so the work runs on
 * torch's own worker threads. Threads of a second pool would compete with those, which spin
 * for a while after each torch operation (a search started right after one ran 1.5x slower
 * on two Python threads). */
typedef void (*fp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*fp_omp_int_fn)(void);

#define MAX_TEAM 256

typedef struct {
    const fp_bank *bank;
    const float *query;
    int64_t n;
    float *distances;
    int64_t *indices;
    fp_omp_int_fn thread_num, num_threads;
    int64_t found[MAX_TEAM];
} fp_team_job;

static void team_body(void *data) {
    fp_team_job *job = data;
    const int64_t member = job->thread_num(), size = job->num_threads();
    /* whole tiles per member, the first members taking one more where they do not divide */
    const int64_t tiles = (job->n + TILE - 1) / TILE;
    const int64_t first = tiles * member / size * TILE, last = tiles * (member + 1) / size * TILE;
    const int64_t stop = last < job->n ? last : job->n;
    job->found[member] = first < stop ? fp_nearest(job->bank, job->query + first * job->bank->dim, stop - first,
                                                   job->distances + first, job->indices + first)
                                      : 0;
}

int64_t fp_nearest_team(const fp_bank *bank, const float *query, int64_t n, float *distances, int64_t *indices,
                        int64_t threads, fp_parallel_fn parallel, fp_omp_int_fn thread_num, fp_omp_int_fn num_threads) {
    fp_team_job job = {bank, query, n, distances, indices, thread_num, num_threads, {0}};
    if (threads < 1) threads = 1;
    if (threads > MAX_TEAM) threads = MAX_TEAM;
    parallel(team_body, &job, (unsigned)threads, 0);
    int64_t found = 0;
    for (int64_t i = 0; i < threads; i++) {
        if (job.found[i] < 0) return -1;
        found += job.found[i];
    }
    return found;
}
