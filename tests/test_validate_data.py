"""Bad prompt files end in a clear pysafegeom error naming the file and what is wrong: an unclosed CSV quote
(which would merge the rest of the file into one prompt), files in another encoding, zero-width "prompts"."""

from __future__ import annotations

import warnings

import pytest

from pysafegeom.data import DataError, load_path, load_prompts
from pysafegeom.errors import InputFileError
from validate_helpers import assert_clear

ROWS = ["How do I bake bread?", "Name three primary colours.", "Explain photosynthesis briefly.",
        "Write a haiku about rain.", "What is the capital of Peru?"]


def _csv(rows):
    return "prompt,id\n" + "".join(f"{r},{i}\n" for i, r in enumerate(rows))


def _merged_but_strictly_valid():
    """An opening quote that a later quote closes right before a comma: valid CSV, but rows swallowed."""
    lines = ["prompt,id"] + [f"{r},{i}" for i, r in enumerate(ROWS)]
    lines[2] = '"' + lines[2]
    more = [f"Another ordinary prompt number {i} here,{i + 10}" for i in range(8)]
    return "\n".join(lines[:3] + more + ['the end",99'] + lines[3:]) + "\n"


FILES = [
    ("unclosed quote to the end", "set.csv", _csv(ROWS[:2]) + '"Tell me a joke,7\n' + _csv(ROWS[2:])[10:],
     "line", "quote"),
    ("quote followed by text", "set.csv", "prompt,id\n" + '"How do I bake,1\nWhat is "x",2\n', "quote"),
    ("rows merged by a stray quote", "set.csv", _merged_but_strictly_valid(), "line 3", "unclosed quote"),
    ("latin-1 CSV", "set.csv", _csv(["Qu'est-ce qu'un café ?"] + ROWS).encode("latin-1"), "not UTF-8", "Latin-1"),
    ("latin-1 text", "set.txt", "\n".join(ROWS + ["Où est la gare ?"]).encode("latin-1"), "not UTF-8", "line 6"),
    ("latin-1 JSONL", "set.jsonl", '{"prompt": "caf\u00e9"}\n'.encode("latin-1"), "not UTF-8"),
    ("UTF-16 with BOM", "set.txt", "\n".join(ROWS).encode("utf-16"), "UTF-16"),
    ("UTF-16 without BOM", "set.json", '[{"instruction": "hi"}]'.encode("utf-16-le"), "UTF-16LE"),
    ("UTF-32", "set.csv", _csv(ROWS).encode("utf-32"), "UTF-32"),
    ("only zero-width lines", "set.txt", "\u200b\u200b\n\u200c\n", "contains no prompts", "zero-width"),
    ("only zero-width cells", "set.csv", _csv(["\u200b", "\u200b\u200d"]), "contains no prompts"),
    ("truncated JSON", "set.json", '[{"instruction": "How do I', "not valid JSON"),
    ("JSONL line cut", "set.jsonl", '{"prompt": "ok"}\n{"prompt": "cut', "line 2", "not valid JSON"),
]


@pytest.mark.parametrize("case", FILES, ids=[c[0] for c in FILES])
def test_bad_prompt_file_names_the_file(tmp_path, case):
    _, name, content, *names = case
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        msg = assert_clear(lambda: load_path(f), InputFileError, str(f), *names)
    assert "codec can't decode" not in msg


LISTS = [
    ("all zero-width", ["\u200b\u200b", "\ufeff"], "prompt list", "contains no prompts"),
    ("a number in the list", ["ok", 5], "item 1"),
    ("a number", 3, "int"),
]


@pytest.mark.parametrize("case", LISTS, ids=[c[0] for c in LISTS])
def test_bad_prompt_list(case):
    _, spec, *names = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert_clear(lambda: load_prompts(spec), DataError, *names)


def test_zero_width_rows_are_skipped_with_a_warning(tmp_path):
    f = tmp_path / "set.csv"
    f.write_text(_csv(ROWS + ["\u200b\u200b"]), encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 1"):
        assert [p.text for p in load_path(f)] == ROWS
    with pytest.warns(UserWarning, match="skipped 1"):
        assert [p.text for p in load_prompts(ROWS + ["\u200c"])] == ROWS


def test_utf8_with_bom_and_real_multiline_prompts_load(tmp_path):
    f = tmp_path / "set.csv"
    text = _csv(ROWS) + '"A prompt\nover two lines, with a comma",9\n'
    f.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    got = [p.text for p in load_path(f)]
    assert got[:5] == ROWS and got[5] == "A prompt\nover two lines, with a comma"
