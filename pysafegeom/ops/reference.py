"""Pure-PyTorch reference of every op: the fallback path and the definition the kernels are tested against.

Every function here assumes its inputs were already validated by :mod:`pysafegeom.ops` (shapes, dtypes,
ranges); the public wrappers there do that once for all backends, so that bad input gets the same error
whichever backend runs. Shapes use ``B`` batch, ``T`` sequence, ``P`` positions per row, ``d`` residual
width, ``N`` rows, ``k`` basis size, ``V`` vocabulary, ``L`` optimised tokens, ``G`` groups.

Numerics, shared by all backends:
  * reductions (dot products with Q, logits, log-sum-exp) accumulate in float32 whatever the input dtype;
  * outputs have the input's dtype, except losses (float32) and running sums (their own dtype).
"""

from __future__ import annotations

import torch

__all__ = [
    "gather_positions",
    "gather_accumulate",
    "project_ablate",
    "orthogonalize_weight",
    "chunked_cross_entropy",
    "masked_topk",
]


# --- 1. position gather and streaming statistics -------------------------------------------------

def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows of ``hidden [B, T, d]`` at ``positions [B, P]`` (int64, each in ``[0, T)``) -> ``[B, P, d]``."""
    idx = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, idx)


def gather_accumulate(
    hidden: torch.Tensor,
    positions: torch.Tensor,
    groups: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    comp: torch.Tensor | None = None,
) -> None:
    """Add gathered rows into running per-group sums, in place.

    ``hidden [B, T, d]``, ``positions [B, P]`` int64, ``groups [B]`` int64 in ``[0, G)``,
    ``sums [G, P, d]`` float64 (plain sum) or float32 (Kahan-compensated, with ``comp [G, P, d]``
    float32 holding the running compensation), ``counts [G]`` int64.

    For each row b: ``sums[groups[b], p] += hidden[b, positions[b, p]]`` for all p, and
    ``counts[groups[b]] += 1``. Rows are added in increasing b, so the result is deterministic.
    """
    rows = gather_positions(hidden, positions)  # [B, P, d]
    if sums.dtype == torch.float64:
        sums.index_add_(0, groups, rows.to(torch.float64))
    else:
        # Kahan summation, one row at a time in order (the definition the kernels follow).
        rows = rows.to(torch.float32)
        for b in range(rows.shape[0]):
            g = int(groups[b])
            y = rows[b] - comp[g]
            t = sums[g] + y
            comp[g] = (t - sums[g]) - y
            sums[g] = t
    counts.index_add_(0, groups, torch.ones_like(groups))


# --- 2. projection, ablation and addition --------------------------------------------------------

def project_ablate(
    x: torch.Tensor,
    Q: torch.Tensor,
    beta: float = 1.0,
    alpha: float = 0.0,
    v: torch.Tensor | None = None,
    inplace: bool = False,
    return_proj: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out = x - beta * Q (Q^T x) + alpha * v`` for every row of ``x [N, d]``, ``Q [d, k]`` orthonormal.

    ``v [d]`` is optional (``alpha`` is ignored without it). Returns ``(out [N, d], proj [N, k] float32
    or None)`` where ``proj = x Q`` is computed from the input x (before any change). With
    ``inplace=True`` the result is written into ``x`` and ``x`` itself is returned.
    """
    xf = x.to(torch.float32)
    Qf = Q.to(torch.float32)
    proj = xf @ Qf  # [N, k]
    outf = xf - beta * (proj @ Qf.T)
    if v is not None and alpha != 0.0:
        outf = outf + alpha * v.to(torch.float32)
    if inplace:
        x.copy_(outf)
        out = x
    else:
        out = outf.to(x.dtype)
    return out, (proj if return_proj else None)


def orthogonalize_weight(W: torch.Tensor, Q: torch.Tensor, residual_dim: int = 0, inplace: bool = False) -> torch.Tensor:
    """Remove span(Q) from the residual side of a weight matrix.

    ``residual_dim=0``: ``W [d, m]`` writes into the residual stream along its rows (``o_proj``,
    ``down_proj`` weights in nn.Linear layout): ``W - Q (Q^T W)``.
    ``residual_dim=1``: ``W [m, d]`` holds residual vectors as rows (the token embedding):
    ``W - (W Q) Q^T``. Accumulates in float32; returns W's dtype (W itself when ``inplace``).
    """
    Wf = W.to(torch.float32)
    Qf = Q.to(torch.float32)
    if residual_dim == 0:
        outf = Wf - Qf @ (Qf.T @ Wf)
    else:
        outf = Wf - (Wf @ Qf) @ Qf.T
    if inplace:
        W.copy_(outf)
        return W
    return outf.to(W.dtype)


# --- 3. batched candidate scoring for GCG --------------------------------------------------------

def chunked_cross_entropy(
    h: torch.Tensor,
    W: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 8192,
    return_grad: bool = False,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row cross-entropy of ``logits = h [N, d] @ W [V, d]^T`` against ``targets [N]``.

    The ``[N, V]`` logits are never materialised: the vocabulary is walked in chunks of ``chunk_size``
    with an online log-sum-exp (and, when ``return_grad``, an online softmax-weighted sum of W rows).
    Returns ``(loss [N] float32, grad_h [N, d] in h's dtype or None)`` where
    ``grad_h = d loss[n] / d h[n] = softmax(logits[n]) @ W - W[targets[n]]``. Rows whose target is
    ``ignore_index`` get loss 0 and gradient 0.
    """
    N, d = h.shape
    V = W.shape[0]
    hf = h.to(torch.float32)
    m = torch.full((N,), float("-inf"), dtype=torch.float32, device=h.device)
    s = torch.zeros(N, dtype=torch.float32, device=h.device)
    acc = torch.zeros(N, d, dtype=torch.float32, device=h.device) if return_grad else None
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets))
    W_t = W[safe_t].to(torch.float32)  # [N, d]
    target_logit = (hf * W_t).sum(-1)
    for start in range(0, V, chunk_size):
        Wc = W[start:start + chunk_size].to(torch.float32)  # [c, d]
        z = hf @ Wc.T  # [N, c]
        m_new = torch.maximum(m, z.max(dim=1).values)
        scale = torch.exp(m - m_new)
        e = torch.exp(z - m_new[:, None])
        s = s * scale + e.sum(dim=1)
        if acc is not None:
            acc = acc * scale[:, None] + e @ Wc
        m = m_new
    loss = (m + torch.log(s)) - target_logit
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    grad = None
    if acc is not None:
        grad = acc / s[:, None] - W_t
        grad = torch.where(valid[:, None], grad, torch.zeros_like(grad)).to(h.dtype)
    return loss, grad


def masked_topk(grad: torch.Tensor, k: int, forbidden: torch.Tensor | None, current: torch.Tensor | None) -> torch.Tensor:
    """Indices of the ``k`` most negative entries of each row of ``grad [L, V]`` -> ``[L, k]`` int64.

    Token ids with ``forbidden [V]`` (bool) set, and each row's ``current [L]`` id, are never chosen.
    Order: by value of ``-grad`` descending, ties broken by the smaller index, so every backend returns
    the same indices in the same order.
    """
    score = (-grad).to(torch.float32)
    if forbidden is not None:
        score = score.masked_fill(forbidden[None, :], float("-inf"))
    if current is not None:
        score = score.scatter(1, current[:, None], float("-inf"))
    # stable sort by descending score: ties keep increasing index order
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    return order[:, :k].contiguous()
