"""Position gather and streaming per-group sums (see ``pysafegeom.ops.reference`` for the definitions)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting, next_pow2

GROUPS_IN_REGISTERS = 16  # up to this many groups, the running sums stay in registers


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
    element and the rows are added in increasing b, exactly as the reference does. This variant
    reads and writes the sums in global memory for every row (any number of groups).
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


@triton.jit
def _gather_accumulate_regs_kernel(hidden, positions, groups, sums, comp, B, P, T, d, G,
                                   KAHAN: tl.constexpr, GP: tl.constexpr, BLOCK_B: tl.constexpr,
                                   BLOCK_D: tl.constexpr):
    """Same result as ``_gather_accumulate_kernel`` for G <= GP groups, with ``sums[:, p, block]``
    (and ``comp``) held in registers for the whole walk: one read and one write of the sums, and the
    loads of BLOCK_B rows issued together (they do not depend on the running sums).
    Row b updates only its group's line (``tl.where``), with the same float operations as the reference.
    """
    p = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < d
    gidx = tl.arange(0, GP)
    goff = (gidx.to(tl.int64)[:, None] * P + p) * d + cols[None, :]
    gmask = (gidx[:, None] < G) & cmask[None, :]
    S = tl.load(sums + goff, mask=gmask, other=0.0)
    if KAHAN:
        C = tl.load(comp + goff, mask=gmask, other=0.0)
    br = tl.arange(0, BLOCK_B)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + br
        bmask = bs < B
        gv = tl.load(groups + bs, mask=bmask, other=-1)
        pv = tl.load(positions + bs.to(tl.int64) * P + p, mask=bmask, other=0)
        for i in tl.static_range(BLOCK_B):
            gi = tl.sum(tl.where(br == i, gv, 0), axis=0)
            pi = tl.sum(tl.where(br == i, pv, 0), axis=0)
            x = tl.load(hidden + (pi + (b0 + i) * T) * d + cols, mask=cmask & (cols * 0 + (b0 + i) < B), other=0.0)
            x = x.to(tl.float32)[None, :]
            upd = (gidx == gi)[:, None]  # no line matches a padding row (gi = -1)
            if KAHAN:
                y = x - C
                t = S + y
                C = tl.where(upd, (t - S) - y, C)
                S = tl.where(upd, t, S)
            else:
                S = tl.where(upd, S + x.to(tl.float64), S)
    tl.store(sums + goff, S, mask=gmask)
    if KAHAN:
        tl.store(comp + goff, C, mask=gmask)


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
    G = sums.shape[0]
    comp_arg = comp if kahan else sums
    if G <= GROUPS_IN_REGISTERS:
        # Parallel over (p, d-block) only: small blocks give a GPU enough programs.
        BLOCK_D = min(next_pow2(d), 16 if interpreting() else 64)
        GP = next_pow2(G)
        _gather_accumulate_regs_kernel[(P, cdiv(d, BLOCK_D))](
            hidden, positions, groups, sums, comp_arg, B, P, T, d, G,
            KAHAN=kahan, GP=GP, BLOCK_B=4 if interpreting() else 8, BLOCK_D=BLOCK_D,
            num_warps=1 if GP * BLOCK_D <= 256 else 2,
        )
    else:
        BLOCK_D = min(next_pow2(d), 16 if interpreting() else 128)
        _gather_accumulate_kernel[(P, cdiv(d, BLOCK_D))](
            hidden, positions, groups, sums, comp_arg, B, P, T, d,
            KAHAN=kahan, BLOCK_D=BLOCK_D, num_warps=1 if BLOCK_D <= 128 else 4,
            num_stages=1,  # no software pipelining: a row's load must follow the previous row's store
        )
    counts.index_add_(0, groups, torch.ones_like(groups))
