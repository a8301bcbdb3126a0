"""pysafegeom.trajectory on tiny random Llamas: two quickly trained LoRA SFT runs (checkpoints 0, 2, 4), the API, the
CLI, resume after a kill, the refusal of a mismatched folder, the input checks, exact permutation p-values against
brute force, adapter swapping against fresh loading, the PROTOCOL 8 findings, and the report in headless Chromium."""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch

pytest.importorskip("peft")

from pysafegeom.errors import InvalidArgument, MissingFile  # noqa: E402
from pysafegeom.pipelines import trajectory as T  # noqa: E402
from trajectory_sets import BENIGN, EXAMPLES, HARMFUL, HARMLESS, OPTS, XS  # noqa: E402



def _case(bid: str, text: str) -> dict:
    return {"id": bid, "behavior": text, "method": "gcg", "source_model": "tiny", "source_model_hash": "0" * 16,
            "test_case": text + " x x ! x", "target": "Sure, here is", "losses": [1.0, 0.5], "config": {}}


@pytest.fixture(scope="module")
def setup(tok, tmp_path_factory):
    """A tiny base folder, two LoRA SFT runs of it (seeds 0 and 1) with checkpoint-0, -2 and -4, and a 2-case store."""
    from pysafegeom.attacks.store import TestCaseStore
    from pysafegeom.models.tiny import tiny_model
    from pysafegeom.train import TrainConfig, run

    root = tmp_path_factory.mktemp("trajectory")
    base = root / "base"
    tiny_model("llama", tokenizer=tok, n_layers=2, d_model=32, seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    for name, seed in (("sft", 0), ("sft2", 1)):
        run(str(base), None, EXAMPLES, TrainConfig(steps=4, batch_size=2, lr=2e-2, warmup_steps=0, max_len=48, seed=seed,
                                                   save_at=(0, 2, 4)), root / name, progress=False)
    store = root / "gcg"
    TestCaseStore(store).add([_case("car", HARMFUL[0]), _case("lock", HARMFUL[1])])
    stamps = {f.name: f.stat().st_mtime_ns for f in store.iterdir()}
    return {"root": root, "base": base, "sft": root / "sft", "sft2": root / "sft2", "store": store, "stamps": stamps}


def _rate(k, n):
    from pysafegeom.attacks.replay import rate

    return rate(k, n)


MATRIX = {"sources": ["sft-0", "sft-4"], "targets": ["sft-0", "sft-4", "sft2-4"], "methods": ["gcg"],
          "cells": {"all": {"sft-0": {"sft-0": _rate(2, 2), "sft-4": _rate(1, 2), "sft2-4": _rate(0, 2)},
                            "sft-4": {"sft-0": _rate(1, 2), "sft-4": _rate(2, 2), "sft2-4": _rate(1, 2)}}}}


def _run(s, out, **kw):
    runs = kw.pop("runs", None) or {"sft": str(s["sft"]),
                                    "sft2": [(k, str(s["sft2"] / f"checkpoint-{k}")) for k in (0, 2, 4)]}
    cases = kw.pop("cases", s["store"])
    return T.trajectory(runs, out=out, harmful=HARMFUL, harmless=HARMLESS, xstest=XS, benign=BENIGN,
                        cases=cases, progress=False, **{**OPTS, **kw})


@pytest.fixture(scope="module")
def measured(setup):
    out = setup["root"] / "out"
    return _run(setup, out, transfer=MATRIX), out


def test_api_measures_every_anchor_and_compares_them(measured, setup):
    import pysafegeom
    from pysafegeom.pipelines.analyze import load_result

    res, out = measured
    assert [(r["trajectory"], r["step"]) for r in res.table] == [(t, s) for t in ("sft", "sft2") for s in (0, 2, 4)]
    # the base loaded once, adapters swapped; sft2-0 (a zero LoRA update, seen in its files) copied without a load
    assert res.meta["loading"] == {"adapter_swaps": 5, "fresh_loads": 0}
    assert {e["anchor"]: e.get("copied_from") for e in res.meta["log"]}["sft2-0"] == "sft-0"
    for r in res.table:
        assert (out / "anchors" / f"{r['trajectory']}-{r['step']}" / "analysis" / "result.json").is_file()
        assert r["carrier"]["reference_layer"] in (0, 1, 2) and r["carrier"]["n_admissible"] >= 0
        assert 0 <= r["kappa_mid_band"] <= 1 and 0 <= r["kappa_sub"] <= 1 and r["effective_rank"] >= 1
        assert r["direct_asr"]["n"] == 2 and r["xstest_any_refusal"]["n"] == len(XS) and r["benign_utility"]["n"] == 2
        assert r["benign_utility"]["mean_cross_entropy"] > 0
        assert r["fixed_source"]["per_method"]["gcg"]["n"] == 2 and r["b_source"] == "fixed-source ASR"
        assert len(r["b"]) == 4 and all(0 <= v <= 1 for v in r["b"])
        if r["step"] == 0:
            assert r["drift_first"] is None and r["b_distance_first"] == 0.0
        else:
            for d in (r["drift_first"], r["drift_prev"]):
                assert d["common_layer"] == 1 and 0 <= d["common_deg"] <= 90 and 0 <= d["own_deg"] <= 90
                assert len(d["common_angles_deg"]) >= 1 and 0 <= d["R_direction_drift"] <= 1
    # checkpoint-0 of both runs is the same untrained start (a zero LoRA update): identical geometry
    z = [r for r in res.table if r["step"] == 0]
    assert z[0]["kappa_mid_band"] == pytest.approx(z[1]["kappa_mid_band"], abs=1e-6)
    # the common-layer drift is the package's drift() at that layer
    a, b = (load_result(out / "anchors" / f"sft-{s}" / "analysis") for s in (0, 4))
    want = pysafegeom.drift(a, b)["Q_R_subspace_drift_deg_per_layer"][1]
    assert res.table[2]["drift_first"]["common_deg"] == pytest.approx(want, abs=1e-4)
    # correlations: pooled (6 anchors) and within each trajectory (3), exact p-values
    assert set(res.correlations) == {"pooled", "sft", "sft2"}
    cells = {(c["geometry"], c["behaviour"]): c for c in res.correlations["pooled"]}
    ce = cells["kappa_mid_band", "benign_ce"]  # CE moves with every checkpoint; the tiny models' answers do not
    assert ce["n"] == 6 and ce["method"] == "exact: all 6! = 720 orderings" and 0 < ce["p_two_sided"] <= 1
    assert cells["drift_common_deg", "benign_ce"]["n"] == 4  # no drift at the first anchors
    for c in res.correlations["sft"]:
        assert c["n"] <= 3 and (c["rho"] is None) == ("note" in c)
    # transfer: 4 off-diagonal anchor pairs of the given matrix
    tr = res.transfer
    assert len(tr["pairs"]) == 4 and tr["unmatched"] == []
    assert {p["source"] for p in tr["pairs"]} == {"sft-0", "sft-4"} and all(p["drift_deg"] is not None for p in tr["pairs"])
    assert {f.name: f.stat().st_mtime_ns for f in setup["store"].iterdir()} == setup["stamps"]  # the store only read
    saved = json.loads((out / "trajectory.json").read_text())
    assert saved["table"][0]["trajectory"] == "sft" and saved["findings"]
    md = (out / "table.md").read_text().splitlines()
    rows = [line for line in md if line.startswith("| sft")]
    assert len(rows) == 6 and all(line.count(" | ") == 15 for line in rows)  # 16 columns, no stray pipe
    assert any(line.startswith("| kappa_mid_band | benign_ce |") for line in md)


def test_resume_after_a_kill_and_mismatched_config(setup, monkeypatch):
    from pysafegeom.attacks.store import TestCaseStore

    out = setup["root"] / "killed"
    store = shutil.copytree(setup["store"], setup["root"] / "growing")
    real = T.measure_anchor
    calls = []

    def dies_on_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill in the middle of the second anchor
        return real(*a, **kw)

    monkeypatch.setattr(T, "measure_anchor", dies_on_second)
    runs = {"sft": str(setup["sft"])}
    with pytest.raises(KeyboardInterrupt):
        _run(setup, out, runs=runs, cases=store)
    assert sorted(p.name for p in (out / "anchors").iterdir()) == ["sft-0"]  # finished anchor only, no leftovers
    monkeypatch.setattr(T, "measure_anchor", real)
    res = _run(setup, out, runs=runs, cases=store)
    assert [e["skipped"] for e in res.meta["log"]] == [True, False, False]
    before = (out / "anchors" / "sft-2" / "anchor.json").read_text()
    analysis = (out / "anchors" / "sft-2" / "analysis" / "result.json").read_text()
    res = _run(setup, out, runs=runs, cases=store)
    assert all(e["skipped"] for e in res.meta["log"])
    assert (out / "anchors" / "sft-2" / "anchor.json").read_text() == before
    # the store grows: only the replay is redone, and only the new case generated
    TestCaseStore(store).add([_case("check", HARMFUL[2])])
    res = _run(setup, out, runs=runs, cases=store)
    assert [e.get("refreshed") for e in res.meta["log"]] == [["fixed_source"]] * 3
    assert all(r["fixed_source"]["n_test_cases"] == 3 and r["fixed_source"]["n_generated"] == 1 for r in res.table)
    assert (out / "anchors" / "sft-2" / "analysis" / "result.json").read_text() == analysis
    with pytest.raises(InvalidArgument, match=r"another configuration \(differs in: config.max_new_tokens\)"):
        _run(setup, out, runs=runs, cases=store, max_new_tokens=5)
    res = _run(setup, out, runs=runs, cases=store, max_new_tokens=5, force=True)
    assert not any(e["skipped"] for e in res.meta["log"]) and not any("refreshed" in e for e in res.meta["log"])


def test_cli(setup, tmp_path, capsys):
    from pysafegeom.cli import main

    files = {}
    for name, texts in (("harmful", HARMFUL), ("harmless", HARMLESS), ("xstest", XS)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(texts) + "\n")
    out = tmp_path / "cli"
    argv = ["trajectory", "--run", f"sft={setup['sft']}", "--run", f"sft2={setup['sft2']}", "--out", str(out),
            "--cases", str(setup["store"]), "--harmful", str(files["harmful"]), "--harmless", str(files["harmless"]),
            "--xstest", str(files["xstest"]), "--n-val", "3", "--positions", "eoi-1", "--n-kl-controls", "2",
            "--max-new-tokens", "4", "--replay-max-new-tokens", "4", "--n-behaviour", "2", "--quiet"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert said.count("step") >= 6 and "report:" in said and (out / "report.html").is_file()
    assert main(argv) == 0  # resumed: every anchor skipped
    assert all(e["skipped"] for e in T.load_trajectory(out)["meta"]["log"])
    capsys.readouterr()
    assert main([*argv[:-2], "5", "--quiet"]) == 2  # --n-behaviour 5: another configuration, refused
    assert "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["trajectory", "--run", "no-equals-sign", "--out", str(out)])
    capsys.readouterr()
    assert main([*argv, "--adaptive-subset", "2"]) == 2  # the attack options without the behaviours
    assert "--adaptive-behaviors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--adaptive-methods", "pgd"])


def test_input_checks(setup, tok, tmp_path):
    from pysafegeom.models.tiny import tiny_model

    ck = {k: str(setup["sft"] / f"checkpoint-{k}") for k in (0, 2, 4)}
    with pytest.raises(InvalidArgument, match="has 1 anchor"):
        T.anchors_of("sft", [(0, ck[0])])
    with pytest.raises(InvalidArgument, match="step 2 follows step 4"):
        T.anchors_of("sft", [(0, ck[0]), (4, ck[4]), (2, ck[2])])
    with pytest.raises(MissingFile, match="step 2.*does not exist"):
        T.anchors_of("sft", [(0, ck[0]), (2, str(tmp_path / "gone"))])
    holed = tmp_path / "holed"
    shutil.copytree(setup["sft"], holed)
    shutil.rmtree(holed / "checkpoint-2")
    with pytest.raises(MissingFile, match="lacks checkpoint-2"):
        T.anchors_of("sft", str(holed))
    other = tmp_path / "qwen"
    tiny_model("qwen2", tokenizer=tok, n_layers=2, d_model=32).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(InvalidArgument, match="another architecture"):
        T.check_anchors({"sft": T.anchors_of("sft", [(0, ck[0]), (2, str(other))])})
    retok = tmp_path / "retok"
    shutil.copytree(setup["base"], retok)
    t2 = type(tok).from_pretrained(str(setup["base"]))
    t2.add_tokens(["<extra_token_for_the_test>"])
    t2.save_pretrained(retok)
    with pytest.raises(InvalidArgument, match="another tokenizer"):
        T.check_anchors({"sft": T.anchors_of("sft", [(0, str(setup["base"])), (2, str(retok))])})
    # a prompt a checkpoint trained on, in a prompt set or among the replayed cases: refused before any model loads
    from pysafegeom.attacks.store import TestCaseStore
    from pysafegeom.errors import DataOverlap

    runs = {"sft": str(setup["sft"])}
    with pytest.raises(DataOverlap, match=r"sft-0 .* trained on 1 prompt\(s\) of harmful"):
        T.trajectory(runs, out=tmp_path / "o1", harmful=HARMFUL + [EXAMPLES[1][0]], harmless=HARMLESS, xstest=XS,
                     benign=BENIGN, progress=False)
    bad = tmp_path / "bad-cases"
    TestCaseStore(bad).add([_case("dog", EXAMPLES[3][0])])
    with pytest.raises(DataOverlap, match="replayed test cases"):
        T.trajectory(runs, out=tmp_path / "o2", harmful=HARMFUL, harmless=HARMLESS, xstest=XS, benign=BENIGN,
                     cases=bad, progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    with pytest.raises(TypeError, match="unknown trajectory option"):
        T.trajectory(runs, out=tmp_path / "x", bogus=1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        T.trajectory(runs, out=tmp_path / "x", max_new_tokens=0)
    with pytest.raises(ValueError, match="n_val"):
        T.trajectory(runs, out=tmp_path / "x", n_val=0)
    cfg = T._split_options(T.TrajectoryConfig(max_new_tokens=7), {"n_val": 3, "selection_positions": "eoi-1"})
    assert cfg.max_new_tokens == 7 and cfg.analysis == {"n_val": 3, "selection_positions": ["eoi-1"]}


def _brute(x, y):
    """Every ordering of y, its Spearman ρ by the package's spearman(): (p_greater, p_less, p_two_sided)."""
    from pysafegeom.protocol.metrics import spearman

    X = torch.tensor(x, dtype=torch.float64)
    obs = spearman(X, torch.tensor(y, dtype=torch.float64))
    rhos = [spearman(X, torch.tensor(p, dtype=torch.float64)) for p in itertools.permutations(y)]
    n, e = len(rhos), 1e-9
    return (sum(r >= obs - e for r in rhos) / n, sum(r <= obs + e for r in rhos) / n,
            sum(abs(r) >= abs(obs) - e for r in rhos) / n, obs)


def test_permutation_p_values_are_exact():
    # a planted perfectly monotone relation: ρ = 1, one-sided p = 1/n!, two-sided p = 2/n! (the report's p)
    for n in (3, 4, 5, 6):
        t = T.permutation_test(list(range(n)), [2 * v + 1 for v in range(n)])
        assert t["rho"] == pytest.approx(1.0)
        assert t["p_greater"] == pytest.approx(1 / math.factorial(n))
        assert t["p_two_sided"] == pytest.approx(2 / math.factorial(n))
        assert t["method"] == f"exact: all {n}! = {math.factorial(n)} orderings"
    # ties and a noisy relation: the same three p-values as enumerating every ordering with spearman()
    for x, y in (([0.1, 0.4, 0.2, 0.9, 0.5, 0.3], [0.0, 0.5, 0.5, 1.0, 0.25, 0.0]),
                 ([3.0, 1.0, 2.0, 5.0, 4.0], [1.0, 3.0, 2.0, 4.0, 5.0])):
        t, (g, l, two, rho) = T.permutation_test(x, y), _brute(x, y)
        assert (t["p_greater"], t["p_less"], t["p_two_sided"]) == pytest.approx((g, l, two), abs=1e-12)
        assert t["rho"] == pytest.approx(rho, abs=1e-12)
    assert T.permutation_test([1, 2, 3], [5, 5, 5])["rho"] is None
    mc = T.permutation_test(list(range(11)), list(range(11)), draws=2000)
    assert mc["method"].startswith("Monte Carlo") and mc["p_two_sided"] == pytest.approx(1 / 2001)


def test_adapter_swapping_equals_fresh_loading(setup):
    from pysafegeom.models import load_model
    from pysafegeom.models.provenance import training_prompts

    loader = T.AnchorLoader(device="cpu")
    ids = torch.tensor([[1, 5, 9, 14, 2, 7]])
    for step in (4, 2, 0, 4):  # out of order, and back: the previous adapter must be fully undone
        ck = setup["sft"] / f"checkpoint-{step}"
        model, _ = loader.load(str(ck))
        fresh, _ = load_model(ck, device="cpu")
        assert torch.equal(model(ids).logits, fresh(ids).logits)
        assert training_prompts(model) == training_prompts(fresh)
        assert not any("lora" in n for n, _ in model.named_modules())
    assert (loader.swaps, loader.fresh) == (4, 0)
    base, _ = load_model(setup["base"], device="cpu")
    model, _ = loader.load(str(setup["sft"] / "checkpoint-0"))  # zero update: the base itself
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), base.state_dict().values()))


def _row(traj, step, fs, xs, ben, kappa, drift, layer, erank=1.24):
    rate = {"value": None}
    return {"trajectory": traj, "step": step, "fixed_source": {"overall": {"asr": fs}}, "direct_asr": rate,
            "xstest_any_refusal": {"value": xs}, "benign_utility": {"value": ben}, "harmful_usefulness": rate,
            "kappa_mid_band": kappa, "kappa_at_carrier": kappa, "kappa_sub": kappa ** 2, "effective_rank": erank,
            "drift_first": None if drift is None else {"common_deg": drift}, "b_distance_first": 0.1 * step / 500,
            "carrier": {"reference_layer": layer, "layer": layer}}


def test_findings_on_the_published_pattern():
    """Rows with the abstract's pattern (PROTOCOL 8) are read as showing each finding; the reverse as not."""
    steps = (0, 50, 100, 250, 500)
    r2d2 = [_row("r2d2", s, fs, xs, ben, k, d, lay, e) for s, fs, xs, ben, k, d, lay, e in zip(
        steps, (0.0, 0.0, 0.0, 0.035, 0.25), (1.0, 1.0, 1.0, 0.664, 0.228), (0.9, 0.1, 0.2, 0.5, 0.6),
        (0.6, 0.5, 0.4, 0.3, 0.2), (None, 2.0, 3.0, 4.0, 5.0), (20, 20, 20, 10, 10), (1.23, 1.24, 1.25, 1.24, 1.26))]
    sft = [_row("sft", s, fs, 0.1, 0.9, k, d, lay) for s, fs, k, d, lay in zip(
        steps, (0.0, 0.51, 0.55, 0.58, 0.59), (0.15, 0.1, 0.12, 0.1, 0.11), (None, 10.0, 20.0, 30.0, 40.0),
        (20, 18, 15, 12, 10))]
    rows = r2d2 + sft
    f = {x["finding"].split(":")[0]: x["status"] for x in T.findings(rows, T.correlations(rows))}
    assert list(f.values()).count("shown") == 9 and "not measured" in f.values()
    flipped = [dict(r, kappa_mid_band=1 - r["kappa_mid_band"], effective_rank=3.0) for r in rows]
    g = {x["finding"].split(":")[0]: x["status"] for x in T.findings(flipped, T.correlations(flipped))}
    assert g["R2D2 coupling is high early and lower later; SFT ends low"] == "not shown"
    assert g["Effective rank of the refusal carrier stays near 1.24 and flat across training"] == "not shown"
    # relocation needs an admissible carrier at the first and the last anchor; a reference candidate is not one
    none_last = [dict(r, carrier={"reference_layer": 5, "layer": None}) if r["step"] == 500 else r for r in rows]
    h = {x["finding"]: x for x in T.findings(none_last, T.correlations(none_last))}
    reloc = h["R2D2's carrier sits late through step 100 and relocates earlier by step 250"]
    assert reloc["status"] == "cannot be judged" and "none admissible (ref. L5)" in reloc["evidence"]


def test_report_renders_in_headless_chromium(measured, tmp_path):
    from chromium import screenshot

    res, out = measured
    page = (out / "report.html").read_text(encoding="utf-8")
    for part in ("Findings of the paper", "coupling |cos(H, R)|", "attack success rate", "carrier layer (relocation)",
                 "drift vs first anchor", "Transfer (PROTOCOL 3", "correlations", "exact: all 6! = 720 orderings"):
        assert part in page, part
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained
    data = screenshot(out / "report.html", tmp_path / "shot.png", tmp_path, size="1200,3000")
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000  # charts drawn, not an empty page


def test_anchors_with_the_same_weights_are_measured_once(setup, tmp_path):
    """A checkpoint listed twice is copied (by its files); a zero-update LoRA checkpoint of another seed is the base's
    weights once merged and is copied too (by the loaded weights); every prompt list is tokenised once."""
    s = setup
    runs = {"sft": [(k, str(s["sft"] / f"checkpoint-{k}")) for k in (0, 4)],
            "again": [(0, str(s["sft"] / "checkpoint-0")), (4, str(s["sft"] / "checkpoint-4"))],
            "seed1": [(0, str(s["sft2"] / "checkpoint-0")), (2, str(s["sft2"] / "checkpoint-2"))]}
    res = _run(s, tmp_path / "out", runs=runs)
    log = {e["anchor"]: e for e in res.meta["log"]}
    assert log["again-0"]["copied_from"] == "sft-0" and log["again-4"]["copied_from"] == "sft-4"
    assert log["seed1-0"]["copied_from"] == "sft-0"  # other adapter files, the same merged weights
    assert "copied_from" not in log["seed1-2"] and "copied_from" not in log["sft-4"]
    rows = {(r["trajectory"], r["step"]): r for r in res.table}
    for (t, k), src in ((("again", 4), ("sft", 4)), (("seed1", 0), ("sft", 0))):
        got, want = rows[t, k], rows[src]
        assert got["spec"] != want["spec"] or t == "again"
        assert got["same_weights_as"] == f"{src[0]}-{src[1]}"
        for key in ("kappa_mid_band", "kappa_sub", "effective_rank", "b", "carrier"):
            assert got[key] == want[key]
    # measured anchors: sft-0, sft-4, seed1-2; each prompt list encoded by the first and reused by the others
    enc = res.meta["encoding"]
    assert enc["reused"] >= 2 * enc["encoded"] > 0
    # a rerun loads nothing: every folder (copies included) is done
    again = _run(s, tmp_path / "out", runs=runs)
    assert all(e.get("skipped") for e in again.meta["log"]) and again.table == res.table


def test_sparse_adaptive_attacks_per_anchor_added_later(setup, tmp_path):
    """GCG against each anchor on a seeded subset: its ASR in the row, the report and the correlations. Added to a
    finished trajectory, only the attacks run (the analysis is kept); dropped again, they are removed."""
    from pysafegeom.data import Prompt as P

    s = setup
    runs = {"sft": [(k, str(s["sft"] / f"checkpoint-{k}")) for k in (0, 4)]}
    behaviours = [P(HARMFUL[i], f"b{i}", meta={"target": "Sure, here is"}) for i in (2, 3, 4)]
    out = tmp_path / "out"
    first = _run(s, out, runs=runs)
    assert all(r["adaptive"] is None for r in first.table)
    stamp = (out / "anchors" / "sft-4" / "analysis" / "result.json").read_text()
    kw = dict(adaptive_behaviors=behaviours, adaptive_subset=2, gcg={"num_steps": 2, "search_width": 8, "topk": 8})
    res = _run(s, out, runs=runs, **kw)
    assert [e.get("refreshed") for e in res.meta["log"]] == [["adaptive"]] * 2
    for r in res.table:
        g = r["adaptive"]["gcg"]
        assert g["n"] == 2 and 0 <= g["k"] <= 2 and g["asr"] == g["k"] / 2
        summ = json.loads((out / "anchors" / f"sft-{r['step']}" / "adaptive" / "gcg" / "summary.json").read_text())
        assert summ["n"] == 2 and summ["asr"] == g["asr"]
    assert (out / "anchors" / "sft-4" / "analysis" / "result.json").read_text() == stamp  # the analysis kept
    assert not (out / ".work" / "sft-4").exists()  # attack states removed once the anchor is written
    cell = next(c for c in res.correlations["pooled"] if c["behaviour"] == "adaptive_asr")
    assert cell["n"] == 2 and cell["rho"] is None  # a value at both anchors; ρ needs 3
    html_text = (out / "report.html").read_text()
    assert "adaptive gcg" in html_text and "(adaptive attacks: not run)" not in html_text
    # the same subset every anchor: the records name the same behaviours
    ids = {r["step"]: sorted(json.loads(line)["id"] for line in
                             (out / "anchors" / f"sft-{r['step']}" / "adaptive" / "gcg" / "records.jsonl").open())
           for r in res.table}
    assert ids[0] == ids[4] and len(ids[0]) == 2
    # rerun with the same options: nothing to do; without the attacks: they are dropped
    again = _run(s, out, runs=runs, **kw)
    assert all(e.get("skipped") for e in again.meta["log"])
    dropped = _run(s, out, runs=runs)
    assert [e.get("refreshed") for e in dropped.meta["log"]] == [["adaptive"]] * 2
    assert all(r["adaptive"] is None for r in dropped.table) and not (out / "anchors" / "sft-4" / "adaptive").exists()
    with pytest.raises(InvalidArgument, match="adaptive_methods"):
        _run(s, tmp_path / "bad", runs=runs, adaptive_behaviors=behaviours, adaptive_methods=("pgd",))
    with pytest.raises(InvalidArgument, match="adaptive_behaviors"):
        _run(s, tmp_path / "bad", runs=runs, adaptive_targets="targets.json")
