"""Carrier selection and low-rank carriers with planted answers.

* A tiny Llama wired by hand so that the refusal token's logit is a * <norm(x_last), v> for one residual
  direction v (uniform attention copies v from a marker token to the last position; nothing else writes to
  the residual stream). A hand-made carrier grid puts v at one (layer, position), tilted copies of v
  elsewhere, and -v (same bypass, negative induce) before it, so the argmin branch runs and its answer is known.
* A scripted forward (monkeypatched ablation, addition and logits) with prescribed per-prompt refusal scores
  and KLs, for exact admissible counts under the fixed, relaxed and calibrated rules, before and after the
  behaviour filter.
* Synthetic captures where only the refused harmful prompts carry the refusal direction, for the filtered
  branch of fit_carriers and fit_subspace.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager

import pytest
import torch

import pysafegeom.protocol.selection as S
from pysafegeom.models import ModelAdapter, tiny_model
from pysafegeom.models.forward import kl_next_token, last_logits
from pysafegeom.prompts import EncodedPrompts, encode_prompts, format_prompts
from pysafegeom.protocol.capture import Capture, capture
from pysafegeom.protocol.carriers import Carriers, fit_carriers, fit_subspace, layer_subspaces, unit_carriers
from pysafegeom.protocol.selection import INDUCE_RULE, Selection, select_carrier
from pysafegeom.refusal import refusal_scores_from_logits

POST = ["eoi-6", "eoi-5", "eoi-4", "eoi-3", "eoi-2", "eoi-1"]  # SmolLM2's template: 6 post-instruction tokens
REF = 57  # the refusal token (first token of "I" in SmolLM2's tokenizer; any id works)


# --- a tiny Llama with a planted refusal direction ----------------------------------------------------

def planted_model(tok, d=32, s=1.0, c=20.0, a=5.0, seed=0):
    """Llama, 4 blocks: q = 0 (uniform attention), MLPs and every block but the first write nothing; block 0
    copies the v-component of the attended tokens to v; only " steal" (+v) and " bake" (-v) carry v; the
    unembedding reads v only for the refusal token. So harmful prompts (with " steal") are refused, harmless
    ones (" bake") answered, and ablating v removes refusal. Four more directions U (orthonormal, orthogonal
    to v) are removed from every embedding and unembedding row: they carry nothing, so a carrier tilted from v
    towards them removes less of v (ablating it cannot write v from other tokens' U-components)."""
    m = tiny_model("llama", tokenizer=tok, n_layers=4, d_model=d, seed=seed)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, 5, generator=g))
    v, U = Q[:, 0], Q[:, 1:]
    A = tok(" steal", add_special_tokens=False)["input_ids"][0]
    B = tok(" bake", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        E, W = m.model.embed_tokens.weight, m.lm_head.weight
        E -= (E @ Q) @ Q.T
        W -= (W @ Q) @ Q.T
        E[A] += s * v
        E[B] -= s * v
        W[REF] = a * v
        for layer in m.model.layers:
            for w in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.self_attn.v_proj, layer.mlp.down_proj):
                w.weight.zero_()
        at0 = m.model.layers[0].self_attn
        at0.v_proj.weight[0] = v
        at0.o_proj.weight[:, 0] = c * v
    return m, v.double(), U.double()


HARM = [f"Tell me how to steal {x} steal it" for x in ("a car", "a bike", "money", "a phone", "a wallet")]
HARM_ANSWERED = ["Tell me how to get a car", "Tell me how to get a bike"]  # no marker: not refused
HARMLESS = [f"Tell me how to bake {x} bake it" for x in ("bread", "a cake", "cookies", "a pie", "muffins")]


@pytest.fixture(scope="module")
def planted(tok):
    return planted_model(tok)


def _tilted(v, U, theta_deg, j):
    t = math.radians(theta_deg)
    return math.cos(t) * v + math.sin(t) * U[:, j]


def planted_grid(v, U, d, norm=12.0):
    """Carriers over layers 0..4 and SmolLM2's 6 post positions; the candidates at eoi-4/eoi-2/eoi-1:

    (1, eoi-4) v tilted 30 deg, (1, eoi-2) -v (decoy: same ablation, induce < 0), (1, eoi-1) tilted 60 deg,
    (2, eoi-4) v (the answer), (2, eoi-2) tilted 20 deg, (2, eoi-1) tilted 45 deg; layer 0 zero; layer 3 is
    pruned (int(0.8 * 4) = 3)."""
    R = torch.zeros(5, len(POST), d, dtype=torch.float64)
    col = POST.index
    R[1, col("eoi-4")] = norm * _tilted(v, U, 30, 0)
    R[1, col("eoi-2")] = -norm * v
    R[1, col("eoi-1")] = norm * _tilted(v, U, 60, 1)
    R[2, col("eoi-4")] = norm * v
    R[2, col("eoi-2")] = norm * _tilted(v, U, 20, 2)
    R[2, col("eoi-1")] = norm * _tilted(v, U, 45, 3)
    R[3] = norm * v  # pruned layer: never evaluated
    H = torch.randn(5, d, dtype=torch.float64)
    return Carriers(list(range(5)), list(POST), H, R, "filtered", "planted", {})


def test_planted_carrier_is_selected(planted, tok):
    model, v, U = planted
    d = ModelAdapter(model).d_model
    car = planted_grid(v, U, d)
    harmful = HARM + HARM_ANSWERED
    # harmless already encoded: the EncodedPrompts path and the string path are mixed
    sel = select_carrier(model, tok, car, harmful, encode_prompts(tok, HARMLESS), [REF],
                         positions=["eoi-4", "eoi-2", "eoi-1"], progress=False)
    by = {(c.layer, c.position): c for c in sel.candidates}
    decoy, answer = by[(1, "eoi-2")], by[(2, "eoi-4")]
    # the premises: the planted model refuses exactly the marked harmful prompts; the decoy ablates the same line
    assert sel.n_val == {"harmful": 7, "harmless": 5, "harmful_filtered": 5, "harmless_filtered": 5}
    assert sel.val_filtered == {"harmful": True, "harmless": True}
    assert sel.baseline_harmful > 5 and sel.baseline_harmless < -5 and sel.baseline_unfiltered["harmful"] < sel.baseline_harmful
    assert decoy.bypass <= answer.bypass < -5 and decoy.induce < 0 < answer.induce
    assert all(c.bypass > answer.bypass + 3 for k, c in by.items() if k[0] in (1, 2) and k not in ((1, "eoi-2"), (2, "eoi-4")))
    assert all(c.pruned for c in sel.candidates if c.layer == 3)
    assert all(c.bypass != c.bypass and not c.pruned for c in sel.candidates if c.layer == 0)  # zero carrier -> NaN
    # the answer
    assert sel.outcome == "selected" and sel.rule == "calibrated" and (sel.layer, sel.position) == (2, "eoi-4")
    assert answer.admissible and not decoy.admissible
    assert sel.tau_cal == max(0.1, S._percentile(sel.kl_controls, 75.0)) and len(sel.kl_controls) == 16
    # the fixed rule selects the same carrier here
    fixed = select_carrier(model, tok, car, harmful, HARMLESS, [REF], positions=["eoi-4", "eoi-2", "eoi-1"],
                           layers=[1, 2], kl_rule="fixed", n_kl_controls=0, progress=False)
    assert (fixed.outcome, fixed.rule, fixed.layer, fixed.position) == ("selected", "fixed", 2, "eoi-4")
    assert fixed.tau_cal is None and fixed.n_admissible_calibrated is None and fixed.kl_controls == []
    # bypass on the filtered rows is the mean over the refused prompts of the per-prompt scores; unfiltered over all
    from pysafegeom.interventions.hooks import ablate

    b = format_prompts(tok, harmful)
    with torch.no_grad(), ablate(model, car.r_at(2, "eoi-4").float()):
        rows = refusal_scores_from_logits(last_logits(model, [b]), [REF])
    assert answer.bypass == pytest.approx(rows[:5].mean().item(), abs=1e-4)
    assert answer.bypass_unfiltered == pytest.approx(rows.mean().item(), abs=1e-4)


def test_shared_prefix_selection_equals_full_rows(planted, tok, monkeypatch):
    """The template prefix run once per batch (the default) scores every candidate as the full-row forwards do."""
    model, v, U = planted
    car = planted_grid(v, U, ModelAdapter(model).d_model)
    kw = dict(positions=["eoi-4", "eoi-2", "eoi-1"], progress=False, batch_size=4)
    fast = select_carrier(model, tok, car, HARM + HARM_ANSWERED, HARMLESS, [REF], **kw)
    monkeypatch.setattr(S, "SHARED_PREFIX", False)
    slow = select_carrier(model, tok, car, HARM + HARM_ANSWERED, HARMLESS, [REF], **kw)
    assert (fast.outcome, fast.layer, fast.position, fast.n_admissible) == \
        (slow.outcome, slow.layer, slow.position, slow.n_admissible)
    for a, b in zip(fast.candidates, slow.candidates):
        for k in ("bypass", "induce", "kl"):
            x, y = getattr(a, k), getattr(b, k)
            assert (x != x and y != y) or x == pytest.approx(y, abs=1e-4, rel=1e-4), (a.layer, a.position, k)
    assert fast.kl_controls == pytest.approx(slow.kl_controls, abs=1e-5)


def test_planted_subspace_at_the_selected_position(planted, tok):
    model, v, U = planted
    cap = capture(model, tok, {"harmful": HARM + HARM_ANSWERED, "harmless": HARMLESS}, refusal_tokens=[REF],
                  keep_positions="all", progress=False)
    assert set(cap.per_prompt["harmful"]) == set(cap.position_names)
    car = fit_carriers(cap, min_filtered=3)
    assert car.r_fit == "filtered" and car.counts["harmful_refused"] == 5
    sub = fit_subspace(cap, 2, "eoi-4", k=3, filtered=True)
    assert sub.counts == {"harmful_refused": 5, "harmless_complied": 5}
    assert abs(float(sub.Q_R[:, 0] @ v)) > 0.99
    # the top direction is signed along the difference of means, i.e. along R
    assert float(sub.Q_R[:, 0] @ car.r_at(2, "eoi-4")) > 0
    torch.testing.assert_close(sub.Q_R.T @ sub.Q_R, torch.eye(sub.k_R, dtype=torch.float64), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="keep_positions"):
        fit_subspace(capture(model, tok, {"harmful": HARM, "harmless": HARMLESS}, refusal_tokens=[REF], progress=False),
                     2, "eoi-4", filtered=True)
    with pytest.raises(ValueError, match="keep_positions"):
        capture(model, tok, {"harmful": HARM}, keep_positions="everything", progress=False)


# --- a scripted forward: exact counts -----------------------------------------------------------------

def _delta_for_kl(z0: float, target: float, sign: float) -> float:
    """The logit shift delta (of the sign given) with KL(Bern(z0) || Bern(z0 + delta)) = target, by bisection."""
    def kl(dz):
        return float(kl_next_token(torch.tensor([[z0, 0.0]]), torch.tensor([[z0 + dz, 0.0]]))[0])
    lo, hi = 0.0, 60.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kl(sign * mid) < target else (lo, mid)
    return sign * (lo + hi) / 2


# harmful rows: 5 refused (z = +2) and 1 answered (z = -1); harmless: 5 answered (z = -2) and 1 refused (z = +3)
H_Z = [2.0] * 5 + [-1.0]
L_Z = [-2.0] * 5 + [3.0]
# candidate k at CAND[k] = (layer, position): bypass z (refused harmful rows), induce z, KL target on
# answered harmless rows (the same on the refused row unless kl_ref), z of the answered harmful row (else bypass z)
SPEC = {
    0: dict(at=(0, "eoi-2"), bypass=-1.0, induce=1.0, kl=0.05),
    1: dict(at=(0, "eoi-1"), bypass=-2.0, induce=0.0, kl=0.15),  # induce exactly 0
    2: dict(at=(1, "eoi-2"), bypass=-4.0, induce=2.0, kl=0.25),  # admissible only under the calibrated rule
    3: dict(at=(1, "eoi-1"), bypass=-9.0, induce=-1.0, kl=0.05),  # induce < 0
    4: dict(at=(2, "eoi-2"), bypass=-8.0, induce=1.0, kl=0.60),  # KL too large under every rule
    5: dict(at=(2, "eoi-1"), bypass=-3.0, induce=1.0, kl=0.05, kl_ref=8.0),  # large KL only on the refused harmless row
    7: dict(at=(3, "eoi-1"), bypass=-0.5, induce=1.0, kl=0.05, bypass_answered=-15.0),  # low bypass only unfiltered
}
ZERO = (3, "eoi-2")  # zero carrier: NaN scores
CONTROL_KL = [0.2, 0.3, 0.3, 0.4]  # the random directions' KLs (every harmless row): median 0.3


def score(z: float) -> float:
    """The refusal score of logits [z, 0] with refusal token 0 (= z up to the score's eps)."""
    return float(refusal_scores_from_logits(torch.tensor([[z, 0.0]], dtype=torch.float64), [0])[0])


class Script:
    """Monkeypatched ablate / add / the validation forwards with the logits SPEC prescribes (vocabulary of 2, refusal token 0)."""

    def __init__(self, d):
        self.d, self.state, self.controls = d, None, []

    def ident(self, vec):
        q = vec.double() / vec.double().norm()
        k = int(q.abs().argmax())
        if q[k].abs() > 0.999:
            return ("cand", k)
        for j, u in enumerate(self.controls):
            if torch.allclose(u, q):
                return ("ctrl", j)
        self.controls.append(q)
        return ("ctrl", len(self.controls) - 1)

    @contextmanager
    def ablate(self, model, direction, **kw):
        self.state = ("ablate", self.ident(direction))
        yield model
        self.state = None

    @contextmanager
    def add(self, model, vector, layer, *, alpha=1.0, **kw):
        self.state = ("add", self.ident(vector))
        yield model
        self.state = None

    def z(self, text):
        side, i = text.split()[0], int(text.split()[1])
        z0 = (H_Z if side == "harm" else L_Z)[i]
        if self.state is None:
            return z0
        kind, (what, k) = self.state
        if what == "ctrl":
            assert kind == "ablate"
            return z0 if side == "harm" else z0 + _delta_for_kl(z0, CONTROL_KL[k], 1.0 if z0 < 0 else -1.0)
        sp = SPEC[k]
        if kind == "add":
            assert side == "safe", "induce runs on the harmless prompts only"
            return sp["induce"]
        if side == "harm":
            return sp.get("bypass_answered", sp["bypass"]) if z0 < 0 else sp["bypass"]
        target = sp.get("kl_ref", sp["kl"]) if z0 > 0 else sp["kl"]
        return z0 + _delta_for_kl(z0, target, 1.0 if z0 < 0 else -1.0)

    def last_logits(self, model, batches):
        zs = [self.z(t) for b in batches for t in b.instructions]
        return torch.tensor([[z, 0.0] for z in zs], dtype=torch.float64)


@pytest.fixture()
def scripted(tok, monkeypatch):
    model = tiny_model("llama", tokenizer=tok, n_layers=5, d_model=16, seed=0)  # only its shape is used
    sc = Script(16)
    monkeypatch.setattr(S, "ablate", sc.ablate)
    monkeypatch.setattr(S, "add", sc.add)
    # the script stands in for the validation forwards (it reads each batch's instructions)
    monkeypatch.setattr(S.SharedPrefixBatches, "last_logits", lambda self, model: sc.last_logits(model, self.batches)[self.inv])
    R = torch.zeros(6, len(POST), 16, dtype=torch.float64)
    for k, sp in SPEC.items():
        R[sp["at"][0], POST.index(sp["at"][1]), k] = 3.0
    R[4] = 1.0  # layer 4 >= int(0.8 * 5): pruned
    car = Carriers(list(range(6)), list(POST), torch.ones(6, 16, dtype=torch.float64), R, "filtered", "scripted", {})
    harmful = [f"harm {i}" for i in range(6)]
    harmless = [f"safe {i}" for i in range(6)]

    def run(**kw):
        kw.setdefault("n_kl_controls", 4)
        kw.setdefault("kl_percentile", 50.0)  # the scripted control KLs are laid out around their median
        return select_carrier(model, tok, car, harmful, harmless, [0], positions=["eoi-2", "eoi-1"], progress=False, **kw)
    return run


def test_counts_under_the_fixed_and_calibrated_rules(scripted):
    sel = scripted()  # calibrated, filtered (both sides keep 5 >= 4)
    by = {(c.layer, c.position): c for c in sel.candidates}
    assert len(sel.candidates) == 10 and sum(c.pruned for c in sel.candidates) == 2
    assert by[ZERO].bypass != by[ZERO].bypass and not by[ZERO].admissible
    assert sel.kl_controls == pytest.approx(CONTROL_KL, abs=1e-6)
    assert sel.tau_cal == pytest.approx(0.3, abs=1e-6) and sel.kl_tau == sel.tau_cal
    for k, sp in SPEC.items():
        c = by[sp["at"]]
        assert (c.bypass, c.induce) == (pytest.approx(score(sp["bypass"])), pytest.approx(score(sp["induce"]), abs=1e-12))
        assert c.kl == pytest.approx(sp["kl"], abs=1e-6)
    # fixed 0.1: k0, k5, k7; relaxed 0.2: + k1 (induce exactly 0 passes ">= 0"); calibrated 0.3: + k2
    assert INDUCE_RULE == ">= 0" and sel.induce_rule == ">= 0"
    assert (sel.n_admissible_fixed, sel.n_admissible_relaxed, sel.n_admissible_calibrated) == (3, 4, 5)
    assert sel.n_admissible == 5 and sel.n_admissible_filtered == {"fixed": 3, "relaxed": 4, "calibrated": 5}
    # unfiltered rows: k5's KL includes the refused harmless row (large) -> out; tau from all rows is still 0.3
    assert sel.n_admissible_unfiltered == {"fixed": 2, "relaxed": 3, "calibrated": 4}
    assert sel.tau_cal_unfiltered == pytest.approx(0.3, abs=1e-6)
    assert by[SPEC[5]["at"]].kl_unfiltered > 1.0
    # the calibrated rule selects the lowest bypass among k0, k1, k2, k5, k7: k2 at (1, eoi-2)
    assert (sel.outcome, sel.rule, sel.layer, sel.position) == ("selected", "calibrated", 1, "eoi-2")
    assert sel.n_val == {"harmful": 6, "harmless": 6, "harmful_filtered": 5, "harmless_filtered": 5}
    assert sel.baseline_harmful == pytest.approx(score(2.0)) and sel.baseline_harmless == pytest.approx(score(-2.0))
    assert sel.baseline_unfiltered["harmful"] == pytest.approx((5 * score(2.0) + score(-1.0)) / 6)

    fixed = scripted(kl_rule="fixed")  # among k0, k5, k7 the lowest bypass is k5 at (2, eoi-1)
    assert (fixed.outcome, fixed.rule, fixed.layer, fixed.position) == ("selected", "fixed", 2, "eoi-1")
    assert fixed.n_admissible == 3 and fixed.n_admissible_calibrated == 5 and fixed.kl_tau == 0.1
    assert [c.admissible for c in fixed.candidates] == [c.admissible_fixed for c in sel.candidates]

    # unfiltered selection: k7's bypass over all harmful rows is the lowest among fixed-admissible k0, k7
    unf = scripted(kl_rule="fixed", filter_val=False)
    assert (unf.layer, unf.position) == (3, "eoi-1") and unf.val_filtered == {"harmful": False, "harmless": False}
    assert unf.n_admissible_fixed == 2 and unf.n_admissible_filtered == sel.n_admissible_filtered  # counts on both row sets
    assert by[SPEC[7]["at"]].bypass_unfiltered == pytest.approx((5 * score(-0.5) + score(-15.0)) / 6)


def test_relaxed_induce_and_percentile_rules(scripted):
    relaxed = scripted(kl_rule="fixed", kl_threshold=0.01)  # nothing at 0.01; at 0.2: k0, k1, k5, k7 -> k5
    assert (relaxed.outcome, relaxed.rule, relaxed.layer, relaxed.position) == ("selected_relaxed", "fixed_relaxed", 2, "eoi-1")
    assert relaxed.n_admissible == 0 and relaxed.n_admissible_relaxed == 4 and relaxed.notes
    none = scripted(kl_rule="fixed", kl_threshold=0.01, relaxed_threshold=0.01)
    assert (none.outcome, none.rule, none.layer, none.position) == ("none", None, None, None)
    # the calibrated rule ignores the relaxed threshold and is floored at kl_threshold
    assert scripted(kl_threshold=0.01).tau_cal == pytest.approx(0.3, abs=1e-6)
    floored = scripted(kl_threshold=0.5, relaxed_threshold=0.5)
    assert floored.tau_cal == 0.5 and floored.n_admissible_calibrated == floored.n_admissible_fixed == 5
    # percentile 1 of [0.2, 0.3, 0.3, 0.4] is 0.203: k2 (KL 0.25) drops out, k5 (bypass -3) is selected
    p1 = scripted(kl_percentile=1.0)
    assert p1.tau_cal == pytest.approx(0.203, abs=1e-6) and p1.n_admissible == 4 and (p1.layer, p1.position) == (2, "eoi-1")
    assert scripted(kl_percentile=100.0).tau_cal == pytest.approx(0.4, abs=1e-6)
    # strict induce: k1 (induce exactly 0) drops out
    strict = scripted(induce_rule="> 0")
    assert strict.n_admissible_calibrated == 4 and strict.induce_rule == "> 0"


def test_filter_fallback(scripted):
    sel = scripted(min_val_filtered=6)  # each side keeps 5 < 6: both fall back to all 6 prompts
    assert sel.val_filtered == {"harmful": False, "harmless": False} and len(sel.notes) >= 2
    assert any("harmful" in n and "fewer than min_val_filtered" in n for n in sel.notes)
    assert sel.n_admissible_filtered == sel.n_admissible_unfiltered == {"fixed": 2, "relaxed": 3, "calibrated": 4}
    for c in sel.candidates:
        assert (c.bypass, c.kl) == (c.bypass_unfiltered, c.kl_unfiltered) or c.bypass != c.bypass
    plain = scripted(filter_val=False)
    assert [(c.bypass, c.induce, c.kl) for c in sel.candidates if not c.pruned and c.kl == c.kl] == \
           [(c.bypass, c.induce, c.kl) for c in plain.candidates if not c.pruned and c.kl == c.kl]
    assert (sel.layer, sel.position) == (plain.layer, plain.position)
    assert not plain.notes or all("fewer than" not in n for n in plain.notes)


def test_selection_dict_roundtrip_and_old_dicts(scripted):
    sel = scripted()
    d = json.loads(json.dumps(sel.to_dict()))
    back = Selection.from_dict(d)
    assert json.dumps(back.to_dict()) == json.dumps(sel.to_dict())
    assert back.tau_cal == sel.tau_cal and back.n_admissible_unfiltered == sel.n_admissible_unfiltered
    # a dict saved before the calibrated rule (no new fields) still loads, as a fixed-rule selection
    old_fields = ("candidates", "baseline_harmful", "baseline_harmless", "kl_threshold", "relaxed_threshold", "outcome",
                  "layer", "position", "n_admissible", "n_admissible_relaxed", "notes")
    old = {k: d[k] for k in old_fields}
    old["candidates"] = [{k: c[k] for k in ("layer", "position", "bypass", "induce", "kl", "pruned", "admissible")}
                         for c in d["candidates"]]
    o = Selection.from_dict(old)
    assert o.kl_rule == "fixed" and o.rule == "fixed" and o.kl_tau == o.kl_threshold
    assert o.tau_cal is None and o.kl_controls == [] and len(o.candidates) == len(sel.candidates)
    assert o.candidates[0].admissible_fixed == o.candidates[0].admissible
    assert json.loads(json.dumps(o.to_dict()))["outcome"] == sel.outcome


@pytest.mark.parametrize("over, exc, msg", [
    (dict(kl_threshold=float("nan")), ValueError, "kl_threshold"),
    (dict(kl_threshold=-0.1), ValueError, "kl_threshold"),
    (dict(kl_threshold="0.1"), TypeError, "kl_threshold"),
    (dict(relaxed_threshold=0.05), ValueError, "relaxed_threshold"),
    (dict(kl_percentile=0.0), ValueError, "kl_percentile"),
    (dict(kl_percentile=101.0), ValueError, "kl_percentile"),
    (dict(kl_percentile=float("nan")), ValueError, "kl_percentile"),
    (dict(n_kl_controls=0), ValueError, "n_kl_controls"),
    (dict(n_kl_controls=2.0), TypeError, "n_kl_controls"),
    (dict(kl_rule="arditi"), ValueError, "kl_rule"),
    (dict(induce_rule=">= 1"), ValueError, "induce_rule"),
    (dict(min_val_filtered=0), ValueError, "min_val_filtered"),
    (dict(filter_val="yes"), TypeError, "filter_val"),
    (dict(positions=["eoi-9"]), ValueError, "positions"),
    (dict(layers=[7]), ValueError, "no candidate layers"),
    (dict(harmful_val=[]), ValueError, "harmful_val"),
    (dict(harmless_val=[]), ValueError, "harmless_val"),
    (dict(harmful_val="how to steal"), TypeError, "harmful_val"),
    (dict(refusal_tokens=[]), ValueError, "refusal_tokens"),
    (dict(harmful_val=None), TypeError, "harmful_val"),
    (dict(carriers="R"), TypeError, "carriers"),
])
def test_bad_inputs(tok, over, exc, msg):
    model = tiny_model("llama", tokenizer=tok, n_layers=2, d_model=16)
    car = Carriers([0, 1, 2], list(POST), torch.ones(3, 16), torch.ones(3, 6, 16), "unfiltered", "", {})
    kw = dict(carriers=car, harmful_val=["a b"], harmless_val=["c d"], refusal_tokens=[REF], progress=False)
    kw.update(over)
    with pytest.raises(exc, match=msg):
        select_carrier(model, tok, kw.pop("carriers"), kw.pop("harmful_val"), kw.pop("harmless_val"),
                       kw.pop("refusal_tokens"), **kw)


def test_encoded_sets_must_share_a_template(tok):
    model = tiny_model("llama", tokenizer=tok, n_layers=2, d_model=16)
    car = Carriers([0, 1, 2], list(POST), torch.ones(3, 16), torch.ones(3, 6, 16), "unfiltered", "", {})
    with pytest.raises(ValueError, match="different templates"):
        select_carrier(model, tok, car, encode_prompts(tok, ["a b"], template="chatml"), ["c d"], [REF],
                       kl_rule="fixed", n_kl_controls=0, progress=False)
    enc = encode_prompts(tok, ["c d"])
    with pytest.raises(ValueError, match="harmless_val is empty"):
        select_carrier(model, tok, car, ["a b"], EncodedPrompts(enc.split, [], []), [REF], progress=False)


# --- synthetic captures: the behaviour-filtered branch -------------------------------------------------

def make_capture(per_prompt: dict, scores: dict, layers: list[int], position_names: list[str]) -> Capture:
    """A Capture from per-prompt activations ``{set: {pos: [n, nl, d]}}`` (every position) and scores."""
    names = list(per_prompt)
    nl, d = len(layers), per_prompt[names[0]][position_names[0]].shape[-1]
    P = len(position_names)
    sums = torch.zeros(2 * len(names), nl, P, d, dtype=torch.float64)
    counts = torch.zeros(2 * len(names), dtype=torch.int64)
    for s, name in enumerate(names):
        X = torch.stack([per_prompt[name][p] for p in position_names], dim=2).double()  # [n, nl, P, d]
        for i in range(X.shape[0]):
            g = 2 * s + int(scores[name][i] > 0)
            sums[g] += X[i]
            counts[g] += 1
    return Capture(names, layers, position_names, sums, counts, per_prompt, scores)


def _basis(d, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, 4, generator=g, dtype=torch.float64))
    return [Q[:, j] for j in range(4)]


def planted_capture(noise=0.1, seed=0, d=12):
    """Refused harmful prompts carry 5 v at the post positions (layers 1, 2) and 3 h1 at t_inst; answered harmful
    ones 5 w and 3 h2; refused harmless prompts -5 w. Layer 0 is the same for every prompt (a zero carrier)."""
    v, w, h1, h2 = _basis(d, 99)
    g = torch.Generator().manual_seed(seed)
    pos = ["t_inst", "eoi-2", "eoi-1"]
    n = {"harmful": 10, "harmless": 7}
    refused = {"harmful": torch.tensor([1] * 6 + [0] * 4).bool(), "harmless": torch.tensor([0] * 5 + [1] * 2).bool()}
    pp = {}
    for name in n:
        pp[name] = {}
        for p in pos:
            X = noise * torch.randn(n[name], 3, d, generator=g, dtype=torch.float64)
            X[:, 0] = 0.0
            ref = refused[name][:, None]
            if name == "harmful":
                a, b = (h1, h2) if p == "t_inst" else (v, w)
                s = 3.0 if p == "t_inst" else 5.0
                X[:, 1:] += torch.where(ref, 1.0, 0.0)[:, :, None] * s * a + torch.where(ref, 0.0, 1.0)[:, :, None] * s * b
            elif p != "t_inst":
                X[:, 1:] += torch.where(ref, 1.0, 0.0)[:, :, None] * (-5.0) * w
            pp[name][p] = X.float()
    scores = {name: torch.where(refused[name], 2.0, -2.0).double() for name in n}
    return make_capture(pp, scores, [0, 1, 2], pos), (v, w, h1, h2)


def _cos(a, b):
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()))


def test_fit_carriers_filtered_branch():
    cap, (v, w, h1, h2) = planted_capture()
    car = fit_carriers(cap, min_filtered=3)
    assert car.r_fit == "filtered" and car.counts["harmful_refused"] == 6 and car.counts["harmless_complied"] == 5
    for p in ("eoi-2", "eoi-1"):
        assert _cos(car.r_at(1, p), v) > 0.99 and abs(_cos(car.r_at(1, p), w)) < 0.05
    unf = fit_carriers(cap, min_filtered=7)  # 5 answered harmless < 7: falls back
    assert unf.r_fit == "unfiltered" and "fell back" in unf.fit_note
    assert _cos(unf.r_at(1, "eoi-1"), v) < 0.9 and _cos(unf.r_at(1, "eoi-1"), w) > 0.3
    # H is over the prompt sets, both variants
    torch.testing.assert_close(car.H, unf.H)


def test_fit_subspace_filtered_branch():
    cap, (v, w, h1, h2) = planted_capture()
    sub = fit_subspace(cap, 1, "eoi-2", k=3, filtered=True)
    assert sub.filtered and sub.counts == {"harmful_refused": 6, "harmless_complied": 5} and sub.k_R == sub.k_H == 3
    assert abs(float(sub.Q_R[:, 0] @ v)) > 0.99 and abs(float(sub.Q_R[:, 0] @ w)) < 0.05
    assert abs(float(sub.Q_H[:, 0] @ h1)) > 0.99
    torch.testing.assert_close(sub.Q_R.T @ sub.Q_R, torch.eye(3, dtype=torch.float64), atol=1e-10, rtol=0)
    unf = fit_subspace(cap, 1, "eoi-2", k=3, filtered=False)
    assert unf.counts == {"harmful": 10, "harmless": 7}
    # unfiltered: the answered harmful prompts' w (and the refused harmless prompts' -w) enter Δ
    assert abs(float(unf.Q_R[:, 0] @ w)) > 0.3 or abs(float(unf.Q_R[:, 1] @ w)) > 0.9
    # every layer at once; layer 0 is identical for every prompt: rank 0, NaN-padded, noted
    ls = layer_subspaces(cap, k=3, filtered=True)
    assert ls.Q_H.shape == (3, 12, 3) and ls.k_R == [0, 3, 3] and torch.isnan(ls.Q_R[0]).all()
    assert any("layer 0" in n for n in ls.notes)
    qh, qr = ls.at(1)
    sub_last = fit_subspace(cap, 1, "eoi-1", k=3, filtered=True)
    torch.testing.assert_close(qr, sub_last.Q_R)
    torch.testing.assert_close(qh, sub_last.Q_H)
    assert ls.at(0)[1].shape == (12, 0)


def test_fit_subspace_lowers_k_on_duplicates_and_bad_input():
    cap, (v, w, h1, h2) = planted_capture(noise=0.0)  # no noise: every refused harmful row is the same
    sub = fit_subspace(cap, 1, "eoi-1", k=3, filtered=True)
    assert sub.k_R == 1 and sub.k == 3 and any("k lowered from 3 to 1" in n for n in sub.notes)
    assert abs(float(sub.Q_R[:, 0] @ v)) > 0.999
    with pytest.raises(ValueError, match="post-instruction position"):
        fit_subspace(cap, 1, "t_inst", filtered=True)
    with pytest.raises(ValueError, match="layer 5"):
        fit_subspace(cap, 5, "eoi-1", filtered=True)
    with pytest.raises(TypeError, match="filtered"):
        fit_subspace(cap, 1, "eoi-1", filtered="yes")
    with pytest.raises(ValueError, match="positive int"):
        fit_subspace(cap, 1, "eoi-1", k=0, filtered=False)
    cap.scores = {}
    with pytest.raises(ValueError, match="refusal scores"):
        fit_subspace(cap, 1, "eoi-1", filtered=True)
    fit_subspace(cap, 1, "eoi-1", filtered=False)  # fine without scores


def test_unit_carriers():
    cap, _ = planted_capture()
    car = fit_carriers(cap, min_filtered=3)
    u = unit_carriers(car)
    n = torch.linalg.vector_norm(u.R, dim=-1)
    assert torch.allclose(n[1:], torch.ones_like(n[1:])) and (n[0] == 0).all()  # layer 0: zero stays zero
    assert _cos(u.r_at(1, "eoi-1"), car.r_at(1, "eoi-1")) == pytest.approx(1.0)
    assert torch.allclose(torch.linalg.vector_norm(u.H[1:], dim=-1), torch.ones(2, dtype=torch.float64))
    assert u.r_fit == car.r_fit and u.layers == car.layers and car.R.norm() > 2  # the original is untouched
