// The op schema of pysafegeom's compiled kernels: one op per backend-contract function of
// pysafegeom/ops/__init__.py. Outputs are allocated by the Python dispatcher and passed in as mutable
// arguments. `out` may be the same tensor as `x` (project_ablate) or `W` (orthogonalize_weight): the
// kernels compute each row's (or column block's) projections before writing it, and eager dispatch
// does not check alias sets, so in-place calls pass the tensor twice.
//
// CPU kernels: csrc/cpu/kernels.cpp (TORCH_LIBRARY_IMPL(pysafegeom, CPU, m)).
// CUDA kernels: csrc/cuda/bindings.cpp (TORCH_LIBRARY_IMPL(pysafegeom, CUDA, m)), compiled only when
// PYSAFEGEOM_WITH_CUDA is set by CMake.
#include <string>

#include <torch/library.h>

namespace {

std::string build_info() {
  std::string info = "cpu";
#ifdef PYSAFEGEOM_WITH_OPENMP
  info += " (openmp)";
#endif
#ifdef PYSAFEGEOM_WITH_CUDA
  info += "+cuda sm_";
  std::string arch = PYSAFEGEOM_CUDA_ARCH_STR;
  for (char& c : arch) {
    if (c == ';') c = ',';
  }
  info += arch;
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(pysafegeom, m) {
  m.def("gather_positions(Tensor hidden, Tensor positions, Tensor(a!) out) -> ()");
  m.def(
      "gather_accumulate(Tensor hidden, Tensor positions, Tensor groups, Tensor(a!) sums, "
      "Tensor(b!) counts, Tensor(c!)? comp) -> ()");
  m.def(
      "project_ablate(Tensor x, Tensor Q, float beta, float alpha, Tensor? v, Tensor(a!) out, "
      "Tensor(b!)? proj) -> ()");
  m.def("orthogonalize_weight(Tensor W, Tensor Q, int residual_dim, Tensor(a!) out) -> ()");
  m.def(
      "chunked_cross_entropy(Tensor h, Tensor W, Tensor targets, int chunk_size, int ignore_index, "
      "Tensor(a!) loss, Tensor(b!)? grad) -> ()");
  m.def("masked_topk(Tensor grad, int k, Tensor? forbidden, Tensor? current) -> Tensor");
  m.def("build_info() -> str", &build_info);
}
