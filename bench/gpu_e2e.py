"""End-to-end GPU smoke run: analyze() and capture on a tiny random Llama on CUDA (no hub, no real model).

    python bench/gpu_e2e.py --tokenizer DIR     # DIR: a tokenizer folder (e.g. the cached SmolLM2 one)

Prints the backend each op picks, the analysis summary, and capture throughput against a plain forward.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from pysafegeom import ops
    from pysafegeom.pipelines.analyze import analyze
    from pysafegeom.data import load_default
    from pysafegeom.models import tiny_model
    from pysafegeom.prompts import format_prompts
    from pysafegeom.protocol.capture import capture

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = tiny_model("llama", tokenizer=tok, n_layers=args.layers, d_model=args.d).to(dev)
    print("device", dev, "backends", ops.backend_report())
    for op in ("gather_positions", "gather_accumulate", "project_ablate"):
        print(f"  auto backend for {op}: {ops.select_backend(op, torch.device(dev), torch.float32)[0]}")

    t0 = time.perf_counter()
    res = analyze(model, tokenizer=tok, n_val=8, progress=False)
    print(f"analyze: {time.perf_counter() - t0:.1f} s (capture {res.meta['timings_s']['capture']} s, "
          f"selection {res.meta['timings_s']['selection']} s)")
    print("\n".join(res.metrics["summary"]))

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    prompts = [p.text for p in load_default("harmful")] + [p.text for p in load_default("harmless")]
    sets = {"harmful": prompts[:120], "harmless": prompts[120:]}
    batches = [format_prompts(tok, prompts[i:i + 32], device=dev) for i in range(0, len(prompts), 32)]
    n_tok = sum(int(b.attention_mask.sum()) for b in batches)

    def plain():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    def ours():
        capture(model, tok, sets, batch_size=32, progress=False)

    for name, fn in (("plain forward", plain), ("ours", ours)):
        fn()
        sync()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        print(f"{name:>14}: {min(ts) * 1e3:8.1f} ms  {n_tok / min(ts):10.0f} tok/s")


if __name__ == "__main__":
    main()
