"""The forward conventions every stage shares: padding, ``position_ids``, the cache keyword, ``inputs_embeds``,
last-position logits, the next-token KL, and a prefix KV cache.

Capture, selection, sweeps, the reopen table, the judges, generation, training and the attacks call the
model through these helpers instead of their own copies, so a convention fixed here is fixed everywhere:

* **position_ids from the attention mask.** Batches are left-padded. Rotary models are indifferent to a
  constant shift of positions, but absolute-position models (GPT-2) are not: without explicit
  ``position_ids`` a padded row would see positions ``pad..T-1`` instead of ``0..len-1`` and its
  activations would differ from an unpadded run. :func:`position_ids` gives ``cumsum(mask) - 1`` (pads
  at 0), as Hugging Face's own ``generate`` does.
* **the cache keyword** is ``cache=`` on transformers >= 5.24 and ``past_key_values=`` before;
  :func:`forward_names` finds which.
* **last logits** run the LM head on the last position only where the model supports ``logits_to_keep``.
* **a shared prefix** (:class:`SharedPrefixBatches`): prompts under one chat template start with the same
  tokens (BOS, system turn, the user header). Their last-position logits are the same whether that prefix is
  run once per batch row or once and broadcast through its KV cache; the second costs the prefix once.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

KL_EPS = 1e-6


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` positions of left- (or right-) padded rows: ``cumsum(mask) - 1``, pads at 0."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp_(min=0)


def forward_names(model) -> tuple[str, bool]:
    """The forward's keyword for the KV cache and whether it takes ``logits_to_keep``."""
    fwd = model.get_base_model().forward if hasattr(model, "get_base_model") else model.forward
    try:
        params = inspect.signature(fwd).parameters
    except (TypeError, ValueError):
        params = {}
    return ("cache" if "cache" in params else "past_key_values"), "logits_to_keep" in params


def forward(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
            inputs_embeds: torch.Tensor | None = None, cache=None, last_only: bool = False, use_cache: bool = False,
            **kwargs):
    """One padded forward pass with ``position_ids`` derived from ``attention_mask``.

    ``input_ids [B, T]`` or ``inputs_embeds [B, T, d]``; ``attention_mask [B, T]`` (None: no padding);
    ``cache``: a KV cache of the prefix (its length is added to the positions; the mask must then cover
    prefix + new tokens, ``[B, T_prefix + T]``); ``last_only``: compute logits at the last position only.
    Returns the model's output object.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    x = input_ids if input_ids is not None else inputs_embeds
    B, T = x.shape[0], x.shape[1]
    if attention_mask is None:
        past = 0 if cache is None else cache.get_seq_length()
        attention_mask = torch.ones(B, past + T, dtype=torch.long, device=x.device)
    pos = position_ids(attention_mask)[:, -T:]
    cache_kw, has_keep = forward_names(model)
    kw = dict(attention_mask=attention_mask, position_ids=pos, use_cache=use_cache or cache is not None, **kwargs)
    if cache is not None:
        kw[cache_kw] = cache
    if last_only and has_keep:
        kw["logits_to_keep"] = 1
    if input_ids is not None:
        kw["input_ids"] = input_ids
    else:
        kw["inputs_embeds"] = inputs_embeds
    return model(**kw)


def last_logits(model, batches) -> torch.Tensor:
    """Next-token logits ``[N, V]`` float64 at the last position of every row of ``batches``
    (objects with ``input_ids`` and ``attention_mask``, e.g. :class:`pysafegeom.prompts.PromptBatch`)."""
    out = []
    for fb in batches:
        logits = forward(model, fb.input_ids, fb.attention_mask, last_only=True).logits
        out.append(logits[:, -1].to(torch.float64))
    return torch.cat(out)


def kl_next_token(base_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p_base || p_new) of next-token distributions ``[N, V]`` (float64, eps 1e-6 inside the logs; PROTOCOL 2.4)."""
    p = torch.softmax(base_logits.double(), -1)
    q = torch.softmax(new_logits.double(), -1)
    return (p * (torch.log(p + KL_EPS) - torch.log(q + KL_EPS))).sum(-1)


@dataclass
class PrefixCache:
    """The KV cache of a shared prefix (e.g. the template and instruction before an attack suffix), computed once.

    ``ids [1, T_p]``; ``cache``: the model's cache object after the prefix. :meth:`expand` gives a cache
    for a batch of continuations (a copy per call, since a forward extends the cache in place).
    """

    ids: torch.Tensor
    cache: object

    @classmethod
    def build(cls, model, ids: torch.Tensor) -> "PrefixCache":
        if ids.dim() == 1:
            ids = ids[None]
        if ids.shape[0] != 1:
            raise ValueError(f"a prefix cache is built from one row, got {ids.shape[0]}")
        with torch.no_grad():
            out = forward(model, ids, use_cache=True, last_only=True)
        return cls(ids, getattr(out, forward_names(model)[0]))

    def expand(self, batch_size: int):
        """A fresh cache holding the prefix for ``batch_size`` rows."""
        import copy

        c = copy.deepcopy(self.cache)
        if batch_size != 1:
            if hasattr(c, "batch_repeat_interleave"):
                c.batch_repeat_interleave(batch_size)
            else:  # pragma: no cover - very old cache classes
                raise TypeError(f"cache type {type(c).__name__} cannot be expanded to a batch")
        return c

    def __len__(self) -> int:
        return int(self.ids.shape[1])


def common_prefix_length(rows: list[list[int]], keep: int = 1, min_prefix: int = 2) -> int:
    """How many leading tokens every row shares, leaving at least ``keep`` tokens of each row after them; 0 when
    that is fewer than ``min_prefix`` (too short to be worth a cache)."""
    if not rows:
        return 0
    first, n = rows[0], min(len(r) for r in rows) - keep
    k = 0
    while k < n and all(r[k] == first[k] for r in rows):
        k += 1
    return k if k >= min_prefix else 0


class SharedPrefixBatches:
    """Encoded prompts cut into their shared prefix and left-padded, length-sorted batches of what follows it.

    :meth:`last_logits` runs the prefix once per call (one row; its KV cache repeated over each batch) and the
    remainders on that cache, under whatever hooks are installed at the call: a hook that edits every position
    (:func:`pysafegeom.interventions.ablate` / ``add`` with ``positions="all"``) sees the prefix in the first
    forward and the rest in the second, so the result equals :func:`last_logits` of the full rows up to float
    rounding. Hooks that tell a prompt forward from a decode step by the cache (``positions="prompt"``) must not
    be used with it. ``min_prefix=None`` (or a prefix shorter than ``min_prefix``) runs the full rows as usual.
    ``batches`` are :class:`pysafegeom.prompts.PromptBatch` of the trimmed rows, ``inv`` puts outputs back in order."""

    def __init__(self, tokenizer, enc, batch_size: int, device=None, min_prefix: int | None = 2):
        from ..prompts import EncodedPrompts, pad_prompts

        n = len(enc.rows)
        self.P = common_prefix_length(enc.rows, min_prefix=min_prefix) if min_prefix is not None else 0
        order = sorted(range(n), key=lambda i: len(enc.rows[i]))
        inv = torch.empty(n, dtype=torch.long)
        inv[torch.tensor(order, dtype=torch.long)] = torch.arange(n)
        self.inv = inv.to(device)
        self.prefix = torch.tensor([enc.rows[0][:self.P]], dtype=torch.long, device=device) if self.P else None
        trimmed = EncodedPrompts(enc.split, [enc.rows[i][self.P:] for i in order], [enc.instructions[i] for i in order])
        self.batches = [pad_prompts(tokenizer, trimmed, range(s, min(s + batch_size, n)), device=device)
                        for s in range(0, n, batch_size)]

    def last_logits(self, model) -> torch.Tensor:
        """Next-token logits ``[N, V]`` float64 at each row's last token, in the rows' order."""
        if not self.P:
            return last_logits(model, self.batches)[self.inv]
        out = []
        pc = PrefixCache.build(model, self.prefix)
        for b in self.batches:
            B = b.input_ids.shape[0]
            full = torch.cat([b.attention_mask.new_ones(B, self.P), b.attention_mask], dim=1)
            out.append(forward(model, b.input_ids, full, cache=pc.expand(B), last_only=True).logits[:, -1].double())
        return torch.cat(out)[self.inv]
