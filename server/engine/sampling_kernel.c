/* The sampler's compiled module, server.engine._sampling_kernel: argument checks for the float32
 * screen (sampling_screen32.c, with its float64 check in sampling_check64.c) and its exp, and the
 * counter-based random numbers (sampling.uniforms_at, the same bits: integer arithmetic only).
 */
#include <math.h>
#include <string.h>

#include "sampling_kernel.h"

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
    screen_rows(logits, vocab, rows, temperature, uniforms, tokens, proven);
    Py_END_ALLOW_THREADS
done:
    return release(views, held);
}

/* values -> out, item by item, for the tests of the kernel's exps: two contiguous arrays of the
 * same length and type ('f' or 'd'). */
static PyObject *elementwise(PyObject *args, const char *format, Py_ssize_t itemsize, const char *kind,
                             void (*apply)(const void *, void *, Py_ssize_t))
{
    PyObject *objects[2];
    if (!PyArg_ParseTuple(args, format, &objects[0], &objects[1]))
        return NULL;
    static const char *names[2] = {"values", "out"};
    Py_buffer views[2];
    int held = 0;
    for (; held < 2; held++)
        if (get_buffer(objects[held], &views[held], names[held], itemsize, kind, held == 1) < 0)
            goto done;
    if (views[0].len != views[1].len) {
        PyErr_SetString(PyExc_ValueError, "values and out must have the same length");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    apply(views[0].buf, views[1].buf, views[0].len / itemsize);
    Py_END_ALLOW_THREADS
done:
    return release(views, held);
}

static void apply_exp2_32(const void *x, void *y, Py_ssize_t count)
{
    exp2_values(x, y, count);
}

static void apply_exp64(const void *x, void *y, Py_ssize_t count)  /* libm's: the float64 check's */
{
    for (Py_ssize_t n = 0; n < count; n++)
        ((double *)y)[n] = exp(((const double *)x)[n]);
}

static PyObject *exp2_float32(PyObject *module, PyObject *args)
{
    return elementwise(args, "OO:exp2_32", 4, "f", apply_exp2_32);
}

static PyObject *exp_float64(PyObject *module, PyObject *args)
{
    return elementwise(args, "OO:exp64", 8, "d", apply_exp64);
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
    {"exp2_32", exp2_float32, METH_VARARGS,
     "exp2_32(values, out): the screen's float32 2^x of each value <= 0 (2^-125 below -125 and for NaN), for its tests."},
    {"exp64", exp_float64, METH_VARARGS,
     "exp64(values, out): the float64 check's exp (libm's) of each value, for its tests."},
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
