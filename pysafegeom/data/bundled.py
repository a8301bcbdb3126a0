"""The prompt sets bundled with the package (``pysafegeom/datasets/*.jsonl``), written for this project."""

from __future__ import annotations

import functools
import json
from importlib import resources

from ._prompt import DataError, Prompt, filter_split

#: name -> what the set is for
DEFAULT_SETS = {
    "harmful": "harmful requests (16 categories), for the harmfulness / refusal directions",
    "harmless": "safe twins of 'harmful': the same request form, length and domain, pair by pair",
    "xstest_safe": "safe prompts that sound dangerous (XSTest-style types), for over-refusal",
    "xstest_unsafe": "unsafe contrast prompts to 'xstest_safe'",
    "benign": "benign questions with short reference answers, for the benign-utility audit",
}

_CORE = ("id", "prompt", "split", "category", "reference", "label")


@functools.lru_cache(maxsize=None)
def _records(name: str) -> tuple[dict, ...]:
    res = resources.files("pysafegeom").joinpath("datasets", f"{name}.jsonl")
    lines = res.read_text(encoding="utf-8").splitlines()
    return tuple(json.loads(line) for line in lines if line.strip())


def load_default(name: str, split: str | None = None) -> list[Prompt]:
    """Load a bundled prompt set.

    ``name``: one of ``harmful``, ``harmless``, ``xstest_safe``, ``xstest_unsafe``, ``benign``.
    ``split``: ``"train"``, ``"val"``, ``"test"`` or ``None`` for all. Returns fresh :class:`Prompt`
    objects in file order, with the fixed split written in the file; extra fields (``type`` for the
    XSTest-style sets) go to ``meta``. Raises :class:`DataError` (a ``ValueError``) for an unknown name or
    split, listing the valid ones.
    """
    if name not in DEFAULT_SETS:
        raise DataError(f"unknown bundled prompt set {name!r}; valid names: {', '.join(DEFAULT_SETS)}")
    prompts = [
        Prompt(
            text=r["prompt"],
            id=r["id"],
            split=r.get("split"),
            category=r.get("category"),
            reference=r.get("reference"),
            label=r.get("label"),
            meta={k: v for k, v in r.items() if k not in _CORE},
        )
        for r in _records(name)
    ]
    return filter_split(prompts, split)
