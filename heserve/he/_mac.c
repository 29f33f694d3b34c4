/*
 * _mac: the multiply-accumulate of heserve's diagonal scoring loop, in C.
 *
 * For every chunk c, query q and giant step g it computes, coefficient-wise in
 * NTT form and modulo each RNS prime q_l,
 *
 *     out[c, q, g, p, l, :] = sum_k  diag[index[c, g*b + k], l, :] * baby[q, k, p, l, :]
 *
 * for both polynomials p of a size-2 ciphertext: what SEAL's multiply_plain +
 * add_inplace sequence computes, bit for bit (results fully reduced to [0, q_l);
 * the residue of a sum is unique, so lazy reduction changes nothing).
 *
 * Why it is faster than SEAL from Python: one call instead of d' * 2 calls, and
 * lazy reduction: products are summed exactly in 128 bits and reduced once per
 * coefficient per inner sum instead of once per product.
 *
 * Only public data (ciphertexts, plaintexts) passes through here; nothing is
 * secret-dependent, so data-dependent timing is of no concern.
 *
 * Layout (C-contiguous buffers, e.g. numpy arrays; the ciphertext buffers are
 * views of SEAL's own memory, see heserve/he/limbs.py, so nothing is copied):
 *   diagonals  [M, L, N] uint64    rows of NTT-form plaintext limbs
 *   index      [C, G*b] int64      row of diagonal j of chunk c, or -1 (zero diagonal)
 *   babies     Q*b buffers [2, L, N] uint64: rot(query q, k) at q*b + k, NTT form
 *   out        C*Q*G buffers [2, L, N] uint64: inner sum (c, q, g) at (c*Q + q)*G + g,
 *              written; an inner sum with no diagonal is zero
 *   moduli     L ints, each an odd modulus < 2^61 (SEAL's are primes <= 60 bits)
 *
 * Loop order (cache blocking): for each prime, blocks of `block` coefficients
 * are outermost; within a block every chunk's diagonals stream past once while
 * the block of every baby rotation of every query (Q*b*2*block*8 bytes) stays in
 * cache. For one run of coefficients all queries reuse the same diagonal cache
 * lines from L1, so each diagonal is read from memory once for all Q queries.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MAC_HAVE_X86 1
#include <immintrin.h>
#else
#define MAC_HAVE_X86 0
#endif

typedef unsigned __int128 u128;

/* ------------------------------------------------------------------------ */
/* Modular reduction of a 128-bit accumulator                               */
/* ------------------------------------------------------------------------ */

typedef struct {
    uint64_t value;    /* q, odd, 2 <= q < 2^61 */
    uint64_t ratio0;   /* floor(2^128 / q), low word  */
    uint64_t ratio1;   /* floor(2^128 / q), high word */
    Py_ssize_t limit;  /* products that may be summed before a fold, see prime_init */
} prime_t;

/* Largest number of terms the 52-bit column accumulators of the IFMA path can
 * take: each term adds < 3 * 2^52 to the middle column (see ifma_tile), and
 * 1024 * 3 * 2^52 < 2^64. The scalar path uses the same cap for simplicity. */
#define MAC_COLUMN_LIMIT 1024

static void prime_init(prime_t *p, uint64_t q) {
    u128 ratio = ((u128)0 - 1) / q; /* == floor(2^128 / q): q is not a power of two */
    u128 max_product = (u128)(q - 1) * (q - 1);
    /* A running sum that starts at a folded residue r < q and takes n products
     * of two residues stays below r + n*(q-1)^2; it must fit in 128 bits:
     * n <= (2^128 - 1 - q) / (q-1)^2. For q < 2^60 that is >= 255. */
    u128 n = (((u128)0 - 1) - q) / max_product;
    p->value = q;
    p->ratio0 = (uint64_t)ratio;
    p->ratio1 = (uint64_t)(ratio >> 64);
    p->limit = n > MAC_COLUMN_LIMIT ? MAC_COLUMN_LIMIT : (Py_ssize_t)n;
}

/* x mod q for any 128-bit x (Barrett, base 2^64).
 * With R = floor(2^128/q), the estimate e = floor(x*R / 2^128) computed below
 * drops the low words of x0*R0 and of the middle sum, so e >= floor(x*R/2^128) - 1,
 * and x*R/2^128 > x/q - 1 (because R > 2^128/q - 1 and x < 2^128): hence
 * floor(x/q) - 2 <= e <= floor(x/q), and x - e*q < 3q < 2^63, which the low word
 * computes exactly. Two conditional subtractions finish the reduction. */
static inline uint64_t reduce128(u128 x, const prime_t *p) {
    uint64_t x0 = (uint64_t)x, x1 = (uint64_t)(x >> 64);
    u128 low = (u128)x0 * p->ratio0;
    u128 mid_a = (low >> 64) + (u128)x0 * p->ratio1; /* <= (2^64-1)^2 + 2^64 - 1 < 2^128 */
    u128 mid_b = (u128)x1 * p->ratio0;
    u128 mid = mid_a + mid_b; /* a carry out of 2^128 adds 2^64 to e: 0 mod 2^64 */
    uint64_t e = x1 * p->ratio1 + (uint64_t)(mid >> 64); /* mod 2^64: fine, see above */
    uint64_t r = x0 - e * p->value;
    r = r >= p->value ? r - p->value : r;
    r = r >= p->value ? r - p->value : r;
    return r;
}

/* ------------------------------------------------------------------------ */
/* The work description shared by both paths                               */
/* ------------------------------------------------------------------------ */

typedef struct {
    const uint64_t *diagonals;      /* [M, L, N] */
    const int64_t *index;           /* [C, G*b] */
    const uint64_t *const *babies;  /* Q*b pointers to [2, L, N] */
    uint64_t *const *out;           /* C*Q*G pointers to [2, L, N] */
    const prime_t *primes;          /* [L] */
    Py_ssize_t M, C, Q, G, b, L, N, block;
} job_t;

/* Pointers to the coefficient block starting at i0, at prime l, of the present
 * diagonals of (chunk c, giant step g) and of the matching baby limbs of every
 * query; returns how many diagonals are present.
 * dp[t], x0[q*b + t], x1[q*b + t] for t < count; element i of each is
 * coefficient i0 + i. */
static Py_ssize_t gather(const job_t *j, Py_ssize_t c, Py_ssize_t g, Py_ssize_t l, Py_ssize_t i0,
                         const uint64_t **dp, const uint64_t **x0, const uint64_t **x1) {
    const Py_ssize_t L = j->L, N = j->N, b = j->b, Q = j->Q;
    const int64_t *idx = j->index + (c * j->G + g) * b;
    Py_ssize_t count = 0;
    for (Py_ssize_t k = 0; k < b; k++) {
        int64_t row = idx[k];
        if (row < 0)
            continue;
        dp[count] = j->diagonals + ((Py_ssize_t)row * L + l) * N + i0;
        for (Py_ssize_t q = 0; q < Q; q++) {
            const uint64_t *baby = j->babies[q * b + k] + l * N + i0;
            x0[q * b + count] = baby;
            x1[q * b + count] = baby + L * N; /* polynomial 1 of the same rotation */
        }
        count++;
    }
    return count;
}

static inline uint64_t *out_row(const job_t *j, Py_ssize_t c, Py_ssize_t q, Py_ssize_t g,
                                Py_ssize_t p, Py_ssize_t l) {
    return j->out[(c * j->Q + q) * j->G + g] + (p * j->L + l) * j->N;
}

/* ------------------------------------------------------------------------ */
/* Loop structure shared by both paths                                      */
/* ------------------------------------------------------------------------ */
/* Within one (block, chunk, giant step) the present diagonals are taken ROWS at a
 * time (rows outer); for each query the accumulators of the whole block, which
 * live in L1, take the ROWS products of each coefficient (coefficients inner,
 * contiguous runs of `block` values). So every memory stream is a contiguous run,
 * a diagonal's run stays in L1 while all Q queries use it, and the accumulators
 * are loaded and stored once per ROWS products, not once per product.
 * (A first version kept the accumulators in registers and ran over the diagonals
 * innermost: 3*b strided streams per tile; at b = 128 it was 3x slower.) */
#define ROWS 4

/* ------------------------------------------------------------------------ */
/* Portable scalar path                                                     */
/* ------------------------------------------------------------------------ */
/* Accumulators: acc[q][p][i], unsigned __int128, exact sums (see prime_init for
 * how many terms fit before a fold). */

static inline void scalar_rows(u128 *restrict acc, const uint64_t *const *dp,
                               const uint64_t *const *xp, Py_ssize_t rows, Py_ssize_t len) {
    if (rows == ROWS) {
        const uint64_t *d0 = dp[0], *d1 = dp[1], *d2 = dp[2], *d3 = dp[3];
        const uint64_t *x0 = xp[0], *x1 = xp[1], *x2 = xp[2], *x3 = xp[3];
        for (Py_ssize_t i = 0; i < len; i++)
            acc[i] += (u128)d0[i] * x0[i] + (u128)d1[i] * x1[i] + (u128)d2[i] * x2[i] +
                      (u128)d3[i] * x3[i];
    } else {
        for (Py_ssize_t r = 0; r < rows; r++) {
            const uint64_t *d = dp[r], *x = xp[r];
            for (Py_ssize_t i = 0; i < len; i++)
                acc[i] += (u128)d[i] * x[i];
        }
    }
}

static void scalar_step(const job_t *j, Py_ssize_t c, Py_ssize_t g, Py_ssize_t l,
                        Py_ssize_t i0, Py_ssize_t len, Py_ssize_t count, const uint64_t **dp,
                        const uint64_t **x0p, const uint64_t **x1p, u128 *acc) {
    const prime_t *p = &j->primes[l];
    const Py_ssize_t Q = j->Q, b = j->b, limit = p->limit - p->limit % ROWS;
    memset(acc, 0, sizeof(u128) * (size_t)(Q * 2 * len));
    for (Py_ssize_t t0 = 0; t0 < count; t0 += limit) {
        Py_ssize_t t1 = t0 + limit < count ? t0 + limit : count;
        if (t0) /* fold: every sum back below q, so `limit` more terms fit */
            for (Py_ssize_t n = 0; n < Q * 2 * len; n++)
                acc[n] = reduce128(acc[n], p);
        for (Py_ssize_t t = t0; t < t1; t += ROWS) {
            Py_ssize_t rows = t1 - t < ROWS ? t1 - t : ROWS;
            for (Py_ssize_t q = 0; q < Q; q++) {
                scalar_rows(acc + (q * 2 + 0) * len, dp + t, x0p + q * b + t, rows, len);
                scalar_rows(acc + (q * 2 + 1) * len, dp + t, x1p + q * b + t, rows, len);
            }
        }
    }
    for (Py_ssize_t q = 0; q < Q; q++)
        for (Py_ssize_t pp = 0; pp < 2; pp++) {
            uint64_t *o = out_row(j, c, q, g, pp, l) + i0;
            const u128 *a = acc + (q * 2 + pp) * len;
            for (Py_ssize_t i = 0; i < len; i++)
                o[i] = reduce128(a[i], p);
        }
}

/* ------------------------------------------------------------------------ */
/* AVX-512 IFMA path                                                        */
/* ------------------------------------------------------------------------ */
#if MAC_HAVE_X86

/* IFMA multiplies the low 52 bits of two lanes and adds the low (madd52lo) or
 * high (madd52hi) 52 bits of the 104-bit product to a 64-bit lane. Residues of up
 * to 61 bits are split a = a1*2^52 + a0 (a0 < 2^52, a1 < 2^9), so
 *   a*x = a0x0 + (a0x1 + a1x0)*2^52 + a1x1*2^104
 * and the sum is kept in three 64-bit columns of weight 2^0, 2^52, 2^104:
 *   W0   += lo(a0x0)                                 (< 2^52 per term)
 *   W52  += hi(a0x0) + lo(a0x1) + lo(a1x0)           (< 3*2^52 per term)
 *   W104 += hi(a0x1) + hi(a1x0) + lo(a1x1)           (< 2^19 per term)
 * a1x1 < 2^18 has no high part. With at most MAC_COLUMN_LIMIT = 1024 terms (plus
 * a folded residue < 2^61 in W0) no column overflows 2^64 (1024*3*2^52 < 2^63),
 * and the 128-bit value the columns represent is the exact sum, below 2^128 by
 * prime_init's limit. Primes below 2^52 have a1 = x1 = 0: two IFMA per product
 * instead of seven ("narrow": the 40-bit prime of the precise preset).
 * Accumulator layout: acc[q][p][column][i], column 0, 1, 2 = W0, W52, W104. */

#define MAC_TARGET __attribute__((target("avx512f,avx512ifma")))

MAC_TARGET static inline void ifma_rows(uint64_t *restrict acc, const uint64_t *const *dp,
                                        const uint64_t *const *xp, Py_ssize_t rows,
                                        Py_ssize_t len, int narrow) {
    uint64_t *w0 = acc, *w52 = acc + len, *w104 = acc + 2 * len;
    for (Py_ssize_t i = 0; i < len; i += 8) {
        __m512i c0 = _mm512_loadu_si512((const void *)(w0 + i));
        __m512i c52 = _mm512_loadu_si512((const void *)(w52 + i));
        __m512i c104 = narrow ? _mm512_setzero_si512() : _mm512_loadu_si512((const void *)(w104 + i));
        for (Py_ssize_t r = 0; r < rows; r++) {
            __m512i a = _mm512_loadu_si512((const void *)(dp[r] + i));
            __m512i x = _mm512_loadu_si512((const void *)(xp[r] + i));
            /* madd52 ignores bits 52..63 of its inputs: the low limbs need no mask */
            c0 = _mm512_madd52lo_epu64(c0, a, x);
            c52 = _mm512_madd52hi_epu64(c52, a, x);
            if (!narrow) {
                __m512i ah = _mm512_srli_epi64(a, 52), xh = _mm512_srli_epi64(x, 52);
                c52 = _mm512_madd52lo_epu64(c52, a, xh);
                c52 = _mm512_madd52lo_epu64(c52, ah, x);
                c104 = _mm512_madd52hi_epu64(c104, a, xh);
                c104 = _mm512_madd52hi_epu64(c104, ah, x);
                c104 = _mm512_madd52lo_epu64(c104, ah, xh);
            }
        }
        _mm512_storeu_si512((void *)(w0 + i), c0);
        _mm512_storeu_si512((void *)(w52 + i), c52);
        if (!narrow)
            _mm512_storeu_si512((void *)(w104 + i), c104);
    }
}

/* The value the columns hold at coefficient i, exactly (< 2^128). */
static inline u128 ifma_value(const uint64_t *acc, Py_ssize_t len, Py_ssize_t i) {
    return (u128)acc[i] + ((u128)acc[len + i] << 52) + ((u128)acc[2 * len + i] << 104);
}

MAC_TARGET static void ifma_step(const job_t *j, Py_ssize_t c, Py_ssize_t g, Py_ssize_t l,
                                 Py_ssize_t i0, Py_ssize_t len, Py_ssize_t count,
                                 const uint64_t **dp, const uint64_t **x0p, const uint64_t **x1p,
                                 uint64_t *acc) {
    const prime_t *p = &j->primes[l];
    const Py_ssize_t Q = j->Q, b = j->b, limit = p->limit - p->limit % ROWS;
    const int narrow = p->value < ((uint64_t)1 << 52);
    const Py_ssize_t stride = 3 * len; /* one (query, polynomial) accumulator set */
    memset(acc, 0, sizeof(uint64_t) * (size_t)(Q * 2 * stride));
    for (Py_ssize_t t0 = 0; t0 < count; t0 += limit) {
        Py_ssize_t t1 = t0 + limit < count ? t0 + limit : count;
        if (t0) /* fold: the residue goes back in W0, the other columns restart */
            for (Py_ssize_t s = 0; s < Q * 2; s++)
                for (Py_ssize_t i = 0; i < len; i++) {
                    uint64_t *a = acc + s * stride;
                    a[i] = reduce128(ifma_value(a, len, i), p);
                    a[len + i] = a[2 * len + i] = 0;
                }
        for (Py_ssize_t t = t0; t < t1; t += ROWS) {
            Py_ssize_t rows = t1 - t < ROWS ? t1 - t : ROWS;
            for (Py_ssize_t q = 0; q < Q; q++) {
                uint64_t *a = acc + q * 2 * stride;
                if (rows == ROWS) { /* constant trip count: the row loop unrolls */
                    if (narrow) {
                        ifma_rows(a, dp + t, x0p + q * b + t, ROWS, len, 1);
                        ifma_rows(a + stride, dp + t, x1p + q * b + t, ROWS, len, 1);
                    } else {
                        ifma_rows(a, dp + t, x0p + q * b + t, ROWS, len, 0);
                        ifma_rows(a + stride, dp + t, x1p + q * b + t, ROWS, len, 0);
                    }
                } else {
                    ifma_rows(a, dp + t, x0p + q * b + t, rows, len, narrow);
                    ifma_rows(a + stride, dp + t, x1p + q * b + t, rows, len, narrow);
                }
            }
        }
    }
    for (Py_ssize_t q = 0; q < Q; q++)
        for (Py_ssize_t pp = 0; pp < 2; pp++) {
            uint64_t *o = out_row(j, c, q, g, pp, l) + i0;
            const uint64_t *a = acc + (q * 2 + pp) * stride;
            for (Py_ssize_t i = 0; i < len; i++)
                o[i] = reduce128(ifma_value(a, len, i), p);
        }
}
#endif /* MAC_HAVE_X86 */

enum { IMPL_AUTO = 0, IMPL_SCALAR = 1, IMPL_IFMA = 2 };

static int have_ifma(void) {
#if MAC_HAVE_X86
    __builtin_cpu_init();
    /* libgcc also checks that the OS saves the ZMM state (XCR0) before it
     * reports an AVX-512 feature */
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512ifma");
#else
    return 0;
#endif
}

/* The whole job; runs without the GIL. Returns 0, or -1 on allocation failure. */
static int run(const job_t *j, int impl) {
    const Py_ssize_t b = j->b;
    const uint64_t **dp = malloc(sizeof(*dp) * (size_t)b);
    const uint64_t **x0 = malloc(sizeof(*x0) * (size_t)(b * j->Q));
    const uint64_t **x1 = malloc(sizeof(*x1) * (size_t)(b * j->Q));
    /* accumulators of one block, every query: 48 bytes per coefficient and
     * polynomial (IFMA: 3 x 64-bit; scalar: 2 x 128-bit of 16 are used) */
    void *acc = aligned_alloc(64, ((size_t)(j->Q * 2 * j->block) * 48 + 63) / 64 * 64);
    int status = 0;
    if (!dp || !x0 || !x1 || !acc) {
        status = -1;
        goto done;
    }
    for (Py_ssize_t l = 0; l < j->L; l++) {
        for (Py_ssize_t i0 = 0; i0 < j->N; i0 += j->block) {
            Py_ssize_t len = i0 + j->block < j->N ? j->block : j->N - i0;
            for (Py_ssize_t c = 0; c < j->C; c++) {
                for (Py_ssize_t g = 0; g < j->G; g++) {
                    Py_ssize_t count = gather(j, c, g, l, i0, dp, x0, x1);
                    if (count == 0) { /* no diagonal in this giant step: zero */
                        for (Py_ssize_t q = 0; q < j->Q; q++)
                            for (Py_ssize_t p = 0; p < 2; p++)
                                memset(out_row(j, c, q, g, p, l) + i0, 0,
                                       sizeof(uint64_t) * (size_t)len);
                        continue;
                    }
#if MAC_HAVE_X86
                    if (impl == IMPL_IFMA) {
                        ifma_step(j, c, g, l, i0, len, count, dp, x0, x1, acc);
                        continue;
                    }
#endif
                    scalar_step(j, c, g, l, i0, len, count, dp, x0, x1, acc);
                }
            }
        }
    }
done:
    free(dp); free(x0); free(x1); free(acc);
    return status;
}


/* ------------------------------------------------------------------------ */
/* Python glue                                                              */
/* ------------------------------------------------------------------------ */

/* Get a C-contiguous buffer of 8-byte items of the given kind ('u' unsigned,
 * 'i' signed), with `ndim` dimensions. */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, int ndim, char kind,
                      const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    const char *f = view->format ? view->format : "B";
    if (*f == '<' || *f == '=' || *f == '@')
        f++;
    int ok_kind = kind == 'u' ? (f[0] == 'Q' || f[0] == 'L') : (f[0] == 'q' || f[0] == 'l');
    if (view->itemsize != 8 || !ok_kind || f[1] != '\0') {
        PyErr_Format(PyExc_TypeError, "%s must hold %s 64-bit integers (format '%s')", name,
                     kind == 'u' ? "unsigned" : "signed", view->format ? view->format : "B");
        PyBuffer_Release(view);
        return -1;
    }
    if (view->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must have %d dimensions, got %d", name, ndim,
                     view->ndim);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* The buffers of a sequence of [2, L, N] uint64 arrays (ciphertext limbs). */
typedef struct {
    Py_buffer *views;
    Py_ssize_t count, held;
} buffers_t;

static void buffers_release(buffers_t *bs) {
    for (Py_ssize_t n = 0; n < bs->held; n++)
        PyBuffer_Release(&bs->views[n]);
    PyMem_Free(bs->views);
    bs->views = NULL;
    bs->held = 0;
}

static int buffers_get(PyObject *seq_obj, buffers_t *bs, int writable, Py_ssize_t L, Py_ssize_t N,
                       const char *name) {
    PyObject *seq = PySequence_Fast(seq_obj, "expected a sequence of [2, L, N] arrays");
    if (!seq)
        return -1;
    bs->count = PySequence_Fast_GET_SIZE(seq);
    bs->held = 0;
    bs->views = PyMem_Calloc((size_t)(bs->count ? bs->count : 1), sizeof(Py_buffer));
    if (!bs->views) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t n = 0; n < bs->count; n++) {
        Py_buffer *v = &bs->views[n];
        if (get_buffer(PySequence_Fast_GET_ITEM(seq, n), v, writable, 3, 'u', name) < 0)
            goto fail;
        bs->held++;
        if (v->shape[0] != 2 || v->shape[1] != L || v->shape[2] != N) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] must have shape [2, %zd, %zd]", name, n, L, N);
            goto fail;
        }
    }
    Py_DECREF(seq);
    return 0;
fail:
    Py_DECREF(seq);
    buffers_release(bs);
    return -1;
}

PyDoc_STRVAR(inner_sums_doc,
"inner_sums(diagonals, index, babies, out, moduli, impl=0) -> None\n"
"\n"
"out[(c*Q + q)*G + g][p, l, :] = sum_k diagonals[index[c, g*b + k], l, :] *\n"
"    babies[q*b + k][p, l, :]   mod moduli[l],\n"
"with b = len(babies) / Q and G = index.shape[1] / b, Q = len(out) / (C*G).\n"
"\n"
"diagonals [M, L, N] uint64; index [C, G*b] int64 (-1: zero diagonal); babies a\n"
"sequence of Q*b arrays [2, L, N] uint64; out a sequence of C*Q*G writable arrays\n"
"[2, L, N] uint64. Inputs must be residues below their modulus. impl: 0 auto,\n"
"1 scalar, 2 AVX-512 IFMA (refused where unsupported). Releases the GIL.");

static PyObject *inner_sums(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"diagonals", "index", "babies", "out", "moduli", "baby_step",
                               "impl", NULL};
    PyObject *o_diag, *o_index, *o_babies, *o_out, *o_moduli;
    Py_ssize_t baby_step;
    int impl = IMPL_AUTO;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOn|i", keywords, &o_diag, &o_index,
                                     &o_babies, &o_out, &o_moduli, &baby_step, &impl))
        return NULL;

    Py_buffer vd = {0}, vi = {0};
    buffers_t babies = {0}, outs = {0};
    const uint64_t **baby_ptrs = NULL;
    uint64_t **out_ptrs = NULL;
    prime_t *primes = NULL;
    PyObject *result = NULL;
    job_t j;
    if (get_buffer(o_diag, &vd, 0, 3, 'u', "diagonals") < 0)
        return NULL;
    if (get_buffer(o_index, &vi, 0, 2, 'i', "index") < 0)
        goto done_d;
    j.M = vd.shape[0]; j.L = vd.shape[1]; j.N = vd.shape[2];
    j.C = vi.shape[0]; j.b = baby_step;
    if (j.N <= 0 || j.L <= 0) {
        PyErr_SetString(PyExc_ValueError, "N and L must be positive");
        goto done_i;
    }
    if (j.b <= 0 || vi.shape[1] % j.b) {
        PyErr_SetString(PyExc_ValueError, "baby_step must divide index's second dimension");
        goto done_i;
    }
    j.G = vi.shape[1] / j.b;
    if (buffers_get(o_babies, &babies, 0, j.L, j.N, "babies") < 0)
        goto done_i;
    if (babies.count == 0 || babies.count % j.b) {
        PyErr_SetString(PyExc_ValueError, "len(babies) must be a positive multiple of baby_step");
        goto done_b;
    }
    j.Q = babies.count / j.b;
    if (buffers_get(o_out, &outs, 1, j.L, j.N, "out") < 0)
        goto done_b;
    if (outs.count != j.C * j.Q * j.G) {
        PyErr_Format(PyExc_ValueError, "expected %zd out arrays (C*Q*G), got %zd",
                     j.C * j.Q * j.G, outs.count);
        goto done_o;
    }
    /* every index entry must name a row of diagonals: checked here, not in the loop */
    {
        const int64_t *idx = (const int64_t *)vi.buf;
        for (Py_ssize_t n = 0; n < vi.shape[0] * vi.shape[1]; n++) {
            if (idx[n] < -1 || idx[n] >= j.M) {
                PyErr_Format(PyExc_IndexError, "index entry %lld is outside [-1, %zd)",
                             (long long)idx[n], j.M);
                goto done_o;
            }
        }
    }
    /* moduli */
    {
        PyObject *seq = PySequence_Fast(o_moduli, "moduli must be a sequence of ints");
        if (!seq)
            goto done_o;
        if (PySequence_Fast_GET_SIZE(seq) != j.L) {
            PyErr_Format(PyExc_ValueError, "expected %zd moduli, got %zd", j.L,
                         PySequence_Fast_GET_SIZE(seq));
            Py_DECREF(seq);
            goto done_o;
        }
        primes = PyMem_Malloc(sizeof(prime_t) * (size_t)j.L);
        if (!primes) {
            Py_DECREF(seq);
            PyErr_NoMemory();
            goto done_o;
        }
        for (Py_ssize_t l = 0; l < j.L; l++) {
            unsigned long long q = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, l));
            if (PyErr_Occurred()) {
                Py_DECREF(seq);
                goto done_o;
            }
            if (q < 3 || q >= (1ULL << 61) || !(q & 1)) {
                PyErr_Format(PyExc_ValueError, "modulus %llu must be odd, in [3, 2^61)", q);
                Py_DECREF(seq);
                goto done_o;
            }
            prime_init(&primes[l], (uint64_t)q);
        }
        Py_DECREF(seq);
    }
    if (impl == IMPL_AUTO)
        impl = (have_ifma() && j.N % 8 == 0) ? IMPL_IFMA : IMPL_SCALAR;
    if (impl == IMPL_IFMA && !(have_ifma() && j.N % 8 == 0)) {
        PyErr_SetString(PyExc_ValueError, "the IFMA path needs AVX-512 IFMA and N % 8 == 0");
        goto done_o;
    }
    if (impl != IMPL_SCALAR && impl != IMPL_IFMA) {
        PyErr_SetString(PyExc_ValueError, "impl must be 0 (auto), 1 (scalar) or 2 (ifma)");
        goto done_o;
    }
    baby_ptrs = PyMem_Malloc(sizeof(*baby_ptrs) * (size_t)babies.count);
    out_ptrs = PyMem_Malloc(sizeof(*out_ptrs) * (size_t)outs.count);
    if (!baby_ptrs || !out_ptrs) {
        PyErr_NoMemory();
        goto done_o;
    }
    for (Py_ssize_t n = 0; n < babies.count; n++)
        baby_ptrs[n] = (const uint64_t *)babies.views[n].buf;
    for (Py_ssize_t n = 0; n < outs.count; n++)
        out_ptrs[n] = (uint64_t *)outs.views[n].buf;
    /* Long contiguous runs matter most (measured on a 2-core Xeon with IFMA: 1024
     * beats 64..512 by 1.1-3x at every Q: shorter blocks that would keep the babies
     * in L2 break the streams into short runs). */
    j.block = j.N < 1024 ? j.N : 1024;
    j.diagonals = (const uint64_t *)vd.buf;
    j.index = (const int64_t *)vi.buf;
    j.babies = baby_ptrs;
    j.out = out_ptrs;
    j.primes = primes;

    int status;
    Py_BEGIN_ALLOW_THREADS
    status = run(&j, impl);
    Py_END_ALLOW_THREADS
    if (status < 0) {
        PyErr_NoMemory();
        goto done_o;
    }
    result = Py_None;
    Py_INCREF(result);
done_o:
    PyMem_Free(baby_ptrs);
    PyMem_Free(out_ptrs);
    PyMem_Free(primes);
    buffers_release(&outs);
done_b:
    buffers_release(&babies);
done_i:
    PyBuffer_Release(&vi);
done_d:
    PyBuffer_Release(&vd);
    return result;
}

PyDoc_STRVAR(reduce_doc,
"reduce128(x, q) -> int\n\nx mod q through the kernel's Barrett reduction (for tests); 0 <= x < 2^128.");

static PyObject *py_reduce128(PyObject *self, PyObject *args) {
    PyObject *ox;
    unsigned long long q;
    (void)self;
    if (!PyArg_ParseTuple(args, "OK", &ox, &q))
        return NULL;
    if (q < 3 || q >= (1ULL << 61) || !(q & 1)) {
        PyErr_SetString(PyExc_ValueError, "q must be odd, in [3, 2^61)");
        return NULL;
    }
    PyObject *shift = PyLong_FromLong(64);
    PyObject *hi = shift ? PyNumber_Rshift(ox, shift) : NULL;
    Py_XDECREF(shift);
    if (!hi)
        return NULL;
    unsigned long long h = PyLong_AsUnsignedLongLong(hi);
    Py_DECREF(hi);
    if (PyErr_Occurred())
        return NULL;
    unsigned long long lo = PyLong_AsUnsignedLongLongMask(ox);
    if (PyErr_Occurred())
        return NULL;
    prime_t p;
    prime_init(&p, q);
    return PyLong_FromUnsignedLongLong(reduce128(((u128)h << 64) | lo, &p));
}

static PyObject *py_has_ifma(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return PyBool_FromLong(have_ifma());
}

static PyMethodDef methods[] = {
    {"inner_sums", (PyCFunction)(void (*)(void))inner_sums, METH_VARARGS | METH_KEYWORDS,
     inner_sums_doc},
    {"reduce128", py_reduce128, METH_VARARGS, reduce_doc},
    {"has_ifma", py_has_ifma, METH_NOARGS, "Whether the AVX-512 IFMA path can run here."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_mac",
    "Multiply-accumulate of NTT-form RNS limbs for diagonal HE scoring.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__mac(void) { return PyModule_Create(&module); }
