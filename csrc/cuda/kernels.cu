// pysafegeom CUDA kernels (plain CUDA, no torch headers; see kernels.cuh for the launcher contract).
//
// Conventions: float32 arithmetic whatever T is (float64 for float64 running sums); 64-bit offsets into
// tensors; grids sized from the multiprocessor count (132 on an H200) with grid-stride loops where the
// work can exceed it. Nothing here allocates memory: scratch comes from the caller (torch's allocator).
#include "kernels.cuh"

#include <atomic>
#include <cmath>
#include <cstdint>

namespace pysafegeom {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------------------
// helpers

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_f<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC contiguous elements moved as one aligned access (16 bytes for 4 floats, 8 for 4 halves).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int u = 0; u < VEC; ++u) f[u] = to_f<T>(pk.v[u]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int u = 0; u < VEC; ++u) pk.v[u] = from_f<T>(f[u]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reductions (blockDim.x a multiple of 32, at most 1024). `sh` holds >= 32 floats. They end
// with a barrier, so `sh` can be reused at once, and everything the block did before the call is
// ordered before everything it does after.
__device__ __forceinline__ float block_sum(float v, float* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < nw ? sh[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) sh[32] = t;
  }
  __syncthreads();
  const float r = sh[32];
  __syncthreads();
  return r;
}

__device__ __forceinline__ float block_max(float v, float* sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < nw ? sh[lane] : -INFINITY;
    t = warp_max(t);
    if (lane == 0) sh[32] = t;
  }
  __syncthreads();
  const float r = sh[32];
  __syncthreads();
  return r;
}

// Multiprocessor count of the current device (cached per device).
int device_sms() {
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return 132;
  }
  if (dev >= 0 && dev < 64) {
    const int c = cache[dev].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
    (void)cudaGetLastError();
    n = 132;
  }
  if (dev >= 0 && dev < 64) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline bool aligned(const void* p, size_t n) { return (reinterpret_cast<uintptr_t>(p) % n) == 0; }

// ---------------------------------------------------------------------------------------------------
// 1. gather_positions: one warp per output row (b, p), lanes stride over the row in V-sized words.

template <typename V>
__global__ void __launch_bounds__(256)
    gather_rows_kernel(const V* __restrict__ hidden, const int64_t* __restrict__ positions, V* __restrict__ out,
                       int64_t rows, int64_t P, int64_t Tn, int64_t nvec) {
  const int lane = threadIdx.x & 31;
  const int64_t wpb = blockDim.x >> 5;
  const int64_t nwarps = (int64_t)gridDim.x * wpb;
  for (int64_t r = (int64_t)blockIdx.x * wpb + (threadIdx.x >> 5); r < rows; r += nwarps) {
    const int64_t b = r / P;
    const int64_t pos = positions[r];
    const V* src = hidden + (b * Tn + pos) * nvec;
    V* dst = out + r * nvec;
    int64_t j = lane;
    for (; j + 96 < nvec; j += 128) {  // four independent loads in flight per lane
      const V a0 = src[j], a1 = src[j + 32], a2 = src[j + 64], a3 = src[j + 96];
      dst[j] = a0;
      dst[j + 32] = a1;
      dst[j + 64] = a2;
      dst[j + 96] = a3;
    }
    for (; j < nvec; j += 32) dst[j] = src[j];
  }
}

template <typename V>
cudaError_t gather_rows(const void* hidden, const int64_t* positions, void* out, int64_t B, int64_t Tn, int64_t P,
                        int64_t row_bytes, cudaStream_t stream) {
  const int64_t rows = B * P;
  const int64_t nvec = row_bytes / (int64_t)sizeof(V);
  const int threads = 256;
  const int64_t blocks = min64(ceil_div(rows, threads / 32), (int64_t)device_sms() * 64);
  gather_rows_kernel<V><<<(unsigned)blocks, threads, 0, stream>>>(
      static_cast<const V*>(hidden), positions, static_cast<V*>(out), rows, P, Tn, nvec);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------
// 2. gather_accumulate: thread (p, i) walks b = 0..B-1 in order; UNROLL rows' loads are issued before
// their (sequential) additions. The running sum of the current group stays in registers while
// consecutive rows share a group (the same arithmetic as reading and writing it every row).

constexpr int GA_THREADS = 64;  // small blocks: P*d threads in all, spread them over the SMs
constexpr int GA_UNROLL = 8;

template <typename T, bool KAHAN>
__global__ void __launch_bounds__(GA_THREADS)
    gather_accumulate_kernel(const T* __restrict__ hidden, const int64_t* __restrict__ positions,
                             const int64_t* __restrict__ groups, double* __restrict__ sums64,
                             float* __restrict__ sums32, float* __restrict__ comp,
                             unsigned long long* __restrict__ counts, int64_t B, int64_t Tn, int64_t P, int64_t d) {
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t nthreads = (int64_t)gridDim.x * blockDim.x;
  // counts[groups[b]] += 1: integer atomics, so the result does not depend on their order.
  for (int64_t b = tid; b < B; b += nthreads) atomicAdd(counts + groups[b], 1ULL);

  const int64_t PD = P * d;
  if (tid >= PD) return;
  const int64_t p = tid / d;
  const int64_t i = tid - p * d;

  int64_t cur = -1;  // group whose running sum is in (s64 | s, c)
  double s64 = 0.0;
  float s = 0.f, c = 0.f;
  for (int64_t b0 = 0; b0 < B; b0 += GA_UNROLL) {
    float xv[GA_UNROLL];
    int64_t gv[GA_UNROLL];
#pragma unroll
    for (int u = 0; u < GA_UNROLL; ++u) {
      const int64_t b = b0 + u;
      if (b < B) {
        const int64_t pos = positions[b * P + p];
        gv[u] = groups[b];
        xv[u] = to_f<T>(hidden[(b * Tn + pos) * d + i]);
      } else {
        gv[u] = -1;
        xv[u] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < GA_UNROLL; ++u) {
      if (b0 + u < B) {
        const int64_t g = gv[u];
        if (g != cur) {
          if (cur >= 0) {
            if (KAHAN) {
              sums32[cur * PD + tid] = s;
              comp[cur * PD + tid] = c;
            } else {
              sums64[cur * PD + tid] = s64;
            }
          }
          cur = g;
          if (KAHAN) {
            s = sums32[g * PD + tid];
            c = comp[g * PD + tid];
          } else {
            s64 = sums64[g * PD + tid];
          }
        }
        if (KAHAN) {
          // Exactly the reference: y = x - c; t = s + y; c = (t - s) - y; s = t (no contraction).
          const float y = __fsub_rn(xv[u], c);
          const float t = __fadd_rn(s, y);
          c = __fsub_rn(__fsub_rn(t, s), y);
          s = t;
        } else {
          s64 = __dadd_rn(s64, (double)xv[u]);
        }
      }
    }
  }
  if (cur >= 0) {
    if (KAHAN) {
      sums32[cur * PD + tid] = s;
      comp[cur * PD + tid] = c;
    } else {
      sums64[cur * PD + tid] = s64;
    }
  }
}

template <typename T, bool KAHAN>
cudaError_t gather_accumulate_impl(const T* hidden, const int64_t* positions, const int64_t* groups, double* sums64,
                                   float* sums32, float* comp, int64_t* counts, int64_t B, int64_t Tn, int64_t P,
                                   int64_t d, cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  const int64_t blocks = max64(1, ceil_div(max64(P * d, 1), GA_THREADS));
  gather_accumulate_kernel<T, KAHAN><<<(unsigned)blocks, GA_THREADS, 0, stream>>>(
      hidden, positions, groups, sums64, sums32, comp, reinterpret_cast<unsigned long long*>(counts), B, Tn, P, d);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------
// 3. project_ablate: a block of PA_THREADS threads handles ROWS rows. Pass 1: each thread accumulates the
// k dot products of its columns for every row (Q row loaded once, used for ROWS rows); warp shuffles and
// a fixed-order sum over warps give proj. Pass 2 (after the barrier): out = x - beta * Q proj + alpha v.
// A thread reads x[i] before it writes out[i], and only after every thread finished pass 1, so out may
// alias x.

constexpr int PA_THREADS = 256;
constexpr int PA_WARPS = PA_THREADS / 32;

template <typename T, int KMAX, int ROWS>
__global__ void __launch_bounds__(PA_THREADS)
    project_ablate_kernel(const T* x, const float* __restrict__ Q, int64_t N, int64_t d, int k, float beta,
                          float alpha, const float* __restrict__ v, T* out, float* __restrict__ proj) {
  __shared__ float red[PA_WARPS][ROWS * KMAX];
  __shared__ float prs[ROWS * KMAX];
  const int64_t row0 = (int64_t)blockIdx.x * ROWS;
  const int nr = (int)min64(ROWS, N - row0);
  const T* xb = x + row0 * d;
  T* ob = out + row0 * d;

  float acc[ROWS][KMAX];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int j = 0; j < KMAX; ++j) acc[r][j] = 0.f;

  for (int64_t i = threadIdx.x; i < d; i += PA_THREADS) {
    float q[KMAX];
#pragma unroll
    for (int j = 0; j < KMAX; ++j) q[j] = (j < k) ? Q[i * k + j] : 0.f;
    float xv[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) xv[r] = (r < nr) ? to_f<T>(xb[r * d + i]) : 0.f;
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int j = 0; j < KMAX; ++j) acc[r][j] = fmaf(xv[r], q[j], acc[r][j]);
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      const float t = warp_sum(acc[r][j]);
      if (lane == 0) red[warp][r * KMAX + j] = t;
    }
  __syncthreads();
  if (threadIdx.x < ROWS * KMAX) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < PA_WARPS; ++w) t += red[w][threadIdx.x];
    prs[threadIdx.x] = t;
    const int r = threadIdx.x / KMAX, j = threadIdx.x % KMAX;
    if (proj != nullptr && r < nr && j < k) proj[(row0 + r) * k + j] = t;
  }
  __syncthreads();

  float pr[ROWS][KMAX];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int j = 0; j < KMAX; ++j) pr[r][j] = prs[r * KMAX + j];
  const bool add_v = (v != nullptr) && (alpha != 0.f);

  for (int64_t i = threadIdx.x; i < d; i += PA_THREADS) {
    float q[KMAX];
#pragma unroll
    for (int j = 0; j < KMAX; ++j) q[j] = (j < k) ? Q[i * k + j] : 0.f;
    const float av = add_v ? alpha * v[i] : 0.f;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r < nr) {
        const float xv = to_f<T>(xb[r * d + i]);
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < KMAX; ++j)
          if (j < k) dot = fmaf(pr[r][j], q[j], dot);
        float o = xv - beta * dot;
        if (add_v) o = o + av;
        ob[r * d + i] = from_f<T>(o);
      }
    }
  }
}

template <typename T, int KMAX>
cudaError_t project_ablate_k(const T* x, const float* Q, int64_t N, int64_t d, int k, float beta, float alpha,
                             const float* v, T* out, float* proj, cudaStream_t stream) {
  constexpr int ROWS = KMAX <= 4 ? 8 : 4;
  const int64_t blocks = ceil_div(N, ROWS);
  project_ablate_kernel<T, KMAX, ROWS>
      <<<(unsigned)blocks, PA_THREADS, 0, stream>>>(x, Q, N, d, k, beta, alpha, v, out, proj);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------
// 4. orthogonalize_weight, residual_dim == 0 (W [d, m]): out = W - Q (Q^T W).
// colreduce: block (x: VEC*OW_THREADS columns, y: a slice of rows) -> partial[s, j, c] = sum over the
//            slice of Q[i, j] W[i, c];
// colsum:    C[j, c] = sum_s partial[s, j, c] (fixed order: deterministic);
// colupdate: same tiling; C[:, cols] in registers, out[i, c] = W[i, c] - sum_j Q[i, j] C[j, c].

constexpr int OW_THREADS = 256;
constexpr int OW_RB = 4;  // rows whose W loads are issued together

int64_t ow_slices(int64_t d, int64_t m) {
  const int64_t bx = max64(1, ceil_div(m, (int64_t)OW_THREADS * 4));  // nominal (VEC = 4) column blocks
  const int64_t target = (int64_t)device_sms() * 4;
  int64_t S = max64(1, min64(d, ceil_div(target, bx)));
  const int64_t rows_per = ceil_div(d, S);
  return ceil_div(d, rows_per);
}

template <typename T, int KMAX, int VEC>
__global__ void __launch_bounds__(OW_THREADS)
    colreduce_kernel(const T* __restrict__ W, const float* __restrict__ Q, int64_t d, int64_t m, int k,
                     int64_t rows_per, float* __restrict__ partial) {
  const int64_t c0 = ((int64_t)blockIdx.x * OW_THREADS + threadIdx.x) * VEC;
  if (c0 >= m) return;  // m % VEC == 0 (checked by the launcher), so the whole vector is in range
  const int64_t s = blockIdx.y;
  const int64_t i0 = s * rows_per, i1 = min64(d, i0 + rows_per);
  float acc[VEC][KMAX];
#pragma unroll
  for (int u = 0; u < VEC; ++u)
#pragma unroll
    for (int j = 0; j < KMAX; ++j) acc[u][j] = 0.f;

  int64_t i = i0;
  for (; i + OW_RB <= i1; i += OW_RB) {
    float w[OW_RB][VEC];
#pragma unroll
    for (int rb = 0; rb < OW_RB; ++rb) load_vec<T, VEC>(W + (i + rb) * m + c0, w[rb]);
#pragma unroll
    for (int rb = 0; rb < OW_RB; ++rb) {
#pragma unroll
      for (int j = 0; j < KMAX; ++j) {
        const float q = (j < k) ? Q[(i + rb) * k + j] : 0.f;
#pragma unroll
        for (int u = 0; u < VEC; ++u) acc[u][j] = fmaf(q, w[rb][u], acc[u][j]);
      }
    }
  }
  for (; i < i1; ++i) {
    float w[VEC];
    load_vec<T, VEC>(W + i * m + c0, w);
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      const float q = (j < k) ? Q[i * k + j] : 0.f;
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc[u][j] = fmaf(q, w[u], acc[u][j]);
    }
  }
#pragma unroll
  for (int j = 0; j < KMAX; ++j) {
    if (j < k) {
      float* dst = partial + (s * k + j) * m + c0;
#pragma unroll
      for (int u = 0; u < VEC; ++u) dst[u] = acc[u][j];
    }
  }
}

__global__ void __launch_bounds__(256) colsum_kernel(const float* __restrict__ partial, int64_t S, int64_t km,
                                                     float* __restrict__ C) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < km; e += stride) {
    float t = 0.f;
    for (int64_t s = 0; s < S; ++s) t += partial[s * km + e];
    C[e] = t;
  }
}

template <typename T, int KMAX, int VEC>
__global__ void __launch_bounds__(OW_THREADS)
    colupdate_kernel(const T* W, const float* __restrict__ Q, const float* __restrict__ C, int64_t d, int64_t m,
                     int k, int64_t rows_per, T* out) {
  const int64_t c0 = ((int64_t)blockIdx.x * OW_THREADS + threadIdx.x) * VEC;
  if (c0 >= m) return;
  const int64_t s = blockIdx.y;
  const int64_t i0 = s * rows_per, i1 = min64(d, i0 + rows_per);
  float cr[VEC][KMAX];
#pragma unroll
  for (int j = 0; j < KMAX; ++j)
#pragma unroll
    for (int u = 0; u < VEC; ++u) cr[u][j] = (j < k) ? C[(int64_t)j * m + c0 + u] : 0.f;

  int64_t i = i0;
  for (; i + OW_RB <= i1; i += OW_RB) {
    float w[OW_RB][VEC];
#pragma unroll
    for (int rb = 0; rb < OW_RB; ++rb) load_vec<T, VEC>(W + (i + rb) * m + c0, w[rb]);
#pragma unroll
    for (int rb = 0; rb < OW_RB; ++rb) {
      float dot[VEC];
#pragma unroll
      for (int u = 0; u < VEC; ++u) dot[u] = 0.f;
#pragma unroll
      for (int j = 0; j < KMAX; ++j) {
        const float q = (j < k) ? Q[(i + rb) * k + j] : 0.f;
#pragma unroll
        for (int u = 0; u < VEC; ++u) dot[u] = fmaf(q, cr[u][j], dot[u]);
      }
      float o[VEC];
#pragma unroll
      for (int u = 0; u < VEC; ++u) o[u] = w[rb][u] - dot[u];
      store_vec<T, VEC>(out + (i + rb) * m + c0, o);
    }
  }
  for (; i < i1; ++i) {
    float w[VEC];
    load_vec<T, VEC>(W + i * m + c0, w);
    float dot[VEC];
#pragma unroll
    for (int u = 0; u < VEC; ++u) dot[u] = 0.f;
#pragma unroll
    for (int j = 0; j < KMAX; ++j) {
      const float q = (j < k) ? Q[i * k + j] : 0.f;
#pragma unroll
      for (int u = 0; u < VEC; ++u) dot[u] = fmaf(q, cr[u][j], dot[u]);
    }
    float o[VEC];
#pragma unroll
    for (int u = 0; u < VEC; ++u) o[u] = w[u] - dot[u];
    store_vec<T, VEC>(out + i * m + c0, o);
  }
}

template <typename T, int KMAX, int VEC>
cudaError_t orthogonalize_cols(const T* W, const float* Q, int64_t d, int64_t m, int k, T* out, float* scratch,
                               cudaStream_t stream) {
  const int64_t S = ow_slices(d, m);
  const int64_t rows_per = ceil_div(d, S);
  float* partial = scratch;                  // [S, k, m]
  float* C = scratch + S * (int64_t)k * m;  // [k, m]
  const dim3 grid((unsigned)ceil_div(m, (int64_t)OW_THREADS * VEC), (unsigned)S);
  colreduce_kernel<T, KMAX, VEC><<<grid, OW_THREADS, 0, stream>>>(W, Q, d, m, k, rows_per, partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t km = (int64_t)k * m;
  const int64_t sb = min64(ceil_div(km, 256), (int64_t)device_sms() * 16);
  colsum_kernel<<<(unsigned)sb, 256, 0, stream>>>(partial, S, km, C);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  colupdate_kernel<T, KMAX, VEC><<<grid, OW_THREADS, 0, stream>>>(W, Q, C, d, m, k, rows_per, out);
  return cudaGetLastError();
}

template <typename T, int KMAX>
cudaError_t orthogonalize_cols_k(const T* W, const float* Q, int64_t d, int64_t m, int k, T* out, float* scratch,
                                 cudaStream_t stream) {
  constexpr int VEC = KMAX >= 16 ? 2 : 4;  // VEC * KMAX accumulators per thread
  if (m % VEC == 0 && aligned(W, VEC * sizeof(T)) && aligned(out, VEC * sizeof(T)))
    return orthogonalize_cols<T, KMAX, VEC>(W, Q, d, m, k, out, scratch, stream);
  return orthogonalize_cols<T, KMAX, 1>(W, Q, d, m, k, out, scratch, stream);
}

// ---------------------------------------------------------------------------------------------------
// 5. chunked cross-entropy (the row-wise parts; the bindings run the two matrix products with cuBLAS).

constexpr int CE_THREADS = 256;

__global__ void ce_init_kernel(float* __restrict__ m, float* __restrict__ s, float* __restrict__ tl, int64_t N) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; n < N; n += stride) {
    m[n] = -INFINITY;
    s[n] = 0.f;
    tl[n] = 0.f;
  }
}

// One block per row (grid-stride over rows). e may alias z (T = float): each element is read, then
// written by the same thread; the target logit is read before the first barrier, i.e. before any write.
template <typename T>
__global__ void __launch_bounds__(CE_THREADS)
    ce_chunk_kernel(const float* z, int64_t N, int64_t c, int64_t start, const int64_t* __restrict__ targets,
                    int64_t ignore_index, float* __restrict__ m, float* __restrict__ s, float* __restrict__ tl,
                    float* __restrict__ scale, T* e) {
  __shared__ float sh[33];
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const float* zr = z + n * c;
    if (threadIdx.x == 0) {
      const int64_t t = targets[n];
      if (t != ignore_index && t >= start && t < start + c) tl[n] = zr[t - start];
    }
    float mx = -INFINITY;
    for (int64_t i = threadIdx.x; i < c; i += CE_THREADS) mx = fmaxf(mx, zr[i]);
    mx = block_max(mx, sh);
    const float m_old = m[n];
    const float m_new = fmaxf(m_old, mx);
    float sum = 0.f;
    if (e != nullptr) {
      T* er = e + n * c;
      for (int64_t i = threadIdx.x; i < c; i += CE_THREADS) {
        const float ev = expf(zr[i] - m_new);
        sum += ev;
        er[i] = from_f<T>(ev);
      }
    } else {
      for (int64_t i = threadIdx.x; i < c; i += CE_THREADS) sum += expf(zr[i] - m_new);
    }
    sum = block_sum(sum, sh);
    if (threadIdx.x == 0) {
      const float sc = expf(m_old - m_new);
      s[n] = s[n] * sc + sum;
      m[n] = m_new;
      if (scale != nullptr) scale[n] = sc;
    }
  }
}

__global__ void __launch_bounds__(256) ce_rescale_kernel(float* __restrict__ acc, const float* __restrict__ t,
                                                         const float* __restrict__ scale, int64_t N, int64_t d,
                                                         bool first) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    float* a = acc + n * d;
    const float* tr = t + n * d;
    if (first) {
      for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < d; i += stride) a[i] = tr[i];
    } else {
      const float sc = scale[n];
      // as the reference: acc * scale + (e @ W_c), two roundings
      for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < d; i += stride)
        a[i] = __fadd_rn(__fmul_rn(a[i], sc), tr[i]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(CE_THREADS)
    ce_finalize_kernel(const T* __restrict__ W, int64_t d, const int64_t* __restrict__ targets, int64_t ignore_index,
                       const float* __restrict__ m, const float* __restrict__ s, const float* __restrict__ tl,
                       float* __restrict__ loss, float* __restrict__ grad, int64_t N) {
  for (int64_t n = blockIdx.x; n < N; n += gridDim.x) {
    const int64_t t = targets[n];
    const bool valid = t != ignore_index;
    if (threadIdx.x == 0) loss[n] = valid ? (m[n] + logf(s[n])) - tl[n] : 0.f;
    if (grad != nullptr) {
      float* g = grad + n * d;
      if (valid) {
        const float sn = s[n];
        const T* wt = W + t * d;
        for (int64_t i = threadIdx.x; i < d; i += CE_THREADS) g[i] = g[i] / sn - to_f<T>(wt[i]);
      } else {
        for (int64_t i = threadIdx.x; i < d; i += CE_THREADS) g[i] = 0.f;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// 6. masked_topk keys: high 32 bits the order-preserving image of the float32 score (NaN largest,
// -0 -> +0), low 32 bits (0xFFFFFFFF - v) so a smaller index wins a tie; the sign bit flipped so that
// signed int64 order equals this unsigned order.

template <typename T>
__global__ void __launch_bounds__(256)
    topk_keys_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ forbidden,
                     const int64_t* __restrict__ current, int64_t L, int64_t V, int64_t* __restrict__ keys) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t l = blockIdx.y; l < L; l += gridDim.y) {
    const int64_t cur = current != nullptr ? current[l] : -1;
    const T* gr = grad + l * V;
    int64_t* kr = keys + l * V;
    for (int64_t v = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; v < V; v += stride) {
      float sc = -to_f<T>(gr[v]);
      if (v == cur || (forbidden != nullptr && forbidden[v] != 0)) sc = -INFINITY;
      // on the bits, so that no floating-point flag can change it
      uint32_t bits = __float_as_uint(sc);
      uint32_t u;
      if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
        u = 0xFFFFFFFFu;  // NaN: above +inf, as in torch.sort
      } else {
        if ((bits & 0x7FFFFFFFu) == 0u) bits = 0u;  // -0 ties with +0
        u = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
      }
      const uint64_t key = ((uint64_t)u << 32) | (uint64_t)(0xFFFFFFFFu - (uint32_t)v);
      kr[v] = (int64_t)(key ^ 0x8000000000000000ull);
    }
  }
}

}  // namespace

// ===================================================================================================
// launchers

template <typename T>
cudaError_t launch_gather_positions(const T* hidden, const int64_t* positions, T* out, int64_t B, int64_t Tn,
                                    int64_t P, int64_t d, cudaStream_t stream) {
  if (B <= 0 || P <= 0 || d <= 0) return cudaSuccess;
  const int64_t rb = d * (int64_t)sizeof(T);
  auto fits = [&](int64_t w) { return rb % w == 0 && aligned(hidden, w) && aligned(out, w); };
  if (fits(16)) return gather_rows<uint4>(hidden, positions, out, B, Tn, P, rb, stream);
  if (fits(8)) return gather_rows<uint2>(hidden, positions, out, B, Tn, P, rb, stream);
  if (fits(4)) return gather_rows<unsigned int>(hidden, positions, out, B, Tn, P, rb, stream);
  return gather_rows<unsigned short>(hidden, positions, out, B, Tn, P, rb, stream);
}

template <typename T>
cudaError_t launch_gather_accumulate_f64(const T* hidden, const int64_t* positions, const int64_t* groups,
                                         double* sums, int64_t* counts, int64_t B, int64_t Tn, int64_t P,
                                         int64_t d, cudaStream_t stream) {
  return gather_accumulate_impl<T, false>(hidden, positions, groups, sums, nullptr, nullptr, counts, B, Tn, P, d,
                                          stream);
}

template <typename T>
cudaError_t launch_gather_accumulate_kahan(const T* hidden, const int64_t* positions, const int64_t* groups,
                                           float* sums, float* comp, int64_t* counts, int64_t B, int64_t Tn,
                                           int64_t P, int64_t d, cudaStream_t stream) {
  return gather_accumulate_impl<T, true>(hidden, positions, groups, nullptr, sums, comp, counts, B, Tn, P, d,
                                         stream);
}

template <typename T>
cudaError_t launch_project_ablate(const T* x, const float* Q, int64_t N, int64_t d, int k, float beta, float alpha,
                                  const float* v, T* out, float* proj, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (k < 1 || k > kMaxBasis) return cudaErrorInvalidValue;
  if (k == 1) return project_ablate_k<T, 1>(x, Q, N, d, k, beta, alpha, v, out, proj, stream);
  if (k <= 4) return project_ablate_k<T, 4>(x, Q, N, d, k, beta, alpha, v, out, proj, stream);
  if (k <= 8) return project_ablate_k<T, 8>(x, Q, N, d, k, beta, alpha, v, out, proj, stream);
  return project_ablate_k<T, 16>(x, Q, N, d, k, beta, alpha, v, out, proj, stream);
}

int64_t orthogonalize_weight_scratch_floats(int64_t d, int64_t m, int k, int residual_dim) {
  if (residual_dim != 0 || d <= 0 || m <= 0) return 0;
  return (ow_slices(d, m) + 1) * (int64_t)k * m;
}

template <typename T>
cudaError_t launch_orthogonalize_weight(const T* W, const float* Q, int64_t rows, int64_t cols, int k,
                                        int residual_dim, T* out, float* scratch, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  if (k < 1 || k > kMaxBasis) return cudaErrorInvalidValue;
  if (residual_dim == 1)  // W [m, d]: each row is a residual vector
    return launch_project_ablate<T>(W, Q, rows, cols, k, 1.f, 0.f, nullptr, out, nullptr, stream);
  if (residual_dim != 0 || scratch == nullptr) return cudaErrorInvalidValue;
  // W [d, m]
  if (k == 1) return orthogonalize_cols_k<T, 1>(W, Q, rows, cols, k, out, scratch, stream);
  if (k <= 4) return orthogonalize_cols_k<T, 4>(W, Q, rows, cols, k, out, scratch, stream);
  if (k <= 8) return orthogonalize_cols_k<T, 8>(W, Q, rows, cols, k, out, scratch, stream);
  return orthogonalize_cols_k<T, 16>(W, Q, rows, cols, k, out, scratch, stream);
}

cudaError_t launch_ce_init(float* m, float* s, float* tlogit, int64_t N, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  const int64_t blocks = min64(ceil_div(N, 256), (int64_t)device_sms() * 8);
  ce_init_kernel<<<(unsigned)blocks, 256, 0, stream>>>(m, s, tlogit, N);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_ce_chunk(const float* z, int64_t N, int64_t c, int64_t start, const int64_t* targets,
                            int64_t ignore_index, float* m, float* s, float* tlogit, float* scale, T* e,
                            cudaStream_t stream) {
  if (N <= 0 || c <= 0) return cudaSuccess;
  const int64_t blocks = min64(N, (int64_t)device_sms() * 16);
  ce_chunk_kernel<T><<<(unsigned)blocks, CE_THREADS, 0, stream>>>(z, N, c, start, targets, ignore_index, m, s,
                                                                   tlogit, scale, e);
  return cudaGetLastError();
}

cudaError_t launch_ce_rescale(float* acc, const float* t, const float* scale, int64_t N, int64_t d, bool first,
                              cudaStream_t stream) {
  if (N <= 0 || d <= 0) return cudaSuccess;
  const int64_t bx = min64(ceil_div(d, 256), 64);
  const int64_t by = min64(N, 65535);
  ce_rescale_kernel<<<dim3((unsigned)bx, (unsigned)by), 256, 0, stream>>>(acc, t, scale, N, d, first);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_ce_finalize(const T* W, int64_t d, const int64_t* targets, int64_t ignore_index, const float* m,
                               const float* s, const float* tlogit, float* loss, float* grad, int64_t N,
                               cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  const int64_t blocks = min64(N, (int64_t)device_sms() * 16);
  ce_finalize_kernel<T><<<(unsigned)blocks, CE_THREADS, 0, stream>>>(W, d, targets, ignore_index, m, s, tlogit,
                                                                      loss, grad, N);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_topk_keys(const T* grad, const uint8_t* forbidden, const int64_t* current, int64_t L, int64_t V,
                             int64_t* keys, cudaStream_t stream) {
  if (L <= 0 || V <= 0) return cudaSuccess;
  if (V > 0xFFFFFFFFll) return cudaErrorInvalidValue;
  const int64_t bx = min64(ceil_div(V, 256), 1024);
  const int64_t by = min64(L, 65535);
  topk_keys_kernel<T><<<dim3((unsigned)bx, (unsigned)by), 256, 0, stream>>>(grad, forbidden, current, L, V, keys);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------------
// explicit instantiations

#define PYSAFEGEOM_INSTANTIATE(T)                                                                                \
  template cudaError_t launch_gather_positions<T>(const T*, const int64_t*, T*, int64_t, int64_t, int64_t,       \
                                                  int64_t, cudaStream_t);                                        \
  template cudaError_t launch_gather_accumulate_f64<T>(const T*, const int64_t*, const int64_t*, double*,        \
                                                       int64_t*, int64_t, int64_t, int64_t, int64_t,             \
                                                       cudaStream_t);                                            \
  template cudaError_t launch_gather_accumulate_kahan<T>(const T*, const int64_t*, const int64_t*, float*,       \
                                                         float*, int64_t*, int64_t, int64_t, int64_t, int64_t,   \
                                                         cudaStream_t);                                          \
  template cudaError_t launch_project_ablate<T>(const T*, const float*, int64_t, int64_t, int, float, float,     \
                                                const float*, T*, float*, cudaStream_t);                         \
  template cudaError_t launch_orthogonalize_weight<T>(const T*, const float*, int64_t, int64_t, int, int, T*,    \
                                                      float*, cudaStream_t);                                     \
  template cudaError_t launch_ce_chunk<T>(const float*, int64_t, int64_t, int64_t, const int64_t*, int64_t,      \
                                          float*, float*, float*, float*, T*, cudaStream_t);                     \
  template cudaError_t launch_ce_finalize<T>(const T*, int64_t, const int64_t*, int64_t, const float*,           \
                                             const float*, const float*, float*, float*, int64_t, cudaStream_t); \
  template cudaError_t launch_topk_keys<T>(const T*, const uint8_t*, const int64_t*, int64_t, int64_t, int64_t*, \
                                           cudaStream_t);

PYSAFEGEOM_INSTANTIATE(float)
PYSAFEGEOM_INSTANTIATE(__half)
PYSAFEGEOM_INSTANTIATE(__nv_bfloat16)

#undef PYSAFEGEOM_INSTANTIATE

}  // namespace cuda
}  // namespace pysafegeom
