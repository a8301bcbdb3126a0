"""A trajectory's cost: ``pysafegeom.trajectory`` against the same measurements made anchor by anchor.

Anchors: checkpoints of the miniature runs (``trajectories/runs/``, rebuilt by ``make trajectories``), by
default steps 0 and 10 of the R2D2 run and of the SFT control (4 anchors; both runs start from one base, so
their step 0 is one model). Every path measures each anchor with the same settings (``--quick``: the cheaper
per-anchor setting stated below) and the same prompt sets and test cases:

* **ours**: ``pysafegeom.trajectory(runs, cases=...)``: one loaded base with adapters swapped, prompt lists
  tokenised once, an anchor with the weights of one already measured copied, analysis, behaviour and replay on
  the loaded model.
* **separate**: per anchor ``pysafegeom.analyze(spec)`` (its own load), then ``load_model(spec)`` and the same
  behaviour measurement (``pipelines.trajectory.measure_behaviour``) and ``replay(cases, model)``: the numbers
  ours gives, by separate calls.
* **before**: *separate* with this issue's two speed-ups switched off (selection runs every prompt row in
  full instead of broadcasting the template prefix's KV cache; generation decodes finished rows until their
  batch ends): what the package cost before.
* **analyze+replay**: per anchor ``analyze(spec, interventions=True)`` (the reopen table: baseline, R, H and
  span ablated, random controls, on the harmful, XSTest and benign prompts) plus ``replay(cases, spec)``:
  how a user got per-anchor ASR, XSTest and utility from the measurement core without trajectory(). It
  measures more than ours (the ablated conditions), which is why it costs more; the issue's target is
  ours <= 0.6x this.

No peer measures checkpoints (../shared/research/PEERS.md), so there is no peer column.

    python bench/trajectory.py [--quick] [--paths ours,separate,before,analyze] [--threads 2] [--synthetic DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUICK = dict(n_val=16, selection_layer_stride=3, n_kl_controls=8, n_behaviour=16, max_new_tokens=32,
             replay_max_new_tokens=32, batch_size=16)
FULL = dict(max_new_tokens=48, replay_max_new_tokens=64, batch_size=16)
ANALYSIS_KEYS = ("n_val", "selection_layer_stride", "n_kl_controls")


def synthetic(folder: Path, model: str, device=None) -> list[str]:
    """Two quick LoRA SFT runs of ``model`` (seeds 0 and 1, checkpoints 0, 2 and 4) on 8 of trajectories/clean.jsonl's
    examples, for a machine without the miniature runs (a fresh clone, the GPU check); returns --run arguments."""
    from pysafegeom.train import TrainConfig, run
    from pysafegeom.train.r2d2 import read_chat_examples

    examples = read_chat_examples(ROOT / "trajectories" / "clean.jsonl")[:8]
    out = []
    for name, seed in (("a", 0), ("b", 1)):
        d = folder / name
        if not (d / "checkpoint-4").is_dir():
            run(model, None, examples, TrainConfig(steps=4, batch_size=2, lr=1e-3, warmup_steps=0, max_len=192, seed=seed,
                                                   save_at=(0, 2, 4)), d, progress=False, device=device)
        out.append(f"{name}={d}")
    return out


def anchors(args) -> dict[str, list[tuple[int, str]]]:
    runs = {}
    for text in args.run:
        name, _, folder = text.partition("=")
        runs[name] = [(s, str(Path(folder) / f"checkpoint-{s}")) for s in args.steps]
        missing = [p for _, p in runs[name] if not Path(p).is_dir()]
        if missing:
            raise SystemExit(f"{missing[0]} does not exist: rebuild the miniature runs with `make trajectories` "
                             "(or pass --run NAME=FOLDER --steps ...)")
    return runs


def ours(runs, opts, cases, out: Path) -> dict:
    import pysafegeom

    t0 = time.perf_counter()
    res = pysafegeom.trajectory(runs, out=out, cases=cases, progress=False, **opts)
    total = time.perf_counter() - t0
    split = {}
    for row in res.table:
        a = json.loads((out / "anchors" / f"{row['trajectory']}-{row['step']}" / "analysis" / "result.json")
                       .read_text())["meta"]["timings_s"]
        sec = row["seconds"]
        if row.get("same_weights_as"):
            split[f"{row['trajectory']}-{row['step']}"] = {"copied_from": row["same_weights_as"]}
            continue
        split[f"{row['trajectory']}-{row['step']}"] = {
            "load": sec.get("load"), "capture": a.get("capture"), "selection": a.get("selection"),
            "analysis_other": sec["analysis"] - a.get("capture", 0) - a.get("selection", 0),
            "behaviour": sec["behaviour"], "replay": sec["replay"], "total": sec["total"]}
    return {"seconds": total, "split": split, "rows": res.table, "meta": {k: res.meta[k] for k in ("loading", "encoding")}}


def separate(runs, opts, cases, out: Path, before: bool = False) -> dict:
    """Each anchor by separate public calls: analyze (own load), then load_model + behaviour + replay."""
    import pysafegeom
    from pysafegeom.attacks.replay import replay
    from pysafegeom.pipelines import stages as S
    from pysafegeom.pipelines.analyze import AnalysisConfig
    from pysafegeom.pipelines.trajectory import TrajectoryConfig, measure_behaviour

    import pysafegeom.generation as G
    import pysafegeom.protocol.selection as SEL

    saved = (SEL.SHARED_PREFIX, G._COMPACT_SHARE)
    if before:
        SEL.SHARED_PREFIX, G._COMPACT_SHARE = False, 0  # 0: never compact
    tcfg = TrajectoryConfig(**{k: v for k, v in opts.items() if k not in ANALYSIS_KEYS})
    aopts = {k: v for k, v in opts.items() if k in ANALYSIS_KEYS}
    rows, split = {}, {}
    t_all = time.perf_counter()
    try:
        for name, anchors_ in runs.items():
            for step, spec in anchors_:
                key = f"{name}-{step}"
                t0 = time.perf_counter()
                res = pysafegeom.analyze(spec, progress=False, out=out / key / "analysis", **aopts)
                t1 = time.perf_counter()
                model, tok = pysafegeom.load_model(spec)
                t2 = time.perf_counter()
                acfg = AnalysisConfig(**{**aopts, "interventions": True, "n_behaviour": tcfg.n_behaviour})
                sets = S.stage_sets(model, None, None, None, benign=None, cfg=acfg)
                beh = measure_behaviour(model, tok, sets, tcfg, acfg.template, acfg.system)
                t3 = time.perf_counter()
                rep = replay(cases, model, tok, out=out / key / "replay", max_new_tokens=tcfg.replay_max_new_tokens,
                             batch_size=tcfg.batch_size, target_name=key, progress=False)
                t4 = time.perf_counter()
                del model
                split[key] = {"analyze": t1 - t0, "load": t2 - t1, "behaviour": t3 - t2, "replay": t4 - t3,
                              "total": t4 - t0}
                rows[key] = {"kappa_mid_band": res.metrics["coupling"]["mid_band_mean"],
                             "layer": res.metrics["reference"]["layer"], "direct_asr": beh["direct_asr"]["value"],
                             "xstest": beh["xstest_any_refusal"]["value"], "fixed_source": rep["overall"]["asr"]}
    finally:
        SEL.SHARED_PREFIX, G._COMPACT_SHARE = saved
    return {"seconds": time.perf_counter() - t_all, "split": split, "rows": rows}


def analyze_full(runs, opts, cases, out: Path) -> dict:
    import pysafegeom
    from pysafegeom.attacks.replay import replay

    aopts = {k: v for k, v in opts.items() if k in ANALYSIS_KEYS}
    split = {}
    t_all = time.perf_counter()
    for name, anchors_ in runs.items():
        for step, spec in anchors_:
            key = f"{name}-{step}"
            t0 = time.perf_counter()
            pysafegeom.analyze(spec, progress=False, out=out / key / "analysis", interventions=True, n_controls=1,
                               n_behaviour=opts.get("n_behaviour"), max_new_tokens=opts["max_new_tokens"],
                               batch_size=opts["batch_size"], **aopts)
            t1 = time.perf_counter()
            model, tok = pysafegeom.load_model(spec)  # replay's own load, as a separate call would
            replay(cases, model, tok, out=out / key / "replay", max_new_tokens=opts["replay_max_new_tokens"],
                   batch_size=opts["batch_size"], target_name=key, progress=False)
            del model
            t2 = time.perf_counter()
            split[key] = {"analyze": t1 - t0, "replay": t2 - t1, "total": t2 - t0}
    return {"seconds": time.perf_counter() - t_all, "split": split}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", default=None, metavar="NAME=FOLDER",
                    help="a training folder with checkpoint-N/ (default: the miniature r2d2 and sft runs)")
    ap.add_argument("--steps", default="0,10", help="checkpoint steps per run (default 0,10)")
    ap.add_argument("--cases", default=str(ROOT / "trajectories" / "fixed_source" / "gcg"))
    ap.add_argument("--quick", action="store_true", help="the cheaper per-anchor setting (see QUICK)")
    ap.add_argument("--paths", default="ours,separate,before,analyze")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--synthetic", default=None, metavar="DIR",
                    help="train two quick LoRA SFT runs (checkpoints 0, 2, 4) into DIR and use them (steps 0,4)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="--synthetic: the base model")
    ap.add_argument("--out", default=str(ROOT / "bench" / "trajectory_results.json"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.synthetic:
        args.run = synthetic(Path(args.synthetic), args.model)
        if args.steps == "0,10":
            args.steps = "0,4"
    args.run = args.run or [f"r2d2={ROOT / 'trajectories' / 'runs' / 'r2d2'}", f"sft={ROOT / 'trajectories' / 'runs' / 'sft'}"]
    args.steps = [int(s) for s in args.steps.split(",")]
    runs = anchors(args)
    opts = dict(QUICK if args.quick else FULL)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="bench_trajectory_"))
    import pysafegeom

    pysafegeom.load_model(runs[next(iter(runs))][0][1])  # untimed: the base's files in the page cache
    results = {}
    try:
        for p in paths:
            t = time.strftime("%H:%M:%S")
            print(f"[{t}] {p} ...", flush=True)
            if p == "ours":
                results[p] = ours(runs, opts, args.cases, tmp / "ours")
            elif p == "separate":
                results[p] = separate(runs, opts, args.cases, tmp / "separate")
            elif p == "before":
                results[p] = separate(runs, opts, args.cases, tmp / "before", before=True)
            elif p == "analyze":
                results[p] = analyze_full(runs, opts, args.cases, tmp / "analyze")
            else:
                raise SystemExit(f"unknown path {p!r}")
            print(f"    {results[p]['seconds']:.1f} s", flush=True)
            print("    " + json.dumps({k: v for k, v in results[p].items() if k != "rows"}, default=str), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(len(v) for v in runs.values())
    print(f"\n{n} anchors ({', '.join(f'{k}: {[s for s, _ in v]}' for k, v in runs.items())}); settings {opts}; "
          f"{args.threads} threads")
    print("| path | total s | s per anchor | ours / path |")
    print("|---|---:|---:|---:|")
    base = results.get("ours", {}).get("seconds")
    for p, r in results.items():
        ratio = f"{base / r['seconds']:.2f}x" if base else "n/a"
        print(f"| {p} | {r['seconds']:.1f} | {r['seconds'] / n:.1f} | {ratio} |")
    if "ours" in results:
        print("\nours, per anchor (s):")
        for k, v in results["ours"]["split"].items():
            print(f"  {k}: " + ", ".join(f"{a} {b:.1f}" if isinstance(b, float) else f"{a} {b}" for a, b in v.items()
                                         if b is not None))
        print(f"  loading {results['ours']['meta']['loading']}; encoding {results['ours']['meta']['encoding']}")
    if "ours" in results and "separate" in results:  # the same numbers either way
        same = []
        for r in results["ours"]["rows"]:
            s = results["separate"]["rows"][f"{r['trajectory']}-{r['step']}"]
            same.append(abs(r["kappa_mid_band"] - s["kappa_mid_band"]) < 1e-3
                        and r["carrier"]["reference_layer"] == s["layer"]
                        and r["direct_asr"]["value"] == s["direct_asr"] and r["xstest_any_refusal"]["value"] == s["xstest"]
                        and r["fixed_source"]["overall"]["asr"] == s["fixed_source"])
        print(f"\nours and separate agree on κ, carrier layer, direct ASR, XSTest and fixed-source ASR: "
              f"{sum(same)}/{len(same)} anchors")
    for p in ("separate", "before"):
        if p in results:
            print(f"{p} per anchor (s): " + "; ".join(
                f"{k}: " + ", ".join(f"{a} {b:.1f}" for a, b in v.items()) for k, v in results[p]["split"].items()))
    for r in results.values():
        r.pop("rows", None)
    Path(args.out).write_text(json.dumps({"settings": opts, "anchors": runs, "threads": args.threads,
                                          "results": results}, indent=1) + "\n")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
