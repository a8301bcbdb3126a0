"""Bad inputs to ``generate`` end in a clear pysafegeom error naming the argument, before any decoding."""

from __future__ import annotations

import pytest

from pysafegeom.errors import InvalidArgument, InvalidType
from pysafegeom.generation import generate
from validate_helpers import assert_clear, small_vocab_llama, tiny_llama

NAN = float("nan")
OK = ["How do I bake bread?"]

CASES = [
    ("model and tokenizer swapped", lambda m, t: generate(t, m, OK), InvalidType, "model", "swapped"),
    ("tokenizer is a path", lambda m, t: generate(m, "tok/folder", OK), InvalidType, "tokenizer", "load_model"),
    ("instructions one string", lambda m, t: generate(m, t, "hello"), InvalidType, "instructions", "not one string"),
    ("instructions empty", lambda m, t: generate(m, t, []), InvalidArgument, "instructions"),
    ("instruction zero-width only", lambda m, t: generate(m, t, ["ok", "\u200b\u200b"]), InvalidArgument,
     "instructions", "instruction 1"),
    ("instruction not a string", lambda m, t: generate(m, t, ["ok", 3]), InvalidType, "instruction 1"),
    ("max_new_tokens 0", lambda m, t: generate(m, t, OK, max_new_tokens=0), InvalidArgument, "max_new_tokens"),
    ("max_new_tokens float", lambda m, t: generate(m, t, OK, max_new_tokens=2.5), InvalidType, "max_new_tokens"),
    ("max_new_tokens string", lambda m, t: generate(m, t, OK, max_new_tokens="8"), InvalidType, "max_new_tokens"),
    ("min_new_tokens negative", lambda m, t: generate(m, t, OK, min_new_tokens=-1), InvalidArgument, "min_new_tokens"),
    ("batch_size a bool", lambda m, t: generate(m, t, OK, batch_size=True), InvalidType, "batch_size"),
    ("do_sample a string", lambda m, t: generate(m, t, OK, do_sample="False"), InvalidType, "do_sample"),
    ("temperature NaN", lambda m, t: generate(m, t, OK, do_sample=True, temperature=NAN), InvalidArgument,
     "temperature"),
    ("top_p NaN", lambda m, t: generate(m, t, OK, do_sample=True, top_p=NAN), InvalidArgument, "top_p"),
    ("top_k float", lambda m, t: generate(m, t, OK, do_sample=True, top_k=1.5), InvalidType, "top_k"),
    ("stop string empty", lambda m, t: generate(m, t, OK, stop_strings=["", "x"]), InvalidArgument, "stop_strings"),
    ("stop string a number", lambda m, t: generate(m, t, OK, stop_strings=[3]), InvalidType, "stop_strings[0]"),
    ("seed a string", lambda m, t: generate(m, t, OK, do_sample=True, seed="1"), InvalidType, "seed"),
    ("template name unknown", lambda m, t: generate(m, t, OK, template="llama3"), InvalidArgument, "template",
     "llama-3"),
    ("tokenizer of another model", lambda m, t: generate(small_vocab_llama(), t, OK), InvalidArgument,
     "vocabulary mismatch", "tokenizer"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_generate_input_is_a_clear_error(tok, case):
    _, make, exc, *names = case
    model = tiny_llama(tok)
    assert_clear(lambda: make(model, tok), exc, *names)


def test_one_stop_string_is_one_item(tok):
    out = generate(tiny_llama(tok), tok, OK, max_new_tokens=3, stop_strings="\n\n", progress=False, return_details=True)
    assert len(out.texts) == 1
