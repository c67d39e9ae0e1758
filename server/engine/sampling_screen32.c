/* The float32 screen of the float64 sampler (sampling_screen.py says what it proves and why the
 * margin is safe; sampling_kernel.h the rules of arithmetic this file keeps).
 *
 * Per row of logits x [V] float32, temperature T (float64) and uniform u (float64):
 *     b = fl32(fl32(x - max x) * fl32(log2(e) / T));  e = exp2_32(b);  c = sequential float32 sum of e;
 *     t = fl32(fl32(u) * c[V-1]);  i = #{j < V-1 : c[j] <= t}
 * then the row is proven when its target is further from c[i-1] and c[i] than the float32
 * and float64 computations can differ (the same test, in float64, as sampling_screen.py); a
 * row it cannot prove gets the float64 check (sampling_check64.c).
 *
 * Why compiled: NumPy runs each step as its own pass over a [V, B] array, about 25 passes; here
 * a tile of TILE rows stays in the first-level cache through all of them, and the loops over
 * the tile's rows are plain element-wise code that the compiler turns into vector instructions.
 */
#include <math.h>
#include <string.h>

#include "sampling_kernel.h"

#define ABS_MARGIN 7.888609052210118e-31   /* 2^-100, sampling_screen.ABS */
#define MAX_SCALED 524288.0                /* 2^19, sampling_screen.MAX_SCALED */
#define RECIPROCAL_LOW 7.888609052210118e-31   /* 2^-100 */
#define RECIPROCAL_HIGH 1.2676506002282294e30  /* 2^100 */
#define EXP2_FLOOR -125.0f  /* inputs below it are raised to it: 2^-125 is within the bound's A of any smaller weight */
#define LOG2E 1.4426950408889634   /* log2(e): b = d log2(e), so that 2^b = e^d */
#define LN2 0.6931471805599453

/* GCC's vector extensions (GCC and Clang): a vfloat is LANES floats in one register where the
 * machine has one that wide (AVX2), two halves where it does not (SSE2); the same IEEE operation
 * on every lane either way. A comparison gives a vint mask (-1 true, 0 false). */
#define LANES 8
#define VECTORS (TILE / LANES)
typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef float vfloat_unaligned __attribute__((vector_size(LANES * sizeof(float)), aligned(sizeof(float)), may_alias));

static inline __attribute__((always_inline)) vfloat splat(float value)
{
    return (vfloat){value, value, value, value, value, value, value, value};
}

static inline __attribute__((always_inline)) vfloat choose(vint mask, vfloat yes, vfloat no)
{
    return (vfloat)(((vint)yes & mask) | ((vint)no & ~mask));
}

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define HAVE_SHUFFLES 1
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
/* 8 vectors of 8 floats transposed in place (m[r][c] becomes m[c][r]): pairs interleaved, then
 * pairs of pairs, then halves; 24 shuffles where gathering each column from scalars costs 64
 * loads and inserts. */
static inline __attribute__((always_inline)) void transpose8(vfloat m[LANES])
{
    vfloat t[LANES], s[LANES];
    for (int r = 0; r < LANES; r += 2) {
        t[r] = SHUFFLE(m[r], m[r + 1], 0, 8, 1, 9, 4, 12, 5, 13);       /* m[r][0] m[r+1][0] m[r][1] ... */
        t[r + 1] = SHUFFLE(m[r], m[r + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int q = 0; q < LANES; q += 4)
        for (int h = 0; h < 2; h++) {
            s[q + h] = SHUFFLE(t[q + h], t[q + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);  /* 4 rows' column c, c + 4 */
            s[q + h + 2] = SHUFFLE(t[q + h], t[q + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    static const int column[4] = {0, 2, 1, 3};  /* s[q + k] holds columns column[k] and column[k] + 4 */
    for (int k = 0; k < 4; k++) {
        m[column[k]] = SHUFFLE(s[k], s[k + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        m[column[k] + 4] = SHUFFLE(s[k], s[k + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}
#endif

/* 2^b for b in [-125, 0] (callers clamp): 2^k 2^f with k = round(b), f = b - k exact (Sterbenz)
 * and |f| <= 1/2, 2^f = 1 + f q(f) with q of degree 5 fitted to minimise the largest relative
 * error on |f| <= 1/2 (2e-9 before rounding). Working in base 2 saves exp's reduction (a multiply
 * by log2(e) and Cody and Waite's two-part ln 2): the screen folds log2(e) into its scale, which
 * adds no float32 rounding (sampling_screen.py). Its relative error is checked against float64
 * exp2 at every float32 in [-125, 0] by tests/test_sampling_kernel.py (the bound needs 2^-21;
 * it is about 1e-7, under 2^-23). */
static inline __attribute__((always_inline)) vfloat exp2_32(vfloat b)
{
    const vfloat magic = splat(12582912.0f);                        /* 1.5 * 2^23: adding it rounds to an integer */
    vfloat k = (b + magic) - magic;                                 /* round(b), in [-125, 0] */
    vfloat f = b - k;
    vfloat q = splat(1.5353319759e-4f);
    q = q * f + splat(1.3398857554e-3f);
    q = q * f + splat(9.6184369177e-3f);
    q = q * f + splat(5.5503323674e-2f);
    q = q * f + splat(2.4022647738e-1f);
    q = q * f + splat(6.9314718246e-1f);
    vfloat y = f * q + splat(1.0f);                                 /* 2^f */
    vint exponent = (__builtin_convertvector(k, vint) + 127) << 23;  /* 2^k, a normal float for k >= -126 */
    return y * (vfloat)exponent;
}

/* exp2_32 for the screen's b <= 0 (or NaN, in rows never proven): inputs below EXP2_FLOOR, and
 * NaN, are raised to it, so 2^-125 stands for every smaller weight (within 2^-124 of it). */
static inline __attribute__((always_inline)) vfloat exp2_32_clamped(vfloat b)
{
    return exp2_32(choose(b >= splat(EXP2_FLOOR), b, splat(EXP2_FLOOR)));
}

VECTOR_CLONES
static void screen_tile(const float *logits, Py_ssize_t vocab, int rows, const double *temperature,
                        const double *uniforms, int64_t *tokens, unsigned char *proven)
{
    vfloat tile[MAX_VOCAB][VECTORS];  /* [V, TILE]: entry j of tile row r at tile[j][r / LANES][r % LANES] */
    vfloat top[VECTORS], scale[VECTORS], low[VECTORS], running[VECTORS], target[VECTORS];
    vint odd[VECTORS], count[VECTORS];
    double reciprocal[TILE];
    for (int r = 0; r < TILE; r++) {  /* lanes past `rows` screen zeros and are never written out */
        int real = r < rows;
        reciprocal[r] = real ? 1.0 / temperature[r] : 1.0;
        scale[r / LANES][r % LANES] = (float)(LOG2E / (real ? temperature[r] : 1.0));  /* one float32 rounding */
        target[r / LANES][r % LANES] = (float)uniforms[real ? r : 0];
    }
    static const float zeros[MAX_VOCAB];
    const float *row[TILE];  /* a partial tile's missing rows read zeros */
    for (int r = 0; r < TILE; r++)
        row[r] = r < rows ? logits + r * vocab : zeros;
    for (int w = 0; w < VECTORS; w++) {
        top[w] = splat(-INFINITY);
        odd[w] = count[w] = (vint){0};
        low[w] = running[w] = splat(0.0f);
    }
    /* The tile transposed, [TILE, V] into [V, TILE]: blocks of 8 x 8 through registers
     * (transpose8) where 8 whole columns are left, one vector at a time from scalars past them;
     * every column's max x on the way, and a NaN anywhere marks the row. */
    Py_ssize_t j = 0;
#ifdef HAVE_SHUFFLES
    for (; j + LANES <= vocab; j += LANES)
        for (int w = 0; w < VECTORS; w++) {
            vfloat block[LANES];
            for (int r = 0; r < LANES; r++)
                block[r] = *(const vfloat_unaligned *)(row[w * LANES + r] + j);  /* 8 logits of one row */
            transpose8(block);
            for (int c = 0; c < LANES; c++) {
                top[w] = choose(block[c] > top[w], block[c], top[w]);
                odd[w] |= block[c] != block[c];
                tile[j + c][w] = block[c];
            }
        }
#endif
    for (; j < vocab; j++)
        for (int w = 0; w < VECTORS; w++) {
            const float *const *in = row + w * LANES;
            vfloat x = {in[0][j], in[1][j], in[2][j], in[3][j], in[4][j], in[5][j], in[6][j], in[7][j]};
            top[w] = choose(x > top[w], x, top[w]);
            odd[w] |= x != x;
            tile[j][w] = x;
        }
    /* b = (x - max x) * (log2(e) / T) and its minimum (-D log2(e)); c[j] = c[j-1] + 2^b[j], in
     * order (0 + e is exact). NaN b only in rows never proven (odd, or top infinite). */
    for (Py_ssize_t j = 0; j < vocab; j++)
        for (int w = 0; w < VECTORS; w++) {
            vfloat b = (tile[j][w] - top[w]) * scale[w];
            low[w] = choose(b < low[w], b, low[w]);
            running[w] += exp2_32_clamped(b);
            tile[j][w] = running[w];
        }
    for (int w = 0; w < VECTORS; w++)
        target[w] *= running[w];  /* fl32(fl32(u) * c[V-1]) */
    for (Py_ssize_t j = 0; j + 1 < vocab; j++)  /* i = how many of c[0 .. V-2] are <= t */
        for (int w = 0; w < VECTORS; w++)
            count[w] -= tile[j][w] <= target[w];  /* the mask is -1 where true */
    /* 1 + kappa, as sampling_screen.py: kappa = 4.01 R, R = 1.001 (D 3.001 2^-24 + 2^-21 + gamma_h)
     * + 2^-22 + 2^-30, with h = V roundings at most for the sequential sum. */
    const double base = 1.0 + 4.01 * (1.001 * (ldexp(1.0, -21) + (double)vocab * ldexp(1.0, -24) * 1.001)
                                      + ldexp(1.0, -22) + ldexp(1.0, -30));
    const double per_spread = -4.01 * 1.001 * 3.001 * ldexp(1.0, -24);
    for (int r = 0; r < rows; r++) {
        int w = r / LANES, lane = r % LANES;
        int32_t i = count[w][lane];
        /* -D: the least b over ln 2 (b = d log2(e) within 3.0001 * 2^-24; 2^-20 covers it, and ln 2's rounding) */
        double t64 = target[w][lane], row_low = low[w][lane] * (LN2 * (1.0 + 0x1p-20)), row_top = top[w][lane];
        double below = i > 0 ? tile[i - 1][w][lane] : 0.0, above = tile[i][w][lane];
        double widen = (row_low < -88.0 ? -88.0 : row_low) * per_spread + base;
        int ok = !odd[w][lane] && (i == 0 || below * widen + ABS_MARGIN < t64)
                 && (i == vocab - 1 || t64 * widen + ABS_MARGIN < above)
                 && fabs(row_top) * reciprocal[r] <= MAX_SCALED
                 && reciprocal[r] >= RECIPROCAL_LOW && reciprocal[r] <= RECIPROCAL_HIGH;
        tokens[r] = i;
        proven[r] = (unsigned char)(ok || float64_check(logits + r * vocab, vocab, temperature[r], uniforms[r],
                                                        &tokens[r]));
    }
}

void screen_rows(const float *logits, Py_ssize_t vocab, Py_ssize_t rows, const double *temperature,
                 const double *uniforms, int64_t *tokens, unsigned char *proven)
{
    for (Py_ssize_t start = 0; start < rows; start += TILE) {
        int count = rows - start < TILE ? (int)(rows - start) : TILE;
        screen_tile(logits + start * vocab, vocab, count, temperature + start, uniforms + start, tokens + start,
                    proven + start);
    }
}

VECTOR_CLONES
void exp2_values(const float *x, float *y, Py_ssize_t count)  /* the same clone as screen_tile */
{
    for (Py_ssize_t n = 0; n < count; n += LANES) {
        Py_ssize_t left = count - n < LANES ? count - n : LANES;
        vfloat values = splat(0.0f);
        memcpy(&values, x + n, (size_t)left * sizeof(float));
        vfloat e = exp2_32_clamped(values);
        memcpy(y + n, &e, (size_t)left * sizeof(float));
    }
}
