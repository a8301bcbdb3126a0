// Hot float32 loops of the CPU kernels (declarations and contracts: rowmath.h).
//
// Portability: the library is built for the baseline ISA (no -march=native). On x86-64 with GCC each
// function is also cloned for x86-64-v3 (AVX2+FMA) and x86-64-v4 (AVX-512), and the loader picks the
// best the CPU has. No -ffast-math: reductions use explicit lane accumulators (a fixed order), so the
// compiler vectorises them without reassociating anything.
#include "cpu/rowmath.h"

#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(PYSAFEGEOM_NO_CLONES)
#define PSG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PSG_CLONES
#endif

namespace pysafegeom {
namespace cpu {

namespace {
constexpr int64_t W = 16;  // lanes per accumulator block

// exp for x <= 0 region and beyond, Cephes-style: 2^n * p(r), |r| <= ln2/2, ~1 ulp; 0 below -87.
inline float fexp(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float fn = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  return x < -87.0f ? 0.0f : p * pow2;
}
}  // namespace

PSG_CLONES void dot_k(const float* x, const float* QT, int64_t d, int64_t k, float* p) {
  float acc[kMaxK][W];
  for (int64_t j = 0; j < k; ++j)
    for (int64_t l = 0; l < W; ++l) acc[j][l] = 0.0f;
  const int64_t dv = d - d % W;
  for (int64_t i = 0; i < dv; i += W) {
    for (int64_t j = 0; j < k; ++j) {
      const float* q = QT + j * d + i;
      for (int64_t l = 0; l < W; ++l) acc[j][l] += x[i + l] * q[l];
    }
  }
  for (int64_t j = 0; j < k; ++j) {
    const float* q = QT + j * d;
    for (int64_t i = dv; i < d; ++i) acc[j][i - dv] += x[i] * q[i];
    // pairwise over the lanes
    for (int64_t h = W / 2; h >= 1; h /= 2)
      for (int64_t l = 0; l < h; ++l) acc[j][l] += acc[j][l + h];
    p[j] = acc[j][0];
  }
}

PSG_CLONES void subtract_k(const float* x, const float* QT, const float* bp, int64_t d, int64_t k, const float* av,
                           float* o) {
  if (av) {
    for (int64_t i = 0; i < d; ++i) o[i] = x[i] + av[i];
  } else if (o != x) {
    for (int64_t i = 0; i < d; ++i) o[i] = x[i];
  }
  int64_t j = 0;
  for (; j + 4 <= k; j += 4) {
    const float *q0 = QT + j * d, *q1 = q0 + d, *q2 = q1 + d, *q3 = q2 + d;
    const float b0 = bp[j], b1 = bp[j + 1], b2 = bp[j + 2], b3 = bp[j + 3];
    for (int64_t i = 0; i < d; ++i) o[i] -= (b0 * q0[i] + b1 * q1[i]) + (b2 * q2[i] + b3 * q3[i]);
  }
  for (; j + 2 <= k; j += 2) {
    const float *q0 = QT + j * d, *q1 = q0 + d;
    const float b0 = bp[j], b1 = bp[j + 1];
    for (int64_t i = 0; i < d; ++i) o[i] -= b0 * q0[i] + b1 * q1[i];
  }
  for (; j < k; ++j) {
    const float* q0 = QT + j * d;
    const float b0 = bp[j];
    for (int64_t i = 0; i < d; ++i) o[i] -= b0 * q0[i];
  }
}

PSG_CLONES void column_accumulate(const float* w, const float* q, int64_t k, int64_t n, int64_t ld, double* C) {
  for (int64_t j = 0; j < k; ++j) {
    const double qj = q[j];
    double* c = C + j * ld;
    for (int64_t i = 0; i < n; ++i) c[i] += qj * static_cast<double>(w[i]);
  }
}

PSG_CLONES void column_subtract(const float* w, const float* q, const float* Cf, int64_t k, int64_t n, int64_t ld,
                                float* o) {
  for (int64_t i = 0; i < n; ++i) o[i] = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    const float qj = q[j];
    const float* c = Cf + j * ld;
    for (int64_t i = 0; i < n; ++i) o[i] += qj * c[i];
  }
  for (int64_t i = 0; i < n; ++i) o[i] = w[i] - o[i];
}

// Max through order-preserving integer keys (int max vectorises, a float select may not).
inline int32_t float_key(float f) {
  int32_t b;
  std::memcpy(&b, &f, sizeof(b));
  return b ^ ((b >> 31) & 0x7FFFFFFF);
}

PSG_CLONES float row_max(const float* z, int64_t n) {
  int32_t acc[W];
  for (int64_t l = 0; l < W; ++l) acc[l] = float_key(z[0]);
  const int64_t nv = n - n % W;
  for (int64_t i = 0; i < nv; i += W)
    for (int64_t l = 0; l < W; ++l) {
      const int32_t key = float_key(z[i + l]);
      acc[l] = key > acc[l] ? key : acc[l];
    }
  int32_t m = acc[0];
  for (int64_t l = 1; l < W; ++l) m = acc[l] > m ? acc[l] : m;
  for (int64_t i = nv; i < n; ++i) m = float_key(z[i]) > m ? float_key(z[i]) : m;
  const int32_t b = m ^ ((m >> 31) & 0x7FFFFFFF);
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

PSG_CLONES float exp_shift_sum(float* z, int64_t n, float m) {
  float acc[W];
  for (int64_t l = 0; l < W; ++l) acc[l] = 0.0f;
  const int64_t nv = n - n % W;
  for (int64_t i = 0; i < nv; i += W) {
    for (int64_t l = 0; l < W; ++l) {
      const float e = fexp(z[i + l] - m);
      z[i + l] = e;
      acc[l] += e;
    }
  }
  for (int64_t i = nv; i < n; ++i) {
    z[i] = fexp(z[i] - m);
    acc[i - nv] += z[i];
  }
  for (int64_t h = W / 2; h >= 1; h /= 2)
    for (int64_t l = 0; l < h; ++l) acc[l] += acc[l + h];
  return acc[0];
}

PSG_CLONES void scale_row(float* a, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) a[i] *= s;
}

PSG_CLONES void finish_grad_row(float* a, const float* w, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] / s - w[i];
}

PSG_CLONES void kahan_add_f32(const float* x, float* s, float* c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float y = x[i] - c[i];
    const float t = s[i] + y;
    c[i] = (t - s[i]) - y;
    s[i] = t;
  }
}

PSG_CLONES void bf16_to_float(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &u, sizeof(float));
  }
}

PSG_CLONES void float_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    dst[i] = static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
  }
}

#if defined(__FLT16_MAX__)
PSG_CLONES void half_to_float(const uint16_t* src, float* dst, int64_t n) {
  const _Float16* s = reinterpret_cast<const _Float16*>(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
}

PSG_CLONES void float_to_half(const float* src, uint16_t* dst, int64_t n) {
  _Float16* d = reinterpret_cast<_Float16*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<_Float16>(src[i]);
}
#else
#error "pysafegeom: the compiler has no _Float16; build with GCC >= 12 or Clang >= 15"
#endif

}  // namespace cpu
}  // namespace pysafegeom
