"""Build the two miniature trajectories: R2D2 and its matched SFT control, from SmolLM2-135M-Instruct.

    python trajectories/build.py r2d2  [--threads 1] [--cache DIR]
    python trajectories/build.py sft   [--threads 1] [--cache DIR]
    python trajectories/build.py r2d2-long       # the probe for late reopening (VARIANTS): 200 steps, 1 case per step
    python trajectories/build.py export          # the step logs, configs and pools into trajectories/<name>/

Both runs share everything but the adversarial flag: the clean data (``trajectories/clean.jsonl``, the
base model's own greedy answers to the anchor pool's harmless training prompts), its order, the seed,
the learning rate and schedule, the steps and the anchors (``ANCHORS``, step 0 included). Checkpoints go
to ``--cache`` (default ``trajectories/runs/<name>``); a killed run resumes where its last checkpoint
left it (rerun the same command). The training behaviours (the package's own 40) are checked against
every evaluation set before training starts.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HERE = ROOT / "trajectories"

ANCHORS = (0, 10, 25, 50, 100)
STEPS = 100
TRAIN = dict(lora=True, lora_r=8, lora_alpha=16, lr=5e-4, schedule="cosine", warmup_steps=5, batch_size=4,
             grad_accum=1, steps=STEPS, save_at=ANCHORS, seed=0, max_len=256)


# a probe for the late reopening the paper reports: twice the steps at half the attack per step (one case, not
# two, per step), so the clean loss has longer to pull the model back while the pool keeps being attacked
VARIANTS = {"r2d2-long": dict(train=dict(steps=200, save_at=(0, 25, 50, 100, 200)), options=dict(cases_per_step=1))}


def options(name: str):
    from pysafegeom.train.r2d2 import R2D2Config

    extra = VARIANTS.get(name, {}).get("options", {})
    return R2D2Config.miniature(adversarial=(name != "sft"), **extra)


def train_options(name: str) -> dict:
    return {**TRAIN, **VARIANTS.get(name, {}).get("train", {})}


def evaluation_sets() -> dict[str, list]:
    """Every behaviour set the trajectories are measured on (what the training behaviours must avoid)."""
    from pysafegeom.data import load_behaviors

    sets = {}
    hb = DATA / "harmbench"
    if hb.is_dir():
        for split in ("test", "val"):
            sets[f"harmbench {split}"] = load_behaviors(hb / f"harmbench_behaviors_text_{split}.csv",
                                                        hb / "harmbench_targets_text.json", functional_category=None,
                                                        require_targets=False)
    adv = DATA / "advbench" / "harmful_behaviors.csv"
    if adv.is_file():
        sets["advbench"] = load_behaviors(adv)
    return sets


def clean_examples():
    rows = [json.loads(line) for line in (HERE / "clean.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return [dict(prompt=r["prompt"], response=r["response"], end_turn=r["end_turn"]) for r in rows]


def export(cache: pathlib.Path) -> None:
    """Copy the small records of each run (its step log, and per anchor the config and the R2D2 pool) from
    the cache into ``trajectories/<name>/``, which is kept in git; the adapters stay in the cache."""
    import shutil

    from pysafegeom.train import checkpoints

    for name in ("r2d2", "sft", *VARIANTS):
        src, dst = cache / name, HERE / name
        if not (src / "train_log.jsonl").is_file():
            print(f"{name}: no run in {src}")
            continue
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / "train_log.jsonl", dst / "train_log.jsonl")
        for step, ck in checkpoints(src).items():
            d = dst / f"checkpoint-{step}"
            d.mkdir(exist_ok=True)
            for f in ("train_config.json", "r2d2_pool.json", "adapter_config.json"):
                if (ck / f).is_file():
                    shutil.copy2(ck / f, d / f)
        print(f"{name}: exported {sorted(checkpoints(src))} to {dst}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=["r2d2", "sft", *VARIANTS, "export"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None)
    args = ap.parse_args(argv)
    if args.name == "export":
        export(pathlib.Path(args.cache or HERE / "runs"))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    from pysafegeom.train import TrainConfig, check_disjoint, checkpoints, load_training_behaviors, run

    opts = options(args.name)
    check_disjoint(load_training_behaviors(opts.behaviors), evaluation_sets())
    out = pathlib.Path(args.cache or HERE / "runs" / args.name)
    cfg = TrainConfig(recipe="r2d2", recipe_options=opts.to_dict(), **train_options(args.name))
    res = run("smollm2-135m-instruct", None, clean_examples(), cfg, out, resume=bool(checkpoints(out)),
              base_spec="smollm2-135m-instruct")
    print(f"{args.name}: {cfg.steps} steps in {res.seconds:.0f} s; checkpoints {sorted(res.checkpoints)} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
