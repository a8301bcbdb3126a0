"""Capture benchmark: tokens/s and peak memory for reading the residual stream at the protocol positions.

Every method reads ``resid_pre`` of every layer (plus the residual after the last block) at ``t_inst`` and
the post-instruction positions of the bundled harmful + harmless prompts, end to end from the prompt
texts (chat formatting and tokenisation included):

* ``floor (sorted)`` / ``floor (naive)``: a plain ``model(input_ids, attention_mask, use_cache=False)`` with
  no capture, on the same length-bucketed batches as ``capture`` / on unsorted per-set batches (what
  peer code does); ``floor body (sorted)``: the decoder body only (``model.base_model``, no LM head);
* ``output_hidden_states``: a full forward with ``output_hidden_states=True``, then a gather at the
  positions (unsorted batches);
* ``pre-hooks``: plain forward pre-hooks on every block (and the final norm) that store the gathered
  positions per layer, refusal_direction style, the whole forward incl. the LM head (unsorted batches);
* ``ours``: :func:`pysafegeom.protocol.capture.capture`; ``ours + refusal``: with ``refusal_tokens``
  (the LM head runs on the last row only);
* ``TransformerLens`` / ``nnsight`` (the optional ``bench`` extra), when importable.

Timing: one forked process per model loads it once, warms every method up on one batch, then runs
``--repeats`` rounds of one pass per method over all prompts (rotating order, so drifting machine load
spreads over the methods); the median pass is reported (``best s``: the fastest). Memory: a fresh
forked process per method, one pass, the peak above the loaded-model baseline: RSS on CPU (VmHWM after
``/proc/self/clear_refs``), ``torch.cuda.max_memory_allocated`` on CUDA. ``tok/s`` counts real
(unpadded) prompt tokens; every method uses the same batch size. The sanity columns give the max abs
difference from ``ours`` of the per-prompt activations at ``t_inst`` and ``eoi-1`` at layers 1 and L/2,
and at L (after the last block).

    python bench/capture.py                 # SmolLM2-135M-Instruct + a tiny llama (d=256, 8 layers)
    python bench/capture.py --quick         # smoke run (tiny model), under a minute on CPU
    python bench/capture.py --n 64 --device cuda --csv capture.csv
    PSG_BENCH_TOKENIZER=path/to/tokenizer python bench/capture.py --models tiny-llama-d1024-l16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import PeakMemory, fmt_bytes, machine_line, markdown_table, median, run_isolated, timed, write_csv  # noqa: E402

SMOLLM2 = "smollm2-135m-instruct"
METHODS = {
    "floor_sorted": "floor (sorted)",
    "floor_naive": "floor (naive)",
    "floor_body": "floor body (sorted)",
    "hidden_states": "output_hidden_states",
    "hooks": "pre-hooks",
    "ours": "ours",
    "ours_refusal": "ours + refusal",
    "transformer_lens": "TransformerLens",
    "nnsight": "nnsight",
}
BATCHING = {"floor_sorted": "sorted", "floor_body": "sorted", "ours": "sorted", "ours_refusal": "sorted"}
OPTIONAL = {"transformer_lens": "transformer_lens", "nnsight": "nnsight"}


# ============================================================== worker side (runs in a forked process)

def _load(spec: str, device: str):
    """``(model, tokenizer)`` for a ``load_model`` spec or ``tiny-ARCH-dD-lN`` (SmolLM2's tokenizer, or the
    tokenizer folder in ``$PSG_BENCH_TOKENIZER``)."""
    import torch
    from pysafegeom.models import load_model, resolve, tiny_model

    if spec.startswith("tiny-"):
        from transformers import AutoTokenizer

        _, arch, d, nl = spec.split("-")
        folder = os.environ.get("PSG_BENCH_TOKENIZER") or str(resolve(SMOLLM2))
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        model = tiny_model(arch, tokenizer=tok, n_layers=int(nl[1:]), d_model=int(d[1:]))
        return model.to(torch.device(device)), tok
    return load_model(spec, device=device)


def _prompts(n: int) -> dict[str, list[str]]:
    from pysafegeom.data import load_default

    return {name: [p.text for p in load_default(name)][:n] for name in ("harmful", "harmless")}


def _naive_batches(sets, bs):
    """Per set, in the given order, chunks of ``bs`` (peer code runs each set on its own)."""
    out, offset = [], 0
    for texts in sets.values():
        for i in range(0, len(texts), bs):
            out.append((list(range(offset + i, offset + min(i + bs, len(texts)))), texts[i:i + bs]))
        offset += len(texts)
    return out


def _sorted_batches(tok, sets, bs, max_len):
    """The same batches as ``capture``: every prompt sorted by formatted length (stable), chunks of ``bs``."""
    from pysafegeom.prompts import format_prompts

    items, offset = [], 0
    for texts in sets.values():
        fb = format_prompts(tok, texts, max_length=max_len)
        items += [(offset + i, t, n) for i, (t, n) in enumerate(zip(texts, fb.lengths))]
        offset += len(texts)
    items.sort(key=lambda it: it[2])
    return [([it[0] for it in items[i:i + bs]], [it[1] for it in items[i:i + bs]]) for i in range(0, len(items), bs)]


def _collect(chunks, n_total):
    """Per-batch ``(indices, [B, L+1, P, d])`` chunks -> ``[N, L+1, P, d]`` in the original prompt order."""
    import torch

    idx = torch.tensor([i for ix, _ in chunks for i in ix])
    acts = torch.cat([a for _, a in chunks])
    out = torch.empty((n_total,) + acts.shape[1:], dtype=acts.dtype)
    out[idx] = acts
    return out


def _runner(method, model, tok, bs, device, refusal_tokens):
    """A function ``sets -> (acts [N, L+1, P, d] float32 or None, real tokens, padded tokens)``."""
    import torch
    from pysafegeom.models import ModelAdapter
    from pysafegeom.prompts import format_prompts
    from pysafegeom.protocol.capture import capture

    ad = ModelAdapter(model)
    L = ad.n_layers
    max_len = getattr(model.config, "max_position_embeddings", None)

    def batches_for(sets):
        if BATCHING.get(method) == "sorted":
            return _sorted_batches(tok, sets, bs, max_len)
        return _naive_batches(sets, bs)

    if method in ("ours", "ours_refusal"):
        def run(sets):
            cap = capture(model, tok, sets, batch_size=bs, progress=False,
                          refusal_tokens=refusal_tokens if method == "ours_refusal" else None)
            # per-prompt activations kept at t_inst and eoi-1: [N, L+1, 2, d]
            acts = torch.cat([torch.stack([cap.per_prompt[s]["t_inst"], cap.per_prompt[s]["eoi-1"]], dim=2)
                              for s in sets])
            return acts, cap.n_tokens, cap.n_padded_tokens
        return run

    if method.startswith("floor"):
        fwd = model.base_model if method == "floor_body" else model

        def run(sets):
            n_tok = n_pad = 0
            with torch.no_grad():
                for _, texts in batches_for(sets):
                    fb = format_prompts(tok, texts, device=device)
                    fwd(input_ids=fb.input_ids, attention_mask=fb.attention_mask, use_cache=False)
                    n_tok += int(fb.attention_mask.sum())
                    n_pad += fb.input_ids.numel()
            return None, n_tok, n_pad
        return run

    def gather(h, pos):  # [B, T, d] at [B, P] -> [B, P, d]
        return h.gather(1, pos[:, :, None].expand(-1, -1, h.shape[-1]))

    if method == "hidden_states":
        def run(sets):
            chunks, n_tok, n_pad = [], 0, 0
            with torch.no_grad():
                for ix, texts in batches_for(sets):
                    fb = format_prompts(tok, texts, device=device)
                    out = model(input_ids=fb.input_ids, attention_mask=fb.attention_mask, use_cache=False,
                                output_hidden_states=True)
                    pos = fb.positions
                    chunks.append((ix, torch.stack([gather(h, pos) for h in out.hidden_states], 1).float().cpu()))
                    n_tok += int(fb.attention_mask.sum())
                    n_pad += fb.input_ids.numel()
            return _collect(chunks, sum(map(len, sets.values()))), n_tok, n_pad
        return run

    if method == "hooks":
        state = {}

        def pre_hook(slot):
            def hook(mod, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                state["rows"][slot] = gather(h, state["pos"])
            return hook

        def run(sets):
            chunks, n_tok, n_pad = [], 0, 0
            mods = list(ad.layers) + [ad.final_norm]
            handles = [m.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, m in enumerate(mods)]
            try:
                with torch.no_grad():
                    for ix, texts in batches_for(sets):
                        fb = format_prompts(tok, texts, device=device)
                        state["pos"], state["rows"] = fb.positions, [None] * (L + 1)
                        model(input_ids=fb.input_ids, attention_mask=fb.attention_mask, use_cache=False)
                        chunks.append((ix, torch.stack(state["rows"], 1).float().cpu()))
                        n_tok += int(fb.attention_mask.sum())
                        n_pad += fb.input_ids.numel()
            finally:
                for h in handles:
                    h.remove()
            return _collect(chunks, sum(map(len, sets.values()))), n_tok, n_pad
        return run

    if method == "transformer_lens":  # the bench extra; not exercised where it is not installed
        from transformer_lens import HookedTransformer

        name = getattr(model.config, "_name_or_path", "") or "llama"
        tl = HookedTransformer.from_pretrained_no_processing(
            name, hf_model=model, tokenizer=tok, device=str(device), dtype=ad.dtype, default_padding_side="left")
        names = {f"blocks.{l}.hook_resid_pre" for l in range(L)} | {f"blocks.{L - 1}.hook_resid_post"}

        def run(sets):
            chunks, n_tok, n_pad = [], 0, 0
            with torch.no_grad():
                for ix, texts in batches_for(sets):
                    fb = format_prompts(tok, texts, device=device)
                    _, cache = tl.run_with_cache(fb.input_ids, attention_mask=fb.attention_mask,
                                                 names_filter=lambda n: n in names)
                    hs = [cache[f"blocks.{l}.hook_resid_pre"] for l in range(L)] + [cache[f"blocks.{L - 1}.hook_resid_post"]]
                    chunks.append((ix, torch.stack([gather(h, fb.positions) for h in hs], 1).float().cpu()))
                    n_tok += int(fb.attention_mask.sum())
                    n_pad += fb.input_ids.numel()
            return _collect(chunks, sum(map(len, sets.values()))), n_tok, n_pad
        return run

    if method == "nnsight":  # the bench extra; not exercised where it is not installed
        from nnsight import NNsight

        nn_model = NNsight(model)
        layer_paths = []
        for l in range(L):  # find the same modules on the nnsight envoy by attribute path
            layer_paths.append(next(n for n, m in model.named_modules() if m is ad.layers[l]))
        norm_path = next(n for n, m in model.named_modules() if m is ad.final_norm)

        def envoy(path):
            obj = nn_model
            for part in path.split("."):
                obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
            return obj

        def run(sets):
            chunks, n_tok, n_pad = [], 0, 0
            with torch.no_grad():
                for ix, texts in batches_for(sets):
                    fb = format_prompts(tok, texts, device=device)
                    with nn_model.trace(input_ids=fb.input_ids, attention_mask=fb.attention_mask, use_cache=False):
                        saved = [envoy(p).input.save() for p in layer_paths + [norm_path]]
                    hs = [s.value if hasattr(s, "value") else s for s in saved]
                    hs = [h[0] if isinstance(h, (tuple, list)) else h for h in hs]
                    chunks.append((ix, torch.stack([gather(h, fb.positions) for h in hs], 1).float().cpu()))
                    n_tok += int(fb.attention_mask.sum())
                    n_pad += fb.input_ids.numel()
            return _collect(chunks, sum(map(len, sets.values()))), n_tok, n_pad
        return run

    raise ValueError(f"unknown method {method!r}")


def _setup(spec, n, device):
    import torch
    from pysafegeom.models import ModelAdapter

    model, tok = _load(spec, device)
    sets = _prompts(n)
    refusal_tokens = sorted({tok(w, add_special_tokens=False)["input_ids"][0] for w in ("I", "Sorry", "As")})
    return model, tok, ModelAdapter(model), sets, refusal_tokens, torch.device(device)


def _warm(run, sets, bs):
    k = max(1, min(bs, min(map(len, sets.values()))) // 2)
    run({name: texts[:k] for name, texts in sets.items()})  # one batch of bs prompts


def time_worker(methods, spec, n, bs, repeats, device, tmp) -> dict:
    """All methods on one loaded model, interleaved: warm each up, then ``repeats`` rounds of one pass each.

    Interleaving (with a rotating order) spreads drifting machine load evenly over the methods. The
    per-prompt activations of the last pass are saved (``t_inst``, ``eoi-1`` at layers 1, L/2, L) for
    the sanity check.
    """
    import torch

    model, tok, ad, sets, refusal_tokens, dev = _setup(spec, n, device)
    L = ad.n_layers
    runs = {m: _runner(m, model, tok, bs, dev, refusal_tokens) for m in methods}
    for m in methods:
        _warm(runs[m], sets, bs)
    times = {m: [] for m in methods}
    last = {}
    for r in range(repeats):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for m in order:
            last[m] = None  # drop the previous pass's activations first
            t, last[m] = timed(lambda: runs[m](sets), dev)
            times[m].append(t)
    out = {}
    for m in methods:
        acts, n_tok, n_pad = last[m]
        path = None
        if acts is not None:
            if acts.shape[2] != 2:  # all P positions stored: keep t_inst (first) and eoi-1 (last)
                acts = acts[:, :, [0, acts.shape[2] - 1]]
            path = os.path.join(tmp, f"{spec}-{m}.pt")
            torch.save(acts[:, [1, L // 2, L]].contiguous(), path)
        out[m] = {"times": times[m], "wall_s": median(times[m]), "tokens": n_tok, "padded": n_pad, "acts": path,
                  "n_layers": L, "d_model": ad.d_model, "batch_size": bs}
    return out


def memory_worker(method, spec, n, bs, device) -> int:
    """Peak memory (bytes above the loaded-model baseline) of one method over one full pass."""
    import torch

    model, tok, ad, sets, refusal_tokens, dev = _setup(spec, n, device)
    with torch.no_grad():  # page in memory-mapped weights now, so the baseline holds the whole model
        for t in list(model.parameters()) + list(model.buffers()):
            t.sum()
    mem = PeakMemory(device)
    mem.start()  # the runner's own setup (e.g. a TransformerLens conversion) is counted
    run = _runner(method, model, tok, bs, dev, refusal_tokens)
    res = run(sets)
    peak = mem.delta()
    del res
    return peak


# ============================================================== parent side

def _available(method: str) -> bool:
    import importlib.util

    mod = OPTIONAL.get(method)
    return mod is None or importlib.util.find_spec(mod) is not None


def bench_model(spec, methods, args, tmp) -> tuple[dict, list[str]]:
    """Timing (one process, methods interleaved), then memory (a fresh process per method).

    The parent runs no torch kernels until every fork is done (fork safety).
    """
    notes = []
    avail = []
    for m in methods:
        if _available(m):
            avail.append(m)
        else:
            notes.append(f"{METHODS[m]}: not installed (pip install '.[bench]'), skipped")
    iso = not args.no_isolate
    n = args.n_for[spec]
    results = {}
    print(f"[{spec}] timing {len(avail)} methods x {args.repeats} passes ...", file=sys.stderr, flush=True)
    try:
        results = run_isolated(time_worker, avail, spec, n, args.bs, args.repeats, args.device, tmp, isolate=iso)
    except Exception as exc:  # a failing optional method: time the rest without it
        print(str(exc), file=sys.stderr)
        for m in [m for m in avail if m in OPTIONAL]:
            try:
                results.update(run_isolated(time_worker, [m], spec, n, args.bs, args.repeats, args.device, tmp,
                                            isolate=iso))
            except Exception as e:
                notes.append(f"{METHODS[m]}: failed ({str(e).strip().splitlines()[0]})")
        core = [m for m in avail if m not in OPTIONAL]
        results.update(run_isolated(time_worker, core, spec, n, args.bs, args.repeats, args.device, tmp, isolate=iso))
    for m in list(results):
        if args.no_memory:
            results[m]["peak"] = None
            continue
        print(f"[{spec}] memory: {METHODS[m]} ...", file=sys.stderr, flush=True)
        try:
            results[m]["peak"] = run_isolated(memory_worker, m, spec, n, args.bs, args.device, isolate=iso)
        except Exception as exc:
            results[m]["peak"] = None
            notes.append(f"{METHODS[m]}: memory run failed ({str(exc).strip().splitlines()[0]})")
    return {m: results[m] for m in methods if m in results}, notes


def _rows(spec, results) -> list[dict]:
    import torch

    ref = results.get("ours")
    ref_acts = torch.load(ref["acts"]) if ref and ref["acts"] else None
    floor = results.get("floor_sorted")
    naive = results.get("floor_naive")
    rows = []
    for m, r in results.items():
        row = {
            "model": spec, "method": METHODS[m], "batching": BATCHING.get(m, "naive"),
            "wall s": f"{r['wall_s']:.3f}", "best s": f"{min(r['times']):.3f}", "tok/s": f"{r['tokens'] / r['wall_s']:.0f}",
            "vs floor": f"{r['wall_s'] / floor['wall_s']:.3f}" if floor else "",
            "vs naive floor": f"{r['wall_s'] / naive['wall_s']:.3f}" if naive else "",
            "peak mem": fmt_bytes(r["peak"]), "padding": f"{1 - r['tokens'] / r['padded']:.1%}",
            "max|Δ| L1,L/2": "—", "max|Δ| L": "—",
            # raw numbers for the CSV
            "wall_s": r["wall_s"], "times": " ".join(f"{t:.4f}" for t in r["times"]), "tokens": r["tokens"],
            "padded_tokens": r["padded"], "peak_bytes": r["peak"], "n_layers": r["n_layers"],
            "d_model": r["d_model"], "batch_size": r["batch_size"],
        }
        if r["acts"] and ref_acts is not None:
            a = torch.load(r["acts"])
            if a.shape == ref_acts.shape:
                d = (a - ref_acts).abs().amax(dim=(0, 2, 3))  # per checked layer
                row["max|Δ| L1,L/2"] = f"{float(d[:2].max()):.1e}"
                row["max|Δ| L"] = f"{float(d[2]):.1e}"
            else:
                row["max|Δ| L1,L/2"] = f"shape {tuple(a.shape)}"
        rows.append(row)
    return rows


COLUMNS = ["model", "method", "batching", "wall s", "best s", "tok/s", "vs floor", "vs naive floor", "peak mem", "padding",
           "max|Δ| L1,L/2", "max|Δ| L"]
CSV_COLUMNS = ["model", "method", "batching", "wall_s", "times", "tokens", "padded_tokens", "peak_bytes",
               "n_layers", "d_model", "batch_size", "vs floor", "vs naive floor", "max|Δ| L1,L/2", "max|Δ| L"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=f"{SMOLLM2},tiny-llama-d256-l8",
                   help="comma-separated: smollm2-135m-instruct (or any load_model spec) and tiny-ARCH-dD-lN")
    p.add_argument("--n", type=int, default=None,
                   help="prompts per set (harmful and harmless); default 64, 16 for a full-size model on CPU")
    p.add_argument("--batch-size", dest="bs", type=int, default=8, help="prompts per batch, every method")
    p.add_argument("--repeats", type=int, default=4, help="timed passes per method (median reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--quick", action="store_true",
                   help="smoke run: the tiny model only (unless --models), 4+4 prompts, 1 repeat, batch 4")
    p.add_argument("--no-isolate", action="store_true", help="run everything in this process (memory less exact)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method peak-memory runs")
    p.add_argument("--csv", help="also write the results to this CSV")
    args = p.parse_args(argv)

    if args.quick:
        args.n, args.repeats, args.bs = args.n or 4, 1, 4
        if args.models == p.get_default("models"):
            args.models = "tiny-llama-d256-l8"
    specs = [s.strip() for s in args.models.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    if "ours" not in methods:
        methods.append("ours")  # the sanity reference
    cpu = not args.device.startswith("cuda")
    args.n_for = {s: args.n or (16 if cpu and not s.startswith("tiny-") else 64) for s in specs}

    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        done = []
        for spec in specs:
            res, nt = bench_model(spec, methods, args, tmp)
            done.append((spec, res))
            notes += [f"{spec}: {x}" for x in nt]
        for spec, res in done:  # torch work in the parent only after the last fork
            rows += _rows(spec, res)

    print()
    print(f"machine: {machine_line(args.device)}; device {args.device}")
    print("prompts: " + ", ".join(f"{s} {k}+{k}" for s, k in args.n_for.items())
          + f"; batch {args.bs}; median of {args.repeats} (after 1 warm-up batch)")
    print()
    print(markdown_table(rows, COLUMNS))
    if any(r["method"] == METHODS["hidden_states"] for r in rows):
        notes.append("output_hidden_states: Hugging Face's last hidden state is taken after the final norm, so at L it "
                     "is not the residual after the last block (the large max|Δ| L); layers < L agree")
    notes.append("a small nonzero max|Δ| for naive-batch methods is float rounding from other batch shapes and "
                 "padding (ours: same batches as the sorted floor)")
    for line in notes:
        print(f"- {line}")
    if args.csv:
        write_csv(args.csv, rows, CSV_COLUMNS)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
