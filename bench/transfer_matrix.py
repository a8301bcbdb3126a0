"""The 3 x 3 transfer matrix: GCG, AutoDAN and direct-request test cases from the unaligned base, the shipped
anchor and one SFT checkpoint, each replayed on all three.

Models (names used as sources and targets):

* ``smollm2-135m-instruct``: the base the anchor was trained from (instruct-tuned, no safety adapter);
* ``smollm2-135m-safety``: the shipped anchor (run 2's checkpoint-50 of the safety SFT);
* ``sft-checkpoint-100``: run 2's checkpoint-100 (the same SFT run, twice the steps; ``runs/run2``, local).

Sources: the anchor's stores from bench/gcg_anchor.py (150 GCG steps, 20 behaviours) and
bench/autodan_anchor.py (AutoDAN-HGA, 20 behaviours); for the base and the checkpoint, sparse adaptive
attacks (``pysafegeom.pipelines.attack.adaptive``) on the first ``--subset`` behaviours of the same draw
with a smaller budget (GCG ``--gcg-steps`` steps, width 64, top-k 64, early stop; AutoDAN-HGA
``--autodan-steps`` generations, population 64); the direct requests of all 20 behaviours. Replay: greedy,
64 new tokens, judged by the substring judge (decides) and the local model judge (recorded).

    python bench/transfer_matrix.py --stage attack     # the adaptive attacks on base and checkpoint (resumable)
    python bench/transfer_matrix.py --stage transfer   # replay whatever stores are finished, write the matrix
    python bench/transfer_matrix.py --report           # print the matrix from bench/transfer/matrix/matrix.json

Writes bench/transfer/: adaptive/ and adaptive_ckpt/ (the attack stores), direct/ (the direct requests),
matrix/ (replay/<target>/, matrix.json, transfer.html, heatmap_*.svg).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
OUT = ROOT / "bench" / "transfer"
DATA = ROOT.parent / "shared" / "data"
MODELS = {"smollm2-135m-instruct": "smollm2-135m-instruct", "smollm2-135m-safety": "smollm2-135m-safety",
          "sft-checkpoint-100": str(ROOT / "runs" / "run2" / "checkpoint-100")}


def _load(name):
    from pysafegeom.models import load_model

    model, tok = load_model(MODELS[name])
    return name, model, tok


def stage_attack(args) -> None:
    from autodan_anchor import behaviours

    from pysafegeom.attacks import AutoDANConfig, GCGConfig
    from pysafegeom.pipelines.attack import adaptive

    beh = behaviours(20)[: args.subset]
    ad = DATA / "autodan"
    gcg = GCGConfig(num_steps=args.gcg_steps, search_width=64, topk=64, early_stop=True, seed=0, progress=False)
    autodan = AutoDANConfig(num_steps=args.autodan_steps, prototype=str(ad / "autodan_initial_prompt.txt"),
                            references=str(ad / "prompt_group_hp.json"), seed=0, progress=False)
    names = args.models.split(",")
    out = OUT / ("adaptive" if args.out_name is None else args.out_name)
    res = adaptive([_load(n) for n in names], beh, out=out, subset=args.subset, gcg=gcg, autodan=autodan,
                   resume=True, progress=True)
    print(json.dumps({name: {m: {k: s[k] for k in ("n", "asr", "asr_ci95", "direct_asr")} for m, s in r.items()}
                      for name, r in res.items()}, indent=1), flush=True)


def stage_transfer(args) -> None:
    from autodan_anchor import behaviours

    from pysafegeom.attacks.store import TestCaseStore, direct_records
    from pysafegeom.attacks.transfer import transfer
    from pysafegeom.behaviour.judge_spec import judges_from_specs

    direct = TestCaseStore(OUT / "direct")
    if len(direct) == 0:
        direct.add(direct_records(behaviours(20)))
    sources = [ROOT / "bench" / "gcg_anchor", ROOT / "bench" / "autodan_anchor", OUT / "direct"]
    sources += sorted(p for p in OUT.glob("adaptive*/*/*") if (p / "records.jsonl").is_file())
    sources = [p for p in sources if (p / "records.jsonl").is_file() and len(TestCaseStore(p)) > 0]
    print("sources:", *[str(p.relative_to(ROOT)) for p in sources], sep="\n  ", flush=True)

    def judges(model, tok):
        return judges_from_specs(["substring", "model"], model=model, tokenizer=tok)

    targets = [_load(n) for n in MODELS]
    m = transfer(sources, targets, out=OUT / "matrix", judges=judges, max_new_tokens=64, resume=True, progress=True)
    from pysafegeom.attacks.transfer import ALL, heatmap_svg

    for meth in [*m["methods"], ALL]:  # the report's pictures, one file each (transfer.html has them all)
        (OUT / "matrix" / f"heatmap_{meth.replace(':', '_')}.svg").write_text(heatmap_svg(m, meth), encoding="utf-8")
    report_matrix(m)


def report_matrix(m: dict) -> None:
    from pysafegeom.attacks.transfer import ALL, matrix_text

    for meth in [*m["methods"], ALL]:
        print(f"\n{'all methods' if meth == ALL else meth}:")
        print(matrix_text(m, meth))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=["attack", "transfer", "all"], default="all")
    ap.add_argument("--subset", type=int, default=6)
    ap.add_argument("--gcg-steps", type=int, default=30)
    ap.add_argument("--autodan-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="smollm2-135m-instruct,sft-checkpoint-100",
                    help="the adaptive stage's models (names of MODELS), comma-separated")
    ap.add_argument("--out-name", default=None, help="the adaptive stage's folder under bench/transfer (default adaptive)")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        report_matrix(json.loads((OUT / "matrix" / "matrix.json").read_text()))
        return 0
    torch.set_num_threads(args.threads)
    if args.stage in ("attack", "all"):
        stage_attack(args)
    if args.stage in ("transfer", "all"):
        stage_transfer(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
