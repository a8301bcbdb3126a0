"""Does a harmful/harmless pair of prompt sets measure what a reference pair measures? A confound check.

A pair of sets that differ in more than harmfulness (request type, final punctuation, length) gives
carriers that pick up the difference too, and a coupling that reflects it. :func:`check_sets` fits the
unfiltered difference-of-means carriers (PROTOCOL.md 2.1, 2.2) of the user's sets and of reference sets
on the same model and compares them layer by layer:

    capture (one forward pass per prompt) -> H at t_inst, R at t_post_inst (eoi-1), per layer and per pair
        -> kappa_l = |cos(H_l, R_l)| of each pair (PROTOCOL 3), its mid-band mean (0.2L <= l < 0.8L)
        -> cos(H_user, H_ref), cos(R_user, R_ref) per layer (signed: both point harmful minus harmless)
        -> the noise floor: cos between carriers fitted on two random halves of the reference sets,
           averaged over ``n_splits`` seeded splits (halves of n/2 prompts: a conservative floor)
        -> verdict

Verdict: the sets agree when |kappa_user - kappa_ref| <= 0.05 (mid-band means) and the mid-band means of
cos(H_user, H_ref) and cos(R_user, R_ref) are each >= the reference split-half agreement - 0.1.

Besides the verdict, the check reports how many prompts of each set end with punctuation: where the
harmful and harmless sets of a pair differ there, t_inst is a different token in the two sets and H
carries the punctuation (the public refusal_direction sets differ so: their harmful prompts mostly end
with a word, their Alpaca harmless prompts with a full stop).

A reference pair is only as good as its own matching: agreement with it means "measures what the
reference measures", confounds included. On SmolLM2-135M the refusal_direction carriers mostly encode
request form (see pysafegeom/datasets/README.md), so form-matched sets disagree with them.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import validate as V
from ..errors import InvalidArgument, InvalidType, MissingFile
from ..protocol.metrics import layer_cos  # noqa: F401  (re-exported)

KAPPA_TOLERANCE = 0.05   # |kappa_user - kappa_ref| allowed, mid-band means
AGREEMENT_MARGIN = 0.1   # cos(user, ref) may fall this far below the reference split-half agreement
MIN_PROMPTS = 4          # per set: each split half needs at least two prompts
ENDING_GAP = 0.25        # share-ending-in-punctuation gap between harmful and harmless that is reported
SET_NAMES = ("harmful", "harmless", "reference_harmful", "reference_harmless")


@dataclass
class SetCheck:
    """The comparison of the user's sets with the reference sets on one model.

    Per-layer lists are indexed like ``layers`` (resid_pre indices; ``L`` = after the last block) and
    hold ``nan`` where a carrier is zero (layer 0 at the template positions, where every prompt has the
    same token). ``band = (lo, hi)``: the mid band lo <= l < hi; ``*_mid`` are nan-means over it.
    ``kappa_difference`` = user - reference. ``split_half_h`` / ``split_half_r``: the reference sets'
    split-half agreement (noise floor); ``user_split_half_*_mid``: the same for the user's sets (not part
    of the verdict: how reliable the user's own carriers are). ``endings``: per set, the share of prompts whose last character
    is not a letter or digit. ``failures``: one sentence per failed check (empty when ``passed``).
    """

    layers: list[int]
    band: tuple[int, int]
    position: str
    kappa_user: list[float]
    kappa_reference: list[float]
    cos_h: list[float]
    cos_r: list[float]
    split_half_h: list[float]
    split_half_r: list[float]
    kappa_user_mid: float
    kappa_reference_mid: float
    kappa_difference: float
    cos_h_mid: float
    cos_r_mid: float
    split_half_h_mid: float
    split_half_r_mid: float
    user_split_half_h_mid: float
    user_split_half_r_mid: float
    counts: dict[str, int]
    endings: dict[str, float]
    n_splits: int
    seed: int
    strip_final_punctuation: bool = False
    kappa_tolerance: float = KAPPA_TOLERANCE
    agreement_margin: float = AGREEMENT_MARGIN
    passed: bool = False
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (nan becomes None)."""
        from .._io import json_safe

        return json_safe(asdict(self))

    def summary(self) -> list[str]:
        """Plain sentences: the numbers, the verdict, and why it failed."""
        lo, hi = self.band
        c = self.counts
        out = [
            f"User sets: {c['harmful']} harmful and {c['harmless']} harmless prompts; reference sets: "
            f"{c['reference_harmful']} harmful and {c['reference_harmless']} harmless.",
            f"Coupling kappa = |cos(H, R)| at {self.position}, mean over the mid band (layers {lo}-{hi - 1}): "
            f"{_f(self.kappa_user_mid)} for the user's sets and {_f(self.kappa_reference_mid)} for the reference sets "
            f"(difference {_f(self.kappa_difference, sign=True)}; allowed ±{self.kappa_tolerance:g}).",
            f"Agreement of the harmfulness carriers, mid-band mean cos(H_user, H_ref): {_f(self.cos_h_mid)}; "
            f"the reference sets' split-half agreement is {_f(self.split_half_h_mid)} "
            f"(so at least {_f(self.split_half_h_mid - self.agreement_margin)} is needed).",
            f"Agreement of the refusal carriers, mid-band mean cos(R_user, R_ref): {_f(self.cos_r_mid)}; "
            f"the reference sets' split-half agreement is {_f(self.split_half_r_mid)} "
            f"(so at least {_f(self.split_half_r_mid - self.agreement_margin)} is needed).",
            f"For comparison, the user's own sets have a split-half agreement of {_f(self.user_split_half_h_mid)} (H) "
            f"and {_f(self.user_split_half_r_mid)} (R).",
        ]
        if self.passed:
            out.append("Verdict: the user's sets agree with the reference sets.")
        else:
            out.append("Verdict: the user's sets do not agree with the reference sets, so they may be confounded "
                       "(they may differ in more than harmfulness, e.g. in request type, domain or length).")
            out += self.failures
        return out + self.notes


def _f(x: float, sign: bool = False) -> str:
    if x != x:
        return "undefined"
    return f"{x:+.3f}" if sign else f"{x:.3f}"


# ------------------------------------------------------------------------------------------- inputs


def _resolve(name: str, spec: Any) -> list[str]:
    """Prompt texts from a list of strings (or :class:`~pysafegeom.data.Prompt`), a file path or a bundled-set name."""
    from ..data import DEFAULT_SETS, DataError, Prompt, load_prompts

    if isinstance(spec, (str, os.PathLike)):
        if not (isinstance(spec, str) and spec in DEFAULT_SETS) and not Path(spec).exists():
            raise MissingFile(f"{name}: {os.fspath(spec)!r} is neither a file nor a bundled set "
                              f"({', '.join(DEFAULT_SETS)}); give a prompt file or a list of strings")
        try:
            texts = [p.text for p in load_prompts(spec, role=name.removeprefix("reference_"))]
        except DataError as exc:
            raise DataError(f"{name}: {exc}") from None
    elif isinstance(spec, Sequence) and not isinstance(spec, (bytes, bytearray)):
        items = list(spec)
        texts = V.prompt_list(name, [p.text if isinstance(p, Prompt) else p for p in items])
    else:
        raise InvalidType(f"{name} must be a list of prompt strings or a path to a prompt file, got "
                          f"{type(spec).__name__} {V.show(spec)}")
    texts = [t.strip() for t in texts]
    if len(texts) < MIN_PROMPTS:
        raise InvalidArgument(f"{name} has {len(texts)} prompt(s); the check needs at least {MIN_PROMPTS} per set "
                              "(the reference split halves need two each)")
    return texts


def _ending_share(texts: list[str]) -> float:
    return sum(not t[-1].isalnum() for t in texts) / len(texts)


def _strip_end(t: str) -> str:
    return t.rstrip(".?! \t\n") or t


# ------------------------------------------------------------------------------------------ numbers


def _band_mean(v: torch.Tensor, idx: list[int]) -> float:
    x = v[idx]
    x = x[~torch.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


def split_half(X_pos: torch.Tensor, X_neg: torch.Tensor, n_splits: int, seed: int) -> torch.Tensor:
    """Split-half agreement of difference-of-means carriers: ``X_pos [n, n_layers, d]``, ``X_neg [m, n_layers, d]``.

    For each of ``n_splits`` seeded random splits of both sets into halves, cos per layer between the
    carrier fitted on the first halves and the one fitted on the second; returns the nan-mean over splits,
    ``[n_layers]`` float64.
    """
    out = []
    for s in range(n_splits):
        g = torch.Generator().manual_seed(seed * 7919 + s)
        p = torch.randperm(X_pos.shape[0], generator=g)
        q = torch.randperm(X_neg.shape[0], generator=g)
        hp, hq = X_pos.shape[0] // 2, X_neg.shape[0] // 2
        c1 = X_pos[p[:hp]].double().mean(0) - X_neg[q[:hq]].double().mean(0)
        c2 = X_pos[p[hp:]].double().mean(0) - X_neg[q[hq:]].double().mean(0)
        out.append(layer_cos(c1, c2))
    return torch.stack(out).nanmean(0)


def verdict(kappa_user_mid: float, kappa_reference_mid: float, cos_h_mid: float, cos_r_mid: float,
            split_half_h_mid: float, split_half_r_mid: float, *, kappa_tolerance: float = KAPPA_TOLERANCE,
            agreement_margin: float = AGREEMENT_MARGIN) -> tuple[bool, list[str]]:
    """``(passed, failures)``: the three checks of the module docstring, one sentence per failed check."""
    failures = []
    diff = kappa_user_mid - kappa_reference_mid
    if not abs(diff) <= kappa_tolerance:
        failures.append(f"Failed: the coupling differs by {_f(diff, sign=True)}, more than ±{kappa_tolerance:g} "
                        f"(kappa {_f(kappa_user_mid)} against {_f(kappa_reference_mid)}).")
    for what, got, floor in (("harmfulness carriers H", cos_h_mid, split_half_h_mid),
                             ("refusal carriers R", cos_r_mid, split_half_r_mid)):
        if not got >= floor - agreement_margin:
            failures.append(f"Failed: the {what} agree to {_f(got)}, below the reference split-half agreement "
                            f"{_f(floor)} minus {agreement_margin:g}.")
    return not failures, failures


# -------------------------------------------------------------------------------------------- check


def check_sets(
    model,
    tokenizer,
    harmful,
    harmless,
    reference_harmful,
    reference_harmless,
    *,
    template: str | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    n_splits: int = 5,
    strip_final_punctuation: bool = False,
) -> SetCheck:
    """Compare the carriers and coupling of the user's ``harmful`` / ``harmless`` sets with reference sets.

    Each set: a list of prompt strings (or :class:`~pysafegeom.data.Prompt`), a path that
    :func:`pysafegeom.data.load_prompts` reads, or a bundled-set name. Every set needs at least 4
    prompts, and the harmful and harmless sets of a pair must differ. ``template``: chat template (default:
    the tokenizer's). ``seed`` / ``n_splits``: the reference split halves. ``strip_final_punctuation``:
    drop trailing ``. ? !`` from every prompt of all four sets before the check, so that t_inst is the last
    word everywhere (``endings`` still describes the sets as given). See the module docstring for what is
    measured and the verdict. Returns a :class:`SetCheck`.
    """
    from ..models import ModelAdapter
    from ..protocol import metrics as M
    from ..protocol.capture import capture
    from ..protocol.carriers import fit_carriers

    V.is_model("model", model)
    V.is_tokenizer("tokenizer", tokenizer)
    seed = V.integer("seed", seed)
    n_splits = V.positive_int("n_splits", n_splits)
    batch_size = V.optional_positive_int("batch_size", batch_size)
    progress = V.boolean("progress", progress)
    strip_final_punctuation = V.boolean("strip_final_punctuation", strip_final_punctuation)
    specs = dict(zip(SET_NAMES, (harmful, harmless, reference_harmful, reference_harmless)))
    texts = {name: _resolve(name, spec) for name, spec in specs.items()}
    endings = {name: _ending_share(t) for name, t in texts.items()}
    if strip_final_punctuation:
        texts = {name: [_strip_end(x) for x in t] for name, t in texts.items()}
    for a, b in (("harmful", "harmless"), ("reference_harmful", "reference_harmless")):
        if sorted(texts[a]) == sorted(texts[b]):
            raise InvalidArgument(f"{a} and {b} hold the same prompts; a check needs two different sets")

    # one capture; a set given twice (e.g. the reference equal to the user's sets) runs once
    unique: dict[tuple[str, ...], str] = {}
    alias = {name: unique.setdefault(tuple(t), name) for name, t in texts.items()}
    cap = capture(model, tokenizer, {name: list(key) for key, name in unique.items()}, template=template,
                  batch_size=batch_size, progress=progress)

    L = ModelAdapter(model).n_layers
    lo, hi = M.mid_band(L)
    idx = [i for i, l in enumerate(cap.layers) if lo <= l < hi]
    position = "eoi-1"

    def carriers(pos_name: str, neg_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        car = fit_carriers(cap, alias[pos_name], alias[neg_name])
        return car.H, car.R[:, car.post_names.index(position)]

    H_u, R_u = carriers("harmful", "harmless")
    H_r, R_r = carriers("reference_harmful", "reference_harmless")
    kappa_u, kappa_r = layer_cos(H_u, R_u).abs(), layer_cos(H_r, R_r).abs()
    cos_h, cos_r = layer_cos(H_u, H_r), layer_cos(R_u, R_r)
    rows = {name: cap.per_prompt[alias[name]] for name in SET_NAMES}
    sh_h = split_half(rows["reference_harmful"]["t_inst"], rows["reference_harmless"]["t_inst"], n_splits, seed)
    sh_r = split_half(rows["reference_harmful"][position], rows["reference_harmless"][position], n_splits, seed)
    ush_h = split_half(rows["harmful"]["t_inst"], rows["harmless"]["t_inst"], n_splits, seed)
    ush_r = split_half(rows["harmful"][position], rows["harmless"][position], n_splits, seed)

    mids = {k: _band_mean(v, idx) for k, v in
            (("ku", kappa_u), ("kr", kappa_r), ("ch", cos_h), ("cr", cos_r), ("sh", sh_h), ("sr", sh_r))}
    passed, failures = verdict(mids["ku"], mids["kr"], mids["ch"], mids["cr"], mids["sh"], mids["sr"])

    notes = []
    for pair, (a, b) in (("user", ("harmful", "harmless")), ("reference", ("reference_harmful", "reference_harmless"))):
        if abs(endings[a] - endings[b]) > ENDING_GAP:
            notes.append(f"Note: in the {pair} sets {endings[a]:.0%} of the harmful and {endings[b]:.0%} of the harmless "
                         "prompts end with punctuation, so t_inst is a different token in the two sets and H can carry "
                         "the punctuation rather than harmfulness"
                         + (" (final punctuation was stripped for this check)." if strip_final_punctuation else
                            "; strip_final_punctuation=True (--strip-final-punctuation) removes it."))

    def lst(v: torch.Tensor) -> list[float]:
        return [float(x) for x in v]

    return SetCheck(
        layers=list(cap.layers), band=(lo, hi), position=position,
        kappa_user=lst(kappa_u), kappa_reference=lst(kappa_r), cos_h=lst(cos_h), cos_r=lst(cos_r),
        split_half_h=lst(sh_h), split_half_r=lst(sh_r),
        kappa_user_mid=mids["ku"], kappa_reference_mid=mids["kr"], kappa_difference=mids["ku"] - mids["kr"],
        cos_h_mid=mids["ch"], cos_r_mid=mids["cr"], split_half_h_mid=mids["sh"], split_half_r_mid=mids["sr"],
        user_split_half_h_mid=_band_mean(ush_h, idx), user_split_half_r_mid=_band_mean(ush_r, idx),
        counts={name: len(t) for name, t in texts.items()}, endings=endings, n_splits=n_splits, seed=seed,
        strip_final_punctuation=strip_final_punctuation, passed=passed, failures=failures, notes=notes,
    )


__all__ = ["AGREEMENT_MARGIN", "KAPPA_TOLERANCE", "SetCheck", "check_sets", "layer_cos", "split_half", "verdict"]
