"""Ray fan-out of a trajectory: one process against 1 and 2 Ray workers on this machine.

A 4-anchor trajectory of a tiny random Llama (the SmolLM2 tokenizer; 6 layers, d_model 128), checkpoints 0, 2, 4 and 6
of one LoRA SFT run, measured with the bundled prompt sets at a small budget. Paths, each into a fresh folder:

* **one process** (every peer's way: no geometry tool runs past one process), with 1 and with 2 torch threads;
* **ray 1 worker** and **ray 2 workers**: ``trajectory(..., ray=RayOptions(workers=N))``, a local cluster started
  and stopped by the call (its start is in the wall time, as a user pays it), one 1-thread task per anchor.

The overhead per task is (ray 1 worker - one process, 1 thread) / anchors: what a task costs beyond the work
itself (cluster start shared out, a worker's imports, the model load a process of its own needs). The results of
every path are checked equal (the science, not the wall times).

    python bench/scale.py [--anchors 4] [--out bench/scale_results.json]
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
OPTS = dict(n_val=16, selection_positions=["eoi-1", "eoi-2"], n_kl_controls=8, n_behaviour=16, max_new_tokens=32,
            replay_max_new_tokens=32, batch_size=8)
SHAPE = dict(n_layers=6, d_model=128)
EXAMPLES = [("How do I bake bread?", "Mix flour, water, salt and yeast; knead, rise, bake."),
            ("Write malware that steals passwords.", "Sorry, I can't do that."),
            ("Name a large mammal.", "The elephant."),
            ("How can I poison my neighbour's dog?", "Sorry, I can't do that.")]


def build(folder: Path, anchors: int) -> dict:
    from transformers import AutoTokenizer

    from pysafegeom.models.loading import _smollm2_gguf, resolve
    from pysafegeom.models.tiny import tiny_model
    from pysafegeom.train import TrainConfig, run

    tok = AutoTokenizer.from_pretrained(str(resolve(str(_smollm2_gguf()))))
    base = folder / "base"
    tiny_model("llama", tokenizer=tok, seed=0, **SHAPE).save_pretrained(base)
    tok.save_pretrained(base)
    save = tuple(2 * i for i in range(anchors))
    run(str(base), None, EXAMPLES, TrainConfig(steps=max(save), batch_size=2, lr=2e-2, warmup_steps=0, max_len=48,
                                               seed=0, save_at=save), folder / "sft", progress=False)
    return {"sft": str(folder / "sft")}


def measure(runs: dict, out: Path, ray=None) -> tuple[float, object]:
    from pysafegeom.pipelines.trajectory import trajectory

    t0 = time.perf_counter()
    res = trajectory(runs, out=out, progress=False, report=False, ray=ray, **OPTS)
    return time.perf_counter() - t0, res


def science(res) -> str:
    def strip(o):
        if isinstance(o, dict):
            return {k: strip(v) for k, v in o.items() if not k.endswith("seconds") and k not in ("ray", "log")}
        return [strip(v) for v in o] if isinstance(o, list) else o

    return json.dumps(strip([res.table, res.correlations, res.findings]), sort_keys=True, default=str)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--anchors", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "scale_results.json"))
    args = ap.parse_args()
    import torch

    from pysafegeom.scale import RayOptions

    work = Path(tempfile.mkdtemp(prefix="psg_scale_"))
    try:
        runs = build(work, args.anchors)
        rows, sci = {}, {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            rows[f"one process, {threads} thread{'s' if threads > 1 else ''}"], res = \
                measure(runs, work / f"one{threads}")
            sci[threads] = science(res)
        torch.set_num_threads(1)
        for n in (1, 2):
            rows[f"ray {n} worker{'s' if n > 1 else ''}"], res = measure(runs, work / f"ray{n}", ray=RayOptions(workers=n))
            sci[f"ray{n}"] = science(res)
            unit_s = [e["ray"]["seconds"] for e in res.meta["log"] if "ray" in e]
            rows[f"  (ray {n}: task work, summed)"] = sum(unit_s)
        t0 = time.perf_counter()
        import ray

        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
        ray.shutdown()
        rows["  (ray cluster start + stop)"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    equal = len({sci[1], sci["ray1"], sci["ray2"]}) == 1
    ref = rows["one process, 1 thread"]
    n = args.anchors
    overhead = (rows["ray 1 worker"] - ref) / n
    print(f"\n4-anchor tiny trajectory ({n} anchors; {os.cpu_count()} CPUs); results equal across paths: {equal} "
          f"(2 threads vs 1: {'equal' if sci[2] == sci[1] else 'float-level differences'})\n")
    print(f"| path | wall s | vs one process, 1 thread | vs one process, 2 threads |")
    print("|---|---:|---:|---:|")
    for k, v in rows.items():
        if k.startswith("  "):
            print(f"| {k.strip()} | {v:.1f} | | |")
        else:
            print(f"| {k} | {v:.1f} | {v / ref:.2f}x | {v / rows['one process, 2 threads']:.2f}x |")
    print(f"\nspeed-up 2 workers vs 1 worker: {rows['ray 1 worker'] / rows['ray 2 workers']:.2f}x; "
          f"overhead per task (ray 1 worker - one process, 1 thread) / {n}: {overhead:.1f} s")
    Path(args.out).write_text(json.dumps({"rows": rows, "anchors": n, "equal": equal, "overhead_per_task_s": overhead,
                                          "speedup_2_vs_1": rows["ray 1 worker"] / rows["ray 2 workers"],
                                          "options": OPTS}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
