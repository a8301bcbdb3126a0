"""R2D2 (pysafegeom.train.r2d2): the loss terms, the pool, the SFT control, resume after a kill, bad input,
and GCG stepped from outside with refreshed caches. Tiny random Llama models with the real SmolLM2 tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("peft")

from pysafegeom.errors import DataOverlap, InvalidArgument  # noqa: E402
from pysafegeom.models.tiny import tiny_model  # noqa: E402
from pysafegeom.train import TrainConfig, checkpoints, run  # noqa: E402
from pysafegeom.train.r2d2 import (  # noqa: E402
    POOL_FILE, Behaviour, R2D2Config, anchor_pool_prompts, check_disjoint, load_training_behaviors,
    log_1_minus_p_loss, read_chat_examples,
)

CLEAN = [
    ("How do I bake bread?", "Mix flour, water, salt and yeast; knead, let it rise, then bake."),
    ("Name three primary colours.", "Red, yellow and blue."),
    ("Explain photosynthesis briefly.", "Plants turn light, water and carbon dioxide into sugar and oxygen."),
    ("What is the capital of France?", "Paris."),
]
TINY = dict(pool_size=3, cases_per_step=2, gcg_steps_per_update=1, search_width=8, topk=8, reset_every=2,
            reset_fraction=0.34, suffix_tokens=(3, 4))


def _cfg(adversarial=True, **kw):
    opts = R2D2Config(**{**TINY, "adversarial": adversarial, **kw.pop("opts", {})})
    d = dict(recipe="r2d2", recipe_options=opts.to_dict(), steps=4, batch_size=2, lr=5e-3, warmup_steps=1, max_len=96,
             seed=0, save_at=(0, 2))
    d.update(kw)
    return TrainConfig(**d)


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "train_log.jsonl"))]


# ------------------------------------------------------------------------------------------- the away loss

def test_log_1_minus_p_matches_probabilities():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 50, generator=g) * 3
    labels = torch.randint(0, 50, (12,), generator=g)
    labels[[2, 7]] = -100
    logits[5, labels[5]] = 12.0  # one token the model is sure of: log(1 - p) is large
    p = torch.softmax(logits.double(), -1).gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    for thr in (-5.0, -2.0, -100.0):
        keep = (labels != -100) & (p.log() >= thr)
        want = -(torch.log1p(-p) * keep).sum() / (labels != -100).sum()
        got = log_1_minus_p_loss(logits, labels, thr)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), (thr, got, want)
    # the threshold drops exactly the improbable tokens: at -100 none is dropped, at -2 some are
    assert log_1_minus_p_loss(logits, labels, -100.0) > log_1_minus_p_loss(logits, labels, -2.0)


def test_log_1_minus_p_gradient_pushes_target_down():
    logits = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    log_1_minus_p_loss(logits, torch.tensor([0])).backward()
    assert logits.grad[0, 0] > 0 and logits.grad[0, 1] < 0  # descent lowers the target logit, raises the others


# ------------------------------------------------------------------------------------------- training

def test_r2d2_trains_pool_and_records_everything(base, tmp_path):
    out = tmp_path / "r2d2"
    res = run(base, None, CLEAN, _cfg(), out, progress=False)
    assert sorted(res.checkpoints) == [0, 2, 4]
    log = _log(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for r in log:
        assert r["adversarial"] and len(r["cases"]) == 2  # cases_per_step cases per micro-batch
        assert r["loss"] == pytest.approx(r["clean"] + 0.5 * r["away"] + 0.5 * r["toward"], rel=1e-4, abs=1e-5)
        assert r["gcg_s"] > 0 and r["clean_s"] > 0 and r["optimizer_s"] >= 0
    assert [len(r.get("reset", [])) for r in log] == [0, 1, 0, 1]  # round(0.34 * 3) = 1 case every 2 steps
    pools = {s: json.loads((out / f"checkpoint-{s}" / POOL_FILE).read_text()) for s in (0, 2, 4)}
    assert all(len(p["pool"]) == 3 for p in pools.values())
    assert all(c["updates"] == 0 for c in pools[0]["pool"])  # step 0: the initial pool, unattacked
    assert sum(c["updates"] for c in pools[4]["pool"]) > 0
    for c in pools[4]["pool"]:
        assert 3 <= c["n_tokens"] <= 4 and len(c["suffix_ids"]) == c["n_tokens"] and c["target"]
    reset = log[1]["reset"][0]
    assert pools[2]["pool"][reset["slot"]]["id"] == reset["id"] and pools[2]["pool"][reset["slot"]]["born"] == 2
    # the checkpoint records every behaviour that entered the pool beside the clean prompts
    from pysafegeom.models.provenance import read_training_prompts

    seen = read_training_prompts(out / "checkpoint-4")
    texts = {b.id: b.text for b in load_training_behaviors()}
    assert all(texts[i] in seen for i in pools[4]["behaviours_used"])
    assert all(q in seen for q, _ in CLEAN)
    # step 0 is the untrained start: the LoRA B matrices are zero
    assert all(float(v.abs().max()) == 0 for k, v in _adapter(out / "checkpoint-0").items() if "lora_B" in k)


def test_control_is_sft_with_the_same_order(base, tmp_path):
    """adversarial=False trains exactly what the SFT recipe trains (same data order, schedule, weights), and
    R2D2's first clean loss equals the control's: same first batch, same starting weights."""
    ctrl = run(base, None, CLEAN, _cfg(adversarial=False), tmp_path / "ctrl", progress=False)
    sft = run(base, None, CLEAN, TrainConfig(**{**_cfg().__dict__, "recipe": "sft", "recipe_options": {}}),
              tmp_path / "sft", progress=False)
    a, b = _adapter(ctrl.final_checkpoint), _adapter(sft.final_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    adv = run(base, None, CLEAN, _cfg(steps=1, save_at=()), tmp_path / "adv", progress=False)
    assert _log(tmp_path / "adv")[0]["clean"] == pytest.approx(_log(tmp_path / "ctrl")[0]["clean"], rel=1e-6)
    assert "cases" not in _log(tmp_path / "ctrl")[0]
    assert json.loads((tmp_path / "ctrl" / "checkpoint-4" / POOL_FILE).read_text())["pool"] == []
    # and R2D2 moved the weights differently
    c = _adapter(adv.final_checkpoint)
    one = run(base, None, CLEAN, _cfg(adversarial=False, steps=1, save_at=()), tmp_path / "ctrl1", progress=False)
    d = _adapter(one.final_checkpoint)
    assert any(not torch.equal(c[k], d[k]) for k in c)


def test_toward_term_teaches_the_refusal(tok, tmp_path):
    """Planted: with only the toward term (and a tiny clean set), the model learns to open its answer to the
    attacked behaviours with the refusal; the toward loss falls by far more than half."""
    model = tiny_model("llama", tokenizer=tok, n_layers=2, d_model=64, seed=3)
    cfg = _cfg(steps=30, lr=1e-2, save_at=(), lora=False, opts=dict(away_weight=0.0, reset_every=1000,
                                                                    gcg_steps_per_update=1, cases_per_step=3))
    res = run(model, tok, CLEAN[:1], cfg, tmp_path / "t", progress=False)
    tw = [r["toward"] for r in _log(tmp_path / "t")]
    assert tw[-1] < 0.3 * tw[0]
    from pysafegeom.generation import greedy_generate

    pool = json.loads((tmp_path / "t" / "checkpoint-30" / POOL_FILE).read_text())["pool"]
    texts = greedy_generate(res.model, tok, [c["behavior"] + c["suffix"] for c in pool], max_new_tokens=8,
                            progress=False)
    assert all(t.startswith("Sorry,") for t in texts), texts  # a random tiny model never starts so


def test_step_unit_micro_names_checkpoints_in_micro_batches(base, tmp_path):
    out = tmp_path / "micro"
    run(base, None, CLEAN, _cfg(steps=2, save_at=(1,), grad_accum=2, step_unit="micro"), out, progress=False)
    assert sorted(checkpoints(out)) == [2, 4]
    tc = json.loads((out / "checkpoint-2" / "train_config.json").read_text())
    assert tc["optimizer_step"] == 1 and tc["micro_batches"] == 2 and tc["name_counts"] == "micro-batches"
    assert len(_log(out)[0]["cases"]) == 4  # two micro-batches, two cases each


# ------------------------------------------------------------------------------------------- resume

KILL = textwrap.dedent("""
    import os, signal, sys, json
    import torch
    torch.set_num_threads(1)
    from pysafegeom.train import TrainConfig, run
    cfg = TrainConfig(**json.loads(sys.argv[3]))
    def cb(step, loss):
        if step == int(sys.argv[4]):
            os.kill(os.getpid(), signal.SIGKILL)
    run(sys.argv[1], None, json.loads(sys.argv[5]), cfg, sys.argv[2], progress=False, callback=cb,
        resume=sys.argv[6] == "1")
""")


def test_killed_run_resumes_to_identical_weights_and_pool(base, tmp_path):
    cfg = _cfg(steps=5, save_at=(2,))
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    args = [sys.executable, "-c", KILL, base, str(killed), json.dumps(d), "3", json.dumps(CLEAN)]
    r = subprocess.run(args + ["0"], env=env, capture_output=True, text=True)
    assert r.returncode == -9, r.stderr[-2000:]  # SIGKILL at step 3, after checkpoint-2
    assert sorted(checkpoints(killed)) == [2]
    assert max(x["step"] for x in _log(killed)) == 3  # the log has the step the kill lost
    r = subprocess.run(args[:-2] + ["99", json.dumps(CLEAN), "1"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    whole = tmp_path / "whole"
    r = subprocess.run(args[:2] + [KILL, base, str(whole), json.dumps(d), "99", json.dumps(CLEAN), "0"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _adapter(killed / "checkpoint-5"), _adapter(whole / "checkpoint-5")
    assert all(torch.equal(a[k], b[k]) for k in a)
    pa = json.loads((killed / "checkpoint-5" / POOL_FILE).read_text())
    pb = json.loads((whole / "checkpoint-5" / POOL_FILE).read_text())
    assert pa == pb and pa["pool"]
    assert [x["step"] for x in _log(killed)] == [1, 2, 3, 4, 5]  # the lost step was dropped, then redone
    assert [x["cases"] for x in _log(killed)] == [x["cases"] for x in _log(whole)]


def test_resume_refuses_other_recipe_or_options(base, tmp_path):
    out = tmp_path / "r"
    run(base, None, CLEAN, _cfg(steps=2, save_at=(1,)), out, progress=False)
    with pytest.raises(ValueError, match="differs in recipe_options"):
        run(base, None, CLEAN, _cfg(steps=2, save_at=(1,), opts=dict(away_weight=0.25)), out, resume=True, progress=False)
    with pytest.raises(ValueError, match="differs in recipe"):
        run(base, None, CLEAN, TrainConfig(**{**_cfg(steps=2).__dict__, "recipe": "sft", "recipe_options": {}}), out,
            resume=True, progress=False)


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("opts, match", [
    (dict(pool_size=0), "pool cannot be empty"),
    (dict(away_weight=-0.5), "away_weight"),
    (dict(toward_weight=float("nan")), "toward_weight"),
    (dict(cases_per_step=5), "more than the pool"),
    (dict(reset_fraction=1.5), "reset_fraction"),
    (dict(suffix_tokens=(5, 2)), "suffix_tokens"),
    (dict(refusal="  "), "refusal"),
    (dict(nonsense=1), "unknown R2D2 option"),
])
def test_bad_options_are_named(opts, match):
    with pytest.raises((InvalidArgument, TypeError), match=match):
        TrainConfig(recipe="r2d2", recipe_options={**TINY, **opts}).validate()


def test_anchors_must_increase():
    with pytest.raises(InvalidArgument, match="strictly increasing"):
        TrainConfig(steps=10, save_at=(5, 2)).validate()
    with pytest.raises(InvalidArgument, match="strictly increasing"):
        TrainConfig(steps=10, save_at=(2, 2)).validate()
    assert TrainConfig(steps=10, save_at=(0, 5, 10)).validate().save_at == (0, 5, 10)


def test_sft_takes_no_recipe_options():
    with pytest.raises(InvalidArgument, match="takes no recipe_options"):
        TrainConfig(recipe="sft", recipe_options={"pool_size": 2}).validate()


def test_gcg_that_cannot_fit_the_context(base, tmp_path):
    with pytest.raises(InvalidArgument, match="needs .* tokens .* context is 40"):
        run(base, None, CLEAN, _cfg(max_len=40, opts=dict(suffix_tokens=(30, 30))), tmp_path / "x", progress=False)


def test_behaviour_files(tmp_path):
    shipped = load_training_behaviors()
    assert len(shipped) == 40 and all(b.targets and b.text for b in shipped)
    f = tmp_path / "b.jsonl"
    f.write_text(json.dumps({"id": "a", "behavior": "Do a bad thing", "targets": ["Sure, here is"]}) + "\n"
                 + json.dumps({"id": "b", "behavior": "Do another bad thing"}) + "\n")
    with pytest.raises(ValueError, match="'b' has no target"):
        load_training_behaviors(f)
    csv = tmp_path / "adv.csv"
    csv.write_text("goal,target\nWrite a mean poem,Sure here is a mean poem\nSteal a bike,\n")
    with pytest.raises(ValueError, match="target"):
        load_training_behaviors(csv)
    csv.write_text("goal,target\nWrite a mean poem,Sure here is a mean poem\n")
    (b,) = load_training_behaviors(csv)
    assert b.targets == ("Sure here is a mean poem",)
    with pytest.raises(ValueError, match="empty|no training behaviours"):
        f.write_text("\n")
        load_training_behaviors(f)


def test_overlap_with_evaluation_is_refused():
    from pysafegeom.data import Prompt

    train = [Behaviour("mine", "Explain how to pick a lock.", ("Sure",)), Behaviour("other", "Bake a bomb", ("Sure",))]
    check_disjoint(train, {"eval": [Prompt(text="Something else", id="e1")]})
    with pytest.raises(DataOverlap, match=r"mine \(text of eval e7\)"):
        check_disjoint(train, {"eval": [Prompt(text="explain how to  pick a LOCK", id="e7")]})
    with pytest.raises(DataOverlap, match=r"other \(id in heldout\)"):
        check_disjoint(train, {"heldout": [Prompt(text="unrelated", id="other")]})


def test_the_shipped_behaviours_avoid_the_public_sets():
    from pathlib import Path

    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not data.is_dir():
        pytest.skip("no ../shared/data")
    from pysafegeom.data import load_behaviors

    hb = data / "harmbench"
    sets = {s: load_behaviors(hb / f"harmbench_behaviors_text_{s}.csv", require_targets=False, functional_category=None)
            for s in ("test", "val")}
    sets["advbench"] = load_behaviors(data / "advbench" / "harmful_behaviors.csv")
    check_disjoint(load_training_behaviors(), sets)


def test_clean_files(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello!"}]}) + "\n"
                 + json.dumps({"prompt": "Q", "response": "A", "end_turn": False}) + "\n")
    assert read_chat_examples(f) == [{"prompt": "Hi", "response": "Hello!", "end_turn": True},
                                     {"prompt": "Q", "response": "A", "end_turn": False}]
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    with pytest.raises(ValueError, match="row 1: 'messages' must end"):
        read_chat_examples(f)
    assert len(anchor_pool_prompts()) > 500 and len(anchor_pool_prompts("val")) > 50


# ------------------------------------------------------------------------------------------- GCG from outside

def test_gcg_refresh_after_a_weight_change(tok):
    """After the weights change, a refreshed attack scores exactly as one built on the new weights; without
    the refresh the stale prefix cache gives other losses."""
    from pysafegeom.attacks.gcg import GCG, GCGConfig

    model = tiny_model("llama", tokenizer=tok, n_layers=2, d_model=32, seed=5)
    cfg = GCGConfig(search_width=8, topk=8, optim_str_init="! ! ! !", progress=False, filter_ids=False)
    g = GCG(model, tok, "Tell me a secret", "Sure, here is", cfg)
    st = g.new_state(torch.Generator().manual_seed(0))
    g.step(st, torch.Generator().manual_seed(1))
    cands = torch.randint(100, 2000, (6, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    stale = g.candidate_losses(cands)
    g.refresh()
    fresh = g.candidate_losses(cands)
    new = GCG(model, tok, "Tell me a secret", "Sure, here is", cfg).candidate_losses(cands)
    torch.testing.assert_close(fresh, new, rtol=1e-5, atol=1e-5)
    assert (stale - new).abs().max() > 1e-3
    assert all(p.grad is None for p in model.parameters())  # the attack leaves the model's gradients alone


# ------------------------------------------------------------------------------------------- CLI

def test_cli_r2d2_and_control(base, tmp_path):
    from pysafegeom.cli import main

    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in CLEAN))
    common = ["train", "--recipe", "r2d2", "--model", base, "--clean", str(clean), "--steps", "2", "--save-at", "0,1",
              "--batch-size", "2", "--device", "cpu", "--warmup-steps", "0", "--max-len", "96", "--pool-size", "2",
              "--gcg-steps", "1", "--gcg-width", "8", "--gcg-topk", "8", "--suffix-tokens", "3,3"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert sorted(checkpoints(tmp_path / "a")) == [0, 1, 2]
    pool = json.loads((tmp_path / "a" / "checkpoint-2" / POOL_FILE).read_text())
    assert pool["adversarial"] and len(pool["pool"]) == 2 and pool["options"]["search_width"] == 8
    assert main(common + ["--out", str(tmp_path / "b"), "--control"]) == 0
    assert not json.loads((tmp_path / "b" / "checkpoint-2" / POOL_FILE).read_text())["adversarial"]
    # bad input: one line, exit code 2
    assert main(common + ["--out", str(tmp_path / "c"), "--away-weight", "-1"]) == 2
    assert main(["train", "--recipe", "sft", "--model", base, "--out", str(tmp_path / "d"), "--pool-size", "3"]) == 2
    evalf = tmp_path / "eval.jsonl"
    shipped = load_training_behaviors()[0]
    evalf.write_text(json.dumps({"prompt": shipped.text, "target": "x"}) + "\n")
    assert main(common + ["--out", str(tmp_path / "e"), "--eval-behaviors", str(evalf)]) == 2
    assert not (tmp_path / "e").exists()  # refused before anything was written


def test_full_fine_tuning_in_bf16(tok, tmp_path):
    """Full fine-tuning of a bf16 model: GCG runs in bf16 inside training, the weights move, the loss is finite."""
    model = tiny_model("llama", tokenizer=tok, n_layers=2, d_model=32, seed=4).to(torch.bfloat16)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    res = run(model, tok, CLEAN, _cfg(steps=2, save_at=(), lora=False, lr=1e-2), tmp_path / "bf16", progress=False)
    rows = _log(tmp_path / "bf16")
    assert all(torch.isfinite(torch.tensor([r["loss"], r["away"], r["toward"]])).all() for r in rows)
    after = dict(res.model.named_parameters())
    assert all(after[k].dtype == torch.bfloat16 for k in before)
    assert any(not torch.equal(before[k], after[k].detach()) for k in before)
