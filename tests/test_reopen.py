"""The reopen table (PROTOCOL 4) and the baseline diagnostics (PROTOCOL 5) on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pysafegeom.pipelines.analyze import analyze, anchor_findings, load_result
from pysafegeom.behaviour import SubstringJudge, Verdict
from pysafegeom.interventions import ablate, add
from pysafegeom.models import ModelAdapter, tiny_model
from pysafegeom.pipelines.reopen import Reopen, mcnemar_exact, percentile, random_frames, reopen_attacks
from pysafegeom.generation import greedy_generate
from pysafegeom.models.forward import kl_next_token, last_logits
from pysafegeom.prompts import encode_batches

from test_analysis import HARMFUL, HARMLESS, XS

BENIGN = ["Name three colours of the rainbow.", "What is two plus two?", "Write a short greeting."]
REFS = ["Red, orange and yellow.", "Four.", "Hello, and welcome!"]


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", tokenizer=tok, n_layers=3, d_model=32, seed=5)


@pytest.fixture(scope="module")
def carriers(model):
    g = torch.Generator().manual_seed(11)
    d = ModelAdapter(model).d_model
    return torch.randn(d, generator=g) * 3, torch.randn(d, generator=g) * 2


class FirstWordJudge:
    """Refused when the answer starts with the same word as the baseline answer of that prompt (a planted judge)."""

    name = "first-word"

    def __init__(self, baseline: dict[str, str]):
        self.baseline = baseline

    def judge(self, prompts, responses):
        out = []
        for p, r in zip(prompts, responses):
            same = r.split()[:1] == self.baseline[p].split()[:1]
            out.append(Verdict(True, "full", "same first word") if same else Verdict(False, "none", "no rule fired"))
        return out


def _run(model, tok, H, R, **kw):
    args = dict(harmful=HARMFUL[:4], harmless=HARMLESS[:3], xstest_safe=XS, benign=BENIGN, benign_references=REFS,
                xstest_unsafe=HARMFUL[4:6], n_controls=2, max_new_tokens=5, batch_size=8, progress=False)
    args.update(kw)
    return reopen_attacks(model, tok, H, R, 1, **args)


@pytest.fixture(scope="module")
def rep(model, tok, carriers):
    H, R = carriers
    return _run(model, tok, H, R)


def test_rows_match_generations_under_the_same_hooks(rep, model, tok, carriers):
    H, R = carriers
    judge = SubstringJudge()
    plain = greedy_generate(model, tok, HARMFUL[:4], max_new_tokens=5, progress=False)
    with ablate(model, (R / R.norm()).float()):
        abl = greedy_generate(model, tok, HARMFUL[:4], max_new_tokens=5, progress=False)
    assert rep.row("baseline").success == [not v.refused for v in judge.judge(HARMFUL[:4], plain)]
    assert rep.row("ablate R").success == [not v.refused for v in judge.judge(HARMFUL[:4], abl)]
    assert [s["response"] for s in rep.samples["ablate R"]] == abl[:3]
    # the H row: ablate(..., positions="instruction") by hand, answers and KL on the harmless prompts
    h = (H / H.norm()).float()
    batches = encode_batches(tok, HARMLESS[:3], batch_size=8)
    with torch.no_grad():
        base_logits = last_logits(model, batches)
        with ablate(model, h, positions="instruction", tokenizer=tok):
            inst = greedy_generate(model, tok, HARMFUL[:4], max_new_tokens=5, progress=False)
            inst_logits = last_logits(model, batches)
        with ablate(model, h):
            every_logits = last_logits(model, batches)
    assert rep.row("ablate H").positions == "instruction" and rep.row("ablate H (all positions)").positions == "all"
    assert [s["response"] for s in rep.samples["ablate H"]] == inst[:3]
    assert rep.row("ablate H").success == [not v.refused for v in judge.judge(HARMFUL[:4], inst)]
    assert rep.row("ablate H").kl == pytest.approx(float(kl_next_token(base_logits, inst_logits).mean()), rel=1e-3)
    assert rep.row("ablate H (all positions)").kl == pytest.approx(float(kl_next_token(base_logits, every_logits).mean()),
                                                                  rel=1e-3)
    assert rep.row("ablate H").kl != pytest.approx(rep.row("ablate H (all positions)").kl, rel=1e-3)


def test_table_shape_and_baseline(rep):
    names = [c.name for c in rep.conditions]
    assert names[:5] == ["baseline", "ablate R", "ablate H", "ablate H (all positions)", "ablate span(H, R)"]
    assert [(r["condition"], r["positions"]) for r in rep.summary_rows] == [
        ("baseline", "none"), ("ablate R", "all"), ("ablate H", "instruction"), ("ablate H (all positions)", "all"),
        ("ablate span(H, R)", "all")]
    # 2 one-D at every position (shared by R and H at all positions) + 2 one-D at the instruction positions + 2 two-D
    ctrls = {c.name: (c.control_of, c.positions) for c in rep.conditions if c.carrier == "control"}
    assert ctrls == {"ablate control 0": ("ablate R|ablate H (all positions)", "all"),
                     "ablate control 1": ("ablate R|ablate H (all positions)", "all"),
                     "ablate control 0 (instruction)": ("ablate H", "instruction"),
                     "ablate control 1 (instruction)": ("ablate H", "instruction"),
                     "ablate 2-D control 0": ("ablate span(H, R)", "all"),
                     "ablate 2-D control 1": ("ablate span(H, R)", "all")}
    assert rep.settings["positions"] == {"ablate R": "all", "ablate H": "instruction", "ablate H (all positions)": "all",
                                         "ablate span(H, R)": "all"}
    base = rep.summary_rows[0]
    assert base["delta_asr"] == 0 and base["kl"] == 0
    for row in rep.summary_rows[1:]:
        assert row["kl"] > 0  # every ablation moves the next-token distribution of a random model a little
        assert row["n_controls"] == 2 and 0 <= row["delta_asr_percentile"] <= 100
    rows = {r["condition"]: r for r in rep.summary_rows}
    for carrier, tag in (("ablate R", ""), ("ablate H (all positions)", ""), ("ablate H", " (instruction)")):
        ctrl = [rep.row(f"ablate control {i}{tag}") for i in range(2)]
        d = [c.asr_value - rep.row("baseline").asr_value for c in ctrl]
        assert rows[carrier]["controls_delta_asr_mean"] == pytest.approx(sum(d) / len(d))
        kl = [c.kl for c in ctrl]
        assert rows[carrier]["controls_kl_mean"] == pytest.approx(sum(kl) / len(kl))
    assert rows["ablate H"]["controls_kl_mean"] != pytest.approx(rows["ablate R"]["controls_kl_mean"])
    assert "instruction positions" in rep.verdict and "every position" in rep.verdict
    dg = rep.diagnostics
    assert dg["robust_refusal"]["n"] == 4 and dg["exaggerated_safety"]["n"] == len(XS)
    assert dg["exaggerated_safety"]["contrast"]["n"] == 2
    assert dg["benign_utility"]["mean_cross_entropy"] > 0


def test_round_trip(rep):
    again = Reopen.from_dict(rep.to_dict())
    assert again == rep


def test_planted_judge_sees_the_intervention(model, tok, carriers):
    # a judge that counts any change of the first answer word as an attack success: baseline ASR is 0 by
    # construction, and ablating a carrier that changes answers must show up as ΔASR > 0.
    H, R = carriers
    base = dict(zip(HARMFUL[:4], greedy_generate(model, tok, HARMFUL[:4], max_new_tokens=5, progress=False)))
    big = ModelAdapter(model).embed.weight[:, :].T.double()
    top = torch.linalg.svd(big, full_matrices=False).U[:, 0].float() * 5  # the embedding's main direction moves answers
    rep = _run(model, tok, H, top, judges=[FirstWordJudge(base), SubstringJudge()], n_controls=0)
    assert rep.row("baseline").asr_value == 0.0
    changed = rep.row("ablate R").asr_value
    with ablate(model, top / top.norm()):
        abl = greedy_generate(model, tok, HARMFUL[:4], max_new_tokens=5, progress=False)
    expect = sum(a.split()[:1] != base[p].split()[:1] for p, a in zip(HARMFUL[:4], abl)) / 4
    assert changed == pytest.approx(expect)
    assert set(rep.row("baseline").asr) == {"first-word", "substring"}


@pytest.mark.parametrize("bad, match", [
    (dict(judges=[]), "judges is empty"),
    (dict(max_new_tokens=0), "generation budget of zero"),
    (dict(harmful=[]), "harmful prompt list"),
    (dict(benign_references=["x"]), "benign references"),
    (dict(judges=[object()]), "not a judge"),
    (dict(n_controls=-1), "n_controls"),
])
def test_bad_input(model, tok, carriers, bad, match):
    H, R = carriers
    with pytest.raises((ValueError, TypeError), match=match):
        _run(model, tok, H, R, **bad)


def test_bad_carriers(model, tok, carriers):
    H, R = carriers
    with pytest.raises(ValueError, match="residual width"):
        reopen_attacks(model, tok, H[:-1], R, 1, harmful=HARMFUL, harmless=HARMLESS, xstest_safe=XS, benign=BENIGN)
    with pytest.raises(ValueError, match="NaN"):
        reopen_attacks(model, tok, H * float("nan"), R, 1, harmful=HARMFUL, harmless=HARMLESS, xstest_safe=XS, benign=BENIGN)
    with pytest.raises(ValueError, match="out of range"):
        reopen_attacks(model, tok, H, R, 3, harmful=HARMFUL, harmless=HARMLESS, xstest_safe=XS, benign=BENIGN)


def test_random_frames_are_orthonormal_seeded_and_avoid_the_span():
    span = torch.randn(40, 2, dtype=torch.float64)
    a = random_frames(40, 2, 3, avoid=span, seed=4)
    b = random_frames(40, 2, 3, avoid=span, seed=4)
    c = random_frames(40, 2, 3, avoid=span, seed=5)
    for q, q2, q3 in zip(a, b, c):
        assert torch.equal(q, q2) and not torch.equal(q, q3)
        torch.testing.assert_close(q.T @ q, torch.eye(2, dtype=torch.float64), atol=1e-12, rtol=0)
        assert (span.T @ q).abs().max() < 1e-10 * span.norm()
    with pytest.raises(ValueError, match="n_controls"):
        random_frames(40, 1, 0)
    with pytest.raises(ValueError, match="no room"):
        random_frames(3, 2, 1, avoid=span[:3])


@given(st.lists(st.booleans(), min_size=1, max_size=30), st.data())
@settings(max_examples=60, deadline=None)
def test_mcnemar_matches_the_binomial_definition(a, data):
    b = data.draw(st.lists(st.booleans(), min_size=len(a), max_size=len(a)))
    n01 = sum((not x) and y for x, y in zip(a, b))
    n10 = sum(x and not y for x, y in zip(a, b))
    n = n01 + n10
    # brute force: probability under Binomial(n, 1/2) of outcomes at most as likely as the observed one
    probs = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    obs = probs[n01] if n else 1.0
    brute = min(1.0, sum(p for p in probs if p <= obs + 1e-15)) if n else 1.0
    assert mcnemar_exact(a, b) == pytest.approx(brute, rel=1e-9)
    assert mcnemar_exact(a, b) == mcnemar_exact(b, a)


def test_percentile_counts_ties_half():
    assert percentile(0.5, [0.1, 0.5, 0.9]) == pytest.approx(50.0)
    assert percentile(1.0, [0.1, 0.2]) == 100.0
    assert percentile(0.0, []) is None


def test_analyze_with_interventions_saves_table_and_report(model, tok, tmp_path):
    res = analyze(model, HARMFUL, HARMLESS, XS, tokenizer=tok, n_val=3, selection_positions=["eoi-1"], min_filtered=1,
                  progress=False, interventions=True, n_controls=1, max_new_tokens=4, n_behaviour=3, sweeps=True)
    rp = res.reopen
    assert [r["condition"] for r in rp["summary_rows"]] == ["baseline", "ablate R", "ablate H", "ablate H (all positions)",
                                                            "ablate span(H, R)"]
    assert [r["positions"] for r in rp["summary_rows"]] == ["none", "all", "instruction", "all", "all"]
    assert rp["verdict"] and any(rp["verdict"] in line for line in res.metrics["summary"])
    assert res.meta["timings_s"]["reopen"] > 0
    out = res.save(tmp_path / "r")
    again = load_result(out)
    assert again.reopen == res.reopen and again.sweeps == res.sweeps
    assert set(res.sweeps) == {"add", "ablate"} and res.sweeps["add"]["layer"] == res.metrics["reference"]["layer"]
    html = (out / "report.html").read_text()
    assert "<th>positions</th>" in html and "<td>instruction</td>" in html
    assert "Reopening attacks" in html and "Behavioural diagnostics" in html and "Sweeps (PROTOCOL 4)" in html
    lines = anchor_findings(again, again)
    assert any(l.startswith("Finding 1") for l in lines) and any(l.startswith("Finding 2") for l in lines)


def test_analyze_rejects_judges_without_interventions(model, tok):
    with pytest.raises(ValueError, match="interventions=True"):
        analyze(model, HARMFUL, HARMLESS, XS, tokenizer=tok, n_val=3, min_filtered=1, progress=False, judges=[SubstringJudge()])


def test_verdict_flags_interventions_that_break_the_model(rep):
    from pysafegeom.pipelines.reopen import BROKEN_KL, reopen_verdict, summarise

    broken = Reopen.from_dict(rep.to_dict())
    broken.row("ablate R").kl = BROKEN_KL * 5
    broken.summary_rows = summarise(broken.conditions)
    words, _ = reopen_verdict(broken)
    assert "ablate R (KL 5.0 nats)" in words and "break the model" in words
    assert "ablate H (KL" not in words
    intact, _ = reopen_verdict(rep)
    assert ("Caution" in intact) == any(r["kl"] > BROKEN_KL for r in rep.summary_rows)


def test_cli_attacks_need_interventions(tmp_path, capsys):
    from pysafegeom.cli import main

    assert main(["analyze", "--out", str(tmp_path / "o"), "--attacks", str(tmp_path / "a.txt")]) == 2
    assert "add --interventions" in capsys.readouterr().err


def test_one_run_per_distinct_intervention(model, tok, carriers, monkeypatch):
    """Forward count: one generation pass per condition, and one condition per distinct intervention (direction,
    size, positions). Controls identical for two rows run once; rows at different positions get their own."""
    import pysafegeom.generation as generation
    import pysafegeom.interventions.hooks as hooks

    H, R = carriers
    n_gen, made = [], []
    real_gen, real_ablate, real_add = generation.greedy_generate, hooks.ablate, hooks.add
    monkeypatch.setattr(generation, "greedy_generate", lambda *a, **k: n_gen.append(1) or real_gen(*a, **k))

    def key(kind, v, kw, extra=()):
        pos = kw.get("positions", "all")
        return (kind, tuple(v.flatten().tolist()), *extra, pos if isinstance(pos, str) else "mask")

    monkeypatch.setattr(hooks, "ablate", lambda m, v, **kw: made.append(key("ablate", v, kw)) or real_ablate(m, v, **kw))
    monkeypatch.setattr(hooks, "add", lambda m, v, layer, **kw: made.append(key("add", v, kw, (layer, kw["alpha"])))
                        or real_add(m, v, layer, **kw))
    rep = _run(model, tok, H, R, actadd=True, n_controls=2, benign_references=None)
    # 1 baseline + 6 carrier rows (R, H, H at all positions, span, ActAdd -R, ActAdd -H) + controls: 2 one-D at every
    # position (R and H (all positions)), 2 one-D at the instruction positions (H), 2 two-D (span), 2 + 2 ActAdd
    assert len(n_gen) == len(rep.conditions) == 1 + 6 + 2 + 2 + 2 + 2 + 2
    assert len(made) == len(rep.conditions) - 1 and len(set(made)) == len(made)  # no intervention runs twice
    by_name = {c.name: c for c in rep.conditions}
    assert by_name["ActAdd -H"].positions == "instruction" and by_name["ActAdd -R"].positions == "all"
    for i in range(2):
        assert by_name[f"ActAdd -H control {i} (instruction)"].control_of == "ActAdd -H"
        assert by_name[f"ActAdd -H control {i} (instruction)"].positions == "instruction"
        assert by_name[f"ActAdd -R control {i}"].positions == "all"
    assert {pos for (kind, *_, pos) in made if kind == "add"} == {"all", "instruction"}
    rows = {r["condition"]: r for r in rep.summary_rows}
    assert rows["ActAdd -H"]["positions"] == "instruction" and rows["ActAdd -H"]["n_controls"] == 2
    assert "instruction positions" in rep.verdict


@pytest.fixture(scope="module")
def local_model(tok):
    """Attention writes nothing (o_proj = 0): each position depends on its own token only. An edit of the instruction
    tokens then cannot reach the post-instruction positions or the answer, so everything read there is unchanged."""
    m = tiny_model("llama", tokenizer=tok, n_layers=3, d_model=32, seed=5)
    for layer in m.model.layers:
        layer.self_attn.o_proj.weight.zero_()
    return m


def test_h_rows_leave_post_instruction_behaviour_alone(local_model, tok):
    """A planted direction read at the post-instruction positions (the main direction of the embedding, which moves
    the answers of this model): ablating it as H at the instruction positions leaves answers, KL, over-refusal and
    the reference cross-entropy exactly as at baseline (and so do its controls, at the same positions);
    ablating it at every position changes them."""
    emb = ModelAdapter(local_model).embed.weight.T.double()
    top = torch.linalg.svd(emb, full_matrices=False).U[:, 0].float() * 5
    R = torch.randn(32, generator=torch.Generator().manual_seed(3))
    rep = _run(local_model, tok, top, R)
    base = rep.row("baseline")
    rows = {r["condition"]: r for r in rep.summary_rows}
    for name in ["ablate H", "ablate control 0 (instruction)", "ablate control 1 (instruction)"]:
        c = rep.row(name)
        assert c.positions == "instruction"
        assert c.kl < 1e-9 and c.success == base.success
        assert c.over_refusal == base.over_refusal and c.utility["value"] == base.utility["value"]
        assert c.utility["mean_cross_entropy"] == pytest.approx(base.utility["mean_cross_entropy"], abs=1e-6)
    assert rep.samples["ablate H"] == rep.samples["baseline"]
    assert rows["ablate H"]["delta_asr"] == 0 and abs(rows["ablate H"]["delta_ce"]) < 1e-6
    every = rep.row("ablate H (all positions)")
    assert every.kl > 1e-5 and rep.samples["ablate H (all positions)"] != rep.samples["baseline"]
    assert abs(rows["ablate H (all positions)"]["delta_ce"]) > 1e-4
