"""Fixed-source replay: send stored test cases to a target model, greedily, and judge the answers.

The test cases were made once against some source model (GCG, AutoDAN, a template, the behaviour alone);
replay measures what they do to another model (or the same one) with no new optimisation. This is the
cheap, exactly repeatable robustness figure; an adaptive attack on the target is the expensive one.

:func:`replay` writes into its ``out`` folder, in HarmBench's layouts where one exists:

* ``completions.json``: ``{behavior_id: [{"test_case", "generation", "method", "source_model"}, ...]}``
  (HarmBench's ``generate_completions`` output plus our two keys);
* ``results.json``: ``{behavior_id: [{"test_case", "generation", "label", "method", "source_model",
  "source_model_hash", "judges": {name: {"success", "rule"}}, "decided_by"}, ...]}`` (HarmBench's
  ``evaluate_completions`` output; ``label`` 1 = the attack succeeded by the primary judge);
* ``summary.json``: attack success rates (ASR) with 95% Wilson intervals per method, per source model, per
  (source, method) and overall, for the primary judge and every other judge; the generation settings and
  the target model's name and hash;
* ``generations.json``: the resume cache, ``{key: generation}`` with the key a hash of (test case, target
  model hash, max_new_tokens, template, system).

ASR counts test cases (records): one success per test case the primary judge calls not refused. The judge
is shown the behaviour text, as HarmBench's classifier is, or the test case where the behaviour is unknown.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .. import _io
from ..behaviour.diagnostics import wilson_interval
from ..errors import InvalidArgument, InvalidType
from .store import StoreError, TestCaseStore, open_cases

CONTENT = "replay"


class ReplayError(InvalidArgument):
    """Replay or transfer options that cannot be used (a ``ValueError``)."""


# ------------------------------------------------------------------------------------------ inputs

def as_stores(cases) -> list[TestCaseStore]:
    """``cases`` (a store, a path, or a list of those) opened with :func:`~pysafegeom.attacks.store.open_cases`."""
    if isinstance(cases, (str, os.PathLike, TestCaseStore)):
        cases = [cases]
    if cases is None or not isinstance(cases, Sequence):
        raise ReplayError(f"cases must be a test-case store, a path, or a list of those; got {type(cases).__name__}")
    stores = [open_cases(c) for c in cases]
    if not stores or not any(len(s) for s in stores):
        raise ReplayError("no test cases to replay: the stores given are empty; add records first "
                          "(TestCaseStore(path).add(...)) or point at a folder an attack wrote")
    return stores


def judge_name(judge, taken: set[str]) -> str:
    """A judge's ``name`` attribute (else its class name), made unique among ``taken`` with ``#2``, ``#3``..."""
    base = str(getattr(judge, "name", None) or type(judge).__name__)
    name, n = base, 2
    while name in taken:
        name, n = f"{base}#{n}", n + 1
    taken.add(name)
    return name


def check_judges(judges) -> list:
    """The judges as a list (default ``[SubstringJudge()]``), each checked to have ``judge(prompts, responses)``."""
    if judges is None:
        from ..behaviour.judges import SubstringJudge

        return [SubstringJudge()]
    if not isinstance(judges, (list, tuple)):
        judges = [judges]
    if not judges:
        raise ReplayError("judges is empty: pass None for the default [SubstringJudge()] or at least one judge")
    for i, j in enumerate(judges):
        if not callable(getattr(j, "judge", None)):
            raise ReplayError(f"judge {i} ({type(j).__name__}) has no judge(prompts, responses) method; pass a judge from "
                              f"pysafegeom.behaviour (SubstringJudge(), XSTestJudge(), ModelJudge(...))")
    return list(judges)


def _check_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidType(f"{name} must be an int, got {type(v).__name__} {v!r}")
    if v < lo:
        raise ReplayError(f"{name} must be at least {lo}, got {v}" + (
            "; HarmBench generates 512 tokens, 64 is the default here" if name == "max_new_tokens" else ""))
    return v


def cache_key(test_case: str, target_hash: str, max_new_tokens: int, template, system) -> str:
    """The resume key of one generation: sha256 of (test case, target hash, max_new_tokens, template, system)."""
    blob = json.dumps([test_case, target_hash, max_new_tokens, template, system], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


# ------------------------------------------------------------------------------------------ rates

def read_cache(out: Path) -> dict[str, str]:
    """A replay folder's generation cache (``generations.json``); ``{}`` when absent or corrupt (it is then
    regenerated, never trusted)."""
    f = Path(out) / "generations.json"
    try:
        cache = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except ValueError:
        return {}
    return cache if isinstance(cache, dict) else {}


def judges_need_target(judges) -> bool:
    """``judges`` is a callable ``(model, tokenizer) -> judges`` (judges that use the target model), not a list."""
    return callable(judges) and not isinstance(judges, (list, tuple))


def generate_batches(generate_fn, model, tokenizer, todo: list[str], *, max_new_tokens: int, batch_size: int,
                     template, system):
    """``(batch, greedy answers)`` for ``todo`` in consecutive batches of ``batch_size`` (the batches a replay
    generates, in one process or shard by shard)."""
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        yield chunk, generate_fn(model, tokenizer, chunk, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 template=template, system=system, progress=False)


def rate(k: int, n: int) -> dict:
    """``{"asr", "k", "n", "ci_low", "ci_high"}``: k of n with its 95% Wilson interval (None values when n = 0)."""
    if n == 0:
        return {"asr": None, "k": 0, "n": 0, "ci_low": None, "ci_high": None}
    lo, hi = wilson_interval(k, n)
    return {"asr": k / n, "k": k, "n": n, "ci_low": lo, "ci_high": hi}


def fmt_rate(r: dict) -> str:
    """``"0.80 [0.49, 0.94] (8/10)"``, or ``"n/a"`` for an empty rate."""
    if not r or r.get("asr") is None:
        return "n/a"
    return f"{r['asr']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}] ({r['k']}/{r['n']})"


def _rates(rows: list[dict], key) -> dict:
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r["label"])
    return {g: rate(sum(v), len(v)) for g, v in groups.items()}


def summarise(rows: list[dict], judge_names: list[str]) -> dict:
    """ASR of flat result rows (each with ``label``, ``method``, ``source_model`` and ``judges``) per method,
    per source model, per (source, method) and overall, plus the overall ASR by every judge."""
    per_sm: dict = {}
    for (s, m), v in _rates(rows, lambda r: (r["source_model"], r["method"])).items():
        per_sm.setdefault(s, {})[m] = v
    per_judge = {}
    for name in judge_names:
        k = sum(bool(r["judges"][name]["success"]) for r in rows)
        per_judge[name] = rate(k, len(rows))
    return {"overall": rate(sum(r["label"] for r in rows), len(rows)),
            "per_method": _rates(rows, lambda r: r["method"]),
            "per_source": _rates(rows, lambda r: r["source_model"]),
            "per_source_method": per_sm,
            "per_judge": per_judge}


# ------------------------------------------------------------------------------------------ replay

def _target_name(model, target_name) -> str:
    if target_name is not None:
        if not isinstance(target_name, str) or not target_name.strip():
            raise ReplayError(f"target_name must be a non-empty string, got {target_name!r}")
        return target_name
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return Path(path).name or type(model).__name__


def _run(cases, model, tokenizer, *, out, judges=None, max_new_tokens=64, template=None, system=None, batch_size=16,
         target_name=None, resume=True, progress=True, overwrite=False, generate_fn=None,
         target_hash=None, generated: int | None = None) -> tuple[dict, list[dict]]:
    """:func:`replay`, returning ``(summary, flat result rows)``. ``model=None`` with ``target_hash`` (and
    ``target_name``) judges a folder whose generation cache holds every test case already (the Ray path);
    ``generated``: how many of them its tasks generated in this run (for the summary's counts)."""
    from ..generation import generate
    from .gcg import model_hash

    generate_fn = generate_fn or generate
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens)
    batch_size = _check_int("batch_size", batch_size)
    judges = check_judges(judges)
    for n, v in (("template", template), ("system", system)):
        if v is not None and not isinstance(v, str):
            raise InvalidType(f"{n} must be a string or None, got {type(v).__name__}")
    stores = as_stores(cases)
    out = _io.check_output_path(out, overwrite, "dir", content=CONTENT)  # a replay folder is accepted
    name = _target_name(model, target_name)
    thash = model_hash(model) if model is not None else target_hash

    records = [r for s in stores for r in s.records()]
    texts = list(dict.fromkeys(r["test_case"] for r in records))  # dedupe: each text generated once
    out.mkdir(parents=True, exist_ok=True)
    _io.mark_dir(out, CONTENT)
    cache_file = out / "generations.json"
    cache = read_cache(out) if resume else {}
    key = {t: cache_key(t, thash, max_new_tokens, template, system) for t in texts}
    todo = [t for t in texts if key[t] not in cache]
    if todo and model is None:
        raise ReplayError(f"{len(todo)} test cases have no cached generation in {out} and no model was given")

    def completions() -> dict:
        comp: dict[str, list[dict]] = {}
        for r in records:
            if key[r["test_case"]] in cache:
                comp.setdefault(r["id"], []).append({"test_case": r["test_case"], "generation": cache[key[r["test_case"]]],
                                                     "method": r["method"], "source_model": r["source_model"]})
        return comp

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), initial=len(texts) - len(todo), desc=f"replay on {name}", unit="case")
    try:
        for chunk, gens in generate_batches(generate_fn, model, tokenizer, todo, max_new_tokens=max_new_tokens,
                                            batch_size=batch_size, template=template, system=system):
            for t, g in zip(chunk, gens):
                cache[key[t]] = g
            _io.atomic_write_text(cache_file, json.dumps(cache, ensure_ascii=False) + "\n")
            _io.atomic_write_text(out / "completions.json", json.dumps(completions(), indent=1, ensure_ascii=False) + "\n")
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if not todo:
        _io.atomic_write_text(out / "completions.json", json.dumps(completions(), indent=1, ensure_ascii=False) + "\n")

    # judging: every judge sees the behaviour (the test case where it is unknown) and the generation
    gens = [cache[key[r["test_case"]]] for r in records]
    prompts = [r["behavior"] if r["behavior"] is not None else r["test_case"] for r in records]
    taken: set[str] = set()
    names = [judge_name(j, taken) for j in judges]
    verdicts = {}
    for n, j in zip(names, judges):
        v = list(j.judge(prompts, gens))
        if len(v) != len(gens):
            raise ReplayError(f"judge {n} returned {len(v)} verdicts for {len(gens)} responses; a judge gives one per response")
        verdicts[n] = v
    rows, results = [], {}
    for i, r in enumerate(records):
        js = {n: {"success": not verdicts[n][i].refused, "rule": verdicts[n][i].rule} for n in names}
        row = {"test_case": r["test_case"], "generation": gens[i], "label": int(js[names[0]]["success"]),
               "method": r["method"], "source_model": r["source_model"], "source_model_hash": r["source_model_hash"],
               "judges": js, "decided_by": names[0]}
        results.setdefault(r["id"], []).append(row)
        rows.append(dict(row, id=r["id"]))
    summary = summarise(rows, names)
    summary.update({
        "target": {"name": name, "hash": thash}, "max_new_tokens": max_new_tokens, "template": template,
        "system": system, "judges": names, "primary_judge": names[0],
        "sources": [s.origin for s in stores], "n_test_cases": len(records), "n_unique_test_cases": len(texts),
        "n_generated": len(todo) if generated is None else generated,
        "n_resumed": len(texts) - (len(todo) if generated is None else generated), "unit": "test case",
    })
    _io.atomic_write_text(out / "results.json", json.dumps(_io.json_safe(results), indent=1, ensure_ascii=False) + "\n")
    _io.atomic_write_text(out / "summary.json", json.dumps(_io.json_safe(summary), indent=1, ensure_ascii=False) + "\n")
    return summary, rows


# ------------------------------------------------------------------------------------------ replay on Ray

TARGET_FILE = "target.json"  # the Ray path's record of a target's hash, keyed by its weight files


def shard_texts(texts: list[str], batch_size: int, shard_size: int | None) -> list[list[str]]:
    """Consecutive shards of whole generation batches (``shard_size`` rounded up to a multiple of ``batch_size``;
    default 4 batches), so every batch is the batch a single process generates."""
    size = max(1, -(-(shard_size or 4 * batch_size) // batch_size)) * batch_size
    return [texts[i:i + size] for i in range(0, len(texts), size)]


def _shard_task(spec: str, texts: list[str], out: str, max_new_tokens: int, template, system, batch_size: int,
                device=None, dtype=None, placement: dict | None = None) -> dict:
    """One Ray task: greedy answers of the target ``spec`` to one shard (skipping what ``out``'s cache holds)."""
    from ..generation import generate
    from ..models import load_model
    from ..scale import per_process_offload
    from .gcg import model_hash

    model, tok = load_model(spec, dtype=dtype, device=device, **per_process_offload(placement))
    thash = model_hash(model)
    cache = read_cache(Path(out))
    key = {t: cache_key(t, thash, max_new_tokens, template, system) for t in texts}
    gens = {}
    for chunk, answers in generate_batches(generate, model, tok, [t for t in texts if key[t] not in cache],
                                           max_new_tokens=max_new_tokens, batch_size=batch_size, template=template,
                                           system=system):
        gens.update((key[t], g) for t, g in zip(chunk, answers))
    return {"thash": thash, "name": _target_name(model, None), "gens": gens}


def _judge_task(stores, spec: str, out: str, judges, device=None, dtype=None, placement: dict | None = None,
                **kw) -> tuple[dict, list[dict]]:
    """One Ray task: judges that need the target (``judges(model, tokenizer)``) over a complete generation cache."""
    from ..models import load_model
    from ..scale import per_process_offload

    model, tok = load_model(spec, dtype=dtype, device=device, **per_process_offload(placement))
    return _run(stores, model, tok, out=out, judges=judges(model, tok), **kw)


def shard_units(stores, spec: str, out: Path, *, key: str, max_new_tokens: int, template, system, batch_size: int,
                shard_size: int | None, device=None, dtype=None,
                placement: dict | None = None) -> tuple[list[tuple[str, dict]], dict | None]:
    """The generation shards of one target still to do, as ``(unit key, task kwargs)``, and the target record
    (``{"weights", "hash", "name"}``) a former run left when its weight files are unchanged (None otherwise)."""
    from ..models.loading import weights_hash

    records = [r for s in stores for r in s.records()]
    texts = list(dict.fromkeys(r["test_case"] for r in records))
    known = None
    f = out / TARGET_FILE
    if f.is_file():
        try:
            known = json.loads(f.read_text(encoding="utf-8"))
        except ValueError:
            known = None
        if not isinstance(known, dict) or known.get("weights") != weights_hash(spec):
            known = None
    cache = read_cache(out) if known is not None else {}
    units = []
    for i, shard in enumerate(shard_texts(texts, batch_size, shard_size)):
        if known is not None and all(cache_key(t, known["hash"], max_new_tokens, template, system) in cache
                                     for t in shard):
            continue  # generated by a former run (the target's files are unchanged)
        units.append((f"{key}#{i}", {"spec": spec, "texts": shard, "out": str(out), "max_new_tokens": max_new_tokens,
                                     "template": template, "system": system, "batch_size": batch_size,
                                     "device": device, "dtype": dtype, "placement": placement}))
    return units, known


class _Merger:
    """The driver's side of the shards: each finished shard merged into its target's cache file at once (the driver
    is its one writer), so a killed driver loses only the shards in flight."""

    def __init__(self):
        self.targets: dict[str, dict] = {}

    def add(self, key: str, out: Path, spec: str) -> None:
        from ..models.loading import weights_hash

        self.targets[key] = {"out": out, "weights": weights_hash(spec), "hash": None, "name": None, "generated": 0}

    def __call__(self, unit: str, res: dict) -> None:
        t = self.targets[unit.rpartition("#")[0]]
        cache = read_cache(t["out"])
        cache.update(res["gens"])
        _io.atomic_write_text(t["out"] / "generations.json", json.dumps(cache, ensure_ascii=False) + "\n")
        t["hash"], t["name"] = res["thash"], res["name"]
        t["generated"] += len(res["gens"])
        _io.atomic_write_text(t["out"] / TARGET_FILE, json.dumps(
            {"weights": t["weights"], "hash": res["thash"], "name": res["name"]}) + "\n")


def replay_ray(cases, spec: str, *, out, ropts, judges=None, max_new_tokens: int = 64, template=None, system=None,
               batch_size: int = 16, shard_size: int | None = None, target_name: str | None = None, resume: bool = True,
               progress: bool = True, overwrite: bool = False, device=None, dtype=None,
               placement: dict | None = None) -> tuple[dict, list[dict]]:
    """:func:`replay` of the target ``spec`` fanned out on Ray: the unique test cases in shards of whole batches, one
    task each, merged into the folder's generation cache as they finish; then judged as one process judges (in the
    driver; in one task where ``judges`` is a callable ``(model, tokenizer) -> judges`` that needs the target)."""
    from ..scale import progress_bar, run_units, session

    stores = as_stores(cases)
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens)
    batch_size = _check_int("batch_size", batch_size)
    if shard_size is not None:
        _check_int("shard_size", shard_size)
    needs_target = judges_need_target(judges)
    if not needs_target:
        judges = check_judges(judges)
    out = _io.check_output_path(out, overwrite, "dir", content=CONTENT)
    out.mkdir(parents=True, exist_ok=True)
    _io.mark_dir(out, CONTENT)
    if not resume:
        for f in ("generations.json", TARGET_FILE):
            (out / f).unlink(missing_ok=True)
    units, known = shard_units(stores, str(spec), out, key="target", max_new_tokens=max_new_tokens, template=template,
                               system=system, batch_size=batch_size, shard_size=shard_size, device=device, dtype=dtype,
                               placement=placement)
    merge = _Merger()
    merge.add("target", out, str(spec))
    with session(ropts), progress_bar(len(units) + needs_target, "replay: shards", progress) as bar:
        run_units(units, _shard_task, ropts, desc="replay shards", on_done=merge, bar=bar)
        return _finish_ray(stores, str(spec), out, merge.targets["target"], known, judges, needs_target, ropts,
                           max_new_tokens=max_new_tokens, template=template, system=system, batch_size=batch_size,
                           target_name=target_name, device=device, dtype=dtype, placement=placement, bar=bar)


def _finish_ray(stores, spec: str, out: Path, t: dict, known, judges, needs_target: bool, ropts, *, target_name,
                device, dtype, placement=None, bar=None, **kw) -> tuple[dict, list[dict]]:
    """Judge one target's complete cache: in the driver, or in one task for judges that need the target."""
    if needs_target:
        from ..scale import run_units

        done = run_units([("judge", {"stores": stores, "spec": spec, "out": str(out), "judges": judges,
                                     "device": device, "dtype": dtype, "placement": placement,
                                     "target_name": target_name, "progress": False, "generated": t["generated"],
                                     **kw})], _judge_task, ropts, desc="replay judging", progress=False, bar=bar)
        return done["judge"]["result"]
    thash = t["hash"] or (known or {}).get("hash")
    name = target_name or t["name"] or (known or {}).get("name")
    return _run(stores, None, None, out=out, judges=judges, target_name=name, target_hash=thash, progress=False,
                generated=t["generated"], **kw)



def replay(cases, model, tokenizer=None, *, out, judges=None, max_new_tokens: int = 64, template: str | None = None,
           system: str | None = None, batch_size: int = 16, target_name: str | None = None, resume: bool = True,
           progress: bool = True, overwrite: bool = False, ray=None, shard_size: int | None = None, device=None,
           dtype=None, device_map=None, max_memory=None, offload_folder=None) -> dict:
    """Generate a greedy answer of ``model`` to every stored test case and judge it; returns the summary.

    ``cases``: a :class:`~pysafegeom.attacks.store.TestCaseStore`, a path :func:`~pysafegeom.attacks.store.open_cases`
    accepts, or a list of those (each record keeps its ``source_model``). Identical test-case texts are
    generated once. ``judges``: judges with ``judge(prompts, responses) -> list[Verdict]`` (default
    ``[SubstringJudge()]``); the first decides ``label`` and the headline ASR, all are reported.
    ``max_new_tokens`` (>= 1; HarmBench uses 512), ``template``/``system``, ``batch_size``: as
    :func:`pysafegeom.generation.generate`. ``target_name``: the model's name in the outputs (default: its
    folder name). ``out``: the folder written (see the module docstring); with ``resume=True`` generations
    cached there for the same target hash and settings are reused, and the cache is written after every
    batch, so a killed run loses at most one batch. An existing folder not written by a replay is refused
    unless ``overwrite=True``.

    ``model`` may also be a spec for :func:`pysafegeom.load_model` (``tokenizer`` then None; loaded with ``device`` /
    ``dtype``). ``ray``: with a spec, fan the generation out on Ray (``True``, an address or
    :class:`pysafegeom.scale.RayOptions`), one task per ``shard_size`` test cases (whole batches; default 4 batches);
    the folder and the results are those of a single-process run. ``judges`` may then be a callable
    ``(model, tokenizer) -> judges`` for judges that need the target. ``device_map`` / ``max_memory`` /
    ``offload_folder``: a spec loaded placed over several devices (as :func:`pysafegeom.load_model`).

    Returns the summary dict (what ``summary.json`` holds). Raises :class:`ReplayError` for no test cases,
    ``max_new_tokens < 1`` or a judge without a ``judge`` method.
    """
    from ..scale import ray_options

    ropts = ray_options(ray)
    from ..models.loading import placement_options

    placement = placement_options(device, device_map, max_memory, offload_folder, here=ropts is None)
    if placement and not isinstance(model, (str, os.PathLike)):
        raise ReplayError(f"{'/'.join(placement)}= place a model replay loads from a spec; this one is loaded already")
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise ReplayError("model is a spec: give tokenizer=None (the spec's own tokenizer is loaded)")
        if ropts is not None:
            return replay_ray(cases, str(model), out=out, ropts=ropts, judges=judges, max_new_tokens=max_new_tokens,
                              template=template, system=system, batch_size=batch_size, shard_size=shard_size,
                              target_name=target_name, resume=resume, progress=progress, overwrite=overwrite,
                              device=device, dtype=dtype, placement=placement)[0]
        from ..models import load_model

        model, tokenizer = load_model(str(model), dtype=dtype, device=device, **placement)
        if judges_need_target(judges):
            judges = judges(model, tokenizer)
    elif ropts is not None:
        raise ReplayError("ray= needs the target as a load_model spec (each task loads its own copy), not a loaded model")
    elif tokenizer is None:
        raise ReplayError("give the tokenizer of the loaded model (or the model as a spec)")
    return _run(cases, model, tokenizer, out=out, judges=judges, max_new_tokens=max_new_tokens, template=template,
                system=system, batch_size=batch_size, target_name=target_name, resume=resume, progress=progress,
                overwrite=overwrite)[0]


def read_results(out: str | os.PathLike) -> list[dict]:
    """The flat result rows (each with its behaviour ``id``) of a replay folder's ``results.json``."""
    p = Path(out) / "results.json"
    if not p.is_file():
        raise StoreError(f"{p} does not exist; run replay() into {Path(out)} first")
    d = json.loads(p.read_text(encoding="utf-8"))
    return [dict(row, id=bid) for bid, rows in d.items() for row in rows]


__all__ = ["ReplayError", "as_stores", "cache_key", "check_judges", "fmt_rate", "rate", "read_results", "replay",
           "summarise"]
