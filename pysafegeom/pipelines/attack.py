"""Attack a set of behaviours with GCG, judge the outcome, and write HarmBench-format test cases.

:func:`attack_behaviors` runs one GCG per behaviour (or one universal suffix for all), resumably: each
behaviour's attack state lives in ``out/states/<id>/`` and is written every step; finished behaviours are
records in ``out/records.jsonl`` and are skipped on ``resume``. After each attack the attacked prompt is
greedily generated and judged (the package's :class:`~pysafegeom.behaviour.SubstringJudge` unless another
judge is given), next to the direct request (the instruction alone), so the attack success rate (ASR)
is reported beside the direct-request ASR, with Wilson intervals. Files: see
:mod:`pysafegeom.attacks.cases`, plus ``summary.json`` and ``loss_curves.svg``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from .. import validate as V
from .._io import atomic_write_text, check_output_path, json_safe, mark_dir, read_marker
from ..attacks import cases
from ..attacks.gcg import GCG, AttackError, GCGConfig, model_hash
from ..behaviour.diagnostics import wilson_interval
from ..data import Prompt
from ..errors import OutputExists

CONTENT = "gcg attack"


def _safe_id(s: str) -> str:
    """A folder name for behaviour id ``s``: its readable part and a hash of the whole id, so that ids
    that read alike ("q/1", "q_1") never share a state folder."""
    import hashlib

    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)[:80] or "behaviour"
    return f"{keep}-{hashlib.sha256(s.encode()).hexdigest()[:10]}"


def _generate(model, tokenizer, prompts: list[str], cfg: GCGConfig, max_new_tokens: int) -> list[str]:
    from ..generation import generate

    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, template=cfg.template,
                    system=cfg.system, progress=False)


def loss_curves_svg(records: list[dict], width: int = 640, height: int = 360) -> str:
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
           f"<text x='{L}' y='12'>GCG loss per step (log scale); green: judged success, grey: refused</text>",
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
    """ASR by judge and direct-request ASR, with 95% Wilson intervals, and time per behaviour."""
    n = len(records)
    if n == 0:
        return {"n": 0}
    k = sum(bool(r["success"]) for r in records)
    kd = sum(bool(r["direct_success"]) for r in records)
    walls = sorted(r["wall_seconds"] for r in records)
    steps = [len(r["losses"]) for r in records]
    return {
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


def attack_behaviors(model, tokenizer, behaviors: Sequence[Prompt], config: GCGConfig | None = None, *,
                     out: str | Path, universal: bool = False, resume: bool = False, overwrite: bool = False,
                     judge=None, max_new_tokens: int = 64, source: str | None = None, progress: bool = True) -> dict:
    """GCG against each behaviour (``meta["target"]`` is its target), judged; returns the summary.

    ``universal``: one suffix for all behaviours (summed loss; ``config.progressive`` adds them one at a
    time). ``source``: the model's name for the records (default: its class). ``judge``: any object with
    ``judge(prompts, responses)``; success is "not refused". ``max_new_tokens``: the judged generation.
    """
    from ..behaviour import SubstringJudge

    cfg = config or GCGConfig()
    if not isinstance(cfg, GCGConfig):
        raise AttackError(f"config must be a GCGConfig, got {type(cfg).__name__}")
    cfg.check()
    behaviors = list(behaviors)
    if not behaviors:
        raise AttackError("no behaviours to attack")
    for b in behaviors:
        if not isinstance(b, Prompt):
            raise AttackError(f"behaviours must be Prompt records (pysafegeom.data.load_behaviors), got {type(b).__name__}")
        if not b.meta.get("target"):
            raise AttackError(f"behaviour {b.id!r} has no target (meta['target'])")
    V.positive_int("max_new_tokens", max_new_tokens)
    ids = [b.id for b in behaviors]
    if len(set(ids)) != len(ids):
        raise AttackError("behaviour ids must be unique")
    groups = [behaviors] if universal else [[b] for b in behaviors]
    for g in groups:  # every prompt, target and suffix init checked before anything is written
        try:
            GCG.check_inputs(model, tokenizer, [b.text for b in g], [b.meta["target"] for b in g], cfg)
        except AttackError as exc:
            raise AttackError(f"behaviour {g[0].id!r}: {exc}" if len(g) == 1 else str(exc)) from exc
    out = check_output_path(out, overwrite, "dir", content=CONTENT)
    if (out / "run.json").exists() and not resume:
        if not overwrite:
            raise OutputExists(f"{out} holds an attack already: pass resume=True (--resume) to continue it or "
                               "overwrite=True (--overwrite) to start again")
        import shutil

        shutil.rmtree(out / "states", ignore_errors=True)
        for f in ("records.jsonl", "test_cases.json", "logs.json", "summary.json", "direct.json", "run.json"):
            (out / f).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    if read_marker(out) is None:
        mark_dir(out, CONTENT)
    judge = judge or SubstringJudge()
    source = source or type(model).__name__
    mhash = model_hash(model)
    run_info = {"method": "gcg", "source_model": source, "source_model_hash": mhash, "config": cfg.to_dict(),
                "universal": universal, "behaviors": ids, "judge": getattr(judge, "name", type(judge).__name__)}
    info_path = out / "run.json"
    if info_path.exists():
        old = json.loads(info_path.read_text())
        if resume and (old.get("behaviors") != ids or old.get("source_model_hash") != mhash
                       or {k: v for k, v in old.get("config", {}).items() if k != "progress"}
                       != {k: v for k, v in json_safe(cfg.to_dict()).items() if k != "progress"}):
            raise OutputExists(f"{out} holds an attack on other behaviours, another model or other options; "
                               "use another folder or overwrite=True")
    atomic_write_text(info_path, json.dumps(json_safe(run_info), indent=1) + "\n")

    records = cases.read_records(out / "records.jsonl") if resume else []
    done = {r["id"] for r in records}

    # the direct requests, once (kept for resume)
    direct_path = out / "direct.json"
    if resume and direct_path.exists():
        direct = json.loads(direct_path.read_text())
    else:
        texts = _generate(model, tokenizer, [b.text for b in behaviors], cfg, max_new_tokens)
        verdicts = judge.judge([b.text for b in behaviors], texts)
        direct = {b.id: {"completion": t, "success": not v.refused} for b, t, v in zip(behaviors, texts, verdicts)}
        atomic_write_text(direct_path, json.dumps(direct, indent=1, ensure_ascii=False) + "\n")

    from tqdm.auto import tqdm

    bar = tqdm(total=len(groups), desc="behaviours", unit="attack", disable=not progress)
    bar.update(sum(1 for g in groups if all(b.id in done for b in g)))
    for g in groups:
        if all(b.id in done for b in g):
            continue
        name = "universal" if universal else _safe_id(g[0].id)
        t0 = time.perf_counter()
        attack = GCG(model, tokenizer, [b.text for b in g], [b.meta["target"] for b in g], replace(cfg, progress=progress))
        state_dir = out / "states" / name
        res = attack.run(state_dir, resume=resume or state_dir.exists(), overwrite=False)
        wall = time.perf_counter() - t0 if res.resumed_from is None else float(sum(res.seconds_per_step))
        tcs = res.test_cases
        texts = _generate(model, tokenizer, tcs, cfg, max_new_tokens)
        verdicts = judge.judge([b.text for b in g], texts)
        from ..prompts import format_prompts

        for b, tc, text, v, p in zip(g, tcs, texts, verdicts, attack.prompts):
            fb = format_prompts(tokenizer, [tc], template=cfg.template, system=cfg.system)
            judged_ids = fb.input_ids[0][fb.attention_mask[0].bool()].tolist()
            records.append({
                "id": b.id, "method": "gcg", "source_model": source, "source_model_hash": mhash,
                "config": cfg.to_dict(), "instruction": b.text, "target": b.meta["target"], "suffix": res.best_string,
                "test_case": tc, "prompt": p.before_text + res.best_string + p.after_text, "losses": res.losses,
                "best_loss": res.best_loss, "seconds_per_step": res.seconds_per_step, "wall_seconds": wall,
                "stopped_early": res.stopped_early, "judge": run_info["judge"], "success": not v.refused,
                "judge_rule": v.rule, "completion": text, "direct_success": direct[b.id]["success"],
                "direct_completion": direct[b.id]["completion"], "category": b.category, "universal": universal,
                "judged_prompt_is_attacked_prompt": judged_ids == p.before_ids + res.best_ids + p.after_ids,
            })
        cases.write_all(out, records)
        summary = summarize(records)
        atomic_write_text(out / "summary.json", json.dumps(json_safe({**run_info, **summary}), indent=1) + "\n")
        atomic_write_text(out / "loss_curves.svg", loss_curves_svg(records))
        bar.update(1)
        bar.set_postfix(asr=f"{summary['asr']:.2f}", direct=f"{summary['direct_asr']:.2f}")
    bar.close()
    summary = summarize(records)
    atomic_write_text(out / "summary.json", json.dumps(json_safe({**run_info, **summary}), indent=1) + "\n")
    return {**run_info, **summary}
