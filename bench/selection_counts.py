"""Admissible-carrier counts on real models: fixed vs calibrated KL rule, before vs after the behaviour filter.

Carriers are fitted on the public refusal_direction splits (harmful_train / harmless_train, first
``--n-train`` each, behaviour-filtered R as in ``fit_carriers``); selection runs on harmful_val (all 39) and
harmless_val (first ``--n-harmless-val``) over the grid ``--layers`` x ``--positions``. One selection per
model gives everything: the calibrated rule's outcome, the fixed rule's counts (and its outcome, re-derived
from the same candidate scores), and the counts on the unfiltered validation rows.

    .venv/bin/python bench/selection_counts.py                        # the full grid: layers 8-23, all positions
    .venv/bin/python bench/selection_counts.py --layers 12-22:2 --positions eoi-1 --out /tmp/sel.json

Output: a summary per model on stdout and, with ``--out``, a JSON file with every candidate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ROOT.parent / "shared" / "data" / "refusal_direction" / "splits"


def _layers(spec: str) -> list[int]:
    """``8-23``, ``12-22:2`` or ``14,18``."""
    out: list[int] = []
    for part in spec.split(","):
        step = 1
        if ":" in part:
            part, st = part.split(":")
            step = int(st)
        if "-" in part:
            a, b = part.split("-")
            out += list(range(int(a), int(b) + 1, step))
        else:
            out.append(int(part))
    return sorted(set(out))


def _texts(name: str, n: int | None) -> list[str]:
    rows = json.loads((SPLITS / name).read_text())
    return [r["instruction"] for r in rows][:n]


def _pick(cands, key):
    ok = [c for c in cands if key(c)]
    return min(ok, key=lambda c: c.bypass) if ok else None


def run_model(name: str, args) -> dict:
    import torch

    from pysafegeom.models import load_model
    from pysafegeom.protocol.capture import capture
    from pysafegeom.protocol.carriers import fit_carriers
    from pysafegeom.protocol.selection import select_carrier
    from pysafegeom.refusal import find_refusal_tokens

    t0 = time.perf_counter()
    model, tok = load_model(name)
    rt = find_refusal_tokens(tok)
    layers = _layers(args.layers)
    hv, lv = _texts("harmful_val.json", args.n_harmful_val), _texts("harmless_val.json", args.n_harmless_val)
    sets = {"harmful": _texts("harmful_train.json", args.n_train), "harmless": _texts("harmless_train.json", args.n_train)}
    t = time.perf_counter()
    cap = capture(model, tok, sets, layers=layers, refusal_tokens=rt, progress=False)
    car = fit_carriers(cap, min_filtered=args.min_filtered)
    t_cap = time.perf_counter() - t
    positions = list(car.post_names) if args.positions == "all" else args.positions.split(",")
    t = time.perf_counter()
    sel = select_carrier(model, tok, car, hv, lv, rt, layers=layers, positions=positions, kl_rule="calibrated",
                         n_kl_controls=args.n_kl_controls, kl_percentile=args.percentile, seed=args.seed,
                         batch_size=args.batch_size, progress=not args.quiet)
    t_sel = time.perf_counter() - t
    cands = [c for c in sel.candidates if not c.pruned and c.kl == c.kl]
    ctrl = torch.tensor([v for v in sel.kl_controls if v == v], dtype=torch.float64)

    def pct(kl):  # the candidate's KL as a percentile among the random directions (ties count half)
        return float(((ctrl < kl).double().sum() + 0.5 * (ctrl == kl).double().sum()) / max(len(ctrl), 1) * 100)

    fixed = _pick(cands, lambda c: c.admissible_fixed)
    fixed_relaxed = _pick(cands, lambda c: c.kl <= sel.relaxed_threshold and c.induce >= 0)
    unf_cal = _pick(cands, lambda c: c.kl_unfiltered <= (sel.tau_cal_unfiltered or sel.kl_threshold) and c.induce_unfiltered >= 0)
    lowest_kl = sorted(cands, key=lambda c: c.kl)[:5]
    out = {
        "model": name, "layers": layers, "positions": positions, "n_candidates": len(sel.candidates),
        "carriers_fit": car.r_fit, "carrier_counts": car.counts,
        "n_val": sel.n_val, "val_filtered": sel.val_filtered,
        "baseline": {"harmful": sel.baseline_harmful, "harmless": sel.baseline_harmless, "unfiltered": sel.baseline_unfiltered},
        "kl_controls": sel.kl_controls, "kl_controls_unfiltered": sel.kl_controls_unfiltered,
        "tau_cal": sel.tau_cal, "tau_cal_unfiltered": sel.tau_cal_unfiltered,
        "n_admissible_filtered": sel.n_admissible_filtered, "n_admissible_unfiltered": sel.n_admissible_unfiltered,
        "calibrated": {"outcome": sel.outcome, "rule": sel.rule, "layer": sel.layer, "position": sel.position},
        "fixed": {"layer": fixed.layer if fixed else None, "position": fixed.position if fixed else None,
                  "relaxed_layer": fixed_relaxed.layer if fixed_relaxed else None,
                  "relaxed_position": fixed_relaxed.position if fixed_relaxed else None},
        "unfiltered_calibrated": {"layer": unf_cal.layer if unf_cal else None, "position": unf_cal.position if unf_cal else None},
        "lowest_kl": [{"layer": c.layer, "position": c.position, "kl": c.kl, "kl_pct_of_controls": pct(c.kl),
                       "bypass": c.bypass, "induce": c.induce, "kl_unfiltered": c.kl_unfiltered} for c in lowest_kl],
        "notes": sel.notes + [f"carriers: {car.fit_note}"],
        "seconds": {"capture": round(t_cap, 1), "selection": round(t_sel, 1), "total": round(time.perf_counter() - t0, 1)},
        "candidates": [{"layer": c.layer, "position": c.position, "bypass": c.bypass, "induce": c.induce, "kl": c.kl,
                        "bypass_unfiltered": c.bypass_unfiltered, "induce_unfiltered": c.induce_unfiltered,
                        "kl_unfiltered": c.kl_unfiltered, "admissible_fixed": c.admissible_fixed,
                        "admissible_calibrated": c.admissible_calibrated} for c in sel.candidates],
    }
    del model
    return out


def summary(r: dict) -> str:
    f = lambda x: "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))  # noqa: E731
    lines = [
        f"== {r['model']}: {r['n_candidates']} candidates (layers {r['layers']}, positions {r['positions']}); "
        f"carriers {r['carriers_fit']} {r['carrier_counts']}",
        f"   val prompts {r['n_val']}  filtered sides {r['val_filtered']}",
        f"   baseline harmful {f(r['baseline']['harmful'])} harmless {f(r['baseline']['harmless'])} "
        f"(unfiltered {f(r['baseline']['unfiltered']['harmful'])} / {f(r['baseline']['unfiltered']['harmless'])})",
        f"   random-direction KLs {[round(v, 3) for v in r['kl_controls']]}  tau_cal {f(r['tau_cal'])} "
        f"(unfiltered {f(r['tau_cal_unfiltered'])})",
        f"   admissible after filter {r['n_admissible_filtered']}  before {r['n_admissible_unfiltered']}",
        f"   calibrated: {r['calibrated']}  fixed: {r['fixed']}  unfiltered+calibrated: {r['unfiltered_calibrated']}",
        "   lowest KL: " + "; ".join(f"L{c['layer']} {c['position']} kl {c['kl']:.3f} (p{c['kl_pct_of_controls']:.0f} of "
                                    f"controls) bypass {c['bypass']:.2f} induce {c['induce']:.2f}" for c in r["lowest_kl"]),
        f"   seconds {r['seconds']}",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "smollm2-135m-safety"])
    ap.add_argument("--layers", default="8-23", help="e.g. 8-23, 12-22:2 or 14,18")
    ap.add_argument("--positions", default="all", help="'all' or a comma list such as eoi-1,eoi-2")
    ap.add_argument("--n-train", type=int, default=128)
    ap.add_argument("--n-harmful-val", type=int, default=None, help="default: all 39")
    ap.add_argument("--n-harmless-val", type=int, default=32)
    ap.add_argument("--n-kl-controls", type=int, default=8)
    ap.add_argument("--percentile", type=float, default=50.0)
    ap.add_argument("--min-filtered", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    results = []
    for name in args.models:
        r = run_model(name, args)
        results.append(r)
        print(summary(r), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
