"""Behavioural check of a safety-trained model against its base (PROTOCOL.md section 5).

Two modes.

Bundled (default): greedy answers (``--max-new-tokens``, default 48) to the bundled TEST splits
(``--split val`` to choose among checkpoints): refusal rate on harmful, over-refusal on harmless and on
xstest_safe (empty answer = refusal, case-insensitive substrings from ``REFUSAL_SUBSTRINGS``), and a
utility proxy: the mean cross-entropy (nats/token) of the bundled benign reference answers (test split)
under the model's chat template.

    python bench/eval_safety.py smollm2-135m-instruct smollm2-135m-safety --out runs/eval.json

Public (``--public``): sets no anchor was trained on, read from ``--data`` (default /work/shared/data;
skipped with a message when absent). ``--split test`` (default):

* HarmBench test standard behaviours (159): refused (substring judge, PROTOCOL 5);
* XSTest safe prompts (250): any refusal, full or partial (the package's XSTest judge);
* XSTest unsafe contrasts (200): refused (substring judge);
* alpaca_eval: the first ``--n-alpaca`` (100) instructions of text_davinci_003_model_outputs.json:
  answered (not refused, substring judge) and the mean cross-entropy (nats/token) of the given
  reference output under the chat template.

``--split val`` (to choose a checkpoint before the test sets are read): the anchor pool's val split
(harmful refused; matched harmless, safe-but-dangerous-sounding and everyday prompts refused, the
safe-sounding ones by the XSTest judge's any-refusal) and HarmBench's val standard behaviours (41).
Every figure is printed with k/n and a 95% Wilson interval.

    python bench/eval_safety.py --public smollm2-135m-instruct smollm2-135m-safety --out runs/public.json
    python bench/eval_safety.py --public --split val runs/run2/checkpoint-90 runs/run2/checkpoint-120
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

DEFAULT_DATA = "/work/shared/data"
POOL = Path(__file__).resolve().parent.parent / "pysafegeom" / "anchors" / "smollm2-135m-safety" / "pool"


def _generate_fn():
    """The package's batched generation function (``pysafegeom.generation`` or, before the rename, ``pysafegeom.generate``)."""
    try:
        from pysafegeom.generation import generate
    except ImportError:
        from pysafegeom.generate import generate
    return generate


def _wilson(k: int, n: int) -> tuple[float, float]:
    try:
        from pysafegeom.behaviour.diagnostics import wilson_interval
    except ImportError:  # same formula (z = 1.96)
        z = 1.959963984540054
        p, d = k / n, 1 + z * z / n
        c, h = (p + z * z / (2 * n)) / d, z / d * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return max(0.0, c - h), min(1.0, c + h)
    return wilson_interval(k, n)


def _rate(k: int, n: int) -> dict:
    lo, hi = _wilson(k, n) if n else (0.0, 1.0)
    return {"k": int(k), "n": int(n), "rate": k / n if n else math.nan, "ci95": [lo, hi]}


def fmt_rate(r: dict) -> str:
    return f"{r['k']}/{r['n']} {r['rate']:.0%} [{r['ci95'][0]:.0%}-{r['ci95'][1]:.0%}]"


# ------------------------------------------------------------------------------------------ bundled

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


# ------------------------------------------------------------------------------------------ public

def _pool(name: str, split: str) -> list[str]:
    rows = [json.loads(line) for line in (POOL / f"{name}.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["prompt"] for r in rows if r.get("split") == split]


def public_sets(data: str | Path, split: str = "test", n_alpaca: int = 100) -> dict[str, dict]:
    """``{set name: {"prompts": [...], "judge": "substring"|"xstest", "want": "refused"|"answered", "references": [...]?}}``."""
    from pysafegeom.data import load_harmbench, load_xstest

    data = Path(data)
    hb = lambda f: [p.text for p in load_harmbench(data / "harmbench" / f, functional_category="standard")]
    if split == "val":
        return {
            "harmbench_val": {"prompts": hb("harmbench_behaviors_text_val.csv"), "judge": "substring", "want": "refused"},
            "pool_harmful_val": {"prompts": _pool("harmful", "val"), "judge": "substring", "want": "refused"},
            "pool_matched_val": {"prompts": _pool("harmless_matched", "val"), "judge": "substring", "want": "answered"},
            "pool_safe_sounding_val": {"prompts": _pool("safe_sounds_dangerous", "val"), "judge": "xstest", "want": "answered"},
            "pool_everyday_val": {"prompts": _pool("everyday", "val"), "judge": "substring", "want": "answered"},
        }
    xs = data / "xstest" / "xstest_prompts.csv"
    alpaca = json.loads((data / "alpaca_eval" / "text_davinci_003_model_outputs.json").read_text(encoding="utf-8"))[:n_alpaca]
    return {
        "harmbench_test": {"prompts": hb("harmbench_behaviors_text_test.csv"), "judge": "substring", "want": "refused"},
        "xstest_safe": {"prompts": [p.text for p in load_xstest(xs, "safe")], "judge": "xstest", "want": "answered"},
        "xstest_unsafe": {"prompts": [p.text for p in load_xstest(xs, "unsafe")], "judge": "substring", "want": "refused"},
        "alpaca_eval": {"prompts": [r["instruction"] for r in alpaca], "judge": "substring", "want": "answered",
                        "references": [r["output"] for r in alpaca]},
    }


def evaluate_public(spec: str, sets: dict[str, dict], max_new_tokens: int = 48, batch_size: int = 32) -> dict:
    """Greedy answers to every set in one batched generation call, judged; reference CE where a set has references."""
    from pysafegeom.behaviour import SubstringJudge, XSTestJudge
    from pysafegeom.behaviour.diagnostics import reference_cross_entropy
    from pysafegeom.models import load_model

    t0 = time.perf_counter()
    model, tok = load_model(spec, device="cpu")
    model.eval()
    names = list(sets)
    allp = [p for n in names for p in sets[n]["prompts"]]
    with torch.no_grad():
        answers = _generate_fn()(model, tok, allp, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    judges = {"substring": SubstringJudge(), "xstest": XSTestJudge()}
    out = {"model": spec, "max_new_tokens": max_new_tokens, "sets": {}}
    i = 0
    for n in names:
        s = sets[n]
        ps, ans = s["prompts"], answers[i: i + len(s["prompts"])]
        i += len(ps)
        verdicts = judges[s["judge"]].judge(ps, ans)
        refused = sum(v.refused for v in verdicts)
        r = {"judge": s["judge"], "want": s["want"], "refused": _rate(refused, len(ps)),
             "samples": [{"prompt": p, "answer": a, "refused": v.refused, "kind": v.kind, "rule": v.rule}
                         for p, a, v in zip(ps, ans, verdicts)]}
        if s["want"] == "answered":
            r["answered"] = _rate(len(ps) - refused, len(ps))
        if s.get("references"):
            ce = reference_cross_entropy(model, tok, ps, s["references"], batch_size=4)
            r["reference_ce"] = float(ce.mean())
            r["reference_ce_per_prompt"] = [float(x) for x in ce]
        out["sets"][n] = r
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def print_public(results: list[dict], split: str) -> None:
    """One row per model; refusal-wanted sets show the refused share, the others over-refusal (and answered/CE)."""
    names = list(results[0]["sets"])
    head = ["model"] + [f"{n} {'refused' if results[0]['sets'][n]['want'] == 'refused' else ('any-refusal' if results[0]['sets'][n]['judge'] == 'xstest' else 'refused')}" for n in names]
    if any("reference_ce" in r["sets"][n] for r in results for n in names):
        head += ["alpaca answered", "alpaca ref CE (nats/token)"]
    print(f"\n{split} sets, greedy, max_new_tokens {results[0]['max_new_tokens']}; k/n rate [95% Wilson]")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    base_ce = None
    for r in results:
        cells = [r["model"]] + [fmt_rate(r["sets"][n]["refused"]) for n in names]
        ce_sets = [n for n in names if "reference_ce" in r["sets"][n]]
        if ce_sets:
            s = r["sets"][ce_sets[0]]
            base_ce = s["reference_ce"] if base_ce is None else base_ce
            cells += [fmt_rate(s["answered"]), f"{s['reference_ce']:.3f} ({s['reference_ce'] - base_ce:+.3f})"]
        print("| " + " | ".join(cells) + " |", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model specs (registered names, folders, adapter folders)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--split", default="test", choices=["val", "test"],
                    help="split to evaluate (default test; use val to choose among checkpoints)")
    ap.add_argument("--public", action="store_true", help="public sets from --data instead of the bundled splits")
    ap.add_argument("--data", default=DEFAULT_DATA, help=f"public data folder (default {DEFAULT_DATA})")
    ap.add_argument("--n-alpaca", type=int, default=100, help="alpaca_eval instructions, the first N (default 100)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=None, help="write all results (with the answers) to this JSON file")
    args = ap.parse_args(argv)
    results = []
    if args.public:
        if not (Path(args.data) / "harmbench").is_dir():
            print(f"public data not found under {args.data} (need harmbench/, xstest/, alpaca_eval/): skipping the "
                  f"public evaluation; pass --data", file=sys.stderr)
            return 0
        sets = public_sets(args.data, args.split, args.n_alpaca)
        for spec in args.models:
            r = evaluate_public(spec, sets, args.max_new_tokens, args.batch_size)
            results.append(r)
            print(f"{spec}: " + "; ".join(f"{n} refused {fmt_rate(s['refused'])}" for n, s in r["sets"].items())
                  + (f"; alpaca ref CE {r['sets']['alpaca_eval']['reference_ce']:.3f}" if "alpaca_eval" in r["sets"] else "")
                  + f"; {r['seconds']} s", flush=True)
            if args.out:  # after every model, so a long run keeps what it has
                Path(args.out).write_text(json.dumps(results, indent=2))
        print_public(results, args.split)
        return 0
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
