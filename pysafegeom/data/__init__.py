"""Prompt sets: the bundled defaults and loaders for public formats.

Bundled sets (written for this project; fixed train/val/test splits stored in the files; harmful and
harmless are matched pair by pair, ``meta["pair"]``, so that they differ only in harmfulness),
loaded with :func:`load_default`:

========================  =====  ==============================================================
name                      n      contents
========================  =====  ==============================================================
``harmful``               160    harmful requests, 16 categories x 10 (request level only), 96/32/32
``harmless``              160    the harmful set's twins: same request form, length and domain, safe
``xstest_safe``           60     safe prompts that sound dangerous; ``meta["type"]`` = XSTest type
``xstest_unsafe``         24     unsafe contrast prompts; ``meta["type"]`` = contrast type
``benign``                60     benign questions with a short correct ``reference`` answer
========================  =====  ==============================================================

Public formats are read from paths the user gives (the package ships none of them):
:func:`load_advbench`, :func:`load_harmbench`, :func:`load_xstest`, :func:`load_refusal_direction`,
:func:`load_alpaca`, :func:`load_behaviors` (attack behaviours with targets), and :func:`load_table` for any CSV/TSV/JSONL/JSON-list file with a named column.
:func:`load_prompts` resolves ``None`` / a bundled-set name / a list of strings / a path to prompts, and
:func:`split_prompts` gives unsplit data a deterministic split.

Errors: a missing path raises ``FileNotFoundError`` saying which format was expected; an empty file, a
missing column (with the available columns listed) or zero prompts raise :class:`DataError`, a
``ValueError``. Records with an empty prompt are skipped, with one ``UserWarning`` giving the count.
"""

from ._prompt import SPLITS, DataError, Prompt, filter_split, split_prompts, texts
from .bundled import DEFAULT_SETS, load_default
from .loaders import (
    PROMPT_COLUMNS,
    load_advbench,
    load_alpaca,
    load_behaviors,
    load_harmbench,
    load_path,
    load_prompts,
    load_refusal_direction,
    load_table,
    load_xstest,
)

__all__ = [
    "DEFAULT_SETS",
    "PROMPT_COLUMNS",
    "SPLITS",
    "DataError",
    "Prompt",
    "filter_split",
    "load_advbench",
    "load_alpaca",
    "load_behaviors",
    "load_default",
    "load_harmbench",
    "load_path",
    "load_prompts",
    "load_refusal_direction",
    "load_table",
    "load_xstest",
    "split_prompts",
    "texts",
]
