"""Supervised safety fine-tuning (SFT), full or LoRA, in one readable module.

``run(model, tokenizer, examples, config, out_dir)`` trains on (instruction, response) pairs with the
loss on response tokens only, under the model's chat template. Everything that decides the result is
fixed by ``config.seed``: the LoRA initialisation, the data order (a fresh permutation per epoch from a
seeded ``torch.Generator``) and dropout (RNG states are checkpointed). Checkpoints are written at the
steps in ``config.save_at`` and at the last step, each as ``out_dir/checkpoint-{step}/`` holding a model
that :func:`pysafegeom.models.load_model` opens (a PEFT adapter folder for LoRA, a full model folder
otherwise) and ``trainer_state.pt`` (optimizer, scheduler, RNG states, step, data position). A
checkpoint is written to a temporary folder and renamed into place, so a kill never leaves half of one.
``run(..., resume=True)`` continues from the latest checkpoint and ends with the same weights as an
uninterrupted run.

Recipes: the loss is built by a :class:`Recipe` from :data:`RECIPES`: ``sft`` here and ``r2d2``
(:mod:`pysafegeom.train.r2d2`: a GCG test-case pool, away and toward losses), which overrides ``extra_loss``
(its adversarial terms per micro-batch), ``after_step`` (log row, pool resets) and the state hooks.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import validate as V
from .._io import atomic_dir, check_output_path, mark_dir, read_marker, recover_all
from ..errors import InputFileError, InvalidArgument, InvalidType, MissingFile
from ..models.provenance import attach_training_prompts, read_training_prompts, training_prompts, write_training_prompts
from .data import DEFAULT_REFUSALS, IGNORE, Example, as_examples, collate, encode_examples

STATE_FILE = "trainer_state.pt"
STEP_LOG = "train_log.jsonl"


class _StepLog:
    """``train_log.jsonl`` in the run folder: one JSON line per optimizer step. On resume from step s the
    lines after s (written by the killed run after its last checkpoint) are dropped first."""

    def __init__(self, path: Path, step: int):
        self.path = path
        if path.is_file():
            keep = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:
                    break  # a line cut by the kill
            from .._io import atomic_write_text

            atomic_write_text(path, "".join(line + "\n" for line in keep))

    def write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")


@dataclass
class TrainConfig:
    """Training options; every default is a working choice for a ~100M-parameter chat model on CPU.

    recipe: name in :data:`RECIPES` ("sft").
    lora: train a LoRA adapter (True) or all weights (False).
    lora_r, lora_alpha, lora_dropout: LoRA rank, scale numerator (scale = alpha / r), dropout.
    lora_targets: module names to adapt, or "all-linear" (every linear layer in attention and MLP
        blocks; the output head is left alone).
    lr: peak learning rate (AdamW). weight_decay: AdamW decoupled weight decay.
    schedule: "cosine" (decay to 0 at ``steps``) or "constant", both after ``warmup_steps`` linear warmup.
    batch_size: examples per micro-batch; grad_accum: micro-batches per optimizer step.
    steps: optimizer steps. save_at: optimizer steps to checkpoint at (the last step is always checkpointed;
        0 saves the untrained start, e.g. an anchor of a trajectory).
    step_unit: what a checkpoint's name counts: "optimizer" steps (``checkpoint-{step}``) or "micro" batches
        (``checkpoint-{step * grad_accum}``, HarmBench's R2D2 counter); recorded in each checkpoint.
    recipe_options: the recipe's own options (R2D2: :class:`pysafegeom.train.r2d2.R2D2Config` or its dict).
    seed: fixes LoRA init, data order and dropout. max_len: tokens per example (responses are cut).
    max_grad_norm: gradient clipping (0 disables).
    refusal_phrasings: the refusals paired with harmful prompts by :func:`build_safety_dataset`.
    template/system: chat template (None: the tokenizer's own) and optional system prompt.
    """

    recipe: str = "sft"
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str | tuple[str, ...] = "all-linear"
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 10
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 100
    save_at: tuple[int, ...] = ()
    seed: int = 0
    max_len: int = 256
    max_grad_norm: float = 1.0
    refusal_phrasings: tuple[str, ...] = DEFAULT_REFUSALS
    template: str | None = None
    system: str | None = None
    step_unit: str = "optimizer"
    recipe_options: dict = field(default_factory=dict)

    def validate(self) -> "TrainConfig":
        """Raise :class:`~pysafegeom.errors.InvalidArgument` / ``InvalidType`` (a ``ValueError`` / ``TypeError``)
        naming the bad option; returns self (``save_at`` sorted, a single refusal phrasing made a one-item tuple)."""
        if self.recipe not in RECIPES:
            raise InvalidArgument(f"unknown recipe {self.recipe!r}; available: {', '.join(sorted(RECIPES))}")

        def check(name, fn, *args, **kw):
            try:
                return fn(name, getattr(self, name), *args, **kw)
            except (InvalidArgument, InvalidType) as exc:
                raise type(exc)(f"invalid training option {name}={getattr(self, name)!r}: {exc}") from None

        check("steps", V.positive_int)
        # AdamW moves every weight by about lr per step: above 1 a run diverges at once
        check("lr", V.finite_float, lo=0.0, hi=1.0, lo_open=True, hint="AdamW learning rates that work lie in 1e-6..1e-2")
        check("weight_decay", V.finite_float, lo=0.0)
        check("schedule", V.choice, ("cosine", "constant"))
        check("warmup_steps", V.integer, lo=0, hi=self.steps, hint=f"linear warmup steps, at most steps={self.steps}")
        check("batch_size", V.positive_int)
        check("grad_accum", V.positive_int)
        check("max_len", V.integer, lo=2)
        check("max_grad_norm", V.finite_float, lo=0.0, hint="0 disables clipping")
        check("seed", V.integer)
        check("lora", V.boolean)
        if self.lora:
            check("lora_r", V.positive_int)
            check("lora_alpha", V.finite_float, lo=0.0, lo_open=True)
            check("lora_dropout", V.finite_float, lo=0.0, hi=1.0, hi_open=True)
            check("lora_targets", V.str_list)
        if isinstance(self.save_at, int) and not isinstance(self.save_at, bool):
            self.save_at = (self.save_at,)
        check("save_at", V.int_list_option, lo=0)
        raw = list(V.int_list_option("save_at", self.save_at, lo=0))
        if any(b <= a for a, b in zip(raw, raw[1:])):
            raise InvalidArgument(f"invalid training option save_at={self.save_at!r}: the anchors must be strictly "
                                  "increasing (each step once, in order)")
        self.save_at = tuple(raw)
        for s in self.save_at:
            if not 0 <= s <= self.steps:
                raise InvalidArgument(f"invalid training option save_at={self.save_at!r}: step {s} is outside "
                                      f"0..steps={self.steps}")
        check("step_unit", V.choice, ("optimizer", "micro"))
        opts = self.recipe_options
        if hasattr(opts, "to_dict") and not isinstance(opts, dict):
            self.recipe_options = opts = opts.to_dict()
        if not isinstance(opts, dict):
            raise InvalidType(f"invalid training option recipe_options={opts!r}: must be a dict")
        RECIPES[self.recipe].check_options(opts)
        self.refusal_phrasings = tuple(check("refusal_phrasings", V.str_list))  # one string is one phrasing
        for opt in ("template", "system"):
            if getattr(self, opt) is not None and not isinstance(getattr(self, opt), str):
                raise InvalidType(f"invalid training option {opt}={getattr(self, opt)!r}: must be a string or None")
        return self


# ----------------------------------------------------------------------------------------------- recipes

class Recipe:
    """How a batch becomes a loss. Subclasses set ``name`` and implement :meth:`build_loss`."""

    name = "base"

    def __init__(self, model, tokenizer, config: TrainConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config

    @classmethod
    def check_options(cls, options: dict) -> None:
        """Validate ``TrainConfig.recipe_options`` (a recipe without options accepts only ``{}``)."""
        if options:
            raise InvalidArgument(f"recipe {cls.name!r} takes no recipe_options, got {', '.join(sorted(options))}")

    def build_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The clean loss of one micro-batch (token-mean; the trainer weights it by the batch's token share)."""
        raise NotImplementedError

    def extra_loss(self, micro: int) -> torch.Tensor | None:
        """A loss added to micro-batch ``micro`` of the step, already weighted (R2D2's adversarial terms)."""
        return None

    def postfix(self) -> dict:
        """Extra fields for the progress bar after a step."""
        return {}

    def on_step(self, step: int) -> None:
        """Called after each optimizer step (by :meth:`after_step`)."""

    def after_step(self, step: int, info: dict) -> dict:
        """Called after each optimizer step with its losses and timings; returns the row for the run's
        ``train_log.jsonl`` (an adversarial recipe adds its terms and resets its test-case pool here)."""
        self.on_step(step)
        return {"step": step, **info}

    def seen_prompts(self) -> list[str]:
        """Prompts the recipe trained on besides the clean examples (recorded in every checkpoint)."""
        return []

    def write_files(self, folder: Path) -> None:
        """Write readable recipe files into a checkpoint folder being saved."""

    def state_dict(self) -> dict:
        """Recipe state to checkpoint (e.g. an attack pool); SFT has none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def response_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose label is not -100."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


class SFTRecipe(Recipe):
    """Cross-entropy on the response tokens (refusals for harmful prompts, helpful answers otherwise)."""

    name = "sft"

    def build_loss(self, batch):
        return response_nll(self.model, batch)


RECIPES: dict[str, type[Recipe]] = {"sft": SFTRecipe}


# ----------------------------------------------------------------------------------------------- result

@dataclass
class TrainResult:
    model: object  # the trained model (a PeftModel for LoRA)
    tokenizer: object
    losses: list[float]  # per optimizer step, from the first step of this run's history (resumed runs included)
    checkpoints: dict[int, str] = field(default_factory=dict)
    final_checkpoint: str | None = None
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    resumed_from: int | None = None


# ----------------------------------------------------------------------------------------------- helpers

def _schedule(config: TrainConfig):
    def f(step):  # step: optimizer steps taken so far (LambdaLR convention)
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _micro_batch(cursor: int, n: int, bs: int, seed: int) -> list[int]:
    """Indices of the micro-batch starting at position ``cursor`` of the endless per-epoch-shuffled stream."""
    out, orders = [], {}
    for k in range(cursor, cursor + bs):
        e = k // n
        if e not in orders:
            orders[e] = _order(n, seed, e)
        out.append(orders[e][k % n])
    return out


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def checkpoints(out_dir: str | os.PathLike) -> dict[int, Path]:
    """Complete checkpoints in ``out_dir``: ``{step: folder}``."""
    out = {}
    root = Path(out_dir)
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith("checkpoint-") and (d / STATE_FILE).is_file():
                try:
                    out[int(d.name.split("-", 1)[1])] = d
                except ValueError:
                    pass
    return dict(sorted(out.items()))


def claim_out_dir(out_dir: str | os.PathLike, *, overwrite: bool = False, create: bool = True) -> Path:
    """Check that ``out_dir`` may hold a training run, and (``create=True``) make it one.

    Accepted: a missing or empty folder, a training folder this package wrote (its marker says
    "training"; resuming into it is fine), or one written before markers existed (it holds
    ``checkpoint-N/trainer_state.pt``). Anything else raises :class:`~pysafegeom.errors.OutputExists`
    unless ``overwrite=True``, which allows writing into it (nothing in it is deleted; checkpoints of the
    same steps are replaced). ``create=True`` makes the folder, writes the marker and repairs what an
    interrupted checkpoint save left (:func:`pysafegeom._io.recover_all`). Call it with ``create=False``
    before any work starts.
    """
    out = Path(out_dir)
    legacy = out.is_dir() and read_marker(out) is None and bool(checkpoints(out))
    if not legacy:
        check_output_path(out, overwrite, "dir", content="training")
    if create:
        out.mkdir(parents=True, exist_ok=True)
        recover_all(out)
        if (read_marker(out) or {}).get("content") != "training":
            mark_dir(out, "training")
    return out


def _has_chat_template(tokenizer, template) -> None:
    from ..prompts import split_template

    split_template(tokenizer, template)  # raises TemplateError (a ValueError) with a clear message


def _prepare_model(model, config: TrainConfig, base_spec: str | None):
    torch.manual_seed(config.seed)
    if config.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError("LoRA training needs peft: pip install peft (or pass lora=False)") from None
        targets = config.lora_targets if isinstance(config.lora_targets, str) else list(config.lora_targets)
        lcfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets, bias="none", task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lcfg)
        except ValueError as exc:
            raise ValueError(f"invalid training option lora_targets={config.lora_targets!r}: {exc}") from None
        model.peft_config["default"].base_model_name_or_path = base_spec
    else:
        model.requires_grad_(True)
    model.train()
    return model


def checkpoint_name(step: int, config: TrainConfig) -> str:
    """``checkpoint-N``: N counts optimizer steps, or micro-batches with ``step_unit="micro"``."""
    return f"checkpoint-{step * (config.grad_accum if config.step_unit == 'micro' else 1)}"


def _save_checkpoint(model, tokenizer, optimizer, scheduler, recipe: Recipe, config: TrainConfig, out_dir: Path,
                     step: int, cursor: int, losses: list[float], base_spec: str | None,
                     training_prompts: list[str] = ()) -> Path:
    final = out_dir / checkpoint_name(step, config)
    with atomic_dir(final, content="checkpoint") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if config.lora:
            cfg_path = tmp / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = base_spec
            cfg_path.write_text(json.dumps(cfg, indent=2))
        tokenizer.save_pretrained(str(tmp))
        torch.save({"step": step, "cursor": cursor, "losses": list(losses), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": _rng_state(), "recipe": recipe.state_dict(),
                    "config": asdict(config)}, tmp / STATE_FILE)
        (tmp / "train_config.json").write_text(json.dumps(
            {**asdict(config), "base_model": base_spec, "optimizer_step": step, "micro_batches": step * config.grad_accum,
             "name_counts": "micro-batches" if config.step_unit == "micro" else "optimizer steps"},
            indent=2, default=str))
        recipe.write_files(tmp)
        write_training_prompts(tmp, list(dict.fromkeys(list(training_prompts) + recipe.seen_prompts())))
    return final


def _check_finite_weights(params, step: int, config: TrainConfig) -> None:
    """Refuse to checkpoint NaN or infinite weights (a diverged run)."""
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise InvalidArgument(f"training diverged at step {step}: some trained weights are NaN or infinite (lr="
                              f"{config.lr:g}; try a smaller lr, e.g. 2e-4); checkpoint-{step} was not written")


def _trainable_state(model, config) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.named_parameters() if v.requires_grad}


def _load_weights(model, ckpt: Path, config: TrainConfig) -> None:
    from safetensors.torch import load_file

    if config.lora and not (ckpt / "adapter_model.safetensors").is_file():
        raise MissingFile(f"checkpoint {ckpt} has no adapter_model.safetensors; delete it to resume from the one before")
    for f in ckpt.glob("*.safetensors"):
        V.safetensors_file(f)  # a truncated file is named, not a deserialising error

    if config.lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
    else:
        files = sorted(ckpt.glob("*.safetensors"))
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        # tied weights (lm_head = embed_tokens) are saved once; anything else missing is an error
        missing = [m for m in missing if "lm_head" not in m]
        if missing or unexpected:
            raise ValueError(f"checkpoint {ckpt} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


# ----------------------------------------------------------------------------------------------- run

def run(model, tokenizer, examples, config: TrainConfig | None = None, out_dir: str | os.PathLike = "train_out", *,
        resume: bool = False, progress: bool = True, callback=None, device=None, dtype=None,
        base_spec: str | None = None, overwrite: bool = False) -> TrainResult:
    """Train ``model`` on ``examples`` with ``config`` and write checkpoints to ``out_dir``.

    model: a spec for :func:`~pysafegeom.models.load_model` (name, folder, .gguf) or a loaded model (then
        LoRA checkpoints name ``model.config._name_or_path`` as their base; pass a spec so they name it).
    tokenizer: the tokenizer, or None to take the one ``load_model`` returns (spec only).
    examples: :class:`~pysafegeom.train.data.Example` objects or (instruction, response) pairs.
    resume: continue from the latest checkpoint in ``out_dir`` (same config) instead of starting over.
    callback: ``callback(step, loss)`` after every optimizer step (raise from it to stop the run).
    device, dtype: where and in which dtype a spec is loaded (default: CUDA when available; float32 on CPU).
    base_spec: the name LoRA checkpoints give as their base (default: the spec, or the loaded model's path).
    overwrite: write into an ``out_dir`` that is not a training folder of this package (see :func:`claim_out_dir`;
        otherwise such a folder raises :class:`~pysafegeom.errors.OutputExists` before any work starts).
    """
    if config is not None and not isinstance(config, TrainConfig):
        raise InvalidType(f"config must be a TrainConfig, got {type(config).__name__}")
    config = (config or TrainConfig()).validate()
    claim_out_dir(out_dir, overwrite=overwrite, create=False)
    if V.boolean("resume", resume) and not checkpoints(out_dir):
        partial = sorted(d.name for d in Path(out_dir).glob("checkpoint-*") if d.is_dir()) if Path(out_dir).is_dir() else []
        raise MissingFile(f"resume=True but {out_dir} holds no complete checkpoint (checkpoint-N/{STATE_FILE}) to "
                          "resume from" + (f"; {', '.join(partial)} lack {STATE_FILE} (interrupted saves?)" if partial
                                           else "") + "; pass resume=False to start a new run")
    examples = as_examples(examples)
    if not examples:
        raise ValueError("empty dataset: no training examples")
    if isinstance(model, (str, os.PathLike)):
        from ..models import load_model

        base_spec = base_spec or str(model)
        model, tok2 = load_model(base_spec, device=device, dtype=dtype)
        tokenizer = tokenizer or tok2
    else:
        base_spec = base_spec or getattr(model.config, "_name_or_path", None) or None
        if device is not None:
            model.to(device)
    if tokenizer is None:
        raise ValueError("pass the tokenizer with a loaded model")
    _has_chat_template(tokenizer, config.template)
    rows = encode_examples(tokenizer, examples, max_len=config.max_len, template=config.template, system=config.system)
    # what the model is trained on, recorded in every checkpoint (analyze refuses to fit or judge on these);
    # a model that was itself fine-tuned by pysafegeom passes its own record on
    train_prompts = list(dict.fromkeys((training_prompts(model) or []) + [ex.instruction for ex in examples]))
    if not any(any(l != IGNORE for l in r["labels"]) for r in rows):
        raise ValueError("empty dataset: no example has a response token to train on")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out_dir = claim_out_dir(out_dir, overwrite=overwrite)  # also repairs a checkpoint save cut by a kill

    model = _prepare_model(model, config, base_spec)
    dev = next(model.parameters()).device
    recipe = RECIPES[config.recipe](model, tokenizer, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))

    step, cursor, losses, resumed_from = 0, 0, [], None
    saved = {}
    if resume:
        found = checkpoints(out_dir)
        if found:
            resumed_from, ckpt = max(found.items())
            try:
                state = torch.load(ckpt / STATE_FILE, weights_only=False)
            except Exception as exc:  # torch's zip reader errors say nothing of which file
                raise InputFileError(f"{ckpt / STATE_FILE} is truncated or corrupt ({type(exc).__name__}: {exc}); "
                                     f"delete {ckpt} to resume from the checkpoint before it") from exc
            lost = [k for k in ("step", "cursor", "losses", "optimizer", "scheduler", "rng", "recipe", "config")
                    if not isinstance(state, dict) or k not in state]
            if lost:
                raise InputFileError(f"{ckpt / STATE_FILE} lacks {', '.join(lost)}: not a pysafegeom trainer state; "
                                     f"delete {ckpt} to resume from the checkpoint before it")
            old = {k: v for k, v in state["config"].items() if k not in ("save_at",)}
            new = {k: v for k, v in asdict(config).items() if k not in ("save_at",)}
            diff = [k for k in new if json.dumps(old.get(k), default=str) != json.dumps(new[k], default=str)]
            if diff:
                raise ValueError(f"cannot resume from {ckpt}: its config differs in {', '.join(diff)}")
            _load_weights(model, ckpt, config)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            recipe.load_state_dict(state["recipe"])
            _set_rng_state(state["rng"])
            step, cursor, losses = state["step"], state["cursor"], list(state["losses"])
            saved = {s: str(p) for s, p in found.items()}

    from tqdm.auto import tqdm

    save_steps = set(config.save_at) | {config.steps}
    n = len(rows)
    log = _StepLog(out_dir / STEP_LOG, step)
    if step == 0 and 0 in save_steps:  # the untrained start, as an anchor
        saved[0] = str(_save_checkpoint(model, tokenizer, optimizer, scheduler, recipe, config, out_dir, 0, cursor,
                                        losses, base_spec, train_prompts))
    t0, tokens = time.perf_counter(), 0
    bar = tqdm(total=config.steps, initial=step, desc=f"train {config.recipe}{' lora' if config.lora else ''}",
               unit="step", disable=not progress, dynamic_ncols=True)
    try:
        while step < config.steps:
            t_step = time.perf_counter()
            clean_s = extra_back_s = 0.0
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            clean_total = 0.0
            # weight each micro-batch's token-mean loss by its share of the step's response tokens, so the
            # step's loss is the mean over all its tokens (a token-mean divided by grad_accum would not be)
            micro = []
            for _ in range(config.grad_accum):
                idx = _micro_batch(cursor, n, config.batch_size, config.seed)
                cursor += config.batch_size
                micro.append(collate([rows[i] for i in idx], pad_id))
            n_resp = [int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro]
            n_total = max(1, sum(n_resp))
            for j, (b, n_i) in enumerate(zip(micro, n_resp)):
                loss = None
                if n_i:
                    tc = time.perf_counter()
                    batch = {k: v.to(dev) for k, v in b.items()}
                    tokens += int(batch["attention_mask"].sum())
                    loss = recipe.build_loss(batch) * (n_i / n_total)
                    loss.backward()
                    clean_total += float(loss.detach())
                    clean_s += time.perf_counter() - tc
                extra = recipe.extra_loss(j)  # its own time is the recipe's to report
                if extra is not None:
                    tb = time.perf_counter()
                    extra.backward()
                    extra_back_s += time.perf_counter() - tb
                    loss = extra if loss is None else loss.detach() + extra.detach()
                if loss is not None:
                    total += float(loss.detach())
            if not math.isfinite(total):  # before the step: the weights are still those of the last good step
                raise InvalidArgument(f"training diverged at step {step + 1}: the loss is {total} (lr={config.lr:g}; "
                                      "try a smaller lr, e.g. 2e-4, or max_grad_norm=1.0); no checkpoint was written "
                                      "for this step")
            to = time.perf_counter()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            opt_s = time.perf_counter() - to
            step += 1
            losses.append(total)
            post = recipe.postfix()
            info = {"loss": total, "clean": clean_total, "lr": scheduler.get_last_lr()[0], "clean_s": clean_s,
                    "optimizer_s": opt_s, "step_s": time.perf_counter() - t_step}
            if extra_back_s:
                info["adversarial_backward_s"] = extra_back_s
            log.write(recipe.after_step(step, info))
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{total:.4f}", **post, s_step=f"{info['step_s']:.1f}",
                            tok_s=f"{tokens / max(elapsed, 1e-9):.0f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            bar.update(1)
            if step in save_steps:
                _check_finite_weights(params, step, config)
                saved[step] = str(_save_checkpoint(model, tokenizer, optimizer, scheduler, recipe, config, out_dir,
                                                   step, cursor, losses, base_spec, train_prompts))
            if callback is not None:
                callback(step, total)
    finally:
        bar.close()
    model.eval()
    attach_training_prompts(model, train_prompts)
    elapsed = time.perf_counter() - t0
    return TrainResult(model=model, tokenizer=tokenizer, losses=losses, checkpoints=dict(sorted(saved.items())),
                       final_checkpoint=saved.get(config.steps), seconds=elapsed,
                       tokens_per_s=tokens / max(elapsed, 1e-9), resumed_from=resumed_from)


def export_adapter(checkpoint: str | os.PathLike, dest: str | os.PathLike, *, base: str | None = None,
                   dtype: torch.dtype = torch.bfloat16, overwrite: bool = False) -> Path:
    """Copy a LoRA checkpoint's adapter (weights cast to ``dtype``, config with base ``base``) to ``dest``,
    without the trainer state: a small folder that :func:`~pysafegeom.models.load_model` opens.

    ``dest`` must be missing or empty; an existing folder with files in it raises
    :class:`~pysafegeom.errors.OutputExists` unless ``overwrite=True``, which writes the adapter files into
    it and keeps its other files (e.g. a shipped anchor's notes)."""
    from safetensors.torch import load_file, save_file

    src, dest = Path(checkpoint), Path(dest)
    if not (src / "adapter_config.json").is_file():
        raise ValueError(f"{src} is not a LoRA checkpoint (no adapter_config.json)")
    check_output_path(dest, overwrite, "dir", content="adapter")
    dest.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    if base is not None:
        cfg["base_model_name_or_path"] = base
    (dest / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    state = {k: v.to(dtype).contiguous() for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
    save_file(state, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    recorded = read_training_prompts(src)
    if recorded is not None:
        write_training_prompts(dest, recorded)
    return dest
