"""The demo: the full protocol on the unaligned base and the shipped aligned anchor, one side-by-side report.

Carriers are fitted on the bundled train splits, candidates selected on val, and behaviour judged on the
held-out test splits; the shipped anchor records the prompts it was trained on (a pool of its own that no
analysis split shares), and :func:`pysafegeom.analyze` refuses to fit or judge on any of them. Each
model's result is saved as it finishes (``OUT/base``, ``OUT/anchor``); a rerun with the same options
reuses a finished one, and an interrupted one resumes at the stage it reached.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def selection_line(res) -> str:
    """'layer 18, eoi-1 (calibrated KL rule); admissible: 3 at KL <= 0.1, 7 at the calibrated 0.14' for one result."""
    sel = res.selection
    fixed = getattr(sel, "n_admissible_fixed", None)
    cal = getattr(sel, "n_admissible_calibrated", None)
    tau = getattr(sel, "tau_cal", None)
    counts = []
    if fixed is not None:
        counts.append(f"{fixed} at Arditi's fixed KL <= {sel.kl_threshold}")
    if cal is not None and tau is not None:
        counts.append(f"{cal} at the calibrated KL <= {tau:.3f}")
    unf, filt = getattr(sel, "n_admissible_unfiltered", None), getattr(sel, "n_admissible_filtered", None)
    if unf and filt:
        counts.append(f"before / after behaviour-filtering the validation sets: fixed {unf.get('fixed')} / {filt.get('fixed')}, "
                      f"calibrated {unf.get('calibrated')} / {filt.get('calibrated')}")
    where = (f"layer {sel.layer}, {sel.position} ({getattr(sel, 'rule', None) or sel.outcome} rule)"
             if sel.layer is not None else "none admissible")
    return f"selected carrier: {where}; admissible candidates: " + ("; ".join(counts) or str(sel.n_admissible))


def run_demo(base: str, anchor: str, out: str | Path, opts: dict, *, fresh: bool = False, progress: bool = True,
             overwrite: bool = False, echo=print) -> dict:
    """Analyse ``base`` and ``anchor`` with ``opts`` (analyze options), write ``out/{base,anchor}`` and
    ``out/report.html``; return ``{"results": {...}, "findings": [...], "seconds": s}``."""
    from .._io import atomic_write_text
    from ..report import render_comparison
    from .analyze import analyze, anchor_findings, load_result, stages_folder

    t_all = time.perf_counter()
    out = Path(out)
    results = {}
    for label, spec in (("base", base), ("anchor", anchor)):
        sub = out / label
        done = sub / "result.json"
        if done.is_file() and not fresh:  # a finished model is not redone with the same options
            prev = json.loads(done.read_text())
            if prev["meta"]["model"] == spec and all(prev["config"].get(k) == v for k, v in opts.items()):
                echo(f"\n{label}: reusing the finished result in {sub} (--fresh to redo)")
                results[label] = load_result(sub)
                continue
        echo(f"\n[{label}] running the full protocol on {spec}: carriers on the bundled train splits, selection on val "
             f"(every {opts.get('selection_layer_stride', 1)}. layer, {opts.get('n_val')} prompts per side), coupling"
             + (f", reopen table on the test splits with {opts.get('n_controls')} matched controls and the four "
                "behavioural diagnostics" if opts.get("interventions") else "") + " ...")
        resume = not fresh and stages_folder(sub).exists()  # an interrupted run of this model left its stages
        res = analyze(spec, out=sub, resume=resume, overwrite=overwrite, progress=progress, **opts)
        results[label] = res
        echo("\n".join("  " + line for line in res.metrics["summary"]))
    findings = [f"{label}: {selection_line(r)}." for label, r in results.items()]
    findings += anchor_findings(results["anchor"], results["base"])
    atomic_write_text(out / "report.html", render_comparison({f"{k}: {r.meta['model']}": r for k, r in results.items()},
                                                             findings, "pysafegeom demo: unaligned base vs aligned anchor"))
    return {"results": results, "findings": findings, "seconds": time.perf_counter() - t_all}
