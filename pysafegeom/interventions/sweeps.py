"""Intervention sweeps with matched random-direction controls (PROTOCOL.md section 4, "Sweeps" and "Controls").

``sweep(model, tokenizer, H, R, harmful, harmless, layer=l, kind="add")`` applies, for each carrier
(``"H"``, ``"R"``, ``"joint"``, optionally ``"H (all positions)"``) and each value, one intervention and
measures its effect with one forward pass per prompt (no generation), at the last prompt position
(``t_post_inst``):

* ``refusal_harmful`` / ``refusal_harmless``: change of the mean refusal score (PROTOCOL 2.4, log-odds of
  the refusal tokens) on the harmful / harmless prompts, intervened minus baseline;
* ``kl_harmless``: mean KL(base || intervened) of the next-token distribution on the harmless prompts.

Interventions, with ``h_hat = H/||H||`` and ``r_hat = R/||R||`` (``H``, ``R``: raw difference-of-means
carriers read at ``layer``):

* ``kind="add"`` (ActAdd at ``layer``): ``x <- x + alpha * m * u``, ``alpha`` in units of the carrier's own
  norm (default ``ADD_ALPHAS``). H: ``u = h_hat``, ``m = ||H||``; R: ``u = r_hat``, ``m = ||R||``; joint:
  ``u = (h_hat + r_hat) / ||h_hat + r_hat||``, the unit bisector of the two carriers (the direction in
  their span that moves both equally), with ``m = (||H|| + ||R||) / 2``.
* ``kind="ablate"`` (partial directional ablation at every layer): ``x <- x - beta * Q Q^T x`` (default
  ``ABLATE_BETAS``). H: ``Q = h_hat``; R: ``Q = r_hat``; joint: ``Q`` an orthonormal basis of span(h_hat, r_hat).

Positions (PROTOCOL 4: "the R-carrier (at t_post-inst, or all positions) and the H-carrier
(harmfulness-only, at t_inst / instruction positions)"), by default (:data:`DEFAULT_POSITIONS`):

* ``"H"`` at the instruction positions (the instruction's tokens, t_inst the last of them; hooks'
  ``positions="instruction"``): the last prompt position, where the effect is read, sees the edit only
  through attention;
* ``"R"`` and ``"joint"`` at every position;
* ``"H (all positions)"`` (``h_all_positions=True``): H at every position, as a contrast (it also edits
  the post-instruction positions, where R is read). Same direction and magnitude as ``"H"``.

Each row records its carrier's ``positions``.

Controls: ``n_controls`` random Gaussian unit vectors (for ``"joint"``, random 2-D subspaces; its addition
uses their bisector, which is again a random unit vector), drawn from a CPU generator seeded with ``seed``
(``seed + 1`` for the 2-D ones; :func:`control_directions`), optionally made orthogonal to span(h_hat, r_hat). The same control directions serve every value of a
carrier; they are applied at the same layer, positions and value, with the carrier's magnitude ``m``
(so H's controls act at the instruction positions, R's at every position). Control runs that are
identical (same directions, value, positions and, for additions, magnitude) are computed once and
shared, e.g. the ablation controls of ``"R"`` and ``"H (all positions)"``. For
each (carrier, value, metric) the result holds the carrier's effect, the controls' effects, their mean and
standard deviation (n - 1), and the carrier's percentile among the controls: ``100 * (#{c < e} + #{c == e} / 2) / n``
(signed: a bypass that lowers the refusal score more than every control sits at 0, an induction that
raises it more than every control at 100).

A value of 0 (alpha or beta) is the identity, so its effects are exactly 0 and no forward is run for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .. import validate as V
from .._io import json_safe
from .hooks import control_directions  # noqa: F401  (re-exported)
from ..errors import InvalidArgument, InvalidType

ADD_ALPHAS = (-8.0, -4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
ABLATE_BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
CARRIERS = ("H", "R", "joint")
H_ALL = "H (all positions)"  # the optional contrast carrier: H at every position (h_all_positions=True)
DEFAULT_POSITIONS = {"H": "instruction", "R": "all", "joint": "all", H_ALL: "all"}
METRICS = ("refusal_harmful", "refusal_harmless", "kl_harmless")
KINDS = ("add", "ablate")


@dataclass
class SweepRow:
    """One (carrier, value, metric) cell: the carrier's effect and its matched controls' effects."""

    carrier: str
    value: float
    metric: str
    effect: float
    controls: list[float] = field(default_factory=list)
    control_mean: float | None = None
    control_sd: float | None = None
    percentile: float | None = None
    positions: str = "all"  # where the carrier (and its controls) acted: "instruction" | "all" | "prompt"

    @property
    def excess(self) -> float | None:
        """``effect - control_mean``: the effect beyond what a random direction of the same size does."""
        return None if self.control_mean is None else self.effect - self.control_mean


@dataclass
class SweepResult:
    """A sweep's settings, baseline and rows (see the module docstring for every definition).

    ``magnitudes``: ``m`` per carrier (the norm each addition is scaled by; ablation is scale-free and
    records the carrier norms for reference). ``baseline``: mean refusal scores without intervention.
    ``controls_max_cos``: the largest |cosine| between a control direction and span(h_hat, r_hat) (about 0
    with ``orthogonal_controls``).
    """

    kind: str
    layer: int
    values: list[float]
    carriers: list[str]
    positions: dict[str, str]
    n_controls: int
    orthogonal_controls: bool
    seed: int
    magnitudes: dict[str, float]
    baseline: dict[str, float]
    n_harmful: int
    n_harmless: int
    controls_max_cos: float | None
    rows: list[SweepRow]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-safe dict (NaN and infinities become None)."""
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "SweepResult":
        d = dict(d)
        pos = d.get("positions") or {}
        d["rows"] = [SweepRow(**{"positions": pos.get(r["carrier"], "all"),  # results saved before rows held positions
                                 **{k: (float("nan") if v is None and k == "effect" else v) for k, v in r.items()}})
                     for r in d["rows"]]
        return cls(**d)

    def row(self, carrier: str, value: float, metric: str) -> SweepRow:
        for r in self.rows:
            if r.carrier == carrier and r.value == float(value) and r.metric == metric:
                return r
        raise KeyError(f"no row for carrier={carrier!r}, value={value!r}, metric={metric!r}")

    def table(self, metric: str | None = None) -> list[dict]:
        """One flat dict per row (optionally one metric): carrier, positions, value, metric, effect, controls'
        mean and sd, excess (effect - controls' mean) and percentile, ready for a CSV writer or a report table."""
        if metric is not None and metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        value_name = "alpha" if self.kind == "add" else "beta"
        return [{"carrier": r.carrier, "positions": r.positions, value_name: r.value, "metric": r.metric, "effect": r.effect,
                 "control_mean": r.control_mean, "control_sd": r.control_sd, "excess": r.excess,
                 "percentile": r.percentile}
                for r in self.rows if metric is None or r.metric == metric]


def _carrier(v, d: int, name: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise InvalidType(f"carrier {name} must be a torch.Tensor of shape [{d}], got {type(v).__name__}")
    if not v.is_floating_point():
        raise InvalidType(f"carrier {name} must be a floating-point tensor, got {v.dtype}")
    if v.shape != (d,):
        raise InvalidArgument(f"carrier {name} has shape {tuple(v.shape)} but the model's residual width is {d}")
    v = v.detach().to("cpu", torch.float64)
    if not torch.isfinite(v).all():
        raise InvalidArgument(f"carrier {name} contains NaN or infinite values")
    if v.norm() == 0:
        raise InvalidArgument(f"carrier {name} is zero")
    return v


def _values(kind: str, values) -> list[float]:
    if values is None:
        return list(ADD_ALPHAS if kind == "add" else ABLATE_BETAS)
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]  # one value is a sweep of one
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise InvalidType(f"values must be a list of numbers (alphas or betas), got {type(values).__name__} "
                          f"{V.show(values)}")
    vals = [V.finite_float(f"values[{i}]", v, **({"lo": 0.0, "hi": 1.0, "hint": "ablation betas must lie in [0, 1]"}
                                                 if kind == "ablate" else {}))
            for i, v in enumerate(values)]
    if not vals:
        raise InvalidArgument("values is empty: nothing to sweep")
    if len(set(vals)) != len(vals):
        raise InvalidArgument(f"sweep values contain duplicates: {vals}")
    return vals


def _percentile(e: float, cs: list[float]) -> float:
    below = sum(c < e for c in cs)
    ties = sum(c == e for c in cs)
    return 100.0 * (below + 0.5 * ties) / len(cs)


def sweep(
    model,
    tokenizer,
    H: torch.Tensor,
    R: torch.Tensor,
    harmful: list[str],
    harmless: list[str],
    *,
    layer: int,
    refusal_tokens: list[int] | None = None,
    kind: str = "add",
    values: list[float] | None = None,
    carriers: tuple[str, ...] = CARRIERS,
    controls: bool = True,
    n_controls: int = 10,
    orthogonal_controls: bool = False,
    seed: int = 0,
    positions: str | dict[str, str] | None = None,
    h_all_positions: bool = False,
    batch_size: int = 32,
    template: str | None = None,
    system: str | None = None,
    progress: bool = True,
) -> SweepResult:
    """Sweep ActAdd (``kind="add"``) or partial ablation (``kind="ablate"``) over the carriers, with matched controls.

    ``H``, ``R``: raw difference-of-means carriers ``[d]`` read at ``layer`` (e.g. ``carriers.h_at(l)``
    and ``carriers.r_at(l, "eoi-1")``). ``refusal_tokens``: default
    :func:`pysafegeom.protocol.carriers.find_refusal_tokens`. ``positions``: None for
    :data:`DEFAULT_POSITIONS` (H at the instruction positions, R and the joint span at every position);
    ``"all"`` or ``"instruction"`` (``"prompt"`` equals ``"all"`` here: there is no generation) for every
    carrier; or a dict per carrier, the carriers it leaves out at their default. Controls use their
    carrier's positions. ``h_all_positions``: also sweep ``"H (all positions)"``, H at every position
    (whatever ``positions`` says; with ablation its controls are R's, so it costs one run per value).
    ``template``/``system``: as the prompts are formatted, also used to locate the instruction positions.
    Definitions of values, magnitudes, controls and effects: module docstring.
    """
    from ..models import ModelAdapter
    from ..models.forward import kl_next_token as _kl, last_logits as _last_logits
    from ..prompts import encode_batches as _batches
    from ..refusal import find_refusal_tokens, refusal_scores_from_logits
    from .hooks import _check_layer, ablate, add

    if kind not in KINDS:
        raise InvalidArgument(f"unknown sweep kind {kind!r}; choose 'add' (ActAdd) or 'ablate' (partial ablation)")
    V.is_model("model", model)
    V.is_tokenizer("tokenizer", tokenizer)
    ad = ModelAdapter(model)
    d = ad.d_model
    layer = _check_layer(layer, ad.n_layers)
    Hv, Rv = _carrier(H, d, "H"), _carrier(R, d, "R")
    vals = _values(kind, values)
    carriers = [carriers] if isinstance(carriers, str) else list(carriers)
    if not carriers:
        raise ValueError("carriers is empty: give at least one of 'H', 'R', 'joint'")
    for c in carriers:
        if c not in CARRIERS + (H_ALL,):
            raise ValueError(f"unknown carrier {c!r}; choose from {', '.join(CARRIERS)} (or set h_all_positions=True "
                             f"for {H_ALL!r})")
    if h_all_positions and H_ALL not in carriers:
        carriers.append(H_ALL)
    if len(set(carriers)) != len(carriers):
        raise ValueError(f"carriers contain duplicates: {carriers}")
    if positions is None:
        positions = {}
    elif isinstance(positions, str):
        positions = {c: positions for c in carriers if c != H_ALL}
    elif isinstance(positions, dict):
        positions = dict(positions)
    else:
        raise ValueError(f"positions for carrier must be None, a string or a dict per carrier, got {positions!r}")
    if positions.get(H_ALL, "all") != "all":
        raise ValueError(f"positions for carrier {H_ALL!r} are 'all' by definition, got {positions[H_ALL]!r}")
    positions = {c: positions.get(c, DEFAULT_POSITIONS[c]) for c in carriers}
    for c in carriers:
        p = positions[c]
        if p not in ("all", "prompt", "instruction"):
            raise ValueError(f"positions for carrier {c} must be 'all', 'prompt' or 'instruction', got {p!r}")
    if V.boolean("controls", controls) and (isinstance(n_controls, bool) or not isinstance(n_controls, int)
                                             or n_controls < 1):
        raise (InvalidArgument if type(n_controls) is int else InvalidType)(
            f"n_controls must be an integer >= 1 when controls are asked for, got {n_controls!r}: the matched random "
            "directions are what a sweep's effect is judged against (pass controls=False for none)")
    V.integer("seed", seed)
    for name, xs in (("harmful", harmful), ("harmless", harmless)):
        if isinstance(xs, str) or (hasattr(xs, "__len__") and not len(xs)):
            raise InvalidArgument(f"the {name} prompt list is empty (or a single string): give a list of prompts")
    harmful, harmless = V.prompt_list("harmful", harmful), V.prompt_list("harmless", harmless)
    V.disjoint("harmful", harmful, "harmless", harmless)
    V.positive_int("batch_size", batch_size)
    if refusal_tokens is None:
        refusal_tokens = find_refusal_tokens(tokenizer)
    if isinstance(refusal_tokens, (str, bytes)) or not hasattr(refusal_tokens, "__iter__"):
        raise InvalidType(f"refusal_tokens must be a list of token ids, got {type(refusal_tokens).__name__}")
    refusal_tokens = [V.nonneg_int(f"refusal_tokens[{i}]", t) for i, t in enumerate(refusal_tokens)]
    if not refusal_tokens:
        raise InvalidArgument("refusal_tokens is empty; give token ids, or None for the default refusal tokens")
    V.token_ids_fit(model, [refusal_tokens], what="refusal_tokens")

    h_hat, r_hat = Hv / Hv.norm(), Rv / Rv.norm()
    cos = float(h_hat @ r_hat)
    span = torch.stack([h_hat, r_hat], 1)  # [d, 2]
    if "joint" in carriers and abs(cos) > 1 - 1e-6:
        raise ValueError(f"H and R are (anti)parallel (cos = {cos:.6f}): their joint span is one-dimensional; "
                         "drop 'joint' from carriers")
    nH, nR = float(Hv.norm()), float(Rv.norm())
    magnitudes = {"H": nH, "R": nR, "joint": (nH + nR) / 2, H_ALL: nH}
    unit = {"H": h_hat[:, None], "R": r_hat[:, None], "joint": torch.linalg.qr(span)[0], H_ALL: h_hat[:, None]}
    add_dir = {"H": h_hat, "R": r_hat, "joint": (h_hat + r_hat) / (h_hat + r_hat).norm(), H_ALL: h_hat}
    same_as = {H_ALL: "H"}  # carriers that are one direction at other positions

    ctrl = {}
    max_cos = None
    if controls:
        avoid = span if orthogonal_controls else None
        one = control_directions(d, n_controls, 1, seed=seed, orthogonal_to=avoid)  # [n, d, 1]
        two = control_directions(d, n_controls, 2, seed=seed + 1, orthogonal_to=avoid) if "joint" in carriers else None
        for c in carriers:
            ctrl[c] = two if c == "joint" else one
        Pspan = torch.linalg.qr(span)[0]
        used = [one[:, :, 0]] + ([two[:, :, 0], two[:, :, 1]] if two is not None else [])
        max_cos = float(max((u @ Pspan).norm(dim=1).max() for u in used))

    nh = len(harmful)
    dev = ad.device
    notes = []
    with torch.no_grad():
        batches = _batches(tokenizer, harmful + harmless, template, system, batch_size, dev)
        base = _last_logits(model, batches)
        base_scores = refusal_scores_from_logits(base, refusal_tokens)
        base_h, base_l = base_scores[:nh].mean().item(), base_scores[nh:].mean().item()

        def measure(ctx) -> dict[str, float]:
            with ctx:
                logits = _last_logits(model, batches)
            s = refusal_scores_from_logits(logits, refusal_tokens)
            return {"refusal_harmful": s[:nh].mean().item() - base_h,
                    "refusal_harmless": s[nh:].mean().item() - base_l,
                    "kl_harmless": _kl(base[nh:], logits[nh:]).mean().item()}

        def context(c: str, Q: torch.Tensor, u: torch.Tensor, value: float):
            pos = "all" if positions[c] == "prompt" else positions[c]
            kw = dict(positions=pos, tokenizer=tokenizer, template=template, system=system)
            if kind == "add":
                return add(model, (magnitudes[c] * u).to(torch.float32), layer, alpha=value, **kw)
            return ablate(model, Q.to(torch.float32), beta=value, **kw)

        def directions(c: str, i: int | None):
            if i is None:
                return unit[c], add_dir[c]
            Q = ctrl[c][i]
            u = Q[:, 0] if Q.shape[1] == 1 else (Q[:, 0] + Q[:, 1]) / math.sqrt(2)
            return Q, u

        zero = dict.fromkeys(METRICS, 0.0)
        n_ctrl = n_controls if controls else 0
        runs = [(c, v, i) for c in carriers for v in vals for i in [None] + list(range(n_ctrl))]
        effects: dict[tuple, dict[str, float]] = {}

        def shared(c: str, v: float, i: int | None):
            # one computation per distinct intervention: the same direction, value, positions ("prompt" is "all"
            # here) and, for additions, magnitude. Ablation is scale-free, so the 1-D controls of carriers at the
            # same positions (R and H (all positions); H and R when both are at every position) are one run
            pos = "all" if positions[c] == "prompt" else positions[c]
            if i is None:
                return ("carrier", same_as.get(c, c), pos, v)
            return ("2-D" if c == "joint" else "1-D", pos, v, i, magnitudes[c] if kind == "add" else None)

        todo = {shared(c, v, i) for c, v, i in runs if v != 0.0}
        bar = tqdm(total=len(todo), desc=f"sweep {kind}", unit="cond", disable=not progress)
        done: dict[tuple, dict[str, float]] = {}
        try:
            for c, v, i in runs:
                if v == 0.0:
                    effects[c, v, i] = zero
                    continue
                key = shared(c, v, i)
                if key not in done:
                    Q, u = directions(c, i)
                    done[key] = measure(context(c, Q, u, v))
                    bar.update(1)
                effects[c, v, i] = done[key]
        finally:
            bar.close()

    rows = []
    for c in carriers:
        for v in vals:
            for m in METRICS:
                e = effects[c, v, None][m]
                row = SweepRow(c, v, m, e, positions=positions[c])
                if controls:
                    cs = [effects[c, v, i][m] for i in range(n_controls)]
                    row.controls = cs
                    row.control_mean = sum(cs) / len(cs)
                    row.control_sd = (math.sqrt(sum((x - row.control_mean) ** 2 for x in cs) / (len(cs) - 1))
                                      if len(cs) > 1 else None)
                    row.percentile = _percentile(e, cs)
                rows.append(row)
    if controls and n_controls < 10:
        notes.append(f"{n_controls} controls (PROTOCOL 4 uses 10): percentiles are coarse")
    return SweepResult(kind, layer, vals, carriers, {c: positions[c] for c in carriers}, n_controls if controls else 0,
                       bool(orthogonal_controls), int(seed), magnitudes, {"refusal_harmful": base_h,
                       "refusal_harmless": base_l}, nh, len(harmless), max_cos, rows, notes)
