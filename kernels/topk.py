"""Masked top-k over token gradients for GCG.

What is fused (one Triton pass over ``grad [L, V]``): negation, the cast to float32, the forbidden-token
mask, the current-token mask, and the tie-break. Each entry becomes one int64 sort key::

    key = ordered_bits(-grad[l, v]) * 2**32 + (2**31 - 1 - v)

where ``ordered_bits`` maps a float32 to an int32 with the same order (-0.0 is folded into +0.0 and
every NaN into one positive NaN, which sorts first, as ``torch.sort`` does). Keys are distinct, and the
largest keys are exactly the reference order: value descending, then index ascending. ``torch.topk``
on the keys finishes the job (exact, since no two keys tie), avoiding a full stable sort of ``[L, V]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting, next_pow2


@triton.jit
def _topk_keys_kernel(grad, forbidden, current, keys, V,
                      HAS_FORBIDDEN: tl.constexpr, HAS_CURRENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    vs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    vmask = vs < V
    score = -(tl.load(grad + row * V + vs, mask=vmask, other=0.0).to(tl.float32))
    if HAS_FORBIDDEN:
        f = tl.load(forbidden + vs, mask=vmask, other=0)
        score = tl.where(f != 0, float("-inf"), score)
    if HAS_CURRENT:
        cur = tl.load(current + row)
        score = tl.where(vs == cur, float("-inf"), score)
    bits = score.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    bits = tl.where(mag == 0, 0, bits)  # -0.0 -> +0.0
    bits = tl.where(mag > 0x7F800000, 0x7FC00000, bits)  # any NaN -> the canonical positive NaN
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed int32 order == float order
    key = (ordered.to(tl.int64) << 32) + (2147483647 - vs).to(tl.int64)
    tl.store(keys + row * V + vs, key, mask=vmask)


def masked_topk(grad, k, forbidden, current) -> torch.Tensor:
    """Backend contract: ``grad [L, V]`` contiguous, ``forbidden [V]`` bool or None, ``current [L]``
    int64 or None -> ``[L, k]`` int64 indices, in the reference order."""
    L, V = grad.shape
    keys = torch.empty(L, V, dtype=torch.int64, device=grad.device)
    BLOCK_V = min(next_pow2(V), 16 if interpreting() else 2048)
    fb = forbidden.view(torch.uint8) if forbidden is not None else keys
    cur = current if current is not None else keys
    _topk_keys_kernel[(L, cdiv(V, BLOCK_V))](
        grad, fb, cur, keys, V,
        HAS_FORBIDDEN=forbidden is not None, HAS_CURRENT=current is not None, BLOCK_V=BLOCK_V,
        num_warps=4 if BLOCK_V <= 1024 else 8,
    )
    return torch.topk(keys, k, dim=1, largest=True, sorted=True).indices.contiguous()
