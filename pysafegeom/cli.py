"""Command line: ``pysafegeom info | positions | analyze | check-sets | train | demo | attack gcg``.

Run ``pysafegeom <command> --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .cli_args import _DEVICE, _DTYPE, _LR, _NONNEG_FLOAT, _POS, _POS_FLOAT, _STEPS, _arg


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
    """Environment, prompt positions, then the full protocol on the unaligned base and the aligned anchor, one report."""
    from pathlib import Path

    from . import info
    from .pipelines.demo import run_demo

    out = _claim_demo_dir(Path(args.out), args.overwrite)  # before any work
    t_all = time.perf_counter()
    print(info.render(info.collect()))
    print()
    _show_positions(args.base, [p.text for p in _default_examples()], None, None)
    opts = {"n_val": args.n_val, "selection_layer_stride": args.layer_stride, "interventions": not args.no_interventions,
            "n_controls": args.n_controls, "max_new_tokens": args.max_new_tokens, "n_behaviour": args.n_behaviour}
    done = run_demo(args.base, args.anchor, out, opts, fresh=args.fresh, overwrite=True,  # the folder was claimed above
                    echo=lambda line: print(line, flush=True))
    print("\nDoes the anchor reproduce the published anchor findings?")
    print("\n".join("  " + f for f in done["findings"]))
    print(f"\nreport: {out / 'report.html'}  (demo run time {time.perf_counter() - t_all:.0f} s)")
    return 0


def _claim_demo_dir(out, overwrite: bool):
    """Check the demo folder and its base/ and anchor/ results may be written, then mark it (OutputExists if not).

    A demo folder written before markers existed (only base/, anchor/ and report.html in it) is accepted."""
    from ._io import check_output_path, mark_dir, read_marker

    legacy = (out.is_dir() and read_marker(out) is None and any((out / s / "result.json").is_file() for s in ("base", "anchor"))
              and {p.name for p in out.iterdir()} <= {"base", "anchor", "report.html"})
    check_output_path(out, overwrite or legacy, "dir", content="demo")
    for label in ("base", "anchor"):
        check_output_path(out / label, overwrite or legacy, "dir", content="analysis")
    out.mkdir(parents=True, exist_ok=True)
    if (read_marker(out) or {}).get("content") != "demo":
        mark_dir(out, "demo")
    return out


def _cmd_analyze(args) -> int:
    from .pipelines.analyze import analyze

    opts = {"n_val": args.n_val, "selection_layer_stride": args.layer_stride, "kl_threshold": args.kl_threshold,
            "kl_rule": args.kl_rule, "kl_percentile": args.kl_percentile}
    if args.positions:
        opts["selection_positions"] = [p.strip() for p in args.positions.split(",") if p.strip()]
    if args.batch_size:
        opts["batch_size"] = args.batch_size
    if args.interventions or args.sweeps:
        opts.update(interventions=args.interventions, sweeps=args.sweeps, n_controls=args.n_controls,
                    max_new_tokens=args.max_new_tokens)
    if args.judge and not args.interventions:
        args.analyze_parser.error("--judge is used by the reopen table: add --interventions")
    extra = {"attacks": args.attacks, "benign": args.benign, "judges": args.judge} if args.interventions else {}
    if args.attacks and not args.interventions:
        raise ValueError("--attacks is used by the reopen table: add --interventions")
    from .cli_args import placement_from_args

    res = analyze(args.model, args.harmful, args.harmless, args.xstest, device=args.device, dtype=args.dtype,
                  **placement_from_args(args),
                  template=args.template, system=args.system, out=args.out, resume=args.resume,
                  overwrite=args.overwrite, allow_overlap=args.allow_overlap, **extra, **opts)
    print("\n".join(res.metrics["summary"]))
    print(f"\nwrote {args.out}/result.json, carriers.safetensors and report.html "
          f"({res.meta['timings_s']['total']} s; open report.html in a browser)")
    return 0


def _cmd_train(args) -> int:
    from pathlib import Path

    from .data import load_default
    from .models import load_model
    from .train import TrainConfig, build_safety_dataset, run
    from .train.sft import claim_out_dir

    def ints(text):
        return tuple(int(x) for x in text.split(",") if x.strip()) if text else ()

    r2d2 = args.recipe == "r2d2"
    opts = _r2d2_options(args) if r2d2 else {}
    if not r2d2:
        given = [f for f in _R2D2_FLAGS if getattr(args, f.lstrip("-").replace("-", "_")) is not None]
        if given:
            from .errors import InvalidArgument

            raise InvalidArgument(f"{', '.join(given)} only apply to --recipe r2d2")
    cfg = TrainConfig(recipe=args.recipe, lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lr=args.lr,
                      schedule=args.schedule, warmup_steps=args.warmup_steps, batch_size=args.batch_size,
                      grad_accum=args.grad_accum, steps=args.steps, save_at=ints(args.save_at), seed=args.seed,
                      max_len=args.max_len, step_unit=args.step_unit, recipe_options=opts)
    cfg.validate()
    if r2d2:  # the training behaviours, checked before anything loads
        from .data import load_behaviors
        from .train.r2d2 import check_disjoint, load_training_behaviors

        train_b = load_training_behaviors(opts.get("behaviors"), opts.get("behavior_targets"))
        check_disjoint(train_b, {f: load_behaviors(f, require_targets=False, functional_category=None)
                                 for f in args.eval_behaviors})
    out = claim_out_dir(Path(args.out), overwrite=args.overwrite, create=False)  # before the model loads
    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    claim_out_dir(out, overwrite=args.overwrite)
    if r2d2 and args.clean is not None:
        from .train.r2d2 import read_chat_examples

        examples = read_chat_examples(args.clean)
        if args.harmful is not None:
            harmful = _read_prompts(args.harmful)
            examples = build_safety_dataset(model, tok, harmful, [], refusals=cfg.refusal_phrasings) + examples
        print(f"{len(examples)} clean examples from {args.clean} -> {out}", file=sys.stderr)
    else:
        if r2d2:
            from .train.r2d2 import anchor_pool_prompts

            harmful = [] if args.harmful is None else _read_prompts(args.harmful)
            harmless = anchor_pool_prompts() if args.harmless is None else _read_prompts(args.harmless)
        else:
            harmful = load_default("harmful", "train") if args.harmful is None else _read_prompts(args.harmful)
            harmless = load_default("harmless", "train") if args.harmless is None else _read_prompts(args.harmless)
        examples = build_safety_dataset(model, tok, harmful, harmless, refusals=cfg.refusal_phrasings,
                                        answers_file=args.answers, cache_file=out / "distill.jsonl",
                                        max_new_tokens=args.distill_tokens)
        print(f"{len(examples)} examples ({len(harmful)} refusals, {len(harmless)} helpful answers) -> {out}", file=sys.stderr)
    res = run(model, tok, examples, cfg, out, resume=args.resume, base_spec=args.model, overwrite=args.overwrite)
    print(f"done: {cfg.steps} steps in {res.seconds:.0f} s ({res.tokens_per_s:.0f} tokens/s), final loss "
          f"{res.losses[-1]:.4f}; checkpoints: {', '.join(str(s) for s in res.checkpoints)}; final: {res.final_checkpoint}")
    return 0


_R2D2_FLAGS = ("--preset", "--control", "--behaviors", "--targets", "--clean", "--pool-size", "--cases-per-step",
               "--gcg-steps", "--gcg-width", "--gcg-topk", "--gcg-filter", "--reset-every", "--reset-fraction",
               "--suffix-tokens", "--away-weight", "--toward-weight", "--away-threshold", "--refusal")


def _r2d2_options(args) -> dict:
    from .train.r2d2 import R2D2Config

    base = {"harmbench": R2D2Config, "paper": R2D2Config.paper, "miniature": R2D2Config.miniature}[args.preset or "harmbench"]()
    kw = {}
    for flag, name in (("pool_size", "pool_size"), ("cases_per_step", "cases_per_step"),
                       ("gcg_steps", "gcg_steps_per_update"), ("gcg_width", "search_width"), ("gcg_topk", "topk"),
                       ("reset_every", "reset_every"), ("reset_fraction", "reset_fraction"),
                       ("away_weight", "away_weight"), ("toward_weight", "toward_weight"),
                       ("away_threshold", "away_threshold"), ("refusal", "refusal"), ("behaviors", "behaviors"),
                       ("targets", "behavior_targets")):
        v = getattr(args, flag)
        if v is not None:
            kw[name] = v
    if args.gcg_filter is not None:
        kw["filter_ids"] = True
    if args.control is not None:
        kw["adversarial"] = False
    if args.suffix_tokens is not None:
        try:
            lo, _, hi = args.suffix_tokens.partition(",")
            kw["suffix_tokens"] = (int(lo), int(hi or lo))
        except ValueError:
            from .errors import InvalidArgument

            raise InvalidArgument(f"--suffix-tokens {args.suffix_tokens!r}: give LO,HI (e.g. 15,20)") from None
    from dataclasses import replace

    return replace(base, **kw).check().to_dict()


def _gcg_config(args):
    from .attacks import GCGConfig

    return GCGConfig(num_steps=args.steps, search_width=args.width, topk=args.topk, n_replace=args.n_replace,
                     buffer_size=args.buffer_size, use_mellowmax=args.mellowmax, early_stop=not args.no_early_stop,
                     allow_non_ascii=args.allow_non_ascii, filter_ids=not args.no_filter, seed=args.seed,
                     optim_str_init=args.init if args.init is not None else GCGConfig().optim_str_init,
                     add_space_before_target=args.space_before_target, template=args.template, system=args.system,
                     progressive=getattr(args, "progressive", False), batch_size=args.batch_size,
                     devices=args.gcg_devices).check()


def _autodan_config(args):
    from .attacks.autodan import AutoDANConfig

    base = AutoDANConfig.original() if args.original else AutoDANConfig()
    kw = dict(algorithm=args.algorithm, num_steps=args.autodan_steps if hasattr(args, "autodan_steps") else args.steps,
              eval_steps=args.eval_steps, crossover=args.crossover,
              num_points=args.num_points, mutation=args.mutation, iter=args.iter,
              eval_with_check_refusal=not args.no_check_refusal, prototype=args.prototype, references=args.references,
              mutation_mode=args.mutation_mode, synonyms=args.synonyms, mutator=args.mutator, template=args.template,
              system=args.system, seed=args.seed)
    if args.population is not None:
        kw["batch_size"] = args.population
    if args.num_elites is not None:  # else the default's (0.1) or, with --original, the paper's (0.05)
        kw["num_elites"] = args.num_elites
    from dataclasses import replace

    return replace(base, **kw).check()


def _attack_summary_line(summary: dict, out) -> None:
    from pathlib import Path

    lo, hi = summary["asr_ci95"]
    dlo, dhi = summary["direct_asr_ci95"]
    print(f"{summary['method']}: {summary['n']} behaviours: ASR {summary['asr']:.2f} [{lo:.2f}, {hi:.2f}] vs direct "
          f"request {summary['direct_asr']:.2f} [{dlo:.2f}, {dhi:.2f}] ({summary['judge']} judge); test cases in "
          f"{Path(out) / 'test_cases.json'}")


def _run_attack(args, cfg) -> int:
    from pathlib import Path

    from ._io import check_output_path
    from .cli_replay import build_judges
    from .data import load_behaviors
    from .models import load_model
    from .pipelines.attack import attack_behaviors

    behaviors = load_behaviors(args.behaviors, args.targets)
    if args.limit is not None:
        behaviors = behaviors[: args.limit]
    if not args.resume:
        check_output_path(Path(args.out), args.overwrite, "dir", content="gcg attack")  # before the model loads
    from .cli_args import placement_from_args

    model, tok = load_model(args.model, device=args.device, **placement_from_args(args))
    judges = build_judges(args.judge, model=model, tokenizer=tok, device=args.device)
    summary = attack_behaviors(model, tok, behaviors, cfg, out=args.out, universal=getattr(args, "universal", False),
                               resume=args.resume, overwrite=args.overwrite, max_new_tokens=args.max_new_tokens,
                               source=args.model, judges=judges)
    _attack_summary_line(summary, args.out)
    return 0


def _cmd_attack_gcg(args) -> int:
    return _run_attack(args, _gcg_config(args))


def _cmd_attack_autodan(args) -> int:
    return _run_attack(args, _autodan_config(args))


def _cmd_attack_adaptive(args) -> int:
    from pathlib import Path

    from .cli_replay import build_judges
    from .data import load_behaviors
    from .models import load_model
    from .pipelines.attack import adaptive

    models = [m for m in args.models.split(",") if m.strip()]
    if not models:
        raise SystemExit("--models is empty: give comma-separated model specs")
    methods = [m for m in args.methods.split(",") if m.strip()]
    behaviors = load_behaviors(args.behaviors, args.targets)
    gcg = _gcg_config(args)
    ad = _autodan_config(args)
    def judges(model, tok):  # per model: the local model judge is the attacked model itself
        return build_judges(args.judge, model=model, tokenizer=tok, device=args.device)

    from .cli_args import placement_from_args

    placement = placement_from_args(args)

    def load(spec):  # (on Ray: each worker offloads into its own subfolder)
        from .scale import per_process_offload

        return load_model(spec, device=args.device, **per_process_offload(placement))

    from .cli_args import ray_from_args

    res = adaptive(models, behaviors, out=args.out, subset=args.subset, methods=methods, gcg=gcg, autodan=ad,
                   judges=judges, max_new_tokens=args.max_new_tokens, seed=args.seed, resume=not args.overwrite,
                   overwrite=args.overwrite, load=load, ray=ray_from_args(args))
    from .pipelines.attack import _safe_id

    for name, per in res.items():
        for m, summary in per.items():
            print(f"{name}: ", end="")
            _attack_summary_line(summary, Path(args.out) / _safe_id(str(name)) / m)
    return 0


def _gcg_args(g, prefix: bool = False) -> None:
    """GCG's search options (``prefix``: the adaptive command, where --steps is GCG's and AutoDAN has its own)."""
    g.add_argument("--steps", type=_POS, default=250, help="GCG steps per behaviour (default 250)")
    g.add_argument("--width", type=_POS, default=512, help="GCG candidates per step (search width, default 512)")
    g.add_argument("--topk", type=_POS, default=256, help="GCG top-k tokens per suffix position (default 256)")
    g.add_argument("--n-replace", type=_POS, default=1, help="GCG positions replaced per candidate (default 1)")
    g.add_argument("--buffer-size", type=_arg("nonneg_int"), default=0, help="GCG attack buffer size (default 0: greedy)")
    g.add_argument("--mellowmax", action="store_true", help="GCG: mellowmax loss instead of cross-entropy")
    g.add_argument("--no-early-stop", action="store_true", help="GCG: run all steps even after an exact greedy match")
    g.add_argument("--allow-non-ascii", action="store_true", help="GCG: let the suffix use non-ASCII tokens")
    g.add_argument("--no-filter", action="store_true", help="GCG: skip the retokenisation filter (test cases may then "
                   "not reproduce the attacked ids)")
    g.add_argument("--init", default=None, help="GCG: initial suffix text (default: 20 x's)")
    g.add_argument("--space-before-target", action="store_true", help="GCG: put a space before the target")
    g.add_argument("--batch-size", type=_POS, default=None, help="GCG: most candidates per forward (default: all on CPU)")
    from .cli_args import gcg_devices

    g.add_argument("--gcg-devices", type=gcg_devices, default=None, metavar="DEV,DEV|all",
                   help="GCG: score each step's candidates on these devices, one model copy each (e.g. cuda:0,cuda:1; "
                        "'all': every visible GPU); the same result as one device")


def _autodan_args(g, steps_flag: str = "--steps") -> None:
    frac = _arg("finite_float", float, lo=0.0, hi=1.0)
    g.add_argument(steps_flag, dest="autodan_steps" if steps_flag != "--steps" else "steps", type=_POS, default=100,
                   help="AutoDAN generations per behaviour (default 100)")
    g.add_argument("--algorithm", choices=["hga", "ga"], default="hga", help="AutoDAN-HGA (default) or AutoDAN-GA")
    g.add_argument("--population", type=_POS, default=None, help="templates per generation (default 64, HarmBench; "
                   "--original: 256)")
    g.add_argument("--original", action="store_true", help="the paper's settings (population 256, 5%% elites)")
    g.add_argument("--eval-steps", type=_POS, default=5, help="refusal check every N generations (default 5)")
    g.add_argument("--no-check-refusal", action="store_true", help="never stop early on a non-refused answer")
    g.add_argument("--num-elites", type=frac, default=None, help="share of elites kept (default 0.1; --original: 0.05)")
    g.add_argument("--crossover", type=frac, default=0.5, help="crossover probability (default 0.5)")
    g.add_argument("--num-points", type=_POS, default=5, help="crossover points (default 5)")
    g.add_argument("--mutation", type=frac, default=0.01, help="mutation probability (default 0.01)")
    g.add_argument("--iter", type=_POS, default=5, help="HGA: sentence-level GA every N-th step (default 5)")
    g.add_argument("--prototype", default=None, help="initial prototype prompt file (.txt/.json; default: the shipped one)")
    g.add_argument("--references", default=None, help="reference prompts file (.json list, HarmBench templates JSON, "
                   ".jsonl; default: the shipped ones)")
    g.add_argument("--mutation-mode", choices=["synonym", "model", "reference"], default="synonym",
                   help="offline mutation: synonym substitution (default), rewrite by a local model, or a reference swap")
    g.add_argument("--synonyms", choices=["table", "embedding", "both"], default="both",
                   help="synonym source (default both: the shipped table and embedding neighbours)")
    g.add_argument("--mutator", default=None, help="with --mutation-mode model: the rewriting model (load_model spec; "
                   "default: the attacked model)")


def _attack_common(g) -> None:
    """The options every attack command shares: behaviours, output, chat format, judging, device."""
    g.add_argument("--behaviors", required=True, help="behaviours: a HarmBench CSV, an AdvBench CSV (goal, target), or "
                   "a CSV/JSONL table with a prompt column and a target column")
    g.add_argument("--targets", default=None, help="HarmBench's targets JSON (BehaviorID -> target); needed for a HarmBench CSV")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--template", default=None, help="chat template (default: the tokenizer's own; or chatml, llama-2, "
                   "llama-3, mistral, zephyr, gemma, plain, or a Jinja string)")
    g.add_argument("--system", default=None, help="optional system prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-new-tokens", type=_POS, default=64, help="tokens of the judged greedy answer (default 64; "
                   "HarmBench uses 512)")
    g.add_argument("--judge", action="append", default=None, metavar="SPEC",
                   help="a judge (repeatable; the first decides): substring (default), xstest, model (the attacked "
                        "model as a local judge), model:SPEC[:preset=NAME], harmbench:SPEC")
    g.add_argument("--overwrite", action="store_true", help="replace an attack already in --out")
    g.add_argument("--device", default=None, type=_DEVICE, help="cpu or cuda (default: cuda if available)")
    from .cli_args import add_placement_args

    add_placement_args(g)


def _add_attack(sub) -> None:
    from .cli_replay import add_replay_parser
    from .models import DEFAULT_MODEL

    s = sub.add_parser("attack", help="adversarial attacks on a model's refusal (gcg, autodan, adaptive, replay)")
    asub = s.add_subparsers(dest="method", required=True)
    g = asub.add_parser(
        "gcg", help="GCG adversarial suffixes, judged, written as HarmBench test cases",
        description="Greedy Coordinate Gradient: one suffix per behaviour (or one for all with --universal), "
                    "optimised so the model starts its answer with the behaviour's target. Writes a test-case store "
                    "(records.jsonl, HarmBench's test_cases.json and logs.json), summary.json (ASR by judge beside "
                    "the direct-request ASR) and loss_curves.svg. The state of every attack is saved each step: "
                    "--resume continues a killed run to the identical result.",
        epilog="example: pysafegeom attack gcg --model smollm2-135m-safety --behaviors harmbench_behaviors_text_test.csv "
               "--targets harmbench_targets_text.json --out runs/gcg --steps 250 --width 512")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder, .gguf file or registered name (default: {DEFAULT_MODEL})")
    _attack_common(g)
    g.add_argument("--limit", type=_POS, default=None, help="attack only the first N behaviours")
    _gcg_args(g)
    g.add_argument("--universal", action="store_true", help="one suffix for all behaviours (summed loss)")
    g.add_argument("--progressive", action="store_true", help="with --universal: add behaviours one at a time "
                   "(HarmBench's progressive prompts)")
    g.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    g.set_defaults(func=_cmd_attack_gcg)

    a = asub.add_parser(
        "autodan", help="AutoDAN-HGA/GA jailbreak prompts, offline mutation, judged, written as HarmBench test cases",
        description="AutoDAN: a genetic search over whole prompt templates, fitness the target loss, scored in length "
                    "buckets through a prefix cache. Mutation is offline (synonyms from a shipped table or the model's "
                    "embedding space, or a local rewriting model). Writes the same files as 'attack gcg'; --resume "
                    "continues a killed run to the identical result.",
        epilog="example: pysafegeom attack autodan --model smollm2-135m-safety --behaviors harmbench_behaviors_text_test.csv "
               "--targets harmbench_targets_text.json --out runs/autodan --steps 100")
    a.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder, .gguf file or registered name (default: {DEFAULT_MODEL})")
    _attack_common(a)
    a.add_argument("--limit", type=_POS, default=None, help="attack only the first N behaviours")
    _autodan_args(a)
    a.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    a.set_defaults(func=_cmd_attack_autodan)

    d = asub.add_parser(
        "adaptive", help="sparse adaptive attacks: GCG and AutoDAN optimised against each model on a behaviour subset",
        description="For each model (loaded one at a time), GCG and AutoDAN against the same N behaviours (drawn once "
                    "with --seed, kept in OUT/subset.json); one test-case store per model and method in "
                    "OUT/<model>/<method>/. Reruns resume per (model, behaviour).",
        epilog="example: pysafegeom attack adaptive --models smollm2-135m-instruct,smollm2-135m-safety --behaviors "
               "harmbench_behaviors_text_test.csv --targets harmbench_targets_text.json --subset 20 --out runs/adaptive")
    d.add_argument("--models", required=True, help="comma-separated model specs")
    d.add_argument("--subset", type=_POS, default=20, help="behaviours per model (default 20)")
    d.add_argument("--methods", default="gcg,autodan", help="comma-separated methods (default gcg,autodan)")
    _attack_common(d)
    _gcg_args(d)
    _autodan_args(d, steps_flag="--autodan-steps")
    from .cli_args import add_ray_args

    add_ray_args(d)
    d.set_defaults(func=_cmd_attack_adaptive)

    add_replay_parser(asub)


def _read_prompts(path):
    from .data import load_prompts

    return load_prompts(path)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (``prog: error: argument --n-val: ...``), not a usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")




def _cmd_check_sets(args) -> int:
    """Compare the user's harmful/harmless sets with reference sets on one model; exit 0 when they agree, 1 when not."""
    from pathlib import Path

    from ._io import atomic_write_text, check_output_path
    from .data import load_prompts
    from .errors import InvalidArgument
    from .models import load_model
    from .pipelines.check_sets import check_sets

    refs = [r.strip() for r in args.reference.split(",")]
    if len(refs) != 2 or not all(refs):
        raise InvalidArgument(f"--reference must name two files, harmful then harmless, separated by a comma "
                              f"(e.g. harmful_val.json,harmless_val.json); got {args.reference!r}")
    out = check_output_path(args.out, args.overwrite, "file") if args.out else None

    def load(spec, role, split=None):
        prompts = load_prompts(spec, role=role, split=split)
        return [p.text for p in prompts][: args.max_prompts]

    sets = [load(args.harmful, "harmful", args.split), load(args.harmless, "harmless", args.split),
            load(refs[0], "harmful"), load(refs[1], "harmless")]
    model, tok = load_model(args.model, device=args.device)
    res = check_sets(model, tok, *sets, template=args.template, batch_size=args.batch_size, seed=args.seed,
                     strip_final_punctuation=args.strip_final_punctuation)
    print("\n".join(res.summary()))
    if out is not None:
        atomic_write_text(out, json.dumps({"model": args.model, "harmful": args.harmful, "harmless": args.harmless,
                                           "reference": refs, "split": args.split, "max_prompts": args.max_prompts,
                                           **res.to_dict()}, indent=2) + "\n")
        print(f"wrote {Path(out)}")
    return 0 if res.passed else 1


def _add_check_sets(sub) -> None:
    from .models import DEFAULT_MODEL

    s = sub.add_parser(
        "check-sets", help="check harmful/harmless prompt sets for confounds against reference sets (exit 0: they agree)",
        description="Fit the unfiltered difference-of-means carriers H (t_inst) and R (t_post_inst) of your sets and of "
                    "reference sets on one model, and compare: the mid-band coupling |cos(H, R)| of each (must agree "
                    "within 0.05), and cos(H_yours, H_ref), cos(R_yours, R_ref) (each must reach the reference sets' own "
                    "split-half agreement minus 0.1). Exit code 0 when the sets agree, 1 when not, 2 on an error.",
        epilog="example: pysafegeom check-sets --model smollm2-135m-instruct --harmful harmful --harmless harmless "
               "--split train --reference harmful_val.json,harmless_val.json --max-prompts 128 --out check.json")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder, .gguf file or registered name (default: {DEFAULT_MODEL})")
    s.add_argument("--harmful", required=True, help="your harmful prompts: a file, or a bundled set name (harmful)")
    s.add_argument("--harmless", required=True, help="your harmless prompts: a file, or a bundled set name (harmless)")
    s.add_argument("--reference", required=True, help="reference harmful and harmless files, comma-separated (e.g. the "
                   "refusal_direction splits harmful_val.json,harmless_val.json)")
    s.add_argument("--split", default=None, choices=["train", "val", "test"], help="use only this split of --harmful and "
                   "--harmless (files without splits are split 60/20/20 deterministically; default: all prompts)")
    s.add_argument("--max-prompts", type=_POS, default=None, help="use at most the first N prompts of each set (default: all)")
    s.add_argument("--out", default=None, help="write the numbers and the verdict as JSON to this file")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    s.add_argument("--template", default=None, help="chat template name or Jinja string (default: the tokenizer's)")
    s.add_argument("--batch-size", type=_POS, default=None, help="prompts per forward pass (default: chosen to fit memory)")
    s.add_argument("--device", default=None, type=_DEVICE, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--strip-final-punctuation", action="store_true", help="drop a trailing . ? ! from every prompt first, "
                   "so t_inst is the last word in all four sets (the refusal_direction harmful prompts end with a word, "
                   "its Alpaca harmless prompts mostly with a full stop)")
    s.add_argument("--seed", type=int, default=0, help="seed of the reference split halves (default 0)")
    s.set_defaults(func=_cmd_check_sets)


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    p = _Parser(prog="pysafegeom", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error (also after the command, "
                   "or PYSAFEGEOM_DEBUG=1)")
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

    s = sub.add_parser(
        "analyze", help="run the protocol on a model: carriers, selection, coupling; writes JSON, tensors and an HTML report",
        description="Fit the harmfulness carrier H (at t_inst) and the refusal carrier R (post-instruction positions) per "
                    "layer, select the admissible refusal carrier (bypass / induce / KL, PROTOCOL 2.4), and measure their "
                    "coupling, subspace angles, effective rank, process correlation and the Latent Guard. Prompt sets "
                    "default to the bundled ones; give files in AdvBench, HarmBench, XSTest, refusal_direction, Alpaca, "
                    "CSV or JSONL format to use your own.",
        epilog="example: pysafegeom analyze --model smollm2-135m-instruct --out results/smollm2")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"model folder, .gguf file or registered name (default: {DEFAULT_MODEL})")
    s.add_argument("--harmful", default=None, help="harmful prompts file (default: the bundled set)")
    s.add_argument("--harmless", default=None, help="harmless prompts file (default: the bundled set)")
    s.add_argument("--xstest", default=None, help="safe-but-scary prompts file, e.g. XSTest CSV (default: the bundled set)")
    s.add_argument("--out", required=True, help="output folder (written atomically; an existing folder is replaced only "
                   "if pysafegeom wrote it, else pass --overwrite)")
    s.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a folder pysafegeom wrote "
                   "(checked before the model loads)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted analysis of the same model, options and "
                   "prompts at the stage it reached (stage artifacts are kept beside --out until the result is saved)")
    s.add_argument("--allow-overlap", action="store_true", help="run even when the model was trained on some of the "
                   "prompts (recorded in the result; figures on those prompts are then not held out)")
    s.add_argument("--template", default=None, help="chat template name or Jinja string (default: the tokenizer's)")
    s.add_argument("--system", default=None, help="optional system prompt")
    s.add_argument("--n-val", type=_POS, default=32, help="validation prompts per side for carrier selection (default 32)")
    s.add_argument("--positions", default=None, help="post-instruction positions to search, e.g. eoi-1,eoi-2 (default: all)")
    s.add_argument("--layer-stride", type=_POS, default=1, help="search every n-th layer for the carrier (default 1: all)")
    s.add_argument("--kl-threshold", type=_NONNEG_FLOAT, default=0.1, help="Arditi's admissibility KL threshold (default "
                   "0.1): the fixed rule's threshold (0.2 is tried if none pass) and the calibrated rule's floor")
    s.add_argument("--kl-rule", choices=["calibrated", "fixed"], default="calibrated", help="admissibility KL rule: "
                   "'calibrated' (default: KL <= max(--kl-threshold, the --kl-percentile of random directions' KL)) or "
                   "'fixed' (Arditi's); the result reports the counts under both")
    s.add_argument("--kl-percentile", type=_arg("finite_float", float, lo=0.0, hi=100.0, lo_open=True), default=75.0,
                   help="percentile of the random-direction KLs for the calibrated rule (default 75)")
    s.add_argument("--batch-size", type=_POS, default=None, help="prompts per forward pass (default: chosen to fit memory)")
    s.add_argument("--device", default=None, type=_DEVICE, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--dtype", default=None, type=_DTYPE, help="float32, bfloat16 or float16 (default: float32 on CPU)")
    from .cli_args import add_placement_args

    add_placement_args(s)
    s.add_argument("--interventions", action="store_true", help="add the reopen table (R, H, span(H, R) ablated, with "
                   "matched controls) and the four behavioural diagnostics; generates answers, so it takes longer")
    s.add_argument("--attacks", default=None, help="attack prompts for the reopen table: a prompts file, or a test-case "
                   "store (a store or GCG run folder, a HarmBench test_cases.json): then the ASR is reported per method "
                   "(gcg, autodan, direct, template:NAME) in every condition")
    def judge_spec(text: str) -> str:  # --judge: the spec checked (names, phrase lists, presets), nothing loaded
        from .behaviour.judge_spec import parse_judge_spec

        try:
            parse_judge_spec(text)
        except (ValueError, TypeError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    s.add_argument("--judge", action="append", default=None, metavar="SPEC", type=judge_spec,
                   help="judge of attack success in the reopen table, repeatable; the first decides (default: substring). "
                   "SPEC: substring[:LISTS], xstest, model (the analysed model as a classifier), model:PATH[:preset=NAME], "
                   "harmbench:PATH (HarmBench's classifier prompt, e.g. a local HarmBench-Llama-2-13b-cls). Needs --interventions")
    s.add_argument("--benign", default=None, help="benign prompts file, with reference answers for the CE proxy (default: bundled)")
    s.add_argument("--sweeps", action="store_true", help="add ActAdd and partial-ablation sweeps with matched controls")
    s.add_argument("--n-controls", type=_POS, default=10, help="matched random controls per row (default 10)")
    s.add_argument("--max-new-tokens", type=_POS, default=48, help="greedy tokens per judged answer (default 48)")
    s.set_defaults(func=_cmd_analyze, analyze_parser=s)

    s = sub.add_parser("demo", help="the full protocol on the unaligned base and the aligned anchor, side by side in one report")
    s.add_argument("--base", "--model", dest="base", default=DEFAULT_MODEL, help=f"unaligned model (default: {DEFAULT_MODEL})")
    s.add_argument("--anchor", default="smollm2-135m-safety", help="aligned anchor (default: smollm2-135m-safety, shipped)")
    s.add_argument("--out", default="demo_out", help="where the results and report go (default: demo_out); a folder "
                   "that pysafegeom did not write is refused unless --overwrite")
    s.add_argument("--overwrite", action="store_true", help="write into --out even if it is not a pysafegeom demo folder")
    s.add_argument("--n-val", type=_POS, default=16, help="validation prompts per side (default 16)")
    s.add_argument("--layer-stride", type=_POS, default=3, help="search every n-th layer (default 3)")
    s.add_argument("--n-controls", type=_POS, default=3, help="matched random controls per reopen row (default 3)")
    s.add_argument("--max-new-tokens", type=_POS, default=32, help="greedy tokens per judged answer (default 32)")
    s.add_argument("--n-behaviour", type=_POS, default=None, help="cap on each behavioural test set (default: whole test split)")
    s.add_argument("--no-interventions", action="store_true", help="skip the reopen table and behavioural diagnostics")
    s.add_argument("--fresh", action="store_true", help="redo models whose finished results are already in --out")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("train", help="safety fine-tuning (SFT, LoRA or full) with checkpoints and resume",
                       description="Fine-tune a model. --recipe sft: harmful requests paired with refusals and harmless "
                                   "instructions paired with helpful answers (by default the model's own greedy answers). "
                                   "--recipe r2d2: HarmBench's adversarial training: clean data (--clean, or the model's own "
                                   "answers to harmless prompts) plus, every micro-batch, GCG test cases from a persistent "
                                   "pool attacked against the current weights and trained away from their targets and "
                                   "toward a refusal; --control gives the matched SFT run. Checkpoints (step 0 allowed) "
                                   "hold everything needed to resume to identical weights.",
                       epilog="example: pysafegeom train --recipe sft --model smollm2-135m-instruct --out runs/sft "
                              "--steps 100 --save-at 50,100")
    s.add_argument("--recipe", default="sft",
                   help="sft (refusals + helpful answers) or r2d2 (adversarial training; see the R2D2 options)")
    s.add_argument("--model", default=DEFAULT_MODEL, help=f"starting model (default: {DEFAULT_MODEL})")
    s.add_argument("--out", required=True, help="output folder: checkpoint-STEP/ folders and distill.jsonl (a folder "
                   "that is not a pysafegeom training run is refused unless --overwrite)")
    s.add_argument("--overwrite", action="store_true", help="write into --out even if it is not a pysafegeom training "
                   "folder (nothing in it is deleted)")
    s.add_argument("--steps", type=_POS, default=100, help="optimizer steps (default 100)")
    s.add_argument("--save-at", default="", type=_STEPS, help="comma-separated, increasing optimizer steps to checkpoint at (0: the untrained start; the last step is always saved)")
    s.add_argument("--lr", type=_LR, default=2e-4, help="peak learning rate (default 2e-4)")
    s.add_argument("--schedule", default="cosine", choices=["cosine", "constant"],
                   help="learning-rate schedule after the warmup: cosine decay to 0 at --steps (default) or constant")
    s.add_argument("--warmup-steps", type=_arg("nonneg_int"), default=10, help="linear warmup steps (default 10)")
    s.add_argument("--batch-size", type=_POS, default=8, help="clean examples per micro-batch (default 8)")
    s.add_argument("--grad-accum", type=_POS, default=1,
                   help="micro-batches per optimizer step; the loss is weighted by response tokens (default 1)")
    s.add_argument("--max-len", type=_arg("integer", lo=2), default=256,
                   help="tokens per training example; longer responses are cut (default 256)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--lora", dest="lora", action="store_true", default=True, help="train a LoRA adapter (default)")
    g.add_argument("--full", dest="lora", action="store_false", help="train all weights")
    s.add_argument("--lora-r", type=_POS, default=8, help="LoRA rank (default 8)")
    s.add_argument("--lora-alpha", type=_POS_FLOAT, default=16, help="LoRA scale numerator: scale = alpha / r (default 16)")
    s.add_argument("--seed", type=int, default=0,
                   help="fixes the LoRA init, the data order, dropout and (R2D2) the pool draws and GCG (default 0)")
    s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    s.add_argument("--answers", default=None, help="JSONL of {prompt, response} helpful answers (default: self-distillation)")
    s.add_argument("--distill-tokens", type=_POS, default=96, help="max new tokens of self-distilled answers (default 96)")
    s.add_argument("--harmful", default=None, help="harmful prompts file, paired with refusals (default: the bundled train "
                   "split; r2d2: none)")
    s.add_argument("--harmless", default=None, help="harmless prompts file, answered by the model itself (default: the "
                   "bundled train split; r2d2: the shipped anchor pool's harmless training prompts)")
    s.add_argument("--device", default=None, type=_DEVICE, help="cpu or cuda (default: cuda if available)")
    s.add_argument("--dtype", default=None, type=_DTYPE, help="float32 or bfloat16 weights to train (default: float32 on "
                   "CPU, the checkpoint's dtype on GPU)")
    s.add_argument("--step-unit", default="optimizer", choices=["optimizer", "micro"],
                   help="what checkpoint-N counts: optimizer steps (default) or micro-batches (HarmBench's R2D2 counter: "
                        "N = step x grad-accum); --steps and --save-at are optimizer steps either way")
    r = s.add_argument_group("R2D2 (--recipe r2d2)", "adversarial training against a pool of GCG test cases "
                             "(PROTOCOL.md 7); defaults are HarmBench's code, --preset paper the paper's")
    r.add_argument("--preset", default=None, choices=["harmbench", "paper", "miniature"],
                   help="starting values: harmbench (pool 8, 5 GCG steps of width 512 / top-k 256 per update, reset "
                        "20%% every 50 steps), paper (pool 180, 8 cases per step), miniature (the 2-core CPU preset of "
                        "trajectories/); the options below override it")
    r.add_argument("--control", action="store_const", const=True, default=None,
                   help="the matched SFT control: the same recipe, data order and schedule with the adversarial terms "
                        "(and their GCG) off")
    r.add_argument("--behaviors", default=None, help="training behaviours with targets: JSONL {id, behavior, targets}, "
                   "AdvBench's goal/target CSV or a table with a target column (default: the package's own 40)")
    r.add_argument("--targets", default=None, help="HarmBench's targets JSON, with a HarmBench behaviours CSV as --behaviors")
    r.add_argument("--eval-behaviors", action="append", default=[], metavar="FILE",
                   help="an evaluation behaviour set (HarmBench CSV, AdvBench CSV, JSONL); training refuses to start when "
                        "a training behaviour is in it (repeatable)")
    r.add_argument("--clean", default=None, help="clean data: JSONL of {messages: [...user, assistant]} or {prompt, response} "
                   "(default: the model's own answers to the shipped anchor pool's harmless training prompts)")
    r.add_argument("--pool-size", type=_POS, default=None, help="test cases in the pool (HarmBench: 8; paper: 180)")
    r.add_argument("--cases-per-step", type=_POS, default=None,
                   help="cases sampled, attacked and trained on per micro-batch (default min(8, pool))")
    r.add_argument("--gcg-steps", type=_arg("nonneg_int"), default=None, help="GCG steps per sampled case and micro-batch (5)")
    r.add_argument("--gcg-width", type=_POS, default=None, help="GCG search width (512)")
    r.add_argument("--gcg-topk", type=_POS, default=None, help="GCG top-k tokens per position (256)")
    r.add_argument("--gcg-filter", action="store_const", const=True, default=None,
                   help="apply GCG's retokenisation filter (HarmBench's R2D2 does not)")
    r.add_argument("--reset-every", type=_POS, default=None, help="optimizer steps between pool resets (50)")
    r.add_argument("--reset-fraction", type=float, default=None, help="share of the pool replaced at a reset (0.2)")
    r.add_argument("--suffix-tokens", default=None, help="LO,HI: a new suffix is '! ' x U{LO..HI} (15,20)")
    r.add_argument("--away-weight", type=float, default=None, help="weight of -log(1-p(target)) (0.5; >= 0)")
    r.add_argument("--toward-weight", type=float, default=None, help="weight of the CE toward the refusal (0.5; >= 0)")
    r.add_argument("--away-threshold", type=float, default=None,
                   help="target tokens with log p below this add no away loss (-5)")
    r.add_argument("--refusal", default=None, help="the toward target (\"Sorry, I can't do that.\")")
    s.set_defaults(func=_cmd_train)

    _add_check_sets(sub)
    _add_attack(sub)
    from .cli_replay import add_transfer_parser

    add_transfer_parser(sub)
    from .cli_trajectory import add_trajectory_parser

    add_trajectory_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. An error a user can fix (a pysafegeom error, a bad value or type, a missing or existing
    file, a missing package) prints one line, the message, and returns 2; ``--debug`` (anywhere on the line, or
    ``PYSAFEGEOM_DEBUG=1``) shows the traceback instead."""
    from .errors import PysafegeomError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PYSAFEGEOM_DEBUG") == "1"
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    try:
        return args.func(args)
    except (PysafegeomError, FileNotFoundError, FileExistsError, ValueError, TypeError, ImportError, OSError) as exc:
        if debug:
            raise
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"pysafegeom {args.command}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"pysafegeom {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
