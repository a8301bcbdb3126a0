"""Attack a set of behaviours with GCG or AutoDAN, judge the outcome, and keep the test cases in a store.

:func:`attack_behaviors` runs one attack per behaviour (GCG also: one universal suffix for all),
resumably: each behaviour's attack state lives in ``out/states/<id>/`` and is written every step;
finished behaviours are records of the test-case store ``out`` (:class:`pysafegeom.attacks.store.TestCaseStore`:
``records.jsonl``, HarmBench's ``test_cases.json`` and ``logs.json``) and are skipped on ``resume``. After
each attack the test case is greedily answered and judged by every judge (the first decides; default the
package's :class:`~pysafegeom.behaviour.SubstringJudge`), next to the direct request (the instruction
alone), so the attack success rate (ASR) is reported beside the direct-request ASR, with Wilson
intervals, in ``summary.json``; ``loss_curves.svg`` draws the losses. :func:`adaptive` runs GCG and
AutoDAN against each of several models on the same behaviour subset (the sparse adaptive attacks).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from .. import validate as V
from .._io import atomic_write_text, check_output_path, json_safe, mark_dir, read_marker
from ..attacks.autodan import AutoDAN, AutoDANConfig
from ..attacks.gcg import GCG, AttackError, GCGConfig, model_hash
from ..attacks.store import TestCaseStore, tokenizer_hash
from ..behaviour.diagnostics import wilson_interval
from ..data import Prompt
from ..errors import OutputExists

CONTENT = "gcg attack"  # the folder marker (kept for folders earlier versions wrote)
# options that change how an attack runs (its bar, how candidates are batched and on which devices), never its result:
# a run resumes across them
HOW_ONLY = ("progress", "batch_size", "devices")
METHODS = ("gcg", "autodan")


def _safe_id(s: str) -> str:
    """A folder name for behaviour id ``s``: its readable part and a hash of the whole id, so that ids
    that read alike ("q/1", "q_1") never share a state folder."""
    import hashlib

    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)[:80] or "behaviour"
    return f"{keep}-{hashlib.sha256(s.encode()).hexdigest()[:10]}"


def _generate(model, tokenizer, prompts: list[str], cfg, max_new_tokens: int) -> list[str]:
    from ..generation import generate

    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, template=cfg.template,
                    system=cfg.system, progress=False)


def loss_curves_svg(records: list[dict], width: int = 640, height: int = 360, title: str = "attack") -> str:
    """An SVG of each behaviour's loss per step (log scale), successes in one colour, failures in another."""
    series = [(r["id"], r["losses"], bool(r.get("success"))) for r in records if r.get("losses")]
    if not series:
        return "<svg xmlns='http://www.w3.org/2000/svg'/>\n"
    import math

    n = max(len(s[1]) for s in series)
    vals = [v for s in series for v in s[1] if v > 0]
    lo, hi = math.log10(min(vals)), math.log10(max(vals))
    hi = hi if hi > lo else lo + 1
    L, R, T, B = 56, 12, 16, 40

    def xy(i, v):
        x = L + (width - L - R) * (i / max(1, n - 1))
        y = T + (height - T - B) * (1 - (math.log10(max(v, 1e-12)) - lo) / (hi - lo))
        return f"{x:.1f},{y:.1f}"

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-family='sans-serif' font-size='11'>",
           f"<rect width='{width}' height='{height}' fill='white'/>",
           f"<text x='{L}' y='12'>{title} loss per step (log scale); green: judged success, grey: refused</text>",
           f"<text x='{width // 2}' y='{height - 8}'>step</text>"]
    for k in range(int(math.floor(lo)), int(math.ceil(hi)) + 1):
        y = T + (height - T - B) * (1 - (k - lo) / (hi - lo))
        if T <= y <= height - B:
            out.append(f"<line x1='{L}' x2='{width - R}' y1='{y:.1f}' y2='{y:.1f}' stroke='#ddd'/>"
                       f"<text x='4' y='{y + 4:.1f}'>1e{k}</text>")
    for bid, ls, ok in series:
        pts = " ".join(xy(i, v) for i, v in enumerate(ls))
        out.append(f"<polyline fill='none' stroke='{'#2a9d4b' if ok else '#999'}' stroke-width='1.2' points='{pts}'>"
                   f"<title>{bid}</title></polyline>")
    out.append("</svg>\n")
    return "\n".join(out)


def summarize(records: list[dict]) -> dict:
    """ASR by the deciding judge and direct-request ASR, with 95% Wilson intervals, and time per behaviour."""
    n = len(records)
    if n == 0:
        return {"n": 0}
    k = sum(bool(r["success"]) for r in records)
    kd = sum(bool(r["direct_success"]) for r in records)
    walls = sorted(r["wall_seconds"] for r in records)
    steps = [len(r["losses"]) for r in records]
    out = {
        "n": n,
        "judge": records[0].get("judge"),
        "asr": k / n, "asr_ci95": wilson_interval(k, n),
        "direct_asr": kd / n, "direct_asr_ci95": wilson_interval(kd, n),
        "successes": k, "direct_successes": kd,
        "stopped_early": sum(bool(r["stopped_early"]) for r in records),
        "median_best_loss": sorted(r["best_loss"] for r in records)[n // 2],
        "median_wall_seconds": walls[n // 2],
        "total_wall_seconds": sum(walls),
        "median_steps": sorted(steps)[n // 2],
    }
    names = [j for j in (records[0].get("judges") or {})]
    if len(names) > 1:  # every judge's ASR, not only the deciding one's
        out["asr_by_judge"] = {}
        for j in names:
            kj = sum(bool(r["judges"][j]["success"]) for r in records if j in (r.get("judges") or {}))
            out["asr_by_judge"][j] = {"asr": kj / n, "asr_ci95": wilson_interval(kj, n), "successes": kj}
    return out


def _judge_name(j) -> str:
    return getattr(j, "name", type(j).__name__)


def _judge_all(judges, prompts: list[str], texts: list[str]) -> list[dict]:
    """Per answer: ``{judge name: {"success", "rule"}}`` for every judge (names made unique)."""
    names = [_judge_name(j) for j in judges]
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    per = [j.judge(prompts, texts) for j in judges]
    return [{n: {"success": not v[i].refused, "rule": v[i].rule} for n, v in zip(names, per)} for i in range(len(texts))]


def _check_behaviors(behaviors) -> list[Prompt]:
    behaviors = list(behaviors)
    if not behaviors:
        raise AttackError("no behaviours to attack")
    for b in behaviors:
        if not isinstance(b, Prompt):
            raise AttackError(f"behaviours must be Prompt records (pysafegeom.data.load_behaviors), got {type(b).__name__}")
        if not b.meta.get("target"):
            raise AttackError(f"behaviour {b.id!r} has no target (meta['target'])")
    ids = [b.id for b in behaviors]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise AttackError(f"behaviour ids must be unique; {dup!r} appears more than once")
    return behaviors


def attack_behaviors(model, tokenizer, behaviors: Sequence[Prompt], config: GCGConfig | AutoDANConfig | None = None, *,
                     out: str | Path, universal: bool = False, resume: bool = False, overwrite: bool = False,
                     judge=None, judges=None, max_new_tokens: int = 64, source: str | None = None,
                     progress: bool = True, mutator=None, also_store: str | Path | None = None) -> dict:
    """GCG or AutoDAN (by the type of ``config``; default GCG) against each behaviour (``meta["target"]`` is
    its target), judged; returns the summary.

    ``universal`` (GCG only): one suffix for all behaviours (summed loss; ``config.progressive`` adds them
    one at a time). ``source``: the model's name for the records (default: its class). ``judges``: a list
    of objects with ``judge(prompts, responses)``, the first deciding success ("not refused"); ``judge``:
    one judge (the older keyword). ``max_new_tokens``: the judged generation. ``mutator``: AutoDAN's
    rewrite model as a loaded ``(model, tokenizer)`` pair (else ``config.mutator``). ``also_store``: a
    second test-case store folder every finished behaviour's records are added to as well (one store
    holding several methods' cases, as :func:`adaptive` keeps per model).
    """
    from ..behaviour import SubstringJudge

    cfg = config if config is not None else GCGConfig()
    if not isinstance(cfg, (GCGConfig, AutoDANConfig)):
        raise AttackError(f"config must be a GCGConfig or an AutoDANConfig, got {type(cfg).__name__}")
    method = "gcg" if isinstance(cfg, GCGConfig) else "autodan"
    cfg.check()
    if universal and method != "gcg":
        raise AttackError("universal=True is a GCG mode; AutoDAN attacks one behaviour at a time")
    behaviors = _check_behaviors(behaviors)
    V.positive_int("max_new_tokens", max_new_tokens)
    if judge is not None and judges is not None:
        raise AttackError("pass judge= or judges=, not both")
    judges = [judge] if judge is not None else list(judges) if judges is not None else [SubstringJudge()]
    if not judges:
        raise AttackError("judges is empty: give at least one judge (e.g. [SubstringJudge()])")
    for j in judges:
        if not hasattr(j, "judge"):
            raise AttackError(f"{j!r} is not a judge (it has no judge(prompts, responses) method)")
    ids = [b.id for b in behaviors]
    groups = [behaviors] if universal else [[b] for b in behaviors]
    for g in groups:  # every prompt, target and option checked before anything is written
        try:
            if method == "gcg":
                GCG.check_inputs(model, tokenizer, [b.text for b in g], [b.meta["target"] for b in g], cfg)
            else:
                AutoDAN.check_inputs(model, tokenizer, g[0].text, g[0].meta["target"], cfg)
        except AttackError as exc:
            raise AttackError(f"behaviour {g[0].id!r}: {exc}" if len(g) == 1 else str(exc)) from exc
    out = check_output_path(out, overwrite, "dir", content=CONTENT)
    if (out / "run.json").exists() and not resume:
        if not overwrite:
            raise OutputExists(f"{out} holds an attack already: pass resume=True (--resume) to continue it or "
                               "overwrite=True (--overwrite) to start again")
        import shutil

        shutil.rmtree(out / "states", ignore_errors=True)
        for f in ("records.jsonl", "test_cases.json", "logs.json", "store.json", "summary.json", "direct.json",
                  "run.json", "loss_curves.svg"):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if read_marker(out) is None:
        mark_dir(out, CONTENT)
    source = source or type(model).__name__
    mhash = model_hash(model)
    jname = _judge_name(judges[0])
    run_info = {"method": method, "source_model": source, "source_model_hash": mhash, "config": cfg.to_dict(),
                "universal": universal, "behaviors": ids, "judge": jname, "judges": [_judge_name(j) for j in judges],
                "max_new_tokens": max_new_tokens}
    info_path = out / "run.json"
    if info_path.exists():
        old = json.loads(info_path.read_text())
        if resume and (old.get("behaviors") != ids or old.get("source_model_hash") != mhash
                       or old.get("method", "gcg") != method
                       or {k: v for k, v in old.get("config", {}).items() if k not in HOW_ONLY}
                       != {k: v for k, v in json_safe(cfg.to_dict()).items() if k not in HOW_ONLY}):
            raise OutputExists(f"{out} holds an attack on other behaviours, another model, another method or other options; "
                               "use another folder or overwrite=True")
    atomic_write_text(info_path, json.dumps(json_safe(run_info), indent=1) + "\n")

    store = TestCaseStore(out)
    records = [r for r in store.records() if r["method"] == method] if resume else []
    done = {r["id"] for r in records}
    thash = tokenizer_hash(tokenizer)

    # the direct requests, once (kept for resume)
    direct_path = out / "direct.json"
    if resume and direct_path.exists():
        direct = json.loads(direct_path.read_text())
    else:
        texts = _generate(model, tokenizer, [b.text for b in behaviors], cfg, max_new_tokens)
        verdicts = _judge_all(judges, [b.text for b in behaviors], texts)
        direct = {b.id: {"completion": t, "success": v[jname if jname in v else next(iter(v))]["success"], "judges": v}
                  for b, t, v in zip(behaviors, texts, verdicts)}
        atomic_write_text(direct_path, json.dumps(direct, indent=1, ensure_ascii=False) + "\n")

    from tqdm.auto import tqdm

    bar = tqdm(total=len(groups), desc=f"{method}: behaviours", unit="attack", disable=not progress)
    bar.update(sum(1 for g in groups if all(b.id in done for b in g)))
    title = "GCG" if method == "gcg" else "AutoDAN"
    for g in groups:
        if all(b.id in done for b in g):
            continue
        name = "universal" if universal else _safe_id(g[0].id)
        state_dir = out / "states" / name
        t0 = time.perf_counter()
        if method == "gcg":
            new = _attack_gcg(model, tokenizer, g, cfg, state_dir, resume, progress)
        else:
            new = _attack_autodan(model, tokenizer, g[0], cfg, state_dir, resume, progress, mutator)
        for r in new:
            if r["wall_seconds"] is None:
                r["wall_seconds"] = time.perf_counter() - t0
        tcs = [r["test_case"] for r in new]
        texts = _generate(model, tokenizer, tcs, cfg, max_new_tokens)
        verdicts = _judge_all(judges, [b.text for b in g], texts)
        for b, r, text, v in zip(g, new, texts, verdicts):
            first = next(iter(v))
            r.update({"id": b.id, "behavior": b.text, "instruction": b.text, "method": method, "source_model": source,
                      "source_model_hash": mhash, "tokenizer_hash": thash, "config": cfg.to_dict(),
                      "target": b.meta["target"], "judge": jname, "judges": v, "decided_by": jname,
                      "success": v[first]["success"], "judge_rule": v[first]["rule"], "completion": text,
                      "direct_success": direct[b.id]["success"], "direct_completion": direct[b.id]["completion"],
                      "category": b.category, "universal": universal, "max_new_tokens": max_new_tokens})
        records = [r for r in records if r["id"] not in {b.id for b in g}] + new
        store.add(new)
        if also_store is not None:
            TestCaseStore(also_store).add(new)
        summary = summarize(records)
        atomic_write_text(out / "summary.json", json.dumps(json_safe({**run_info, **summary}), indent=1) + "\n")
        atomic_write_text(out / "loss_curves.svg", loss_curves_svg(records, title=title))
        bar.update(1)
        bar.set_postfix(asr=f"{summary['asr']:.2f}", direct=f"{summary['direct_asr']:.2f}")
    bar.close()
    summary = summarize(records)
    atomic_write_text(out / "summary.json", json.dumps(json_safe({**run_info, **summary}), indent=1) + "\n")
    return {**run_info, **summary}


def _attack_gcg(model, tokenizer, g: list[Prompt], cfg: GCGConfig, state_dir: Path, resume: bool, progress: bool) -> list[dict]:
    from ..prompts import format_prompts

    attack = GCG(model, tokenizer, [b.text for b in g], [b.meta["target"] for b in g], replace(cfg, progress=progress))
    res = attack.run(state_dir, resume=resume or state_dir.exists(), overwrite=False)
    wall = None if res.resumed_from is None else float(sum(res.seconds_per_step))
    out = []
    for tc, p in zip(res.test_cases, attack.prompts):
        fb = format_prompts(tokenizer, [tc], template=cfg.template, system=cfg.system)
        judged_ids = fb.input_ids[0][fb.attention_mask[0].bool()].tolist()
        out.append({"suffix": res.best_string, "suffix_ids": list(res.best_ids), "test_case": tc,
                    "prompt": p.before_text + res.best_string + p.after_text, "losses": res.losses,
                    "best_loss": res.best_loss, "seconds_per_step": res.seconds_per_step, "wall_seconds": wall,
                    "stopped_early": res.stopped_early,
                    "judged_prompt_is_attacked_prompt": judged_ids == p.before_ids + res.best_ids + p.after_ids})
    return out


def _attack_autodan(model, tokenizer, b: Prompt, cfg: AutoDANConfig, state_dir: Path, resume: bool, progress: bool,
                    mutator) -> list[dict]:
    attack = AutoDAN(model, tokenizer, b.text, b.meta["target"], replace(cfg, progress=progress), mutator=mutator)
    res = attack.run(state_dir, resume=resume or state_dir.exists(), overwrite=False)
    wall = None if res.resumed_from is None else float(sum(res.seconds_per_step))
    return [{"template": res.best_template, "test_case": res.best_test_case, "losses": res.losses,
             "best_loss": res.best_loss, "seconds_per_step": res.seconds_per_step, "wall_seconds": wall,
             "stopped_early": res.stopped_early, "success_step": res.success_step,
             "check_completion": res.check_completion, "n_scored": res.n_scored}]


def draw_subset(behaviors: Sequence[Prompt], subset: int, seed: int = 0) -> list[Prompt]:
    """The sparse adaptive attacks' behaviours: ``subset`` of them drawn with ``seed`` (all when there are no more), in
    their given order. :func:`adaptive` and :func:`pysafegeom.trajectory` draw alike, so one seed names one subset."""
    import random

    pick = list(behaviors)
    if subset < len(pick):
        pick = sorted(random.Random(seed).sample(pick, subset), key=lambda b: behaviors.index(b))
    return pick


def _method_config(m: str, gcg: GCGConfig | None, autodan: AutoDANConfig | None):
    return (gcg or GCGConfig()) if m == "gcg" else (autodan or AutoDANConfig())


def _adaptive_model(spec, name: str, folder: str, pick: list[Prompt], methods: list[str], out: Path, *, gcg, autodan,
                    judges, max_new_tokens: int, resume: bool, overwrite: bool, progress: bool, load=None) -> dict:
    """Every method against one model (a spec loaded here, or a ``(name, model, tokenizer)`` triple): one
    :func:`attack_behaviors` run per method into ``out/<folder>/<method>/`` and the model's store ``out/<folder>/``."""
    if isinstance(spec, str):
        if load is None:
            from ..models import load_model as load
        model, tok = load(spec)
    else:
        _, model, tok = spec
    from ..attacks.replay import judges_need_target

    js = judges(model, tok) if judges_need_target(judges) else judges
    res = {}
    for m in methods:
        d = out / folder / m
        res[m] = attack_behaviors(model, tok, pick, _method_config(m, gcg, autodan), out=d, judges=js,
                                  max_new_tokens=max_new_tokens, source=str(name), resume=resume and d.exists(),
                                  overwrite=overwrite, progress=progress, also_store=out / folder)
        done = TestCaseStore(d).records()  # a resumed run's earlier behaviours too
        if done:
            TestCaseStore(out / folder).add(done)
    return res


def _attack_chunk(spec: str, method: str, chunk: list[Prompt], run_dir: str, cfg, load=None) -> list[str]:
    """One Ray task of :func:`adaptive`: the attacks (the optimisation only) of ``chunk`` against one model, each in
    its resumable state folder ``run_dir/states/<id>/``, exactly where :func:`attack_behaviors` keeps it; the judged
    answers and the records are made afterwards, per model, from the finished states."""
    if load is None:
        from ..models import load_model as load
    model, tok = load(spec)
    for b in chunk:
        state_dir = Path(run_dir) / "states" / _safe_id(b.id)
        if method == "gcg":
            _attack_gcg(model, tok, [b], cfg, state_dir, True, False)
        else:
            _attack_autodan(model, tok, b, cfg, state_dir, True, False, None)
    return [b.id for b in chunk]


def attack_units(key: str, spec: str, method: str, behaviors: list[Prompt], run_dir: Path, cfg, chunk: int,
                 load=None) -> list[tuple[str, dict]]:
    """The Ray units of the attacks of ``behaviors`` against one model into the :func:`attack_behaviors` folder
    ``run_dir`` (marked, created): one per ``chunk`` behaviours not yet in its store, for :func:`_attack_chunk`."""
    run_dir = check_output_path(run_dir, False, "dir", content=CONTENT)  # the run folder the tasks write states into
    run_dir.mkdir(parents=True, exist_ok=True)
    if read_marker(run_dir) is None:
        mark_dir(run_dir, CONTENT)
    done = {r["id"] for r in TestCaseStore(run_dir).records()} if (run_dir / "records.jsonl").is_file() else set()
    todo = [b for b in behaviors if b.id not in done]
    return [(f"{key}/{method}/{todo[i].id}", {"spec": spec, "method": method, "chunk": todo[i:i + chunk],
                                              "run_dir": str(run_dir), "cfg": cfg, "load": load})
            for i in range(0, len(todo), chunk)]


def _adaptive_ray(models: list, names: list, safe: list, pick: list[Prompt], methods: list[str], out: Path, ropts, *,
                  gcg, autodan, judges, max_new_tokens: int, resume: bool, overwrite: bool, progress: bool,
                  load) -> dict:
    """:func:`adaptive` on Ray: one task per (model, method, chunk of behaviours) runs the attacks into their state
    folders, then one task per model judges them (its store, summaries and answers, as in a single process)."""
    import shutil

    from ..scale import progress_bar, run_units, session

    if not all(isinstance(m, str) for m in models):
        raise AttackError("with ray=, give the models as load_model specs (each task loads its own copy), "
                          "not (name, model, tokenizer) triples")
    units = []
    for spec, folder in zip(models, safe):
        for m in methods:
            d = out / folder / m
            if overwrite and not resume and d.exists():
                shutil.rmtree(d)  # what attack_behaviors(overwrite=True) would clear, cleared once before the tasks
            units += attack_units(folder, spec, m, pick, d, _method_config(m, gcg, autodan), ropts.chunk, load)
    judged = [(name, {"spec": spec, "name": name, "folder": folder, "pick": pick, "methods": methods, "out": out,
                      "gcg": gcg, "autodan": autodan, "judges": judges, "max_new_tokens": max_new_tokens,
                      "resume": True, "overwrite": False, "progress": False, "load": load})
              for spec, name, folder in zip(models, names, safe)]
    with session(ropts), progress_bar(len(units) + len(judged), "adaptive: attacks, judging", progress) as bar:
        run_units(units, _attack_chunk, ropts, desc="adaptive attacks", bar=bar)
        done = run_units(judged, _adaptive_model, ropts, desc="adaptive judging", bar=bar)
    return {name: done[name]["result"] for name in names}


def adaptive(models: Sequence, behaviors: Sequence[Prompt], *, out: str | Path, subset: int = 20,
             methods: Sequence[str] = METHODS, gcg: GCGConfig | None = None, autodan: AutoDANConfig | None = None,
             judges=None, max_new_tokens: int = 64, seed: int = 0, resume: bool = True, overwrite: bool = False,
             progress: bool = True, load=None, ray=None) -> dict:
    """Sparse adaptive attacks: each method optimised against each model on the same ``subset`` behaviours.

    ``models``: load_model specs (loaded one at a time) or ``(name, model, tokenizer)`` triples. The subset
    is drawn once with ``seed`` (all behaviours when ``subset`` >= their number) and written to
    ``out/subset.json``. Each model gets one test-case store holding every method's cases,
    ``out/<model name>/`` (``records.jsonl``, ``test_cases.json``...), and one :func:`attack_behaviors` run
    folder per method, ``out/<model name>/<method>/`` (its run, summary, states and its own store),
    resumable per (model, behaviour). ``judges``: a list, or a callable ``(model, tokenizer) -> list`` for
    judges that use each attacked model (the local model judge). Returns ``{model: {method: summary}}``.

    ``ray``: fan out on Ray (``True``, an address or :class:`pysafegeom.scale.RayOptions`): one task per (model,
    method, ``RayOptions.chunk`` behaviours) runs the attacks into the same state folders, then one task per model
    writes what a single process writes; the models must then be specs. ``load``, when given with ``ray``, must be
    picklable for the workers (a module-level function, or a closure over picklable values).
    """
    from ..scale import ray_options

    ropts = ray_options(ray)

    behaviors = _check_behaviors(behaviors)
    V.positive_int("subset", subset)
    methods = list(methods)
    if not methods or any(m not in METHODS for m in methods):
        raise AttackError(f"methods must be some of {', '.join(METHODS)}, got {methods}")
    models = list(models)
    if not models:
        raise AttackError("no models given")
    names = [m if isinstance(m, str) else m[0] for m in models]
    safe = [_safe_id(str(n)) for n in names]
    if len(set(safe)) != len(safe):
        raise AttackError("two models have the same name; give (name, model, tokenizer) triples with distinct names")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sub_path = out / "subset.json"
    if sub_path.exists() and resume:
        chosen = json.loads(sub_path.read_text())["behaviors"]
        by_id = {b.id: b for b in behaviors}
        missing = [i for i in chosen if i not in by_id]
        if missing:
            raise AttackError(f"{sub_path} names behaviours not in the given set ({missing[:3]}); use another --out")
        pick = [by_id[i] for i in chosen]
    else:
        pick = draw_subset(behaviors, subset, seed)
        atomic_write_text(sub_path, json.dumps({"seed": seed, "subset": subset, "behaviors": [b.id for b in pick]},
                                               indent=1) + "\n")
    kw = dict(gcg=gcg, autodan=autodan, judges=judges, max_new_tokens=max_new_tokens, resume=resume,
              overwrite=overwrite, progress=progress, load=load)
    if ropts is not None:
        results = _adaptive_ray(models, names, safe, pick, methods, out, ropts, **kw)
    else:
        results = {name: _adaptive_model(spec, name, folder, pick, methods, out, **kw)
                   for spec, name, folder in zip(models, names, safe)}
    atomic_write_text(out / "adaptive.json", json.dumps(json_safe(results), indent=1) + "\n")
    return results
