"""Bad inputs to ``ablate`` / ``add`` / ``orthogonalize`` end in a clear pysafegeom error naming the argument,
and leave the model as it was; an unmerged LoRA model is named as such."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pysafegeom.errors import InvalidArgument, InvalidType
from pysafegeom.interventions import ablate, add, orthogonalize
from validate_helpers import assert_clear, enter, tiny_llama

D = 32
R = torch.randn(D, generator=torch.Generator().manual_seed(0))
NAN = torch.full((D,), float("nan"))

CASES = [
    ("ablate on a tokenizer", lambda m, t: ablate(t, R), InvalidType, "model", "swapped"),
    ("ablate on a path", lambda m, t: ablate("a/folder", R), InvalidType, "model", "load_model"),
    ("direction a list", lambda m, t: ablate(m, [0.1] * D), InvalidType, "direction"),
    ("direction of ints", lambda m, t: ablate(m, torch.arange(D)), InvalidType, "direction"),
    ("direction of another width", lambda m, t: ablate(m, torch.randn(D + 1)), InvalidArgument, "direction",
     "residual width"),
    ("beta a string", lambda m, t: ablate(m, R, beta="1"), InvalidType, "beta"),
    ("beta a bool", lambda m, t: ablate(m, R, beta=True), InvalidType, "beta"),
    ("beta above 1", lambda m, t: ablate(m, R, beta=1.5), InvalidArgument, "beta"),
    ("layers a string", lambda m, t: ablate(m, R, layers="0"), InvalidType, "layers"),
    ("layer a float", lambda m, t: ablate(m, R, layers=[1.0]), InvalidType, "layer"),
    ("positions unknown", lambda m, t: ablate(m, R, positions="tokens"), InvalidArgument, "positions"),
    ("alpha NaN", lambda m, t: add(m, R, 0, alpha=float("nan")), InvalidArgument, "alpha"),
    ("layer a string", lambda m, t: add(m, R, "0"), InvalidType, "layer"),
    ("layer out of range", lambda m, t: add(m, R, 5), InvalidArgument, "layer 5"),
    ("vector of ints", lambda m, t: add(m, torch.arange(D), 0), InvalidType, "vector"),
    ("vector a list", lambda m, t: add(m, [1.0] * D, 0), InvalidType, "vector"),
    ("orthogonalize a NaN direction", lambda m, t: orthogonalize(m, NAN), InvalidArgument, "direction", "NaN"),
    ("orthogonalize a zero direction", lambda m, t: orthogonalize(m, torch.zeros(D)), InvalidArgument, "direction"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_intervention_input_is_a_clear_error(tok, case):
    _, make, exc, *names = case
    model = tiny_llama(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert_clear(lambda: enter(make(model, tok)), exc, *names)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.fixture(scope="module")
def peft_model(tok):
    peft = pytest.importorskip("peft")
    from pysafegeom.models import tiny_model

    base = tiny_model("llama", tokenizer=tok, n_layers=2, d_model=D, seed=1)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM")
    return peft.get_peft_model(base, cfg)


def test_orthogonalize_an_unmerged_lora_model_says_merge_first(peft_model):
    msg = assert_clear(lambda: enter(orthogonalize(peft_model, R)), InvalidArgument, "model", "LoRA",
                       "merge_and_unload")
    assert "width" not in msg  # not the misleading width mismatch of a LoRA layer taken for Conv1D
    merged = peft_model.merge_and_unload()
    with orthogonalize(merged, R):  # merged weights work
        pass


def test_numpy_layer_indices_are_accepted(tok):
    with ablate(tiny_llama(tok), R, layers=[np.int64(1)]):
        pass
