"""AutoDAN on a GPU: scoring equality to a float64 brute force on CUDA, and scoring throughput / time per step
(bench/gpu_check.sh step 6c).

1. **Equality on CUDA**: tiny random models of the five architectures, fp32, on the GPU: the losses of a
   population of templates of 6+ different lengths with every speed-up (length buckets, masked padding
   after the shared prefix, prefix KV, target-only CUDA CE) against a float64 unpadded full forward,
   within 4x the plain fp32 reference path's own error.
2. **Throughput** at population 64 (HarmBench) and 256 (the paper), bf16, on a SmolLM2-135M-shaped and a
   Llama-3.2-1B-shaped random model: ours vs the reference path vs the HarmBench-style peer (the whole
   population left-padded without a mask, full logits), in real tokens per second; then the time of the first
   AutoDAN generation (scoring a fresh population; refusal check off). The GPU machine has no model files, so the tokenizer is the
   synthetic word-level one of bench/gcg_gpu.py and the prompts are random words of AutoDAN-like lengths
   (80..240 words); the compute is the real models' shape.

    python bench/autodan_gpu.py [--quick] [--dry-run-cpu] [--equality-on cpu]
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from autodan import peer_losses  # noqa: E402
from gcg_gpu import llama, synthetic_tokenizer  # noqa: E402


def _templates(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [f"w{rng.randrange(10, vocab - 10)}" for _ in range(rng.randint(lo, hi))]
        words.insert(rng.randrange(len(words)), "[REPLACE]")
        out.append(" ".join(words))
    return out


def equality(dev: str = "cuda") -> int:
    from pysafegeom.attacks.autodan import AutoDAN, AutoDANConfig
    from pysafegeom.models.tiny import tiny_model

    tok = synthetic_tokenizer(512)
    beh, tgt = "w10 w11 w12 w13", "w20 w21 w22 w23 w24"
    pop = _templates(12, 3, 30, 512)
    fails = 0
    for arch in ("llama", "mistral", "qwen2", "gemma", "gpt2"):
        m = tiny_model(arch, vocab_size=len(tok)).to(dev)
        kw = dict(batch_size=12, progress=False, eval_with_check_refusal=False, synonyms="table",
                  batch_overhead_rows=1)
        fast = AutoDAN(m, tok, beh, tgt, AutoDANConfig(**kw))
        ref = AutoDAN(m, tok, beh, tgt, AutoDANConfig.reference(**kw))
        lo_fast = fast.losses(pop)[0]
        lo_ref = ref.losses(pop)[0]
        m64 = copy.deepcopy(m).double()
        T = len(fast.scorer.target_ids)
        brute = []
        for r in fast.scorer.rows([fast.test_case(t) for t in pop]):
            ids = torch.tensor([r + fast.scorer.target_ids], device=dev)
            with torch.no_grad():
                lg = m64(input_ids=ids).logits[0, -T - 1:-1]
            brute.append(torch.nn.functional.cross_entropy(lg, ids[0, -T:]).cpu())
        brute = torch.stack(brute)
        e_ref = float((lo_ref.double() - brute).abs().max())
        e_fast = float((lo_fast.double() - brute).abs().max())
        ok = e_fast <= 4 * e_ref + 1e-6
        fails += not ok
        print(f"{'PASS' if ok else 'FAIL'} autodan equality on {dev} {arch}: fast err {e_fast:.2e}, plain fp32 err {e_ref:.2e}")
    return fails


def throughput(quick: bool, device: str = "cuda", dtype=torch.bfloat16, shapes=None, pops=(64, 256),
               lo: int = 80, hi: int = 240) -> None:
    from pysafegeom.attacks.autodan import AutoDAN, AutoDANConfig

    shapes = shapes or [("SmolLM2-135M shape", 49152, 576, 30, 9, 3, 1536),
                        ("Llama-3.2-1B shape", 128256, 2048, 16, 32, 8, 8192)]
    reps = 2 if quick else 3

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def best(fn):
        ts = []
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    print(f"{'model (bf16)':<22} {'pop':>4} {'ours tok/s':>11} {'ref tok/s':>10} {'peer tok/s':>11} "
          f"{'vs peer':>8} {'vs ref':>7} {'gen 1 s':>11}")
    for name, vocab, d, layers, heads, kv, inter in shapes:
        tok = synthetic_tokenizer(vocab)
        m = llama(vocab, d, layers, heads, kv, inter, dtype, device)
        beh = " ".join(f"w{100 + i}" for i in range(16))
        tgt = " ".join(f"w{300 + i}" for i in range(14))
        for pop_n in pops:
            pop = _templates(pop_n, lo, hi, vocab, seed=pop_n)
            kw = dict(batch_size=pop_n, progress=False, eval_with_check_refusal=False, synonyms="table")
            ours = AutoDAN(m, tok, beh, tgt, AutoDANConfig(**kw))
            ref = AutoDAN(m, tok, beh, tgt, AutoDANConfig.reference(**kw))
            tcs = [ours.test_case(t) for t in pop]
            T = len(ours.scorer.target_ids)
            real = sum(len(r) + T - 1 for r in ours.scorer.rows(tcs))

            def run_ours():
                ours.memo.clear()
                ours.losses(pop)

            t_o = best(run_ours)
            try:
                t_r = best(lambda: ref.losses(pop))
            except torch.OutOfMemoryError:
                t_r = float("nan")
            t_p = best(lambda _m=m: peer_losses(_m, ours.scorer, tcs))
            step = AutoDAN(m, tok, beh, tgt, AutoDANConfig(**kw, num_steps=1))  # one generation: score it all, breed
            step_pop = pop
            step.initial_population = lambda rng, _p=step_pop: list(_p)
            res = step.run()
            print(f"{name:<22} {pop_n:4d} {real / t_o:11.0f} {real / t_r:10.0f} {real / t_p:11.0f} "
                  f"{t_p / t_o:7.2f}x {t_r / t_o:6.2f}x {res.seconds_per_step[0]:11.3f}")
        del m
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dry-run-cpu", action="store_true", help="run the timing code on tiny shapes on the CPU")
    ap.add_argument("--equality-on", default=None, help="run only the equality check on this device (e.g. cpu)")
    args = ap.parse_args()
    if args.equality_on:
        return 1 if equality(args.equality_on) else 0
    if args.dry_run_cpu:
        throughput(True, "cpu", torch.float32, [("tiny Llama shape", 2048, 64, 2, 4, 2, 128)], pops=(8,), lo=5, hi=30)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    fails = equality()
    t0 = time.time()
    throughput(args.quick)
    print(f"autodan gpu checks: {fails} failed ({time.time() - t0:.0f} s of timing)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
