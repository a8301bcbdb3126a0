"""Carrier selection (PROTOCOL.md section 2.4, Arditi's algorithm) with an explicit no-admissible outcome.

For each candidate (layer l, post-instruction position i) with r = R_i^(l):

* ``bypass``: mean refusal score on harmful validation prompts with r-hat ablated at all layers and positions;
* ``induce``: mean refusal score on harmless validation prompts with raw r added at layer l;
* ``kl``: mean KL(p_base || p_ablated) of the last-position next-token distribution on harmless prompts.

**Behaviour-filtered validation sets** (``filter_val=True``, Arditi's ``filter_val``): the harmful
validation prompts are kept only if refused at baseline (refusal score > 0), the harmless ones only if
answered (score < 0). A side that keeps fewer than ``min_val_filtered`` prompts falls back to its
unfiltered set (noted). Every candidate is scored once on all rows; its scores on the unfiltered and on the
filtered rows are both kept (they come from the same forwards), and the selection uses the filtered ones.

**Admissibility.** A candidate is admissible unless a score is NaN, l >= int(0.8 L), ``induce`` fails
:data:`INDUCE_RULE` or its KL exceeds the KL threshold of the rule in force:

* ``kl_rule="fixed"``: Arditi's ``kl <= kl_threshold`` (0.1). When none survives, the relaxed threshold
  (0.2) is tried and recorded (section 10.4); when none survives that either, the outcome says so.
* ``kl_rule="calibrated"`` (default): ``kl <= tau_cal`` with
  ``tau_cal = max(kl_threshold, percentile_p(KL of n_kl_controls random unit directions))``; the random
  directions are ablated exactly like the candidates (every layer, all positions) on the same harmless
  prompts. Arditi's 0.1 was set on 7B models, where ablating a random direction costs almost nothing;
  on a small model the same ablation already moves the next-token distribution by about 0.1, so a fixed
  0.1 rejects candidates at the noise level. ``tau_cal`` admits a candidate that disturbs harmless
  prompts no more than the upper quartile (by default) of random directions do, and never less strictly
  than Arditi (docs/protocol.md says why p = 75). There is no further relaxation under this rule.

**Induce rule** (:data:`INDUCE_RULE`, ``">= 0"``): admissible needs ``induce >= 0``. This is Arditi's code
(``induce_score < 0.0`` drops a candidate, PROTOCOL 2.4 [C]); PROTOCOL 10.4 writes "induce > 0", which
differs only for a score of exactly 0. ``induce_rule="> 0"`` gives the strict form.

The admissible candidate with the lowest bypass score is selected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
from tqdm.auto import tqdm

from .. import validate as V
from ..interventions.hooks import ablate, add, control_directions
from ..models.forward import SharedPrefixBatches, kl_next_token as _kl
from ..prompts import EncodedPrompts, encode_prompts
from ..refusal import refusal_scores_from_logits
from .carriers import Carriers

#: The one induce rule: a candidate is admissible only if ``induce >= 0`` (Arditi's code; see module docstring).
INDUCE_RULE = ">= 0"
INDUCE_RULES = (">= 0", "> 0")
KL_RULES = ("calibrated", "fixed")
_NAN = float("nan")
_SCORES = ("bypass", "induce", "kl", "bypass_unfiltered", "induce_unfiltered", "kl_unfiltered")


@dataclass
class Candidate:
    """One (layer, position) candidate. ``bypass``/``induce``/``kl`` are on the validation sets the selection
    used (behaviour-filtered where it applied); ``*_unfiltered`` on all validation prompts. ``admissible``
    is under the KL rule in force (``Selection.kl_tau``); ``admissible_fixed`` at ``kl_threshold`` and
    ``admissible_calibrated`` at ``tau_cal``, both on the sets the selection used."""

    layer: int
    position: str
    bypass: float
    induce: float
    kl: float
    pruned: bool  # in the last 20% of layers: not evaluated
    admissible: bool = False
    bypass_unfiltered: float = _NAN
    induce_unfiltered: float = _NAN
    kl_unfiltered: float = _NAN
    admissible_fixed: bool = False
    admissible_calibrated: bool = False


@dataclass
class Selection:
    """All candidates' scores, the baseline, the KL calibration and the outcome.

    ``outcome``: ``"selected"`` (at the threshold of the rule in force), ``"selected_relaxed"`` (fixed rule,
    only at the relaxed threshold) or ``"none"``; ``rule`` says which rule produced the selected carrier
    (``"calibrated"``, ``"fixed"``, ``"fixed_relaxed"``, None). ``layer``/``position`` are None when nothing
    was admissible. ``n_admissible`` counts under the rule in force (``kl_tau``), ``n_admissible_relaxed``
    at the relaxed fixed threshold, ``n_admissible_fixed`` / ``n_admissible_calibrated`` at ``kl_threshold``
    / ``tau_cal``, all on the sets the selection used. ``n_admissible_unfiltered`` / ``n_admissible_filtered``
    (keys ``fixed``, ``calibrated``, ``relaxed``) count on all validation rows and on the behaviour-filtered
    rows (with the per-side fallback), whichever the selection used, each with its own ``tau_cal``. ``kl_controls`` are the mean
    KLs of the random unit directions on the harmless set the selection used (``kl_controls_unfiltered``
    on all harmless prompts); ``tau_cal`` / ``tau_cal_unfiltered`` the calibrated thresholds from them.
    ``n_val``: prompts before (``harmful``, ``harmless``) and after (``harmful_filtered``, ``harmless_filtered``)
    the behaviour filter; ``val_filtered``: whether each side of the selection used its filtered set. ``baseline_*`` are the
    mean baseline scores on the sets used, ``baseline_unfiltered`` on all prompts.
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
    # added with the calibrated rule; the defaults describe a selection made before it (fixed rule, no filter)
    kl_rule: str = "fixed"
    induce_rule: str = INDUCE_RULE
    rule: str | None = None
    kl_tau: float | None = None
    tau_cal: float | None = None
    tau_cal_unfiltered: float | None = None
    kl_percentile: float | None = None
    n_kl_controls: int = 0
    seed: int | None = None
    kl_controls: list[float] = field(default_factory=list)
    kl_controls_unfiltered: list[float] = field(default_factory=list)
    n_admissible_fixed: int | None = None
    n_admissible_calibrated: int | None = None
    n_admissible_unfiltered: dict[str, int] = field(default_factory=dict)
    n_admissible_filtered: dict[str, int] = field(default_factory=dict)
    filter_val: bool = False
    min_val_filtered: int | None = None
    val_filtered: dict[str, bool] = field(default_factory=dict)
    n_val: dict[str, int] = field(default_factory=dict)
    baseline_unfiltered: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain JSON-safe dict (NaN scores become None)."""
        d = asdict(self)
        for c in d["candidates"]:
            for k in _SCORES:
                if c[k] != c[k]:
                    c[k] = None
        for k in ("kl_controls", "kl_controls_unfiltered"):
            d[k] = [None if v != v else v for v in d[k]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Selection":
        """Inverse of :meth:`to_dict`; also loads dicts saved before the calibrated rule (fixed rule, no filter)."""
        d = dict(d)
        names = {f.name for f in fields(Candidate)}
        d["candidates"] = [Candidate(**{k: (_NAN if v is None and k in _SCORES else v) for k, v in c.items() if k in names})
                           for c in d["candidates"]]
        for k in ("kl_controls", "kl_controls_unfiltered"):
            if k in d:
                d[k] = [_NAN if v is None else v for v in d[k]]
        if "rule" not in d:  # an old dict: the fixed rule was the only one
            d["rule"] = {"selected": "fixed", "selected_relaxed": "fixed_relaxed"}.get(d.get("outcome"))
            d.setdefault("kl_tau", d.get("kl_threshold"))
            for c in d["candidates"]:
                c.admissible_fixed = c.admissible
                if c.bypass_unfiltered != c.bypass_unfiltered:
                    c.bypass_unfiltered, c.induce_unfiltered, c.kl_unfiltered = c.bypass, c.induce, c.kl
        keep = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in keep})


# --- argument checks ---------------------------------------------------------------------------------

def _encode(tokenizer, prompts, name: str, template, system) -> EncodedPrompts:
    """``prompts`` (a list of strings or an :class:`EncodedPrompts`) as EncodedPrompts, checked non-empty."""
    if isinstance(prompts, EncodedPrompts):
        if not prompts.rows:
            raise ValueError(f"{name} is empty: selection needs non-empty harmful and harmless validation sets")
        return prompts
    if isinstance(prompts, str):
        raise TypeError(f"{name} must be a list of strings or an EncodedPrompts, not one string")
    try:
        prompts = list(prompts)
    except TypeError:
        raise TypeError(f"{name} must be a list of strings or an EncodedPrompts, got {type(prompts).__name__}") from None
    if not prompts:
        raise ValueError(f"{name} is empty: selection needs non-empty harmful and harmless validation sets")
    return encode_prompts(tokenizer, prompts, template=template, system=system)


def _percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0 < p <= 100) with linear interpolation (numpy's default)."""
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), p / 100.0))


def _mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return float(x[mask].mean())


SHARED_PREFIX = True  # run the prompts' shared template prefix once per batch (False: every row in full)


def _is_admissible(c: Candidate, tau: float, induce_rule: str) -> bool:
    """Section 2.4's filter at KL threshold ``tau``: evaluated, no NaN score, KL <= tau, induce by ``induce_rule``."""
    if c.pruned or not all(v == v for v in (c.bypass, c.induce, c.kl)):
        return False
    ok_induce = c.induce >= 0.0 if induce_rule == ">= 0" else c.induce > 0.0
    return ok_induce and c.kl <= tau


def select_carrier(
    model,
    tokenizer,
    carriers: Carriers,
    harmful_val: "list[str] | EncodedPrompts",
    harmless_val: "list[str] | EncodedPrompts",
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
    filter_val: bool = True,
    min_val_filtered: int = 4,
    kl_rule: str = "calibrated",
    n_kl_controls: int = 16,
    kl_percentile: float = 75.0,
    seed: int = 0,
    induce_rule: str = INDUCE_RULE,
) -> Selection:
    """Score every candidate carrier and select the admissible one with the lowest bypass score.

    ``harmful_val`` / ``harmless_val``: lists of instructions, or :class:`~pysafegeom.prompts.EncodedPrompts`
    already formatted (then ``template``/``system`` are not used for them; both must share one template).
    ``filter_val``: behaviour-filter the validation sets from the baseline refusal scores (harmful kept if
    score > 0, harmless if < 0); a side keeping fewer than ``min_val_filtered`` prompts uses its unfiltered
    set. ``kl_rule``: ``"calibrated"`` (``kl <= max(kl_threshold, percentile_{kl_percentile}`` of the KLs of
    ``n_kl_controls`` random unit directions drawn with ``seed``) or ``"fixed"`` (``kl <= kl_threshold``, then
    ``relaxed_threshold``). The random directions are scored whenever ``n_kl_controls >= 1``, so both counts
    are reported under either rule. ``induce_rule``: see :data:`INDUCE_RULE`. See the module docstring.
    """
    kl_threshold = V.finite_float("kl_threshold", kl_threshold, lo=0.0)
    relaxed_threshold = V.finite_float("relaxed_threshold", relaxed_threshold, lo=0.0)
    if relaxed_threshold < kl_threshold:
        raise ValueError(f"relaxed_threshold ({relaxed_threshold}) must be >= kl_threshold ({kl_threshold})")
    if not isinstance(kl_rule, str) or kl_rule not in KL_RULES:
        raise ValueError(f"kl_rule must be one of {KL_RULES}, got {kl_rule!r}")
    if not isinstance(induce_rule, str) or induce_rule not in INDUCE_RULES:
        raise ValueError(f"induce_rule must be one of {INDUCE_RULES}, got {induce_rule!r}")
    kl_percentile = V.finite_float("kl_percentile", kl_percentile, lo=0.0, hi=100.0, lo_open=True)
    n_kl_controls = V.integer("n_kl_controls", n_kl_controls, lo=1 if kl_rule == "calibrated" else 0,
                              hint="the calibrated rule needs random-direction controls")
    min_val_filtered = V.positive_int("min_val_filtered", min_val_filtered)
    seed = V.nonneg_int("seed", seed)
    batch_size = V.positive_int("batch_size", batch_size)
    max_layer_frac = V.finite_float("max_layer_frac", max_layer_frac, lo=0.0, hi=1.0, lo_open=True)
    if not isinstance(filter_val, bool):
        raise TypeError(f"filter_val must be a bool, got {type(filter_val).__name__}")
    if not isinstance(carriers, Carriers):
        raise TypeError(f"carriers must be a Carriers, got {type(carriers).__name__}")
    refusal_tokens = list(refusal_tokens) if refusal_tokens is not None else []
    if not refusal_tokens:
        raise ValueError("refusal_tokens is empty: the refusal score needs at least one token id")
    enc_h = _encode(tokenizer, harmful_val, "harmful_val", template, system)
    enc_l = _encode(tokenizer, harmless_val, "harmless_val", template, system)
    if (enc_h.split.prefix, enc_h.split.suffix_ids) != (enc_l.split.prefix, enc_l.split.suffix_ids):
        raise ValueError("harmful_val and harmless_val were encoded with different templates")

    from ..models import ModelAdapter

    ad = ModelAdapter(model)
    L, d = ad.n_layers, ad.d_model
    cut = int(max_layer_frac * L)
    positions = list(positions) if positions else list(carriers.post_names)
    bad = [p for p in positions if p not in carriers.post_names]
    if bad:
        raise ValueError(f"unknown positions {bad}; the carriers have {carriers.post_names}")
    layers = [l for l in (layers if layers is not None else carriers.layers) if l < L]
    bad = [l for l in layers if l not in carriers.layers]
    if bad:
        raise ValueError(f"layers {bad} are not among the carriers' layers {carriers.layers}")
    if not layers:
        raise ValueError(f"no candidate layers below the model's {L} blocks")

    nh, nl = len(enc_h.rows), len(enc_l.rows)
    both = EncodedPrompts(enc_h.split, list(enc_h.rows) + list(enc_l.rows), list(enc_h.instructions) + list(enc_l.instructions))
    grid = [(l, p) for l in layers for p in positions]
    with torch.no_grad():
        device = ad.device  # the embedding's device (also where a model placed over several devices returns logits)
        # the template's shared prefix run once per batch (every hook here edits all positions)
        min_prefix = 2 if SHARED_PREFIX else None
        both_s = SharedPrefixBatches(tokenizer, both, batch_size, device, min_prefix)
        harmless_s = SharedPrefixBatches(tokenizer, enc_l, batch_size, device, min_prefix)

        def logits_both():
            return both_s.last_logits(model)

        def logits_harmless():
            return harmless_s.last_logits(model)

        base = logits_both()
        base_scores = refusal_scores_from_logits(base, refusal_tokens).cpu()

        # behaviour filter of the validation rows (Arditi filter_val); per-side fallback to the unfiltered set
        notes: list[str] = []
        all_h, all_l = torch.ones(nh, dtype=torch.bool), torch.ones(nl, dtype=torch.bool)
        pass_h, pass_l = base_scores[:nh] > 0, base_scores[nh:] < 0
        n_hf, n_lf = int(pass_h.sum()), int(pass_l.sum())
        ok = {"harmful": n_hf >= min_val_filtered, "harmless": n_lf >= min_val_filtered}
        filt = (pass_h if ok["harmful"] else all_h, pass_l if ok["harmless"] else all_l)
        unfilt = (all_h, all_l)
        used = filt if filter_val else unfilt
        val_filtered = {side: filter_val and ok[side] for side in ok}
        if filter_val:
            for side, n_kept, n_all, what in (("harmful", n_hf, nh, "refused (score > 0)"),
                                              ("harmless", n_lf, nl, "answered (score < 0)")):
                if not ok[side]:
                    notes.append(f"behaviour filter kept {n_kept} of {n_all} {side} validation prompts {what}, fewer "
                                 f"than min_val_filtered = {min_val_filtered}; the {side} side uses all {n_all}")

        # KL controls: random unit directions ablated like the candidates, on the harmless prompts
        ctrl_rows = []
        dirs = control_directions(d, n_kl_controls, 1, seed=seed)[:, :, 0] if n_kl_controls else torch.zeros(0, d)
        for u in tqdm(dirs, desc="KL controls", unit="dir", disable=not progress or not n_kl_controls):
            with ablate(model, u.to(torch.float32)):
                ctrl_rows.append(_kl(base[nh:], logits_harmless()).cpu())

        rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = []  # per-prompt bypass, induce, kl
        cands: list[Candidate] = []
        for l, p in tqdm(grid, desc="selection", unit="cand", disable=not progress):
            if l >= cut:
                cands.append(Candidate(l, p, _NAN, _NAN, _NAN, pruned=True))
                rows.append(None)
                continue
            r = carriers.r_at(l, p).to(torch.float32)
            if not torch.isfinite(r).all() or r.norm() == 0:
                cands.append(Candidate(l, p, _NAN, _NAN, _NAN, pruned=False))
                rows.append(None)
                continue
            with ablate(model, r):
                abl = logits_both()
            with add(model, r, l, alpha=1.0):
                ind = logits_harmless()
            rows.append((refusal_scores_from_logits(abl[:nh], refusal_tokens).cpu(),
                         refusal_scores_from_logits(ind, refusal_tokens).cpu(), _kl(base[nh:], abl[nh:]).cpu()))
            cands.append(Candidate(l, p, _NAN, _NAN, _NAN, pruned=False))

    def scored(masks) -> list[Candidate]:
        """The candidates scored on the rows ``masks = (harmful, harmless)``."""
        mh, ml = masks
        return [c if rw is None else
                Candidate(c.layer, c.position, _mean(rw[0], mh), _mean(rw[1], ml), _mean(rw[2], ml), pruned=False)
                for c, rw in zip(cands, rows)]

    def tau_of(masks) -> tuple[list[float], float | None]:
        ctrl = [_mean(k, masks[1]) for k in ctrl_rows]
        finite = [v for v in ctrl if v == v]
        if n_kl_controls and not finite:
            raise FloatingPointError("every random-direction KL control is NaN; cannot calibrate the KL threshold")
        return ctrl, (max(kl_threshold, _percentile(finite, kl_percentile)) if finite else None)

    def count(cs: list[Candidate], tau_c: float | None) -> dict[str, int]:
        out = {"fixed": sum(_is_admissible(c, kl_threshold, induce_rule) for c in cs),
               "relaxed": sum(_is_admissible(c, relaxed_threshold, induce_rule) for c in cs)}
        if tau_c is not None:
            out["calibrated"] = sum(_is_admissible(c, tau_c, induce_rule) for c in cs)
        return out

    ctrl, tau_cal = tau_of(used)
    ctrl_unf, tau_cal_unf = tau_of(unfilt)
    _, tau_cal_filt = tau_of(filt)
    on_used, on_unf = scored(used), scored(unfilt)
    counts_unf, counts_filt = count(on_unf, tau_cal_unf), count(scored(filt), tau_cal_filt)
    for c, cu, cf in zip(cands, on_used, on_unf):
        c.bypass, c.induce, c.kl = cu.bypass, cu.induce, cu.kl
        c.bypass_unfiltered, c.induce_unfiltered, c.kl_unfiltered = cf.bypass, cf.induce, cf.kl
        c.admissible_fixed = _is_admissible(c, kl_threshold, induce_rule)
        c.admissible_calibrated = tau_cal is not None and _is_admissible(c, tau_cal, induce_rule)
        c.admissible = c.admissible_calibrated if kl_rule == "calibrated" else c.admissible_fixed
    kl_tau = tau_cal if kl_rule == "calibrated" else kl_threshold
    strict = [c for c in cands if c.admissible]
    relaxed = [c for c in cands if _is_admissible(c, relaxed_threshold, induce_rule)]
    if strict:
        best, outcome, rule = min(strict, key=lambda c: c.bypass), "selected", kl_rule
    elif kl_rule == "fixed" and relaxed:
        best, outcome, rule = min(relaxed, key=lambda c: c.bypass), "selected_relaxed", "fixed_relaxed"
        notes.append(f"no admissible carrier at KL <= {kl_threshold}; selected at the relaxed KL <= {relaxed_threshold}")
    elif kl_rule == "fixed":
        best, outcome, rule = None, "none", None
        notes.append(f"no admissible carrier at KL <= {kl_threshold} nor at the relaxed KL <= {relaxed_threshold}")
    else:
        best, outcome, rule = None, "none", None
        notes.append(f"no admissible carrier under the calibrated rule: KL <= tau_cal = {tau_cal:.4g} (the "
                     f"{kl_percentile:g}th percentile of {n_kl_controls} random unit directions, floored at "
                     f"{kl_threshold})")
    n_fixed = sum(c.admissible_fixed for c in cands)
    return Selection(
        cands, _mean(base_scores[:nh], used[0]), _mean(base_scores[nh:], used[1]), kl_threshold, relaxed_threshold,
        outcome, best.layer if best else None, best.position if best else None, len(strict), len(relaxed), notes,
        kl_rule=kl_rule, induce_rule=induce_rule, rule=rule, kl_tau=kl_tau, tau_cal=tau_cal, tau_cal_unfiltered=tau_cal_unf,
        kl_percentile=kl_percentile, n_kl_controls=n_kl_controls, seed=seed, kl_controls=ctrl,
        kl_controls_unfiltered=ctrl_unf, n_admissible_fixed=n_fixed,
        n_admissible_calibrated=sum(c.admissible_calibrated for c in cands) if tau_cal is not None else None,
        n_admissible_unfiltered=counts_unf, n_admissible_filtered=counts_filt,
        filter_val=filter_val, min_val_filtered=min_val_filtered, val_filtered=val_filtered,
        n_val={"harmful": nh, "harmless": nl, "harmful_filtered": n_hf, "harmless_filtered": n_lf},
        baseline_unfiltered={"harmful": _mean(base_scores[:nh], all_h), "harmless": _mean(base_scores[nh:], all_l)},
    )
