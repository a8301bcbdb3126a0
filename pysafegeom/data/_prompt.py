"""The :class:`Prompt` record, the error type, and deterministic splitting."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from ..errors import InputFileError

SPLITS = ("train", "val", "test")


class DataError(InputFileError):
    """A prompt file or spec that cannot be used: wrong format, encoding, missing column, no prompts (a ``ValueError``)."""


@dataclass
class Prompt:
    """One prompt.

    ``text``: the instruction as given to the model (no chat template). ``id``: unique within its set.
    ``split``: "train" | "val" | "test" | None (unsplit). ``category``: topic or type, if known.
    ``reference``: a reference answer (benign-utility audit, Alpaca outputs), if any. ``label``:
    "harmful" | "harmless" | "safe" | "unsafe" | None. ``meta``: every other field of the source record
    (e.g. AdvBench/HarmBench ``target``, HarmBench ``context``, XSTest ``type``).
    """

    text: str
    id: str
    split: str | None = None
    category: str | None = None
    reference: str | None = None
    label: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


def texts(prompts: Iterable[Prompt | str]) -> list[str]:
    """The prompt strings of ``prompts`` (strings pass through)."""
    return [p.text if isinstance(p, Prompt) else str(p) for p in prompts]


def split_prompts(
    prompts: Sequence[Prompt | str],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> list[Prompt]:
    """Assign train/val/test splits to prompts that have none, deterministically.

    A seeded shuffle (``random.Random(seed)``) of the indices picks which prompts go where; the counts
    are ``round(n * fractions[0])`` train, ``round(n * fractions[1])`` val and the rest test. Returns new
    :class:`Prompt` objects in the input order with ``split`` set (existing splits are overwritten;
    strings become prompts with ids ``"prompt-00000"``...). Raises :class:`DataError` for fractions that
    are not three non-negative numbers summing to 1.
    """
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 or math.isnan(f) for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
        raise DataError(f"fractions must be three non-negative numbers (train, val, test) summing to 1, got {fractions!r}")
    items = [
        p if isinstance(p, Prompt) else Prompt(text=str(p), id=f"prompt-{i:05d}") for i, p in enumerate(prompts)
    ]
    n = len(items)
    n_train = min(n, round(n * fr[0]))
    n_val = min(n - n_train, round(n * fr[1]))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[idx] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return [dataclasses.replace(p, meta=dict(p.meta), split=split_of[i]) for i, p in enumerate(items)]


def filter_split(prompts: list[Prompt], split: str | None) -> list[Prompt]:
    """The prompts of one split (``None``: all). Raises :class:`DataError` for an unknown split name."""
    if split is None:
        return prompts
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)} (or None for all)")
    return [p for p in prompts if p.split == split]
