"""Directional ablation / addition and weight orthogonalisation against an orthonormal basis Q [d, k].

One kernel serves both ops: it treats its input as ``N`` vectors of width ``d`` with arbitrary strides
(``stride_n`` between vectors, ``stride_d`` along a vector), so ``W [m, d]`` (vectors are rows) and
``W [d, m]`` (vectors are columns) both run without a transpose copy.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import cdiv, interpreting, next_pow2, num_programs_target

# From this many basis vectors on, the dot products run on matrix units (tl.dot), at DOT_PRECISION for
# float32 operands on a GPU: "tf32x3" (three TF32 products, about float32 accuracy) or "ieee".
DOT_MIN_K = 5
DOT_PRECISION = os.environ.get("PYSAFEGEOM_TRITON_F32_DOT", "tf32x3")


@triton.jit
def _project_ablate_kernel(x, Qt, v, out, proj, N, d, stride_n, stride_d, beta, alpha,
                           K: tl.constexpr, KP: tl.constexpr, HAS_V: tl.constexpr, HAS_PROJ: tl.constexpr,
                           SINGLE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per block of BLOCK_N vectors: ``out = x - beta * (x Q) Q^T + alpha * v``.

    Pass 1 walks d once and accumulates the k <= 16 dot products in float32 (``acc [BLOCK_N, KP]``,
    column j = x . q_j); pass 2 walks d again and writes the result. ``Qt`` is Q transposed, ``[k, d]``
    contiguous. When one block covers d (``SINGLE``), x is read once and kept in registers between the
    passes. ``out`` may be ``x`` itself: every element is read before it is written, and each program
    touches only its own vectors.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    row_off = rows.to(tl.int64) * stride_n
    kcol = tl.arange(0, KP)

    acc = tl.zeros([BLOCK_N, KP], dtype=tl.float32)
    if SINGLE:
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < d
        m2 = rmask[:, None] & cmask[None, :]
        offs = row_off[:, None] + cols.to(tl.int64)[None, :] * stride_d
        xs = tl.load(x + offs, mask=m2, other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            q = tl.load(Qt + j * d + cols, mask=cmask, other=0.0)
            pj = tl.sum(xs * q[None, :], axis=1)
            acc += tl.where(kcol[None, :] == j, pj[:, None], 0.0)
    else:
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < d
            m2 = rmask[:, None] & cmask[None, :]
            xt = tl.load(x + row_off[:, None] + cols.to(tl.int64)[None, :] * stride_d, mask=m2, other=0.0).to(tl.float32)
            for j in tl.static_range(K):
                q = tl.load(Qt + j * d + cols, mask=cmask, other=0.0)
                pj = tl.sum(xt * q[None, :], axis=1)
                acc += tl.where(kcol[None, :] == j, pj[:, None], 0.0)

    if HAS_PROJ:
        pmask = rmask[:, None] & (kcol[None, :] < K)
        tl.store(proj + rows.to(tl.int64)[:, None] * K + kcol[None, :], acc, mask=pmask)

    if SINGLE:
        _write_block(xs, acc, Qt, v, out, offs, m2, cols, cmask, kcol, d, beta, alpha, K, HAS_V, BLOCK_N, BLOCK_D)
    else:
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            cmask = cols < d
            m2 = rmask[:, None] & cmask[None, :]
            offs = row_off[:, None] + cols.to(tl.int64)[None, :] * stride_d
            xt = tl.load(x + offs, mask=m2, other=0.0).to(tl.float32)
            _write_block(xt, acc, Qt, v, out, offs, m2, cols, cmask, kcol, d, beta, alpha, K, HAS_V, BLOCK_N, BLOCK_D)


@triton.jit
def _write_block(xt, acc, Qt, v, out, offs, m2, cols, cmask, kcol, d, beta, alpha,
                 K: tl.constexpr, HAS_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[block] = xt - beta * acc Q[block]^T + alpha * v[block]`` (float32 math, out's dtype)."""
    corr = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):
        q = tl.load(Qt + j * d + cols, mask=cmask, other=0.0)
        pj = tl.sum(tl.where(kcol[None, :] == j, acc, 0.0), axis=1)
        corr += pj[:, None] * q[None, :]
    o = xt - beta * corr
    if HAS_V:
        vv = tl.load(v + cols, mask=cmask, other=0.0)
        o += alpha * vv[None, :]
    tl.store(out + offs, o.to(out.dtype.element_ty), mask=m2)


@triton.jit
def _project_ablate_dot_kernel(x, Qt, v, out, proj, N, d, stride_n, stride_d, beta, alpha,
                               K: tl.constexpr, HAS_V: tl.constexpr, HAS_PROJ: tl.constexpr,
                               PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The same op for larger k, on matrix units: ``proj = x Q`` and ``x - beta proj Q^T`` as two
    ``tl.dot`` per block, with k padded to 16 columns (zeros) and float32 operands at ``PRECISION``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    row_off = rows.to(tl.int64) * stride_n
    kcol = tl.arange(0, 16)
    kmask = kcol < K
    acc = tl.zeros([BLOCK_N, 16], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < d
        xt = tl.load(x + row_off[:, None] + cols.to(tl.int64)[None, :] * stride_d,
                     mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        qb = tl.load(Qt + kcol[None, :] * d + cols[:, None], mask=kmask[None, :] & cmask[:, None], other=0.0)
        acc = tl.dot(xt, qb, acc, input_precision=PRECISION)
    if HAS_PROJ:
        tl.store(proj + rows.to(tl.int64)[:, None] * K + kcol[None, :], acc, mask=rmask[:, None] & kmask[None, :])
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < d
        m2 = rmask[:, None] & cmask[None, :]
        offs = row_off[:, None] + cols.to(tl.int64)[None, :] * stride_d
        xt = tl.load(x + offs, mask=m2, other=0.0).to(tl.float32)
        qt = tl.load(Qt + kcol[:, None] * d + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        o = xt - beta * tl.dot(acc, qt, input_precision=PRECISION)
        if HAS_V:
            vv = tl.load(v + cols, mask=cmask, other=0.0)
            o += alpha * vv[None, :]
        tl.store(out + offs, o.to(out.dtype.element_ty), mask=m2)


def _launch(x, Qf, beta, alpha, vf, out, proj, N, d, stride_n, stride_d):
    K = Qf.shape[1]
    Qt = Qf.t().contiguous()  # [k, d]: each basis vector contiguous
    has_v = vf is not None and alpha != 0.0
    interp = interpreting()
    use_dot = K >= DOT_MIN_K
    single = False
    if use_dot:  # tl.dot needs every dimension >= 16
        if interp:
            BLOCK_N, BLOCK_D = 16, 16
        elif stride_d == 1:
            BLOCK_N, BLOCK_D = 32, 128
        else:
            BLOCK_N, BLOCK_D = 64, 64
    elif interp:
        BLOCK_N, BLOCK_D = min(next_pow2(N), 4), min(next_pow2(d), 16)
        single = d <= BLOCK_D
    elif stride_d == 1:  # vectors are rows: whole rows in registers when they fit, else 512-wide blocks
        if next_pow2(d) <= 8192:
            single, BLOCK_D = True, next_pow2(d)
            BLOCK_N = max(1, min(next_pow2(N), 4096 // BLOCK_D))
        else:
            BLOCK_D = 512
            BLOCK_N = max(1, min(next_pow2(N), 4096 // BLOCK_D))
    else:  # vectors are columns (stride_n == 1): wide along the vectors, short along d
        BLOCK_N = min(next_pow2(N), 64 if cdiv(N, 64) >= num_programs_target(x.device) else 32)
        BLOCK_D = max(16, min(next_pow2(d), 4096 // BLOCK_N))
    # The interpreter casts float32 -> bfloat16 by truncation (a GPU rounds to nearest): there, write
    # float32 and let PyTorch round.
    dst = out
    if interpreting() and out.dtype == torch.bfloat16:
        dst = torch.empty(out.shape, dtype=torch.float32, device=out.device)
    grid = (cdiv(N, BLOCK_N),)
    v_arg, proj_arg = (vf if has_v else Qt), (proj if proj is not None else Qt)
    if use_dot:
        _project_ablate_dot_kernel[grid](
            x, Qt, v_arg, dst, proj_arg, N, d, stride_n, stride_d, float(beta), float(alpha),
            K=K, HAS_V=has_v, HAS_PROJ=proj is not None, PRECISION="ieee" if interp else DOT_PRECISION,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4,
        )
    else:
        _project_ablate_kernel[grid](
            x, Qt, v_arg, dst, proj_arg, N, d, stride_n, stride_d, float(beta), float(alpha),
            K=K, KP=next_pow2(K), HAS_V=has_v, HAS_PROJ=proj is not None, SINGLE=single,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4 if BLOCK_N * BLOCK_D <= 2048 else 8,
        )
    if dst is not out:
        out.copy_(dst)


def project_ablate(x, Q, beta, alpha, v, out, proj) -> None:
    """Backend contract: ``x [N, d]`` contiguous, ``Q [d, k]`` float32, ``v [d]`` float32 or None;
    writes ``out [N, d]`` (may be ``x``) and, when given, ``proj [N, k]`` float32."""
    N, d = x.shape
    _launch(x, Q, beta, alpha, v, out, proj, N, d, d, 1)


def orthogonalize_weight(W, Q, residual_dim, out) -> None:
    """Backend contract: remove span(Q) from the residual side of ``W`` into ``out`` (may be ``W``)."""
    if residual_dim == 1:  # W [m, d]: residual vectors are rows
        m, d = W.shape
        _launch(W, Q, 1.0, 0.0, None, out, None, m, d, d, 1)
    else:  # W [d, m]: residual vectors are columns
        d, m = W.shape
        _launch(W, Q, 1.0, 0.0, None, out, None, m, d, 1, m)
