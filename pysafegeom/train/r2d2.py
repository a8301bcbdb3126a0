"""R2D2 adversarial training (HarmBench's recipe), as a :class:`~pysafegeom.train.sft.Recipe` beside SFT.

A persistent pool of single-behaviour GCG test cases is kept beside the clean training data. For every
micro-batch the recipe samples ``cases_per_step`` cases from the pool, moves each suffix by
``gcg_steps_per_update`` GCG steps against the *current* weights (:class:`pysafegeom.attacks.gcg.GCG`,
stepped from outside; its prefix caches are refreshed whenever the weights changed), and adds two terms
to the clean loss::

    L = L_clean + away_weight * L_away + toward_weight * L_toward

* ``L_clean``: cross-entropy on the clean data's response tokens (the SFT loss, token-weighted over the
  micro-batches of an optimizer step);
* ``L_away``: ``-mean log(1 - p(y_t))`` over the case's GCG target tokens, where tokens with
  ``log p(y_t) < away_threshold`` (-5) contribute 0 but still count in the mean (HarmBench's
  ``log_1_minus_p_loss``);
* ``L_toward``: cross-entropy toward ``refusal`` ("Sorry, I can't do that.") plus the end-of-turn token,
  given the template, the behaviour and the suffix.

Both adversarial terms are means over the sampled cases, and each micro-batch's share is ``1/grad_accum``
(HarmBench: one case per device and micro-batch, averaged over devices and accumulation). Every
``reset_every`` optimizer steps ``reset_fraction`` of the pool is replaced by behaviours not in it, each
with a target drawn from its targets and a fresh suffix ``"! " * U{suffix_tokens}``.

``adversarial=False`` is the matched SFT control: the identical recipe (same clean data in the same order,
learning rate, schedule, steps and checkpoints) with both adversarial terms, and the GCG that feeds them,
switched off (PROTOCOL.md 10.8).

Everything is recorded. Each checkpoint holds the pool (behaviour, target, suffix ids and text, GCG loss
history) in ``r2d2_pool.json`` and in the trainer state with the recipe's RNG states, so a killed run
resumes to identical weights and an identical pool; ``r2d2_log.jsonl`` in the run folder has one line per
optimizer step (loss terms, the cases and suffixes trained on, their GCG losses, the time split).

Differences from HarmBench's code, all options: one device (GCG candidates are batched, not sharded over
8 GPUs); ``cases_per_step`` cases per micro-batch rather than one per GPU; the pool and strings are saved;
the training behaviours are checked against the evaluation sets (HarmBench's pool includes its own
validation behaviours).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

import torch

from .. import validate as V
from .._io import atomic_write_text
from ..errors import DataOverlap, InvalidArgument, InvalidType
from .data import IGNORE, collate, end_of_turn_ids
from .sft import RECIPES, SFTRecipe, TrainConfig

DEFAULT_REFUSAL = "Sorry, I can't do that."
POOL_FILE = "r2d2_pool.json"
LOG_FILE = "r2d2_log.jsonl"


# ----------------------------------------------------------------------------------------------- config

@dataclass
class R2D2Config:
    """R2D2 options (``TrainConfig(recipe="r2d2", recipe_options=R2D2Config(...))``); defaults are
    HarmBench's code (``adv_training_utils.py`` / ``run_sft_adv_training.py``).

    adversarial: False gives the matched SFT control (no GCG, no away/toward terms).
    behaviors: the training behaviours with targets (a path for :func:`load_training_behaviors`; None:
        the package's own 40, written for this project); behavior_targets: HarmBench's targets JSON for a
        HarmBench behaviours CSV.
    pool_size: test cases in the pool (HarmBench's code: 8; the paper: 180, see :meth:`paper`).
    cases_per_step: cases sampled, updated and trained on per micro-batch (None: min(8, pool_size)).
    gcg_steps_per_update: GCG steps per sampled case and micro-batch (5); search_width (512), topk (256),
        filter_ids (False, as HarmBench: no retokenisation filter), gcg_batch_size (None: the GCG default).
    reset_every: optimizer steps between pool resets (50); reset_fraction: share of the pool replaced (0.2).
    suffix_tokens: (lo, hi) "! " tokens of a new suffix, drawn uniformly (15, 20).
    away_weight, toward_weight: the adversarial terms' weights (0.5, 0.5); away_threshold: log p below
        which a target token's away term is dropped (-5). refusal: the toward target.
    """

    adversarial: bool = True
    behaviors: str | None = None
    behavior_targets: str | None = None
    pool_size: int = 8
    cases_per_step: int | None = None
    gcg_steps_per_update: int = 5
    search_width: int = 512
    topk: int = 256
    filter_ids: bool = False
    gcg_batch_size: int | None = None
    reset_every: int = 50
    reset_fraction: float = 0.2
    suffix_tokens: tuple[int, int] = (15, 20)
    away_weight: float = 0.5
    toward_weight: float = 0.5
    away_threshold: float = -5.0
    refusal: str = DEFAULT_REFUSAL

    @classmethod
    def paper(cls, **kw) -> "R2D2Config":
        """The paper's settings (arXiv 2402.04249 sections 5-6): N=180 cases, n=8 per step, m=5 GCG steps,
        K=20% reset every L=50 steps (train for M=500 steps: ``TrainConfig(steps=500)``)."""
        return cls(**{**dict(pool_size=180, cases_per_step=8, gcg_steps_per_update=5, reset_fraction=0.2,
                             reset_every=50), **kw})

    @classmethod
    def miniature(cls, **kw) -> "R2D2Config":
        """The 2-core CPU preset of ``trajectories/`` (see its README for the distance from HarmBench's)."""
        return cls(**{**dict(pool_size=8, cases_per_step=2, gcg_steps_per_update=2, search_width=48, topk=48,
                             reset_every=10, reset_fraction=0.25, suffix_tokens=(10, 12)), **kw})

    @classmethod
    def from_dict(cls, d: dict) -> "R2D2Config":
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            raise InvalidType(f"R2D2 options must be an R2D2Config or a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidArgument(f"unknown R2D2 option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        d = dict(d)
        if "suffix_tokens" in d and isinstance(d["suffix_tokens"], list):
            d["suffix_tokens"] = tuple(d["suffix_tokens"])
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["suffix_tokens"] = list(self.suffix_tokens)
        return d

    def check(self) -> "R2D2Config":
        def opt(name, fn, *a, **kw):
            try:
                return fn(name, getattr(self, name), *a, **kw)
            except (InvalidArgument, InvalidType) as exc:
                raise type(exc)(f"invalid R2D2 option {name}={getattr(self, name)!r}: {exc}") from None

        opt("adversarial", V.boolean)
        opt("filter_ids", V.boolean)
        opt("pool_size", V.positive_int, hint="the test-case pool cannot be empty")
        opt("gcg_steps_per_update", V.nonneg_int)
        opt("search_width", V.positive_int)
        opt("topk", V.positive_int)
        opt("gcg_batch_size", V.optional_positive_int)
        opt("reset_every", V.positive_int)
        opt("reset_fraction", V.finite_float, lo=0.0, hi=1.0)
        opt("away_threshold", V.finite_float)
        for name in ("away_weight", "toward_weight"):
            opt(name, V.finite_float, lo=0.0, hint="a negative weight would train the model toward the attack")
        if self.cases_per_step is not None:
            opt("cases_per_step", V.positive_int)
            if self.cases_per_step > self.pool_size:
                raise InvalidArgument(f"invalid R2D2 option cases_per_step={self.cases_per_step}: more than the "
                                      f"pool's {self.pool_size} cases")
        st = self.suffix_tokens
        if (not isinstance(st, (tuple, list)) or len(st) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                          for x in st) or not 1 <= st[0] <= st[1]):
            raise InvalidArgument(f"invalid R2D2 option suffix_tokens={st!r}: give (lo, hi) with 1 <= lo <= hi")
        if not isinstance(self.refusal, str) or V.is_blank(self.refusal):
            raise InvalidArgument("invalid R2D2 option refusal: the toward target must be a non-empty string")
        for name in ("behaviors", "behavior_targets"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidType(f"invalid R2D2 option {name}={getattr(self, name)!r}: a path string or None")
        return self

    @property
    def n_cases(self) -> int:
        return self.cases_per_step if self.cases_per_step is not None else min(8, self.pool_size)


# ----------------------------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Behaviour:
    """A training behaviour: its id, the request, and the targets GCG may optimise toward."""

    id: str
    text: str
    targets: tuple[str, ...]


def default_behaviors_path() -> Path:
    return Path(str(resources.files("pysafegeom.train") / "data" / "r2d2_behaviors.jsonl"))


def load_training_behaviors(path=None, targets=None) -> list[Behaviour]:
    """Training behaviours with targets: a JSONL of ``{"id", "behavior", "targets": [...]}`` (the package's
    default, ``path=None``), AdvBench's ``harmful_behaviors.csv`` (goal, target), HarmBench's behaviours CSV
    with ``targets`` its targets JSON, or any table :func:`pysafegeom.data.load_behaviors` reads. A behaviour
    without a target, or two with one id, is an error naming it."""
    from ..data import load_behaviors
    from ..data._prompt import DataError
    from ..data.loaders import _read_jsonl

    p = Path(path) if path is not None else default_behaviors_path()
    out: list[Behaviour] = []
    if p.suffix == ".jsonl" and targets is None:
        if not p.is_file():
            raise DataError(f"{p}: no such behaviours file")
        for n, row in enumerate(_read_jsonl(p, "rows of {id, behavior, targets}"), 1):
            text = row.get("behavior") or row.get("prompt") or row.get("goal")
            tg = row.get("targets", row.get("target"))
            tg = [tg] if isinstance(tg, str) else list(tg or [])
            bid = str(row.get("id") or row.get("BehaviorID") or f"behavior-{n:04d}")
            if not isinstance(text, str) or V.is_blank(text):
                raise DataError(f"{p}, row {n}: behaviour {bid!r} has no 'behavior' text")
            if not tg or any(not isinstance(t, str) or V.is_blank(t) for t in tg):
                raise DataError(f"{p}, row {n}: behaviour {bid!r} has no target; R2D2's GCG needs one per behaviour")
            out.append(Behaviour(bid, text, tuple(tg)))
    else:
        for q in load_behaviors(p, targets, require_targets=True):
            out.append(Behaviour(str(q.id), q.text, (q.meta["target"],)))
    if not out:
        raise DataError(f"{p}: no training behaviours")
    seen: dict[str, int] = {}
    for b in out:
        seen[b.id] = seen.get(b.id, 0) + 1
    dup = [k for k, v in seen.items() if v > 1]
    if dup:
        raise DataError(f"{p}: behaviour id(s) used more than once: {', '.join(dup[:5])}")
    return out


def anchor_pool_prompts(split: str = "train") -> list[str]:
    """The harmless prompts of the shipped anchor's training pool (matched harmless, safe-sounding and
    everyday; ``split`` "train" or "val"): the default clean prompts, answered by the base model itself."""
    from ..data.loaders import _read_jsonl

    root = Path(str(resources.files("pysafegeom") / "anchors" / "smollm2-135m-safety" / "pool"))
    return [row["prompt"] for name in ("harmless_matched", "safe_sounds_dangerous", "everyday")
            for row in _read_jsonl(root / f"{name}.jsonl", "pool rows") if row.get("split") == split]


def read_chat_examples(path) -> list[dict]:
    """Clean training data from a JSONL file: ``{"messages": [..., {"role": "user", ...}, {"role":
    "assistant", ...}]}`` (the last user turn and the assistant answer after it are used) or ``{"prompt",
    "response"}`` rows (an optional ``end_turn`` false marks an answer cut short). Bad rows are errors
    naming the line."""
    from ..data._prompt import DataError
    from ..data.loaders import _read_jsonl

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such clean-data file")
    out = []
    for n, row in enumerate(_read_jsonl(p, "rows of {messages} or {prompt, response}"), 1):
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            msgs = row["messages"]
            if (len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs) or msgs[-1].get("role") != "assistant"
                    or msgs[-2].get("role") != "user"):
                raise DataError(f"{p}, row {n}: 'messages' must end with a user turn and the assistant's answer")
            prompt, response = msgs[-2].get("content"), msgs[-1].get("content")
        elif isinstance(row, dict):
            prompt, response = row.get("prompt", row.get("instruction")), row.get("response")
        else:
            prompt = response = None
        if not isinstance(prompt, str) or not isinstance(response, str) or V.is_blank(prompt) or V.is_blank(response):
            raise DataError(f"{p}, row {n}: expected {{'messages': [...]}} or {{'prompt', 'response'}} with non-empty text")
        out.append({"prompt": prompt, "response": response, "end_turn": bool(row.get("end_turn", True))})
    if not out:
        raise DataError(f"{p}: no clean training examples")
    return out


def _norm(text: str) -> str:
    return " ".join(text.casefold().split()).rstrip(".?!")


def check_disjoint(train: list[Behaviour], evaluation: dict[str, list]) -> None:
    """Raise :class:`~pysafegeom.errors.DataOverlap` naming every training behaviour whose id or text
    (case- and space-folded) is in an evaluation set. ``evaluation``: ``{set name: [Prompt or str, ...]}``."""
    hits = []
    for name, items in evaluation.items():
        ids = {str(getattr(q, "id", "")) for q in items if getattr(q, "id", None)}
        texts = {_norm(getattr(q, "text", q)): str(getattr(q, "id", "") or "") for q in items}
        for b in train:
            if b.id in ids:
                hits.append(f"{b.id} (id in {name})")
            elif _norm(b.text) in texts:
                other = texts[_norm(b.text)]
                hits.append(f"{b.id} (text of {name}{' ' + other if other else ''})")
    if hits:
        raise DataOverlap(f"{len(hits)} training behaviour(s) are also evaluation behaviours: {', '.join(hits[:10])}"
                          f"{' ...' if len(hits) > 10 else ''}; remove them from the training file (a model must "
                          "never be judged on behaviours it was trained to refuse)")


# ----------------------------------------------------------------------------------------------- losses

def log_1_minus_p_loss(logits: torch.Tensor, labels: torch.Tensor, threshold: float = -5.0) -> torch.Tensor:
    """``-sum log(1 - p(label)) / (number of labelled tokens)``, with tokens whose ``log p(label) < threshold``
    contributing 0 (they still count in the denominator). ``logits [N, V]``, ``labels [N]`` (-100 ignored).
    ``log(1 - p)`` is computed as ``logsumexp`` over the other tokens minus ``logsumexp`` over all."""
    logits = logits.float()
    keep = labels != IGNORE
    lab = labels.clamp_min(0)
    lse = torch.logsumexp(logits, dim=-1)
    log_p = logits.gather(-1, lab[:, None]).squeeze(-1) - lse
    others = logits.scatter(-1, lab[:, None], float("-inf"))
    log_1mp = torch.logsumexp(others, dim=-1) - lse
    log_1mp = torch.where(keep & (log_p >= threshold), log_1mp, torch.zeros_like(log_1mp))
    return -log_1mp.sum() / keep.sum().clamp_min(1).float()


def _row_means(logits: torch.Tensor, labels: torch.Tensor, fn) -> torch.Tensor:
    return torch.stack([fn(logits[i], labels[i]) for i in range(labels.shape[0])])


# ----------------------------------------------------------------------------------------------- recipe

class R2D2Recipe(SFTRecipe):
    """The R2D2 recipe; see the module docstring. ``recipe_options`` of the :class:`TrainConfig` hold its
    :class:`R2D2Config`."""

    name = "r2d2"

    @classmethod
    def check_options(cls, options: dict) -> None:
        R2D2Config.from_dict(options).check()

    def __init__(self, model, tokenizer, config: TrainConfig):
        super().__init__(model, tokenizer, config)
        self.opts = R2D2Config.from_dict(config.recipe_options or {}).check()
        self.behaviours = load_training_behaviors(self.opts.behaviors, self.opts.behavior_targets)
        self.rng = random.Random(config.seed * 7919 + 17)
        self.gen = torch.Generator().manual_seed(config.seed * 7919 + 29)
        self.pool: list[dict] = []
        self.used: list[str] = []  # behaviour ids that have entered the pool, in order
        self._gcg: dict[int, object] = {}  # pool slot -> GCG attack (rebuilt after a resume)
        self._fresh: dict[int, int] = {}  # pool slot -> optimizer step its caches were computed at
        self.opt_step = 0
        self.log: dict = {}
        self.eot = end_of_turn_ids(tokenizer, config.template)
        self.refusal_ids = list(tokenizer(self.opts.refusal, add_special_tokens=False)["input_ids"]) + list(self.eot)
        if self.opts.adversarial:
            if len(self.behaviours) < self.opts.pool_size:
                raise InvalidArgument(f"the pool needs {self.opts.pool_size} behaviours but the training file has "
                                      f"{len(self.behaviours)}; lower pool_size or give more behaviours")
            for slot in range(self.opts.pool_size):
                self.pool.append(self._new_case(slot, step=0))

    # -- the pool

    def _gcg_config(self, n_tokens: int):
        from ..attacks.gcg import GCGConfig

        o, c = self.opts, self.config
        return GCGConfig(num_steps=max(1, o.gcg_steps_per_update), search_width=o.search_width, topk=o.topk,
                         filter_ids=o.filter_ids, optim_str_init=" ".join(["!"] * n_tokens), template=c.template,
                         system=c.system, seed=c.seed, progress=False, batch_size=o.gcg_batch_size,
                         dedupe=True).check()

    def _attack_model(self):
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _new_case(self, slot: int, step: int) -> dict:
        taken = {c["id"] for c in self.pool}
        free = [b for b in self.behaviours if b.id not in taken]
        if not free:
            raise InvalidArgument("no behaviour left to reset the pool with: the pool holds them all; give more "
                                  "training behaviours or a smaller pool")
        b = free[self.rng.randrange(len(free))]
        target = b.targets[self.rng.randrange(len(b.targets))]
        n = self.rng.randint(*self.opts.suffix_tokens)
        case = {"slot": slot, "id": b.id, "behavior": b.text, "target": target, "n_tokens": n, "born": step,
                "suffix_ids": None, "suffix": None, "losses": [], "updates": 0}
        gcg = self._build(case)
        case["suffix_ids"] = list(gcg.init_ids[0])
        case["suffix"] = gcg.suffix_strings(torch.tensor([case["suffix_ids"]]))[0] or ""
        self.used.append(b.id)
        return case

    def _build(self, case: dict):
        from ..attacks.gcg import GCG

        gcg = GCG(self._attack_model(), self.tokenizer, case["behavior"], case["target"], self._gcg_config(case["n_tokens"]))
        self._check_fits(gcg)
        self._gcg[case["slot"]] = gcg
        self._fresh[case["slot"]] = self.opt_step
        return gcg

    def _check_fits(self, gcg) -> None:
        p = gcg.prompts[0]
        need = len(p.before_ids) + len(gcg.init_ids[0]) + len(p.after_ids) + max(len(p.target_ids), len(self.refusal_ids))
        cfg = self.model.config
        ctx = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        limit = min(x for x in (ctx, self.config.max_len) if x)
        if need > limit:
            raise InvalidArgument(f"the GCG test case needs {need} tokens (prompt {len(p.before_ids) + len(p.after_ids)}, "
                                  f"suffix {len(gcg.init_ids[0])}, target {max(len(p.target_ids), len(self.refusal_ids))}) "
                                  f"but the context is {limit} (max_len={self.config.max_len}, model {ctx}); shorten "
                                  "suffix_tokens, the behaviour or the target, or raise max_len")

    def _gcg_for(self, case: dict):
        slot = case["slot"]
        gcg = self._gcg.get(slot)
        if gcg is None:
            gcg = self._build(case)
        elif self._fresh.get(slot) != self.opt_step:  # the weights moved since its caches were made
            gcg.refresh()
            self._fresh[slot] = self.opt_step
        return gcg

    def _update(self, case: dict) -> float | None:
        """Move the case's suffix by ``gcg_steps_per_update`` GCG steps against the current weights."""
        if self.opts.gcg_steps_per_update == 0:
            return None
        gcg = self._gcg_for(case)
        st = gcg.new_state(self.gen, case["suffix_ids"]) if case.get("state") is None else case["state"]
        was = self.model.training
        self.model.eval()
        try:
            for _ in range(self.opts.gcg_steps_per_update):
                loss = gcg.step(st, self.gen)
        finally:
            self.model.train(was)
        case["suffix_ids"] = list(st["ids"])
        case["suffix"] = gcg.suffix_strings(torch.tensor([case["suffix_ids"]]))[0] or ""
        case["losses"].append(float(loss))
        case["updates"] += 1
        case["state"] = None  # buffer_size 0: the state is the suffix; a new one starts from it next time
        return float(loss)

    # -- losses

    def _adversarial_batch(self, cases: list[dict]) -> tuple[dict, int]:
        """Rows ``[target for each case] + [refusal for each case]`` of context ``prompt + suffix``, labels on the
        continuation only."""
        away, toward = [], []
        for case in cases:
            p = self._gcg_for(case).prompts[0]
            ctx = list(p.before_ids) + list(case["suffix_ids"]) + list(p.after_ids)
            away.append({"input_ids": ctx + list(p.target_ids), "labels": [IGNORE] * len(ctx) + list(p.target_ids)})
            toward.append({"input_ids": ctx + self.refusal_ids, "labels": [IGNORE] * len(ctx) + self.refusal_ids})
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return collate(away + toward, pad), len(cases)

    def extra_loss(self, micro: int) -> torch.Tensor | None:
        """The weighted adversarial terms for one micro-batch (GCG updates first); None for the control."""
        o = self.opts
        if not o.adversarial or (o.away_weight == 0 and o.toward_weight == 0 and o.gcg_steps_per_update == 0):
            return None
        t0 = time.perf_counter()
        slots = self.rng.sample(range(len(self.pool)), o.n_cases)
        cases = [self.pool[s] for s in slots]
        gcg_losses = [self._update(c) for c in cases]
        t1 = time.perf_counter()
        batch, n = self._adversarial_batch(cases)
        dev = next(self.model.parameters()).device
        batch = {k: v.to(dev) for k, v in batch.items()}
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        thr = o.away_threshold
        away = _row_means(logits[:n], labels[:n], lambda lg, lb: log_1_minus_p_loss(lg, lb, thr)).mean()
        toward = _row_means(logits[n:], labels[n:], lambda lg, lb: torch.nn.functional.cross_entropy(
            lg.float(), lb, ignore_index=IGNORE)).mean()
        loss = (o.away_weight * away + o.toward_weight * toward) / self.config.grad_accum
        self._note(micro, cases, gcg_losses, float(away.detach()), float(toward.detach()), t1 - t0,
                   time.perf_counter() - t1)
        return loss

    def _note(self, micro, cases, gcg_losses, away, toward, gcg_s, adv_fwd_s) -> None:
        if micro == 0:
            self.log = {"cases": [], "away": [], "toward": [], "gcg_s": 0.0, "adversarial_forward_s": 0.0}
        lg = self.log
        lg["cases"] += [{"slot": c["slot"], "id": c["id"], "suffix": c["suffix"], "gcg_loss": gl}
                        for c, gl in zip(cases, gcg_losses)]
        lg["away"].append(away)
        lg["toward"].append(toward)
        lg["gcg_s"] += gcg_s
        lg["adversarial_forward_s"] += adv_fwd_s

    # -- the trainer's hooks

    def postfix(self) -> dict:
        if not self.opts.adversarial or not self.log:
            return {}
        lg = self.log
        gl = [c["gcg_loss"] for c in lg["cases"] if c["gcg_loss"] is not None]
        return {"away": f"{sum(lg['away']) / len(lg['away']):.3f}", "toward": f"{sum(lg['toward']) / len(lg['toward']):.3f}",
                **({"pool": f"{sum(gl) / len(gl):.2f}"} if gl else {}), "gcg_s": f"{lg['gcg_s']:.1f}"}

    def after_step(self, step: int, info: dict) -> dict:
        self.opt_step = step
        row = {"step": step, **info, "adversarial": self.opts.adversarial}
        if self.opts.adversarial and self.log:
            lg = self.log
            row.update(away=sum(lg["away"]) / len(lg["away"]), toward=sum(lg["toward"]) / len(lg["toward"]),
                       gcg_s=lg["gcg_s"], adversarial_forward_s=lg["adversarial_forward_s"], cases=lg["cases"])
        if self.opts.adversarial and step % self.opts.reset_every == 0:
            k = int(round(self.opts.reset_fraction * len(self.pool)))
            slots = sorted(self.rng.sample(range(len(self.pool)), k)) if k else []
            for s in slots:
                self._gcg.pop(s, None)
                self.pool[s] = self._new_case(s, step)
            row["reset"] = [{"slot": s, "id": self.pool[s]["id"], "target": self.pool[s]["target"]} for s in slots]
        self.log = {}
        return row

    def seen_prompts(self) -> list[str]:
        by_id = {b.id: b.text for b in self.behaviours}
        return list(dict.fromkeys(by_id[i] for i in self.used))

    def pool_record(self) -> list[dict]:
        return [{k: v for k, v in c.items() if k != "state"} for c in self.pool]

    def state_dict(self) -> dict:
        return {"pool": self.pool_record(), "used": list(self.used), "rng": self.rng.getstate(),
                "gen": self.gen.get_state(), "opt_step": self.opt_step, "options": self.opts.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("options") != self.opts.to_dict():
            raise InvalidArgument("cannot resume: the checkpoint's R2D2 options differ from these")
        self.pool = [dict(c, state=None) for c in state["pool"]]
        self.used = list(state["used"])
        self.rng.setstate(state["rng"])
        self.gen.set_state(state["gen"])
        self.opt_step = int(state["opt_step"])
        self._gcg.clear()
        self._fresh.clear()

    def write_files(self, folder: Path) -> None:
        atomic_write_text(Path(folder) / POOL_FILE, json.dumps(
            {"step": self.opt_step, "adversarial": self.opts.adversarial, "options": self.opts.to_dict(),
             "pool": self.pool_record(), "behaviours_used": self.used}, indent=1) + "\n")


RECIPES["r2d2"] = R2D2Recipe


def config(steps: int, *, options: R2D2Config | dict | None = None, **train) -> TrainConfig:
    """A :class:`TrainConfig` for R2D2 (``options``: an :class:`R2D2Config` or its dict)."""
    opts = R2D2Config.from_dict(options or {}).check()
    return TrainConfig(recipe="r2d2", steps=steps, recipe_options=opts.to_dict(), **train)


__all__ = ["Behaviour", "DEFAULT_REFUSAL", "R2D2Config", "R2D2Recipe", "anchor_pool_prompts", "check_disjoint", "config",
           "default_behaviors_path", "load_training_behaviors", "log_1_minus_p_loss", "read_chat_examples"]
