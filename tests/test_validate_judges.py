"""Bad inputs to the judges end in a clear pysafegeom error naming the argument; single strings are one item."""

from __future__ import annotations

import pytest

from pysafegeom.behaviour.judges import LogitJudge, ModelJudge, SubstringJudge, XSTestJudge
from pysafegeom.errors import InvalidArgument, InvalidType
from validate_helpers import assert_clear, tiny_llama

NAN = float("nan")

CASES = [
    ("lists unknown", lambda m, t: SubstringJudge(lists="nope"), InvalidArgument, "lists"),
    ("lists non-string", lambda m, t: SubstringJudge(lists=[3]), InvalidType, "lists[0]"),
    ("extra non-string item", lambda m, t: SubstringJudge(extra=["ok", 5]), InvalidType, "extra[1]"),
    ("extra zero-width", lambda m, t: SubstringJudge(extra=["\u200b"]), InvalidArgument, "extra[0]"),
    ("extra a number", lambda m, t: SubstringJudge(extra=42), InvalidType, "extra"),
    ("start_only empty prefix", lambda m, t: XSTestJudge(start_only=[""]), InvalidArgument, "start_only[0]"),
    ("markers non-string", lambda m, t: XSTestJudge(compliance_markers=[None]), InvalidType, "compliance_markers[0]"),
    ("min_comply_words < 0", lambda m, t: XSTestJudge(min_comply_words=-1), InvalidArgument, "min_comply_words"),
    ("min_comply_words float", lambda m, t: XSTestJudge(min_comply_words=2.5), InvalidType, "min_comply_words"),
    ("min_comply_words string", lambda m, t: XSTestJudge(min_comply_words="8"), InvalidType, "min_comply_words"),
    ("model and tokenizer swapped", lambda m, t: ModelJudge(t, m), InvalidType, "swapped"),
    ("tokenizer is a model", lambda m, t: ModelJudge(m, m), InvalidType, "tokenizer"),
    ("model is a path", lambda m, t: ModelJudge("some/folder", t), InvalidType, "model", "load_model"),
    ("kind misspelt", lambda m, t: ModelJudge(m, t, kind="causl"), InvalidArgument, "kind", "causal"),
    ("yes spelling empty", lambda m, t: ModelJudge(m, t, yes=[""]), InvalidArgument, "yes[0]"),
    ("batch_size 0", lambda m, t: ModelJudge(m, t, batch_size=0), InvalidArgument, "batch_size"),
    ("max_generation_tokens 0", lambda m, t: ModelJudge(m, t, max_generation_tokens=0), InvalidArgument,
     "max_generation_tokens"),
    ("template not a string", lambda m, t: ModelJudge(m, t, template=3), InvalidType, "template"),
    ("template without fields", lambda m, t: ModelJudge(m, t, template="judge this"), InvalidArgument, "template"),
    ("positive_label a bool", lambda m, t: ModelJudge(m, t, positive_label=True), InvalidType, "positive_label"),
    ("chat a string", lambda m, t: ModelJudge(m, t, chat="yes"), InvalidType, "chat"),
    ("scores with NaN", lambda m, t: LogitJudge(scores=[0.5, NAN]), InvalidArgument, "scores[1]"),
    ("score_fn not callable", lambda m, t: LogitJudge(score_fn=3), InvalidType, "score_fn"),
    ("responses one string", lambda m, t: SubstringJudge().judge(None, "I cannot"), InvalidType, "responses"),
    ("responses not strings", lambda m, t: SubstringJudge().judge(None, [None]), InvalidType, "response"),
    ("prompts and responses differ", lambda m, t: SubstringJudge().judge(["a"], ["x", "y"]), InvalidArgument,
     "prompts"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_judge_input_is_a_clear_error(tok, case):
    _, make, exc, *names = case
    model = tiny_llama(tok)
    assert_clear(lambda: make(model, tok), exc, *names)


def test_single_strings_are_one_item(tok):
    j = SubstringJudge(lists="arditi", extra="refuse")
    assert "refuse" in j.phrases and "r" not in j.phrases
    assert j.judge(None, ["I refuse."])[0].refused and not j.judge(None, ["Sure, here it is."])[0].refused
    x = XSTestJudge(start_only="No,")
    assert x.start_only == ("No,",)
    assert not x.judge(None, ["Nice question: here is how."])[0].refused  # not every response starting with 'N'
    m = ModelJudge(tiny_llama(tok), tok, yes="Yes", no="No")
    assert m.yes_ids == tok("Yes", add_special_tokens=False)["input_ids"][:1]
