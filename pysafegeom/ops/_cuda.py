"""CUDA backend: the kernels of ``csrc/cuda`` in the compiled extension (``pysafegeom/_C.so``).

Each function follows the backend contract of :mod:`pysafegeom.ops` (validated contiguous inputs on one
GPU, Q and v float32, outputs pre-allocated) and calls the matching ``torch.ops.pysafegeom`` op, whose
CUDA kernel is registered by ``csrc/cuda/bindings.cpp``. What runs where:

* ``gather_positions``, ``gather_accumulate``, ``project_ablate``, ``orthogonalize_weight``: custom
  kernels only (deterministic; the accumulation follows the reference's row order exactly).
* ``chunked_cross_entropy``: per vocabulary chunk, the logits ``h W_c^T`` and the gradient's ``e W_c`` are
  cuBLAS products (torch ``mm`` with float32 output); the online log-sum-exp, the softmax weights, the
  rescaling and the final loss/gradient are kernels. ``[N, V]`` is never materialised.
* ``masked_topk``: a kernel fuses negation, masking (forbidden ids, current ids) and the tie rule into
  unique int64 keys; ``torch.topk`` on the keys selects, in exactly the reference's order.
"""

from __future__ import annotations

import re

import torch

from . import _ext

DEVICES = ("cuda",)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_OPS = ("gather_positions", "gather_accumulate", "project_ablate", "orthogonalize_weight",
        "chunked_cross_entropy", "masked_topk")


def _built_archs(info: str) -> list[int]:
    """Compute capabilities (e.g. [90]) named in build_info ('cpu (openmp)+cuda sm_90' or 'sm_80,90')."""
    m = re.search(r"cuda sm_([0-9a-z,;]+)", info)
    if not m:
        return []
    return [int(a) for a in re.findall(r"\d+", m.group(1))]


def available() -> tuple[bool, str]:
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    ok, why = _ext.load()
    if not ok:
        return False, why
    info = _ext.build_info()
    has_kernels = all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"pysafegeom::{op}", "CUDA") for op in _OPS
    )
    if "cuda" not in info or not has_kernels:
        return False, (f"the extension was built without the CUDA kernels ({info}); rebuild it with nvcc on "
                       "PATH and a CUDA build of torch (`pip install --no-build-isolation -e .`)")
    archs = _built_archs(info)
    major, minor = torch.cuda.get_device_capability()
    cap = 10 * major + minor
    # CMake embeds SASS and PTX for each listed architecture: PTX runs on that capability and newer.
    if archs and min(archs) > cap:
        return False, (f"the CUDA kernels were built for sm_{','.join(map(str, archs))} but this GPU is "
                       f"sm_{cap}; rebuild with PYSAFEGEOM_CUDA_ARCH={cap}")
    return True, ""


def build_info() -> str:
    return _ext.build_info()


# the op wrappers are shared with the C++ backend: the same library, dispatched by the tensors' device
from ._ext import (  # noqa: E402,F401
    chunked_cross_entropy,
    gather_accumulate,
    gather_positions,
    masked_topk,
    orthogonalize_weight,
    project_ablate,
)
