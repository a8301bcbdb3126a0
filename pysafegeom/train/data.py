"""Training examples for the safety recipes: (instruction, response) pairs, tokenised with the chat template.

``build_safety_dataset`` pairs harmful requests with a few refusal phrasings (chosen by index, so the
dataset is deterministic) and harmless instructions with helpful answers: by default the starting
model's own greedy answers (self-distillation, cached to a JSONL file so reruns skip generation), or
answers read from a JSONL file of ``{"prompt": ..., "response": ...}`` rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..prompts import _render, encode_after_prefix, encode_text, end_of_turn_ids, split_template  # noqa: F401  (end_of_turn_ids re-exported)

DEFAULT_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "Sorry, I can't do that.",
    "I'm sorry, but I cannot assist with that request.",
    "I can't help with that, because it could cause serious harm.",
)

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One training pair. ``end_turn``: append the end-of-turn token after the response (False for an
    answer that was cut at ``max_new_tokens``, so the model is not taught to stop mid-sentence)."""

    instruction: str
    response: str
    end_turn: bool = True
    kind: str = ""  # "refusal", "helpful" or free text, for bookkeeping


def as_examples(items) -> list[Example]:
    out = []
    for i, it in enumerate(items):
        if isinstance(it, Example):
            out.append(it)
        elif isinstance(it, dict):
            out.append(Example(it["prompt"] if "prompt" in it else it["instruction"], it["response"], bool(it.get("end_turn", True))))
        elif isinstance(it, (tuple, list)) and len(it) == 2:
            out.append(Example(str(it[0]), str(it[1])))
        else:
            raise TypeError(f"example {i} must be an Example, a (instruction, response) pair or a dict, not {type(it).__name__}")
    return out


def encode_examples(tokenizer, examples: list[Example], *, max_len: int, template: str | None = None,
                    system: str | None = None, allow_special_tokens: bool = False) -> list[dict]:
    """Token ids and labels per example: ``prefix + instruction + suffix`` (labels -100) followed by
    ``response + end-of-turn`` (labels = ids). Responses longer than ``max_len`` allows are cut.

    Control-token text (``<|im_end|>``...) in an instruction or a response is tokenised as text, so
    the only control tokens are the template's own, unless ``allow_special_tokens=True``
    (:func:`pysafegeom.prompts.encode_after_prefix`)."""
    split = split_template(tokenizer, template, system)
    eot = end_of_turn_ids(tokenizer, template)
    rows = []
    for i, ex in enumerate(examples):
        if not ex.instruction.strip():
            raise ValueError(f"example {i} has an empty instruction")
        rendered = _render(tokenizer, split.template, ex.instruction, system)
        body = rendered[len(split.prefix): len(rendered) - len(split.suffix)]
        prompt = encode_after_prefix(tokenizer, split.prefix, [body], allow_special_tokens=allow_special_tokens)[0]
        prompt = prompt + list(split.suffix_ids)
        resp = encode_text(tokenizer, ex.response, allow_special_tokens=allow_special_tokens) + (eot if ex.end_turn else [])
        if len(prompt) >= max_len:
            raise ValueError(f"example {i}: the prompt alone is {len(prompt)} tokens, at least max_len={max_len}")
        resp = resp[: max_len - len(prompt)]
        rows.append({"input_ids": prompt + resp, "labels": [IGNORE] * len(prompt) + resp})
    return rows


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch (training needs no left padding: positions start at 0 in every row)."""
    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _texts(prompts) -> list[str]:
    return [p.text if hasattr(p, "text") else str(p) for p in prompts]


def read_answers(path: str | os.PathLike) -> dict[str, str]:
    """``{prompt: response}`` from a JSONL file of ``{"prompt": ..., "response": ...}`` rows."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[row["prompt"]] = row["response"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: expected a JSON object with 'prompt' and 'response' ({exc})") from None
    return out


def build_safety_dataset(model, tokenizer, harmful, harmless, *, refusals=DEFAULT_REFUSALS,
                         answers_file: str | os.PathLike | None = None, cache_file: str | os.PathLike | None = None,
                         max_new_tokens: int = 96, batch_size: int = 16, template: str | None = None,
                         progress: bool = True) -> list[Example]:
    """Harmful requests paired with refusals, harmless ones with helpful answers.

    ``harmful``/``harmless``: prompt strings or :class:`~pysafegeom.data.Prompt` objects. Harmful prompt
    ``i`` gets ``refusals[i % len(refusals)]``. Harmless answers come from ``answers_file`` (every prompt
    must be in it) or else from the model's greedy generation (``max_new_tokens``), cached in
    ``cache_file`` (JSONL, keyed by prompt and ``max_new_tokens``) when given.
    """
    harmful, harmless = _texts(harmful), _texts(harmless)
    refusals = tuple(refusals)
    if not refusals or any(not r.strip() for r in refusals):
        raise ValueError("refusals must be a non-empty list of non-empty phrasings")
    if not harmful and not harmless:
        raise ValueError("empty dataset: no harmful and no harmless prompts")
    examples = [Example(p, refusals[i % len(refusals)], True, "refusal") for i, p in enumerate(harmful)]
    if not harmless:
        return examples
    if answers_file is not None:
        answers = read_answers(answers_file)
        missing = [p for p in harmless if p not in answers]
        if missing:
            raise ValueError(f"{answers_file} has no response for {len(missing)} harmless prompt(s), e.g. {missing[0]!r}")
        return examples + [Example(p, answers[p], True, "helpful") for p in harmless]
    cache: dict[tuple[str, int], dict] = {}
    if cache_file is not None and Path(cache_file).is_file():
        with open(cache_file, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    cache[(r["prompt"], int(r["max_new_tokens"]))] = r
    todo = [p for p in dict.fromkeys(harmless) if (p, max_new_tokens) not in cache]
    if todo:
        from ..generation import greedy_generate

        if model is None:
            raise ValueError("self-distillation needs the starting model; pass model= or answers_file=")
        texts, finished = greedy_generate(model, tokenizer, todo, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                          template=template, progress=progress, return_finished=True)
        for p, t, fin in zip(todo, texts, finished):
            cache[(p, max_new_tokens)] = {"prompt": p, "response": t, "finished": fin, "max_new_tokens": max_new_tokens}
        if cache_file is not None:
            Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(str(cache_file) + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for r in cache.values():
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            os.replace(tmp, cache_file)
    for p in harmless:
        r = cache[(p, max_new_tokens)]
        examples.append(Example(p, r["response"], bool(r["finished"]), "helpful"))
    return examples
