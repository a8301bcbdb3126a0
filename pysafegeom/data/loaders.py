"""Loaders for public prompt-set formats, from paths the user gives, and the :func:`load_prompts` dispatcher.

Error policy, shared by every loader:

* a missing path raises ``FileNotFoundError`` naming the format that was expected;
* an empty file, or one whose records hold no prompts, raises :class:`DataError` ("... contains no
  prompts"); a missing required column raises :class:`DataError` listing the columns that are there;
* records whose prompt is empty or whitespace are **skipped**, with one ``UserWarning`` giving the count.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..validate import is_blank, utf8_text
from ._prompt import SPLITS, DataError, Prompt, filter_split, split_prompts
from .bundled import DEFAULT_SETS, load_default

PathLike = str | os.PathLike

ADVBENCH = "an AdvBench CSV with columns goal,target (e.g. harmful_behaviors.csv)"
HARMBENCH = (
    "a HarmBench behaviours CSV with columns Behavior,FunctionalCategory,SemanticCategory,Tags,"
    "ContextString,BehaviorID"
)
HARMBENCH_TARGETS = "a HarmBench targets JSON object mapping BehaviorID to a target string"
XSTEST = "an XSTest CSV with columns id,prompt,type,label (e.g. xstest_prompts.csv)"
REFUSAL_DIRECTION = 'a refusal_direction JSON list of {"instruction": ..., "category": ...}'
ALPACA = 'an Alpaca-style JSON list of {"instruction": ..., "input": ..., "output": ...}'
TABLE = "a CSV/TSV with a header row, a JSONL file, or a JSON list of objects"

# Columns that load_prompts tries, in order, when a generic table is given without column=.
PROMPT_COLUMNS = ("prompt", "instruction", "text", "goal", "Behavior", "behavior", "question", "query")

# ---------------------------------------------------------------------------------------------- reading


def _path(path: PathLike, expected: str) -> Path:
    from .. import validate as V

    return V.existing_file("path", path, expected)


def _no_prompts(p: Path, expected: str, why: str = "") -> DataError:
    return DataError(f"{p} contains no prompts{why} (expected {expected})")


def _read_csv(p: Path, expected: str) -> tuple[list[str], list[dict[str, str]]]:
    delimiter = "\t" if p.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(utf8_text(p), newline=""), delimiter=delimiter, strict=True)
    try:
        cols = [c for c in (reader.fieldnames or []) if c is not None]
        if not cols:
            raise _no_prompts(p, expected, ": the file is empty")
        rows, starts = [], []
        while True:
            start = reader.line_num + 1
            try:
                r = next(reader)
            except StopIteration:
                break
            rows.append({k: (v if v is not None else "") for k, v in r.items() if k is not None})
            starts.append(start)
    except csv.Error as e:
        raise DataError(f"{p}, line {reader.line_num}: not valid CSV ({e}); a quote (\") that is never closed "
                        "merges the rest of the file into one field: close it, or double it (\"\") inside a quoted "
                        f"field (expected {expected})") from None
    _check_merged_rows(p, cols, rows, starts, delimiter)
    return cols, rows


def _check_merged_rows(p: Path, cols: list[str], rows: list[dict], starts: list[int], delimiter: str) -> None:
    """Refuse a field that swallowed several CSV rows (an unbalanced quote that a later quote happened to close):
    it spans lines that each look like a row and is far longer than the column's other fields."""
    if len(cols) < 2 or len(rows) < 2:
        return
    for c in cols:
        lengths = sorted(len(r.get(c) or "") for r in rows)
        median = lengths[len(lengths) // 2]
        if median < 10:  # a mostly empty column (e.g. HarmBench's ContextString): long multi-line cells are normal
            continue
        for r, start in zip(rows, starts):
            v = r.get(c) or ""
            if "\n" not in v or len(v) <= 5 * median:
                continue
            lines = v.split("\n")
            row_like = sum(len(next(csv.reader([line], delimiter=delimiter), [])) == len(cols) for line in lines)
            if row_like >= 2:
                raise DataError(f"{p}, record starting at line {start}: column {c!r} spans {len(lines)} lines, "
                                f"{row_like} of which look like CSV rows, and is {len(v)} characters long (the "
                                f"column's median is {median}): an unclosed quote (\") probably merged them; close "
                                "the quote or double it (\"\")")


def _read_json(p: Path, expected: str) -> Any:
    raw = utf8_text(p)
    if not raw.strip():
        raise _no_prompts(p, expected, ": the file is empty")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{p} is not valid JSON ({e}); expected {expected}") from None


def _read_json_list(p: Path, expected: str) -> list[dict]:
    data = _read_json(p, expected)
    if not isinstance(data, list):
        raise DataError(f"{p} holds a JSON {type(data).__name__}, not a list (expected {expected})")
    if not data:
        raise _no_prompts(p, expected, ": the list is empty")
    bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{p}: item {bad} is a {type(data[bad]).__name__}, not an object (expected {expected})")
    return data


def _read_jsonl(p: Path, expected: str) -> list[dict]:
    rows = []
    for n, line in enumerate(utf8_text(p).split("\n"), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}, line {n}: not valid JSON ({e}); expected {expected}") from None
        if not isinstance(r, dict):
            raise DataError(f"{p}, line {n}: a {type(r).__name__}, not an object (expected {expected})")
        rows.append(r)
    if not rows:
        raise _no_prompts(p, expected, ": the file is empty")
    return rows


def _columns(rows: Iterable[dict]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        cols.update(dict.fromkeys(r))
    return list(cols)


def _require(p: Path, cols: Sequence[str], required: Sequence[str], expected: str) -> None:
    missing = [c for c in required if c not in cols]
    if missing:
        raise DataError(
            f"{p}: missing column(s) {', '.join(map(repr, missing))}; available columns: "
            f"{', '.join(map(repr, cols)) or '(none)'} (expected {expected})"
        )


def _s(v: Any) -> str | None:
    """A cell as a stripped string, or None when empty/absent (or only zero-width characters)."""
    if v is None:
        return None
    v = str(v).strip()
    return None if is_blank(v) else v


def _finish(prompts: list[Prompt], n_blank: int, p: Path | str, expected: str) -> list[Prompt]:
    if n_blank:
        warnings.warn(f"{p}: skipped {n_blank} record(s) with an empty prompt", UserWarning, stacklevel=3)
    if not prompts:
        raise DataError(f"{p} contains no prompts" + (f" ({n_blank} empty)" if n_blank else "") + f" (expected {expected})")
    return prompts


_SPLIT_IN_NAME = re.compile(r"(?:^|[_\-.])(train|val|test)(?:$|[_\-.])")


def _split_from_name(p: Path) -> str | None:
    m = _SPLIT_IN_NAME.search(p.stem.lower())
    return m.group(1) if m else None


# ------------------------------------------------------------------------------------- public formats


def load_advbench(path: PathLike) -> list[Prompt]:
    """Load AdvBench ``harmful_behaviors.csv`` (columns ``goal``, ``target``).

    Returns one harmful :class:`Prompt` per row: ``text`` = goal, ``id`` = ``"advbench-000"``...,
    ``label`` = "harmful", ``meta["target"]`` = the affirmative target string (if the column exists).
    """
    p = _path(path, ADVBENCH)
    cols, rows = _read_csv(p, ADVBENCH)
    _require(p, cols, ["goal"], ADVBENCH)
    out, blank = [], 0
    for i, r in enumerate(rows):
        text = _s(r.get("goal"))
        if text is None:
            blank += 1
            continue
        out.append(Prompt(text=text, id=f"advbench-{i:03d}", label="harmful", meta={"target": _s(r.get("target"))}))
    return _finish(out, blank, p, ADVBENCH)


def load_harmbench(
    path: PathLike,
    targets_path: PathLike | None = None,
    functional_category: str | None = "standard",
    include_context: bool = False,
) -> list[Prompt]:
    """Load a HarmBench behaviours CSV (``harmbench_behaviors_text_{all,val,test}.csv``).

    ``functional_category``: keep only rows of that FunctionalCategory ("standard", "contextual",
    "copyright"); ``None`` keeps all. ``include_context``: prepend a contextual behaviour's ContextString
    as HarmBench does (``context + "\\n\\n---\\n\\n" + behavior``); otherwise the text is the behaviour
    alone. ``targets_path``: the targets JSON (BehaviorID -> target), stored in ``meta["target"]``.
    Returns harmful prompts with ``id`` = BehaviorID, ``category`` = SemanticCategory, ``split`` from the
    file name (``_val`` / ``_test``, else None), and ``meta`` = functional_category, tags, context, target.
    """
    p = _path(path, HARMBENCH)
    cols, rows = _read_csv(p, HARMBENCH)
    _require(p, cols, ["Behavior", "BehaviorID"], HARMBENCH)
    targets: dict[str, str] = {}
    if targets_path is not None:
        tp = _path(targets_path, HARMBENCH_TARGETS)
        targets = _read_json(tp, HARMBENCH_TARGETS)
        if not isinstance(targets, dict):
            raise DataError(f"{tp} holds a JSON {type(targets).__name__}, not an object (expected {HARMBENCH_TARGETS})")
    split = _split_from_name(p)
    out, blank = [], 0
    for r in rows:
        fc = _s(r.get("FunctionalCategory"))
        if functional_category is not None and fc != functional_category:
            continue
        behavior = _s(r.get("Behavior"))
        if behavior is None:
            blank += 1
            continue
        context = _s(r.get("ContextString"))
        text = f"{context}\n\n---\n\n{behavior}" if include_context and context else behavior
        bid = _s(r.get("BehaviorID")) or f"harmbench-{len(out):03d}"
        meta = {"functional_category": fc, "tags": _s(r.get("Tags")), "context": context, "target": targets.get(bid)}
        category = _s(r.get("SemanticCategory"))
        out.append(Prompt(text=text, id=bid, split=split, category=category, label="harmful", meta=meta))
    if not out and not blank and rows and functional_category is not None:
        raise DataError(f"{p} contains no prompts with FunctionalCategory={functional_category!r}")
    return _finish(out, blank, p, HARMBENCH)


def load_xstest(path: PathLike, which: str = "safe") -> list[Prompt]:
    """Load XSTest ``xstest_prompts.csv`` (columns id, prompt, type, label, focus, note).

    ``which``: "safe" (the 250 safe prompts), "unsafe" (the 200 contrast prompts) or "all". Returns
    prompts with ``id`` = ``"xstest-<id>"``, ``category`` = type, ``label`` = "safe"/"unsafe", and
    ``meta`` holding type, focus, note.
    """
    if which not in ("safe", "unsafe", "all"):
        raise DataError(f"which must be 'safe', 'unsafe' or 'all', got {which!r}")
    p = _path(path, XSTEST)
    cols, rows = _read_csv(p, XSTEST)
    _require(p, cols, ["prompt", "type", "label"], XSTEST)
    out, blank = [], 0
    for i, r in enumerate(rows):
        label = _s(r.get("label"))
        if which != "all" and label != which:
            continue
        text = _s(r.get("prompt"))
        if text is None:
            blank += 1
            continue
        meta = {k: _s(v) for k, v in r.items() if k not in ("id", "prompt", "label")}
        pid = f"xstest-{_s(r.get('id')) or i}"
        out.append(Prompt(text=text, id=pid, category=_s(r.get("type")), label=label, meta=meta))
    return _finish(out, blank, p, XSTEST)


def load_refusal_direction(path: PathLike) -> list[Prompt]:
    """Load a refusal_direction JSON list of ``{"instruction": str, "category": str|None}``.

    Returns prompts with ``id`` = ``"<file stem>-00000"``..., ``category`` from the record, ``split`` and
    ``label`` from the file name when it says so (``harmful_train.json`` -> split "train", label
    "harmful"; ``harmless_*`` -> "harmless").
    """
    p = _path(path, REFUSAL_DIRECTION)
    data = _read_json_list(p, REFUSAL_DIRECTION)
    _require(p, _columns(data), ["instruction"], REFUSAL_DIRECTION)
    stem = p.stem.lower()
    label = "harmful" if stem.startswith("harmful") else "harmless" if stem.startswith("harmless") else None
    split = _split_from_name(p)
    out, blank = [], 0
    for i, r in enumerate(data):
        text = _s(r.get("instruction"))
        if text is None:
            blank += 1
            continue
        meta = {k: v for k, v in r.items() if k not in ("instruction", "category")}
        pid, category = f"{p.stem}-{i:05d}", _s(r.get("category"))
        out.append(Prompt(text=text, id=pid, split=split, category=category, label=label, meta=meta))
    return _finish(out, blank, p, REFUSAL_DIRECTION)


def load_alpaca(path: PathLike) -> list[Prompt]:
    """Load an Alpaca-style JSON list of ``{"instruction", "input"?, "output"}`` (e.g. AlpacaEval outputs).

    Returns harmless prompts: ``text`` = instruction, plus ``"\\n\\n" + input`` when input is non-empty;
    ``reference`` = output, verbatim (the answer whose cross-entropy the benign-utility audit measures;
    None when the output is empty, e.g. 2 records of AlpacaEval's text_davinci_003 file); ``id`` =
    ``"<file stem>-00000"``...; other fields (dataset, generator, input) in ``meta``.
    """
    p = _path(path, ALPACA)
    data = _read_json_list(p, ALPACA)
    _require(p, _columns(data), ["instruction", "output"], ALPACA)
    out, blank = [], 0
    for i, r in enumerate(data):
        instruction, extra = _s(r.get("instruction")), _s(r.get("input"))
        if instruction is None:
            blank += 1
            continue
        text = f"{instruction}\n\n{extra}" if extra else instruction
        out_text = r.get("output")
        meta = {k: v for k, v in r.items() if k not in ("instruction", "output")}
        out.append(
            Prompt(text=text, id=f"{p.stem}-{i:05d}", reference=str(out_text) if _s(out_text) else None,
                   label="harmless", category=_s(r.get("dataset")), meta=meta)
        )
    return _finish(out, blank, p, ALPACA)


def _table_rows(p: Path) -> tuple[list[str], list[dict]]:
    suffix = p.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_csv(p, TABLE)
    if suffix == ".jsonl":
        rows = _read_jsonl(p, TABLE)
        return _columns(rows), rows
    if suffix == ".json":
        rows = _read_json_list(p, TABLE)
        return _columns(rows), rows
    raise DataError(f"{p}: unsupported table format {suffix or '(no extension)'!r}; expected {TABLE}")


def load_table(
    path: PathLike,
    column: str,
    *,
    id_column: str | None = "id",
    split_column: str | None = "split",
    category_column: str | None = "category",
    label_column: str | None = "label",
    reference_column: str | None = "reference",
) -> list[Prompt]:
    """Load prompts from column ``column`` of a CSV/TSV, JSONL or JSON-list file.

    The optional ``*_column`` names fill the matching :class:`Prompt` fields when that column exists
    (ids default to ``"<file stem>-00000"``...; split values must be train/val/test or empty); every
    other column goes to ``meta``. Raises :class:`DataError` listing the available columns when
    ``column`` is missing.
    """
    p = _path(path, TABLE)
    cols, rows = _table_rows(p)
    _require(p, cols, [column], TABLE)
    used = {column, id_column, split_column, category_column, label_column, reference_column}
    out, blank = [], 0
    for i, r in enumerate(rows):
        text = _s(r.get(column))
        if text is None:
            blank += 1
            continue
        split = _s(r.get(split_column)) if split_column else None
        if split is not None and split not in SPLITS:
            raise DataError(f"{p}, record {i}: split {split!r} is not one of {', '.join(SPLITS)}")
        ref = r.get(reference_column) if reference_column else None
        out.append(
            Prompt(
                text=text,
                id=(_s(r.get(id_column)) if id_column else None) or f"{p.stem}-{i:05d}",
                split=split,
                category=_s(r.get(category_column)) if category_column else None,
                reference=None if ref is None or ref == "" else str(ref),
                label=_s(r.get(label_column)) if label_column else None,
                meta={k: v for k, v in r.items() if k not in used},
            )
        )
    return _finish(out, blank, p, f"prompts in column {column!r}")


def _load_lines(p: Path) -> list[Prompt]:
    lines = utf8_text(p).splitlines()
    out = [Prompt(text=t.strip(), id=f"{p.stem}-{i:05d}") for i, t in enumerate(lines) if not is_blank(t)]
    invisible = sum(1 for t in lines if t.strip() and is_blank(t))
    if not out:
        why = f" ({invisible} only zero-width)" if invisible else ""
        raise _no_prompts(p, "a text file with one prompt per line", why)
    if invisible:
        warnings.warn(f"{p}: skipped {invisible} line(s) made only of zero-width characters", UserWarning, stacklevel=3)
    return out


# ---------------------------------------------------------------------------------------- dispatching


def load_path(path: PathLike, **kwargs: Any) -> list[Prompt]:
    """Load a prompt file, choosing the loader from its extension and columns.

    ``.csv``/``.tsv``: ``goal`` -> :func:`load_advbench`; ``Behavior`` -> :func:`load_harmbench`;
    ``prompt`` + ``type`` + ``label`` -> :func:`load_xstest`; otherwise :func:`load_table` on
    ``column=`` or the first of :data:`PROMPT_COLUMNS` present. ``.json`` list with ``instruction``:
    :func:`load_alpaca` when records have ``output``, else :func:`load_refusal_direction`; other JSON
    lists and ``.jsonl`` -> :func:`load_table`. ``.txt``: one prompt per line. ``kwargs`` go to the
    chosen loader (e.g. ``which="all"`` for XSTest, ``targets_path=`` for HarmBench).
    """
    p = _path(path, f"{TABLE}, or a .txt file with one prompt per line")
    suffix = p.suffix.lower()
    if suffix == ".txt":
        return _load_lines(p)
    column = kwargs.pop("column", None)
    if suffix in (".csv", ".tsv"):
        cols, _ = _read_csv(p, TABLE)
        if column is None:
            if "goal" in cols:
                return load_advbench(p, **kwargs)
            if "Behavior" in cols:
                return load_harmbench(p, **kwargs)
            if {"prompt", "type", "label"} <= set(cols):
                return load_xstest(p, **kwargs)
    elif suffix == ".json" and column is None:
        data = _read_json_list(p, f"{REFUSAL_DIRECTION}, or {ALPACA}")
        cols = _columns(data)
        if "instruction" in cols:
            return load_alpaca(p) if "output" in cols else load_refusal_direction(p)
    elif suffix not in (".jsonl", ".json"):
        raise DataError(f"{p}: unsupported format {suffix or '(no extension)'!r}; expected {TABLE}, or .txt")
    if column is None:
        cols, _ = _table_rows(p)
        column = next((c for c in PROMPT_COLUMNS if c in cols), None)
        if column is None:
            raise DataError(
                f"{p}: no prompt column found (tried {', '.join(PROMPT_COLUMNS)}); available columns: "
                f"{', '.join(map(repr, cols))}. Pass column=..."
            )
    return load_table(p, column, **kwargs)


def load_prompts(
    spec: None | PathLike | Sequence[str | Prompt] = None,
    *,
    role: str = "harmful",
    split: str | None = None,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    **kwargs: Any,
) -> list[Prompt]:
    """Resolve a user's prompt spec to a list of :class:`Prompt`.

    ``spec``: ``None`` -> the bundled set named ``role`` (see :func:`load_default`); the name of a
    bundled set (when no such file exists); a list of strings or prompts; or a path, dispatched by
    :func:`load_path` (``kwargs`` go to the loader). ``split``: keep only that split; prompts that
    carry no split at all are first split deterministically with :func:`split_prompts` (``fractions``,
    ``seed``). Returns a non-empty list, or raises :class:`DataError`.
    """
    if spec is None:
        return load_default(role, split)
    if isinstance(spec, (str, os.PathLike)):
        if isinstance(spec, str) and spec in DEFAULT_SETS and not Path(spec).exists():
            return load_default(spec, split)
        prompts = load_path(spec, **kwargs)
        where = str(spec)
    elif isinstance(spec, Sequence):
        prompts, blank = [], 0
        for i, item in enumerate(spec):
            if isinstance(item, Prompt):
                prompts.append(item)
            elif isinstance(item, str):
                if not is_blank(item):
                    prompts.append(Prompt(text=item.strip(), id=f"{role}-{i:05d}"))
                else:
                    blank += 1
            else:
                raise DataError(f"prompt list item {i} is a {type(item).__name__}, expected str or Prompt")
        prompts = _finish(prompts, blank, "the prompt list", "non-empty strings")
        where = "the prompt list"
    else:
        raise DataError(f"cannot load prompts from a {type(spec).__name__}; give None, a path or a list of strings")
    if split is not None:
        if all(p.split is None for p in prompts):
            prompts = split_prompts(prompts, fractions, seed)
        prompts = filter_split(prompts, split)
        if not prompts:
            raise DataError(f"{where} contains no prompts in split {split!r}")
    return prompts


# ------------------------------------------------------------------------------------ attack behaviours

BEHAVIORS = ("a behaviours file: a HarmBench behaviours CSV (Behavior, BehaviorID; targets from --targets, "
             "HarmBench's targets JSON), an AdvBench CSV (goal, target), or a CSV/JSONL/JSON table with a "
             "prompt column (behavior, Behavior, goal, prompt, instruction or text) and a target column")
_TARGET_COLUMNS = ("target", "Target", "targets")


def load_behaviors(path: PathLike, targets_path: PathLike | None = None, *,
                   functional_category: str | None = "standard", require_targets: bool = True) -> list[Prompt]:
    """Behaviours to attack, each a harmful :class:`Prompt` with ``meta["target"]`` the string the attack
    optimises towards.

    The format is recognised by its columns: HarmBench's behaviours CSV (``Behavior``, ``BehaviorID``;
    targets from ``targets_path``, HarmBench's ``harmbench_targets_text.json``, keyed by BehaviorID;
    ``functional_category`` as in :func:`load_harmbench`), AdvBench's ``harmful_behaviors.csv``
    (``goal``, ``target``), or any table with a prompt column and a ``target`` column. A ``targets_path``
    given for a non-HarmBench file overrides its targets by id. With ``require_targets`` a behaviour with
    no target is a :class:`DataError` naming it.
    """
    p = _path(path, BEHAVIORS)
    if p.suffix.lower() in (".csv", ".tsv"):
        cols, _ = _read_csv(p, BEHAVIORS)
    else:
        cols, _ = _table_rows(p)
    if "Behavior" in cols and "BehaviorID" in cols:
        out = load_harmbench(p, targets_path, functional_category=functional_category)
    else:
        if "goal" in cols and "target" in cols and p.suffix.lower() == ".csv":
            out = load_advbench(p)
        else:
            col = next((c for c in ("behavior", "Behavior", "goal", "prompt", "instruction", "text") if c in cols), None)
            if col is None:
                raise DataError(f"{p}: no prompt column; expected {BEHAVIORS}; the file has columns {', '.join(cols)}")
            out = load_table(p, col)
            for q in out:
                t = next((q.meta.get(c) for c in _TARGET_COLUMNS if q.meta.get(c)), None)
                q.meta["target"] = _s(t) if isinstance(t, str) else None
                q.label = q.label or "harmful"
        if targets_path is not None:
            tp = _path(targets_path, HARMBENCH_TARGETS)
            targets = _read_json(tp, HARMBENCH_TARGETS)
            if not isinstance(targets, dict):
                raise DataError(f"{tp} holds a JSON {type(targets).__name__}, not an object (expected {HARMBENCH_TARGETS})")
            for q in out:
                if q.id in targets:
                    q.meta["target"] = _s(targets[q.id])
    if require_targets:
        missing = [q.id for q in out if not q.meta.get("target")]
        if missing:
            hint = (" pass targets_path= (--targets) HarmBench's harmbench_targets_text.json"
                    if "Behavior" in cols else " add a 'target' column")
            raise DataError(f"{p}: {len(missing)} of {len(out)} behaviours have no target (first: {missing[0]!r});{hint}")
    ids = [q.id for q in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{p}: behaviour id {dup!r} appears more than once")
    return out
