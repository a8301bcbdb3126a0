"""Batched generation under the chat template: greedy or sampled, KV cache, left padding, per-row stops.

``generate(model, tokenizer, instructions)`` formats every instruction with the chat template
(:func:`pysafegeom.prompts.encode_prompts`), sorts the prompts by token length (longest first) into
left-padded batches, and decodes one token per row per step through the KV cache. A row stops at EOS
or the template's end-of-turn token (or a ``stop_strings`` match); a batch stops when every row has,
or after ``max_new_tokens``. Answers come back in input order.

The model is only called, never changed, so interventions that install forward hooks
(:func:`pysafegeom.interventions.ablate`, ``add``) act on every prefill and decode step when
``generate`` runs inside them. Each step passes ``attention_mask``, ``position_ids``, the cache
(``cache=`` on transformers >= 5.24, ``past_key_values=`` before) and ``use_cache=True``, as Hugging
Face's own ``generate`` does, so a hook can tell the prefill (empty cache) from a decode step.

Determinism. Greedy decoding is deterministic. Batched greedy output equals one-prompt-at-a-time
output up to float rounding: padding changes the shapes of the matrix products, which can flip an
argmax only between two near-tied logits. Sampling draws its random numbers from a counter-based
generator (splitmix64 of ``(seed, prompt index, step)``, computed on the device), so the number used for
prompt ``i`` at step ``t`` does not depend on the batch size, the batch order, the device or torch's
global RNG. Same seed, prompts and settings: the same answers, on any batch size, except where float
rounding of the logits (as for greedy) moves a token's probability boundary across the drawn number.
The prompt index is the position in ``instructions``: the same prompt at another position draws other
numbers.

``is_refusal`` / ``refusal_rate`` are re-exported from :mod:`pysafegeom.refusal`, the one substring rule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import validate as V
from .errors import InvalidArgument
from .models.forward import forward_names, position_ids
from .models.placement import input_device, is_sharded
from .refusal import REFUSAL_SUBSTRINGS, is_refusal, refusal_rate  # noqa: F401  (the one substring rule)


def stop_token_ids(tokenizer, template: str | None = None) -> list[int]:
    """EOS plus the chat template's end-of-turn token (e.g. ``<|im_end|>``), when it is a single token."""
    from .prompts import TemplateError, end_of_turn_ids

    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    try:
        eot = end_of_turn_ids(tokenizer, template)
    except TemplateError:  # a template that cannot render an assistant turn: EOS only (a real bug still raises)
        eot = []
    if len(eot) == 1 and eot[0] not in ids:
        ids.append(eot[0])
    return ids


STOP_TOKEN, STOP_STRING, LENGTH = "stop_token", "stop_string", "length"


@dataclass
class GenerationResult:
    """What :func:`generate` produced, per prompt in input order, and how fast.

    ``texts``: the decoded answers (special tokens dropped, cut before a stop string, stripped).
    ``token_ids``: the generated ids, up to and including the stop token when there was one.
    ``stop_reasons``: ``"stop_token"`` (EOS or end-of-turn), ``"stop_string"`` or ``"length"``
    (``max_new_tokens`` reached). ``prompt_tokens``: formatted prompt lengths. ``seconds``: wall time of
    the whole call (formatting and decoding included). ``seed``: the seed sampling used (None for greedy).
    ``decoded_rows``: row-forwards of the decode steps (a finished row dropped from its batch costs none);
    ``compactions``: how many times finished rows were dropped.
    """

    texts: list[str]
    token_ids: list[list[int]]
    stop_reasons: list[str]
    prompt_tokens: list[int]
    seconds: float
    seed: int | None = None
    batch_size: int = 0
    n_batches: int = 0
    decoded_rows: int = 0
    compactions: int = 0

    @property
    def finished(self) -> list[bool]:
        """Whether each answer ended on its own (a stop token or string) rather than at ``max_new_tokens``."""
        return [r != LENGTH for r in self.stop_reasons]

    @property
    def n_new_tokens(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens (all prompts) per second of wall time."""
        return sum(self.n_new_tokens) / self.seconds if self.seconds > 0 else float("nan")


# ---------------------------------------------------------------- counter-based random numbers

def _i64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= (1 << 63) else x


_GOLDEN, _C1, _C2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors: wrapping multiplies, logical right shifts (masked)."""
    z = z ^ ((z >> 30) & ((1 << 34) - 1))
    z = z * _C1
    z = z ^ ((z >> 27) & ((1 << 37) - 1))
    z = z * _C2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _row_keys(seed: int, prompt_index: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64 keys, one per prompt: a function of ``(seed, prompt index)`` only."""
    return _mix64(_mix64(torch.full_like(prompt_index, _i64(seed))) + (prompt_index + 1) * _GOLDEN)


def _uniforms(keys: torch.Tensor, step: int) -> torch.Tensor:
    """``[B]`` float32 uniforms in [0, 1) for decode step ``step``: 24 high bits of ``mix(key + step)``."""
    z = _mix64(keys + _i64((step + 1) * _GOLDEN))
    return ((z >> 40) & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))


def _sample(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Inverse-CDF sampling of ``[B, V]`` logits with one uniform per row ``u [B]``.

    Temperature, then top-k, then top-p (nucleus: the most probable tokens whose mass before them is
    below ``top_p``; the first is always kept). Returns ``[B]`` token ids.
    """
    logits = logits.float() / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        vals, idx = logits.topk(top_k, dim=-1)
    elif top_p < 1.0:
        vals, idx = logits.sort(dim=-1, descending=True)
    else:
        vals, idx = logits, None
    probs = torch.softmax(vals, dim=-1)
    if top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    cdf = probs.cumsum(-1)
    j = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[-1] - 1)
    return (j if idx is None else idx.gather(-1, j)).squeeze(-1)


# ---------------------------------------------------------------- the model call

def _check(max_new_tokens, min_new_tokens, batch_size, do_sample, temperature, top_p, top_k, stop_strings):
    V.positive_int("max_new_tokens", max_new_tokens, hint="a generation budget of zero generates nothing")
    V.integer("min_new_tokens", min_new_tokens, lo=0, hi=max_new_tokens,
              hint=f"stop tokens are masked for this many steps, at most max_new_tokens={max_new_tokens}")
    V.positive_int("batch_size", batch_size, hint="prompts per forward")
    V.boolean("do_sample", do_sample)
    if do_sample:
        V.finite_float("temperature", temperature, lo=0.0, lo_open=True,
                       hint="temperature must be > 0 when sampling; use do_sample=False for greedy decoding")
        V.finite_float("top_p", top_p, lo=0.0, hi=1.0, lo_open=True, hint="top_p must lie in (0, 1]")
        V.nonneg_int("top_k", top_k, hint="0: no top-k filter")
    elif (temperature, top_p, top_k) != (1.0, 1.0, 0):
        raise InvalidArgument("temperature, top_p and top_k apply to sampling only; pass do_sample=True (or leave them "
                              "at their defaults for greedy decoding)")
    if stop_strings is not None:
        V.str_list("stop_strings", stop_strings, nonblank=False)
        if any(not s for s in stop_strings):
            raise InvalidArgument("stop_strings must be non-empty strings (an empty one would stop every answer at once)")


def context_length(model) -> int | None:
    """The model's context length in tokens (``max_position_embeddings``, or GPT-2's ``n_positions``, of its
    text config); None when the config gives neither (then generation is not capped)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


_FIRST_CHUNK = 64  # generated-token buffer columns allocated first; doubled when full
_COMPACT_SHARE = 8  # drop finished rows from a batch once at least 1/_COMPACT_SHARE of its decoding rows finished


def _grow(gen: torch.Tensor, full_mask: torch.Tensor, max_new_tokens: int, pad: int):
    """Double the ``[B, n]`` generated-token buffer (pad-filled) and the attention mask (ones), up to the budget."""
    extra = min(max_new_tokens, 2 * gen.shape[1]) - gen.shape[1]
    return (torch.cat([gen, gen.new_full((gen.shape[0], extra), pad)], dim=1),
            torch.cat([full_mask, full_mask.new_ones(full_mask.shape[0], extra)], dim=1))


def generate(
    model,
    tokenizer,
    instructions: list[str],
    *,
    max_new_tokens: int = 64,
    min_new_tokens: int = 0,
    batch_size: int = 16,
    template: str | None = None,
    system: str | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_strings: list[str] | str | None = None,
    progress: bool = True,
    return_details: bool = False,
    allow_special_tokens: bool = False,
    compact: bool = True,
) -> list[str] | GenerationResult:
    """Answer each instruction under the chat template; greedy unless ``do_sample``.

    ``max_new_tokens``: the most tokens per answer (>= 1); the longest formatted prompt plus
    ``max_new_tokens`` must fit the model's context length (:func:`context_length`), else
    :class:`~pysafegeom.errors.InvalidArgument` (buffers grow as answers do, so a large budget that fits
    costs nothing until it is used). ``min_new_tokens``: stop tokens are masked
    out until this many have been generated (``min_new_tokens=max_new_tokens`` makes every answer the
    full length, e.g. for timing). ``batch_size``: prompts per forward (sorted by length, so batches
    carry little padding). ``template``/``system``: as :func:`pysafegeom.prompts.format_prompts`.
    Sampling (``do_sample=True``): ``temperature`` > 0, ``top_k`` (0: off), ``top_p`` in (0, 1];
    ``seed`` (default: drawn from torch's global RNG and reported in the details) fixes the draws, see
    the module docstring for what is guaranteed. ``stop_strings``: also end a row when its decoded
    answer contains one of these (checked every step for the unfinished rows, which costs a host sync
    and a decode per step; the answer is cut before the match). ``progress``: a tqdm bar over prompts.
    ``allow_special_tokens``: let control tokens written in the instructions (``<|im_end|>``...) be
    tokenised as control tokens (default: as text; :func:`pysafegeom.prompts.encode_prompts`).
    ``compact``: drop finished rows from their batch (and its KV cache) as they finish, so a short answer stops
    costing decode steps; off, every row is decoded until its whole batch finishes (same answers up to float
    rounding of the smaller products, as for batching).

    Returns the answers (special tokens dropped, whitespace stripped) in input order, or with
    ``return_details=True`` a :class:`GenerationResult` (token ids, stop reasons, timing).
    """
    from tqdm.auto import tqdm

    from .prompts import encode_prompts, pad_prompts

    t0 = time.perf_counter()
    V.is_model("model", model)
    V.is_tokenizer("tokenizer", tokenizer)
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    _check(max_new_tokens, min_new_tokens, batch_size, do_sample, temperature, top_p, top_k, stop_strings)
    if seed is not None:
        V.integer("seed", seed)
    V.boolean("compact", compact)
    instructions = V.prompt_list("instructions", instructions, item="instruction")
    ctx = context_length(model)
    enc = encode_prompts(tokenizer, instructions, system=system, template=template, max_length=ctx,
                         allow_special_tokens=allow_special_tokens)
    longest = max(len(r) for r in enc.rows)
    if ctx is not None and longest + max_new_tokens > ctx:
        raise InvalidArgument(
            f"max_new_tokens={max_new_tokens} does not fit: the longest prompt is {longest} tokens and the model's "
            f"context length is {ctx} tokens, so at most {ctx - longest} new tokens fit after it")
    device = input_device(model)  # the embedding's device; a model placed over several devices returns logits here too
    # a KV cache spread over several devices is indexed with host indices (valid for every device's tensors)
    host_index = is_sharded(model)
    stops = torch.tensor(stop_token_ids(tokenizer, template), dtype=torch.long, device=device)
    stop_set = frozenset(stops.tolist())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    V.token_ids_fit(model, enc.rows, what="the formatted instructions",
                    extra={"the pad token": pad, "a stop token": max(stops.tolist(), default=None)})
    if do_sample and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    cache_kw, keep_kw = forward_names(model)
    prefill_extra = {"logits_to_keep": 1} if keep_kw else {}

    n = len(instructions)
    order = sorted(range(n), key=lambda i: -len(enc.rows[i]))  # longest first: an OOM shows up at once
    token_ids: list[list[int]] = [[] for _ in range(n)]
    reasons: list[str] = [LENGTH] * n
    texts: list[str] = [""] * n
    n_batches = decoded_rows = n_compactions = 0

    was_training = model.training
    model.eval()
    bar = tqdm(total=n, desc="generate", unit="prompt", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                batch = pad_prompts(tokenizer, enc, idx, device=device)
                ids, mask = batch.input_ids, batch.attention_mask
                B, T = ids.shape
                cap = min(max_new_tokens, _FIRST_CHUNK)  # the buffers grow as the answers do
                full_mask = torch.cat([mask, mask.new_ones(B, cap)], dim=1)
                pos = position_ids(mask)
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **prefill_extra)
                cache = getattr(out, cache_kw)
                logits = out.logits[:, -1, :]
                last = pos[:, -1:]
                keys = _row_keys(seed, torch.tensor(idx, dtype=torch.long, device=device)) if do_sample else None
                gen = torch.full((B, cap), pad, dtype=torch.long, device=device)
                done = torch.zeros(B, dtype=torch.bool, device=device)
                row_stop = [None] * B  # STOP_STRING where a stop string ended the row
                # the rows still decoding (indices into the batch): finished rows are dropped from the cache, the mask,
                # the positions and the sampling keys once enough have finished, so they cost no more forwards
                active = torch.arange(B, device=device)
                can_compact = compact and hasattr(cache, "batch_select_indices")
                steps = 0
                for step in range(max_new_tokens):
                    if step < min_new_tokens:
                        logits = logits.index_fill(-1, stops, float("-inf"))
                    if do_sample:
                        nxt = _sample(logits, _uniforms(keys, step), temperature, top_k, top_p)
                    else:
                        nxt = logits.argmax(-1)
                    nxt = nxt.masked_fill(done[active], pad)
                    if step == gen.shape[1]:
                        gen, full_mask = _grow(gen, full_mask, max_new_tokens, pad)
                    gen[active, step] = nxt
                    steps = step + 1
                    done[active] |= (nxt[:, None] == stops).any(-1)
                    if stop_strings:
                        done = _stop_string_rows(tokenizer, gen[:, :steps], done, stop_strings, row_stop)
                    # one host sync per step: the dropped rows are all done, so the batch is done when the active are
                    finished = done[active]
                    n_fin = int(finished.sum())
                    if steps == max_new_tokens or n_fin == len(active):
                        break
                    last = last + 1
                    if can_compact and n_fin and n_fin * _COMPACT_SHARE >= len(active):
                        keep = (~finished).nonzero().flatten()
                        cache.batch_select_indices(keep.cpu() if host_index else keep)
                        active, nxt, last = active[keep], nxt[keep], last[keep]
                        full_mask = full_mask[keep]
                        if keys is not None:
                            keys = keys[keep]
                        n_compactions += 1
                    out = model(input_ids=nxt[:, None], attention_mask=full_mask[:, :T + steps], position_ids=last,
                                use_cache=True, **{cache_kw: cache})
                    cache = getattr(out, cache_kw)
                    logits = out.logits[:, -1, :]
                    decoded_rows += len(active)
                del cache, out
                for b, (i, row) in enumerate(zip(idx, gen[:, :steps].tolist())):
                    cut = next((j for j, t in enumerate(row) if t in stop_set), None)
                    if row_stop[b] is not None:  # checked first: the pads after it may equal a stop token
                        reasons[i], token_ids[i], body = STOP_STRING, row[:row_stop[b]], row[:row_stop[b]]
                    elif cut is not None:
                        reasons[i], token_ids[i], body = STOP_TOKEN, row[:cut + 1], row[:cut]
                    else:
                        token_ids[i], body = row, row
                    texts[i] = _cut_text(tokenizer.decode(body, skip_special_tokens=True), stop_strings).strip()
                n_batches += 1
                bar.update(B)
    finally:
        bar.close()
        model.train(was_training)
    if not return_details:
        return texts
    return GenerationResult(texts, token_ids, reasons, [len(r) for r in enc.rows], time.perf_counter() - t0,
                            seed if do_sample else None, batch_size, n_batches, decoded_rows, n_compactions)


def _cut_text(text: str, stop_strings) -> str:
    if not stop_strings:
        return text
    hits = [k for k in (text.find(s) for s in stop_strings) if k >= 0]
    return text[:min(hits)] if hits else text


def _stop_string_rows(tokenizer, gen: torch.Tensor, done: torch.Tensor, stop_strings, row_stop: list) -> torch.Tensor:
    """Mark unfinished rows whose decoded answer contains a stop string (``row_stop[b]``: tokens kept)."""
    open_rows = (~done).nonzero().flatten().tolist()
    if not open_rows:
        return done
    rows = gen[open_rows].tolist()
    hit = []
    for b, row in zip(open_rows, rows):
        text = tokenizer.decode(row, skip_special_tokens=True)
        if any(s in text for s in stop_strings):
            row_stop[b] = len(row)
            hit.append(b)
    if hit:
        done = done.clone()
        done[hit] = True
    return done


def greedy_generate(model, tokenizer, instructions: list[str], *, max_new_tokens: int = 64, batch_size: int = 16,
                    template: str | None = None, system: str | None = None, progress: bool = True,
                    return_finished: bool = False):
    """Greedy answers to ``instructions`` (:func:`generate` with its defaults). With ``return_finished=True``
    also whether each answer stopped on its own (rather than at ``max_new_tokens``)."""
    res = generate(model, tokenizer, instructions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   template=template, system=system, progress=progress, return_details=True)
    return (res.texts, res.finished) if return_finished else res.texts


__all__ = ["GenerationResult", "REFUSAL_SUBSTRINGS", "generate", "greedy_generate", "is_refusal", "refusal_rate",
           "stop_token_ids"]
