/* The sampler's compiled parts: the counter-based random numbers (sampling.uniforms_at, the same
 * bits: integer arithmetic only) and the float32 screen of the float64 sampler (sampling_screen.py says what it
 * proves and why the margin is safe; this file computes exactly what that proof assumes).
 *
 * Per row of logits x [V] float32, temperature T (float64) and uniform u (float64):
 *     d = fl32(fl32(x - max x) * fl32(1 / T));  e = exp32(d);  c = sequential float32 sum of e;
 *     t = fl32(fl32(u) * c[V-1]);  i = #{j < V-1 : c[j] <= t}
 * then the row is proven when its target is further from c[i-1] and c[i] than the float32
 * and float64 computations can differ (the same test, in float64, as sampling_screen.py).
 *
 * Why compiled: NumPy runs each step as its own pass over a [V, B] array, about 25 passes; here
 * a tile of TILE rows stays in the first-level cache through all of them, and the loops over
 * the tile's rows are plain element-wise code that the compiler turns into vector instructions.
 *
 * Floating-point rules this file relies on (setup.py compiles it with -ffp-contract=off, and
 * never with -ffast-math): every + - * is one IEEE binary32 or binary64 operation, rounded to
 * nearest, in the order written, so the vector and scalar builds give the same bits.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define TILE 16          /* rows screened together: one vector lane each */
#define MAX_VOCAB 512    /* sampling_screen.MAX_DEPTH: the most roundings the bound covers */
#define ABS_MARGIN 7.888609052210118e-31   /* 2^-100, sampling_screen.ABS */
#define MAX_SCALED 524288.0                /* 2^19, sampling_screen.MAX_SCALED */
#define RECIPROCAL_LOW 7.888609052210118e-31   /* 2^-100 */
#define RECIPROCAL_HIGH 1.2676506002282294e30  /* 2^100 */
#define EXP_FLOOR -87.0f  /* below it exp32 gives 0: e^-87 < 2^-125, inside the bound's A */

/* A build that would break those rules fails here (the install then falls back to NumPy). */
#if defined(__FAST_MATH__) || FLT_EVAL_METHOD != 0
#error "sampling_kernel.c needs IEEE float arithmetic as written: no -ffast-math, no extended precision"
#endif

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* GCC's vector extensions (GCC and Clang): a vfloat is LANES floats in one register where the
 * machine has one that wide (AVX2), two halves where it does not (SSE2); the same IEEE operation
 * on every lane either way. A comparison gives a vint mask (-1 true, 0 false). */
#define LANES 8
#define VECTORS (TILE / LANES)
typedef float vfloat __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(LANES * sizeof(int32_t))));

static inline __attribute__((always_inline)) vfloat splat(float value)
{
    return (vfloat){value, value, value, value, value, value, value, value};
}

static inline __attribute__((always_inline)) vfloat choose(vint mask, vfloat yes, vfloat no)
{
    return (vfloat)(((vint)yes & mask) | ((vint)no & ~mask));
}

/* exp for d in [-87, 0] (callers clamp): e^d = 2^k e^f with k = round(d / ln 2) and |f| <= 0.35
 * (Cody and Waite's two-part ln 2, whose high part times k is exact), e^f by the minimax
 * polynomial of Cephes' expf. Its relative error is checked against float64 exp at every
 * float32 in [-87, 0] by tests/test_sampling_kernel.py (the bound needs 2^-21; it is about
 * 1.2e-7, under 2^-22). */
static inline __attribute__((always_inline)) vfloat exp32(vfloat d)
{
    const vfloat magic = splat(12582912.0f);                        /* 1.5 * 2^23: adding it rounds to an integer */
    vfloat k = (d * splat(1.44269504088896341f) + magic) - magic;   /* round(d * log2 e), in [-126, 0] */
    vfloat f = (d - k * splat(0.693359375f)) - k * splat(-2.12194440e-4f);
    vfloat p = splat(1.9875691500e-4f);
    p = p * f + splat(1.3981999507e-3f);
    p = p * f + splat(8.3334519073e-3f);
    p = p * f + splat(4.1665795894e-2f);
    p = p * f + splat(1.6666665459e-1f);
    p = p * f + splat(5.0000001201e-1f);
    vfloat y = p * (f * f) + f + splat(1.0f);                       /* e^f */
    vint exponent = (__builtin_convertvector(k, vint) + 127) << 23;  /* 2^k, a normal float for k >= -126 */
    return y * (vfloat)exponent;
}

/* exp32 for any input: 0 below EXP_FLOOR (and for NaN), the input capped at 0 above it. */
static inline __attribute__((always_inline)) vfloat exp32_clamped(vfloat d)
{
    vint in_range = d >= splat(EXP_FLOOR);  /* false for NaN */
    vfloat e = exp32(choose(in_range, choose(d <= splat(0.0f), d, splat(0.0f)), splat(EXP_FLOOR)));
    return choose(in_range, e, splat(0.0f));
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
        scale[r / LANES][r % LANES] = (float)reciprocal[r];
        target[r / LANES][r % LANES] = (float)uniforms[real ? r : 0];
        for (Py_ssize_t j = 0; j < vocab; j++)
            tile[j][r / LANES][r % LANES] = real ? logits[r * vocab + j] : 0.0f;
    }
    for (int w = 0; w < VECTORS; w++) {
        top[w] = tile[0][w];
        odd[w] = tile[0][w] != tile[0][w];
        low[w] = running[w] = splat(0.0f);
        count[w] = (vint){0};
    }
    for (Py_ssize_t j = 1; j < vocab; j++)  /* max x; a NaN anywhere marks the row */
        for (int w = 0; w < VECTORS; w++) {
            vfloat x = tile[j][w];
            top[w] = choose(x > top[w], x, top[w]);
            odd[w] |= x != x;
        }
    for (Py_ssize_t j = 0; j < vocab; j++)  /* d = (x - max x) * (1 / T), and its minimum (-D) */
        for (int w = 0; w < VECTORS; w++) {
            vfloat d = (tile[j][w] - top[w]) * scale[w];
            low[w] = choose(d < low[w], d, low[w]);
            tile[j][w] = d;
        }
    for (Py_ssize_t j = 0; j < vocab; j++)  /* c[j] = c[j-1] + e^d[j], in order (0 + e is exact) */
        for (int w = 0; w < VECTORS; w++) {
            running[w] += exp32_clamped(tile[j][w]);  /* NaN d only in rows never proven (odd, or top infinite) */
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
        double t64 = target[w][lane], row_low = low[w][lane], row_top = top[w][lane];
        double below = i > 0 ? tile[i - 1][w][lane] : 0.0, above = tile[i][w][lane];
        double widen = (row_low < -88.0 ? -88.0 : row_low) * per_spread + base;
        int ok = !odd[w][lane] && (i == 0 || below * widen + ABS_MARGIN < t64)
                 && (i == vocab - 1 || t64 * widen + ABS_MARGIN < above)
                 && fabs(row_top) * reciprocal[r] <= MAX_SCALED
                 && reciprocal[r] >= RECIPROCAL_LOW && reciprocal[r] <= RECIPROCAL_HIGH;
        tokens[r] = i;
        proven[r] = (unsigned char)ok;
    }
}

static int get_buffer(PyObject *object, Py_buffer *view, const char *name, Py_ssize_t itemsize, const char *kinds,
                      int writable)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(object, view, flags) < 0)
        return -1;
    const char *format = view->format ? view->format : "B";
    if (format[0] == '<' || format[0] == '=' || format[0] == '@')
        format++;
    if (view->itemsize != itemsize || format[0] == '\0' || format[1] != '\0' || !strchr(kinds, format[0])) {
        PyErr_Format(PyExc_TypeError, "%s: expected a contiguous array of '%s' items of %zd bytes, got '%s'",
                     name, kinds, itemsize, view->format ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The end of every call: its buffers released, then None, or NULL with the error set. */
static PyObject *release(Py_buffer *views, int held)
{
    for (int i = 0; i < held; i++)
        PyBuffer_Release(&views[i]);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *screen(PyObject *module, PyObject *args)
{
    PyObject *objects[5];
    Py_ssize_t vocab;
    if (!PyArg_ParseTuple(args, "OnOOOO:screen", &objects[0], &vocab, &objects[1], &objects[2], &objects[3],
                          &objects[4]))
        return NULL;
    static const char *names[5] = {"logits", "temperature", "uniforms", "tokens", "proven"};
    static const Py_ssize_t sizes[5] = {4, 8, 8, 8, 1};
    static const char *kinds[5] = {"f", "d", "d", "lq", "?B"};
    Py_buffer views[5];
    int held = 0;
    for (; held < 5; held++)
        if (get_buffer(objects[held], &views[held], names[held], sizes[held], kinds[held], held >= 3) < 0)
            goto done;
    Py_ssize_t rows = views[1].len / 8;
    if (vocab < 2 || vocab > MAX_VOCAB) {
        PyErr_Format(PyExc_ValueError, "vocab must be in [2, %d], got %zd", MAX_VOCAB, vocab);
        goto done;
    }
    if (views[0].len / 4 != rows * vocab || views[2].len / 8 != rows || views[3].len / 8 != rows
        || views[4].len != rows) {
        PyErr_SetString(PyExc_ValueError, "logits must hold [N, vocab] items and the other arrays N each");
        goto done;
    }
    const float *logits = views[0].buf;
    const double *temperature = views[1].buf, *uniforms = views[2].buf;
    int64_t *tokens = views[3].buf;
    unsigned char *proven = views[4].buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t start = 0; start < rows; start += TILE) {
        int count = rows - start < TILE ? (int)(rows - start) : TILE;
        screen_tile(logits + start * vocab, vocab, count, temperature + start, uniforms + start, tokens + start,
                    proven + start);
    }
    Py_END_ALLOW_THREADS
done:
    return release(views, held);
}

VECTOR_CLONES
static void exp_values(const float *x, float *y, Py_ssize_t count)  /* the same clone as screen_tile */
{
    for (Py_ssize_t n = 0; n < count; n += LANES) {
        Py_ssize_t left = count - n < LANES ? count - n : LANES;
        vfloat values = splat(0.0f);
        memcpy(&values, x + n, (size_t)left * sizeof(float));
        vfloat e = exp32_clamped(values);
        memcpy(y + n, &e, (size_t)left * sizeof(float));
    }
}

static PyObject *exp_float32(PyObject *module, PyObject *args)
{
    PyObject *source, *destination;
    if (!PyArg_ParseTuple(args, "OO:exp32", &source, &destination))
        return NULL;
    Py_buffer in, out;
    if (get_buffer(source, &in, "values", 4, "f", 0) < 0)
        return NULL;
    if (get_buffer(destination, &out, "out", 4, "f", 1) < 0) {
        PyBuffer_Release(&in);
        return NULL;
    }
    if (in.len != out.len) {
        PyErr_SetString(PyExc_ValueError, "values and out must have the same length");
    } else {
        Py_BEGIN_ALLOW_THREADS
        exp_values(in.buf, out.buf, in.len / 4);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

/* SplitMix64 at (key, position): sampling.py's _mix of key + (position + 1) * gamma, whose top 53
 * bits make an exact double in [0, 1). Unsigned 64-bit arithmetic wraps, as NumPy's uint64 does. */
static PyObject *uniforms(PyObject *module, PyObject *args)
{
    PyObject *objects[3];
    if (!PyArg_ParseTuple(args, "OOO:uniforms", &objects[0], &objects[1], &objects[2]))
        return NULL;
    static const char *names[3] = {"keys", "positions", "out"};
    static const char *kinds[3] = {"LQ", "LQlq", "d"};
    Py_buffer views[3];
    int held = 0;
    for (; held < 3; held++)
        if (get_buffer(objects[held], &views[held], names[held], 8, kinds[held], held == 2) < 0)
            goto done;
    if (views[0].len != views[1].len || views[0].len != views[2].len) {
        PyErr_SetString(PyExc_ValueError, "keys, positions and out must have the same length");
        goto done;
    }
    const uint64_t *keys = views[0].buf, *positions = views[1].buf;  /* int64 positions: the same bits */
    double *out = views[2].buf;
    for (Py_ssize_t n = 0; n < views[0].len / 8; n++) {
        uint64_t z = keys[n] + (positions[n] + 1) * 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        z ^= z >> 31;
        out[n] = (double)(z >> 11) * 0x1p-53;
    }
done:
    return release(views, held);
}

static PyMethodDef methods[] = {
    {"uniforms", uniforms, METH_VARARGS,
     "uniforms(keys, positions, out): sampling.uniforms_at into out (keys uint64 [N], positions 64-bit "
     "integers [N], out float64 [N])."},
    {"screen", screen, METH_VARARGS,
     "screen(logits, vocab, temperature, uniforms, tokens, proven): the float32 screen of each row, in place "
     "(logits float32 [N, vocab], temperature and uniforms float64 [N], tokens int64 [N], proven bool [N])."},
    {"exp32", exp_float32, METH_VARARGS,
     "exp32(values, out): the screen's float32 exp of each value (0 below -87), for its tests."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT, "_sampling_kernel", "The sampler's compiled parts: random numbers and the float32 screen (sampling_kernel.c).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__sampling_kernel(void)
{
    PyObject *module = PyModule_Create(&module_definition);
    if (module && (PyModule_AddIntConstant(module, "MAX_VOCAB", MAX_VOCAB) < 0
                   || PyModule_AddIntConstant(module, "TILE", TILE) < 0)) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
