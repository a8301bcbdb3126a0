"""One R2D2 training step, split: GCG updates, clean loss, adversarial forward and backward, optimizer.

Ours (the package's GCG with its exact speed-ups, stepped inside training) against the same step with the
plain-torch reference GCG (``GCGConfig.reference()``: no prefix cache, full logits, no dedupe), both
measured here, and against a nanoGCG-speed inner loop by arithmetic: nanoGCG cannot be stepped between
weight updates, so its GCG time is ours scaled by the measured per-step ratio of bench/gcg.py (4.03 / 2.50
s/step at width 64 on this machine, bench/RESULTS.md). SmolLM2-135M-Instruct, the miniature preset of
trajectories/ (or ``--harmbench``: pool 8, 8 cases x 5 GCG steps at width 512 per step).

    python bench/r2d2_step.py [--steps 3] [--threads 2] [--harmbench] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NANOGCG_RATIO = 4.03 / 2.50  # nanoGCG 0.3.0 vs ours, s/step at width 64, SmolLM2-135M, 2 cores (bench/gcg.py)
KEYS = ("gcg_s", "clean_s", "adversarial_forward_s", "adversarial_backward_s", "optimizer_s", "step_s")


def one(path: str, model_spec, tok, examples, cfg, reference: bool) -> dict:
    from pysafegeom.attacks.gcg import GCGConfig
    from pysafegeom.train import r2d2

    real = r2d2.R2D2Recipe._gcg_config

    def plain(self, n_tokens):
        c = real(self, n_tokens)
        return GCGConfig.reference(**{k: v for k, v in c.to_dict().items()
                                      if k not in ("use_prefix_cache", "target_only_logits", "reuse_suffix_prefix",
                                                   "dedupe", "ce_backend")})

    if reference:
        r2d2.R2D2Recipe._gcg_config = plain
    try:
        from pysafegeom.train import run

        t0 = time.perf_counter()
        run(model_spec, tok, examples, cfg, path, progress=False)
        wall = time.perf_counter() - t0
    finally:
        r2d2.R2D2Recipe._gcg_config = real
    rows = [json.loads(line) for line in (Path(path) / "train_log.jsonl").read_text().splitlines()]
    later = rows[1:] or rows  # the first step pays for building the attacks
    out = {k: statistics.median(r.get(k, 0.0) for r in later) for k in KEYS}
    out["wall"] = wall
    out["losses"] = [round(r["loss"], 4) for r in rows]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--harmbench", action="store_true", help="HarmBench's R2D2 settings instead of the miniature's")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model (checks the script)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pysafegeom.train import TrainConfig
    from pysafegeom.train.r2d2 import R2D2Config

    sys.path.insert(0, str(ROOT / "trajectories"))
    import build  # the trajectories' clean data and training options

    examples = build.clean_examples()
    opts = R2D2Config() if args.harmbench else R2D2Config.miniature()
    train = {**build.TRAIN, "steps": args.steps, "save_at": (), "warmup_steps": 0}
    model_spec, tok = "smollm2-135m-instruct", None
    if args.tiny:
        from pysafegeom.models import load_model
        from pysafegeom.models.tiny import tiny_model

        _, tok = load_model("smollm2-135m-instruct")
        model_spec = tiny_model("llama", tokenizer=tok, n_layers=2, d_model=32, seed=0)
        opts = R2D2Config.miniature(search_width=8, topk=8)
    cfg = TrainConfig(recipe="r2d2", recipe_options=opts, **train)
    res = {}
    for name, ref in (("ours", False), ("reference", True)):
        with tempfile.TemporaryDirectory() as d:
            if args.tiny:  # a fresh copy each time: training wraps the model in place
                model_spec = tiny_model("llama", tokenizer=tok, n_layers=2, d_model=32, seed=0)
            res[name] = one(d, model_spec, tok, examples, cfg, ref)
    diff = max(abs(a - b) for a, b in zip(res["ours"]["losses"], res["reference"]["losses"]))
    nano = dict(res["ours"])
    nano["gcg_s"] = res["ours"]["gcg_s"] * NANOGCG_RATIO
    nano["step_s"] = res["ours"]["step_s"] + nano["gcg_s"] - res["ours"]["gcg_s"]
    print(f"R2D2 step on {'a tiny model' if args.tiny else 'SmolLM2-135M-Instruct'}, "
          f"{'HarmBench' if args.harmbench else 'miniature'} preset: pool {opts.pool_size}, {opts.n_cases} cases x "
          f"{opts.gcg_steps_per_update} GCG steps (width {opts.search_width}, top-k {opts.topk}), clean batch "
          f"{train['batch_size']}, LoRA r{train['lora_r']}, {args.threads} threads; median of steps 2..{args.steps}")
    print("| path | " + " | ".join(KEYS) + " | step vs ours |")
    print("|---|" + "---|" * (len(KEYS) + 1))
    for name, r in (("ours", res["ours"]), ("reference GCG (measured)", res["reference"]),
                    (f"nanoGCG-speed GCG (ours x {NANOGCG_RATIO:.2f})", nano)):
        print(f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in KEYS) + f" | {r['step_s'] / res['ours']['step_s']:.2f}x |")
    print(f"losses per step, ours {res['ours']['losses']} vs reference {res['reference']['losses']}: largest "
          f"difference {diff:.1e} (float rounding of the two GCG paths; a near-tie can pick another suffix)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
