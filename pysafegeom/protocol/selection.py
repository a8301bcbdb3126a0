"""Carrier selection (PROTOCOL.md section 2.4, Arditi's algorithm) with an explicit no-admissible outcome.

For each candidate (layer l, post-instruction position i) with r = R_i^(l):

* ``bypass``: mean refusal score on harmful validation prompts with r-hat ablated at all layers and positions;
* ``induce``: mean refusal score on harmless validation prompts with raw r added at layer l;
* ``kl``: mean KL(p_base || p_ablated) of the last-position next-token distribution on harmless prompts.

A candidate is admissible unless a score is NaN, l >= int(0.8 L), kl > threshold or induce < 0. The
admissible candidate with the lowest bypass score is selected. When none survives at the threshold
(0.1), the relaxed threshold (0.2) is tried and recorded (section 10.4); when none survives that either,
the outcome says so rather than picking one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from ..interventions.hooks import ablate, add
from ..models.forward import KL_EPS, kl_next_token as _kl, last_logits as _last_logits  # noqa: F401
from ..prompts import encode_batches as _batches
from ..refusal import refusal_scores_from_logits
from .carriers import Carriers


@dataclass
class Candidate:
    layer: int
    position: str
    bypass: float
    induce: float
    kl: float
    pruned: bool  # in the last 20% of layers: not evaluated
    admissible: bool = False


@dataclass
class Selection:
    """All candidates' scores, the baseline, and the outcome.

    ``outcome``: ``"selected"`` (at the threshold), ``"selected_relaxed"`` (only at the relaxed one) or
    ``"none"``. ``layer``/``position`` are None when nothing was admissible.
    """

    candidates: list[Candidate]
    baseline_harmful: float
    baseline_harmless: float
    kl_threshold: float
    relaxed_threshold: float
    outcome: str
    layer: int | None
    position: str | None
    n_admissible: int
    n_admissible_relaxed: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-safe dict (NaN scores become None)."""
        d = asdict(self)
        for c in d["candidates"]:
            for k in ("bypass", "induce", "kl"):
                if c[k] != c[k]:
                    c[k] = None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Selection":
        d = dict(d)
        nan = float("nan")
        d["candidates"] = [Candidate(**{k: (nan if v is None and k in ("bypass", "induce", "kl") else v) for k, v in c.items()})
                           for c in d["candidates"]]
        return cls(**d)


def select_carrier(
    model,
    tokenizer,
    carriers: Carriers,
    harmful_val: list[str],
    harmless_val: list[str],
    refusal_tokens: list[int],
    *,
    positions: list[str] | None = None,
    layers: list[int] | None = None,
    kl_threshold: float = 0.1,
    relaxed_threshold: float = 0.2,
    max_layer_frac: float = 0.8,
    template: str | None = None,
    system: str | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> Selection:
    """Score every candidate carrier and select the admissible one with the lowest bypass score."""
    if not harmful_val or not harmless_val:
        raise ValueError("selection needs non-empty harmful and harmless validation sets")
    from ..models import ModelAdapter

    L = ModelAdapter(model).n_layers
    cut = int(max_layer_frac * L)
    positions = positions or list(carriers.post_names)
    layers = [l for l in (layers if layers is not None else carriers.layers) if l < L]
    both = list(harmful_val) + list(harmless_val)
    nh = len(harmful_val)
    with torch.no_grad():
        device = next(model.parameters()).device
        both_b = _batches(tokenizer, both, template, system, batch_size, device)
        harmless_b = _batches(tokenizer, list(harmless_val), template, system, batch_size, device)
        base = _last_logits(model, both_b)
        base_scores = refusal_scores_from_logits(base, refusal_tokens)
        cands = []
        grid = [(l, p) for l in layers for p in positions]
        for l, p in tqdm(grid, desc="selection", unit="cand", disable=not progress):
            if l >= cut:
                cands.append(Candidate(l, p, float("nan"), float("nan"), float("nan"), pruned=True))
                continue
            r = carriers.r_at(l, p).to(torch.float32)
            if not torch.isfinite(r).all() or r.norm() == 0:
                cands.append(Candidate(l, p, float("nan"), float("nan"), float("nan"), pruned=False))
                continue
            with ablate(model, r):
                abl = _last_logits(model, both_b)
            with add(model, r, l, alpha=1.0):
                ind = _last_logits(model, harmless_b)
            bypass = refusal_scores_from_logits(abl[:nh], refusal_tokens).mean().item()
            kl = _kl(base[nh:], abl[nh:]).mean().item()
            induce = refusal_scores_from_logits(ind, refusal_tokens).mean().item()
            cands.append(Candidate(l, p, bypass, induce, kl, pruned=False))

    def admissible(c: Candidate, tau: float) -> bool:
        vals = (c.bypass, c.induce, c.kl)
        return not c.pruned and all(v == v for v in vals) and c.kl <= tau and c.induce >= 0.0

    strict = [c for c in cands if admissible(c, kl_threshold)]
    relaxed = [c for c in cands if admissible(c, relaxed_threshold)]
    for c in cands:
        c.admissible = admissible(c, kl_threshold)
    notes = []
    if strict:
        best, outcome = min(strict, key=lambda c: c.bypass), "selected"
    elif relaxed:
        best, outcome = min(relaxed, key=lambda c: c.bypass), "selected_relaxed"
        notes.append(f"no admissible carrier at KL <= {kl_threshold}; selected at the relaxed KL <= {relaxed_threshold}")
    else:
        best, outcome = None, "none"
        notes.append(f"no admissible carrier at KL <= {kl_threshold} nor at the relaxed KL <= {relaxed_threshold}")
    return Selection(
        cands, base_scores[:nh].mean().item(), base_scores[nh:].mean().item(), kl_threshold, relaxed_threshold,
        outcome, best.layer if best else None, best.position if best else None, len(strict), len(relaxed), notes,
    )
