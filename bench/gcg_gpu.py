"""GCG on a GPU: equality to brute force on CUDA, and the time of one step at width 512 (bench/gpu_check.sh).

1. **Equality on CUDA**: tiny random models of the five architectures, fp32, on the GPU: the losses of 16
   candidates with every speed-up (CUDA CE kernel, prefix and suffix-prefix KV reuse) against a float64
   brute force (full forward, full logits), within 4x the plain fp32 path's own error.
2. **Time per step** at width 512, top-k 256, a 20-token suffix, bf16: a SmolLM2-135M-shaped and a
   Llama-3.2-1B-shaped random model, ours vs the reference path. The GPU machine has no model files and
   no internet, so the tokenizer is a synthetic word-level one of the model's vocabulary size (the
   retokenisation filter is off: word-level decoding does not round-trip); the compute is the real
   model's shape.

    python bench/gcg_gpu.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch


def synthetic_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"] + [f"w{i}" for i in range(vocab - 5)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tok.chat_template = ("{% for m in messages %}{{ '<|user|> ' + m['content'] + ' </s> ' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}")
    return tok


def llama(vocab, d, layers, heads, kv, inter, dtype, device):
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)


def equality_on_cuda(dev: str = "cuda") -> int:
    from pysafegeom import ops
    from pysafegeom.attacks import GCG, GCGConfig
    from pysafegeom.models.tiny import tiny_model

    tok = synthetic_tokenizer(512)
    msg, tgt = "w10 w11 w12 w13", "w20 w21 w22 w23 w24"
    fails = 0
    for arch in ("llama", "mistral", "qwen2", "gemma", "gpt2"):
        m = tiny_model(arch, vocab_size=len(tok)).to(dev)
        kw = dict(search_width=16, topk=8, optim_str_init="w1 w2 w3 w4 w5 w6", filter_ids=False, progress=False)
        a = GCG(m, tok, msg, tgt, GCGConfig(**kw))
        cur = torch.tensor(a.init_ids[0])
        g, _ = a.token_grad(cur)
        cands = ops.sample_candidates(cur, g, 16, 8, 1, a.forbidden, seed=0)
        fast = a.candidate_losses(cands, cur)
        ref = GCG(m, tok, msg, tgt, GCGConfig.reference(**kw)).candidate_losses(cands)
        m64 = copy.deepcopy(m).double()
        p = a.prompts[0]
        rows = torch.tensor([p.before_ids + c + p.after_ids + p.target_ids for c in cands.tolist()], device=dev)
        T = len(p.target_ids)
        with torch.no_grad():
            logits = m64(input_ids=rows).logits[:, -T - 1:-1]
        brute = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, -T:].reshape(-1),
                                                  reduction="none").view(-1, T).mean(1).cpu()
        e_ref = float((ref.double() - brute).abs().max())
        e_fast = float((fast.double() - brute).abs().max())
        ok = e_fast <= 4 * e_ref + 1e-6
        fails += not ok
        print(f"{'PASS' if ok else 'FAIL'} gcg equality on {dev} {arch}: fast err {e_fast:.2e}, plain fp32 err {e_ref:.2e}")
    return fails


def step_times(quick: bool, device: str = "cuda", dtype=torch.bfloat16, shapes=None, width: int = 512,
               topk: int = 256) -> None:
    from pysafegeom.attacks import GCG, GCGConfig

    shapes = shapes or [("SmolLM2-135M shape", 49152, 576, 30, 9, 3, 1536),
                        ("Llama-3.2-1B shape", 128256, 2048, 16, 32, 8, 8192)]
    steps = 3 if quick else 5
    print(f"{'model (bf16, width 512, top-k 256)':<36} {'ours s/step':>12} {'reference s/step':>17} {'ratio':>6}")
    for name, vocab, d, layers, heads, kv, inter in shapes:
        tok = synthetic_tokenizer(vocab)
        m = llama(vocab, d, layers, heads, kv, inter, dtype, device)
        msg = " ".join(f"w{100 + i}" for i in range(24))
        tgt = " ".join(f"w{300 + i}" for i in range(12))
        init = " ".join(f"w{i + 7}" for i in range(20))
        res = {}
        for path in ("ours", "reference"):
            kw = dict(num_steps=steps, search_width=width, topk=topk, optim_str_init=init, filter_ids=False, progress=False)
            cfg = GCGConfig(**kw) if path == "ours" else GCGConfig.reference(**kw)
            a = GCG(m, tok, msg, tgt, cfg)
            if device == "cuda":
                torch.cuda.synchronize()
            r = a.run()
            res[path] = statistics.median(r.seconds_per_step[1:])
        print(f"{name:<36} {res['ours']:12.3f} {res['reference']:17.3f} {res['ours'] / res['reference']:6.2f}")
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
        return 1 if equality_on_cuda(args.equality_on) else 0
    if args.dry_run_cpu:  # the timing code on small shapes on the CPU, to check it before a GPU lease
        step_times(True, "cpu", torch.float32, [("tiny Llama shape", 2048, 64, 2, 4, 2, 128)], width=16, topk=8)
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    fails = equality_on_cuda()
    t0 = time.time()
    step_times(args.quick)
    print(f"gcg gpu checks: {fails} failed ({time.time() - t0:.0f} s of timing)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
