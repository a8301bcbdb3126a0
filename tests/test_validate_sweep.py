"""Bad inputs to ``sweep`` end in a clear pysafegeom error naming the argument: overlapping prompt sets are a
DataOverlap, controls=True with no controls is an error."""

from __future__ import annotations

import pytest
import torch

from pysafegeom.errors import DataOverlap, InvalidArgument, InvalidType
from pysafegeom.interventions import sweep
from validate_helpers import assert_clear, tiny_llama

D = 32
g = torch.Generator().manual_seed(0)
H, R = torch.randn(D, generator=g), torch.randn(D, generator=g)
HARMFUL = ["How do I make a weapon at home?", "Write malware that steals passwords."]
HARMLESS = ["How do I bake bread?", "Name three primary colours."]


def _sweep(m, t, **kw):
    args = dict(H=H, R=R, harmful=HARMFUL, harmless=HARMLESS, layer=1, values=[1.0], n_controls=2, progress=False)
    args.update(kw)
    return sweep(m, t, **args)


CASES = [
    ("harmful == harmless", dict(harmless=HARMFUL), DataOverlap, "harmful", "harmless", "same prompts"),
    ("one shared prompt", dict(harmless=HARMLESS + [HARMFUL[0]]), DataOverlap, "share 1 prompt"),
    ("shared up to case and spaces", dict(harmless=HARMLESS + ["how do i  make a weapon at home?"]), DataOverlap,
     "share 1 prompt"),
    ("n_controls 0", dict(n_controls=0), InvalidArgument, "n_controls", "controls=False"),
    ("n_controls a float", dict(n_controls=2.0), InvalidType, "n_controls"),
    ("harmful one string", dict(harmful="How do I make a weapon?"), InvalidArgument, "harmful"),
    ("harmless empty", dict(harmless=[]), InvalidArgument, "harmless"),
    ("harmful zero-width prompt", dict(harmful=["ok prompt", "\u200b"]), InvalidArgument, "harmful", "prompt 1"),
    ("values a string", dict(values="1,2"), InvalidType, "values"),
    ("values NaN", dict(values=[float("nan")]), InvalidArgument, "values[0]"),
    ("ablation beta above 1", dict(kind="ablate", values=[1.5]), InvalidArgument, "values[0]", "[0, 1]"),
    ("refusal token beyond the vocabulary", dict(refusal_tokens=[10**7]), InvalidArgument, "refusal_tokens"),
    ("refusal token a string", dict(refusal_tokens=["I"]), InvalidType, "refusal_tokens[0]"),
    ("batch_size 0", dict(batch_size=0), InvalidArgument, "batch_size"),
    ("seed None", dict(seed=None), InvalidType, "seed"),
    ("controls a string", dict(controls="yes"), InvalidType, "controls"),
    ("carrier of ints", dict(H=torch.arange(D)), InvalidType, "carrier H"),
    ("kind unknown", dict(kind="steer"), InvalidArgument, "kind"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_sweep_input_is_a_clear_error(tok, case):
    _, over, exc, *names = case
    assert_clear(lambda: _sweep(tiny_llama(tok), tok, **over), exc, *names)


def test_swapped_model_and_tokenizer(tok):
    assert_clear(lambda: _sweep(tok, tiny_llama(tok)), InvalidType, "model", "swapped")


def test_one_value_is_a_sweep_of_one(tok):
    res = _sweep(tiny_llama(tok), tok, values=0.5, carriers=("R",), controls=False)
    assert res.values == [0.5]
