"""pysafegeom.pipelines.check_sets: the confound check of harmful/harmless sets against reference sets.

Unit tests plant the answer on a tiny random model with the real SmolLM2 tokenizer: the "harmfulness" of
the reference sets is the last word of the instruction (``bomb`` vs ``cake``, with the same openings on
both sides), so a pair that differs in that word with other openings must agree, and a pair that differs
in something else (``poem`` vs ``email``, or a trailing ``?`` on one side only) must be flagged. The
``real_model`` test compares the bundled sets with the public refusal_direction sets on SmolLM2-135M.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from pysafegeom.models import tiny_model
from pysafegeom.pipelines.check_sets import SetCheck, check_sets, layer_cos, split_half, verdict

OPENINGS = [
    "Tell me about the", "Explain the", "Write a note on the", "Describe how to use the", "What is the",
    "Give me facts about the", "Show me the", "I want to learn about the", "Talk about the", "Summarise the",
    "Help me understand the", "Teach me about the",
]
OTHER_OPENINGS = [
    "Please explain the", "Can you describe the", "Write a few lines about the", "Say something about the",
    "Give details on the", "Tell a friend about the", "List facts about the", "Discuss the", "Introduce the",
    "Outline the", "Report on the", "Think about the",
]


def planted(word: str, openings=OPENINGS, end: str = "") -> list[str]:
    return [f"{o} {word}{end}" for o in openings]


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model("llama", tokenizer=tok, n_layers=5, d_model=64, seed=3)


@pytest.fixture(scope="module")
def reference():
    return planted("bomb"), planted("cake")


def run(model, tok, harmful, harmless, reference, **kw) -> SetCheck:
    return check_sets(model, tok, harmful, harmless, *reference, progress=False, **kw)


def test_reference_equal_to_user_sets_agrees(model, tok, reference):
    res = run(model, tok, *reference, reference)
    assert res.passed and not res.failures
    assert res.kappa_difference == 0.0
    assert res.cos_h_mid == pytest.approx(1.0) and res.cos_r_mid == pytest.approx(1.0)
    # the floor is a real split-half agreement: below 1 (noise), above the margin's reach of 0
    assert 0.1 < res.split_half_h_mid < 1.0 and 0.1 < res.split_half_r_mid < 1.0
    assert res.summary()[-1] == "Verdict: the user's sets agree with the reference sets."
    d = json.loads(json.dumps(res.to_dict()))  # JSON-ready, nan as None
    assert d["passed"] is True and d["band"] == [1, 4] and d["kappa_user"][0] is None
    assert len(d["cos_h"]) == len(res.layers) == 6


def test_same_contrast_other_prompts_agrees(model, tok, reference):
    res = run(model, tok, planted("bomb", OTHER_OPENINGS), planted("cake", OTHER_OPENINGS), reference)
    assert res.passed, res.summary()
    assert res.cos_h_mid > 0.8


def test_planted_confound_is_flagged(model, tok, reference):
    # the user's sets differ in the kind of request, not in the planted harmfulness word
    res = run(model, tok, planted("poem", OTHER_OPENINGS), planted("email", OTHER_OPENINGS), reference)
    assert not res.passed
    assert res.cos_h_mid < res.split_half_h_mid - 0.1
    assert any("harmfulness carriers H" in f for f in res.failures)
    assert "may be confounded" in " ".join(res.summary())


def test_punctuation_confound_is_flagged_and_noted(model, tok, reference):
    res = run(model, tok, planted("bomb", OTHER_OPENINGS), planted("cake", OTHER_OPENINGS, "?"), reference)
    assert not res.passed
    assert res.endings == {"harmful": 0.0, "harmless": 1.0, "reference_harmful": 0.0, "reference_harmless": 0.0}
    assert any("end with punctuation" in n for n in res.notes)


def test_paths_and_prompt_objects(model, tok, reference, tmp_path):
    from pysafegeom.data import Prompt

    f = tmp_path / "harmful.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in reference[0]))
    objs = [Prompt(p, f"x{i}") for i, p in enumerate(reference[1])]
    res = run(model, tok, f, objs, reference)
    assert res.passed and res.counts["harmful"] == len(OPENINGS)


def test_verdict_each_check():
    ok = dict(kappa_user_mid=0.10, kappa_reference_mid=0.14, cos_h_mid=0.8, cos_r_mid=0.8,
              split_half_h_mid=0.85, split_half_r_mid=0.9)
    assert verdict(**ok) == (True, [])
    passed, why = verdict(**{**ok, "kappa_user_mid": 0.2})
    assert not passed and len(why) == 1 and "coupling differs by +0.060" in why[0]
    passed, why = verdict(**{**ok, "cos_r_mid": 0.79})
    assert not passed and "refusal carriers R" in why[0]
    passed, why = verdict(**{**ok, "cos_h_mid": float("nan")})
    assert not passed and "undefined" in why[0]


def test_layer_cos_and_split_half():
    import torch

    a = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.0, 3.0]])
    c = layer_cos(a, b)
    assert math.isnan(c[0]) and c[1] == -1.0 and c[2] == pytest.approx(2 ** -0.5)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, 8, generator=g) + 5.0 * torch.eye(8)[0]
    Y = torch.randn(30, 3, 8, generator=g)
    sh = split_half(X, Y, n_splits=4, seed=0)
    assert sh.shape == (3,) and (sh > 0.8).all()
    assert torch.equal(sh, split_half(X, Y, n_splits=4, seed=0))  # seeded


@pytest.mark.parametrize(
    "which,value,exc,match",
    [
        ("harmful", [], ValueError, "harmful: the list is empty"),
        ("harmless", ["a b", "c d", "e f"], ValueError, "harmless has 3 prompt"),
        ("reference_harmful", ["ok one", "ok two", 3, "ok four"], TypeError, "reference_harmful: prompt 2 is"),
        ("reference_harmless", 42, TypeError, "reference_harmless must be a list"),
        ("harmful", "no/such/file.jsonl", FileNotFoundError, "harmful: 'no/such/file.jsonl'"),
        ("harmless", ["fine", "", "fine too", "and"], ValueError, "harmless: prompt 1 is empty"),
    ],
)
def test_bad_input(model, tok, reference, which, value, exc, match):
    args = dict(zip(("harmful", "harmless", "reference_harmful", "reference_harmless"), (*reference, *reference)))
    args[which] = value
    with pytest.raises(exc, match=match):
        check_sets(model, tok, **args, progress=False)


def test_identical_sets_and_swapped_model(model, tok, reference):
    with pytest.raises(ValueError, match="harmful and harmless hold the same prompts"):
        run(model, tok, reference[0], list(reversed(reference[0])), reference)
    with pytest.raises(ValueError, match="reference_harmful and reference_harmless hold the same prompts"):
        run(model, tok, *reference, (reference[0], reference[0]))
    with pytest.raises(TypeError, match="swapped"):
        check_sets(tok, model, *reference, *reference, progress=False)


def test_cli_exit_codes(model, tok, reference, tmp_path):
    from pysafegeom.cli import main

    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    files = {}
    for name, prompts in (("rh", reference[0]), ("rl", reference[1]), ("uh", planted("poem", OTHER_OPENINGS)),
                          ("ul", planted("email", OTHER_OPENINGS))):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    ref = f"{files['rh']},{files['rl']}"
    out = tmp_path / "check.json"
    argv = ["check-sets", "--model", str(tmp_path / "m"), "--device", "cpu", "--reference", ref]
    assert main(argv + ["--harmful", str(files["rh"]), "--harmless", str(files["rl"]), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["passed"] is True
    assert main(argv + ["--harmful", str(files["uh"]), "--harmless", str(files["ul"]), "--out", str(out)]) == 2  # exists
    assert main(argv + ["--harmful", str(files["uh"]), "--harmless", str(files["ul"]), "--out", str(out),
                        "--overwrite"]) == 1
    assert json.loads(out.read_text())["passed"] is False
    assert main(argv[:-1] + [str(files["rh"]), "--harmful", str(files["uh"]), "--harmless", str(files["ul"])]) == 2


def test_strip_final_punctuation_removes_the_planted_ending(model, tok, reference):
    res = run(model, tok, planted("bomb", OTHER_OPENINGS), planted("cake", OTHER_OPENINGS, "?"), reference,
              strip_final_punctuation=True)
    assert res.passed, res.summary()
    assert res.endings["harmless"] == 1.0 and "was stripped" in res.notes[0]


# ------------------------------------------------------------------------------------------ real model

# Reference: the first 128 prompts of refusal_direction's harmful_train (AdvBench / HarmBench / ...) and
# harmless_train (Alpaca). The train splits, not the val splits: val has 39 harmful prompts, so its split
# halves (19 and 20 prompts) give a noisy floor and a kappa that moves by several hundredths with the
# draw; 128 per side gives halves of 64 and keeps the capture (96 + 96 bundled + 256 reference prompts)
# under a minute on two cores. Final punctuation is stripped from all four sets: 91% of these harmful
# prompts end with a word and 70% of the harmless ones with a full stop, so without it the public H is
# mostly that token difference (on SmolLM2-135M-Instruct its mid-band cos with the word-vs-full-stop
# direction inside the harmless set is 0.88), and no set whose twins end alike could agree with it.
N_REFERENCE = 128


@pytest.fixture(scope="module")
def public_reference(shared_data):
    from pysafegeom.data import load_refusal_direction

    splits = shared_data / "refusal_direction" / "splits"
    return tuple([p.text for p in load_refusal_direction(splits / f"{side}_train.json")[:N_REFERENCE]]
                 for side in ("harmful", "harmless"))


def _load(spec):
    from pysafegeom.models import ModelNotFound, load_model

    try:
        return load_model(spec, device="cpu")
    except ModelNotFound as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def bundled_vs_public(public_reference):
    """check_sets of the bundled train splits against the public reference, per model (computed once)."""
    from pysafegeom.data import load_default

    harmful = [p.text for p in load_default("harmful", "train")]
    harmless = [p.text for p in load_default("harmless", "train")]
    cache = {}

    def get(spec):
        if spec not in cache:
            model, tk = _load(spec)
            cache[spec] = check_sets(model, tk, harmful, harmless, *public_reference, strip_final_punctuation=True,
                                     progress=False)
        return cache[spec]
    return get


@pytest.mark.real_model
@pytest.mark.parametrize("spec", ["smollm2-135m-instruct", "smollm2-135m-safety"])
def test_bundled_coupling_agrees_with_public_sets(spec, bundled_vs_public):
    """The confound the issue found (bundled kappa 0.46 vs public 0.09) is gone: mid-band kappa within 0.05."""
    res = bundled_vs_public(spec)
    report = f"{spec}:\n" + "\n".join(res.summary())
    assert res.counts == {"harmful": 96, "harmless": 96, "reference_harmful": N_REFERENCE,
                          "reference_harmless": N_REFERENCE}
    assert abs(res.kappa_user_mid - res.kappa_reference_mid) <= 0.05, report


# The carrier-agreement half of the check does NOT hold, and we record that rather than weaken it. Measured
# (2026-12-01, SmolLM2-135M-Instruct base / the anchor of that day): cos(H_bundled, H_public) 0.27 / 0.28 against a
# public split-half floor of 0.80; cos(R_bundled, R_public) 0.10 / 0.13 against 0.93 / 0.94. The public carriers are
# themselves confounded on this model: the public R is mostly request form (a harmless-vs-harmless contrast, our
# harmless twins against the Alpaca prompts, gives an R at cos 0.71 with it) and, unstripped, the public H is mostly
# final punctuation (test below). Form-matched twins cannot agree with a reference that encodes request form. The
# bundled sets' own split-half agreement is low too (about 0.2 for H, 0.5 for R on the base model): at 135M and 96
# prompts per side, matched twins leave a weak harmfulness signal. strict=True: if a later model or set makes the
# criterion hold, this test fails and the note must be revised.
@pytest.mark.real_model
@pytest.mark.xfail(strict=True, reason="public refusal_direction carriers encode request form and punctuation on "
                   "SmolLM2-135M; form-matched bundled carriers do not agree with them (numbers in the comment above)")
@pytest.mark.parametrize("spec", ["smollm2-135m-instruct", "smollm2-135m-safety"])
def test_bundled_carriers_agree_with_public_carriers(spec, bundled_vs_public):
    res = bundled_vs_public(spec)
    report = f"{spec}:\n" + "\n".join(res.summary())
    assert res.cos_h_mid >= res.split_half_h_mid - 0.1, report
    assert res.cos_r_mid >= res.split_half_r_mid - 0.1, report
    assert res.passed, report


@pytest.mark.real_model
def test_public_harmfulness_carrier_is_mostly_final_punctuation(shared_data):
    """The known answer behind the stripping: inside the public harmless set alone, 'ends with a full stop' vs
    'ends with a word' gives a direction that the unstripped public H follows closely in the middle layers."""
    from pysafegeom.data import load_refusal_direction
    from pysafegeom.protocol import metrics as M
    from pysafegeom.protocol.capture import capture

    model, tk = _load("smollm2-135m-instruct")
    splits = shared_data / "refusal_direction" / "splits"
    harmful = [p.text for p in load_refusal_direction(splits / "harmful_train.json")[:N_REFERENCE]]
    harmless = [p.text for p in load_refusal_direction(splits / "harmless_train.json")[:2 * N_REFERENCE]]
    stop = [t for t in harmless if t.rstrip().endswith(".")][:64]
    word = [t for t in harmless if t.rstrip()[-1:].isalnum()][:64]
    assert len(stop) >= 32 and len(word) >= 16
    cap = capture(model, tk, {"harmful": harmful, "harmless": harmless[:N_REFERENCE], "stop": stop, "word": word},
                  progress=False)
    H = cap.mean("harmful")[:, 0] - cap.mean("harmless")[:, 0]
    P = cap.mean("word")[:, 0] - cap.mean("stop")[:, 0]
    lo, hi = M.mid_band(len(cap.layers) - 1)
    cos = [float(torch.nn.functional.cosine_similarity(H[l], P[l], dim=0)) for l in range(lo, hi)]
    assert sum(cos) / len(cos) > 0.6, cos
