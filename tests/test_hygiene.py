"""Data hygiene: fits and judgements never on a model's own training prompts, disjoint splits, the trainer's
record, the token-weighted loss, and resuming an interrupted analysis at the stage it reached."""

from __future__ import annotations

import json

import pytest
import torch

from pysafegeom.errors import DataOverlap
from pysafegeom.models import attach_training_prompts, load_model, tiny_model, training_prompts
from pysafegeom.models.provenance import overlap, prompt_key, read_training_prompts
from pysafegeom.pipelines import stages as S
from pysafegeom.pipelines.analyze import analyze, load_result, stages_folder
from pysafegeom.train import TrainConfig, export_adapter, run

from test_analysis import HARMFUL, HARMLESS, XS

EXAMPLES = [("Name a fruit that is yellow.", "A banana."), ("How do I pick a lock to rob a house?", "Sorry, I can't do that."),
            ("Say hello.", "Hello! How can I help you today? I am glad to answer any question you have."),
            ("Count to three.", "One, two, three.")]


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", tokenizer=tok, n_layers=3, d_model=32, seed=5)


def _kw():
    return dict(n_val=3, selection_positions=["eoi-1"], min_filtered=1, progress=False)


def test_prompt_key_and_overlap_ignore_case_space_and_quotes():
    assert prompt_key("  How  DO I\tpick a lock’s pins? ") == prompt_key("how do i pick a lock's pins?")
    assert prompt_key("Pick\u200b a \u201clock\u201d") == prompt_key('pick a "lock"')  # invisible chars, curly quotes
    assert prompt_key("ﬁle") == prompt_key("file")  # NFKC
    assert overlap(["a b", "C", "d"], ["A  B", "x"]) == ["a b"]
    assert overlap(["a"], None) == [] and overlap(["a"], []) == []


def test_analyze_refuses_a_models_own_training_prompts(model, tok):
    attach_training_prompts(model, [HARMFUL[2].upper() + "  ", "unrelated"])
    try:
        with pytest.raises(DataOverlap, match="trained on") as e:
            analyze(model, HARMFUL, HARMLESS, XS, tokenizer=tok, **_kw())
        assert "harmful: 1" in str(e.value) and "allow_overlap" in str(e.value)
        res = analyze(model, HARMFUL, HARMLESS, XS, tokenizer=tok, allow_overlap=True, **_kw())
        assert res.meta["overlap_override"] == {"harmful": 1}
        assert any("allow_overlap=True" in n for n in res.meta["notes"])
    finally:
        attach_training_prompts(model, None)
    res = analyze(model, HARMFUL, HARMLESS, XS, tokenizer=tok, **_kw())  # no record: no complaint
    assert res.meta["overlap_override"] is None
    sp = res.meta["splits"]
    assert sp["harmful_train"]["n"] + sp["harmful_val"]["n"] + sp["harmful_test"]["n"] == len(HARMFUL)


def test_split_duplicates_and_cross_set_prompts_are_errors(model, tok):
    with pytest.raises(DataOverlap, match="the harmful set and the harmless set share"):
        analyze(model, HARMFUL, HARMLESS + [HARMFUL[0]], XS, tokenizer=tok, **_kw())
    dup = HARMFUL + [HARMFUL[0]] * 6  # duplicates land in train and in test: held-out figures would be in-sample
    with pytest.raises(DataOverlap, match="splits"):
        analyze(model, dup, HARMLESS, XS, tokenizer=tok, **_kw())


def test_readouts_use_only_held_out_splits(model, tok):
    """The harmful readouts are the test-split prompts' projections, recomputed by hand from a capture of those
    prompts alone; a readout of any training prompt would not match."""
    from pysafegeom.data import split_prompts
    from pysafegeom.protocol.capture import capture

    res = analyze(model, HARMFUL, HARMLESS, XS, tokenizer=tok, **_kw())
    splits = {s: [p.text for p in split_prompts(HARMFUL) if p.split == s] for s in ("train", "test")}
    assert not overlap(splits["test"], splits["train"])
    li = res.carriers.layers.index(res.metrics["reference"]["layer"])
    h = res.carriers.H[li].double()
    cap = capture(model, tok, {"test": splits["test"], "train": splits["train"]}, progress=False)
    want = (cap.per_prompt["test"]["t_inst"][:, li].double() @ (h / h.norm())).tolist()
    got = res.readouts["harmful_test"]["h"]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    trained = (cap.per_prompt["train"]["t_inst"][:, li].double() @ (h / h.norm())).tolist()
    assert not any(g == pytest.approx(t, rel=1e-4, abs=1e-4) for g in got for t in trained)
    assert res.metrics["latent_guard"]["scored_on"] == "harmful_test, harmless_test"


def test_trainer_records_prompts_and_export_and_load_carry_them(tok, tmp_path):
    base = tiny_model("llama", tokenizer=tok, n_layers=1, d_model=32, seed=0)
    folder = tmp_path / "base"
    base.save_pretrained(folder)
    tok.save_pretrained(folder)
    res = run(str(folder), None, EXAMPLES, TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=0, max_len=64),
              tmp_path / "out", progress=False)
    want = [e[0] for e in EXAMPLES]
    assert read_training_prompts(res.final_checkpoint) == want
    assert training_prompts(res.model) == want
    shipped = export_adapter(res.final_checkpoint, tmp_path / "shipped", base=str(folder))
    assert read_training_prompts(shipped) == want
    m, _ = load_model(shipped, device="cpu")
    assert training_prompts(m) == want
    with pytest.raises(DataOverlap):
        analyze(m, HARMFUL + [EXAMPLES[1][0]], HARMLESS, XS, tokenizer=tok, **_kw())


def test_shipped_anchor_records_its_training_prompts():
    from pathlib import Path

    import pysafegeom

    rec = read_training_prompts(Path(pysafegeom.__file__).parent / "anchors" / "smollm2-135m-safety")
    if rec is None:
        pytest.skip("the shipped anchor carries no training record yet")
    from pysafegeom.data import load_default

    for name in ("harmful", "harmless", "xstest_safe", "xstest_unsafe", "benign"):
        hit = overlap([p.text for p in load_default(name)], rec)
        assert not hit, f"the anchor was trained on {len(hit)} prompts of the bundled {name} set, e.g. {hit[0]!r}"


def test_token_weighted_loss_equals_one_big_batch(tok, tmp_path):
    """grad_accum=2 of 2 examples each must take the same step as one batch of 4: the loss is a mean over the
    step's response tokens, not a mean of micro-batch means (planted: very unequal response lengths)."""
    ex = [("Say hi.", "Hi."), ("Tell me a long story about a dog.", " ".join(["The dog ran far away."] * 8)),
          ("Name a colour.", "Red."), ("Describe the sea at length.", " ".join(["The sea is wide and blue."] * 6))]
    outs = []
    for bs, ga in ((4, 1), (2, 2)):
        m = tiny_model("llama", tokenizer=tok, n_layers=1, d_model=32, seed=1)
        cfg = TrainConfig(steps=1, batch_size=bs, grad_accum=ga, lr=1e-2, warmup_steps=0, max_len=96, lora=False,
                          max_grad_norm=0.0, seed=0)
        r = run(m, tok, ex, cfg, tmp_path / f"run{bs}", progress=False)
        outs.append((r.losses[0], {k: v.detach().clone() for k, v in r.model.named_parameters()}))
    (l1, w1), (l2, w2) = outs
    assert abs(l1 - l2) < 1e-5
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4)


class _Stop(Exception):
    pass


def test_interrupted_analysis_resumes_at_the_stage_it_reached(model, tok, tmp_path, monkeypatch):
    import pysafegeom.pipelines.analyze as A

    out = tmp_path / "res"
    real_select = A.select_carrier

    def boom(*a, **k):
        raise _Stop

    monkeypatch.setattr(A, "select_carrier", boom)
    with pytest.raises(_Stop):
        analyze(model, HARMFUL, HARMLESS, XS, tokenizer=tok, out=out, **_kw())
    assert (stages_folder(out) / "capture.pt").is_file() and not out.exists()
    # resume: capture must not run again, selection runs now
    monkeypatch.setattr(A, "select_carrier", real_select)
    monkeypatch.setattr(A, "capture", boom)
    res = analyze(model, HARMFUL, HARMLESS, XS, tokenizer=tok, out=out, resume=True, **_kw())
    assert any("resumed: stage(s) capture" in n for n in res.meta["notes"])
    assert not stages_folder(out).exists() and (out / "result.json").is_file()
    monkeypatch.undo()
    fresh = analyze(model, HARMFUL, HARMLESS, XS, tokenizer=tok, **_kw())
    torch.testing.assert_close(res.carriers.R, fresh.carriers.R)
    assert res.selection.to_dict() == fresh.selection.to_dict()
    again = load_result(out)
    torch.testing.assert_close(again.Q_R_layers, fresh.Q_R_layers, equal_nan=True)


def test_stale_stage_artifacts_are_recomputed(model, tok, tmp_path, monkeypatch):
    import pysafegeom.pipelines.analyze as A

    out = tmp_path / "res"
    monkeypatch.setattr(A, "select_carrier", lambda *a, **k: (_ for _ in ()).throw(_Stop()))
    with pytest.raises(_Stop):
        analyze(model, HARMFUL, HARMLESS, XS, tokenizer=tok, out=out, **_kw())
    monkeypatch.undo()
    res = analyze(model, HARMFUL, HARMLESS, XS, tokenizer=tok, out=out, resume=True, **{**_kw(), "n_val": 2})
    assert any("recomputed stale" in n and "capture" in n for n in res.meta["notes"])


def test_q_at_the_selected_carrier_uses_rs_position(model, tok):
    res = analyze(model, HARMFUL, HARMLESS, XS, tokenizer=tok, n_val=3, selection_positions=["eoi-3"], min_filtered=1,
                  progress=False)
    fit = res.metrics["subspace_fit"]
    assert fit["Q_R_position"] == res.metrics["reference"]["position"] == "eoi-3"
    assert res.Q_H_layers.shape[0] == len(res.carriers.layers) and res.Q_R_layers.shape[1] == res.carriers.H.shape[1]


def test_cli_refuses_training_prompts_in_one_line_and_allow_overlap_runs(tok, tmp_path):
    import subprocess
    import sys

    from pysafegeom.models.provenance import write_training_prompts

    folder = tmp_path / "tiny"
    tiny_model("llama", tokenizer=tok, n_layers=2, d_model=32, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    write_training_prompts(folder, [HARMLESS[4]])
    (tmp_path / "harmful.txt").write_text("\n".join(HARMFUL) + "\n")
    (tmp_path / "harmless.txt").write_text("\n".join(HARMLESS) + "\n")
    (tmp_path / "xs.txt").write_text("\n".join(XS) + "\n")
    cmd = [sys.executable, "-m", "pysafegeom", "analyze", "--model", str(folder), "--harmful", str(tmp_path / "harmful.txt"),
           "--harmless", str(tmp_path / "harmless.txt"), "--xstest", str(tmp_path / "xs.txt"), "--out", str(tmp_path / "res"),
           "--n-val", "2", "--positions", "eoi-1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "trained on" in p.stderr and "--allow-overlap" in p.stderr and not (tmp_path / "res").exists()
    p = subprocess.run(cmd + ["--allow-overlap"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    saved = json.loads((tmp_path / "res" / "result.json").read_text())
    assert saved["meta"]["overlap_override"] == {"harmless": 1}


def test_cli_kl_rule_options_reach_the_selection(tok, tmp_path):
    from pysafegeom.cli import main

    folder = tmp_path / "tiny"
    tiny_model("llama", tokenizer=tok, n_layers=2, d_model=32, seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    for name, texts in (("harmful", HARMFUL), ("harmless", HARMLESS), ("xs", XS)):
        (tmp_path / f"{name}.txt").write_text("\n".join(texts) + "\n")
    argv = ["analyze", "--model", str(folder), "--harmful", str(tmp_path / "harmful.txt"), "--harmless",
            str(tmp_path / "harmless.txt"), "--xstest", str(tmp_path / "xs.txt"), "--n-val", "2", "--positions", "eoi-1"]
    assert main(argv + ["--out", str(tmp_path / "a"), "--kl-rule", "fixed"]) == 0
    assert main(argv + ["--out", str(tmp_path / "b"), "--kl-percentile", "50"]) == 0
    a, b = load_result(tmp_path / "a").selection, load_result(tmp_path / "b").selection
    assert a.kl_rule == "fixed" and a.kl_tau == a.kl_threshold
    assert b.kl_rule == "calibrated" and b.kl_percentile == 50.0
    with pytest.raises(SystemExit) as e:  # argparse's one-line error naming the option
        main(argv + ["--out", str(tmp_path / "c"), "--kl-percentile", "0"])
    assert e.value.code == 2
