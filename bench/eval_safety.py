"""Behavioural check of a safety-trained model against its base (PROTOCOL.md section 5, substring judge).

Greedy answers (``--max-new-tokens``, default 48) to the bundled TEST splits (``--split val`` to choose among checkpoints): refusal rate on harmful,
over-refusal on harmless and on xstest_safe (empty answer = refusal, case-insensitive substrings from
``pysafegeom.train.REFUSAL_SUBSTRINGS``), and a utility proxy: the mean cross-entropy (nats/token) of the
bundled benign reference answers (test split) under the model's chat template.

    python bench/eval_safety.py smollm2-135m-instruct smollm2-135m-safety --out runs/eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def evaluate(spec: str, max_new_tokens: int = 48, batch_size: int = 24, split: str = "test") -> dict:
    from pysafegeom.data import load_default
    from pysafegeom.models import load_model
    from pysafegeom.train import Example, encode_examples, greedy_generate, is_refusal
    from pysafegeom.train.data import collate
    from pysafegeom.train.sft import response_nll

    t0 = time.perf_counter()
    model, tok = load_model(spec, device="cpu")
    out = {"model": spec, "max_new_tokens": max_new_tokens, "split": split, "sets": {}}
    for name in ("harmful", "harmless", "xstest_safe"):
        prompts = [p.text for p in load_default(name, split)]
        answers = greedy_generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
        flags = [is_refusal(a) for a in answers]
        out["sets"][name] = {"n": len(prompts), "refused": sum(flags), "refusal_rate": sum(flags) / len(flags),
                             "samples": [{"prompt": p, "answer": a, "refused": f} for p, a, f in zip(prompts, answers, flags)]}
    benign = load_default("benign", split)
    rows = encode_examples(tok, [Example(p.text, p.reference) for p in benign], max_len=256)
    with torch.no_grad():
        ce = float(response_nll(model, collate(rows, tok.pad_token_id)))
    out["benign_reference_ce"] = ce
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model specs (registered names, folders, adapter folders)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--split", default="test", choices=["val", "test"],
                    help="bundled split to evaluate (default test; use val to choose among checkpoints)")
    ap.add_argument("--out", default=None, help="write all results (with the answers) to this JSON file")
    args = ap.parse_args(argv)
    results = []
    for spec in args.models:
        r = evaluate(spec, args.max_new_tokens, split=args.split)
        results.append(r)
        s = r["sets"]
        print(f"{spec}: harmful refused {s['harmful']['refused']}/{s['harmful']['n']} "
              f"({s['harmful']['refusal_rate']:.0%}); harmless refused {s['harmless']['refused']}/{s['harmless']['n']} "
              f"({s['harmless']['refusal_rate']:.0%}); xstest_safe refused {s['xstest_safe']['refused']}/"
              f"{s['xstest_safe']['n']} ({s['xstest_safe']['refusal_rate']:.0%}); benign reference CE "
              f"{r['benign_reference_ce']:.3f} nats/token; {r['seconds']} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
