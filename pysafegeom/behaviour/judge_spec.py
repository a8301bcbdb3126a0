"""Judges named by short text specs, for the command line and ``analyze(judges=[...])``.

Specs (one judge each):

* ``substring``: :class:`~pysafegeom.behaviour.judges.SubstringJudge` with its default phrase lists;
  ``substring:arditi,zhao`` picks the lists (names from :data:`~pysafegeom.refusal.PHRASE_LISTS`).
* ``xstest``: :class:`~pysafegeom.behaviour.judges.XSTestJudge` (``xstest:LISTS`` as for substring).
* ``model``: the model under test judges its own answers, as a local
  :class:`~pysafegeom.behaviour.judges.ModelJudge` with the ``default`` preset (pass ``model=`` and
  ``tokenizer=``); ``model:preset=NAME`` the same with another preset.
* ``model:SPEC``: a local classifier loaded with :func:`pysafegeom.models.load_model` (a folder, a ``.gguf``
  file or a registered name; nothing is downloaded), default preset; ``model:SPEC:preset=NAME`` another preset.
* ``harmbench:SPEC``: the same with the ``harmbench`` preset (HarmBench's classifier prompt, e.g. a local copy
  of ``cais/HarmBench-Llama-2-13b-cls``); ``harmbench`` alone uses the model under test.

:data:`DEFAULT_JUDGE_SPECS` is ``("substring", "model")``: the substring judge plus the local model judge.
In a list of judges the first decides (it is the reopen table's primary judge: its verdicts give the
per-prompt success flags, the ΔASR and the verdict); the others are reported beside it. Every judge built
here has a distinct ``name``, recorded in the results (:func:`judges_from_specs` makes clashing names distinct).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import InvalidArgument, InvalidType, PysafegeomError
from .judges import JUDGE_PRESETS, ModelJudge, SubstringJudge, XSTestJudge

#: the judge kinds a spec can name, with what the part after the colon means
JUDGE_KINDS: dict[str, str] = {
    "substring": "optional comma-separated phrase lists, e.g. substring:arditi,zhao",
    "xstest": "optional comma-separated phrase lists, e.g. xstest:xstest,arditi",
    "model": "optional classifier model spec (default: the model under test) and :preset=NAME",
    "harmbench": "optional classifier model spec (default: the model under test); the harmbench preset",
}

#: the substring judge plus the local model judge (the model under test); the first decides
DEFAULT_JUDGE_SPECS: tuple[str, ...] = ("substring", "model")

_OPTIONS = ("preset",)
_OPTION = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)=(.*)$")


@dataclass(frozen=True)
class JudgeSpec:
    """A parsed judge spec: ``kind`` (a key of :data:`JUDGE_KINDS`), ``arg`` (phrase lists or a classifier model spec;
    None when absent), ``options`` (``preset``), and ``spec``, the text it came from."""

    spec: str
    kind: str
    arg: str | None = None
    options: dict = field(default_factory=dict)

    @property
    def needs_model_under_test(self) -> bool:
        """The judge is the analysed model itself (``model``, ``model:preset=...``, ``harmbench``)."""
        return self.kind in ("model", "harmbench") and self.arg is None

    @property
    def loads_model(self) -> bool:
        """The judge loads a classifier of its own (``model:SPEC``, ``harmbench:SPEC``)."""
        return self.kind in ("model", "harmbench") and self.arg is not None

    @property
    def preset(self) -> str | None:
        if self.kind == "harmbench":
            return "harmbench"
        if self.kind == "model":
            return self.options.get("preset", "default")
        return None


def parse_judge_spec(spec: str) -> JudgeSpec:
    """Parse one judge spec (module docstring) without building anything; unknown names are an error listing the valid ones."""
    if isinstance(spec, JudgeSpec):
        return spec
    if not isinstance(spec, str):
        raise InvalidType(f"a judge spec must be a string such as 'substring' or 'harmbench:PATH', got {type(spec).__name__}")
    text = spec.strip()
    if not text:
        raise InvalidArgument(f"empty judge spec; judges are {', '.join(JUDGE_KINDS)}")
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in JUDGE_KINDS:
        raise InvalidArgument(f"unknown judge {kind!r} in judge spec {spec!r}; judges are {', '.join(JUDGE_KINDS)} "
                              f"({'; '.join(f'{k}: {v}' for k, v in JUDGE_KINDS.items())})")
    if kind in ("substring", "xstest"):
        if not rest.strip():
            return JudgeSpec(spec, kind)
        lists = [x.strip() for x in rest.split(",")]
        if any(not x for x in lists):
            raise InvalidArgument(f"judge spec {spec!r}: an empty phrase-list name (write e.g. {kind}:arditi,zhao)")
        from ..refusal import PHRASE_LISTS

        for x in lists:
            if x not in PHRASE_LISTS:
                raise InvalidArgument(f"judge spec {spec!r}: unknown phrase list {x!r}; lists are {', '.join(PHRASE_LISTS)}")
        return JudgeSpec(spec, kind, ",".join(lists))
    # model / harmbench: trailing :key=value options, then the classifier spec (which may itself hold ':' or '=')
    options: dict[str, str] = {}
    parts = rest.split(":") if rest else []
    while parts:
        m = _OPTION.match(parts[-1].strip())
        if not m or (m.group(1) not in _OPTIONS and os.sep in parts[-1]):
            break
        key, value = m.group(1), m.group(2).strip()
        if key not in _OPTIONS:
            raise InvalidArgument(f"judge spec {spec!r}: unknown option {key!r}; options are {', '.join(_OPTIONS)}")
        if key in options:
            raise InvalidArgument(f"judge spec {spec!r}: option {key!r} given twice")
        options[key] = value
        parts.pop()
    arg = ":".join(parts).strip() or None
    if "preset" in options:
        if kind == "harmbench":
            raise InvalidArgument(f"judge spec {spec!r}: harmbench is the harmbench preset; write model:SPEC:preset=NAME "
                                  "for another")
        if options["preset"] not in JUDGE_PRESETS:
            raise InvalidArgument(f"judge spec {spec!r}: unknown preset {options['preset']!r}; presets are "
                                  f"{', '.join(JUDGE_PRESETS)}")
    return JudgeSpec(spec, kind, arg, options)


def judge_from_spec(spec: str | JudgeSpec, *, model=None, tokenizer=None, device=None, dtype=None):
    """Build the judge a spec names (module docstring).

    ``model``/``tokenizer``: the model under test, needed by ``model`` and ``harmbench`` without a classifier
    spec. ``device``/``dtype``: for a classifier loaded from its spec (``model:SPEC``, ``harmbench:SPEC``;
    :func:`pysafegeom.models.load_model`'s defaults when None). Names: ``substring``, ``substring:LISTS``,
    ``xstest``, ``model`` (the model under test, default preset), ``harmbench-cls`` (the harmbench preset),
    ``model:SPEC`` for a loaded classifier with the default preset.
    """
    js = parse_judge_spec(spec)
    if js.kind == "substring":
        return _named(SubstringJudge() if js.arg is None else SubstringJudge(lists=js.arg.split(",")), js)
    if js.kind == "xstest":
        return _named(XSTestJudge() if js.arg is None else XSTestJudge(lists=js.arg.split(",")), js)
    preset = js.preset
    if js.needs_model_under_test:
        if model is None or tokenizer is None:
            raise InvalidArgument(f"judge spec {js.spec!r} judges with the model under test, but no model and tokenizer "
                                  f"were passed (judge_from_spec(..., model=, tokenizer=)); name a classifier instead, "
                                  f"e.g. {js.kind}:PATH")
        judge = ModelJudge.preset(preset, model, tokenizer)
        if preset != "default" and js.kind == "model":
            judge.name = f"model:preset={preset}"
        return judge
    from ..models import load_model

    try:
        cls_model, cls_tok = load_model(js.arg, dtype=dtype, device=device)
    except (PysafegeomError, OSError, ValueError, RuntimeError, ImportError) as exc:
        raise InvalidArgument(f"judge spec {js.spec!r}: the classifier {js.arg!r} could not be loaded "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())})") from exc
    judge = ModelJudge.preset(preset, cls_model, cls_tok)
    if js.kind == "model":
        judge.name = f"model:{js.arg}" + (f":preset={preset}" if preset != "default" else "")
    return judge


def _named(judge, js: JudgeSpec):
    if js.arg is not None:
        judge.name = f"{js.kind}:{js.arg}"
    return judge


def judges_from_specs(specs: Sequence[str | JudgeSpec], *, model=None, tokenizer=None, device=None, dtype=None) -> list:
    """:func:`judge_from_spec` for each spec, in order (the first decides). Every spec is parsed before any classifier
    loads; names that clash (two ``harmbench:`` classifiers) get the spec appended, e.g. ``harmbench-cls[harmbench:A]``;
    the same spec twice is an error."""
    if isinstance(specs, (str, JudgeSpec)):
        specs = [specs]
    if specs is None or not hasattr(specs, "__iter__"):
        raise InvalidType(f"judge specs must be a list of strings, got {type(specs).__name__}")
    parsed = [parse_judge_spec(s) for s in specs]
    if not parsed:
        raise InvalidArgument(f"no judge specs given; e.g. {list(DEFAULT_JUDGE_SPECS)}")
    seen: set[str] = set()
    for js in parsed:
        key = js.spec.strip()
        if key in seen:
            raise InvalidArgument(f"judge spec {js.spec!r} given twice")
        seen.add(key)
    judges = [judge_from_spec(js, model=model, tokenizer=tokenizer, device=device, dtype=dtype) for js in parsed]
    names = [getattr(j, "name", type(j).__name__) for j in judges]
    for i, (j, js) in enumerate(zip(judges, parsed)):
        if names.count(names[i]) > 1:
            j.name = f"{names[i]}[{js.spec.strip()}]"
    return judges
