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
 * The block bound is that of screened_search.py, operation for operation in float32 (built
 * with -ffp-contract=off, so no multiply-add is fused where torch rounds twice); see that
 * module's docstring for the bound. Each query then tightens it with the float32 distance of
 * its most promising row and tests each row of a passing block on the row's own numbers
 * (finish_query), so fewer candidates' distances are computed for the same pick. The product
 * is exact: the bank's codes are stored unsigned (code + 128) for vpdpbusd, and 128 times the
 * query's code sum is subtracted.
 *
 * Where the bank has a head pass (fedpatch/screen_head.py: head_dim > 0), the full product is
 * taken only for the blocks a head test keeps: each query's coordinates on the bank's first
 * principal axes are scaled to int8 (rotate, head_quantise), the float32 distance of a
 * promising row (head_seed) bounds the nearest distance, and the head product's lower bound
 * of each row's distance rules out the rest (head_target, head_limits); a block no query of
 * the tile keeps is not multiplied in full (tile_block_max_kept). The bank's blocks are then
 * the k-d cells of that split rather than norm bands, so that a tile of neighbouring patches
 * keeps few of them: on efficientnet_lite0's 1000x750 features 24% of the tile x block
 * products are taken, on WRN-50-2's 12%.
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
#define SKIPPED INT32_MIN              /* a block maximum the head pass left out (sums never reach it: MAX_DIM) */

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
    const float *row_sq, *row_norm_term, *row_low_term; /* [blocks * BLOCK] the per-block numbers of each row */
    /* the head pass (head_dim 0: none): the bank's first principal axes, its coordinates on
     * them as int8 codes, and the bounds that relate their distances to the real ones */
    int64_t head_dim;            /* rotated dims, a multiple of 16 */
    const float *rotation;       /* [dim][head_dim] W, float32 */
    const uint8_t *head_packed;  /* [blocks][head_dim / 4][BLOCK][4]: code + 128 */
    const float *head_unit;      /* [blocks] the head codes' scale s_k */
    const float *head_norm, *head_low; /* [blocks] the rows' largest |b'| and |b' - s_k r| */
    const float *head_row;       /* [blocks * BLOCK] each row's |b'|^2 / (2 s_k), rounded down */
    const float *head_row_sq;    /* [blocks * BLOCK] each row's |b'|^2 (for the most promising row only) */
    /* the k-d split that ordered the bank: node i halves on head axis kd_axis[i] at kd_value[i];
     * kd_child[2 i], kd_child[2 i + 1]: the lower and upper half, a node (>= 0) or block
     * -1 - child; no nodes: one block */
    int64_t kd_nodes;
    const int32_t *kd_axis, *kd_child;
    const float *kd_value;
    float head_sq_max, head_norm_max, head_low_max; /* over the bank: |b'|^2, |b'|, |b' - s_k r| */
    float head_sigma;            /* >= the largest singular value of W: |W^T x| <= sigma |x| */
    float head_query_error;      /* gamma_(dim+2) |W|_F: a query's head error per unit of |c| */
    float head_bank_error;       /* >= |b' - W^T (b - mean)| for every row */
    int64_t *products_taken;     /* [2], added to by every call: tile x block products taken in full, and seen */
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
    float norm_low;         /* a lower bound of |c|^2 */
    float norm_up;          /* an upper bound of |c| */
    int32_t code_sum;
    int finite;
} fp_query;

/* A vector c of n float32 values as int8 codes r (half to even, as torch.round) with scale
 * s = peak / 127, and bounds on |s r| and on the residue |c - s r| (each enlarged by its
 * float32 rounding: the norm's, and the scaling's and subtraction's, each <= u |c|, with
 * |c| <= |s r| + |c - s r|; `gamma` bounds a float32 sum of n terms). */
typedef struct {
    float scale, high_bound, low_bound;
    float squares;          /* the float32 sum of c_i^2 */
    int32_t code_sum;
} fp_codes;

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static fp_codes scale_to_codes(const float *c, int64_t n, float peak, float gamma, int8_t *codes) {
    fp_codes out;
    out.scale = peak > 0.0f ? peak / CODE_MAX : 1.0f;
    const __m512 scale_v = _mm512_set1_ps(out.scale);
    __m512i sum_v = _mm512_setzero_si512();
    __m512 high_v = _mm512_setzero_ps(), low_v = _mm512_setzero_ps(), norm_v = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = lanes(n - i);
        const __m512 value = _mm512_maskz_loadu_ps(m, c + i);
        norm_v = _mm512_add_ps(norm_v, _mm512_mul_ps(value, value));
        const __m512 rounded = _mm512_roundscale_ps(_mm512_div_ps(value, scale_v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i code = _mm512_cvtps_epi32(rounded);
        _mm512_mask_cvtepi32_storeu_epi8(codes + i, m, code);
        sum_v = _mm512_add_epi32(sum_v, code);
        const __m512 dequantised = _mm512_mul_ps(rounded, scale_v);
        const __m512 residue = _mm512_sub_ps(value, dequantised);
        high_v = _mm512_add_ps(high_v, _mm512_mul_ps(dequantised, dequantised));
        low_v = _mm512_add_ps(low_v, _mm512_mul_ps(residue, residue));
    }
    const float high = sqrtf(_mm512_reduce_add_ps(high_v)), low = sqrtf(_mm512_reduce_add_ps(low_v));
    out.high_bound = high * (1.0f + gamma);
    out.low_bound = low * (1.0f + gamma) + 4.0f * U_FP32 * (out.high_bound + low);
    out.squares = _mm512_reduce_add_ps(norm_v);
    out.code_sum = _mm512_reduce_add_epi32(sum_v);
    return out;
}

/* Step 1 for one query row: codes (padded with zeros) and the numbers its bounds need, 16
 * values at a time; `work` is left holding c = row - mean. The norms are float32 sums in
 * another order than torch's; their rounding is what gamma bounds, for any order. */
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
    const fp_codes q = scale_to_codes(work, dim, _mm512_reduce_max_ps(peak_v), bank->gamma, codes);
    const float error_max = q.low_bound * bank->norm_term_max + q.high_bound * bank->low_term_max;
    out->scale = q.scale;
    out->high_bound = q.high_bound;
    out->low_bound = q.low_bound;
    out->magnitude = bank->squares_max + error_max;
    out->slack = 8.0f * U_FP32 * (out->magnitude + 2.0f * q.high_bound * bank->reach);
    out->code_sum = q.code_sum;
    /* each c_i is rounded once (centring), then squared and summed: within (1 + u)^3 (1 + gamma)
     * of |c|^2, and the product below rounds once more */
    out->norm_low = q.squares * (1.0f - bank->gamma - 6.0f * U_FP32);
    out->norm_up = sqrtf(q.squares * (1.0f + 2.0f * bank->gamma + 8.0f * U_FP32)) * (1.0f + 4.0f * U_FP32);
}

/* The head test's numbers for one query (fedpatch/screen_head.py). */
enum { HEAD_SKIP = 0, HEAD_KEEP = 1, HEAD_CHECK = 2 };
typedef struct {
    float scale2;           /* 2 s'_q */
    float high2, low2;      /* 2 |s'_q r'_q| and 2 |c' - s'_q r'_q| (upper bounds) */
    float squares;          /* the float32 sum of c'_i^2 */
    float magnitude;        /* of the keep test's float32 terms (its slack's scale) */
    float error;            /* e_q + e_b: how far |c' - b'| can be from |W^T (q - b)| */
    float target;           /* A_q: a row is kept while its head terms reach it */
    int32_t code_sum;
    int mode;               /* HEAD_SKIP: no rows (non-finite or spare); HEAD_KEEP: every row; HEAD_CHECK */
} fp_head;

/* The head coordinates c' = W^T c of `count` centred queries (rows of `c`, `stride` apart;
 * count a multiple of 4), into `head` [count][head_dim]: four queries at a time, so each row
 * of W is loaded once for four. Each is a float32 sum of dim products: |c' - W^T c| <=
 * gamma_(dim+2) |W|_F |c| (with the centring's rounding) for any order of the sums. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void rotate(const fp_bank *bank, const float *c, int64_t stride, int64_t count, float *head) {
    const int64_t dim = bank->dim, hd = bank->head_dim, parts = hd / 16;
    for (int64_t first = 0; first < count; first += 4) {
        __m512 acc[4][4];
        for (int r = 0; r < 4; r++)
            for (int p = 0; p < 4; p++) acc[r][p] = _mm512_setzero_ps();
        for (int64_t j = 0; j < dim; j++) {
            const float *w = bank->rotation + j * hd;
            for (int r = 0; r < 4; r++) {
                const __m512 cj = _mm512_set1_ps(c[(first + r) * stride + j]);
                for (int64_t p = 0; p < parts; p++) acc[r][p] = _mm512_fmadd_ps(_mm512_loadu_ps(w + 16 * p), cj, acc[r][p]);
            }
        }
        for (int r = 0; r < 4; r++)
            for (int64_t p = 0; p < parts; p++) _mm512_storeu_ps(head + (first + r) * hd + 16 * p, acc[r][p]);
    }
}

/* The int8 codes of a finite query's head coordinates (rotate) and the numbers of its head
 * test. A query whose head numbers are not finite keeps every row. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void head_quantise(const fp_bank *bank, const fp_query *q, const float *head, int8_t *codes, fp_head *out) {
    const int64_t hd = bank->head_dim, parts = hd / 16;
    memset(codes, 0, (size_t)hd);
    memset(out, 0, sizeof *out);
    out->mode = HEAD_SKIP;
    if (!q->finite) return;
    out->mode = HEAD_KEEP;
    __m512 peak_v = _mm512_setzero_ps();
    __mmask16 finite = 0xFFFF;
    for (int64_t p = 0; p < parts; p++) {
        const __m512 value = _mm512_loadu_ps(head + 16 * p);
        finite &= _mm512_cmp_ps_mask(_mm512_abs_ps(value), _mm512_set1_ps(3.4028234663852886e38f), _CMP_LE_OQ);
        peak_v = _mm512_max_ps(peak_v, _mm512_abs_ps(value));
    }
    if (finite != 0xFFFF) return;
    const fp_codes h = scale_to_codes(head, hd, _mm512_reduce_max_ps(peak_v), bank->gamma, codes);
    out->scale2 = 2.0f * h.scale;
    out->high2 = 2.0f * h.high_bound;
    out->low2 = 2.0f * h.low_bound;
    out->squares = h.squares;
    out->code_sum = h.code_sum;
    out->error = bank->head_query_error * q->norm_up + bank->head_bank_error;
    out->magnitude = h.squares + bank->head_sq_max + out->high2 * (bank->head_norm_max + 2.0f * bank->head_low_max)
                   + out->low2 * bank->head_norm_max;
    if (out->magnitude < INFINITY && out->error < INFINITY) out->mode = HEAD_CHECK;
}

/* The head test's target once a row at float32 squared distance `squared` is known: every row
 * that can still be the float32 nearest has D <= squared (1 + 2 gamma) (as in distance_upper),
 * so |W^T (q - b)| <= sigma sqrt(D) and |c' - b'| <= that + e_q + e_b =: sqrt(T). A row is kept
 * while the lower bound of |c' - b'|^2 from its int8 product can be <= T:
 *   |c'|^2 + |b'|^2 - 2 s'_q s_k P - 2 |s'_q r'_q| |l_b| - 2 |l'_q| |b'| <= T,
 * that is 2 s'_q s_k P + 2 |s'_q r'_q| |l_b| + 2 |l'_q| |b'| - |b'|^2 >= |c'|^2 - T =: A_q,
 * lowered by a slack of 1e-5 of the terms' magnitude (their float32 rounding is below 10 u). */
static void head_target(const fp_bank *bank, fp_head *h, float squared) {
    if (h->mode != HEAD_CHECK) return;
    const float reach = squared * (1.0f + 2.0f * bank->gamma + 16.0f * U_FP32);
    const float radius = bank->head_sigma * sqrtf(reach) * (1.0f + 8.0f * U_FP32) + h->error;
    const float target = radius * radius * (1.0f + 1e-5f);
    const float low = h->squares * (1.0f - bank->gamma - 6.0f * U_FP32);
    h->target = low - target - 1e-5f * (h->magnitude + target);
    if (!(h->target > -INFINITY)) h->mode = HEAD_KEEP; /* NaN or -inf: no test */
}

/* The raw products (before the code-sum correction) of TILE queries' codes (`groups` groups
 * of 4 each, one query after another) with block k of `packed` ([blocks][groups][BLOCK][4]):
 * 8 x 32 sums in 16 registers. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static inline void tile_products(const uint8_t *packed, int64_t groups, const int8_t *codes, int64_t k, __m512i acc[TILE][2]) {
    const uint8_t *b = packed + k * groups * (4 * BLOCK);
    for (int i = 0; i < TILE; i++) acc[i][0] = acc[i][1] = _mm512_setzero_si512();
    for (int64_t g = 0; g < groups; g++) {
        const __m512i b0 = _mm512_loadu_si512(b + g * (4 * BLOCK));
        const __m512i b1 = _mm512_loadu_si512(b + g * (4 * BLOCK) + 64);
        for (int i = 0; i < TILE; i++) {
            const __m512i a = _mm512_set1_epi32(four_codes(codes + (i * groups + g) * 4));
            acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], b0, a);
            acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], b1, a);
        }
    }
}

/* Block maxima of TILE queries' products with blocks [first, last): out[q * stride + k]. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void tile_block_max(const fp_bank *bank, const int8_t *codes, int64_t first, int64_t last,
                           int32_t *out, int64_t stride, int32_t *products) {
    for (int64_t k = first; k < last; k++) {
        __m512i acc[TILE][2];
        tile_products(bank->packed, bank->padded_dim / 4, codes, k, acc);
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

/* The head test's limits of one query for blocks [first, last) (head_target): a row r of
 * block k is kept while s'_q P - |b'_r|^2 / (2 s_k) >= limit[k], with the block's largest
 * |b'| and |l_b| in the error terms. HEAD_KEEP queries get -inf and HEAD_SKIP ones +inf. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void head_limits(const fp_bank *bank, const fp_head *h, int64_t first, int64_t last, float *limit) {
    for (int64_t k = first; k < last; k += 16) {
        const __mmask16 m = lanes(last - k);
        if (h->mode != HEAD_CHECK) {
            _mm512_mask_storeu_ps(limit + k - first, m, _mm512_set1_ps(h->mode == HEAD_KEEP ? -INFINITY : INFINITY));
            continue;
        }
        /* (A_q - 2 |s'_q r'_q| |l_b| - 2 |l'_q| |b'|) / (2 s_k); the rounding is inside A_q's slack */
        __m512 gap = _mm512_sub_ps(_mm512_set1_ps(h->target), _mm512_mul_ps(_mm512_set1_ps(h->high2), _mm512_maskz_loadu_ps(m, bank->head_low + k)));
        gap = _mm512_sub_ps(gap, _mm512_mul_ps(_mm512_set1_ps(h->low2), _mm512_maskz_loadu_ps(m, bank->head_norm + k)));
        const __m512 twice = _mm512_mul_ps(_mm512_set1_ps(2.0f), _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), m, bank->head_unit + k));
        _mm512_mask_storeu_ps(limit + k - first, m, _mm512_div_ps(gap, twice));
    }
}

/* The 32 products of one query's codes (`groups` groups of 4) with block k of `packed`
 * ([blocks][groups][BLOCK][4]; before the code-sum correction), in four independent sums per
 * half so that the additions' latency overlaps. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void block_products(const uint8_t *packed, int64_t groups, const int8_t *codes, int64_t k, __m512i *p0, __m512i *p1) {
    const uint8_t *b = packed + k * groups * (4 * BLOCK);
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

/* The row of a block with the smallest estimate |b|^2 - unit P (its 32 squared norms `squares`,
 * corrected products p0, p1), lowest first on ties: 0-31, or -1 where none is a number. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static inline int least_row(const float *squares, __m512 unit, __m512i p0, __m512i p1) {
    const __m512 e0 = _mm512_sub_ps(_mm512_loadu_ps(squares), _mm512_mul_ps(unit, _mm512_cvtepi32_ps(p0)));
    const __m512 e1 = _mm512_sub_ps(_mm512_loadu_ps(squares + 16), _mm512_mul_ps(unit, _mm512_cvtepi32_ps(p1)));
    const float smallest = _mm512_reduce_min_ps(_mm512_min_ps(e0, e1));
    const uint32_t hits = (uint32_t)_mm512_cmp_ps_mask(e0, _mm512_set1_ps(smallest), _CMP_EQ_OQ)
                        | (uint32_t)_mm512_cmp_ps_mask(e1, _mm512_set1_ps(smallest), _CMP_EQ_OQ) << 16;
    return hits ? __builtin_ctz(hits) : -1;
}

/* The most promising row for one query's head test: the block of the k-d split that holds c'
 * (a descent on the split values), and in it the row with the smallest head estimate
 * |b'|^2 - 2 s'_q s_k P. Any row would do (its float32 distance only sets the target); a
 * near one keeps the target tight. -1 if no estimate is finite. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static int64_t head_seed(const fp_bank *bank, const fp_head *h, const float *head, const int8_t *codes) {
    int64_t k = 0;
    for (int64_t node = 0; node < bank->kd_nodes;) {
        const int32_t child = bank->kd_child[2 * node + (head[bank->kd_axis[node]] < bank->kd_value[node] ? 0 : 1)];
        if (child < 0) {
            k = -1 - (int64_t)child;
            break;
        }
        node = child;
    }
    __m512i p0, p1;
    block_products(bank->head_packed, bank->head_dim / 4, codes, k, &p0, &p1);
    const __m512i correction = _mm512_set1_epi32(128 * h->code_sum);
    const int at = least_row(bank->head_row_sq + k * BLOCK, _mm512_set1_ps(h->scale2 * bank->head_unit[k]),
                             _mm512_sub_epi32(p0, correction), _mm512_sub_epi32(p1, correction));
    return at < 0 ? -1 : k * BLOCK + at;
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

/* The bound on D - |c|^2 that a computed squared distance gives: a row whose float32 distance
 * is at most `squared` has D <= squared / (1 - gamma) (the float32 sum's rounding), and
 * |c|^2 >= norm_low. It is far tighter than the block bound, which carries the int8 error
 * twice (once in the upper bound, once in each row's lower bound); this one carries it once.
 * The slacks are those of the block bound plus this function's own rounding. A query whose
 * |c|^2 overflows float32 gets no such bound (infinity: the block bound stands). */
static inline float distance_upper(const fp_bank *bank, const fp_query *q, float squared) {
    if (!(q->norm_low < INFINITY)) return INFINITY;
    const float reach = squared * (1.0f + 2.0f * bank->gamma + 8.0f * U_FP32);
    float upper = reach - q->norm_low;
    upper += q->slack;
    upper += 5.0f * U_FP32 * (q->magnitude + fabsf(upper) + reach + q->norm_low);
    return upper;
}

/* E_qk of 16 blocks or rows: the int8 error bound from their norm and residue terms. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static inline __m512 error_bound(const fp_query *q, __m512 norm_term, __m512 low_term) {
    return _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(q->low_bound), norm_term), _mm512_mul_ps(_mm512_set1_ps(q->high_bound), low_term));
}

/* The smallest product a row with these numbers needs to be a candidate under `upper`: the
 * float32 operations of the block thresholds (ScreenedSearch._screen), 16 rows or blocks at a
 * time. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static inline __m512i thresholds(const fp_query *q, __m512 lo, __m512 norm_term, __m512 low_term, __m512 unit_part, float upper,
                                 float margin) {
    const __m512 error = error_bound(q, norm_term, low_term);
    const __m512 unit = _mm512_mul_ps(_mm512_set1_ps(q->scale), unit_part);
    const __m512 gap = _mm512_sub_ps(_mm512_sub_ps(lo, error), _mm512_set1_ps(upper));
    __m512 limit = _mm512_sub_ps(_mm512_roundscale_ps(_mm512_div_ps(gap, unit), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),
                                 _mm512_set1_ps(margin));
    limit = _mm512_min_ps(_mm512_max_ps(limit, _mm512_set1_ps(-2147483648.0f)), _mm512_set1_ps(INT32_BELOW));
    return _mm512_cvttps_epi32(limit);
}

/* Block k's 32 products (corrected for the unsigned codes): kept, or recomputed. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static inline void block_of(const fp_bank *bank, const int8_t *codes, const int32_t *products, int64_t k, __m512i correction,
                            __m512i *p0, __m512i *p1) {
    if (products) {
        *p0 = _mm512_load_si512(products + k * BLOCK);
        *p1 = _mm512_load_si512(products + k * BLOCK + 16);
    } else {
        block_products(bank->packed, bank->padded_dim / 4, codes, k, p0, p1);
    }
    *p0 = _mm512_sub_epi32(*p0, correction);
    *p1 = _mm512_sub_epi32(*p1, correction);
}

/* The rows of block k (products p0, p1) that can still be the nearest under `upper`, one bit
 * each: the block threshold with each row's own numbers in place of the block's extremes. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static inline uint32_t passing_rows(const fp_bank *bank, const fp_query *q, int64_t k, float upper, __m512i p0, __m512i p1) {
    const __m512 unit_part = _mm512_set1_ps(bank->unit[k]);
    const int64_t r = k * BLOCK;
    const __m512i t0 = thresholds(q, _mm512_loadu_ps(bank->row_sq + r), _mm512_loadu_ps(bank->row_norm_term + r),
                                  _mm512_loadu_ps(bank->row_low_term + r), unit_part, upper, bank->margin);
    const __m512i t1 = thresholds(q, _mm512_loadu_ps(bank->row_sq + r + 16), _mm512_loadu_ps(bank->row_norm_term + r + 16),
                                  _mm512_loadu_ps(bank->row_low_term + r + 16), unit_part, upper, bank->margin);
    return (uint32_t)_mm512_cmpge_epi32_mask(p0, t0) | (uint32_t)_mm512_cmpge_epi32_mask(p1, t1) << 16;
}

/* One candidate's float32 squared distance as a key that orders like (distance, bank row). */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static inline uint64_t candidate_key(const fp_bank *bank, const float *row, int64_t sorted_row, float *squared) {
    const int64_t bank_row = bank->order[sorted_row];
    *squared = squared_distance(row, bank->vectors + bank_row * bank->dim, bank->dim);
    uint32_t bits;
    memcpy(&bits, squared, sizeof bits);
    return (uint64_t)bits << 32 | (uint64_t)bank_row;
}

/* Steps 3 and 4 for one query:
 * - the block bound from the block maxima (the float32 arithmetic of ScreenedSearch._screen,
 *   16 blocks at a time) of the blocks the head test kept (others are SKIPPED), and the block
 *   most likely to hold the nearest row (the smallest |b|^2 - 2 s_q s_k max P, with the middle
 *   of its norms: the k-d cells' norms spread);
 * - that block's most promising row and the head test's seed row (if any), whose float32
 *   distances give a much tighter bound (distance_upper);
 * - the blocks whose largest product reaches their threshold under it, and in each the rows
 *   whose own threshold is reached: the candidates, whose float32 distances are computed (the
 *   bound tightening whenever a closer row turns up), and the nearest (lowest bank row on ties).
 * Every row that can be the nearest by float32 distance stays a candidate, so the pick is the
 * torch screen's, from fewer candidates. Returns the number of candidates. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static int64_t finish_query(const fp_bank *bank, const fp_query *q, const int8_t *codes, const int32_t *products,
                            int32_t *maxima, int32_t *passing, const float *row, uint64_t seed, int64_t seed_row,
                            float *distance, int64_t *index) {
    const int64_t blocks = bank->blocks;
    const __m512i correction = _mm512_set1_epi32(128 * q->code_sum);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 upper_v = _mm512_set1_ps(INFINITY), least_v = _mm512_set1_ps(INFINITY);
    __m512i least_block = _mm512_setzero_si512();
    for (int64_t k = 0; k < blocks; k += 16) {
        const __m512i raw = _mm512_maskz_loadu_epi32(lanes(blocks - k), maxima + k);
        const __mmask16 m = _mm512_mask_cmpneq_epi32_mask(lanes(blocks - k), raw, _mm512_set1_epi32(SKIPPED));
        const __m512i bmax = _mm512_sub_epi32(raw, correction);
        _mm512_mask_storeu_epi32(maxima + k, m, bmax);
        const __m512 error = error_bound(q, _mm512_maskz_loadu_ps(m, bank->norm_term + k), _mm512_maskz_loadu_ps(m, bank->low_term + k));
        const __m512 unit = _mm512_mul_ps(_mm512_set1_ps(q->scale), _mm512_maskz_loadu_ps(m, bank->unit + k));
        const __m512 value = _mm512_sub_ps(_mm512_add_ps(_mm512_maskz_loadu_ps(m, bank->hi + k), error),
                                           _mm512_mul_ps(unit, _mm512_cvtepi32_ps(bmax)));
        upper_v = _mm512_mask_min_ps(upper_v, m, upper_v, value);
        const __m512 middle = _mm512_mul_ps(_mm512_set1_ps(0.5f), _mm512_add_ps(_mm512_maskz_loadu_ps(m, bank->lo + k), _mm512_maskz_loadu_ps(m, bank->hi + k)));
        const __m512 guess = _mm512_sub_ps(middle, _mm512_mul_ps(unit, _mm512_cvtepi32_ps(bmax)));
        const __mmask16 lower = _mm512_mask_cmp_ps_mask(m, guess, least_v, _CMP_LT_OQ);
        least_v = _mm512_mask_mov_ps(least_v, lower, guess);
        least_block = _mm512_mask_mov_epi32(least_block, lower, _mm512_add_epi32(_mm512_set1_epi32((int32_t)k), lane));
    }
    float upper = _mm512_reduce_min_ps(upper_v);
    upper += q->slack;
    upper += 5.0f * U_FP32 * (q->magnitude + fabsf(upper));
    int64_t candidates = 0;
    uint64_t best = seed; /* the head test's row, whose distance the caller counted */
    if (seed != UINT64_MAX) {
        const uint32_t bits = (uint32_t)(seed >> 32);
        float squared;
        memcpy(&squared, &bits, sizeof squared);
        const float tighter = distance_upper(bank, q, squared);
        upper = tighter < upper ? tighter : upper;
    }
    int64_t first_row = -1, first_block = -1; /* sorted row whose distance is already known, its block */
    __m512i first_p0 = _mm512_setzero_si512(), first_p1 = _mm512_setzero_si512(); /* that block's products */
    const float least = _mm512_reduce_min_ps(least_v);
    const __mmask16 at = _mm512_cmp_ps_mask(least_v, _mm512_set1_ps(least), _CMP_EQ_OQ);
    if (at && least < INFINITY) {
        /* its row with the smallest estimate |b|^2 - 2 s_q s_k P */
        int32_t ids[16];
        _mm512_storeu_si512(ids, least_block);
        const int64_t k = ids[__builtin_ctz(at)];
        __m512i p0, p1;
        block_of(bank, codes, products, k, correction, &p0, &p1);
        first_block = k, first_p0 = p0, first_p1 = p1; /* not recomputed when the block passes */
        const int at_row = least_row(bank->row_sq + k * BLOCK, _mm512_set1_ps(q->scale * bank->unit[k]), p0, p1);
        if (at_row >= 0 && k * BLOCK + at_row != seed_row) {
            first_row = k * BLOCK + at_row;
            float squared;
            const uint64_t key = candidate_key(bank, row, first_row, &squared);
            candidates++;
            if (key < best) best = key;
            const float tighter = distance_upper(bank, q, squared);
            upper = tighter < upper ? tighter : upper;
        }
    }
    /* the blocks whose largest product reaches their threshold (compressed in a register: a
     * compressing store is microcoded on Zen 4) */
    int64_t count = 0;
    for (int64_t k = 0; k < blocks; k += 16) {
        const __mmask16 m = _mm512_mask_cmpneq_epi32_mask(lanes(blocks - k), _mm512_maskz_loadu_epi32(lanes(blocks - k), maxima + k),
                                                          _mm512_set1_epi32(SKIPPED));
        const __m512i threshold = thresholds(q, _mm512_maskz_loadu_ps(m, bank->lo + k), _mm512_maskz_loadu_ps(m, bank->norm_term + k),
                                             _mm512_maskz_loadu_ps(m, bank->low_term + k), _mm512_maskz_loadu_ps(m, bank->unit + k),
                                             upper, bank->margin);
        const __mmask16 pass = _mm512_mask_cmpge_epi32_mask(m, _mm512_maskz_loadu_epi32(m, maxima + k), threshold);
        _mm512_storeu_si512(passing + count, _mm512_maskz_compress_epi32(pass, _mm512_add_epi32(_mm512_set1_epi32((int32_t)k), lane)));
        count += __builtin_popcount(pass);
    }
    const float listed = upper; /* the bound the list was made under; a tighter one skips more */
    for (int64_t j = 0; j < count; j++) {
        const int64_t k = passing[j];
        if (upper < listed) {
            const __m512i t = thresholds(q, _mm512_set1_ps(bank->lo[k]), _mm512_set1_ps(bank->norm_term[k]),
                                         _mm512_set1_ps(bank->low_term[k]), _mm512_set1_ps(bank->unit[k]), upper, bank->margin);
            if (maxima[k] < _mm_cvtsi128_si32(_mm512_castsi512_si128(t))) continue;
        }
        __m512i p0 = first_p0, p1 = first_p1;
        if (k != first_block) block_of(bank, codes, products, k, correction, &p0, &p1);
        uint32_t pass = passing_rows(bank, q, k, upper, p0, p1);
        while (pass) {
            const int64_t sorted_row = k * BLOCK + __builtin_ctz(pass);
            pass &= pass - 1;
            if (sorted_row == first_row || sorted_row == seed_row) continue;
            float squared;
            const uint64_t key = candidate_key(bank, row, sorted_row, &squared);
            candidates++;
            if (key < best) {
                best = key;
                const float tighter = distance_upper(bank, q, squared);
                if (tighter < upper) {
                    upper = tighter;
                    pass &= passing_rows(bank, q, k, upper, p0, p1);
                }
            }
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

/* Block maxima of one tile over blocks [first, last) after the head test: a block that no
 * query of the tile keeps a row of (head_limits) is not multiplied in full, and a query that
 * keeps none of its rows gets SKIPPED for it. `limits` is scratch for the tile's limits. */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static int64_t tile_block_max_kept(const fp_bank *bank, const int8_t *codes, const int8_t *head_codes, const fp_head *heads,
                                   int64_t first, int64_t last, int32_t *out, int64_t stride, int32_t *products, float *limits) {
    int64_t taken = 0;
    const int64_t span = (last - first + 15) / 16 * 16;
    for (int i = 0; i < TILE; i++) head_limits(bank, &heads[i], first, last, limits + i * span);
    for (int64_t k = first; k < last; k++) {
        __m512i raw[TILE][2];
        tile_products(bank->head_packed, bank->head_dim / 4, head_codes, k, raw);
        /* row r is kept if s'_q P - |b'_r|^2 / (2 s_k) reaches the query's limit */
        const __m512 row0 = _mm512_loadu_ps(bank->head_row + k * BLOCK), row1 = _mm512_loadu_ps(bank->head_row + k * BLOCK + 16);
        uint32_t keep = 0;
        for (int i = 0; i < TILE; i++) {
            const __m512i correction = _mm512_set1_epi32(128 * heads[i].code_sum);
            const __m512 scale = _mm512_set1_ps(0.5f * heads[i].scale2), limit = _mm512_set1_ps(limits[i * span + k - first]);
            const __m512 value0 = _mm512_fmsub_ps(scale, _mm512_cvtepi32_ps(_mm512_sub_epi32(raw[i][0], correction)), row0);
            const __m512 value1 = _mm512_fmsub_ps(scale, _mm512_cvtepi32_ps(_mm512_sub_epi32(raw[i][1], correction)), row1);
            const __mmask16 kept_rows = _mm512_cmp_ps_mask(value0, limit, _CMP_GE_OQ) | _mm512_cmp_ps_mask(value1, limit, _CMP_GE_OQ);
            keep |= (uint32_t)(kept_rows != 0) << i;
        }
        if (keep) {
            tile_block_max(bank, codes, k, k + 1, out, stride, products);
            taken++;
        }
        for (int i = 0; i < TILE; i++)
            if (!(keep >> i & 1)) out[i * stride + k] = SKIPPED;
    }
    return taken;
}

/* Exact nearest bank row of query rows [0, n): distances[i] and indices[i] are written for
 * rows that find one (the caller fills NaN / -1 first). Returns the number of candidate
 * pairs whose distances were computed, or -1 if the scratch memory could not be had. */
int64_t fp_nearest(const fp_bank *bank, const float *query, int64_t n, float *distances, int64_t *indices) {
    const int64_t pd = bank->padded_dim, blocks = bank->blocks, hd = bank->head_dim;
    const int64_t stride = (blocks + 15) / 16 * 16;
    /* a small bank: one tile at a time over the whole bank, its products kept; a large one:
     * PANEL queries per sweep of panel_blocks blocks, so each panel of codes is read from L2
     * for PANEL queries, and a passing block's products are recomputed */
    const int64_t panel = bank->keep_products ? TILE : PANEL;
    int8_t *codes = aligned_alloc(64, (size_t)(PANEL * pd + 63) / 64 * 64);
    const int64_t width = (bank->dim + 15) / 16 * 16; /* a centred query row in `work` */
    float *work = aligned_alloc(64, sizeof(float) * (size_t)(PANEL * width));
    int32_t *maxima = aligned_alloc(64, sizeof(int32_t) * (size_t)(PANEL * stride));
    int32_t *passing = aligned_alloc(64, sizeof(int32_t) * (size_t)(stride + 16));
    int32_t *products = bank->keep_products ? aligned_alloc(64, sizeof(int32_t) * (size_t)(TILE * blocks * BLOCK)) : NULL;
    /* the head test: codes, one query's head coordinates, and a tile's limits for a sweep */
    int8_t *head_codes = hd ? aligned_alloc(64, (size_t)(PANEL * hd)) : NULL;
    float *head = hd ? aligned_alloc(64, sizeof(float) * (size_t)(PANEL * hd)) : NULL;
    float *limits = hd ? aligned_alloc(64, sizeof(float) * (size_t)(TILE * ((bank->panel_blocks + 15) / 16 * 16))) : NULL;
    fp_query numbers[PANEL];
    fp_head heads[PANEL];
    uint64_t seeds[PANEL];
    int64_t seed_rows[PANEL];
    int64_t candidates = 0, taken = 0, seen = 0;
    if (!codes || !work || !maxima || !passing || (bank->keep_products && !products)
        || (hd && (!head_codes || !head || !limits))) {
        candidates = -1;
        goto done;
    }
    for (int64_t start = 0; start < n; start += panel) {
        const int64_t rows = n - start < panel ? n - start : panel;
        const int64_t tiles = (rows + TILE - 1) / TILE;
        for (int64_t i = 0; i < rows; i++) {
            quantise(bank, query + (start + i) * bank->dim, codes + i * pd, work + i * width, &numbers[i]);
            seeds[i] = UINT64_MAX, seed_rows[i] = -1;
        }
        memset(codes + rows * pd, 0, (size_t)((tiles * TILE - rows) * pd)); /* the last tile's spare rows */
        if (hd) {
            memset(work + rows * width, 0, sizeof(float) * (size_t)((tiles * TILE - rows) * width));
            rotate(bank, work, width, tiles * TILE, head);
            for (int64_t i = 0; i < tiles * TILE; i++) {
                if (i >= rows) { /* the last tile's spare rows: no codes, no rows kept */
                    memset(head_codes + i * hd, 0, (size_t)hd);
                    memset(&heads[i], 0, sizeof heads[i]);
                    continue;
                }
                head_quantise(bank, &numbers[i], head + i * hd, head_codes + i * hd, &heads[i]);
                if (heads[i].mode != HEAD_CHECK) continue;
                /* the head test's target, from the float32 distance of a promising row */
                seed_rows[i] = head_seed(bank, &heads[i], head + i * hd, head_codes + i * hd);
                if (seed_rows[i] < 0) {
                    heads[i].mode = HEAD_KEEP; /* no finite estimate: no test */
                    continue;
                }
                float squared;
                seeds[i] = candidate_key(bank, query + (start + i) * bank->dim, seed_rows[i], &squared);
                candidates++;
                head_target(bank, &heads[i], squared);
            }
        }
        for (int64_t first = 0; first < blocks; first += bank->panel_blocks) {
            const int64_t last = first + bank->panel_blocks < blocks ? first + bank->panel_blocks : blocks;
            for (int64_t t = 0; t < tiles; t++) {
                seen += last - first;
                if (hd) {
                    taken += tile_block_max_kept(bank, codes + t * TILE * pd, head_codes + t * TILE * hd, heads + t * TILE, first, last,
                                                 maxima + t * TILE * stride, stride, products, limits);
                } else {
                    tile_block_max(bank, codes + t * TILE * pd, first, last, maxima + t * TILE * stride, stride, products);
                    taken += last - first;
                }
            }
        }
        for (int64_t i = 0; i < rows; i++) {
            if (!numbers[i].finite) continue;
            candidates += finish_query(bank, &numbers[i], codes + i * pd, products ? products + i * blocks * BLOCK : NULL,
                                       maxima + i * stride, passing, query + (start + i) * bank->dim, seeds[i], seed_rows[i],
                                       distances + start + i, indices + start + i);
        }
    }
    if (bank->products_taken) {
        __atomic_fetch_add(bank->products_taken, taken, __ATOMIC_RELAXED);
        __atomic_fetch_add(bank->products_taken + 1, seen, __ATOMIC_RELAXED);
    }
done:
    free(codes);
    free(work);
    free(maxima);
    free(passing);
    free(products);
    free(head_codes);
    free(head);
    free(limits);
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
