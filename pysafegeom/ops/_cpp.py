"""C++ CPU backend: the kernels of ``csrc/cpu`` in the compiled extension (``pysafegeom/_C.so``).

Each function follows the backend contract of :mod:`pysafegeom.ops` (validated contiguous inputs, Q and
v float32, outputs pre-allocated) and calls the matching ``torch.ops.pysafegeom`` op.
"""

from __future__ import annotations

import torch

from . import _ext

DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available() -> tuple[bool, str]:
    return _ext.load()


def build_info() -> str:
    return _ext.build_info()


# the op wrappers are shared with the CUDA backend: the same library, dispatched by the tensors' device
from ._ext import (  # noqa: E402,F401
    chunked_cross_entropy,
    gather_accumulate,
    gather_positions,
    masked_topk,
    orthogonalize_weight,
    project_ablate,
)
