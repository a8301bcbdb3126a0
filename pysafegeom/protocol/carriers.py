"""Carriers (PROTOCOL.md section 2): the harmfulness carrier H and the refusal carrier R per layer.

* H^(l) = mu_{t_inst}^(l)(harmful) - mu_{t_inst}^(l)(harmless), over prompt sets (section 2.1).
* R_i^(l) = mu_i^(l)(harmful) - mu_i^(l)(harmless) at every post-instruction position i, over the
  behaviour-filtered sets (harmful prompts the model refuses, harmless ones it answers) when both keep at
  least ``min_filtered`` prompts, else over the unfiltered sets; which one was used is recorded
  (sections 2.2 and 10.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .capture import Capture

from ..refusal import REFUSAL_TOKEN_PHRASES as REFUSAL_PHRASES, find_refusal_tokens  # noqa: F401  (re-exported)


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
