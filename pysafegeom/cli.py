"""Command line: ``pysafegeom info | positions | demo``.

Run ``pysafegeom <command> --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _cmd_info(args) -> int:
    from . import info

    data = info.collect()
    print(json.dumps(data, indent=2) if args.json else info.render(data))
    return 0


def _show_positions(model_spec: str, instructions: list[str], template: str | None, system: str | None) -> None:
    from .models import load_model
    from .prompts import format_prompts

    t0 = time.perf_counter()
    model, tok = load_model(model_spec, device="cpu")
    print(f"loaded {model_spec} in {time.perf_counter() - t0:.1f} s "
          f"({type(model).__name__}, {model.config.num_hidden_layers} layers, d={model.config.hidden_size})")
    batch = format_prompts(tok, instructions, template=template, system=system)
    print(f"template suffix (post-instruction tokens, n_post={batch.n_post}): {batch.suffix!r}")
    for b, text in enumerate(instructions):
        ti = int(batch.t_inst[b])
        post = [tok.decode([int(batch.input_ids[b, p])]) for p in batch.post_inst[b]]
        print(f"\n  {text!r}\n    t_inst      [{ti:>3}] {tok.decode([int(batch.input_ids[b, ti])])!r}"
              f"\n    post-inst   {post}\n    t_post_inst [{int(batch.post_inst[b, -1]):>3}] {post[-1]!r}")


def _cmd_positions(args) -> int:
    instructions = args.instruction or [p.text for p in _default_examples()]
    _show_positions(args.model, instructions, args.template, args.system)
    return 0


def _default_examples():
    from .data import load_default

    harmful = load_default("harmful", split="test")[:2]
    harmless = load_default("harmless", split="test")[:2]
    return harmful + harmless


def _cmd_demo(args) -> int:
    from . import info

    print(info.render(info.collect()))
    print()
    _show_positions(args.model, [p.text for p in _default_examples()], None, None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="pysafegeom", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="versions, op backends (and why any is unavailable), the model cache")
    s.add_argument("--json", action="store_true", help="print machine-readable JSON")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("positions", help="show the tokens at t_inst and the post-instruction positions of prompts")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder, .gguf file or registered name (default: {DEFAULT_MODEL})")
    s.add_argument("--template", default=None, help="chat template: the tokenizer's own (default), a name "
                   "(chatml, llama-2, llama-3, mistral, zephyr, gemma, plain) or a Jinja string")
    s.add_argument("--system", default=None, help="optional system prompt")
    s.add_argument("instruction", nargs="*", help="instructions to format (default: a few bundled prompts)")
    s.set_defaults(func=_cmd_positions)

    s = sub.add_parser("demo", help="environment report and prompt positions on the embedded default model")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, TypeError, ImportError) as exc:
        print(f"pysafegeom {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
