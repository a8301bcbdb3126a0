"""Generation benchmark: tokens/s of batched greedy generation, plain, under ablation hooks, with weight
orthogonalisation, and Hugging Face's ``model.generate`` as the peer, in one run.

Modes (same prompts, same length-sorted left-padded batches, greedy, fp32):

* ``plain``: :func:`pysafegeom.generate.generate`, no intervention (the floor);
* ``hooks``: the same inside :func:`pysafegeom.interventions.ablate` (every layer: block inputs and
  attention and MLP outputs, all positions) with a unit direction;
* ``weight-orth``: the same inside :func:`pysafegeom.interventions.orthogonalize` (the writers' weights
  edited in place, restored on exit; the one-off edit is timed separately). Where that API is absent, a
  deep copy of the model is orthogonalised with :func:`pysafegeom.ops.orthogonalize_weight` over
  ``ModelAdapter(model).residual_writers()`` (lm_head untied);
* ``HF generate``: ``model.generate(do_sample=False)`` on the same batches (the peer).

Every answer is forced to the full ``--max-new-tokens`` (``min_new_tokens`` = ``max_new_tokens``: the
stop tokens are masked out, in every mode), so every mode generates the same number of tokens. ``tok/s``
counts generated tokens over the wall time of the whole call (formatting, prefill and decoding).
Timing: one warm-up call per mode (4 tokens), then ``--repeats`` rounds of one call per mode in
rotating order; the median is reported, and ``paired vs plain`` is the median over rounds of the mode's
time over plain's time in the same round (robust to load that drifts between rounds). The sanity columns compare generated token ids: ``hooks`` and
``weight-orth`` should agree with each other (the two forms of the same ablation), ``HF generate``
with ``plain``.

    python bench/generate.py                        # SmolLM2-135M-Instruct, 8 harmful + 8 harmless, 64 tokens
    python bench/generate.py --quick                # smoke run: 4 prompts x 8 tokens, 1 repeat
    python bench/generate.py --threads 1 --csv generate.csv
    python bench/generate.py --model tiny-llama-d256-l8   # where the per-step Python overhead shows
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_line, markdown_table, median, write_csv  # noqa: E402

MODES = ("plain", "hooks", "weight-orth", "hf")
LABELS = {"plain": "plain (ours)", "hooks": "hooks: ablate, every layer", "weight-orth": "weight-orth",
          "hf": "HF generate (peer)"}


def _prompts(n: int) -> list[str]:
    from pysafegeom.data import load_default

    h = [p.text for p in load_default("harmful", "test")]
    b = [p.text for p in load_default("harmless", "test")]
    k = (n + 1) // 2
    return h[:k] + b[:n - k]


def _direction(model, tok, how: str, n: int = 16):
    """A unit direction ``[d]``: harmful-minus-harmless mean of the residual at the last prompt token at the
    middle layer (train split), or a seeded random one."""
    import torch

    from pysafegeom.data import load_default
    from pysafegeom.models import ModelAdapter
    from pysafegeom.prompts import format_prompts

    ad = ModelAdapter(model)
    if how == "random":
        v = torch.randn(ad.d_model, generator=torch.Generator().manual_seed(0))
        return v / v.norm(), "random (seed 0)"
    layer = ad.n_layers // 2
    means = []
    for name in ("harmful", "harmless"):
        fb = format_prompts(tok, [p.text for p in load_default(name, "train")][:n])
        with torch.inference_mode():
            hs = model(input_ids=fb.input_ids, attention_mask=fb.attention_mask, output_hidden_states=True).hidden_states
        means.append(hs[layer][:, -1].float().mean(0))
    v = means[0] - means[1]
    return v / v.norm(), f"harmful - harmless mean, resid_pre layer {layer}, t_post_inst ({n}+{n} train prompts)"


def _orth_copy(model, direction):
    """Fallback for a missing ``interventions.orthogonalize``: an orthogonalised deep copy (head untied)."""
    import torch

    from pysafegeom import ops
    from pysafegeom.models import ModelAdapter

    m = copy.deepcopy(model)
    ad = ModelAdapter(m)
    with torch.no_grad():
        if ad.lm_head.weight.data_ptr() == ad.embed.weight.data_ptr():
            ad.lm_head.weight = torch.nn.Parameter(ad.lm_head.weight.detach().clone(), requires_grad=False)
        Q = direction[:, None].to(ad.device, torch.float32)
        for w in ad.residual_writers():
            ops.orthogonalize_weight(w.module.weight, Q, w.residual_dim, inplace=True)
            b = getattr(w.module, "bias", None)
            if b is not None and w.name not in ("embed", "pos_embed"):
                ops.orthogonalize_weight(b[None], Q, 1, inplace=True)
    return m


def _runners(model, tok, prompts, direction, bs):
    """``mode -> fn(max_new_tokens) -> (seconds, [[token ids]] in prompt order)``, plus notes."""
    import torch

    from pysafegeom.interventions import hooks as interventions
    from pysafegeom.generation import generate, stop_token_ids
    from pysafegeom.prompts import format_prompts

    notes = {}
    stops = stop_token_ids(tok)

    def ours(m):
        def run(n_new):
            t0 = time.perf_counter()
            res = generate(m, tok, prompts, max_new_tokens=n_new, min_new_tokens=n_new, batch_size=bs,
                           progress=False, return_details=True)
            return time.perf_counter() - t0, res.token_ids
        return run

    def hooks(n_new):
        with interventions.ablate(model, direction):
            return ours(model)(n_new)

    if hasattr(interventions, "orthogonalize"):
        notes["weight-orth"] = "interventions.orthogonalize (in place, exact restore)"
        edit = []

        def orth(n_new):
            t0 = time.perf_counter()
            with interventions.orthogonalize(model, direction):
                t1 = time.perf_counter()
                s, ids = ours(model)(n_new)
                t2 = time.perf_counter()
            edit.append((t1 - t0) + (time.perf_counter() - t2))
            notes["weight-orth edit+restore s"] = median(edit)
            return s, ids
    else:
        notes["weight-orth"] = "deep copy orthogonalised with ops.orthogonalize_weight (interventions.orthogonalize absent)"
        orth = ours(_orth_copy(model, direction))

    order = sorted(range(len(prompts)), key=lambda i: -len(format_prompts(tok, [prompts[i]]).input_ids[0]))

    def hf(n_new):
        t0 = time.perf_counter()
        out = [None] * len(prompts)
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            fb = format_prompts(tok, [prompts[i] for i in idx])
            with torch.inference_mode():
                g = model.generate(input_ids=fb.input_ids, attention_mask=fb.attention_mask, do_sample=False,
                                   max_new_tokens=n_new, min_new_tokens=n_new, eos_token_id=stops,
                                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stops[0])
            for i, row in zip(idx, g[:, fb.input_ids.shape[1]:].tolist()):
                out[i] = row
        return time.perf_counter() - t0, out

    return {"plain": ours(model), "hooks": hooks, "weight-orth": orth, "hf": hf}, notes


def _same(a, b) -> str:
    rows = sum(x == y for x, y in zip(a, b))
    toks = sum(p == q for x, y in zip(a, b) for p, q in zip(x, y))
    total = sum(len(x) for x in a)
    return "identical" if rows == len(a) else f"{rows}/{len(a)} rows, {toks}/{total} tokens"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="a load_model spec, or tiny-ARCH-dD-lN (a random model with SmolLM2's tokenizer, as in capture.py)")
    p.add_argument("--n", type=int, default=16, help="prompts (half bundled harmful, half harmless, test split)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt (forced, no early stop)")
    p.add_argument("--batch-size", dest="bs", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    p.add_argument("--direction", choices=("mean-diff", "random"), default="mean-diff")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 prompts x 8 tokens, 1 repeat")
    p.add_argument("--csv", help="also write the results to this CSV")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.max_new_tokens, args.repeats = 4, 8, 1
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown modes {bad}; choose from {', '.join(MODES)}")
    if "plain" not in modes:
        modes.insert(0, "plain")

    import torch

    from capture import _load

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tok = _load(args.model, args.device)
    model.float()
    prompts = _prompts(args.n)
    direction, dir_desc = _direction(model, tok, args.direction)
    runners, notes = _runners(model, tok, prompts, direction, args.bs)

    print(f"[{args.model}] warm-up ...", file=sys.stderr, flush=True)
    for m in modes:
        runners[m](4)
    times = {m: [] for m in modes}
    ids = {}
    for r in range(args.repeats):
        rot = modes[r % len(modes):] + modes[:r % len(modes)]
        for m in rot:
            s, out = runners[m](args.max_new_tokens)
            times[m].append(s)
            ids[m] = out
            print(f"[{args.model}] round {r + 1}/{args.repeats} {m}: {s:.2f} s", file=sys.stderr, flush=True)

    n_tok = args.n * args.max_new_tokens
    floor = median(times["plain"])
    vs = {"plain": "—", "hf": _same(ids["hf"], ids["plain"]) + " vs plain" if "hf" in ids else ""}
    if "hooks" in ids and "weight-orth" in ids:
        same = _same(ids["hooks"], ids["weight-orth"])
        vs["hooks"] = vs["weight-orth"] = same + " (hooks vs weight-orth)"
    changed = {m: sum(x != y for x, y in zip(ids[m], ids["plain"])) for m in ("hooks", "weight-orth") if m in ids}
    rows = []
    for m in modes:
        t = times[m]
        rows.append({
            "mode": LABELS[m], "median s": f"{median(t):.2f}", "best s": f"{min(t):.2f}",
            "tok/s": f"{n_tok / median(t):.0f}", "vs plain": f"{median(t) / floor:.3f}",
            "paired vs plain": f"{median([x / y for x, y in zip(t, times['plain'])]):.3f}",
            "same tokens": vs.get(m, ""),
            "answers changed vs plain": f"{changed[m]}/{args.n}" if m in changed else "—",
            # raw, for the CSV
            "times": " ".join(f"{x:.4f}" for x in t), "tokens": n_tok,
        })

    print()
    print(f"machine: {machine_line(args.device)}; device {args.device}; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")
    print(f"model {args.model} (fp32); {args.n} prompts ({(args.n + 1) // 2} harmful + {args.n // 2} harmless, test split) "
          f"x {args.max_new_tokens} new tokens (forced); batch {args.bs}; median of {args.repeats} after a warm-up; "
          f"whole run {time.perf_counter() - t_start:.0f} s")
    print(f"direction: {dir_desc}")
    print()
    cols = ["mode", "median s", "best s", "tok/s", "vs plain", "paired vs plain", "same tokens", "answers changed vs plain"]
    print(markdown_table(rows, cols))
    for k, v in notes.items():
        print(f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}")
    if "hooks" in times:
        ratio = median([x / y for x, y in zip(times["hooks"], times["plain"])])
        print(f"- target hooks within 10% of plain (paired): {'met' if ratio <= 1.10 else 'not met'} ({ratio:.3f})")
    if args.csv:
        write_csv(args.csv, rows, ["mode", "times", "tokens", "median s", "best s", "tok/s", "vs plain", "paired vs plain",
                                   "same tokens",
                                   "answers changed vs plain"])
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
