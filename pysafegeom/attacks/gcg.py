"""Greedy Coordinate Gradient (GCG; Zou et al. 2023): an adversarial suffix that makes a model start its
answer with a target string.

One step, for the current suffix ``x [L]`` (token ids):

1. **Token gradient.** ``g = d loss / d onehot(x)``, ``[L, V]``: one forward and backward of the attacked
   prompt with the suffix fed as ``onehot(x) @ W_E``, through the prefix KV cache.
2. **Candidates.** ``search_width`` copies of ``x``, each with ``n_replace`` positions replaced by a token
   drawn uniformly from the ``topk`` most negative entries of ``g`` at that position (never a forbidden
   token, never the current one), by :func:`pysafegeom.ops.sample_candidates` with this attack's own
   seeded generator. The retokenisation filter keeps candidates whose decoded text, put into the
   prompt, tokenises back to exactly the same ids.
3. **Scoring.** The loss of every candidate (mean CE of the target tokens; mellowmax of the negated
   target logits with ``use_mellowmax``), summed over behaviours (universal mode) and models (ensemble).
4. **Update.** The lowest-loss candidate becomes the suffix (with ``buffer_size > 0``: the best of a
   buffer of the best suffixes seen), as in nanoGCG.

The scoring in step 3 is where the time goes, and it is made cheaper by exact means only, each a
:class:`GCGConfig` switch, each tested to give the losses of a brute-force full forward:

* ``use_prefix_cache``: the template and instruction before the suffix are run once per attack; their KV
  cache is shared by every candidate as an expanded view (no copy per candidate).
* ``target_only_logits``: the LM head runs at the target positions only, through the fused
  :func:`pysafegeom.ops.chunked_cross_entropy`, so ``[B, T, V]`` logits never exist; the final target
  token, whose output nothing reads, is not fed at all.
* ``reuse_suffix_prefix``: a candidate that first differs from the current suffix at position ``p`` shares
  ``before + x[:p]`` with it; that KV is taken from the gradient pass. Candidates are sorted by ``p`` and
  cut into batches that minimise (rows computed + a per-batch overhead), so the reuse is used where it
  measures faster than one big batch.
* ``dedupe``: identical candidates are scored once, and a memo of losses seen in earlier steps (cleared
  whenever the set of behaviours changes) skips repeats.
* ``exclude_current``: the current token is never drawn, so there are no no-op candidates.
* batches of at most ``batch_size`` candidates (None: all on CPU, an estimate from free memory on CUDA),
  halved on out-of-memory; no ``empty_cache`` between batches.

More than one device (:mod:`pysafegeom.attacks.multidevice`): a model dispatched by accelerate over devices
(``device_map=``, offloaded to the CPU or the disk) runs as it is: the one-hot and the ids live on the
embedding's execution device, the target loss on the LM head's, each layer's prefix KV on that layer's.
``GCGConfig.devices`` splits each step's candidates over replicas of the model, one per device, scored
concurrently; the candidates, and so the search, are the same as on one device.

Prompts are built from the chat template rendered around a sentinel (as :mod:`pysafegeom.prompts` does):
the instruction, then the suffix, inside the user turn; turn markers that are also the BOS token are
kept. With the retokenisation filter on, the attacked ids always equal
``tokenizer.apply_chat_template(instruction + suffix)``: what the test case string gives any other tool.

Determinism: all randomness comes from one ``torch.Generator`` seeded with ``seed``; with ``out=`` every
step writes the whole state (suffix, buffer, generator state, step, losses, loss memo) atomically, and a
killed run resumed with ``resume=True`` reaches the identical result.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import ops
from .. import validate as V
from .._io import atomic_write_bytes, json_safe
from ..errors import AttackError, InvalidType, OutputExists  # noqa: F401 (AttackError: re-exported)
from ..models.forward import forward
from ..prompts import SENTINEL, resolve_template, special_token_strings
from ..models.placement import execution_device, is_dispatched, module_tensor, parameter_value
from . import multidevice

DEFAULT_OPTIM_STR = "x x x x x x x x x x x x x x x x x x x x"
STATE_FILE = "gcg_state.pt"
STATE_VERSION = 1


# --- configuration and result ---------------------------------------------------------------------

@dataclass
class GCGConfig:
    """GCG options. Defaults follow nanoGCG 0.3.0 where it has the option.

    Search: ``num_steps`` (250), ``search_width`` candidates per step (512), ``topk`` tokens per position
    (256), ``n_replace`` positions changed per candidate (1), ``buffer_size`` (0: always move to the step's
    best candidate, as the original GCG; k > 0: keep the k best suffixes seen and continue from the best).
    Loss: mean target CE, or with ``use_mellowmax`` the mellowmax (``mellowmax_alpha``) of the negated
    target logits. ``early_stop``: stop when the step's best candidate greedily decodes the whole target
    (in every behaviour and model). Tokens: ``allow_non_ascii`` (False: printable ASCII tokens only; control
    and special tokens are never allowed), ``filter_ids`` (the in-context retokenisation filter).
    Prompt: ``optim_str_init`` (the initial suffix text; a list fills the buffer), ``separator`` put between
    the instruction and the suffix (" "), ``add_space_before_target``, ``template``/``system`` as in
    :func:`pysafegeom.prompts.format_prompts`. ``seed`` seeds the attack's only generator.
    Universal mode: ``progressive`` adds behaviours one at a time, the next once the suffix succeeds on all
    current ones (HarmBench's progressive prompts).

    Exact speed-ups (module docstring): ``use_prefix_cache``, ``target_only_logits``, ``reuse_suffix_prefix``,
    ``dedupe`` (with a memo of at most ``memo_size`` losses), ``exclude_current``. Batching: ``batch_size``
    (most candidates per forward; None: all on CPU, what fits on CUDA), ``batch_overhead_rows`` (the cost of
    one more forward, in candidate tokens; None: 64 on CPU, 4096 on CUDA), ``batch_max_rows`` (most
    candidate tokens per forward; None: no cap). ``ce_backend`` forces the backend of the target-only CE
    (None: the op's automatic choice). ``progress``: a tqdm bar with loss, best loss and s/step.

    ``devices`` (None: the model's own device or devices): score each step's candidates on these devices,
    e.g. ``("cuda:0", "cuda:1")``, each holding a replica of the model (the model itself where it already is,
    a deep copy made once elsewhere, or those given by ``GCG(..., replicas=)``); a name may repeat
    (``("cpu", "cpu")``: two CPU replicas). The token gradient still runs on the model. It changes how the
    candidates are batched, never which are drawn, so it is not part of a saved state's identity: a run
    started on one device resumes on several. ``batch_size`` is then per device.
    """

    num_steps: int = 250
    search_width: int = 512
    topk: int = 256
    n_replace: int = 1
    buffer_size: int = 0
    use_mellowmax: bool = False
    mellowmax_alpha: float = 1.0
    early_stop: bool = False
    allow_non_ascii: bool = False
    filter_ids: bool = True
    optim_str_init: str | list[str] = DEFAULT_OPTIM_STR
    separator: str = " "
    add_space_before_target: bool = False
    seed: int = 0
    template: str | None = None
    system: str | None = None
    progressive: bool = False
    # exact speed-ups
    use_prefix_cache: bool = True
    target_only_logits: bool = True
    reuse_suffix_prefix: bool = True
    dedupe: bool = True
    exclude_current: bool = True
    batch_size: int | None = None
    batch_overhead_rows: int | None = None
    batch_max_rows: int | None = None
    ce_backend: str | None = None
    memo_size: int = 200_000
    progress: bool = True
    devices: tuple[str, ...] | None = None

    def __post_init__(self):
        if isinstance(self.devices, list):  # as read back from JSON
            self.devices = tuple(self.devices)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> "GCGConfig":
        """Validate every field; raises :class:`AttackError` / ``TypeError`` naming the bad one."""
        V.positive_int("num_steps", self.num_steps)
        V.positive_int("search_width", self.search_width, hint="the number of candidates per step (width < 1 is empty)")
        V.positive_int("topk", self.topk)
        V.positive_int("n_replace", self.n_replace)
        V.nonneg_int("buffer_size", self.buffer_size)
        V.finite_float("mellowmax_alpha", self.mellowmax_alpha, lo=0.0, lo_open=True)
        for name in ("use_mellowmax", "early_stop", "allow_non_ascii", "filter_ids", "add_space_before_target",
                     "progressive", "use_prefix_cache", "target_only_logits", "reuse_suffix_prefix", "dedupe",
                     "exclude_current", "progress"):
            V.boolean(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidType(f"seed must be an int, got {type(self.seed).__name__} {V.show(self.seed)}")
        inits = [self.optim_str_init] if isinstance(self.optim_str_init, str) else self.optim_str_init
        if not isinstance(inits, (list, tuple)) or not inits or not all(isinstance(s, str) for s in inits):
            raise InvalidType("optim_str_init must be a string or a non-empty list of strings")
        if any(V.is_blank(s) for s in inits):
            raise AttackError("optim_str_init is empty: the suffix needs at least one token to optimise")
        if not isinstance(self.separator, str):
            raise InvalidType(f"separator must be a string, got {type(self.separator).__name__}")
        V.optional_positive_int("batch_size", self.batch_size)
        V.optional_positive_int("batch_overhead_rows", self.batch_overhead_rows)
        V.optional_positive_int("batch_max_rows", self.batch_max_rows)
        V.positive_int("memo_size", self.memo_size)
        if self.ce_backend is not None:
            V.choice("ce_backend", self.ce_backend, ("torch", "cpp", "cuda", "triton"))
        if self.devices is not None:
            multidevice.parse_devices(self.devices)
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "GCGConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise AttackError(f"unknown GCG option(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def reference(cls, **kw) -> "GCGConfig":
        """The same algorithm with every exact speed-up off: the plain-torch path the benchmark compares with."""
        kw = dict(kw)
        kw.update(use_prefix_cache=False, target_only_logits=False, reuse_suffix_prefix=False, dedupe=False,
                  ce_backend="torch")
        return cls(**kw)


@dataclass
class GCGResult:
    """What an attack found.

    ``best_loss``/``best_string``/``best_ids``: the lowest per-step loss and its suffix (text as it follows
    the instruction, ids ``[L]``). ``losses``/``strings``: per step, the step's best candidate loss and the
    suffix after the step. ``seconds_per_step``, ``n_candidates`` (after the filter) and ``n_scored``
    (after dedupe and the memo) per step, and ``n_rows``, the candidate tokens run through the model per step
(the scoring's compute). ``test_cases``: for each behaviour, the user message
    (instruction + best suffix), the HarmBench test-case string. ``stopped_early``: the target was matched
    greedily (``success_step`` is then that step). ``config``: the options used.
    """

    best_loss: float
    best_string: str
    best_ids: list[int]
    losses: list[float]
    strings: list[str]
    seconds_per_step: list[float]
    n_candidates: list[int]
    n_scored: list[int]
    n_rows: list[int]
    test_cases: list[str]
    instructions: list[str]
    targets: list[str]
    stopped_early: bool
    success_step: int | None
    config: dict
    resumed_from: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


# --- prompts --------------------------------------------------------------------------------------

@dataclass
class AttackPrompt:
    """One attacked prompt: ``before_text + suffix + after_text``, then the target.

    ``before_text`` ends with the instruction (and the separator's owner, the suffix, follows it);
    ``before_ids [P]``, ``after_ids [A]``, ``target_ids [T]`` are token ids. ``pre``/``post``: the user
    message's text before and after the suffix, so the user message is ``pre + suffix + post``.
    """

    before_text: str
    after_text: str
    target_text: str
    before_ids: list[int]
    after_ids: list[int]
    target_ids: list[int]
    pre: str
    post: str
    messages: list[dict]
    user_index: int

    def user_message(self, suffix: str) -> str:
        return self.pre + suffix + self.post

    def chat(self, suffix: str) -> list[dict]:
        msgs = [dict(m) for m in self.messages]
        msgs[self.user_index]["content"] = self.user_message(suffix)
        return msgs


def _as_chat(message, system: str | None) -> tuple[list[dict], int, str, str]:
    """(messages, index of the attacked user message, text before the suffix, text after it)."""
    if isinstance(message, str):
        if V.is_blank(message):
            raise AttackError("an instruction is empty: there is nothing to attack")
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": message}]
        return msgs, len(msgs) - 1, message, ""
    if not isinstance(message, (list, tuple)) or not message or not all(isinstance(m, dict) for m in message):
        raise InvalidType("a message must be an instruction string or a chat: a non-empty list of "
                          "{'role': ..., 'content': ...} dicts")
    msgs = [dict(m) for m in message]
    for i, m in enumerate(msgs):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidType(f"chat message {i} needs a string 'role' and a string 'content'")
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    if not users:
        raise AttackError("the chat has no user message to attack")
    ui = users[-1]
    content = msgs[ui]["content"]
    if "{optim_str}" in content:
        if content.count("{optim_str}") > 1:
            raise AttackError("the user message contains '{optim_str}' more than once")
        pre, post = content.split("{optim_str}")
    else:
        pre, post = content, ""
    if V.is_blank(pre + post):
        raise AttackError("the attacked user message is empty: there is nothing to attack")
    if system is not None and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
        ui += 1
    return msgs, ui, pre, post


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(tokenizer, message, target: str, *, template: str | None = None, system: str | None = None,
                 add_space_before_target: bool = False) -> AttackPrompt:
    """Render the chat template around a sentinel at the suffix's place and tokenise both sides."""
    if not isinstance(target, str):
        raise InvalidType(f"a target must be a string, got {type(target).__name__}")
    if V.is_blank(target):
        raise AttackError("a target is empty: GCG needs a target string to optimise towards")
    msgs, ui, pre, post = _as_chat(message, system)
    specials = special_token_strings(tokenizer)
    for m in msgs:
        bad = [s for s in specials if s in m["content"]]
        if bad:
            raise AttackError(f"a {m['role']} message contains the control-token text {bad[0]!r}; the attacked "
                              "prompt would forge a turn marker (remove it from the message)")
    tpl = resolve_template(tokenizer, template)
    probe = [dict(m) for m in msgs]
    probe[ui]["content"] = pre + SENTINEL + post
    try:
        text = tokenizer.apply_chat_template(probe, chat_template=tpl, tokenize=False, add_generation_prompt=True)
    except Exception as exc:
        raise AttackError(f"the chat template failed to render the attacked chat: {exc}") from exc
    if text.count(SENTINEL) != 1:
        raise AttackError("the chat template does not render the user message exactly once; cannot place the suffix")
    before_text, after_text = text.split(SENTINEL)
    target_text = (" " + target) if add_space_before_target else target
    before_ids, after_ids, target_ids = _ids(tokenizer, before_text), _ids(tokenizer, after_text), _ids(tokenizer, target_text)
    if not before_ids:
        raise AttackError("the prompt before the suffix tokenises to nothing")
    joint = _ids(tokenizer, after_text + target_text)
    if joint != after_ids + target_ids:
        raise AttackError(
            f"the target {target!r} tokenises differently after the template ({len(joint) - len(after_ids)} ids in "
            f"context vs {len(target_ids)} alone), so its loss would score tokens the model never sees; "
            "try add_space_before_target=True or remove leading whitespace from the target")
    return AttackPrompt(before_text, after_text, target_text, before_ids, after_ids, target_ids, pre, post, msgs, ui)


_FORBIDDEN_MEMO: dict[tuple, tuple[Any, torch.Tensor]] = {}


def forbidden_tokens(tokenizer, vocab_rows: int, allow_non_ascii: bool = False) -> torch.Tensor:
    """``[vocab_rows]`` bool: ids never used in a suffix: special and added control tokens, ids past the
    tokenizer's vocabulary, and (unless ``allow_non_ascii``) tokens whose text is not printable ASCII."""
    key = (id(tokenizer), len(tokenizer), vocab_rows, allow_non_ascii)
    hit = _FORBIDDEN_MEMO.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1].clone()
    bad = _forbidden(tokenizer, vocab_rows, allow_non_ascii)
    if len(_FORBIDDEN_MEMO) > 8:
        _FORBIDDEN_MEMO.clear()
    _FORBIDDEN_MEMO[key] = (tokenizer, bad)
    return bad.clone()


def _forbidden(tokenizer, vocab_rows: int, allow_non_ascii: bool) -> torch.Tensor:
    n_tok = len(tokenizer)
    bad = torch.zeros(vocab_rows, dtype=torch.bool)
    if vocab_rows > n_tok:
        bad[n_tok:] = True
    ids = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
    for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(t, "special", False) or str(getattr(t, "content", "")) in special_token_strings(tokenizer):
            ids.add(int(i))
    for i in ids:
        if 0 <= i < vocab_rows:
            bad[i] = True
    if not allow_non_ascii:
        n = min(n_tok, vocab_rows)
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        for i, s in enumerate(texts):
            if not (s.isascii() and s.isprintable()) or s == "":
                bad[i] = True
    return bad


# --- caches ----------------------------------------------------------------------------------------

def _out_cache(out):
    for name in ("cache", "past_key_values"):
        try:
            c = out[name]
        except (KeyError, AttributeError):
            continue
        if c is not None:
            return c
    raise AttackError("the model returned no KV cache; run with use_prefix_cache=False")


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` ``[B, H, S, D]`` of a transformers cache (layers API, or the older lists)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    if hasattr(cache, "key_cache"):  # pragma: no cover - transformers < 4.56
        return list(zip(cache.key_cache, cache.value_cache))
    return [(k, v) for k, v in cache]  # pragma: no cover - legacy tuples


_VIEW_LAYER = None


def _view_layer_class():
    """A ``DynamicLayer`` whose ``update`` returns prefix + new keys/values without storing them: a scoring
    forward never reads its cache afterwards, so each layer's concatenation is freed as soon as the layer
    is done (for SmolLM2 at width 64, ~110 MB less at the peak)."""
    global _VIEW_LAYER
    if _VIEW_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class _ViewLayer(DynamicLayer):
            def update(self, key_states, value_states, *args, **kwargs):
                return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

        _VIEW_LAYER = _ViewLayer
    return _VIEW_LAYER


def _cache_view(model, kv: list[tuple[torch.Tensor, torch.Tensor]], n: int, batch: int, keep: bool = True):
    """A cache holding the first ``n`` positions of ``kv`` for ``batch`` rows, as expanded views (no copy).

    A forward extends each layer by concatenation, so the views themselves are never written to. With
    ``keep=False`` the layers do not store what the forward adds (for scoring, which never reads it).
    """
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # pragma: no cover - configs the layer-type dispatch does not know
        cache = DynamicCache()
    layers = getattr(cache, "layers", None)
    if layers is None:  # pragma: no cover - transformers < 4.56: a copying fallback
        return DynamicCache.from_legacy_cache(tuple(
            (k[:, :, :n].expand(batch, -1, -1, -1).contiguous(), v[:, :, :n].expand(batch, -1, -1, -1).contiguous())
            for k, v in kv))
    if len(layers) < len(kv):
        from transformers.cache_utils import DynamicLayer

        layers.extend(DynamicLayer() for _ in range(len(kv) - len(layers)))
    for layer, (k, v) in zip(layers, kv):
        kk = k[:, :, :n].expand(batch, -1, -1, -1)
        vv = v[:, :, :n].expand(batch, -1, -1, -1)
        layer.lazy_initialization(kk, vv)
        if getattr(layer, "is_sliding", False):
            if n >= layer.sliding_window:
                raise AttackError("the attacked prompt is longer than the model's sliding window; run with "
                                  "use_prefix_cache=False")
            layer.cumulative_length = n
        layer.keys, layer.values = kk, vv
        if not keep and type(layer).__name__ == "DynamicLayer":
            layer.__class__ = _view_layer_class()
    return cache


# --- one model's scoring ---------------------------------------------------------------------------

def plain_head(model) -> bool:
    """Whether ``logits = final hidden state @ W_head.T`` exactly (a bias-free linear head, no logit scaling or
    soft-capping, a separate body), so the target-only loss may run the head at the target positions alone."""
    h = model.get_output_embeddings()
    if not isinstance(h, torch.nn.Linear) or h.bias is not None:
        return False
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        v = getattr(cfg, attr, None)
        if v not in (None, 1, 1.0):
            return False
    return type(getattr(model, "base_model", model)) is not type(model)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def mellowmax(t: torch.Tensor, alpha: float, dim: int = -1) -> torch.Tensor:
    """``(logsumexp(alpha * t) - log n) / alpha`` along ``dim``: a smooth maximum (Asadi & Littman 2017)."""
    n = t.shape[dim]
    return (torch.logsumexp(alpha * t, dim=dim) - math.log(n)) / alpha


class _ModelScorer:
    """The attack as one model sees it: embeddings, body, LM head, and per-behaviour caches."""

    def __init__(self, model, prompts: list[AttackPrompt], cfg: GCGConfig, notes: list[str],
                 share: "_ModelScorer | None" = None):
        self.model, self.cfg, self.prompts = model, cfg, prompts
        self.embed = model.get_input_embeddings()
        self.head = model.get_output_embeddings()
        # a model dispatched by accelerate runs each module on its own device: ids and the one-hot live where
        # the embedding runs, the target loss where the head does (one device for an undispatched model)
        self.device = execution_device(model, self.embed)
        self.out_device = execution_device(model, self.head) if self.head is not None else self.device
        self.W_E = self.embed.weight  # for its shape and dtype only: module_tensor() gives its value (offloaded: meta)
        scale = getattr(self.embed, "embed_scale", None)
        self.embed_scale = float(scale) if scale is not None else 1.0
        self.body = getattr(model, "base_model", model)
        self.target_only = cfg.target_only_logits and self._head_is_plain()
        if cfg.target_only_logits and not self.target_only:
            notes.append(f"{type(model).__name__}: the LM head is not a plain bias-free linear map, so the "
                         "target-only loss is off (full logits at the target positions)")
        self.ce_backend = cfg.ce_backend  # None: the op's automatic choice (C++ on CPU, CUDA on GPU)
        # the batch cost model (rows = candidates x tokens fed): a fixed cost per forward, in rows (on CPU
        # mostly streaming every weight once: ~30-45 ms for SmolLM2-135M on 2 cores), and the most rows in
        # one forward. Measured on 2 cores, SmolLM2-135M (s/step at width 64 / 256): overhead 64 rows
        # 2.54 / 8.84, 128 rows 2.66 / 9.10, 40 rows 2.62, 256 rows 2.70; one batch 3.0, one per position 3.15.
        self.overhead = cfg.batch_overhead_rows or (64 if self.device.type == "cpu" else 4096)
        self.max_rows = cfg.batch_max_rows or (1 << 30)
        self.max_batch = cfg.batch_size or self._batch_that_fits()
        self.t = [dict(
            before=torch.tensor(p.before_ids, device=self.device)[None],
            after=torch.tensor(p.after_ids, device=self.device)[None],
            target=torch.tensor(p.target_ids, device=self.device),
        ) for p in prompts]
        self.prefix_kv: list = [None] * len(prompts)
        self.step_kv: list = [None] * len(prompts)
        self.step_ids: torch.Tensor | None = None
        self.rows_fed = 0  # candidate tokens run through the model (the scoring's compute, in rows)
        if share is None:
            self.refresh()
        else:  # a replica: the model's scorer computed the prefix KV
            self.adopt(share)
        self._check_embedding()

    def refresh(self) -> None:
        """Recompute the prefix KV and drop the suffix KV: call it after the model's weights change."""
        self.step_kv = [None] * len(self.prompts)
        self.step_ids = None
        if self.cfg.use_prefix_cache:
            with torch.no_grad():
                for b, t in enumerate(self.t):
                    out = forward(self.body, t["before"], use_cache=True)
                    self.prefix_kv[b] = [(k.detach(), v.detach()) for k, v in _cache_tensors(_out_cache(out))]

    # -- a replica's caches, from the model's scorer (a replica holds the whole model on self.device)

    def _moved(self, kv):
        return None if kv is None else [(k.to(self.device), v.to(self.device)) for k, v in kv]

    def adopt(self, src: "_ModelScorer") -> None:
        """Take ``src``'s prefix KV (on this replica's device: shared when it is the same device) and drop the
        suffix KV."""
        self.prefix_kv = [self._moved(kv) for kv in src.prefix_kv]
        self.step_kv = [None] * len(self.prompts)
        self.step_ids = None

    def adopt_step(self, src: "_ModelScorer") -> None:
        """Take the suffix KV of ``src``'s last :meth:`token_grad`, for the prefix reuse in :meth:`score`."""
        self.step_kv = [self._moved(kv) for kv in src.step_kv]
        self.step_ids = src.step_ids

    def _batch_that_fits(self) -> int:
        """All candidates in one batch on CPU; on CUDA, the candidates whose activations and KV fit in 60% of
        the free memory (an estimate; an out-of-memory error halves it)."""
        if self.device.type != "cuda":
            return 1 << 30
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        d = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or self.W_E.shape[1])
        inter = int(getattr(cfg, "intermediate_size", 0) or 4 * d)
        layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 1))
        heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 1))
        kvh = int(getattr(cfg, "num_key_value_heads", 0) or heads)
        hd = int(getattr(cfg, "head_dim", 0) or d // max(1, heads))
        seq = max(len(p.before_ids) + 64 + len(p.after_ids) + len(p.target_ids) for p in self.prompts)
        elt = self.W_E.element_size()
        per = (layers * 2 * kvh * hd * seq + (8 * d + 3 * inter) * seq + heads * seq * seq) * elt
        per += 2 * 8192 * 4 * max(len(p.target_ids) for p in self.prompts)  # the CE's vocabulary chunk
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(1, int(0.6 * free // max(1, per)))

    def _head_is_plain(self) -> bool:
        return plain_head(self.model)

    def _check_embedding(self) -> None:
        ids = self.t[0]["before"][:, :4]
        with torch.no_grad():
            got = self.embed(ids)
            mine = module_tensor(self.model, self.embed, on_device=True)[ids] * self.embed_scale
        if not torch.allclose(got.float(), mine.float(), rtol=1e-3, atol=1e-5):
            raise AttackError(f"{type(self.model).__name__}: its input embedding is not a (scaled) lookup of its "
                              "weight, so the one-hot token gradient is undefined for it")

    # -- losses from hidden states or logits

    def _head_weight(self) -> torch.Tensor:
        """The LM head's weight ``[V, d]`` on the head's device (loaded there when accelerate offloaded it)."""
        return module_tensor(self.model, self.head, on_device=True).detach()

    def _loss_h(self, h: torch.Tensor, b: int, W: torch.Tensor | None = None) -> torch.Tensor:
        """``h [B, T, d]`` final hidden states at the positions predicting the target -> loss ``[B]`` float32 (on
        the head's device; ``W``: the head's weight, by :meth:`_head_weight`)."""
        W = self._head_weight() if W is None else W
        h = h.to(W.device)  # the final norm's device -> the head's (the same device unless dispatched)
        tgt = self.t[b]["target"].to(W.device)
        B, T, d = h.shape
        if self.cfg.use_mellowmax:
            z = (h.float() * W[tgt].float()[None]).sum(-1)  # [B, T] target logits
            return mellowmax(-z, self.cfg.mellowmax_alpha)
        with multidevice.on_device(W.device):
            ce = ops.chunked_cross_entropy(h.reshape(B * T, d), W, tgt.repeat(B), backend=self.ce_backend)
        return ce.view(B, T).mean(1)

    def _loss_logits(self, logits: torch.Tensor, b: int) -> torch.Tensor:
        """``logits [B, T, V]`` at the positions predicting the target -> loss ``[B]`` float32."""
        tgt = self.t[b]["target"].to(logits.device)
        B, T, Vv = logits.shape
        if self.cfg.use_mellowmax:
            z = logits.float().gather(-1, tgt[None, :, None].expand(B, T, 1)).squeeze(-1)
            return mellowmax(-z, self.cfg.mellowmax_alpha)
        ce = torch.nn.functional.cross_entropy(logits.float().reshape(B * T, Vv), tgt.repeat(B), reduction="none")
        return ce.view(B, T).mean(1)

    # -- the gradient pass

    def token_grad(self, ids: torch.Tensor, active: Sequence[int]) -> tuple[torch.Tensor, float]:
        """``d (summed loss) / d onehot(ids)`` -> ``([L, V] float32 on CPU, loss)``; keeps the KV of the
        suffix for :meth:`score`'s prefix reuse."""
        L = ids.shape[0]
        W_E = module_tensor(self.model, self.embed, on_device=True)  # [V, d] on the embedding's device
        W_head = self._head_weight() if self.target_only else None
        onehot = torch.zeros(L, W_E.shape[0], device=self.device, dtype=W_E.dtype)
        onehot.scatter_(1, ids.to(self.device)[:, None], 1.0)
        onehot.requires_grad_(True)
        grad = torch.zeros_like(onehot)
        total = 0.0
        for b in active:
            t = self.t[b]
            T = t["target"].shape[0]
            with torch.enable_grad():
                x_opt = (onehot @ W_E) * self.embed_scale  # [L, d]
                with torch.no_grad():
                    rest = self.embed(torch.cat([t["after"], t["target"][None, :-1]], dim=1))  # [1, A+T-1, d]
                x = torch.cat([x_opt[None], rest], dim=1)
                if self.cfg.use_prefix_cache:
                    cache = _cache_view(self.model, self.prefix_kv[b], len(self.prompts[b].before_ids), 1)
                    out = forward(self.body if self.target_only else self.model, inputs_embeds=x, cache=cache)
                else:
                    with torch.no_grad():
                        xb = self.embed(t["before"])
                    out = forward(self.body if self.target_only else self.model, inputs_embeds=torch.cat([xb, x], 1))
                if self.target_only:
                    loss = self._loss_h(out.last_hidden_state[:, -T:], b, W_head)
                else:
                    loss = self._loss_logits(out.logits[:, -T:], b)
                # the gradient of the one-hot only: the model's own trainable weights (a LoRA adapter being
                # trained, as inside R2D2) get no .grad from the attack
                grad += torch.autograd.grad(loss.sum(), onehot)[0]
            total += float(loss.detach().sum())
            if self.cfg.use_prefix_cache and self.cfg.reuse_suffix_prefix:
                P = len(self.prompts[b].before_ids)
                self.step_kv[b] = [(k.detach()[:, :, :P + L], v.detach()[:, :, :P + L])
                                   for k, v in _cache_tensors(cache)]
            else:
                self.step_kv[b] = None
        self.step_ids = ids.detach().cpu().clone()
        return grad.float().cpu(), total

    # -- candidate scoring

    def _partition(self, p_sorted: list[int], n_rows: Callable[[int], int]) -> list[tuple[int, int]]:
        """Cut candidates sorted by first changed position into batches minimising
        ``sum(batch size * rows per candidate from the batch's smallest p) + overhead * batches``."""
        N = len(p_sorted)
        groups: list[tuple[int, int, int]] = []  # (p, start, end)
        for i, p in enumerate(p_sorted):
            if groups and groups[-1][0] == p:
                groups[-1] = (p, groups[-1][1], i + 1)
            else:
                groups.append((p, i, i + 1))
        G = len(groups)
        best = [0.0] + [math.inf] * G
        cut = [0] * (G + 1)
        def per_batch(r: int) -> int:
            return max(1, min(self.max_batch, self.max_rows // max(1, r)))

        for j in range(1, G + 1):
            for i in range(j):
                count = groups[j - 1][2] - groups[i][1]
                r = n_rows(groups[i][0])
                n_b = -(-count // per_batch(r))
                c = best[i] + count * r + self.overhead * n_b
                if c < best[j]:
                    best[j], cut[j] = c, i
        bounds, j = [], G
        while j > 0:
            i = cut[j]
            s, e = groups[i][1], groups[j - 1][2]
            k = per_batch(n_rows(groups[i][0]))
            n_b = -(-(e - s) // k)
            size = -(-(e - s) // n_b)  # equal batches rather than a full ones and a remainder
            for a in range(s, e, size):
                bounds.append((a, min(e, a + size)))
            j = i
        assert sum(e - s for s, e in bounds) == N
        return sorted(bounds)

    def _reuses(self, cur: torch.Tensor, b: int) -> bool:
        """Whether the suffix KV of the last :meth:`token_grad` (at ``cur``) is there for behaviour ``b``."""
        return self.step_kv[b] is not None and self.step_ids is not None and torch.equal(self.step_ids, cur.cpu())

    def first_changed(self, cands: torch.Tensor, cur: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(p [N], rows [N])`` on the CPU: the position from which each candidate ``cands [N, L]`` is run (its
        first difference from ``cur`` when the suffix KV is reused, else 0; ``L`` for ``cur`` itself) and the
        tokens it then feeds the model."""
        cands = cands.cpu()
        N, L = cands.shape
        t = self.prompts[b]
        if self._reuses(cur, b):
            diff = cands != cur.cpu()[None]
            p = torch.where(diff.any(1), diff.float().argmax(1), torch.full((N,), L))
        else:
            p = torch.zeros(N, dtype=torch.long)
        rows = L - p + len(t.after_ids) + len(t.target_ids) - 1
        if not self.cfg.use_prefix_cache:
            rows = rows + len(t.before_ids)
        return p, rows

    def score(self, cands: torch.Tensor, cur: torch.Tensor, b: int) -> torch.Tensor:
        """Losses ``[N]`` (float32, CPU) of candidate suffixes ``cands [N, L]`` for behaviour ``b``; the KV of
        ``before + cur[:p]`` is reused when :meth:`token_grad` last ran at ``cur``."""
        p, _ = self.first_changed(cands, cur, b)
        reuse = self._reuses(cur, b)
        cands = cands.to(self.device)
        N, L = cands.shape
        t = self.prompts[b]
        P, A, T = len(t.before_ids), len(t.after_ids), len(t.target_ids)
        order = torch.argsort(p, stable=True)
        p_sorted = p[order].tolist()
        order = order.to(self.device)
        losses = torch.empty(N, dtype=torch.float32)
        todo = self._partition(p_sorted, lambda p0: L - p0 + A + T - 1)
        tt = self.t[b]
        net = self.body if self.target_only else self.model
        W_head = self._head_weight() if self.target_only else None  # loaded once per call when offloaded
        while todo:
            s, e = todo.pop(0)
            idx = order[s:e]
            p0 = p_sorted[s]
            n = e - s
            toks = torch.cat([cands[idx, p0:], tt["after"].expand(n, -1), tt["target"][None, :-1].expand(n, -1)], 1)
            try:
                with torch.no_grad():
                    if not self.target_only:
                        # fed on the head's device, the dispatched model's outputs stay where they are
                        # computed: accelerate returns them on the device of the inputs
                        toks = toks.to(self.out_device)
                    if self.cfg.use_prefix_cache:
                        kv = self.step_kv[b] if reuse else self.prefix_kv[b]
                        out = forward(net, toks, cache=_cache_view(self.model, kv, P + p0, n, keep=False))
                    else:
                        out = forward(net, torch.cat([tt["before"].expand(n, -1).to(toks.device), toks], 1))
                    if self.target_only:
                        lo = self._loss_h(out.last_hidden_state[:, -T:], b, W_head)
                    else:
                        lo = self._loss_logits(out.logits[:, -T:], b)
            except Exception as exc:  # out of memory: halve the batch and retry this part
                if not _is_oom(exc) or n == 1:
                    raise
                self.max_batch = max(1, n // 2)
                todo[:0] = [(s, s + n // 2), (s + n // 2, e)]
                continue
            losses[idx.cpu()] = lo.float().cpu()  # the losses, [n]: the one transfer back per batch
            self.rows_fed += int(toks.numel()) + (0 if self.cfg.use_prefix_cache else n * P)
            del out
        return losses


# --- the attack -------------------------------------------------------------------------------------

def _model_list(model) -> list:
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise AttackError("no model given")
    for i, m in enumerate(models):
        V.is_model(f"model[{i}]" if len(models) > 1 else "model", m)
    return models


def _check_tokenizers(models: list, tokenizer) -> Any:
    toks = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
    for i, t in enumerate(toks):
        V.is_tokenizer(f"tokenizer[{i}]" if len(toks) > 1 else "tokenizer", t)
    if len(toks) > 1:
        if len(toks) != len(models):
            raise AttackError(f"got {len(models)} models but {len(toks)} tokenizers; pass one tokenizer, or one per model")
        v0 = toks[0].get_vocab()
        for i, t in enumerate(toks[1:], 1):
            if t.get_vocab() != v0:
                raise AttackError(f"the models of an ensemble must share a tokenizer: tokenizer {i} has a different "
                                  "vocabulary from tokenizer 0, so one suffix cannot be the same ids for both")
    n = len(toks[0])
    for i, m in enumerate(models):
        rows = m.get_input_embeddings().weight.shape[0]
        if rows < n:
            raise AttackError(f"model {i} has {rows} embedding rows but the tokenizer has {n} tokens: they do not belong together")
    if len(models) > 1:
        rows = {m.get_input_embeddings().weight.shape[0] for m in models}
        if len(rows) > 1:
            raise AttackError(f"the models of an ensemble must share a tokenizer and vocabulary, but their embedding sizes "
                              f"differ ({sorted(rows)})")
    return toks[0]


def model_hash(model) -> str:
    """A short fingerprint of a model: class, config and a sample of its weights (sha256, 16 hex digits)."""
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:  # a model without a config is hashed by its class and weights alone
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    params = list(model.named_parameters())
    if is_dispatched(model):
        # accelerate's offload hooks split tied weights (lm_head = embed_tokens) into two meta parameters; the
        # same model undispatched lists the tied one once, so its duplicate is left out to give the same hash
        tied = getattr(model, "all_tied_weights_keys", None) or {}
        names = {n for n, _ in params}
        params = [(n, p) for n, p in params if not (n in tied and tied[n] in names)]
    with torch.no_grad():
        for name, p in params[:: max(1, len(params) // 16)]:
            flat = parameter_value(model, name, p).detach().reshape(-1)  # offloaded by accelerate: its stored value
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def state_folder(out: str | Path | None, state_file: str, *, resume: bool, overwrite: bool) -> Path | None:
    """The attack's state folder (created), or None without ``out``. A state already there needs ``resume``
    (continue it) or ``overwrite`` (it is removed); a file in the folder's place is refused."""
    if out is None:
        return None
    outp = Path(out)
    if outp.exists() and not outp.is_dir():
        raise OutputExists(f"{outp} exists and is not a folder")
    outp.mkdir(parents=True, exist_ok=True)
    if (outp / state_file).exists() and not resume:
        if not overwrite:
            raise OutputExists(f"{outp / state_file} exists: pass resume=True to continue that attack or "
                               "overwrite=True to start again")
        (outp / state_file).unlink()
    return outp


def save_state(path: Path, st: dict, *, fingerprint: str, version: int, memo: dict) -> None:
    """Write an attack's whole state (and its loss memo) atomically to ``path``."""
    buf = io.BytesIO()
    torch.save({**st, "version": version, "fingerprint": fingerprint,
                "memo": (list(memo.keys()), list(memo.values()))}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: Path, *, fingerprint: str, version: int, what: str) -> tuple[dict, dict] | None:
    """``(state, memo)`` from ``path`` (None when there is none); a state of another attack (``what`` names
    what differs) is refused."""
    if not path.is_file():
        return None
    st = torch.load(path, weights_only=False)
    if st.get("version") != version or st.get("fingerprint") != fingerprint:
        raise AttackError(f"{path} is the state of a different attack ({what}); use another output folder, or "
                          "overwrite=True to start again")
    keys, vals = st.pop("memo")
    return st, dict(zip(keys, vals))


class GCG:
    """One GCG attack, set up and ready to step: ``GCG(model, tokenizer, messages, targets, config).run()``.

    ``model``: a causal LM, or a list of them that share ``tokenizer`` (ensemble: losses summed); on one
    device, or dispatched over several by accelerate (``device_map=``, offloading included).
    ``messages``: an instruction string or a chat (list of role/content dicts, the suffix at
    ``{optim_str}`` or appended to the last user message), or a list of those (universal: one suffix for
    all, losses summed). ``targets``: one target string per behaviour.
    ``replicas`` (with ``config.devices`` only): the copies of the model to score on, one per entry of
    ``config.devices`` and on that device (an ensemble: a list with one copy per model each); the model
    itself may be one. Each must have the model's weights (checked by :func:`model_hash`). Without it, GCG
    copies the model onto each device once (a model dispatched over devices cannot be copied: give replicas).
    """

    def __init__(self, model, tokenizer, messages, targets, config: GCGConfig | None = None, *, replicas=None,
                 _load: bool = True):
        self.cfg = (config or GCGConfig())
        if not isinstance(self.cfg, GCGConfig):
            raise InvalidType(f"config must be a GCGConfig, got {type(self.cfg).__name__}")
        self.cfg.check()
        self.models = _model_list(model)
        self.tok = _check_tokenizers(self.models, tokenizer)
        behaviours, tgts = self._behaviours(messages, targets)
        c = self.cfg
        self.prompts = [build_prompt(self.tok, m, t, template=c.template, system=c.system,
                                     add_space_before_target=c.add_space_before_target) for m, t in zip(behaviours, tgts)]
        self.instructions = [p.pre + p.post for p in self.prompts]
        self.targets = list(tgts)
        self.notes: list[str] = []
        self.vocab_rows = self.models[0].get_input_embeddings().weight.shape[0]
        self.forbidden = forbidden_tokens(self.tok, self.vocab_rows, c.allow_non_ascii)
        n_allowed = int((~self.forbidden).sum()) - (1 if c.exclude_current else 0)
        if c.topk > n_allowed:
            raise AttackError(f"topk={c.topk} is larger than the {n_allowed} tokens a suffix position may take "
                              f"(allow_non_ascii={c.allow_non_ascii}); lower topk")
        self.init_ids = self._init_ids()
        if replicas is not None and c.devices is None:
            raise AttackError("replicas= given without config.devices: name the device of each replica in "
                              "GCGConfig(devices=(...)), in the order of replicas")
        devices = multidevice.resolve_devices(c.devices) if c.devices is not None else None
        if not _load:
            self.scorers = []
            return
        self.scorers = [_ModelScorer(m, self.prompts, c, self.notes) for m in self.models]
        if devices is not None:
            self.scorers = [self._replicated(i, s, devices, replicas) for i, s in enumerate(self.scorers)]
        self.active = 1 if c.progressive else len(self.prompts)
        self.memo: dict[bytes, float] = {}

    def _replicated(self, i: int, main: _ModelScorer, devices: list[torch.device],
                    given) -> multidevice.ReplicatedScorer:
        """Model ``i``'s scorer over replicas on ``devices`` (``given``: the user's replicas, or None)."""
        models, owned = multidevice.replica_models(main.model, devices, given, hash_fn=model_hash, index=i,
                                                   n_models=len(self.models))
        scorers = [main if m is main.model else _ModelScorer(m, self.prompts, self.cfg, [], share=main) for m in models]
        return multidevice.ReplicatedScorer(main, scorers, owned, hash_fn=model_hash)

    @classmethod
    def check_inputs(cls, model, tokenizer, messages, targets, config: GCGConfig | None = None) -> None:
        """Raise the error :class:`GCG` would raise for these inputs, without running the model (tokenizer
        checks only), so a driver can refuse bad input before it writes anything."""
        cls(model, tokenizer, messages, targets, config, _load=False)

    # -- set-up

    @staticmethod
    def _behaviours(messages, targets) -> tuple[list, list[str]]:
        single = isinstance(messages, str) or (isinstance(messages, (list, tuple)) and messages
                                               and all(isinstance(m, dict) for m in messages))
        behaviours = [messages] if single else list(messages) if isinstance(messages, (list, tuple)) else None
        if not behaviours:
            raise InvalidType("messages must be an instruction, a chat, or a non-empty list of them")
        tgts = [targets] if isinstance(targets, str) else list(targets) if isinstance(targets, (list, tuple)) else None
        if tgts is None:
            raise InvalidType(f"targets must be a string or a list of strings, got {type(targets).__name__}")
        if len(tgts) != len(behaviours):
            raise AttackError(f"got {len(behaviours)} behaviours but {len(tgts)} targets; give one target per behaviour")
        return behaviours, tgts

    def _init_ids(self) -> list[list[int]]:
        inits = [self.cfg.optim_str_init] if isinstance(self.cfg.optim_str_init, str) else list(self.cfg.optim_str_init)
        p = self.prompts[0]
        out = []
        for s in inits:
            text = self.cfg.separator + s
            full = _ids(self.tok, p.before_text + text + p.after_text)
            P, A = len(p.before_ids), len(p.after_ids)
            mid = full[P:len(full) - A]
            if full[:P] != p.before_ids or full[len(full) - A:] != p.after_ids or not mid:
                raise AttackError(f"the suffix init {s!r} merges with the text around it when tokenised in the "
                                  "prompt, so it has no token ids of its own; start it with a space or change it")
            bad = [t for t in special_token_strings(self.tok) if t in s]
            if bad:
                raise AttackError(f"the suffix init {s!r} contains the control-token text {bad[0]!r}; it would become "
                                  "a real turn marker in the attacked prompt (remove it)")
            if self.cfg.filter_ids and not bool(self.filter(torch.tensor([mid]))[0]):
                raise AttackError(f"the suffix init {s!r} does not survive retokenisation: decoded and put into the "
                                  "prompt it gives other token ids; choose another optim_str_init or filter_ids=False")
            if self.forbidden[torch.tensor(mid)].any() and not self.cfg.allow_non_ascii:
                self.notes.append(f"the suffix init {s!r} contains tokens the search will never choose")
            out.append(mid)
        if len({len(m) for m in out}) > 1:
            raise AttackError("the optim_str_init strings tokenise to different lengths; give inits of one token length")
        return out

    # -- the retokenisation filter

    def suffix_strings(self, cands: torch.Tensor, b: int = 0) -> list[str | None]:
        """The text of each suffix ``[N, L]`` as it follows behaviour b's instruction (decoded in context, so a
        tokenizer that drops a leading space when decoding alone keeps it); None where the context does not
        decode as a prefix."""
        before = self.prompts[b].before_ids
        ctx = before[-8:]
        head = self.tok.decode(ctx, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        rows = cands.tolist()
        texts = self.tok.batch_decode([ctx + r for r in rows], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)
        return [t[len(head):] if t.startswith(head) else None for t in texts]

    def filter(self, cands: torch.Tensor) -> torch.Tensor:
        """``[N]`` bool: the candidate's decoded text, placed in every behaviour's prompt, tokenises back to
        exactly its ids there (so the test-case string reproduces the attacked prompt)."""
        keep = torch.ones(cands.shape[0], dtype=torch.bool)
        rows = cands.tolist()
        for b, p in enumerate(self.prompts):
            strs = self.suffix_strings(cands, b)
            idx = [i for i, s in enumerate(strs) if s is not None and keep[i]]
            for i, s in enumerate(strs):
                if s is None:
                    keep[i] = False
            if not idx:
                continue
            enc = self.tok([p.before_text + strs[i] + p.after_text for i in idx], add_special_tokens=False)["input_ids"]
            for i, r in zip(idx, enc):
                if list(r) != p.before_ids + rows[i] + p.after_ids:
                    keep[i] = False
        return keep

    # -- losses

    def candidate_losses(self, cands: torch.Tensor, cur: torch.Tensor | None = None,
                         active: int | None = None) -> torch.Tensor:
        """Summed loss ``[N]`` float32 of suffixes ``cands [N, L]`` over models and the first ``active``
        behaviours, without the memo. Prefix reuse needs :meth:`token_grad` to have run at ``cur``."""
        active = self.active if active is None else active
        total = torch.zeros(cands.shape[0], dtype=torch.float32)
        cur = cur if cur is not None else cands[0]
        for s in self.scorers:
            for b in range(active):
                total += s.score(cands, cur, b)
        return total

    def token_grad(self, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``([L, V], loss)``: the one-hot gradient summed over models and active behaviours."""
        g, total = None, 0.0
        for s in self.scorers:
            gs, lo = s.token_grad(ids, range(self.active))
            g = gs if g is None else g + gs
            total += lo
        return g, total

    def _key(self, row: torch.Tensor) -> bytes:
        return row.to(torch.int32).numpy().tobytes()

    def _score_step(self, cands: torch.Tensor, cur: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Losses of all ``cands`` with dedupe and the memo; returns (losses [N], number actually scored)."""
        if not self.cfg.dedupe:
            return self.candidate_losses(cands, cur), cands.shape[0]
        uniq, inv = torch.unique(cands, dim=0, return_inverse=True)
        keys = [self._key(r) for r in uniq]
        lo = torch.empty(uniq.shape[0], dtype=torch.float32)
        miss = [i for i, k in enumerate(keys) if k not in self.memo]
        hit = [i for i, k in enumerate(keys) if k in self.memo]
        for i in hit:
            lo[i] = self.memo[keys[i]]
        if miss:
            mi = torch.tensor(miss)
            lo[mi] = self.candidate_losses(uniq[mi], cur)
            for i in miss:
                self.memo[keys[i]] = float(lo[i])
            while len(self.memo) > self.cfg.memo_size:
                self.memo.pop(next(iter(self.memo)))
        return lo[inv], len(miss)

    def _matched(self, ids: torch.Tensor) -> bool:
        """Whether suffix ``ids [L]`` greedily produces every active target in every model."""
        with torch.no_grad():
            for s in self.scorers:
                for b in range(self.active):
                    t = s.t[b]
                    T = t["target"].shape[0]
                    toks = torch.cat([t["before"], ids.to(s.device)[None], t["after"], t["target"][None, :-1]], 1)
                    logits = forward(s.model, toks).logits[0, -T:]
                    if not bool((logits.argmax(-1) == t["target"].to(logits.device)).all()):
                        return False
        return True

    # -- stepping from outside (R2D2 runs a few steps per training step, between weight updates)

    def refresh(self) -> None:
        """Forget everything computed with the old weights (prefix KV, suffix KV, the loss memo). Call it
        after the model's weights change; the next :meth:`step` then scores with the new ones."""
        for s in self.scorers:
            s.refresh()
        self.memo.clear()

    def new_state(self, generator: torch.Generator | None = None, ids: Sequence[int] | None = None) -> dict:
        """A fresh attack state at the initial suffix (or at ``ids``, a suffix of the init's token length),
        for :meth:`step`. ``generator`` fills a buffer (``buffer_size`` > 1) with random suffixes."""
        if ids is not None:
            ids = [int(i) for i in ids]
            if len(ids) != len(self.init_ids[0]):
                raise AttackError(f"a suffix of {len(ids)} tokens given where the attack's init has {len(self.init_ids[0])}")
            self.init_ids = [ids] + self.init_ids[1:]
        if ids is not None and self.cfg.buffer_size == 0:
            # greedy GCG replaces its one-entry buffer at the first step: the start needs no forward to score it
            return dict(step=0, ids=ids, buffer=[(math.inf, ids)], losses=[], strings=[], id_rows=[], times=[],
                        n_cand=[], n_scored=[], active=self.active, stopped=False, success_step=None, gen=None)
        gen = generator if generator is not None else torch.Generator().manual_seed(self.cfg.seed)
        return self._initial_state(gen)

    def step(self, st: dict, generator: torch.Generator) -> float:
        """One GCG step on state ``st`` (from :meth:`new_state` or :meth:`run`'s), in place, drawing candidates
        from ``generator``; returns the loss of the suffix it moved to (``st["ids"]``)."""
        t0 = time.perf_counter()
        self._step(st, generator)
        st["times"].append(time.perf_counter() - t0)
        return float(st["losses"][-1])

    # -- state

    def fingerprint(self) -> str:
        c = self.cfg.to_dict()
        c.pop("progress", None)
        c.pop("batch_size", None)
        c.pop("devices", None)  # how the candidates are batched, never which are drawn: resumable across devices
        h = hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode())
        for p in self.prompts:
            h.update(json.dumps([p.before_ids, p.after_ids, p.target_ids]).encode())
        for m in self.models:
            h.update(model_hash(m).encode())
        return h.hexdigest()[:16]

    def _save(self, out: Path, st: dict) -> None:
        save_state(out / STATE_FILE, st, fingerprint=self._fp, version=STATE_VERSION, memo=self.memo)

    def _load(self, out: Path) -> dict | None:
        got = load_state(out / STATE_FILE, fingerprint=self._fp, version=STATE_VERSION,
                         what="other model, prompts or options")
        if got is None:
            return None
        st, self.memo = got
        return st

    # -- the loop

    def run(self, out: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
            callback: Callable[[int, dict], None] | None = None) -> GCGResult:
        """Run ``num_steps`` steps (fewer on early stop). With ``out``, the state is written there after every
        step; ``resume=True`` continues from it. ``callback(step, info)`` runs after each step."""
        from tqdm.auto import tqdm

        c = self.cfg
        self._fp = self.fingerprint()
        outp = state_folder(out, STATE_FILE, resume=resume, overwrite=overwrite)
        st = self._load(outp) if outp is not None and resume else None
        gen = torch.Generator().manual_seed(c.seed)
        if st is None:
            st = self._initial_state(gen)
        else:
            gen.set_state(st["gen"])
            self.active = st["active"]
        resumed_from = st["step"] if st["step"] > 0 else None
        bar = tqdm(total=c.num_steps, initial=st["step"], desc="gcg", unit="step", disable=not c.progress, leave=False)
        try:
            while st["step"] < c.num_steps and not st["stopped"]:
                t0 = time.perf_counter()
                self._step(st, gen)
                st["times"].append(time.perf_counter() - t0)
                st["gen"] = gen.get_state()
                if outp is not None:
                    self._save(outp, st)
                bar.update(1)
                bar.set_postfix(loss=f"{st['losses'][-1]:.3f}", best=f"{min(st['losses']):.3f}",
                                s_step=f"{st['times'][-1]:.2f}")
                if callback is not None:
                    callback(st["step"], {"loss": st["losses"][-1], "string": st["strings"][-1]})
        finally:
            bar.close()
        return self._result(st, resumed_from)

    def _initial_state(self, gen: torch.Generator) -> dict:
        c = self.cfg
        inits = [torch.tensor(i) for i in self.init_ids]
        size = max(1, c.buffer_size)
        L = inits[0].shape[0]
        allowed = (~self.forbidden).nonzero().squeeze(1)
        for _ in range(50):  # random fill, from the allowed tokens, surviving the filter
            if len(inits) >= size:
                break
            r = allowed[torch.randint(0, allowed.shape[0], (4 * size, L), generator=gen)]
            r = r[self.filter(r)] if c.filter_ids else r
            inits.extend(list(r[: size - len(inits)]))
        if len(inits) < size:
            raise AttackError(f"could not fill a buffer of {size}: random suffixes of {L} tokens almost never survive "
                              "the retokenisation filter here; give optim_str_init a list of inits or filter_ids=False")
        init = torch.stack(inits)
        lo = self.candidate_losses(init, init[0])
        buffer = sorted([(float(lo[i]), init[i].tolist()) for i in range(init.shape[0])], key=lambda x: x[0])[:size]
        return dict(step=0, ids=buffer[0][1], buffer=buffer, losses=[], strings=[], id_rows=[], times=[], n_cand=[], n_scored=[],
                    active=self.active, stopped=False, success_step=None, gen=gen.get_state())

    def _step(self, st: dict, gen: torch.Generator) -> None:
        c = self.cfg
        cur = torch.tensor(st["ids"])
        grad, _ = self.token_grad(cur)
        cands = ops.sample_candidates(cur, grad, c.search_width, c.topk, c.n_replace, self.forbidden,
                                      generator=gen, exclude_current=c.exclude_current)
        if c.filter_ids:
            keep = self.filter(cands)
            cands = cands[keep]
            if cands.shape[0] == 0:
                raise AttackError("every candidate was filtered out by the retokenisation filter; set filter_ids=False "
                                  "or try another optim_str_init")
        rows0 = sum(s.rows_fed for s in self.scorers)
        lo, n_scored = self._score_step(cands, cur)
        st.setdefault("n_rows", []).append(sum(s.rows_fed for s in self.scorers) - rows0)
        k = int(lo.argmin())
        loss, best = float(lo[k]), cands[k]
        buf = st["buffer"]
        if c.buffer_size == 0:
            buf = [(loss, best.tolist())]
        elif len(buf) < c.buffer_size:
            buf = buf + [(loss, best.tolist())]
        elif loss < buf[-1][0]:
            buf = buf[:-1] + [(loss, best.tolist())]
        st["buffer"] = sorted(buf, key=lambda x: x[0])
        st["ids"] = st["buffer"][0][1]
        st["step"] += 1
        st["losses"].append(float(st["buffer"][0][0]))
        st["id_rows"].append(list(st["ids"]))
        st["strings"].append(self.suffix_strings(torch.tensor([st["ids"]]))[0] or "")
        st["n_cand"].append(int(cands.shape[0]))
        st["n_scored"].append(int(n_scored))
        if (c.early_stop or c.progressive) and self._matched(torch.tensor(st["ids"])):
            if self.active < len(self.prompts):
                self.active += 1
                self.memo.clear()
            elif c.early_stop:
                st["stopped"] = True
                st["success_step"] = st["step"]
                st["match_ids"] = list(st["ids"])
        st["active"] = self.active

    def _result(self, st: dict, resumed_from: int | None) -> GCGResult:
        losses = st["losses"]
        if losses:
            k = min(range(len(losses)), key=lambda i: losses[i])
            best_loss, best_ids = losses[k], st["id_rows"][k]
        else:
            best_loss, best_ids = st["buffer"][0][0], st["ids"]
        if st.get("match_ids") is not None:
            best_ids = st["match_ids"]
        best_string = self.suffix_strings(torch.tensor([best_ids]))[0] or ""
        return GCGResult(
            best_loss=float(best_loss), best_string=best_string, best_ids=best_ids, losses=list(losses),
            strings=list(st["strings"]), seconds_per_step=list(st["times"]), n_candidates=list(st["n_cand"]),
            n_scored=list(st["n_scored"]), n_rows=list(st.get("n_rows", [])), test_cases=[p.user_message(best_string) for p in self.prompts],
            instructions=self.instructions, targets=self.targets, stopped_early=bool(st["stopped"]),
            success_step=st["success_step"], config=self.cfg.to_dict(), resumed_from=resumed_from,
            notes=list(self.notes))


def hot_path(device: str = "cpu") -> dict[str, str]:
    """Which implementation GCG runs for each op on its hot path, on ``device`` (for ``pysafegeom info``)."""
    dev = torch.device(device)
    ce = ops.select_backend("chunked_cross_entropy", dev, torch.float32)[0]
    topk = ops.select_backend("masked_topk", dev, torch.float32)[0]
    return {
        "target-only LM head + CE": f"ops.chunked_cross_entropy, backend {ce}",
        "top-k of the token gradient": f"ops.masked_topk, backend {topk}",
        "candidate sampling": "ops.sample_candidates (seeded CPU generator, identical on every backend)",
        "candidate forward": "the model's own layers, batched, over a shared expanded KV view",
    }


def run(model, tokenizer, messages, targets, config: GCGConfig | None = None, *, out: str | Path | None = None,
        resume: bool = False, overwrite: bool = False, callback=None) -> GCGResult:
    """Run GCG: see :class:`GCG` for the arguments and :class:`GCGConfig` for the options."""
    return GCG(model, tokenizer, messages, targets, config).run(out, resume=resume, overwrite=overwrite, callback=callback)


__all__ = ["AttackError", "AttackPrompt", "GCG", "GCGConfig", "GCGResult", "build_prompt", "forbidden_tokens",
           "hot_path", "mellowmax", "model_hash", "run"]
