"""Chunked (fused linear) cross-entropy: loss and d loss / d h without materialising the [N, V] logits.

Two kernels:

1. ``_ce_partial_kernel``, grid (row blocks, vocabulary splits). Each program takes ``BLOCK_N`` rows and
   a contiguous range of the vocabulary, and walks it in ``BLOCK_V`` tiles: logits tile
   ``z = h W_tile^T`` ([BLOCK_N, BLOCK_V], ``tl.dot`` over d in BLOCK_K steps, float32 accumulation), then
   an online log-sum-exp (running max ``m`` and scaled sum ``s``). With the gradient it also keeps the
   softmax-weighted sum of W rows, ``acc = sum_v exp(z_v - m) W_v``, rescaled whenever ``m`` grows;
   ``acc [BLOCK_N, d]`` is too wide for registers, so it lives in a float32 scratch buffer
   ``[splits, N, d]`` that only this program reads and writes. Splitting the vocabulary gives a GPU
   enough programs when N is small (the token-gradient step of GCG has N = target length).
2. ``_ce_combine_kernel``, one program per row: merges the splits' (m, s, acc) in split order, computes
   the target logit, and writes ``loss = logsumexp - z_target`` and
   ``grad = acc / s - W[target]`` (both 0 for ``ignore_index`` rows).

Everything is deterministic (fixed tiles, fixed orders, no atomics).

Precision: 16-bit inputs multiply on tensor cores with float32 accumulation (products of 16-bit numbers
are exact in float32, like the reference's upcast). For the gradient, the float32 softmax weights are
split into a 16-bit high part and a 16-bit remainder (two ``tl.dot``), about 16 correct bits, far below
the rounding of the 16-bit output. float32 inputs use ``input_precision="tf32x3"`` on a GPU (three TF32
products, about float32 accuracy; ``PYSAFEGEOM_TRITON_F32_DOT=ieee`` for exact float32 products on
the FMA units, about 4 times slower); the interpreter multiplies in float32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting, next_pow2, num_programs_target

SCRATCH_BYTES_MAX = 512 * 2**20  # cap on the gradient scratch [splits, N, d] float32
# tl.dot precision for float32 inputs on a GPU: "ieee" (FMA units, exact float32 products) or "tf32x3"
# (three TF32 tensor-core products, about float32 accuracy, several times faster).
F32_PRECISION = os.environ.get("PYSAFEGEOM_TRITON_F32_DOT", "tf32x3")
# 16-bit inputs: K-steps summed on the matrix units before a float32 add (see the kernel). Measured on
# an H200 (N=2048, V=128256, d=4096, bf16): KSPLIT=1 ran 6.7 ms with 7x the reference's loss error,
# KSPLIT=2 13.3 ms with less error than the reference (PyTorch reference: 47 ms).
KSPLIT = 2


@triton.jit
def _ce_partial_kernel(h, W, m_part, s_part, acc_part, N, V, d, blocks_per_split,
                       HAS_GRAD: tl.constexpr, DOT_F32: tl.constexpr, F32_PRECISION: tl.constexpr, KSPLIT: tl.constexpr,
                       BLOCK_N: tl.constexpr,
                       BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DG: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    rows64 = rows.to(tl.int64)
    v_begin = split * blocks_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + blocks_per_split * BLOCK_V)
    acc_rows = acc_part + split.to(tl.int64) * N * d + rows64[:, None] * d

    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        vmask = vs < v_end
        vs64 = vs.to(tl.int64)
        z = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        # KSPLIT K-steps accumulate on the matrix units from zero, then join z with a float32 add:
        # tensor cores round their running sum toward zero, which over all of d would cost several
        # times the reference's error.
        for k00 in range(0, d, BLOCK_K * KSPLIT):
            zc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
            for kk in tl.static_range(KSPLIT):
                ks = k00 + kk * BLOCK_K + tl.arange(0, BLOCK_K)
                kmask = ks < d
                a = tl.load(h + rows64[:, None] * d + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                b = tl.load(W + vs64[:, None] * d + ks[None, :], mask=vmask[:, None] & kmask[None, :], other=0.0)
                if DOT_F32:
                    zc = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), zc, input_precision=F32_PRECISION)
                else:
                    zc = tl.dot(a, tl.trans(b), zc)
            z += zc
        z = tl.where(vmask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        scale = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        s = s * scale + tl.sum(e, axis=1)
        m = m_new
        if HAS_GRAD:
            if DOT_F32:
                e_hi = e
                e_lo = e
            else:
                e_hi = e.to(W.dtype.element_ty)
                e_lo = (e - e_hi.to(tl.float32)).to(W.dtype.element_ty)
            for g0 in range(0, d, BLOCK_DG):
                gs = g0 + tl.arange(0, BLOCK_DG)
                gmask = gs < d
                w = tl.load(W + vs64[:, None] * d + gs[None, :], mask=vmask[:, None] & gmask[None, :], other=0.0)
                if DOT_F32:
                    part = tl.dot(e_hi, w.to(tl.float32), input_precision=F32_PRECISION)
                else:
                    part = tl.dot(e_hi, w) + tl.dot(e_lo, w)
                ptrs = acc_rows + gs[None, :]
                amask = rmask[:, None] & gmask[None, :]
                old = tl.load(ptrs, mask=amask, other=0.0)  # scratch starts at zero
                tl.store(ptrs, old * scale[:, None] + part, mask=amask)
            # the next tile re-reads these scratch rows, maybe from other threads of this program
            tl.debug_barrier()
    idx = split.to(tl.int64) * N + rows64
    tl.store(m_part + idx, m, mask=rmask)
    tl.store(s_part + idx, s, mask=rmask)


@triton.jit
def _ce_combine_kernel(h, W, targets, m_part, s_part, acc_part, loss, grad, N, d, S, ignore_index,
                       HAS_GRAD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(targets + row)
    valid = t != ignore_index
    t_safe = tl.where(valid, t, 0)
    ss = tl.arange(0, BLOCK_S)
    smask = ss < S
    ms = tl.load(m_part + ss * N + row, mask=smask, other=float("-inf"))
    sv = tl.load(s_part + ss * N + row, mask=smask, other=0.0)
    M = tl.max(ms, axis=0)
    wsplit = tl.where(smask, tl.exp(ms - M), 0.0)
    s_tot = tl.sum(sv * wsplit, axis=0)

    zt = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dmask = ds < d
        hv = tl.load(h + row * d + ds, mask=dmask, other=0.0).to(tl.float32)
        wt = tl.load(W + t_safe * d + ds, mask=dmask, other=0.0).to(tl.float32)
        zt += hv * wt
    z_target = tl.sum(zt, axis=0)
    lo = (M + tl.log(s_tot)) - z_target
    tl.store(loss + row, tl.where(valid, lo, 0.0))

    if HAS_GRAD:
        coef = wsplit / s_tot
        for d0 in range(0, d, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < d
            a = tl.load(acc_part + (ss.to(tl.int64)[:, None] * N + row) * d + ds[None, :],
                        mask=smask[:, None] & dmask[None, :], other=0.0)
            wt = tl.load(W + t_safe * d + ds, mask=dmask, other=0.0).to(tl.float32)
            g = tl.sum(a * coef[:, None], axis=0) - wt
            tl.store(grad + row * d + ds, tl.where(valid, g, 0.0), mask=dmask)


def chunked_cross_entropy(h, W, targets, chunk_size, ignore_index, loss, grad) -> None:
    """Backend contract: ``h [N, d]``, ``W [V, d]`` (same dtype), ``targets [N]`` int64; writes
    ``loss [N]`` float32 and, when given, ``grad [N, d]`` float32.

    ``chunk_size`` (the reference's vocabulary chunk) is not used: the kernel tiles the vocabulary in
    ``BLOCK_V`` columns, which changes only the rounding order of the online log-sum-exp.
    """
    N, d = h.shape
    V = W.shape[0]
    has_grad = grad is not None
    f32 = h.dtype == torch.float32
    interp = interpreting()
    dot_f32 = f32 or interp  # the interpreter's dot cannot multiply bfloat16 (stored as uint16)
    if interp:
        BLOCK_N, BLOCK_V, BLOCK_K, BLOCK_DG, warps, stages = 16, 16, 16, 16, 4, 1
    elif f32:  # ieee float32 dot runs on the FMA units: modest tiles
        BLOCK_N = 16 if N <= 16 else 32
        BLOCK_V, BLOCK_K, BLOCK_DG, warps, stages = 64, 32, 64, 4, 2
    else:
        BLOCK_N = 16 if N <= 16 else (32 if N <= 32 or has_grad else 64)
        BLOCK_V, BLOCK_K, BLOCK_DG = 128, 64, 64
        warps, stages = (8 if BLOCK_N == 64 else 4), (3 if KSPLIT <= 2 else 2)
    n_row_blocks = cdiv(N, BLOCK_N)
    n_vblocks = cdiv(V, BLOCK_V)
    splits = max(1, min(n_vblocks, cdiv(num_programs_target(h.device), n_row_blocks)))
    if has_grad:
        splits = max(1, min(splits, SCRATCH_BYTES_MAX // max(1, N * d * 4)))
    blocks_per_split = cdiv(n_vblocks, splits)
    splits = cdiv(n_vblocks, blocks_per_split)  # every split gets at least one tile

    dev = h.device
    m_part = torch.empty(splits, N, dtype=torch.float32, device=dev)
    s_part = torch.empty(splits, N, dtype=torch.float32, device=dev)
    acc_part = torch.zeros(splits, N, d, dtype=torch.float32, device=dev) if has_grad else m_part
    _ce_partial_kernel[(n_row_blocks, splits)](
        h, W, m_part, s_part, acc_part, N, V, d, blocks_per_split,
        HAS_GRAD=has_grad, DOT_F32=dot_f32, F32_PRECISION="ieee" if interp else F32_PRECISION,
        KSPLIT=1 if (interp or f32) else KSPLIT, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_K=BLOCK_K,
        BLOCK_DG=BLOCK_DG, num_warps=warps, num_stages=stages,
    )
    BLOCK_S = next_pow2(splits)
    BLOCK_D = 16 if interp else max(16, min(next_pow2(d), 8192 // BLOCK_S, 1024))
    _ce_combine_kernel[(N,)](
        h, W, targets, m_part, s_part, acc_part, loss, grad if has_grad else loss, N, d, splits, ignore_index,
        HAS_GRAD=has_grad, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, num_warps=4,
    )
