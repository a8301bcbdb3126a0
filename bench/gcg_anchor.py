"""GCG against the shipped anchor (smollm2-135m-safety) on 20 HarmBench test-split behaviours.

HarmBench's own targets; width 64, top-k 64, 150 steps, a 20-token suffix, early stop on an exact greedy
match; judged by the package's substring judge on a 64-token greedy answer, beside the direct request.
Resumable: rerun the same command (it passes --resume semantics) and finished behaviours are skipped.

    python bench/gcg_anchor.py [--n 20] [--steps 150] [--width 64] [--threads 2]

Writes into bench/gcg_anchor/: test_cases.json, logs.json, records.jsonl, summary.json, loss_curves.svg
(kept in git: text only, the first fixed-source test-case set) and states/ (attack states, ignored).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "harmbench"


def report(out: pathlib.Path) -> int:
    """A markdown table of the finished behaviours and the ASR so far (no model needed)."""
    from pysafegeom.attacks import cases
    from pysafegeom.pipelines.attack import summarize

    recs = cases.read_records(out / "records.jsonl")
    if not recs:
        print("no finished behaviours yet")
        return 1
    print("| behaviour | steps | best loss | s/step | wall s | GCG success | direct success |")
    print("|---|---|---|---|---|---|---|")
    for r in recs:
        sps = sorted(r["seconds_per_step"])[len(r["seconds_per_step"]) // 2]
        print(f"| {r['id']} | {len(r['losses'])}{' (early stop)' if r['stopped_early'] else ''} | {r['best_loss']:.3f} | "
              f"{sps:.1f} | {r['wall_seconds']:.0f} | {'yes' if r['success'] else 'no'} | {'yes' if r['direct_success'] else 'no'} |")
    s = summarize(recs)
    print(f"\n{s['n']} behaviours: GCG ASR {s['asr']:.2f} [{s['asr_ci95'][0]:.2f}, {s['asr_ci95'][1]:.2f}] vs direct "
          f"{s['direct_asr']:.2f} [{s['direct_asr_ci95'][0]:.2f}, {s['direct_asr_ci95'][1]:.2f}] ({s['judge']} judge); "
          f"median wall {s['median_wall_seconds']:.0f} s per behaviour; {s['stopped_early']} stopped early")
    direct_path = out / "direct.json"
    if direct_path.exists():
        from pysafegeom.behaviour.diagnostics import wilson_interval

        d = json.loads(direct_path.read_text())
        k, n = sum(v["success"] for v in d.values()), len(d)
        lo, hi = wilson_interval(k, n)
        print(f"direct request over all {n} drawn behaviours: ASR {k / n:.2f} [{lo:.2f}, {hi:.2f}]")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "gcg_anchor"))
    ap.add_argument("--model", default="smollm2-135m-safety")
    ap.add_argument("--report", action="store_true", help="print the table of finished behaviours and exit")
    args = ap.parse_args()
    if args.report:
        return report(pathlib.Path(args.out))
    torch.set_num_threads(args.threads)

    from pysafegeom.attacks import GCGConfig
    from pysafegeom.data import load_behaviors
    from pysafegeom.models import load_model
    from pysafegeom.pipelines.attack import attack_behaviors

    beh = load_behaviors(DATA / "harmbench_behaviors_text_test.csv", DATA / "harmbench_targets_text.json")
    rng = random.Random(0)
    beh = rng.sample(sorted(beh, key=lambda b: b.id), args.n)  # a fixed, seeded draw of the test split
    model, tok = load_model(args.model)
    cfg = GCGConfig(num_steps=args.steps, search_width=args.width, topk=args.topk, early_stop=True, seed=0,
                    progress=False)
    out = pathlib.Path(args.out)
    summary = attack_behaviors(model, tok, beh, cfg, out=out, resume=(out / "run.json").exists(),
                               source=args.model, progress=True)
    print(json.dumps({k: summary[k] for k in ("n", "asr", "asr_ci95", "direct_asr", "direct_asr_ci95",
                                              "median_wall_seconds", "median_steps")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
