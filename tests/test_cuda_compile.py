"""The CUDA kernels compile for Hopper (sm_90) wherever nvcc is, GPU or not.

csrc/cuda/kernels.cu is plain CUDA (no torch headers), so it compiles on its own; the extension build
compiles it only when torch is a CUDA build too, so without this test a CPU-only machine would never
compile it. csrc/cuda/bindings.cpp needs a CUDA build of torch and is compiled by the extension build
on a GPU machine (bench/gpu_check.sh). Skipped when nvcc is not on PATH.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.nvcc

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc")


def _run(cmd: list[str], what: str) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} timed out after 300 s: {' '.join(cmd)}")
    if res.returncode != 0:
        pytest.fail(f"{what} failed (exit {res.returncode}): {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_kernels_compile_for_sm90(tmp_path):
    obj = tmp_path / "kernels.o"
    _run([NVCC, "-arch=sm_90", "-std=c++17", "-c", str(CUDA_DIR / "kernels.cu"), "-o", str(obj)],
         "nvcc -arch=sm_90 kernels.cu")
    assert obj.stat().st_size > 0


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_kernel_header_is_plain_cpp(tmp_path):
    """kernels.cuh is included by bindings.cpp, which the host C++ compiler (not nvcc) builds."""
    src = tmp_path / "uses_header.cpp"
    src.write_text(
        '#include "kernels.cuh"\n'
        "cudaError_t f(const __nv_bfloat16* x, const float* Q, __nv_bfloat16* out, cudaStream_t s) {\n"
        "  return pysafegeom::cuda::launch_project_ablate<__nv_bfloat16>(x, Q, 1, 8, 1, 1.f, 0.f, nullptr, out,\n"
        "                                                              nullptr, s);\n"
        "}\n"
    )
    _run([NVCC, "-x", "c++", "-std=c++17", "-I", str(CUDA_DIR), "-c", str(src), "-o", str(tmp_path / "u.o")],
         "host C++ compile of a file including kernels.cuh")
