// CPU kernels of pysafegeom's ops (definitions: pysafegeom/ops/reference.py; contract:
// pysafegeom/ops/__init__.py). Inputs arrive validated and contiguous, Q and v float32, outputs
// pre-allocated. Rows run in parallel with at::parallel_for; float32/float16/bfloat16 inputs are widened
// to float32 per row and the float32 inner loops are written so that the compiler vectorises them
// (fixed-width lane accumulators instead of scalar reductions, which it may not reorder), and cloned
// for AVX2/FMA and AVX-512 with a run-time choice, so the library stays portable.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/rowmath.h"

namespace pysafegeom {
namespace cpu {
namespace {

using at::Tensor;

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename T>
inline void from_float(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
// 16-bit types: the vectorised bit-level conversions of rowmath.cpp (same rounding as c10).
template <>
inline void to_float<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  bf16_to_float(reinterpret_cast<const uint16_t*>(src), dst, n);
}
template <>
inline void from_float<c10::BFloat16>(const float* src, c10::BFloat16* dst, int64_t n) {
  float_to_bf16(src, reinterpret_cast<uint16_t*>(dst), n);
}
template <>
inline void to_float<c10::Half>(const c10::Half* src, float* dst, int64_t n) {
  half_to_float(reinterpret_cast<const uint16_t*>(src), dst, n);
}
template <>
inline void from_float<c10::Half>(const float* src, c10::Half* dst, int64_t n) {
  float_to_half(src, reinterpret_cast<uint16_t*>(dst), n);
}

// Rows of a float32 view of a [n, d] tensor of type T: the row itself for float, else a widened copy.
template <typename T>
struct RowReader {
  std::vector<float> buf;
  explicit RowReader(int64_t d) : buf(std::is_same<T, float>::value ? 0 : d) {}
  const float* operator()(const T* row, int64_t d) {
    if constexpr (std::is_same<T, float>::value) {
      return row;
    } else {
      to_float(row, buf.data(), d);
      return buf.data();
    }
  }
};

// Calls f(T{}) for the input dtype T in {float, Half, BFloat16}; f is a generic lambda
// `[&](auto tag) { using scalar_t = decltype(tag); ... }`, so `if constexpr` branches compile per type.
template <typename F>
void dispatch_float(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "pysafegeom.", op, ": unsupported dtype ", t);
  }
}
#define PSG_DISPATCH(dtype, name, body) dispatch_float(dtype, name, [&](auto tag_) { \
    using scalar_t = decltype(tag_);                                                    \
    body();                                                                              \
  })

// --- 1. gather and streaming statistics ----------------------------------------------------------

void gather_positions(const Tensor& hidden, const Tensor& positions, const Tensor& out) {
  const int64_t B = hidden.size(0), T = hidden.size(1), d = hidden.size(2), P = positions.size(1);
  const int64_t bytes = d * hidden.element_size();
  const char* src = static_cast<const char*>(hidden.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* pos = positions.data_ptr<int64_t>();
  at::parallel_for(0, B * P, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(bytes, 1)),
                   [&](int64_t r0, int64_t r1) {
                     for (int64_t r = r0; r < r1; ++r) {
                       const int64_t b = r / P;
                       std::memcpy(dst + r * bytes, src + (b * T + pos[r]) * bytes, bytes);
                     }
                   });
}

// Deterministic: each task owns a (p, d-chunk) of every group's sums and adds rows in increasing b,
// exactly the reference's order (index_add_ for float64, the Kahan loop for float32).
void gather_accumulate(const Tensor& hidden, const Tensor& positions, const Tensor& groups,
                       const Tensor& sums, const Tensor& counts, const std::optional<Tensor>& comp) {
  const int64_t B = hidden.size(0), T = hidden.size(1), d = hidden.size(2), P = positions.size(1);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* grp = groups.data_ptr<int64_t>();
  constexpr int64_t CH = 512;
  const int64_t nchunk = (d + CH - 1) / CH;
  const bool kahan = sums.scalar_type() == at::kFloat;
  PSG_DISPATCH(hidden.scalar_type(), "gather_accumulate", [&] {
    const scalar_t* h = hidden.data_ptr<scalar_t>();
    at::parallel_for(0, P * nchunk, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p = t / nchunk, c0 = (t % nchunk) * CH, n = std::min(CH, d - c0);
        if (kahan) {
          float* S = sums.data_ptr<float>();
          float* C = comp->data_ptr<float>();
          for (int64_t b = 0; b < B; ++b) {
            const scalar_t* x = h + (b * T + pos[b * P + p]) * d + c0;
            float* s = S + (grp[b] * P + p) * d + c0;
            float* c = C + (grp[b] * P + p) * d + c0;
            if constexpr (std::is_same<scalar_t, float>::value) {
              kahan_add_f32(x, s, c, n);
            } else {
              float xb[CH];
              to_float(x, xb, n);
              kahan_add_f32(xb, s, c, n);
            }
          }
        } else {
          double* S = sums.data_ptr<double>();
          for (int64_t b = 0; b < B; ++b) {
            const scalar_t* x = h + (b * T + pos[b * P + p]) * d + c0;
            double* s = S + (grp[b] * P + p) * d + c0;
            for (int64_t i = 0; i < n; ++i) s[i] += static_cast<double>(static_cast<float>(x[i]));
          }
        }
      }
    });
  });
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) cnt[grp[b]] += 1;
}

// --- 2. projection, ablation, weight orthogonalisation ---------------------------------------------

// out[n] = x[n] - beta * Q (Q^T x[n]) + alpha * v for rows of x [N, d]; out may be x itself.
template <typename T>
void project_rows(const T* x, const float* QT, int64_t N, int64_t d, int64_t k, float beta,
                  const float* av, T* out, float* proj) {
  // ~64k multiply-adds per task: a decode step (a few rows) stays on the calling thread, since a parallel
  // region costs more than the work there (and much more on a loaded machine)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(d * std::max<int64_t>(k, 1), 1));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    RowReader<T> read(d);
    std::vector<float> obuf(std::is_same<T, float>::value ? 0 : d);
    float p[kMaxK], bp[kMaxK];
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = read(x + r * d, d);
      dot_k(xr, QT, d, k, p);  // reads the whole row before anything is written
      for (int64_t j = 0; j < k; ++j) bp[j] = beta * p[j];
      if (proj) std::memcpy(proj + r * k, p, k * sizeof(float));
      float* o;
      if constexpr (std::is_same<T, float>::value) {
        o = out + r * d;
      } else {
        o = obuf.data();
      }
      subtract_k(xr, QT, bp, d, k, av, o);
      if constexpr (!std::is_same<T, float>::value) from_float(o, out + r * d, d);
    }
  });
}

Tensor transpose_basis(const Tensor& Q) { return Q.t().contiguous(); }  // [k, d]

void project_ablate(const Tensor& x, const Tensor& Q, double beta, double alpha, const std::optional<Tensor>& v,
                    const Tensor& out, const std::optional<Tensor>& proj) {
  const int64_t d = x.size(-1), N = x.numel() / std::max<int64_t>(d, 1), k = Q.size(1);
  TORCH_CHECK(k <= kMaxK, "pysafegeom: at most ", kMaxK, " basis vectors");
  Tensor QT = transpose_basis(Q);
  Tensor av;
  if (v.has_value() && v->defined() && alpha != 0.0) av = v->mul(alpha).contiguous();
  float* pj = (proj.has_value() && proj->defined()) ? proj->data_ptr<float>() : nullptr;
  PSG_DISPATCH(x.scalar_type(), "project_ablate", [&] {
    project_rows<scalar_t>(x.data_ptr<scalar_t>(), QT.data_ptr<float>(), N, d, k, static_cast<float>(beta),
                           av.defined() ? av.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(), pj);
  });
}

// residual_dim=0: W [d, m] -> W - Q (Q^T W). Each task owns a block of columns: it first reduces
// Q^T W over all d rows (float64 accumulators), then writes its block, so out may be W itself.
template <typename T>
void orthogonalize_columns(const T* W, const float* Q, int64_t d, int64_t m, int64_t k, T* out) {
  constexpr int64_t CW = 256;
  const int64_t nblk = (m + CW - 1) / CW;
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> C(kMaxK * CW);
    std::vector<float> Cf(kMaxK * CW), wbuf(CW), obuf(CW);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t c0 = blk * CW, n = std::min(CW, m - c0);
      std::fill(C.begin(), C.end(), 0.0);
      for (int64_t i = 0; i < d; ++i) {
        to_float(W + i * m + c0, wbuf.data(), n);
        column_accumulate(wbuf.data(), Q + i * k, k, n, CW, C.data());
      }
      for (int64_t j = 0; j < k * CW; ++j) Cf[j] = static_cast<float>(C[j]);
      for (int64_t i = 0; i < d; ++i) {
        to_float(W + i * m + c0, wbuf.data(), n);
        column_subtract(wbuf.data(), Q + i * k, Cf.data(), k, n, CW, obuf.data());
        from_float(obuf.data(), out + i * m + c0, n);
      }
    }
  });
}

void orthogonalize_weight(const Tensor& W, const Tensor& Q, int64_t residual_dim, const Tensor& out) {
  const int64_t k = Q.size(1);
  TORCH_CHECK(k <= kMaxK, "pysafegeom: at most ", kMaxK, " basis vectors");
  TORCH_CHECK(residual_dim == 0 || residual_dim == 1, "pysafegeom: residual_dim must be 0 or 1");
  PSG_DISPATCH(W.scalar_type(), "orthogonalize_weight", [&] {
    if (residual_dim == 1) {
      Tensor QT = transpose_basis(Q);
      project_rows<scalar_t>(W.data_ptr<scalar_t>(), QT.data_ptr<float>(), W.size(0), W.size(1), k, 1.0f,
                             nullptr, out.data_ptr<scalar_t>(), nullptr);
    } else {
      orthogonalize_columns<scalar_t>(W.data_ptr<scalar_t>(), Q.data_ptr<float>(), W.size(0), W.size(1), k,
                                      out.data_ptr<scalar_t>());
    }
  });
}

// --- 3. chunked cross-entropy and masked top-k ----------------------------------------------------

// Online log-sum-exp over vocabulary tiles: per tile one [N, c] float32 logit block (ATen's GEMM),
// a fused per-row pass (max, rescale, exp, sum) and, for the gradient, acc = acc * scale + e @ W_c.
// Extra memory: the N x c logits, where c <= chunk_size (shorter for wide rows); a float16/bfloat16 W is widened
// a tile at a time into a [c', d] float32 buffer, with c' <= c chosen so that buffer stays about the
// size of the logits (c' * d ~ N * c), so the peak stays ~2 N * chunk_size floats.
void chunked_cross_entropy(const Tensor& h, const Tensor& W, const Tensor& targets, int64_t chunk_size,
                           int64_t ignore_index, const Tensor& loss, const std::optional<Tensor>& grad) {
  const int64_t N = h.size(0), d = h.size(1), V = W.size(0);
  int64_t c = std::max<int64_t>(1, std::min(chunk_size, V));
  const bool widen = W.scalar_type() != at::kFloat;
  // GEMM tiles of W beyond ~32 MB run slower (measured: N=64, d=4096), so wide rows get shorter tiles.
  c = std::min(c, std::max<int64_t>(256, (int64_t{1} << 23) / std::max<int64_t>(d, 1)));
  if (widen) c = std::min(c, std::max<int64_t>(256, N * c / std::max<int64_t>(d, 1)));
  const bool want_grad = grad.has_value() && grad->defined();
  Tensor hf = h.scalar_type() == at::kFloat ? h : h.to(at::kFloat);
  const float* H = hf.data_ptr<float>();
  const int64_t* tg = targets.data_ptr<int64_t>();
  std::vector<float> m(N, -std::numeric_limits<float>::infinity()), s(N, 0.0f), tlogit(N, 0.0f), scale(N);
  Tensor zbuf = at::empty({N * c}, hf.options());
  Tensor wbuf = widen ? at::empty({c * d}, hf.options()) : Tensor();
  Tensor acc;
  if (want_grad) {
    acc = *grad;  // the gradient buffer doubles as the running softmax-weighted sum of W rows
    acc.zero_();
  }
  // target logits, from the target rows of W
  PSG_DISPATCH(W.scalar_type(), "chunked_ce_target", [&] {
    const scalar_t* w = W.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
      RowReader<scalar_t> read(d);
      for (int64_t r = r0; r < r1; ++r) {
        if (tg[r] == ignore_index) continue;
        float p;
        dot_k(H + r * d, read(w + tg[r] * d, d), d, 1, &p);
        tlogit[r] = p;
      }
    });
  });
  for (int64_t v0 = 0; v0 < V; v0 += c) {
    const int64_t cs = std::min(c, V - v0);
    Tensor Wc = W.narrow(0, v0, cs);
    if (widen) Wc = wbuf.narrow(0, 0, cs * d).view({cs, d}).copy_(Wc);
    Tensor z = zbuf.narrow(0, 0, N * cs).view({N, cs});
    at::mm_out(z, hf, Wc.t());
    float* Z = z.data_ptr<float>();
    at::parallel_for(0, N, std::max<int64_t>(1, 4096 / cs), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* zr = Z + r * cs;
        const float m_new = std::max(m[r], row_max(zr, cs));
        scale[r] = std::exp(m[r] - m_new);  // 0 on the first tile (m = -inf)
        s[r] = s[r] * scale[r] + exp_shift_sum(zr, cs, m_new);  // zr <- exp(zr - m_new)
        m[r] = m_new;
      }
    });
    if (want_grad) {
      float* A = acc.data_ptr<float>();
      at::parallel_for(0, N, std::max<int64_t>(1, 4096 / d), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          if (scale[r] != 1.0f) scale_row(A + r * d, d, scale[r]);
        }
      });
      acc.addmm_(z, Wc);
    }
  }
  float* L = loss.data_ptr<float>();
  for (int64_t r = 0; r < N; ++r) L[r] = tg[r] == ignore_index ? 0.0f : (m[r] + std::log(s[r])) - tlogit[r];
  if (want_grad) {
    float* A = acc.data_ptr<float>();
    PSG_DISPATCH(W.scalar_type(), "chunked_ce_grad", [&] {
      const scalar_t* w = W.data_ptr<scalar_t>();
      at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
        RowReader<scalar_t> read(d);
        for (int64_t r = r0; r < r1; ++r) {
          float* a = A + r * d;
          if (tg[r] == ignore_index) {
            std::fill(a, a + d, 0.0f);
            continue;
          }
          finish_grad_row(a, read(w + tg[r] * d, d), d, s[r]);  // a <- a / s - W[t]
        }
      });
    });
  }
}

// Top-k of -grad per row, skipping forbidden ids and the row's current id; order: value descending,
// then index ascending (NaN first, as torch.sort puts it).
struct Cand {
  float v;
  int64_t i;
};
inline bool cand_before(const Cand& a, const Cand& b) {
  const bool an = std::isnan(a.v), bn = std::isnan(b.v);
  if (an || bn) return an && bn ? a.i < b.i : an;
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

Tensor masked_topk(const Tensor& grad, int64_t k, const std::optional<Tensor>& forbidden,
                   const std::optional<Tensor>& current) {
  const int64_t L = grad.size(0), V = grad.size(1);
  Tensor out = at::empty({L, k}, grad.options().dtype(at::kLong));
  const bool* fb = (forbidden.has_value() && forbidden->defined()) ? forbidden->data_ptr<bool>() : nullptr;
  const int64_t* cur = (current.has_value() && current->defined()) ? current->data_ptr<int64_t>() : nullptr;
  int64_t* o = out.data_ptr<int64_t>();
  PSG_DISPATCH(grad.scalar_type(), "masked_topk", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, L, 1, [&](int64_t r0, int64_t r1) {
      std::vector<Cand> c;
      c.reserve(V);
      for (int64_t r = r0; r < r1; ++r) {
        c.clear();
        const scalar_t* gr = g + r * V;
        const int64_t skip = cur ? cur[r] : -1;
        for (int64_t i = 0; i < V; ++i) {
          if ((fb && fb[i]) || i == skip) continue;
          c.push_back({-static_cast<float>(gr[i]), i});
        }
        const int64_t kk = std::min<int64_t>(k, static_cast<int64_t>(c.size()));
        if (kk < static_cast<int64_t>(c.size())) std::nth_element(c.begin(), c.begin() + kk, c.end(), cand_before);
        std::sort(c.begin(), c.begin() + kk, cand_before);
        for (int64_t j = 0; j < kk; ++j) o[r * k + j] = c[j].i;
        for (int64_t j = kk; j < k; ++j) o[r * k + j] = -1;  // unreachable after validation
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace pysafegeom

TORCH_LIBRARY_IMPL(pysafegeom, CPU, m) {
  m.impl("gather_positions", &pysafegeom::cpu::gather_positions);
  m.impl("gather_accumulate", &pysafegeom::cpu::gather_accumulate);
  m.impl("project_ablate", &pysafegeom::cpu::project_ablate);
  m.impl("orthogonalize_weight", &pysafegeom::cpu::orthogonalize_weight);
  m.impl("chunked_cross_entropy", &pysafegeom::cpu::chunked_cross_entropy);
  m.impl("masked_topk", &pysafegeom::cpu::masked_topk);
}
