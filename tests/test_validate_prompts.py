"""Bad inputs to prompt formatting end in a clear pysafegeom error: an unknown template name lists the known
ones, duplicate prompts are called duplicates (not "numerical rank 1"), a tokenizer of another model is a
vocabulary mismatch (not "index out of range")."""

from __future__ import annotations

import pytest
import torch

from pysafegeom.errors import InvalidArgument, InvalidType
from pysafegeom.prompts import TEMPLATES, encode_batches, format_prompts
from pysafegeom.protocol.capture import capture
from pysafegeom.protocol.metrics import low_rank_basis
from validate_helpers import assert_clear, small_vocab_llama, tiny_llama

OK = ["How do I bake bread?"]

CASES = [
    ("template llama3", lambda t: format_prompts(t, OK, template="llama3"), InvalidArgument, "template", "'llama-3'",
     ", ".join(TEMPLATES)),
    ("template chatml2", lambda t: format_prompts(t, OK, template="chatml2"), InvalidArgument, "'chatml'"),
    ("template Mistral", lambda t: format_prompts(t, OK, template="Mistral"), InvalidArgument, "'mistral'"),
    ("template a number", lambda t: format_prompts(t, OK, template=3), InvalidType, "template"),
    ("template broken Jinja", lambda t: format_prompts(t, OK, template="{{ messages[0]['content'] "), InvalidArgument,
     "template"),
    ("instructions one string", lambda t: format_prompts(t, "hello"), InvalidType, "instructions", "not one string"),
    ("instructions empty", lambda t: format_prompts(t, []), InvalidArgument, "instructions"),
    ("instruction zero-width", lambda t: format_prompts(t, ["\u200b\u200b"]), InvalidArgument, "instruction 0"),
    ("instruction None", lambda t: format_prompts(t, ["ok", None]), InvalidType, "instruction 1"),
    ("system a number", lambda t: format_prompts(t, OK, system=3), InvalidType, "system"),
    ("max_length 0", lambda t: format_prompts(t, OK, max_length=0), InvalidArgument, "max_length"),
    ("batch_size 0", lambda t: encode_batches(t, OK, batch_size=0), InvalidArgument, "batch_size"),
    ("vocabulary mismatch in capture", lambda t: capture(small_vocab_llama(), t, {"a": OK}, progress=False),
     InvalidArgument, "vocabulary mismatch", "tokenizer", "set 'a'"),
    ("refusal token beyond the head", lambda t: capture(tiny_llama(t), t, {"a": OK}, refusal_tokens=[10**7],
                                                         progress=False), InvalidArgument, "refusal_tokens"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_prompt_input_is_a_clear_error(tok, case):
    _, make, exc, *names = case
    msg = assert_clear(lambda: make(tok), exc, *names)
    assert "index out of range" not in msg


def test_duplicate_prompts_are_called_duplicates():
    x = torch.randn(1, 16, dtype=torch.float64).repeat(6, 1)  # six copies of one prompt's activation
    msg = assert_clear(lambda: low_rank_basis(x, torch.zeros(16, dtype=torch.float64), 3), InvalidArgument,
                       "duplicates", "1 distinct rows among 6")
    assert "k = 3" in msg


def test_known_template_names_still_work(tok):
    assert format_prompts(tok, OK, template="llama-3").n_post > 0
