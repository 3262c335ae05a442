/*
 * Fused CPU kernel for lung-zone max pooling (cutremain_monai.networks.lung_zone_pool).
 *
 * What it adds over PyTorch: `scatter_reduce(amax)` visits every pixel through an index (about 40x the time of a
 * whole-map `amax`); this kernel makes one pass per image over a uint8 zone map, finds runs of equal zone values
 * (32 bytes per AVX2 compare), skips zone-0 runs without reading the map and takes each run's maximum with
 * vector max instructions (overlapping loads: max is idempotent), so it reads about as many bytes as `amax`.
 * Images run in parallel with OpenMP. NaN inside a zone gives NaN for that zone, as torch.amax does.
 * Machines without AVX2 (or not x86) use the scalar loop; the build is optional (setup.py), and Python falls
 * back to scatter_reduce when this module is missing.
 *
 * zone_max_u8(prob_ptr, zones_ptr, batch, n_pixels, n_zones, out_ptr, empty_ptr, n_threads[, simd]) -> status
 *   prob: float32 (batch, n_pixels) C-contiguous; zones: uint8 (batch, n_pixels) C-contiguous;
 *   out: float32 (batch, n_zones): column z - 1 holds the maximum over the pixels of zone z, 0 when it is empty;
 *   empty: bool/uint8 (batch, n_zones), 1 where zone z has no pixel. Zone 0 (outside the lungs) is skipped.
 *   simd: False forces the scalar loop (tests compare the two paths on AVX2 machines).
 *   status: 0, or 1 when a zone value exceeds n_zones (those pixels are ignored; the caller raises).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

/* max that propagates NaN from either side */
static inline float fmax_nan(float a, float b) {
    if (a != a) return a;
    if (b != b) return b;
    return b > a ? b : a;
}

static int image_scalar(const float *p, const uint8_t *z, int64_t n, int64_t nz, float *o) {
    int bad = 0;
    for (int64_t i = 0; i < n; ++i) {
        uint8_t c = z[i];
        if (!c) continue;
        if (c > nz) { bad = 1; continue; }
        float v = p[i];
        if (v != v) o[c] = v; else if (v > o[c] && o[c] == o[c]) o[c] = v;
    }
    return bad;
}

#if HAVE_X86
__attribute__((target("avx2"))) static inline int64_t run_end_avx2(const uint8_t *z, int64_t j, int64_t n) {
    uint8_t c = z[j];
    __m256i pat = _mm256_set1_epi8((char)c);
    ++j;
    while (j + 32 <= n) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(z + j));
        uint32_t eq = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, pat));
        if (eq != 0xFFFFFFFFu) return j + __builtin_ctz(~eq);
        j += 32;
    }
    while (j < n && z[j] == c) ++j;
    return j;
}

/* maximum of p[0:n] and m; NaN when any value is NaN */
__attribute__((target("avx2"))) static inline float run_max_avx2(const float *p, int64_t n, float m) {
    if (n < 8) {
        for (int64_t i = 0; i < n; ++i) m = fmax_nan(m, p[i]);
        return m;
    }
    __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + n - 8);
    __m256 nan = _mm256_or_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q), _mm256_cmp_ps(b, b, _CMP_UNORD_Q));
    int64_t i = 8;
    for (; i + 16 <= n; i += 16) {
        __m256 x = _mm256_loadu_ps(p + i), y = _mm256_loadu_ps(p + i + 8);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, y, _CMP_UNORD_Q));
        a = _mm256_max_ps(a, x);
        b = _mm256_max_ps(b, y);
    }
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(p + i);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
        a = _mm256_max_ps(a, x);
    }
    if (_mm256_movemask_ps(nan)) return NAN;
    a = _mm256_max_ps(a, b);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    return fmax_nan(m, _mm_cvtss_f32(h));
}

__attribute__((target("avx2"))) static int image_avx2(const float *p, const uint8_t *z, int64_t n, int64_t nz,
                                                      float *o) {
    int bad = 0;
    int64_t j = 0;
    while (j < n) {
        int64_t e = run_end_avx2(z, j, n);
        uint8_t c = z[j];
        if (c) {
            if (c <= nz) o[c] = run_max_avx2(p + j, e - j, o[c]);
            else bad = 1;
        }
        j = e;
    }
    return bad;
}
#endif

static int zone_max_u8(const float *prob, const uint8_t *zones, int64_t batch, int64_t n, int64_t nz, float *out,
                       uint8_t *empty, int n_threads, int simd) {
    int bad = 0;
    int use_avx2 = 0;
#if HAVE_X86
    __builtin_cpu_init();
    use_avx2 = simd && __builtin_cpu_supports("avx2");
#endif
#pragma omp parallel for num_threads(n_threads) schedule(static) reduction(| : bad) if (batch > 1 && n_threads > 1)
    for (int64_t b = 0; b < batch; ++b) {
        float acc[256];
        for (int64_t k = 0; k <= nz; ++k) acc[k] = -INFINITY;
#if HAVE_X86
        if (use_avx2) bad |= image_avx2(prob + b * n, zones + b * n, n, nz, acc);
        else
#endif
            bad |= image_scalar(prob + b * n, zones + b * n, n, nz, acc);
        for (int64_t k = 1; k <= nz; ++k) {
            int e = acc[k] == -INFINITY;
            out[b * nz + k - 1] = e ? 0.0f : acc[k];
            empty[b * nz + k - 1] = (uint8_t)e;
        }
    }
    return bad;
}

static PyObject *py_zone_max_u8(PyObject *self, PyObject *args) {
    unsigned long long prob, zones, out, empty;
    long long batch, n, nz;
    int n_threads, simd = 1;
    if (!PyArg_ParseTuple(args, "KKLLLKKi|p", &prob, &zones, &batch, &n, &nz, &out, &empty, &n_threads, &simd))
        return NULL;
    if (batch < 0 || n < 0 || nz < 1 || nz > 254 || n_threads < 1) {
        PyErr_SetString(PyExc_ValueError, "zone_max_u8: bad sizes");
        return NULL;
    }
    int bad;
    Py_BEGIN_ALLOW_THREADS
    bad = zone_max_u8((const float *)(uintptr_t)prob, (const uint8_t *)(uintptr_t)zones, batch, n, nz,
                      (float *)(uintptr_t)out, (uint8_t *)(uintptr_t)empty, n_threads, simd);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(bad);
}

static PyMethodDef methods[] = {
    {"zone_max_u8", py_zone_max_u8, METH_VARARGS, "Per-zone maxima of float32 maps over uint8 zone maps."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_zone_pool", "Fused CPU lung-zone max pooling.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__zone_pool(void) { return PyModule_Create(&module); }
