"""AutoDAN-HGA against the shipped anchor (smollm2-135m-safety) on the 20 HarmBench test behaviours of
bench/gcg_anchor.py (the same seeded draw), so the two methods' test cases cover the same behaviours.

HarmBench's AutoDAN settings (population 64, 10% elites, crossover 0.5, 5 points, mutation 0.01, refusal
check every 5 generations) with HGA (iter 5), at most --steps generations (25 here: five refusal checks, to fit a 2-core session; HarmBench runs 100); the public AutoDAN initial
prompt and its 500 reference paraphrases (../shared/data/autodan, MIT); synonym mutation (shipped table +
embedding neighbours); judged by the substring judge on a 64-token greedy answer, beside the direct request.
Resumable: rerun the same command.

    python bench/autodan_anchor.py [--n 20] [--steps 100] [--threads 1] [--report]

Writes a test-case store into bench/autodan_anchor/ (records.jsonl, test_cases.json, logs.json,
summary.json, loss_curves.svg; states/ is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def report(out: pathlib.Path) -> int:
    from pysafegeom.attacks.store import TestCaseStore
    from pysafegeom.pipelines.attack import summarize

    recs = TestCaseStore(out).records()
    if not recs:
        print("no finished behaviours yet")
        return 1
    print("| behaviour | generations | best loss | s/step | wall s | AutoDAN success | direct success |")
    print("|---|---|---|---|---|---|---|")
    for r in recs:
        sps = sorted(r["seconds_per_step"])[len(r["seconds_per_step"]) // 2]
        print(f"| {r['id']} | {len(r['losses'])}{' (early stop)' if r['stopped_early'] else ''} | {r['best_loss']:.3f} | "
              f"{sps:.1f} | {r['wall_seconds']:.0f} | {'yes' if r['success'] else 'no'} | {'yes' if r['direct_success'] else 'no'} |")
    s = summarize(recs)
    print(f"\n{s['n']} behaviours: AutoDAN ASR {s['asr']:.2f} [{s['asr_ci95'][0]:.2f}, {s['asr_ci95'][1]:.2f}] vs direct "
          f"{s['direct_asr']:.2f} [{s['direct_asr_ci95'][0]:.2f}, {s['direct_asr_ci95'][1]:.2f}] ({s['judge']} judge); "
          f"median wall {s['median_wall_seconds']:.0f} s per behaviour; {s['stopped_early']} stopped early")
    return 0


def behaviours(n: int):
    from pysafegeom.data import load_behaviors

    hb = DATA / "harmbench"
    beh = load_behaviors(hb / "harmbench_behaviors_text_test.csv", hb / "harmbench_targets_text.json")
    return random.Random(0).sample(sorted(beh, key=lambda b: b.id), n)  # bench/gcg_anchor.py's draw


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "autodan_anchor"))
    ap.add_argument("--model", default="smollm2-135m-safety")
    ap.add_argument("--report", action="store_true", help="print the table of finished behaviours and exit")
    ap.add_argument("--slice", default=None, help="attack only behaviours[a:b] of the draw (a second process on "
                    "another core takes another slice into another --out; merge the stores afterwards)")
    args = ap.parse_args()
    if args.report:
        return report(pathlib.Path(args.out))
    torch.set_num_threads(args.threads)

    from pysafegeom.attacks import AutoDANConfig
    from pysafegeom.models import load_model
    from pysafegeom.pipelines.attack import attack_behaviors

    beh = behaviours(args.n)
    if args.slice:
        a, b = (int(x) if x else None for x in args.slice.split(":"))
        beh = beh[a:b]
    model, tok = load_model(args.model)
    ad = DATA / "autodan"
    cfg = AutoDANConfig(num_steps=args.steps, prototype=str(ad / "autodan_initial_prompt.txt"),
                        references=str(ad / "prompt_group_hp.json"), seed=0, progress=False)
    out = pathlib.Path(args.out)
    summary = attack_behaviors(model, tok, beh, cfg, out=out, resume=(out / "run.json").exists(),
                               source=args.model, progress=True)
    print(json.dumps({k: summary[k] for k in ("n", "asr", "asr_ci95", "direct_asr", "direct_asr_ci95",
                                              "median_wall_seconds", "median_steps")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
