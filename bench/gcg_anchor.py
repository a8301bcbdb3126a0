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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "gcg_anchor"))
    ap.add_argument("--model", default="smollm2-135m-safety")
    args = ap.parse_args()
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
