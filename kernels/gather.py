"""Position gather and streaming per-group sums (see ``pysafegeom.ops.reference`` for the definitions)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting, next_pow2


@triton.jit
def _gather_positions_kernel(hidden, positions, out, P, T, d, BLOCK_D: tl.constexpr):
    """One program per (row b*P + p, block of d): ``out[b, p] = hidden[b, positions[b, p]]``."""
    bp = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    b = bp // P
    pos = tl.load(positions + bp)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d
    row = tl.load(hidden + (b * T + pos) * d + cols, mask=mask)
    tl.store(out + bp * d + cols, row, mask=mask)


@triton.jit
def _gather_accumulate_kernel(hidden, positions, groups, sums, comp, B, P, T, d,
                              KAHAN: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (position p, block of d), walking the rows b = 0..B-1 in order.

    Each program owns ``sums[:, p, block]`` for every group, so no two programs touch the same
    element and the rows are added in increasing b, exactly as the reference does.
    """
    p = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < d
    for b in range(0, B):
        g = tl.load(groups + b)  # int64
        pos = tl.load(positions + b * P + p)  # int64 (p is int64)
        x = tl.load(hidden + (pos + b * T) * d + cols, mask=mask, other=0.0).to(tl.float32)
        off = (g * P + p) * d + cols
        s = tl.load(sums + off, mask=mask, other=0.0)
        if KAHAN:
            c = tl.load(comp + off, mask=mask, other=0.0)
            y = x - c
            t = s + y
            c = (t - s) - y
            tl.store(comp + off, c, mask=mask)
            tl.store(sums + off, t, mask=mask)
        else:
            tl.store(sums + off, s + x.to(tl.float64), mask=mask)
        # the next row may hit the same group: make this row's stores visible to every thread
        tl.debug_barrier()


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor, out: torch.Tensor) -> None:
    """``out [B, P, d] = hidden [B, T, d]`` at ``positions [B, P]`` (int64); all contiguous."""
    B, T, d = hidden.shape
    P = positions.shape[1]
    BLOCK_D = min(next_pow2(d), 16 if interpreting() else 1024)
    grid = (B * P, cdiv(d, BLOCK_D))
    _gather_positions_kernel[grid](hidden, positions, out, P, T, d, BLOCK_D=BLOCK_D,
                                   num_warps=4 if BLOCK_D >= 512 else 2)


def gather_accumulate(hidden, positions, groups, sums, counts, comp) -> None:
    """Add ``hidden`` at ``positions`` into ``sums[groups]`` in place (float64, or float32 Kahan with comp)."""
    B, T, d = hidden.shape
    P = positions.shape[1]
    kahan = sums.dtype == torch.float32
    # Parallel over (p, d-block) only, so keep blocks small to have enough programs on a GPU.
    BLOCK_D = min(next_pow2(d), 16 if interpreting() else 128)
    grid = (P, cdiv(d, BLOCK_D))
    _gather_accumulate_kernel[grid](
        hidden, positions, groups, sums, comp if kahan else sums, B, P, T, d,
        KAHAN=kahan, BLOCK_D=BLOCK_D, num_warps=1 if BLOCK_D <= 128 else 4,
        num_stages=1,  # no software pipelining: a row's load must follow the previous row's store
    )
    counts.index_add_(0, groups, torch.ones_like(groups))
