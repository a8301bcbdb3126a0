"""Coupling, geometry and behaviour-state metrics of the protocol (PROTOCOL.md sections 2 and 3).

Pure functions over tensors: no model, no I/O. Every input is validated (a torch tensor, the expected
rank and widths, non-empty, finite) and converted to CPU float64 before any arithmetic; scalar results are Python
floats, vector results float64 tensors, structured results plain dataclasses.

Shapes: ``d`` residual width, ``L`` layers, ``n`` prompts (rows), ``k`` basis size, ``m`` stacked
carrier vectors. A *carrier* is a direction ``[d]`` (only its line matters: the metrics here are
invariant to its sign and positive scale unless a docstring says otherwise) or a subspace given by any
basis ``[d, k]`` of full column rank (only its span matters).

Names follow PROTOCOL.md: ``coupling`` (κ, section 3), ``subspace_coupling`` (κ_sub), ``effective_rank``
(erank), ``process_correlation`` (ρ), ``subspace_drift`` / ``direction_drift`` (drift), the Latent
Guard of section 2.1 and the low-rank carriers of section 2.3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidArgument

__all__ = [
    "unit",
    "coupling",
    "CouplingProfile",
    "coupling_profile",
    "layer_cos",
    "mid_band",
    "principal_angles",
    "subspace_coupling",
    "difference_of_means",
    "low_rank_basis",
    "delta_rank",
    "effective_rank",
    "spearman",
    "process_correlation",
    "Readouts",
    "readouts",
    "latent_guard_scores",
    "auroc",
    "subspace_drift",
    "direction_drift",
    "DriftEntry",
    "drift_report",
    "behaviour_distance",
]

_F64 = torch.float64


# --- validation ------------------------------------------------------------------------------------

def _tensor(x, name: str, ndim: int | tuple[int, ...]) -> torch.Tensor:
    """``x`` as a float64 tensor after checking its type, rank, emptiness and finiteness."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}; wrap it with torch.as_tensor")
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be a real (float or integer) tensor, got dtype {x.dtype}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if x.dim() not in dims:
        want = " or ".join(f"{k}-D" for k in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    x = x.detach().to(device="cpu", dtype=_F64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _eps(x: torch.Tensor) -> float:
    """Machine epsilon of the precision ``x`` was given in (float64's for integers): the rank tolerance."""
    return torch.finfo(x.dtype).eps if isinstance(x, torch.Tensor) and x.is_floating_point() else torch.finfo(_F64).eps


def _same_width(d1: int, d2: int, n1: str, n2: str) -> None:
    if d1 != d2:
        raise ValueError(f"{n1} and {n2} have different residual widths d ({d1} vs {d2})")


def _norms(x: torch.Tensor, name: str) -> torch.Tensor:
    """Norms of the rows of ``x [..., d]``; raises if any is zero (its direction is undefined)."""
    n = torch.linalg.vector_norm(x, dim=-1)
    zero = int((n == 0).sum())
    if zero:
        what = "is a zero vector" if n.dim() == 0 else f"has {zero} zero row(s)"
        raise ValueError(f"{name} {what}: its direction, and any cosine with it, is undefined")
    return n


def _abs_cos(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> torch.Tensor:
    """|cos| between matching rows of ``a, b [..., d]`` (validated float64), clamped to [0, 1]."""
    c = (a * b).sum(-1) / (_norms(a, na) * _norms(b, nb))
    return c.abs().clamp(0.0, 1.0)


# --- directions and single-carrier coupling (section 3) ---------------------------------------------

def unit(v: torch.Tensor) -> torch.Tensor:
    """``v [..., d]`` scaled to unit L2 norm along the last axis (float64); raises on a zero vector."""
    v = _tensor(v, "v", (1, 2, 3, 4))
    return v / _norms(v, "v").unsqueeze(-1)


def coupling(h: torch.Tensor, r: torch.Tensor) -> float:
    """H/R coupling κ = |cos(ĥ, r̂)| of two directions ``h, r [d]`` (PROTOCOL.md section 3).

    In [0, 1]; invariant to the sign and positive scale of either carrier and to any orthogonal map
    applied to both. Raises if either vector is zero (κ undefined) or the widths differ.
    """
    h, r = _tensor(h, "h", 1), _tensor(r, "r", 1)
    _same_width(h.shape[0], r.shape[0], "h", "r")
    return float(_abs_cos(h, r, "h", "r"))


def layer_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Signed cosine per row of ``a, b [n_layers, d]``, float64; NaN where either row is (numerically) zero.

    The lenient per-layer form: a zero carrier (R at layer 0 over template tokens, where every prompt has
    the same embedding) gives NaN for its layer instead of an error; ``layer_cos(H, R).abs()`` is the
    coupling profile κ_ℓ with such layers left out."""
    a, b = a.double(), b.double()
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    tiny = 1e-10 * torch.maximum(na.max(), nb.max()).clamp_min(1e-300)
    out = (a * b).sum(-1) / (na * nb).clamp_min(1e-300)
    out[(na <= tiny) | (nb <= tiny)] = float("nan")
    return out.clamp(-1, 1)


def mid_band(L: int) -> tuple[int, int]:
    """The middle layer band ``[lo, hi)`` = all ℓ with 0.2·L ≤ ℓ < 0.8·L (PROTOCOL.md section 3).

    Computed exactly in integers (5ℓ ≥ L and 5ℓ < 4L). For L = 32 it is ``(7, 26)``: layers 7..25.
    (Section 2.4's admissibility prune, ℓ ≥ int(0.8·L), is a separate rule and can differ by one layer.)
    """
    if L < 2:
        raise ValueError(f"the mid band 0.2L <= l < 0.8L is empty for L = {L}; need at least 2 layers")
    lo = -(-L // 5)  # ceil(L / 5)
    hi = -(-4 * L // 5)  # ceil(4L / 5): first ℓ with 5ℓ >= 4L
    return lo, hi


@dataclass
class CouplingProfile:
    """Same-layer coupling profile κ_ℓ = |cos(ĥ^(ℓ), r̂^(ℓ))| and its summaries (PROTOCOL.md section 3).

    ``per_layer [L]`` float64; ``mid_band_mean``: mean of κ_ℓ over ``band`` = [lo, hi), the layers with
    0.2L ≤ ℓ < 0.8L; ``max`` / ``argmax``: the largest κ_ℓ over all layers and its layer index.
    """

    per_layer: torch.Tensor
    mid_band_mean: float
    max: float
    argmax: int
    band: tuple[int, int]


def coupling_profile(H: torch.Tensor, R: torch.Tensor) -> CouplingProfile:
    """Per-layer coupling of carriers ``H [L, d]`` and ``R [L, d]`` (row ℓ = the layer-ℓ carrier).

    PROTOCOL.md section 3, primary coupling, same-layer version. Needs L ≥ 2 (the mid band must be
    non-empty); raises on any zero row.
    """
    H, R = _tensor(H, "H", 2), _tensor(R, "R", 2)
    if H.shape[0] != R.shape[0]:
        raise ValueError(f"H and R have different numbers of layers ({H.shape[0]} vs {R.shape[0]})")
    _same_width(H.shape[1], R.shape[1], "H", "R")
    band = mid_band(H.shape[0])
    per_layer = _abs_cos(H, R, "H", "R")
    top = int(torch.argmax(per_layer))
    return CouplingProfile(
        per_layer=per_layer,
        mid_band_mean=float(per_layer[band[0]:band[1]].mean()),
        max=float(per_layer[top]),
        argmax=top,
        band=band,
    )


# --- subspaces (sections 2.3 and 3) -------------------------------------------------------------------

def _basis(Q: torch.Tensor, name: str) -> torch.Tensor:
    """An orthonormal basis ``[d, k]`` of the span of ``Q [d, k]`` (or ``[d]``, k = 1), via QR."""
    eps = _eps(Q)
    Q = _tensor(Q, name, (1, 2))
    if Q.dim() == 1:
        Q = Q.unsqueeze(1)
    d, k = Q.shape
    if k > d:
        raise ValueError(f"{name} has k = {k} columns but width d = {d}; a basis needs k <= d (is it transposed?)")
    s = torch.linalg.svdvals(Q)
    if s[0] == 0 or s[-1] <= s[0] * max(d, k) * eps:
        raise ValueError(
            f"{name} [d={d}, k={k}] is rank-deficient (numerical rank < {k}); pass linearly independent columns"
        )
    return torch.linalg.qr(Q, mode="reduced").Q


def _cos_sin(QA: torch.Tensor, QB: torch.Tensor, na: str, nb: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines (descending) and matching sines of the k = min(ka, kb) principal angles."""
    A, B = _basis(QA, na), _basis(QB, nb)
    _same_width(A.shape[0], B.shape[0], na, nb)
    if A.shape[1] < B.shape[1]:
        A, B = B, A  # A is the larger subspace, so every column direction of B has a partner angle
    M = A.T @ B  # [ka, kb]
    cos = torch.linalg.svdvals(M).clamp(0.0, 1.0)  # descending
    sin = torch.linalg.svdvals(B - A @ M).clamp(0.0, 1.0).flip(0)  # descending -> ascending
    return cos, sin


def principal_angles(QA: torch.Tensor, QB: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending, in [0, π/2]) between span(QA) and span(QB).

    ``QA [d, ka]``, ``QB [d, kb]`` (a 1-D ``[d]`` is a line, k = 1) -> ``[min(ka, kb)]``. Both inputs are
    orthonormalised by QR first, so any full-rank basis may be passed. cos θ_i are the singular values of
    Q_Aᵀ Q_B clamped to [0, 1] (PROTOCOL.md section 3); angles below 45° are taken from the sines
    (singular values of Q_B − Q_A Q_Aᵀ Q_B) instead, because arccos loses precision near 0
    (Björck–Golub).
    """
    cos, sin = _cos_sin(QA, QB, "QA", "QB")
    return torch.where(cos * cos >= 0.5, torch.arcsin(sin), torch.arccos(cos))


def subspace_coupling(QA: torch.Tensor, QB: torch.Tensor) -> float:
    """Subspace coupling κ_sub = (1/k) Σ_i cos² θ_i, k = min(ka, kb) (PROTOCOL.md section 3).

    ``QA [d, ka]``, ``QB [d, kb]`` any full-rank bases (or ``[d]`` vectors). In [0, 1]; depends only on
    the two spans. With k = 1 it equals ``coupling(h, r) ** 2``.
    """
    cos, _ = _cos_sin(QA, QB, "QA", "QB")
    return float((cos * cos).mean())


def difference_of_means(X_pos: torch.Tensor, X_neg: torch.Tensor) -> torch.Tensor:
    """μ(D⁺) − μ(D⁻): the mean over axis 0 of ``X_pos [n⁺, ...]`` minus that of ``X_neg [n⁻, ...]``.

    Rows are prompts; the trailing shape (``[d]``, or ``[L, d]`` for all layers at once) must match and
    is the result's shape. Not normalised: this is the raw carrier h or r of PROTOCOL.md sections 2.1
    and 2.2 (use ``unit`` for ĥ, r̂). Means are taken in float64.
    """
    X_pos, X_neg = _tensor(X_pos, "X_pos", (2, 3)), _tensor(X_neg, "X_neg", (2, 3))
    if X_pos.shape[1:] != X_neg.shape[1:]:
        raise ValueError(
            f"X_pos rows {tuple(X_pos.shape[1:])} and X_neg rows {tuple(X_neg.shape[1:])} have different shapes"
        )
    return X_pos.mean(0) - X_neg.mean(0)


def _rank_of(s: torch.Tensor, n: int, d: int, eps: float) -> int:
    """Numerical rank from singular values ``s`` (descending) of an ``[n, d]`` matrix: ``s > s_max * max(n, d) * eps``."""
    return int((s > s[0] * max(n, d) * eps).sum()) if s.numel() and s[0] > 0 else 0


def delta_rank(X_pos: torch.Tensor, mu_neg: torch.Tensor) -> int:
    """Numerical rank of Δ = X_pos − μ(D⁻), with the tolerance :func:`low_rank_basis` uses: the largest k it accepts.

    ``X_pos [n, d]``, ``mu_neg [d]``. 0 when Δ is zero (every row equals ``mu_neg``).
    """
    eps = max(_eps(X_pos), _eps(mu_neg))
    X_pos, mu_neg = _tensor(X_pos, "X_pos", 2), _tensor(mu_neg, "mu_neg", 1)
    _same_width(X_pos.shape[1], mu_neg.shape[0], "X_pos", "mu_neg")
    n, d = X_pos.shape
    return _rank_of(torch.linalg.svd(X_pos - mu_neg, full_matrices=False)[1], n, d, eps)


def low_rank_basis(X_pos: torch.Tensor, mu_neg: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Low-rank carrier Q ``[d, k]``: the top-k right singular vectors of Δ = X_pos − μ(D⁻) (PROTOCOL.md 2.3).

    ``X_pos [n, d]`` (rows x_j, j ∈ D⁺), ``mu_neg [d]`` (mean over D⁻). Columns are orthonormal (right
    singular vectors already are, so the section's QR step is a no-op here) and ordered by singular
    value. Each column is signed to have a non-negative inner product with the mean row of Δ (the
    difference of means), so the result is deterministic.

    With k = 1 this is the *top singular direction* of Δ. Because Δ is not centred, it coincides with
    the unit difference of means only when Δ is rank-1-dominated (mean shift large against the spread
    of the rows); with heavy per-example spread they can differ, and then section 2.3's "a k = 1 carrier
    is just the unit difference of means" means ``unit(difference_of_means(...))``, not this.

    Raises if k < 1, k > min(n, d), or k exceeds the numerical rank of Δ.
    """
    eps = max(_eps(X_pos), _eps(mu_neg))
    X_pos, mu_neg = _tensor(X_pos, "X_pos", 2), _tensor(mu_neg, "mu_neg", 1)
    _same_width(X_pos.shape[1], mu_neg.shape[0], "X_pos", "mu_neg")
    n, d = X_pos.shape
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > min(n, d):
        raise ValueError(f"k = {k} exceeds min(n, d) = min({n}, {d}); Δ has at most that many directions")
    delta = X_pos - mu_neg
    _, s, Vh = torch.linalg.svd(delta, full_matrices=False)
    rank = _rank_of(s, n, d, eps)
    if k > rank:
        distinct = int(torch.unique(X_pos, dim=0).shape[0])
        if distinct < n:  # the usual cause: the same prompt several times gives the same activation rows
            raise InvalidArgument(f"k = {k} exceeds the numerical rank {rank} of Δ = X_pos - mu_neg because X_pos has only "
                             f"{distinct} distinct rows among {n}: the prompts are duplicates (identical prompts give "
                             f"identical activations); deduplicate the prompt set, or use k <= {rank}")
        raise ValueError(f"k = {k} exceeds the numerical rank {rank} of Δ = X_pos - mu_neg; use k <= {rank}")
    Q = Vh[:k].T.clone()  # [d, k]
    m = delta.mean(0)
    proj = m @ Q  # [k]
    for j in range(k):
        # sign by the mean difference; when it is (numerically) orthogonal, by the largest coordinate
        ref = proj[j] if proj[j].abs() > 1e-12 * torch.linalg.vector_norm(m) else Q[Q[:, j].abs().argmax(), j]
        if ref < 0:
            Q[:, j] = -Q[:, j]
    return Q


# --- effective rank (section 3) ------------------------------------------------------------------------

def effective_rank(M: torch.Tensor, *, unit_rows: bool = False, top: int | None = None) -> float:
    """erank(M) = exp(−Σ p_i ln p_i), p_i = σ_i / Σ_j σ_j, from the singular values of ``M [m, d]``.

    PROTOCOL.md section 3 and 10.5. Default M: the stacked unit difference-of-means vectors over the EOI
    positions at the selected layer (pass raw ones with ``unit_rows=True`` to normalise each row here),
    or the top-k SVD block; ``top=5`` keeps only the 5 largest singular values (section 10.5's "erank of
    the top-5 singular values of Δ"). Meant for a *small* M (a few rows). In [1, min(m, d)]: a rank-1 M
    gives 1, k orthonormal rows give k. Singular values below the numerical-rank tolerance
    (σ_max · max(m, d) · eps, eps of M's dtype) count as zero. Invariant to the sign of rows, a positive
    scale of M (of each row with ``unit_rows=True``) and an orthogonal map of the residual space. A 1-D
    ``[d]`` is one row.
    """
    eps = _eps(M)
    M = _tensor(M, "M", (1, 2))
    if M.dim() == 1:
        M = M.unsqueeze(0)
    if unit_rows:
        M = M / _norms(M, "M").unsqueeze(-1)
    s = torch.linalg.svdvals(M)
    if s[0] == 0:
        raise ValueError("M is all zeros; its effective rank is undefined")
    if top is not None:
        if not isinstance(top, int) or isinstance(top, bool) or top < 1:
            raise ValueError(f"top must be a positive int, got {top!r}")
        s = s[:top]
    s = s[s > s[0] * max(M.shape) * eps]
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()))


# --- process coupling (section 3) ----------------------------------------------------------------------

def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of ``x [n]``, ties given the average of the ranks they span (float64)."""
    n = x.shape[0]
    order = torch.argsort(x, stable=True)
    xs = x[order]
    _, counts = torch.unique_consecutive(xs, return_counts=True)
    ends = torch.cumsum(counts, 0).to(_F64)  # last 1-based rank of each tie group
    avg = ends - (counts.to(_F64) - 1) / 2
    ranks = torch.empty(n, dtype=_F64)
    ranks[order] = torch.repeat_interleave(avg, counts)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of ``a [n]`` and ``b [n]``: Pearson correlation of average ranks.

    Raises if n < 2 or either input is constant (ρ undefined).
    """
    a, b = _tensor(a, "a", 1), _tensor(b, "b", 1)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same length, got {a.shape[0]} and {b.shape[0]}")
    if a.shape[0] < 2:
        raise ValueError("Spearman correlation needs at least 2 paired values")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    na, nb = torch.linalg.vector_norm(ra), torch.linalg.vector_norm(rb)
    if na == 0 or nb == 0:
        raise ValueError("Spearman correlation is undefined when one input is constant (all ranks tied)")
    return float(((ra @ rb) / (na * nb)).clamp(-1.0, 1.0))


def process_correlation(h_readout: torch.Tensor, r_readout: torch.Tensor) -> float:
    """Process coupling ρ = Spearman(⟨x_{t_inst}, ĥ⟩, ⟨x_{t_post}, r̂⟩) over prompts (PROTOCOL.md section 3).

    ``h_readout [n]``, ``r_readout [n]`` as returned by ``readouts`` (prompts of D⁺ ∪ D⁻ ∪ XSTest-safe).
    Ties get average ranks. Unlike κ, ρ is *signed*: it is invariant to positive scale of ĥ, r̂ and to
    an orthogonal map of the residual space, but flipping the sign of one carrier flips the sign of ρ.
    The carriers' orientation (harmful minus harmless) is what gives ρ its meaning.
    """
    return spearman(h_readout, r_readout)


@dataclass
class Readouts:
    """Per-prompt projections ``h [n] = X_inst ĥ`` and ``r [n] = X_post r̂`` (float64)."""

    h: torch.Tensor
    r: torch.Tensor


def readouts(X_inst: torch.Tensor, X_post: torch.Tensor, h: torch.Tensor, r: torch.Tensor) -> Readouts:
    """Harmfulness and refusal readouts of each prompt (PROTOCOL.md section 3, process coupling).

    ``X_inst [n, d]`` activations at t_inst, ``X_post [n, d]`` at t_post-inst (same prompts, same order),
    ``h [d]``, ``r [d]`` carriers (normalised here) -> ``Readouts(h=X_inst ĥ, r=X_post r̂)``.
    """
    X_inst, X_post = _tensor(X_inst, "X_inst", 2), _tensor(X_post, "X_post", 2)
    h, r = _tensor(h, "h", 1), _tensor(r, "r", 1)
    if X_inst.shape[0] != X_post.shape[0]:
        raise ValueError(
            f"X_inst and X_post must hold the same prompts, got {X_inst.shape[0]} and {X_post.shape[0]} rows"
        )
    _same_width(X_inst.shape[1], h.shape[0], "X_inst", "h")
    _same_width(X_post.shape[1], r.shape[0], "X_post", "r")
    return Readouts(h=X_inst @ (h / _norms(h, "h")), r=X_post @ (r / _norms(r, "r")))


# --- Latent Guard (section 2.1) ------------------------------------------------------------------------

def latent_guard_scores(X: torch.Tensor, c_pos: torch.Tensor, c_neg: torch.Tensor) -> torch.Tensor:
    """Latent Guard score Δ(x) = mean_ℓ [cos(x^(ℓ), c_pos^(ℓ)) − cos(x^(ℓ), c_neg^(ℓ))] (PROTOCOL.md 2.1).

    ``X [n, L, d]`` activations of n prompts at one position (t_inst for Δ_harm with the c_hf / c_hl
    centroids, t_post-inst for Δ_refuse with c_refuse / c_accept), ``c_pos, c_neg [L, d]`` -> ``[n]``
    float64 in [−2, 2]. ``X [n, d]`` with ``[d]`` centroids is the one-layer case. A prompt is flagged
    when Δ ≥ α (α = 0 by default). Invariant to a positive scale of each centroid and each activation and
    to an orthogonal map of the residual space; negating both centroids negates Δ.
    """
    X = _tensor(X, "X", (2, 3))
    c_pos = _tensor(c_pos, "c_pos", X.dim() - 1)
    c_neg = _tensor(c_neg, "c_neg", X.dim() - 1)
    if X.dim() == 2:
        X, c_pos, c_neg = X.unsqueeze(1), c_pos.unsqueeze(0), c_neg.unsqueeze(0)
    for name, c in (("c_pos", c_pos), ("c_neg", c_neg)):
        if c.shape != X.shape[1:]:
            raise ValueError(f"{name} has shape {tuple(c.shape)}, expected (L, d) = {tuple(X.shape[1:])} from X")
    xn = X / _norms(X, "X").unsqueeze(-1)
    cp = c_pos / _norms(c_pos, "c_pos").unsqueeze(-1)
    cn = c_neg / _norms(c_neg, "c_neg").unsqueeze(-1)
    return ((xn * cp).sum(-1) - (xn * cn).sum(-1)).mean(-1)


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores [n]`` for binary ``labels [n]`` (1/True = positive).

    The Mann–Whitney statistic P(s⁺ > s⁻) + ½ P(s⁺ = s⁻) over all positive/negative pairs (ties count
    ½), via average ranks. 1 = every positive scores above every negative, 0 = the reverse. Raises if
    either class is empty or a label is not 0/1.
    """
    s = _tensor(scores, "scores", 1)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != s.shape[0]:
        raise ValueError(f"labels must have shape ({s.shape[0]},) like scores, got {tuple(labels.shape)}")
    y = labels.detach().cpu()
    if not ((y == 0) | (y == 1)).all():
        raise ValueError("labels must be 0/1 or bool")
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes; got {n_pos} positive and {n_neg} negative labels")
    ranks = _average_ranks(s)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


# --- drift and behaviour state (section 3) ---------------------------------------------------------------

def subspace_drift(S_t: torch.Tensor, S_ref: torch.Tensor) -> float:
    """Principal-angle drift: mean principal angle between span(S_t) and span(S_ref), in degrees.

    PROTOCOL.md section 3. ``S_t [d, k]``, ``S_ref [d, k']`` (or ``[d]`` lines); S_ref is the first
    anchor's carrier (or the previous anchor's, for consecutive drift). In [0, 90].
    """
    return float(torch.rad2deg(principal_angles(S_t, S_ref)).mean())


def direction_drift(r_t: torch.Tensor, r_ref: torch.Tensor) -> float:
    """Single-direction drift 1 − |cos(r̂_t, r̂_ref)| at a fixed layer (PROTOCOL.md section 3). In [0, 1]."""
    return 1.0 - coupling(r_t, r_ref)


@dataclass
class DriftEntry:
    """Drift of one named carrier between two checkpoints (PROTOCOL.md section 3).

    ``kind``: ``"direction"`` (a vector ``[d]`` or per-layer stack ``[L, d]``) or ``"subspace"`` (a
    basis ``[d, k]``, names starting ``"Q_"``). ``angle_deg``: the angle between the lines, per layer
    for a stack, or the mean principal angle of the subspaces (float64 tensor, ``[]`` or ``[L]``).
    ``direction_drift``: 1 − |cos|, same shape, for directions; ``None`` for subspaces.
    """

    kind: str
    angle_deg: torch.Tensor
    direction_drift: torch.Tensor | None


def drift_report(carriers_a: dict[str, torch.Tensor], carriers_b: dict[str, torch.Tensor]) -> dict[str, DriftEntry]:
    """Drift of every carrier between checkpoint a (the reference) and checkpoint b (PROTOCOL.md section 3).

    Both dicts map the same names to carriers. Names starting with ``"Q_"`` (e.g. ``"Q_H"``, ``"Q_R"``)
    are subspace bases ``[d, k]``; any other name (``"H"``, ``"R"``) is a direction ``[d]`` or a per-layer
    stack ``[L, d]`` compared row by row. Raises if the name sets or shapes differ.
    """
    if not isinstance(carriers_a, dict) or not isinstance(carriers_b, dict):
        raise TypeError("carriers_a and carriers_b must be dicts mapping names to tensors")
    if set(carriers_a) != set(carriers_b):
        raise ValueError(
            f"carrier names differ: only in a {sorted(set(carriers_a) - set(carriers_b))}, "
            f"only in b {sorted(set(carriers_b) - set(carriers_a))}; pass the same names"
        )
    if not carriers_a:
        raise ValueError("no carriers given")
    out: dict[str, DriftEntry] = {}
    for name in sorted(carriers_a):
        a, b = carriers_a[name], carriers_b[name]
        if name.startswith("Q_"):
            deg = torch.tensor(subspace_drift(b, a), dtype=_F64)
            out[name] = DriftEntry(kind="subspace", angle_deg=deg, direction_drift=None)
            continue
        a, b = _tensor(a, f"{name} (a)", (1, 2)), _tensor(b, f"{name} (b)", (1, 2))
        if a.shape != b.shape:
            raise ValueError(f"{name} has shape {tuple(a.shape)} in a but {tuple(b.shape)} in b")
        ua = a / _norms(a, f"{name} (a)").unsqueeze(-1)
        ub = b / _norms(b, f"{name} (b)").unsqueeze(-1)
        c = (ua * ub).sum(-1)
        sin = torch.linalg.vector_norm(ub - c.unsqueeze(-1) * ua, dim=-1)  # accurate for small angles
        c = c.abs().clamp(0.0, 1.0)
        angle = torch.rad2deg(torch.atan2(sin, c))
        out[name] = DriftEntry(kind="direction", angle_deg=angle, direction_drift=1.0 - c)
    return out


def behaviour_distance(b1: torch.Tensor, b2: torch.Tensor) -> float:
    """Behaviour-state distance ‖b1 − b2‖₂ (PROTOCOL.md section 3).

    ``b1, b2 [m]`` behaviour-state vectors, by default (HarmBench ASR, StrongREJECT score, XSTest
    any-refusal, benign utility), each in [0, 1] (the range is not enforced).
    """
    b1, b2 = _tensor(b1, "b1", 1), _tensor(b2, "b2", 1)
    if b1.shape != b2.shape:
        raise ValueError(f"b1 and b2 must have the same length, got {b1.shape[0]} and {b2.shape[0]}")
    return float(torch.linalg.vector_norm(b1 - b2))
