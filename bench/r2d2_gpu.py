"""R2D2 on a GPU: a few steps of full fine-tuning in bf16 on a random Llama-3.2-1B-shaped model, with
HarmBench's R2D2 settings (pool 8, 8 cases per step, 5 GCG steps of width 512 / top-k 256 per case), and the
step's time split: GCG updates, clean loss (forward + backward), adversarial forward, adversarial backward,
optimizer (bench/gpu_check.sh step 6d).

The GPU machine has no model files: the tokenizer is bench/gcg_gpu.py's synthetic word-level one and the
clean data and behaviours are random words of chat-like lengths; the compute is the real model's shape.

    python bench/r2d2_gpu.py [--steps 3] [--quick] [--dry-run-cpu]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from gcg_gpu import llama, synthetic_tokenizer  # noqa: E402


def words(rng: random.Random, lo: int, hi: int, vocab: int) -> str:
    return " ".join(f"w{rng.randrange(10, vocab - 10)}" for _ in range(rng.randint(lo, hi)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2 steps, 2 GCG steps per case")
    ap.add_argument("--dry-run-cpu", action="store_true", help="a tiny model on the CPU (checks the script)")
    args = ap.parse_args(argv)
    from pysafegeom.train import TrainConfig, run
    from pysafegeom.train.r2d2 import R2D2Config

    cpu = args.dry_run_cpu
    dev = "cpu" if cpu else "cuda"
    vocab = 512 if cpu else 32000
    tok = synthetic_tokenizer(vocab)
    tok.add_tokens(["!"])  # the R2D2 suffix init
    if cpu:
        model = llama(len(tok), 64, 2, 4, 2, 128, torch.float32, dev)
        shape = "tiny llama (cpu dry run)"
    else:
        model = llama(len(tok), 2048, 16, 32, 8, 8192, torch.bfloat16, dev)
        shape = "Llama-3.2-1B-shaped (d 2048, 16 layers, 32/8 heads, inter 8192), bf16, full fine-tuning"
    n_params = sum(p.numel() for p in model.parameters())
    rng = random.Random(0)
    tmp = Path(tempfile.mkdtemp())
    beh = tmp / "behaviors.jsonl"
    beh.write_text("".join(json.dumps({"id": f"b{i}", "behavior": words(rng, 12, 30, vocab),
                                       "targets": [words(rng, 8, 14, vocab)]}) + "\n" for i in range(24)))
    clean = [(words(rng, 20, 80, vocab), words(rng, 60, 200, vocab)) for _ in range(64)]
    steps = 2 if args.quick else args.steps
    opts = R2D2Config(behaviors=str(beh), gcg_steps_per_update=2 if args.quick else 5,
                      **(dict(search_width=16, topk=8, pool_size=4, suffix_tokens=(4, 6)) if cpu else {}))
    cfg = TrainConfig(recipe="r2d2", recipe_options=opts, lora=False, lr=2e-5, warmup_steps=0, steps=steps,
                      batch_size=8, max_len=512, seed=0)
    t0 = time.perf_counter()
    run(model, tok, clean, cfg, tmp / "run", progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (tmp / "run" / "train_log.jsonl").read_text().splitlines()]
    keys = ("gcg_s", "clean_s", "adversarial_forward_s", "adversarial_backward_s", "optimizer_s", "step_s")
    print(f"shape: {shape}; {n_params / 1e9:.2f} B parameters; pool {opts.pool_size}, {opts.n_cases} cases x "
          f"{opts.gcg_steps_per_update} GCG steps (width {opts.search_width}, top-k {opts.topk}) per step; "
          f"clean batch 8 x <= 512 tokens; {steps} steps in {wall:.1f} s (incl. setup)")
    print("| step | " + " | ".join(keys) + " | GCG share |")
    print("|---|" + "---|" * (len(keys) + 1))
    for r in rows:
        print(f"| {r['step']} | " + " | ".join(f"{r.get(k, 0.0):.2f}" for k in keys)
              + f" | {r.get('gcg_s', 0) / max(r['step_s'], 1e-9):.0%} |")
    later = rows[1:] or rows
    med = {k: statistics.median(r.get(k, 0.0) for r in later) for k in keys}
    print("median (steps after the first): " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()))
    per_gcg = med["gcg_s"] / max(1, opts.n_cases * opts.gcg_steps_per_update)
    print(f"one GCG step (width {opts.search_width}) inside training: {per_gcg:.3f} s")
    ok = all(torch.isfinite(torch.tensor([r["loss"] for r in rows])))
    print("PASS" if ok else "FAIL", "losses finite:", [round(r["loss"], 3) for r in rows])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
