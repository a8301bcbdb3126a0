"""Command-line handler of ``pysafegeom trajectory`` (wired by :mod:`pysafegeom.cli` with :func:`add_trajectory_parser`)."""

from __future__ import annotations

import argparse
import re


def _run(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"--run takes NAME=FOLDER (e.g. sft=runs/sft), got {text!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.]+", name):
        raise argparse.ArgumentTypeError(f"trajectory name {name!r}: use letters, digits, '_' or '.'")
    return name, folder


def _positions(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} names no position; give e.g. eoi-1,eoi-2")
    return items


def _methods(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [m for m in items if m not in ("gcg", "autodan")]
    if not items or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: give gcg, autodan or gcg,autodan")
    return items


def cmd_trajectory(args) -> int:
    """``trajectory``: measure every anchor of each run, compare them, write trajectory.json and report.html."""
    from .cli_args import placement_from_args
    from .pipelines.trajectory import trajectory
    from .cli_args import ray_from_args

    ropts = ray_from_args(args)
    runs = dict(args.run)
    if len(runs) != len(args.run):
        raise ValueError("two --run options have the same name; name each trajectory once")
    options = {k: v for k, v in (("n_val", args.n_val), ("selection_layer_stride", args.layer_stride),
                                 ("selection_positions", args.positions), ("template", args.template),
                                 ("system", args.system), ("n_kl_controls", args.n_kl_controls),
                                 ("n_behaviour", args.n_behaviour), ("common_layer", args.common_layer))
               if v is not None}
    if args.adaptive_behaviors is None and any(v is not None for v in (
            args.adaptive_targets, args.adaptive_subset, args.adaptive_methods, args.adaptive_steps, args.adaptive_width,
            args.adaptive_topk, args.adaptive_gcg_devices)):
        raise ValueError("the --adaptive-* options set up the sparse adaptive attacks: give --adaptive-behaviors FILE too")
    if args.adaptive_behaviors is not None:
        gcg = {k: v for k, v in (("num_steps", args.adaptive_steps), ("search_width", args.adaptive_width),
                                 ("topk", args.adaptive_topk), ("devices", args.adaptive_gcg_devices)) if v is not None}
        options.update(gcg=gcg, autodan={"num_steps": args.adaptive_steps} if args.adaptive_steps else {})
        if args.adaptive_subset is not None:
            options["adaptive_subset"] = args.adaptive_subset
        if args.adaptive_methods is not None:
            options["adaptive_methods"] = tuple(args.adaptive_methods)
    res = trajectory(runs, out=args.out, harmful=args.harmful, harmless=args.harmless, xstest=args.xstest,
                     benign=args.benign, cases=args.cases, force=args.force, transfer=args.transfer,
                     adaptive_behaviors=args.adaptive_behaviors, adaptive_targets=args.adaptive_targets,
                     device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                     replay_max_new_tokens=args.replay_max_new_tokens, batch_size=args.batch_size,
                     progress=not args.quiet, ray=ropts, **placement_from_args(args), **options)
    from .report import _f

    for r in res.table:
        c = r["carrier"]
        d = r.get("drift_first") or {}
        print(f"{r['trajectory']:>8} step {r['step']:>5}: carrier L{c['reference_layer']} {c['reference_position']} "
              f"({c['outcome']}, {c['n_admissible']} admissible); κ mid {_f(r['kappa_mid_band'])}; erank "
              f"{_f(r['effective_rank'], 2)}; direct ASR {_f(r['direct_asr']['value'], 2)}; XSTest "
              f"{_f(r['xstest_any_refusal']['value'], 2)}; drift {_f(d.get('common_deg'), 1)} deg")
    for f in res.findings:
        print(f"[{f['status']}] {f['finding']}")
    print(f"report: {res.out / 'report.html'}; numbers: {res.out / 'trajectory.json'}")
    return 0


def add_trajectory_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``trajectory`` to the top-level subparsers; returns its parser."""
    from .cli_replay import _types

    pos, dev, dt = _types()
    p = subparsers.add_parser(
        "trajectory", help="the protocol over every checkpoint of training runs: drift, relocation, correlations",
        description="Measure every anchor (checkpoint-N folder) of each training run with the protocol (carriers, "
                    "selection, coupling, erank), direct-request ASR, XSTest any-refusal, benign utility and (with "
                    "--cases) fixed-source replay; then relocation, drift, the behaviour state, all-anchor Spearman "
                    "correlations with exact permutation p-values and (with --transfer) the transfer analysis. Each "
                    "anchor's folder is written atomically and skipped on a rerun with the same options.",
        epilog="example: pysafegeom trajectory --run r2d2=trajectories/r2d2 --run sft=trajectories/sft "
               "--cases trajectories/fixed_source/gcg --out runs/trajectory")
    p.add_argument("--run", action="append", required=True, type=_run, metavar="NAME=FOLDER",
                   help="a training output folder with checkpoint-N/ anchors (repeat for each trajectory)")
    p.add_argument("--out", required=True, help="output folder: anchors/, trajectory.json, report.html")
    p.add_argument("--cases", default=None, help="test-case store replayed on every anchor (fixed-source ASR)")
    p.add_argument("--transfer", default=None, help="a transfer matrix.json (pysafegeom transfer) to analyse")
    p.add_argument("--adaptive-behaviors", default=None, metavar="FILE",
                   help="behaviours with targets (HarmBench or AdvBench CSV, JSONL) for sparse adaptive attacks run "
                        "against every anchor (default: none)")
    p.add_argument("--adaptive-targets", default=None, metavar="FILE", help="HarmBench targets JSON for those behaviours")
    p.add_argument("--adaptive-subset", type=pos, default=None, help="behaviours attacked per anchor, one seeded draw "
                   "shared by all anchors (default 4)")
    p.add_argument("--adaptive-methods", type=_methods, default=None, help="gcg, autodan or gcg,autodan (default gcg)")
    p.add_argument("--adaptive-steps", type=pos, default=None, help="optimisation steps per attack (default: the "
                   "method's, GCG 250 and AutoDAN 100)")
    p.add_argument("--adaptive-width", type=pos, default=None, help="GCG candidates per step (default 512)")
    p.add_argument("--adaptive-topk", type=pos, default=None, help="GCG top-k tokens per position (default 256)")
    from .cli_args import gcg_devices

    p.add_argument("--adaptive-gcg-devices", type=gcg_devices, default=None, metavar="DEV,DEV|all",
                   help="GCG's candidates scored on these devices, one model copy each (the same result as one device)")
    p.add_argument("--force", action="store_true", help="re-measure anchors whose folders were made with other options")
    p.add_argument("--harmful", default=None, help="harmful prompts file (default: the bundled set)")
    p.add_argument("--harmless", default=None, help="harmless prompts file (default: the bundled set)")
    p.add_argument("--xstest", default=None, help="XSTest-style safe prompts file (default: the bundled set)")
    p.add_argument("--benign", default=None, help="benign prompts with reference answers (default: the bundled set)")
    p.add_argument("--max-new-tokens", type=pos, default=48, help="greedy tokens per judged answer (default 48)")
    p.add_argument("--replay-max-new-tokens", type=pos, default=64, help="greedy tokens per replayed case (default 64)")
    p.add_argument("--n-behaviour", type=pos, default=None, help="cap on each behavioural test set (default: all)")
    p.add_argument("--common-layer", type=int, default=None, help="the common drift layer (default int(0.6 L))")
    p.add_argument("--n-val", type=pos, default=None, help="validation prompts per side for selection (default 32)")
    p.add_argument("--layer-stride", type=pos, default=None, help="search every n-th layer for the carrier (default 1)")
    p.add_argument("--positions", type=_positions, default=None, help="post-instruction positions to search "
                   "(default: all), e.g. eoi-1,eoi-2")
    p.add_argument("--n-kl-controls", type=pos, default=None, help="random directions calibrating the KL rule (16)")
    p.add_argument("--template", default=None, help="chat template (default: the tokenizer's own)")
    p.add_argument("--system", default=None, help="optional system prompt")
    p.add_argument("--batch-size", type=pos, default=16, help="prompts per generation batch (default 16)")
    p.add_argument("--device", type=dev, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", type=dt, default=None, help="float32, bfloat16 or float16 (default: by device)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    from .cli_args import add_placement_args
    from .cli_args import add_ray_args

    add_placement_args(p)
    add_ray_args(p)
    p.set_defaults(func=cmd_trajectory)
    return p


__all__ = ["add_trajectory_parser", "cmd_trajectory"]
