"""Command-line handlers of ``pysafegeom attack replay`` and ``pysafegeom transfer`` (wired by :mod:`pysafegeom.cli`).

``add_replay_parser(attack_subparsers)`` adds ``attack replay``; ``add_transfer_parser(subparsers)`` adds
``transfer``. Each handler returns an exit code and prints a short summary.
"""

from __future__ import annotations

import argparse

from .cli_args import _DEVICE, _DTYPE, _POS, add_placement_args, placement_from_args


def _types():
    """The checked argparse types the commands share (:mod:`pysafegeom.cli_args`)."""
    return _POS, _DEVICE, _DTYPE


def _list(text: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing; give one or more comma-separated items")
    return items


def default_specs() -> tuple[str, ...]:
    """The judges of the attack, replay and transfer commands without ``--judge``: the substring judge (it
    decides) plus the local model judge (the model under test, the default classifier prompt)."""
    from .behaviour.judge_spec import DEFAULT_JUDGE_SPECS

    return tuple(DEFAULT_JUDGE_SPECS)


def build_judges(specs, *, model=None, tokenizer=None, device=None, dtype=None, default: bool = True) -> list | None:
    """Judges named by ``--judge`` specs (:func:`pysafegeom.behaviour.judge_spec.judges_from_specs`); none
    given: :func:`default_specs` (``default=False`` or no model: None, the library default)."""
    if not specs:
        if not default or model is None:
            return None
        from .behaviour.judge_spec import judges_from_specs
        from .errors import InvalidArgument

        try:
            return judges_from_specs(default_specs(), model=model, tokenizer=tokenizer, device=device, dtype=dtype)
        except InvalidArgument as exc:  # e.g. a tokenizer that cannot spell distinct yes/no answers
            import sys

            print(f"note: the local model judge is off for this model ({exc}); judging by substring only",
                  file=sys.stderr)
            return judges_from_specs(default_specs()[:1])
    from .behaviour.judge_spec import judges_from_specs

    return judges_from_specs(specs, model=model, tokenizer=tokenizer, device=device, dtype=dtype)


def _needs_target(specs) -> bool:
    from .behaviour.judge_spec import parse_judge_spec

    return any(parse_judge_spec(s).needs_model_under_test for s in specs or [])


def _judges_per_target(args):
    """The judges of ``--judge`` for commands that load their targets themselves: a callable building them beside
    each target when one of them uses the target model (the default's local judge does), else the built list."""
    if not args.judge or _needs_target(args.judge):
        def judges(model, tok):
            return build_judges(args.judge, model=model, tokenizer=tok, device=args.device, dtype=args.dtype)

        return judges
    return build_judges(args.judge, device=args.device, dtype=args.dtype)


def _common(p, pos, dev, dt) -> None:
    p.add_argument("--out", required=True, help="output folder (resumed when it holds an earlier run)")
    p.add_argument("--max-new-tokens", type=pos, default=64,
                   help="greedy tokens per answer (default 64, recorded in the summary; HarmBench uses 512)")
    p.add_argument("--judge", action="append", default=None, metavar="SPEC",
                   help="a judge (repeatable; the first decides): substring, xstest, model (the target model as a "
                        "local judge), model:SPEC[:preset=NAME], harmbench:SPEC (default: substring, then model)")
    p.add_argument("--template", default=None, help="chat template (default: the tokenizer's own; or a name or Jinja)")
    p.add_argument("--system", default=None, help="optional system prompt")
    p.add_argument("--batch-size", type=pos, default=16, help="prompts per generation batch (default 16)")
    p.add_argument("--device", type=dev, default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", type=dt, default=None, help="float32, bfloat16 or float16 (default: by device)")
    p.add_argument("--no-resume", action="store_true", help="regenerate every answer, ignoring those cached in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a folder in --out not written by this command")
    add_placement_args(p)
    from .cli_args import add_ray_args

    add_ray_args(p)
    p.add_argument("--shard-size", type=pos, default=None, help="with --ray: test cases per task (whole batches; "
                   "default 4 batches)")


def _print_summary(summary: dict) -> None:
    from .attacks.replay import fmt_rate

    print(f"{summary['n_test_cases']} test cases ({summary['n_unique_test_cases']} distinct, "
          f"{summary['n_generated']} generated now) on {summary['target']['name']}; judge "
          f"{summary['primary_judge']}, max_new_tokens={summary['max_new_tokens']}")
    for m, r in summary["per_method"].items():
        print(f"  {m:<24} ASR {fmt_rate(r)}")
    print(f"  {'overall':<24} ASR {fmt_rate(summary['overall'])}")
    for j, r in (summary.get("per_judge") or {}).items():
        if j != summary["primary_judge"]:
            print(f"  {'judged by ' + j:<24} ASR {fmt_rate(r)} (recorded; {summary['primary_judge']} decides)")


def cmd_replay(args) -> int:
    """``attack replay``: replay stored test cases on one model."""
    from .attacks.replay import replay
    from .cli_args import ray_from_args

    ropts = ray_from_args(args)
    if ropts is not None:  # the workers load the target; judges that need it are built beside it
        summary = replay(args.cases, args.model, out=args.out, judges=_judges_per_target(args), max_new_tokens=args.max_new_tokens,
                         template=args.template, system=args.system, batch_size=args.batch_size,
                         target_name=args.name or args.model, resume=not args.no_resume, overwrite=args.overwrite,
                         ray=ropts, shard_size=args.shard_size, device=args.device, dtype=args.dtype,
                         **placement_from_args(args))
        _print_summary(summary)
        print(f"results: {args.out}/results.json, summary: {args.out}/summary.json")
        return 0
    from .models import load_model

    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, **placement_from_args(args))
    judges = build_judges(args.judge, model=model, tokenizer=tok, device=args.device, dtype=args.dtype)
    summary = replay(args.cases, model, tok, out=args.out, judges=judges, max_new_tokens=args.max_new_tokens,
                     template=args.template, system=args.system, batch_size=args.batch_size,
                     target_name=args.name or args.model, resume=not args.no_resume, overwrite=args.overwrite)
    _print_summary(summary)
    print(f"results: {args.out}/results.json, summary: {args.out}/summary.json")
    return 0


def cmd_transfer(args) -> int:
    """``transfer``: replay every source on every target and print the matrix."""
    from pathlib import Path

    from .attacks.transfer import ALL, matrix_text, transfer
    from .cli_args import ray_from_args

    ropts = ray_from_args(args)
    m = transfer(args.cases, args.models, out=args.out, judges=_judges_per_target(args), max_new_tokens=args.max_new_tokens,
                 template=args.template, system=args.system, batch_size=args.batch_size, resume=not args.no_resume,
                 overwrite=args.overwrite, device=args.device, dtype=args.dtype, ray=ropts, shard_size=args.shard_size,
                 **placement_from_args(args))
    for meth in [*m["methods"], ALL]:
        print(f"\n{'all methods' if meth == ALL else meth}:")
        print(matrix_text(m, meth))
    print(f"\nreport: {Path(args.out) / 'transfer.html'}; numbers: {Path(args.out) / 'matrix.json'}")
    return 0


def add_replay_parser(attack_subparsers) -> argparse.ArgumentParser:
    """Add ``replay`` to the subparsers of ``attack``; returns its parser."""
    pos, dev, dt = _types()
    p = attack_subparsers.add_parser(
        "replay", help="replay stored test cases on a model and judge the answers",
        description="Fixed-source replay: greedy answers of --model to every test case in --cases (a test-case "
                    "store, a folder an attack wrote, a HarmBench test_cases.json or a JailbreakBench artifact; "
                    "several separated by commas), judged. Writes completions.json and results.json (HarmBench "
                    "layouts) and summary.json (ASR with 95% Wilson intervals per method and source model).",
        epilog="example: pysafegeom attack replay --cases bench/gcg_anchor --model smollm2-135m-instruct --out runs/replay")
    p.add_argument("--cases", required=True, type=_list, help="test-case folders or files, comma-separated")
    p.add_argument("--model", required=True, help="target model: folder, .gguf file or registered name")
    p.add_argument("--name", default=None, help="the target's name in the outputs (default: the --model spec)")
    _common(p, pos, dev, dt)
    p.set_defaults(func=cmd_replay)
    return p


def add_transfer_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``transfer`` to the top-level subparsers; returns its parser."""
    pos, dev, dt = _types()
    p = subparsers.add_parser(
        "transfer", help="replay every source's test cases on every target model: the transfer matrix",
        description="ASR(source -> target) with 95% Wilson intervals for every pair of a test-case source (the "
                    "model an attack ran against; direct requests are a row of their own) and a target model, per "
                    "method and over all. Targets load one at a time. Writes replay/<target>/ (resumable), "
                    "matrix.json and transfer.html (heat maps).",
        epilog="example: pysafegeom transfer --cases runs/gcg_a,runs/autodan_a --models model_a,model_b --out runs/transfer")
    p.add_argument("--cases", required=True, type=_list, help="test-case folders or files, comma-separated")
    p.add_argument("--models", required=True, type=_list, help="target models (folders, .gguf files, registered "
                   "names), comma-separated")
    _common(p, pos, dev, dt)
    p.set_defaults(func=cmd_transfer)
    return p


__all__ = ["add_replay_parser", "add_transfer_parser", "build_judges", "cmd_replay", "cmd_transfer"]
