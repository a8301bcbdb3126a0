// float32 row kernels shared by the CPU ops (csrc/cpu/kernels.cpp). No torch headers: this is the
// hot arithmetic, written with fixed-width lane accumulators so the compiler vectorises it, and
// compiled once per instruction-set level with a run-time choice (see rowmath.cpp).
#pragma once
#include <cstdint>

namespace pysafegeom {
namespace cpu {

constexpr int64_t kMaxK = 16;  // most basis vectors an op accepts (validated in Python)

// p[j] = sum_i x[i] * QT[j * d + i] for j < k (QT is Q^T, [k, d] row-major).
void dot_k(const float* x, const float* QT, int64_t d, int64_t k, float* p);
// o[i] = x[i] + av[i] - sum_j bp[j] * QT[j * d + i]; av may be null; o may be x.
void subtract_k(const float* x, const float* QT, const float* bp, int64_t d, int64_t k, const float* av, float* o);
// C[j * ld + c] += q[j] * w[c] in float64, for j < k, c < n.
void column_accumulate(const float* w, const float* q, int64_t k, int64_t n, int64_t ld, double* C);
// o[c] = w[c] - sum_j q[j] * Cf[j * ld + c], for c < n.
void column_subtract(const float* w, const float* q, const float* Cf, int64_t k, int64_t n, int64_t ld, float* o);
// max of z[0..n) (n >= 1).
float row_max(const float* z, int64_t n);
// z[i] <- exp(z[i] - m); returns the sum of the new z.
float exp_shift_sum(float* z, int64_t n, float m);
// a[i] *= s.
void scale_row(float* a, int64_t n, float s);
// a[i] <- a[i] / s - w[i].
void finish_grad_row(float* a, const float* w, int64_t n, float s);
// Kahan step, elementwise: y = x - c; t = s + y; c = (t - s) - y; s = t.
void kahan_add_f32(const float* x, float* s, float* c, int64_t n);

// Widening / narrowing of 16-bit floats (bit patterns), round-to-nearest-even like c10::Half/BFloat16.
void bf16_to_float(const uint16_t* src, float* dst, int64_t n);
void float_to_bf16(const float* src, uint16_t* dst, int64_t n);
void half_to_float(const uint16_t* src, float* dst, int64_t n);
void float_to_half(const float* src, uint16_t* dst, int64_t n);

}  // namespace cpu
}  // namespace pysafegeom
