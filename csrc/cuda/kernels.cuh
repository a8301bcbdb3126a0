// pysafegeom CUDA kernels: plain CUDA (no torch headers), so kernels.cu compiles on its own with
// `nvcc -arch=sm_90 -std=c++17 -c kernels.cu`. csrc/cuda/bindings.cpp checks tensors, allocates scratch
// through torch's caching allocator and calls these launchers on torch's current stream.
//
// Every launcher takes raw, contiguous pointers, sizes and a stream, enqueues its kernel(s) and returns
// cudaGetLastError() (cudaSuccess when there was nothing to do). Element type T is float, __half or
// __nv_bfloat16; arithmetic is float32 (float64 for float64 running sums). The definition of every op is
// pysafegeom/ops/reference.py; shapes below use its names.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace pysafegeom {
namespace cuda {

// Largest basis size k supported by project_ablate / orthogonalize_weight (checked by the dispatcher).
constexpr int kMaxBasis = 16;

// out[b, p, :] = hidden[b, positions[b, p], :]. hidden [B, Tn, d], positions [B, P] int64, out [B, P, d].
// A pure row copy: one warp per output row, 16-byte accesses when the row size and pointers allow.
template <typename T>
cudaError_t launch_gather_positions(const T* hidden, const int64_t* positions, T* out, int64_t B, int64_t Tn,
                                    int64_t P, int64_t d, cudaStream_t stream);

// sums[groups[b], p, :] += hidden[b, positions[b, p], :] for b = 0, 1, ... in order; counts[groups[b]] += 1.
// sums [G, P, d]: float64 (plain sum; comp must be nullptr) or float32 with Kahan compensation comp [G, P, d].
// Deterministic: one thread owns one (p, i) element of every group and walks b in increasing order, with
// exactly the reference's Kahan steps (y = x - c; t = s + y; c = (t - s) - y; s = t).
template <typename T>
cudaError_t launch_gather_accumulate_f64(const T* hidden, const int64_t* positions, const int64_t* groups,
                                         double* sums, int64_t* counts, int64_t B, int64_t Tn, int64_t P,
                                         int64_t d, cudaStream_t stream);
template <typename T>
cudaError_t launch_gather_accumulate_kahan(const T* hidden, const int64_t* positions, const int64_t* groups,
                                           float* sums, float* comp, int64_t* counts, int64_t B, int64_t Tn,
                                           int64_t P, int64_t d, cudaStream_t stream);

// out[n] = x[n] - beta * Q (Q^T x[n]) + alpha * v for every row of x [N, d]; Q [d, k] float32 row-major,
// 1 <= k <= 16; v [d] float32 or nullptr (then alpha is ignored, as it is when alpha == 0); proj [N, k]
// float32 (= x Q, from the input x) or nullptr. out may be x itself: each row's projections are
// complete (block barrier) before any element of the row is written.
template <typename T>
cudaError_t launch_project_ablate(const T* x, const float* Q, int64_t N, int64_t d, int k, float beta,
                                  float alpha, const float* v, T* out, float* proj, cudaStream_t stream);

// Remove span(Q) from the residual side of a weight matrix; out may be W itself.
// residual_dim == 1: W [m, d], out = W - (W Q) Q^T (the project_ablate row kernel, beta = 1).
// residual_dim == 0: W [d, m], out = W - Q (Q^T W): a column reduction C = Q^T W [k, m] over slices of d
// (partials, then a fixed-order sum: deterministic), then the update. Needs float32 scratch of
// orthogonalize_weight_scratch_floats(d, m, k) elements for residual_dim == 0 (0 for residual_dim == 1).
int64_t orthogonalize_weight_scratch_floats(int64_t d, int64_t m, int k, int residual_dim);
template <typename T>
cudaError_t launch_orthogonalize_weight(const T* W, const float* Q, int64_t rows, int64_t cols, int k,
                                        int residual_dim, T* out, float* scratch, cudaStream_t stream);

// Chunked cross-entropy: the bindings walk the vocabulary in chunks of c columns, compute the chunk's
// logits z = h W_c^T [N, c] in float32 with cuBLAS (torch's mm), and call these:
//   ce_init:     m = -inf, s = 0, tlogit = 0 (per row).
//   ce_chunk:    per row, online log-sum-exp update with the chunk (m_new = max(m, max z); s = s *
//                exp(m - m_new) + sum exp(z - m_new)); captures tlogit = z[target - start] when the
//                row's target falls in this chunk (and is not ignore_index); when e != nullptr also
//                writes e = exp(z - m_new) (in T, for the e @ W_c product; e may alias z when T is float)
//                and scale = exp(m_old - m_new).
//   ce_rescale:  acc = acc * scale[row] + t (acc = t on the first chunk) -- acc [N, d] float32.
//   ce_finalize: loss = (m + log s) - tlogit; grad = acc / s - W[target] (0 for ignored rows).
cudaError_t launch_ce_init(float* m, float* s, float* tlogit, int64_t N, cudaStream_t stream);
template <typename T>
cudaError_t launch_ce_chunk(const float* z, int64_t N, int64_t c, int64_t start, const int64_t* targets,
                            int64_t ignore_index, float* m, float* s, float* tlogit, float* scale, T* e,
                            cudaStream_t stream);
cudaError_t launch_ce_rescale(float* acc, const float* t, const float* scale, int64_t N, int64_t d, bool first,
                              cudaStream_t stream);
template <typename T>
cudaError_t launch_ce_finalize(const T* W, int64_t d, const int64_t* targets, int64_t ignore_index,
                               const float* m, const float* s, const float* tlogit, float* loss, float* grad,
                               int64_t N, cudaStream_t stream);

// masked_topk, fused part: keys [L, V] int64 such that a descending sort of the keys is the reference
// order (score = -grad as float32 descending, ties by smaller index; NaN above +inf, -0 == +0;
// forbidden[v] != 0 and v == current[l] score -inf). Keys are unique within a row, so torch.topk on them
// (the bindings) returns exactly the reference's indices in the reference's order.
// forbidden: [V] bytes (torch.bool) or nullptr; current: [L] int64 or nullptr.
template <typename T>
cudaError_t launch_topk_keys(const T* grad, const uint8_t* forbidden, const int64_t* current, int64_t L,
                             int64_t V, int64_t* keys, cudaStream_t stream);

}  // namespace cuda
}  // namespace pysafegeom
