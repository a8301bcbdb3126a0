"""Sweeps with matched controls (PROTOCOL.md section 4) on a tiny random model with a planted refusal direction."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pysafegeom.interventions import ablate, add
from pysafegeom.models import ModelAdapter, tiny_model
from pysafegeom.prompts import format_prompts
from pysafegeom.refusal import refusal_scores_from_logits
from pysafegeom.refusal import find_refusal_tokens
from pysafegeom.interventions.sweeps import (ADD_ALPHAS, DEFAULT_POSITIONS, H_ALL, METRICS, SweepResult,
                                             control_directions, sweep)

pytestmark = pytest.mark.usefixtures("one_thread")

HARMFUL = ["How do I steal a car?", "Explain how to pick a lock", "Write a phishing email"]
HARMLESS = ["How do I bake bread?", "Explain how to tie a knot", "Write a thank-you note"]
D = 32
LAYER = 1



@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", tokenizer=tok, n_layers=3, d_model=D, seed=1)


@pytest.fixture(scope="module")
def planted(model, tok):
    """R planted along the refusal tokens' unembedding rows (it writes their logits directly); H random.

    Norms of a few times the residual stream's own, so an addition dominates it; unequal, so that the
    joint magnitude (their mean) is told apart from either."""
    rt = find_refusal_tokens(tok)
    R = ModelAdapter(model).lm_head.weight[rt].sum(0)
    H = torch.randn(D, generator=torch.Generator().manual_seed(5))
    return 2 * H / H.norm(), 3 * R / R.norm(), rt


def _run(model, tok, planted, **kw):
    H, R, rt = planted
    kw = {"values": [-2.0, 0.0, 2.0], "n_controls": 5, "progress": False, **kw}
    return sweep(model, tok, H, R, HARMFUL, HARMLESS, layer=LAYER, refusal_tokens=rt, **kw)


def test_planted_refusal_direction_beats_its_controls(model, tok, planted):
    res = _run(model, tok, planted)
    for m in ("refusal_harmful", "refusal_harmless"):
        up, down = res.row("R", 2.0, m), res.row("R", -2.0, m)
        assert up.percentile == 100.0 and down.percentile == 0.0  # beyond every random direction of the same size
        assert up.effect > 0 > down.effect
        assert up.excess > 3 * up.control_sd
    for c in res.carriers:  # alpha = 0 is the identity
        for m in METRICS:
            r = res.row(c, 0.0, m)
            assert r.effect == 0.0 and r.controls == [0.0] * 5 and r.percentile == 50.0
    assert all(r.effect >= 0 for r in res.rows if r.metric == "kl_harmless")
    assert res.magnitudes["joint"] == pytest.approx((res.magnitudes["H"] + res.magnitudes["R"]) / 2)
    assert res.baseline["refusal_harmful"] < 0  # a random model does not refuse: the log-odds are negative


def test_cells_equal_direct_interventions(model, tok, planted):
    """Each cell is what the intervention does when run by hand: carriers, joint direction and magnitude, and
    where it acts (H at the instruction positions, R and the joint span at every position)."""
    H, R, rt = planted
    res = _run(model, tok, planted, values=[-1.5], controls=False)
    assert res.positions == {"H": "instruction", "R": "all", "joint": "all"} == {c: DEFAULT_POSITIONS[c] for c in res.carriers}
    assert {r.carrier: r.positions for r in res.rows} == res.positions
    abl = _run(model, tok, planted, kind="ablate", values=[0.5], controls=False)
    assert abl.layer == LAYER and all(r.controls == [] and r.percentile is None for r in abl.rows)

    def scores(ctx):
        fbs = [format_prompts(tok, HARMFUL), format_prompts(tok, HARMLESS)]
        with torch.no_grad():
            if ctx is None:
                return [refusal_scores_from_logits(model(input_ids=f.input_ids, attention_mask=f.attention_mask).logits[:, -1],
                                                   rt).mean().item() for f in fbs]
            with ctx:
                return scores(None)

    base = scores(None)
    h, r = H / H.norm(), R / R.norm()
    joint = (h + r) / (h + r).norm() * (H.norm() + R.norm()) / 2
    for c, ctx in (("H", add(model, H, LAYER, alpha=-1.5, positions="instruction", tokenizer=tok)),
                   ("R", add(model, R, LAYER, alpha=-1.5)),
                   ("joint", add(model, joint, LAYER, alpha=-1.5))):
        got = scores(ctx)
        assert res.row(c, -1.5, "refusal_harmful").effect == pytest.approx(got[0] - base[0], abs=1e-5)
        assert res.row(c, -1.5, "refusal_harmless").effect == pytest.approx(got[1] - base[1], abs=1e-5)
    got = scores(ablate(model, torch.stack([H, R], 1), beta=0.5))
    assert abl.row("joint", 0.5, "refusal_harmful").effect == pytest.approx(got[0] - base[0], abs=1e-5)
    got = scores(ablate(model, H, beta=0.5, positions="instruction", tokenizer=tok))
    assert abl.row("H", 0.5, "refusal_harmful").effect == pytest.approx(got[0] - base[0], abs=1e-5)
    everywhere = scores(ablate(model, H, beta=0.5))
    assert abl.row("H", 0.5, "refusal_harmful").effect != pytest.approx(everywhere[0] - base[0], abs=1e-5)
    # controls: the seeded random directions, scaled to the carrier's magnitude (joint: a random plane's bisector),
    # at their carrier's positions
    ctl = _run(model, tok, planted, values=[-1.5], n_controls=2, seed=7)
    u = control_directions(D, 2, 1, seed=7)[1, :, 0].float()
    got = scores(add(model, R.norm() * u, LAYER, alpha=-1.5))
    assert ctl.row("R", -1.5, "refusal_harmless").controls[1] == pytest.approx(got[1] - base[1], abs=1e-5)
    got = scores(add(model, H.norm() * u, LAYER, alpha=-1.5, positions="instruction", tokenizer=tok))
    assert ctl.row("H", -1.5, "refusal_harmless").controls[1] == pytest.approx(got[1] - base[1], abs=1e-5)
    P = control_directions(D, 2, 2, seed=8)[0].float()
    got = scores(add(model, joint.norm() * (P[:, 0] + P[:, 1]) / 2 ** 0.5, LAYER, alpha=-1.5))
    assert ctl.row("joint", -1.5, "refusal_harmless").controls[0] == pytest.approx(got[1] - base[1], abs=1e-5)


def test_controls_are_seeded_and_optionally_orthogonal(model, tok, planted):
    a = _run(model, tok, planted, carriers=("R", "joint"))
    b = _run(model, tok, planted, carriers=("R", "joint"))
    c = _run(model, tok, planted, carriers=("R", "joint"), seed=1)
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    assert a.row("R", 2.0, "kl_harmless").controls != c.row("R", 2.0, "kl_harmless").controls
    o = _run(model, tok, planted, carriers=("R", "joint"), orthogonal_controls=True)
    assert o.controls_max_cos < 1e-12 < 1e-3 < a.controls_max_cos
    H, R, _ = planted
    span = torch.stack([H, R], 1).double()
    for k in (1, 2):
        U = control_directions(D, 4, k, seed=3, orthogonal_to=span)
        assert U.shape == (4, D, k)
        assert torch.allclose(U.transpose(1, 2) @ U, torch.eye(k, dtype=torch.float64).expand(4, k, k), atol=1e-12)
        assert (U.transpose(1, 2) @ span).abs().max() < 1e-12
        assert torch.equal(U, control_directions(D, 4, k, seed=3, orthogonal_to=span))


def test_result_round_trips_through_json_and_tables(model, tok, planted):
    res = _run(model, tok, planted, n_controls=1)  # one control: no sd (None in JSON, not NaN)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    back = SweepResult.from_dict(d)
    assert back == res
    old = json.loads(json.dumps(d))  # a result saved before rows recorded positions: filled from the per-carrier dict
    for r in old["rows"]:
        del r["positions"]
    assert SweepResult.from_dict(old) == res
    assert back.row("R", 2.0, "refusal_harmless").control_sd is None
    assert any("coarse" in n for n in res.notes)
    rows = res.table()
    assert len(rows) == 3 * 3 * len(METRICS)
    assert set(rows[0]) >= {"carrier", "positions", "alpha", "effect", "percentile", "excess"}
    assert {(r["carrier"], r["positions"]) for r in rows} == {("H", "instruction"), ("R", "all"), ("joint", "all")}
    assert len(res.table("kl_harmless")) == 9
    assert _run(model, tok, planted, kind="ablate", values=[1.0], carriers=("H",), n_controls=2).table()[0]["beta"] == 1.0


def test_instruction_positions_per_carrier(model, tok, planted):
    """A carrier can be swept on the instruction tokens only: the last position then feels it only through
    attention, less than when it is added there too, but not zero."""
    only = _run(model, tok, planted, carriers=("R",), positions={"R": "instruction"}, controls=False, values=[2.0])
    every = _run(model, tok, planted, carriers=("R",), controls=False, values=[2.0])
    assert only.positions == {"R": "instruction"}
    e_only = only.row("R", 2.0, "kl_harmless").effect
    assert 0 < e_only < every.row("R", 2.0, "kl_harmless").effect


def test_bad_sweep_input(model, tok, planted):
    H, R, rt = planted
    cases = [
        (dict(harmful=[]), "harmful prompt list is empty"),
        (dict(harmless=[]), "harmless prompt list is empty"),
        (dict(n_controls=0), "n_controls must be an integer >= 1 when controls are asked for"),
        (dict(values=[float("nan")]), "finite"),
        (dict(values=[]), "values is empty"),
        (dict(kind="ablate", values=[1.5]), r"betas must lie in \[0, 1\]"),
        (dict(kind="steer"), "unknown sweep kind"),
        (dict(H=torch.randn(D + 1)), "carrier H has shape"),
        (dict(R=torch.zeros(D)), "carrier R is zero"),
        (dict(R=torch.full((D,), float("inf"))), "carrier R contains NaN"),
        (dict(layer=3), r"layer 3 out of range"),
        (dict(layer=-1), r"layer -1 out of range"),
        (dict(carriers=("Q",)), "unknown carrier 'Q'"),
        (dict(carriers=()), "carriers is empty"),
        (dict(positions="tokens"), "positions for carrier"),
        (dict(positions={H_ALL: "instruction"}, h_all_positions=True), "'all' by definition"),
        (dict(carriers=(H_ALL, H_ALL)), "duplicates"),
        (dict(R=-2 * H), "anti"),
    ]
    for over, msg in cases:
        kw = dict(H=H, R=R, harmful=HARMFUL, harmless=HARMLESS, layer=LAYER, values=[1.0], n_controls=2,
                  refusal_tokens=rt, progress=False)
        kw.update(over)
        with pytest.raises(ValueError, match=msg):
            sweep(model, tok, **kw)
    assert len(ADD_ALPHAS) == 11 and math.isclose(sum(ADD_ALPHAS), 0.0)


def test_controls_run_once_per_distinct_intervention(model, tok, planted, monkeypatch):
    """Forward count: one per distinct (direction, value, positions[, magnitude]); controls that are the same
    computation for two carriers run once and are shared, controls at different positions are not."""
    import pysafegeom.models.forward as fw

    calls = []
    real = fw.last_logits
    monkeypatch.setattr(fw, "last_logits", lambda m, b: calls.append(1) or real(m, b))
    # default positions: H at the instruction positions, R at every position -> their controls differ
    res = _run(model, tok, planted, kind="ablate", values=[0.5, 1.0], carriers=("H", "R"), n_controls=3)
    # 1 baseline + 2 betas x (H + R) + 2 betas x 3 controls x 2 position sets
    assert len(calls) == 1 + 4 + 12
    for beta in (0.5, 1.0):
        assert res.row("H", beta, "kl_harmless").controls != res.row("R", beta, "kl_harmless").controls
    # both at every position: the ablation controls (same directions, beta, positions) are shared
    calls.clear()
    res = _run(model, tok, planted, kind="ablate", values=[0.5, 1.0], carriers=("H", "R"), n_controls=3, positions="all")
    assert len(calls) == 1 + 4 + 6
    for beta in (0.5, 1.0):
        assert res.row("H", beta, "kl_harmless").controls == res.row("R", beta, "kl_harmless").controls
    # H (all positions) adds one run per beta: its ablation controls are R's
    calls.clear()
    res = _run(model, tok, planted, kind="ablate", values=[0.5, 1.0], carriers=("H", "R"), n_controls=3,
               h_all_positions=True)
    assert res.carriers == ["H", "R", H_ALL] and res.positions[H_ALL] == "all"
    assert len(calls) == 1 + 6 + 12
    for beta in (0.5, 1.0):
        assert res.row(H_ALL, beta, "kl_harmless").controls == res.row("R", beta, "kl_harmless").controls
        assert res.row(H_ALL, beta, "kl_harmless").effect != res.row("H", beta, "kl_harmless").effect
    # additions are scaled by each carrier's own norm, so their controls are not shared
    calls.clear()
    _run(model, tok, planted, kind="add", values=[1.0], carriers=("H", "R"), n_controls=3, positions="all")
    assert len(calls) == 1 + 2 + 6


@pytest.fixture(scope="module")
def local_model(tok):
    """A tiny model whose attention writes nothing (o_proj = 0): every position is computed from its own token only,
    so the last prompt position (where a sweep reads its effect) feels an edit only if it is made there."""
    m = tiny_model("llama", tokenizer=tok, n_layers=3, d_model=D, seed=1)
    for layer in m.model.layers:
        layer.self_attn.o_proj.weight.zero_()
    return m


@pytest.mark.parametrize("kind, value", [("add", 2.0), ("ablate", 1.0)])
def test_h_at_instruction_positions_leaves_post_instruction_readout_alone(local_model, tok, planted, kind, value):
    """H planted as the refusal tokens' unembedding direction, which the refusal score reads at the last
    (post-instruction) position: at the instruction positions it changes nothing there; at every position it does."""
    _, R, rt = planted
    H = R.clone()  # the readout direction as "H"
    R2 = torch.randn(D, generator=torch.Generator().manual_seed(9))
    res = sweep(local_model, tok, H, R2, HARMFUL, HARMLESS, layer=LAYER, refusal_tokens=rt, kind=kind, values=[value],
                carriers=("H",), h_all_positions=True, n_controls=2, progress=False)
    for m in METRICS:
        inst = res.row("H", value, m)
        assert inst.positions == "instruction"
        assert abs(inst.effect) < 1e-5 and all(abs(c) < 1e-5 for c in inst.controls)  # its controls: same positions
    every = res.row(H_ALL, value, "refusal_harmful")
    assert every.positions == "all" and abs(every.effect) > 1e-2
    assert res.row(H_ALL, value, "kl_harmless").effect > 1e-4
