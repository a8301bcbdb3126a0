"""Carriers (PROTOCOL.md section 2): the harmfulness carrier H and the refusal carrier R per layer.

* H^(l) = mu_{t_inst}^(l)(harmful) - mu_{t_inst}^(l)(harmless), over prompt sets (section 2.1).
* R_i^(l) = mu_i^(l)(harmful) - mu_i^(l)(harmless) at every post-instruction position i, over the
  behaviour-filtered sets (harmful prompts the model refuses, harmless ones it answers) when both keep at
  least ``min_filtered`` prompts, else over the unfiltered sets; which one was used is recorded
  (sections 2.2 and 10.1).
* :func:`fit_subspace`: the low-rank carriers Q_H (t_inst) and Q_R (a post position) of section 2.3 at one
  selected (layer, position), on the same (filtered or unfiltered) sets as R; :func:`layer_subspaces` the
  same at every captured layer (t_inst / eoi-1), to compare checkpoints at a common layer.
* :func:`unit_carriers`: ĥ and r̂ at every layer and position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .capture import Capture


@dataclass
class Carriers:
    """Difference-of-means carriers at every captured layer.

    ``H [n_layers, d]`` at ``t_inst``; ``R [n_layers, n_post, d]`` at the post-instruction positions
    named by ``post_names`` (``eoi-1`` is ``t_post_inst``); ``layers`` are resid_pre indices.
    ``r_fit`` is ``"filtered"`` or ``"unfiltered"`` and ``fit_note`` says why; ``counts`` gives the
    number of prompts behind each mean.
    """

    layers: list[int]
    post_names: list[str]
    H: torch.Tensor
    R: torch.Tensor
    r_fit: str
    fit_note: str
    counts: dict[str, int] = field(default_factory=dict)

    def r_at(self, layer: int, position: str = "eoi-1") -> torch.Tensor:
        return self.R[self.layers.index(layer), self.post_names.index(position)]

    def h_at(self, layer: int) -> torch.Tensor:
        return self.H[self.layers.index(layer)]


def fit_carriers(cap: Capture, harmful: str = "harmful", harmless: str = "harmless", min_filtered: int = 16) -> Carriers:
    """Fit H and R from a :class:`Capture` (see module docstring)."""
    for name in (harmful, harmless):
        if name not in cap.set_names:
            raise ValueError(f"capture has no set {name!r}; it has {cap.set_names}")
    mu_pos, mu_neg = cap.mean(harmful), cap.mean(harmless)
    H = mu_pos[:, 0] - mu_neg[:, 0]
    n_ref, n_comp = cap.count(harmful, refused=True), cap.count(harmless, refused=False)
    counts = {"harmful": cap.count(harmful), "harmless": cap.count(harmless),
              "harmful_refused": n_ref, "harmless_complied": n_comp}
    if not cap.scores:
        r_fit, note, R = "unfiltered", "no refusal scores were computed", mu_pos[:, 1:] - mu_neg[:, 1:]
    elif n_ref >= min_filtered and n_comp >= min_filtered:
        r_fit = "filtered"
        note = f"{n_ref} refused harmful and {n_comp} answered harmless prompts (>= {min_filtered} each)"
        R = cap.mean(harmful, refused=True)[:, 1:] - cap.mean(harmless, refused=False)[:, 1:]
    else:
        r_fit = "unfiltered"
        note = (f"behaviour filter left {n_ref} refused harmful and {n_comp} answered harmless prompts "
                f"(< {min_filtered}); fell back to the unfiltered sets")
        R = mu_pos[:, 1:] - mu_neg[:, 1:]
    if torch.allclose(H, torch.zeros_like(H)) and torch.allclose(R, torch.zeros_like(R)):
        raise ValueError("the harmful and harmless sets give identical means: are they the same prompts?")
    return Carriers(list(cap.layers), cap.position_names[1:], H, R, r_fit, note, counts)


# --- unit carriers and low-rank carriers (PROTOCOL 2.3) ---------------------------------------------------

def unit_carriers(carriers: Carriers) -> Carriers:
    """A copy of ``carriers`` with every H and R vector scaled to unit norm (ĥ, r̂); zero vectors (e.g. R at
    layer 0 at template positions, where every prompt has the same embedding) stay zero: they have no
    direction. Everything else (layers, names, fit, counts) is kept."""
    from dataclasses import replace

    def _unit(X: torch.Tensor) -> torch.Tensor:
        n = torch.linalg.vector_norm(X, dim=-1, keepdim=True)
        return torch.where(n > 0, X / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(X))

    return replace(carriers, H=_unit(carriers.H), R=_unit(carriers.R), counts=dict(carriers.counts))


@dataclass
class Subspace:
    """Low-rank carriers at one (layer, position): ``Q_H [d, k_H]`` at ``t_inst`` and ``Q_R [d, k_R]`` at
    ``position``, float64 with orthonormal columns (:func:`pysafegeom.protocol.metrics.low_rank_basis`).
    ``k`` is the size asked for; ``k_H``/``k_R`` can be smaller (the numerical rank of Δ, noted).
    ``filtered``: fitted on the refused harmful vs answered harmless prompts; ``counts`` the prompts used."""

    layer: int
    position: str
    k: int
    Q_H: torch.Tensor
    Q_R: torch.Tensor
    filtered: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def k_H(self) -> int:
        return int(self.Q_H.shape[1])

    @property
    def k_R(self) -> int:
        return int(self.Q_R.shape[1])


@dataclass
class LayerSubspaces:
    """:class:`Subspace`-style carriers at every captured layer, for comparing checkpoints at a common layer.

    ``Q_H [n_layers, d, k]`` at ``t_inst`` and ``Q_R [n_layers, d, k]`` at ``position`` (float64); a layer
    where Δ has numerical rank below ``k`` has its missing columns set to NaN and ``k_H[i]``/``k_R[i]`` say
    how many columns are real (use :meth:`at`, which trims them)."""

    layers: list[int]
    position: str
    k: int
    Q_H: torch.Tensor
    Q_R: torch.Tensor
    k_H: list[int]
    k_R: list[int]
    filtered: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def at(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Q_H [d, k_H], Q_R [d, k_R])`` at ``layer``, without the NaN padding."""
        i = self.layers.index(layer)
        return self.Q_H[i, :, : self.k_H[i]], self.Q_R[i, :, : self.k_R[i]]


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return k


def _rows(cap: Capture, harmful: str, harmless: str, positions: tuple[str, ...], filtered: bool):
    """Per-prompt rows ``{pos: (X_pos [n+, L, d], X_neg [n-, L, d])}`` of the sets to fit on, and their counts."""
    if not isinstance(filtered, bool):
        raise TypeError(f"filtered must be a bool, got {type(filtered).__name__}")
    for name in (harmful, harmless):
        if name not in cap.set_names:
            raise ValueError(f"capture has no set {name!r}; it has {cap.set_names}")
        missing = [p for p in positions if p not in cap.per_prompt.get(name, {})]
        if missing:
            raise ValueError(f"the capture kept no per-prompt rows of set {name!r} at {missing} (it kept "
                             f"{sorted(cap.per_prompt.get(name, {}))}); capture with keep_positions='all' or "
                             f"including {missing}")
    n_h = cap.per_prompt[harmful][positions[0]].shape[0]
    n_l = cap.per_prompt[harmless][positions[0]].shape[0]
    if filtered:
        if harmful not in cap.scores or harmless not in cap.scores:
            raise ValueError("filtered=True needs per-prompt refusal scores: capture with refusal_tokens=")
        # the same grouping as the capture's sums (and so as fit_carriers' R): refused iff score > 0
        m_pos, m_neg = cap.scores[harmful] > 0, ~(cap.scores[harmless] > 0)
        if not m_pos.any() or not m_neg.any():
            raise ValueError(f"the behaviour filter leaves {int(m_pos.sum())} refused {harmful!r} and "
                             f"{int(m_neg.sum())} answered {harmless!r} prompts; fit with filtered=False")
    else:
        m_pos, m_neg = torch.ones(n_h, dtype=torch.bool), torch.ones(n_l, dtype=torch.bool)
    out = {p: (cap.per_prompt[harmful][p][m_pos], cap.per_prompt[harmless][p][m_neg]) for p in positions}
    key = ("harmful_refused", "harmless_complied") if filtered else ("harmful", "harmless")
    return out, {key[0]: int(m_pos.sum()), key[1]: int(m_neg.sum())}


def _basis_upto(X_pos: torch.Tensor, X_neg: torch.Tensor, k: int, what: str, notes: list[str]) -> torch.Tensor:
    """``low_rank_basis`` of Δ = X_pos − μ(X_neg) with k lowered to the numerical rank of Δ (noted); [d, 0] when Δ = 0.

    The rows stay in the capture's float32, so the rank tolerance is float32's: duplicated prompts do not
    count as extra directions."""
    from .metrics import delta_rank, low_rank_basis

    mu = X_neg.double().mean(0)
    rank = delta_rank(X_pos, mu)
    kk = min(k, rank)
    if kk < k:
        notes.append(f"{what}: k lowered from {k} to {kk}, the numerical rank of Δ "
                     f"({X_pos.shape[0]} rows)" + ("; Δ is zero, no carrier" if kk == 0 else ""))
    if kk == 0:
        return torch.zeros(X_pos.shape[1], 0, dtype=torch.float64)
    return low_rank_basis(X_pos, mu, k=kk)


def fit_subspace(cap: Capture, layer: int, position: str, k: int = 3, *, harmful: str = "harmful",
                 harmless: str = "harmless", filtered: bool) -> Subspace:
    """Low-rank carriers at a selected (layer, position) (PROTOCOL 2.3), on the same sets as R.

    Q_R: the top-k right singular vectors of Δ = [x_j − μ(D⁻)], j ∈ D⁺, at ``position``; Q_H the same at
    ``t_inst``. ``filtered=True`` uses D⁺ = the refused harmful prompts and D⁻ = the answered harmless
    ones (per-prompt ``cap.scores``; pass ``filtered=(carriers.r_fit == "filtered")`` to match
    :func:`fit_carriers`), else the whole sets. Needs the capture's per-prompt rows at ``t_inst`` and
    ``position`` (``capture(..., keep_positions="all")`` for positions other than ``eoi-1``). When the
    sets are tiny or duplicated, k is lowered to the numerical rank of Δ with a note.
    """
    k = _check_k(k)
    if layer not in cap.layers:
        raise ValueError(f"layer {layer} was not captured; the capture has layers {cap.layers}")
    if position == "t_inst" or position not in cap.position_names:
        raise ValueError(f"position must be a post-instruction position {cap.position_names[1:]}, got {position!r}")
    rows, counts = _rows(cap, harmful, harmless, ("t_inst", position), filtered)
    li = cap.layers.index(layer)
    notes: list[str] = []
    Q_H = _basis_upto(rows["t_inst"][0][:, li], rows["t_inst"][1][:, li], k, f"Q_H (layer {layer}, t_inst)", notes)
    Q_R = _basis_upto(rows[position][0][:, li], rows[position][1][:, li], k, f"Q_R (layer {layer}, {position})", notes)
    return Subspace(layer, position, k, Q_H, Q_R, filtered, counts, notes)


def layer_subspaces(cap: Capture, k: int = 3, *, harmful: str = "harmful", harmless: str = "harmless",
                    filtered: bool, position: str = "eoi-1") -> LayerSubspaces:
    """Q_H (at ``t_inst``) and Q_R (at ``position``, default ``eoi-1`` = t_post_inst) at every captured layer,
    fitted as :func:`fit_subspace` does, so saved results of different checkpoints can be compared at any
    common layer."""
    k = _check_k(k)
    if position == "t_inst" or position not in cap.position_names:
        raise ValueError(f"position must be a post-instruction position {cap.position_names[1:]}, got {position!r}")
    rows, counts = _rows(cap, harmful, harmless, ("t_inst", position), filtered)
    d = rows["t_inst"][0].shape[-1]
    nl = len(cap.layers)
    QH = torch.full((nl, d, k), float("nan"), dtype=torch.float64)
    QR = torch.full((nl, d, k), float("nan"), dtype=torch.float64)
    kH, kR, notes = [], [], []
    for i, l in enumerate(cap.layers):
        qh = _basis_upto(rows["t_inst"][0][:, i], rows["t_inst"][1][:, i], k, f"Q_H (layer {l}, t_inst)", notes)
        qr = _basis_upto(rows[position][0][:, i], rows[position][1][:, i], k, f"Q_R (layer {l}, {position})", notes)
        QH[i, :, : qh.shape[1]], QR[i, :, : qr.shape[1]] = qh, qr
        kH.append(int(qh.shape[1]))
        kR.append(int(qr.shape[1]))
    return LayerSubspaces(list(cap.layers), position, k, QH, QR, kH, kR, filtered, counts, notes)
