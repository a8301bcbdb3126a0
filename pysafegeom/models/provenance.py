"""What a model was trained on: the record that keeps analyses off a model's own training prompts.

A model folder (or LoRA adapter folder) written by pysafegeom carries ``training_prompts.json``,
``{"prompts": [...]}``: every instruction it was fine-tuned on (the trainer writes it into every
checkpoint, :func:`pysafegeom.train.export_adapter` copies it, the shipped anchors carry theirs).
:func:`pysafegeom.load_model` attaches the record to the model it returns; :func:`attach_training_prompts`
does the same for a model loaded some other way. :func:`overlap` finds the prompts of a set that are in
the record, compared by :func:`pysafegeom.validate.prompt_key` (case, whitespace, quotes, invisible
characters), so a re-spaced or re-cased copy of a training prompt still counts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..validate import overlap, prompt_key  # noqa: F401  (the one comparison key; re-exported)

TRAINING_PROMPTS_FILE = "training_prompts.json"
_ATTR = "_pysafegeom_training_prompts"


def read_training_prompts(folder: str | os.PathLike) -> list[str] | None:
    """The prompts recorded in ``folder/training_prompts.json``, or None when the folder has no record."""
    from ..errors import InputFileError

    f = Path(folder) / TRAINING_PROMPTS_FILE
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputFileError(f"{f} is not valid UTF-8 JSON ({exc}); it should hold {{\"prompts\": [...]}}") from None
    prompts = d.get("prompts") if isinstance(d, dict) else None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise InputFileError(f"{f} must hold {{\"prompts\": [list of strings]}}")
    return prompts


def write_training_prompts(folder: str | os.PathLike, prompts) -> Path:
    """Write ``folder/training_prompts.json`` (deduplicated, in order)."""
    f = Path(folder) / TRAINING_PROMPTS_FILE
    f.write_text(json.dumps({"prompts": list(dict.fromkeys(prompts))}, indent=0, ensure_ascii=False) + "\n",
                 encoding="utf-8")
    return f


def attach_training_prompts(model, prompts) -> None:
    """Record on ``model`` the prompts it was trained on (None clears the record)."""
    setattr(model, _ATTR, None if prompts is None else list(prompts))


def training_prompts(model) -> list[str] | None:
    """The training prompts recorded on ``model`` (by :func:`load_model` or :func:`attach_training_prompts`), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    for m in (model, base):
        rec = getattr(m, _ATTR, None) if m is not None else None
        if rec is not None:
            return rec
    return None

