// CUDA implementations of the pysafegeom ops (schemas: csrc/ops.cpp; contract and validation:
// pysafegeom/ops/__init__.py; definitions: pysafegeom/ops/reference.py).
//
// Each op re-checks what the kernels rely on (device, dtype, shape, contiguity: the Python dispatcher
// has already validated the values), switches to the tensors' device, and enqueues the launchers of
// kernels.cu on torch's current stream. Scratch memory comes from torch's caching allocator, which
// orders its reuse on that stream. What is not a custom kernel:
//   * chunked_cross_entropy: the two matrix products per vocabulary chunk (z = h W_c^T and, for the
//     gradient, e W_c) are torch mm calls (cuBLAS) with float32 output; the online log-sum-exp, the
//     softmax weights, the gradient rescaling and the final loss/gradient are kernels.
//   * masked_topk: a kernel fuses negation, masking and the tie rule into unique int64 keys; torch.topk
//     on those keys does the selection.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/version.h>

#include "kernels.cuh"

// torch.mm(a, b, out_dtype=torch.float32) for float16/bfloat16 inputs (cuBLAS, float32 output) exists
// from torch 2.8; before that the products run in float32 on upcast copies.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define PYSAFEGEOM_MM_OUT_DTYPE 1
#else
#define PYSAFEGEOM_MM_OUT_DTYPE 0
#endif

namespace pysafegeom {
namespace cuda {
namespace {

using at::Tensor;

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the CUDA element type of `st`.
template <typename F>
void dispatch_float(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::kFloat:
      f(Tag<float>{});
      return;
    case at::kHalf:
      f(Tag<__half>{});
      return;
    case at::kBFloat16:
      f(Tag<__nv_bfloat16>{});
      return;
    default:
      TORCH_CHECK(false, "pysafegeom::", op, " (CUDA): unsupported dtype ", st,
                  "; expected float32, float16 or bfloat16");
  }
}

template <typename T>
const T* cptr(const Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}
template <typename T>
T* mptr(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

void check_tensor(const Tensor& t, const char* op, const char* name, const at::Device& dev) {
  TORCH_CHECK(t.defined(), "pysafegeom::", op, " (CUDA): ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), "pysafegeom::", op, " (CUDA): ", name, " must be a CUDA tensor, got one on ",
              t.device());
  TORCH_CHECK(t.device() == dev, "pysafegeom::", op, " (CUDA): ", name, " is on ", t.device(),
              " but the inputs are on ", dev);
  TORCH_CHECK(t.is_contiguous(), "pysafegeom::", op, " (CUDA): ", name, " must be contiguous");
}

void check_dtype(const Tensor& t, at::ScalarType st, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == st, "pysafegeom::", op, " (CUDA): ", name, " must be ", st, ", got ",
              t.scalar_type());
}

void check_shape(const Tensor& t, at::IntArrayRef shape, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == shape, "pysafegeom::", op, " (CUDA): ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "pysafegeom::", op, " (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

// torch's current stream on the current device (at::cuda::getCurrentCUDAStream is this function; the
// c10 header spares this file the cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h pulls in).
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// --- 1. gather ----------------------------------------------------------------------------------

void gather_positions(const Tensor& hidden, const Tensor& positions, const Tensor& out) {
  const char* op = "gather_positions";
  const at::Device dev = hidden.device();
  check_tensor(hidden, op, "hidden", dev);
  check_tensor(positions, op, "positions", dev);
  check_tensor(out, op, "out", dev);
  TORCH_CHECK(hidden.dim() == 3 && positions.dim() == 2 && positions.size(0) == hidden.size(0),
              "pysafegeom::", op, " (CUDA): expected hidden [B, T, d] and positions [B, P]");
  check_dtype(positions, at::kLong, op, "positions");
  check_dtype(out, hidden.scalar_type(), op, "out");
  const int64_t B = hidden.size(0), Tn = hidden.size(1), d = hidden.size(2), P = positions.size(1);
  check_shape(out, {B, P, d}, op, "out");
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = current_stream();
  dispatch_float(hidden.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(launch_gather_positions<T>(cptr<T>(hidden), cptr<int64_t>(positions), mptr<T>(out), B, Tn, P, d,
                                            stream),
                 op);
  });
}

void gather_accumulate(const Tensor& hidden, const Tensor& positions, const Tensor& groups, const Tensor& sums,
                       const Tensor& counts, const std::optional<Tensor>& comp) {
  const char* op = "gather_accumulate";
  const at::Device dev = hidden.device();
  check_tensor(hidden, op, "hidden", dev);
  check_tensor(positions, op, "positions", dev);
  check_tensor(groups, op, "groups", dev);
  check_tensor(sums, op, "sums", dev);
  check_tensor(counts, op, "counts", dev);
  TORCH_CHECK(hidden.dim() == 3 && positions.dim() == 2 && positions.size(0) == hidden.size(0),
              "pysafegeom::", op, " (CUDA): expected hidden [B, T, d] and positions [B, P]");
  check_dtype(positions, at::kLong, op, "positions");
  check_dtype(groups, at::kLong, op, "groups");
  check_dtype(counts, at::kLong, op, "counts");
  const int64_t B = hidden.size(0), Tn = hidden.size(1), d = hidden.size(2), P = positions.size(1);
  TORCH_CHECK(sums.dim() == 3 && sums.size(1) == P && sums.size(2) == d, "pysafegeom::", op,
              " (CUDA): sums must have shape [G, P, d]");
  const int64_t G = sums.size(0);
  check_shape(groups, {B}, op, "groups");
  check_shape(counts, {G}, op, "counts");
  const bool kahan = sums.scalar_type() == at::kFloat;
  const bool has_comp = comp.has_value() && comp->defined();
  if (kahan) {
    TORCH_CHECK(has_comp, "pysafegeom::", op, " (CUDA): float32 sums need comp (Kahan compensation)");
    check_tensor(*comp, op, "comp", dev);
    check_dtype(*comp, at::kFloat, op, "comp");
    check_shape(*comp, sums.sizes(), op, "comp");
  } else {
    check_dtype(sums, at::kDouble, op, "sums");
    TORCH_CHECK(!has_comp, "pysafegeom::", op, " (CUDA): comp is only used with float32 sums");
  }
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = current_stream();
  dispatch_float(hidden.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    cudaError_t err;
    if (kahan) {
      err = launch_gather_accumulate_kahan<T>(cptr<T>(hidden), cptr<int64_t>(positions), cptr<int64_t>(groups),
                                              mptr<float>(sums), mptr<float>(*comp), mptr<int64_t>(counts), B, Tn,
                                              P, d, stream);
    } else {
      err = launch_gather_accumulate_f64<T>(cptr<T>(hidden), cptr<int64_t>(positions), cptr<int64_t>(groups),
                                            mptr<double>(sums), mptr<int64_t>(counts), B, Tn, P, d, stream);
    }
    check_launch(err, op);
  });
}

// --- 2. projection, ablation, weight orthogonalisation ------------------------------------------

void check_basis(const Tensor& Q, int64_t d, const char* op, const at::Device& dev) {
  check_tensor(Q, op, "Q", dev);
  check_dtype(Q, at::kFloat, op, "Q");
  TORCH_CHECK(Q.dim() == 2 && Q.size(0) == d && Q.size(1) >= 1 && Q.size(1) <= kMaxBasis, "pysafegeom::", op,
              " (CUDA): Q must have shape [d, k] with d = ", d, " and 1 <= k <= ", kMaxBasis, ", got ", Q.sizes());
}

void project_ablate(const Tensor& x, const Tensor& Q, double beta, double alpha, const std::optional<Tensor>& v,
                    const Tensor& out, const std::optional<Tensor>& proj) {
  const char* op = "project_ablate";
  const at::Device dev = x.device();
  check_tensor(x, op, "x", dev);
  check_tensor(out, op, "out", dev);
  TORCH_CHECK(x.dim() == 2, "pysafegeom::", op, " (CUDA): x must have shape [N, d], got ", x.sizes());
  const int64_t N = x.size(0), d = x.size(1);
  check_basis(Q, d, op, dev);
  const int k = static_cast<int>(Q.size(1));
  check_dtype(out, x.scalar_type(), op, "out");
  check_shape(out, x.sizes(), op, "out");
  const bool has_v = v.has_value() && v->defined();
  if (has_v) {
    check_tensor(*v, op, "v", dev);
    check_dtype(*v, at::kFloat, op, "v");
    check_shape(*v, {d}, op, "v");
  }
  const bool has_proj = proj.has_value() && proj->defined();
  if (has_proj) {
    check_tensor(*proj, op, "proj", dev);
    check_dtype(*proj, at::kFloat, op, "proj");
    check_shape(*proj, {N, static_cast<int64_t>(k)}, op, "proj");
  }
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = current_stream();
  dispatch_float(x.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    // out may be x itself: the kernel finishes a row's projections before writing the row.
    check_launch(launch_project_ablate<T>(cptr<T>(x), cptr<float>(Q), N, d, k, static_cast<float>(beta),
                                          static_cast<float>(alpha), has_v ? cptr<float>(*v) : nullptr, mptr<T>(out),
                                          has_proj ? mptr<float>(*proj) : nullptr, stream),
                 op);
  });
}

void orthogonalize_weight(const Tensor& W, const Tensor& Q, int64_t residual_dim, const Tensor& out) {
  const char* op = "orthogonalize_weight";
  const at::Device dev = W.device();
  check_tensor(W, op, "W", dev);
  check_tensor(out, op, "out", dev);
  TORCH_CHECK(W.dim() == 2, "pysafegeom::", op, " (CUDA): W must be a matrix, got ", W.sizes());
  TORCH_CHECK(residual_dim == 0 || residual_dim == 1, "pysafegeom::", op, " (CUDA): residual_dim must be 0 or 1");
  check_dtype(out, W.scalar_type(), op, "out");
  check_shape(out, W.sizes(), op, "out");
  const int64_t rows = W.size(0), cols = W.size(1);
  check_basis(Q, W.size(residual_dim), op, dev);
  const int k = static_cast<int>(Q.size(1));
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = current_stream();
  const int64_t n_scratch = orthogonalize_weight_scratch_floats(rows, cols, k, static_cast<int>(residual_dim));
  Tensor scratch;
  if (n_scratch > 0) scratch = at::empty({n_scratch}, W.options().dtype(at::kFloat));
  dispatch_float(W.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    // out may be W itself: residual_dim 0 reduces all of W before the update kernel runs; residual_dim 1
    // finishes each row's projections before writing the row.
    check_launch(launch_orthogonalize_weight<T>(cptr<T>(W), cptr<float>(Q), rows, cols, k,
                                                static_cast<int>(residual_dim), mptr<T>(out),
                                                n_scratch > 0 ? mptr<float>(scratch) : nullptr, stream),
                 op);
  });
}

// --- 3. chunked cross-entropy and masked top-k ---------------------------------------------------

// a [n, r] @ b [r, q] -> float32 [n, q], contiguous; a and b share one dtype (b may be a transposed view).
Tensor mm_f32(const Tensor& a, const Tensor& b) {
  if (a.scalar_type() == at::kFloat) return at::mm(a, b).contiguous();
#if PYSAFEGEOM_MM_OUT_DTYPE
  return at::mm(a, b, at::kFloat).contiguous();
#else
  return at::mm(a.to(at::kFloat), b.to(at::kFloat)).contiguous();
#endif
}

void chunked_cross_entropy(const Tensor& h, const Tensor& W, const Tensor& targets, int64_t chunk_size,
                           int64_t ignore_index, const Tensor& loss, const std::optional<Tensor>& grad) {
  const char* op = "chunked_cross_entropy";
  const at::Device dev = h.device();
  check_tensor(h, op, "h", dev);
  check_tensor(W, op, "W", dev);
  check_tensor(targets, op, "targets", dev);
  check_tensor(loss, op, "loss", dev);
  TORCH_CHECK(h.dim() == 2 && W.dim() == 2 && W.size(1) == h.size(1), "pysafegeom::", op,
              " (CUDA): expected h [N, d] and W [V, d]");
  check_dtype(W, h.scalar_type(), op, "W");
  check_dtype(targets, at::kLong, op, "targets");
  check_dtype(loss, at::kFloat, op, "loss");
  TORCH_CHECK(chunk_size >= 1, "pysafegeom::", op, " (CUDA): chunk_size must be positive");
  const int64_t N = h.size(0), d = h.size(1), V = W.size(0);
  check_shape(targets, {N}, op, "targets");
  check_shape(loss, {N}, op, "loss");
  const bool want_grad = grad.has_value() && grad->defined();
  if (want_grad) {
    check_tensor(*grad, op, "grad", dev);
    check_dtype(*grad, at::kFloat, op, "grad");
    check_shape(*grad, {N, d}, op, "grad");
  }
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = current_stream();
  if (N == 0) return;

  const auto f32 = h.options().dtype(at::kFloat);
  Tensor m = at::empty({N}, f32), s = at::empty({N}, f32), tl = at::empty({N}, f32);
  Tensor scale = want_grad ? at::empty({N}, f32) : Tensor();
  check_launch(launch_ce_init(mptr<float>(m), mptr<float>(s), mptr<float>(tl), N, stream), op);

  // The softmax weights e of a chunk feed e @ W_c. In float32 (or when torch lacks mm's out_dtype) they
  // overwrite the logits in place and the product runs in float32; otherwise they are written in h's
  // dtype (values in [0, 1]) and the product runs on the tensor cores with float32 output.
  const bool f32_path = h.scalar_type() == at::kFloat || !PYSAFEGEOM_MM_OUT_DTYPE;
  const Tensor hm = f32_path ? h.to(at::kFloat) : h;  // no copy for float32

  dispatch_float(h.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    for (int64_t start = 0; start < V; start += chunk_size) {
      const int64_t c = std::min(chunk_size, V - start);
      const Tensor Wc_in = W.narrow(0, start, c);  // rows of a contiguous matrix: contiguous
      const Tensor Wc = f32_path ? Wc_in.to(at::kFloat) : Wc_in;
      const Tensor z = mm_f32(hm, Wc.t());  // [N, c] float32 logits of this chunk
      if (!want_grad) {
        check_launch(launch_ce_chunk<float>(cptr<float>(z), N, c, start, cptr<int64_t>(targets), ignore_index,
                                            mptr<float>(m), mptr<float>(s), mptr<float>(tl), nullptr, nullptr,
                                            stream),
                     op);
        continue;
      }
      cudaError_t err;
      Tensor e;
      if (f32_path) {
        e = z;  // in place
        err = launch_ce_chunk<float>(cptr<float>(z), N, c, start, cptr<int64_t>(targets), ignore_index,
                                     mptr<float>(m), mptr<float>(s), mptr<float>(tl), mptr<float>(scale),
                                     mptr<float>(z), stream);
      } else {
        e = at::empty({N, c}, h.options());
        err = launch_ce_chunk<T>(cptr<float>(z), N, c, start, cptr<int64_t>(targets), ignore_index, mptr<float>(m),
                                 mptr<float>(s), mptr<float>(tl), mptr<float>(scale), mptr<T>(e), stream);
      }
      check_launch(err, op);
      const Tensor t = mm_f32(e, Wc);  // [N, d] float32: this chunk's softmax-weighted sum of W rows
      check_launch(launch_ce_rescale(mptr<float>(*grad), cptr<float>(t), cptr<float>(scale), N, d, start == 0, stream),
                   op);
    }
    check_launch(launch_ce_finalize<T>(cptr<T>(W), d, cptr<int64_t>(targets), ignore_index, cptr<float>(m),
                                       cptr<float>(s), cptr<float>(tl), mptr<float>(loss),
                                       want_grad ? mptr<float>(*grad) : nullptr, N, stream),
                 op);
  });
}

Tensor masked_topk(const Tensor& grad, int64_t k, const std::optional<Tensor>& forbidden,
                   const std::optional<Tensor>& current) {
  const char* op = "masked_topk";
  const at::Device dev = grad.device();
  check_tensor(grad, op, "grad", dev);
  TORCH_CHECK(grad.dim() == 2, "pysafegeom::", op, " (CUDA): grad must have shape [L, V], got ", grad.sizes());
  const int64_t L = grad.size(0), V = grad.size(1);
  TORCH_CHECK(k >= 1 && k <= V, "pysafegeom::", op, " (CUDA): k must lie in [1, V] = [1, ", V, "], got ", k);
  TORCH_CHECK(V <= 0xFFFFFFFFll, "pysafegeom::", op, " (CUDA): V must be below 2^32");
  const bool has_f = forbidden.has_value() && forbidden->defined();
  const bool has_c = current.has_value() && current->defined();
  if (has_f) {
    check_tensor(*forbidden, op, "forbidden", dev);
    check_dtype(*forbidden, at::kBool, op, "forbidden");
    check_shape(*forbidden, {V}, op, "forbidden");
  }
  if (has_c) {
    check_tensor(*current, op, "current", dev);
    check_dtype(*current, at::kLong, op, "current");
    check_shape(*current, {L}, op, "current");
  }
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = current_stream();
  Tensor keys = at::empty({L, V}, grad.options().dtype(at::kLong));
  dispatch_float(grad.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(launch_topk_keys<T>(cptr<T>(grad), has_f ? cptr<uint8_t>(*forbidden) : nullptr,
                                     has_c ? cptr<int64_t>(*current) : nullptr, L, V, mptr<int64_t>(keys), stream),
                 op);
  });
  // Keys are unique per row, so the k largest, sorted, are exactly the reference's order.
  return std::get<1>(at::topk(keys, k, /*dim=*/1, /*largest=*/true, /*sorted=*/true)).contiguous();
}

}  // namespace
}  // namespace cuda
}  // namespace pysafegeom

TORCH_LIBRARY_IMPL(pysafegeom, CUDA, m) {
  m.impl("gather_positions", &pysafegeom::cuda::gather_positions);
  m.impl("gather_accumulate", &pysafegeom::cuda::gather_accumulate);
  m.impl("project_ablate", &pysafegeom::cuda::project_ablate);
  m.impl("orthogonalize_weight", &pysafegeom::cuda::orthogonalize_weight);
  m.impl("chunked_cross_entropy", &pysafegeom::cuda::chunked_cross_entropy);
  m.impl("masked_topk", &pysafegeom::cuda::masked_topk);
}
