/* What the sampler's compiled files share: sampling_kernel.c (the Python module: argument checks,
 * the random numbers), sampling_screen32.c (the float32 screen) and sampling_check64.c (the
 * float64 check of the rows the screen cannot prove). sampling_screen.py says what the screen
 * proves and why its margin is safe; these files compute exactly what that proof assumes.
 *
 * Floating-point rules they rely on (setup.py compiles them with -ffp-contract=off, and never
 * with -ffast-math): every + - * / is one IEEE binary32 or binary64 operation, rounded to
 * nearest, in the order written, so the vector and scalar builds give the same bits.
 */
#ifndef CHARSTREAM_SAMPLING_KERNEL_H
#define CHARSTREAM_SAMPLING_KERNEL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <stdint.h>

#define TILE 16          /* rows screened together: one vector lane each */
#define MAX_VOCAB 512    /* sampling_screen.MAX_DEPTH: the most roundings the bound covers */

/* A build that would break those rules fails here (the install then falls back to NumPy). */
#if defined(__FAST_MATH__) || FLT_EVAL_METHOD != 0
#error "the sampling kernel needs IEEE float arithmetic as written: no -ffast-math, no extended precision"
#endif

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* The screen of `rows` rows of logits [rows, vocab] (2 <= vocab <= MAX_VOCAB): each row's token,
 * and whether it is proven to be the float64 sampler's (sampling_screen32.c). No Python calls:
 * callers may release the GIL. */
void screen_rows(const float *logits, Py_ssize_t vocab, Py_ssize_t rows, const double *temperature,
                 const double *uniforms, int64_t *tokens, unsigned char *proven);

/* The screen's float32 2^x of each value <= 0, on the same build (clone) as the screen. */
void exp2_values(const float *x, float *y, Py_ssize_t count);

/* One row the screen left: 1 with *token set when the float64 check proves NumPy's token, else 0
 * (sampling_check64.c). */
int float64_check(const float *logits, Py_ssize_t vocab, double temperature, double uniform, int64_t *token);

#endif
