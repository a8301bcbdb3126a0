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


def _ops():
    return torch.ops.pysafegeom


def gather_positions(hidden, positions, out):
    _ops().gather_positions(hidden, positions, out)


def gather_accumulate(hidden, positions, groups, sums, counts, comp):
    _ops().gather_accumulate(hidden, positions, groups, sums, counts, comp)


def project_ablate(x, Q, beta, alpha, v, out, proj):
    _ops().project_ablate(x, Q, float(beta), float(alpha), v, out, proj)


def orthogonalize_weight(W, Q, residual_dim, out):
    _ops().orthogonalize_weight(W, Q, int(residual_dim), out)


def chunked_cross_entropy(h, W, targets, chunk_size, ignore_index, loss, grad):
    _ops().chunked_cross_entropy(h, W, targets, int(chunk_size), int(ignore_index), loss, grad)


def masked_topk(grad, k, forbidden, current):
    return _ops().masked_topk(grad, int(k), forbidden, current)
