#include <math.h>

#include "sampling_kernel.h"

/* The second check, for a row the float32 screen could not prove (about 0.2% of them): the
 * float64 sampler's own arithmetic, in the same order, so that everything but exp is the same
 * bits as NumPy's (a division, a maximum, a subtraction: exact IEEE operations; a sequential
 * sum):
 *     s = x / T;  w = exp(s - max s);  c = sequential sum of w;  t = u * c[V-1];  i = #{j < V-1 : c[j] <= t}
 * Only exp may differ: libm's here, NumPy's there. With both within 2^-40 of e^d (the bound
 * sampling_screen.py already assumes of NumPy's; libm's and NumPy's are within a few ULP,
 * 2^-50, and tests/test_sampling_kernel.py compares them), each c and t is within
 * R = 2^-40 + gamma_512 + 2^-53 < 2^-39 of the exact value, relative, on either side (results
 * under 2^-1022 within 2^-1022 absolute, even where a library flushes subnormals; ABS64 covers
 * 512 of them), so the screen's test with kappa = 4.01 * 2^-38 (twice the 4.01 R that q^2 - 1
 * needs) proves NumPy's count is i.
 * What it leaves (a target within about 2^-36 of a boundary, relative: about one row in 10^9,
 * or NaN and infinite values) goes to NumPy. Writes *token and returns 1 when proven. */
#define KAPPA64 (4.01 * 0x1p-38)
#define ABS64 0x1p-1000
int float64_check(const float *logits, Py_ssize_t vocab, double temperature, double uniform, int64_t *token)
{
    double c[MAX_VOCAB], top = -INFINITY;
    int odd = 0;
    for (Py_ssize_t j = 0; j < vocab; j++) {
        c[j] = (double)logits[j] / temperature;  /* [V] */
        top = c[j] > top ? c[j] : top;
        odd |= c[j] != c[j];
    }
    if (odd)
        return 0;
    double running = 0.0;
    for (Py_ssize_t j = 0; j < vocab; j++) {
        running += exp(c[j] - top);  /* NaN for an infinite top: no comparison below holds */
        c[j] = running;
    }
    const double target = uniform * running;
    int64_t i = 0;
    for (Py_ssize_t j = 0; j + 1 < vocab; j++)
        i += c[j] <= target;
    const double widen = 1.0 + KAPPA64;
    if ((i > 0 && !(c[i - 1] * widen + ABS64 < target)) || (i < vocab - 1 && !(target * widen + ABS64 < c[i]))
        || !(running >= 1.0))  /* the maximum's weight is e^0 = 1: anything else is NaN or odd */
        return 0;
    *token = i;
    return 1;
}
