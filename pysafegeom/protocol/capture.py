"""Activation capture: residual stream at ``t_inst`` and the post-instruction positions, streamed per set.

PROTOCOL.md section 1. Forward pre-hooks on every decoder block read ``resid_pre`` (the block's input)
and a pre-hook on the final norm reads the residual after the last block, so layer index ``L`` means
"after the last block". Only the protocol's positions are gathered (:func:`pysafegeom.ops.gather_positions`);
the forward stops right after the last layer it needs (the LM head never runs, except on the last
position when refusal scores are asked for); prompts are bucketed by length so little padding is
computed. Per-set sums accumulate in float64 through :func:`pysafegeom.ops.gather_accumulate`, so
memory grows with layers x positions x width, not with the number of tokens.

Groups: every prompt falls in group ``2 * set_index + refused`` where ``refused`` is 1 when its refusal
score (PROTOCOL 2.4) is > 0. Without refusal tokens every prompt has ``refused = 0``. The set means
are the sums over both groups; the behaviour-filtered means use one group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .. import ops
from .. import validate as V
from ..models import ModelAdapter
from ..models.forward import PrefixCache, common_prefix_length, forward
from ..prompts import encode_prompts, pad_prompts
from ..refusal import refusal_scores_from_logits



SHARED_PREFIX = True  # run the prompts' shared template prefix once and continue every batch from its KV cache


class _StopForward(Exception):
    """Raised by the last capture hook: the rest of the forward pass is not needed."""


@dataclass
class Capture:
    """Streamed statistics of one capture run.

    ``sums [G, n_layers, P, d]`` float64 and ``counts [G]`` with ``G = 2 * len(set_names)`` groups
    (see module docstring). ``layers`` are resid_pre indices (``n_layers_model`` = after the last
    block). ``position_names`` name the P position columns (``t_inst``, ``eoi-n`` ... ``eoi-1``).
    ``per_prompt[set][pos_name]`` holds ``[n, n_layers, d]`` float32 activations for the kept
    positions; ``scores[set]`` the per-prompt refusal scores ``[n]`` float64 (empty when not asked).
    """

    set_names: list[str]
    layers: list[int]
    position_names: list[str]
    sums: torch.Tensor
    counts: torch.Tensor
    per_prompt: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    n_tokens: int = 0
    n_padded_tokens: int = 0

    def group(self, set_name: str, refused: bool | None = None) -> list[int]:
        s = self.set_names.index(set_name)
        return [2 * s, 2 * s + 1] if refused is None else [2 * s + int(refused)]

    def count(self, set_name: str, refused: bool | None = None) -> int:
        return int(self.counts[self.group(set_name, refused)].sum())

    def mean(self, set_name: str, refused: bool | None = None) -> torch.Tensor:
        """Mean activation ``[n_layers, P, d]`` float64 over a set (or its refused / complied part)."""
        g = self.group(set_name, refused)
        n = int(self.counts[g].sum())
        if n == 0:
            which = "" if refused is None else (" (refused)" if refused else " (complied)")
            raise ValueError(f"no prompts in set {set_name!r}{which} to average")
        return self.sums[g].sum(0) / n


def _layer_input(args, kwargs):
    if args:
        return args[0]
    return kwargs["hidden_states"]


def _pad_mixed(tokenizer, encoded, names, batch_items, device, n_prefix: int = 0):
    """One left-padded batch from rows of several encoded sets (all formatted with the same template), without their
    first ``n_prefix`` tokens (the shared prefix a KV cache holds); positions count from the trimmed rows' ends."""
    from ..prompts import EncodedPrompts

    first = encoded[names[batch_items[0][0]]]
    rows = [encoded[names[s]].rows[i][n_prefix:] for s, i, _ in batch_items]
    texts = [encoded[names[s]].instructions[i] for s, i, _ in batch_items]
    return pad_prompts(tokenizer, EncodedPrompts(first.split, rows, texts), device=device)


def auto_batch_size(model, max_len: int, device: torch.device) -> int:
    """A batch size that fits: a token budget on CPU; free memory over the per-token activation cost on GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        d = model.config.hidden_size
        per_token = 24 * d * torch.finfo(next(model.parameters()).dtype).bits // 8  # generous: attention + MLP temporaries
        budget = int(0.5 * free / max(per_token, 1))
    else:
        budget = 4096
    return max(1, min(256, budget // max(max_len, 1)))


def capture(
    model,
    tokenizer,
    sets: dict,
    *,
    layers: list[int] | None = None,
    keep_positions: tuple[str, ...] | str | dict = ("t_inst", "eoi-1"),
    refusal_tokens: list[int] | None = None,
    template: str | None = None,
    system: str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    backend: str | None = None,
) -> Capture:
    """Run ``model`` over named prompt sets and stream the residual stream at the protocol's positions.

    ``sets``: name -> prompt texts, or -> :class:`pysafegeom.prompts.EncodedPrompts` already encoded with
    the same template (an analysis encodes its prompts once and hands them to every stage).

    ``layers``: resid_pre indices to capture (default every block input and the output of the last
    block, ``0..L``). ``keep_positions``: position names (or ``"all"``, or a dict set -> either; sets a dict does not
    name keep ``t_inst`` and ``eoi-1``) whose per-prompt activations are kept at every
    captured layer (for subspace fits, readouts and the Latent Guard); ``"all"`` keeps ``t_inst`` and every
    post-instruction position (what :func:`~pysafegeom.protocol.carriers.fit_subspace` needs at a selected
    position other than ``eoi-1``). ``refusal_tokens``: when given,
    each prompt's refusal score is computed from the last position (the LM head runs on that row only)
    and prompts are grouped by behaviour.
    """
    if not sets:
        raise ValueError("no prompt sets to capture")
    for name, prompts in sets.items():
        if not prompts:
            raise ValueError(f"prompt set {name!r} is empty")
    ad = ModelAdapter(model)
    L = ad.n_layers
    layers = sorted(set(range(L + 1) if layers is None else layers))
    if layers[0] < 0 or layers[-1] > L:
        raise ValueError(f"layers must lie in [0, {L}] (resid_pre of each block, {L} = after the last block); got {layers}")
    device = ad.device
    max_ctx = getattr(model.config, "max_position_embeddings", None)

    # tokenise every prompt once; batches of similar length are padded from these rows
    names = list(sets)
    from ..prompts import EncodedPrompts

    encoded = {name: v if isinstance(v, EncodedPrompts) else
               encode_prompts(tokenizer, v, template=template, system=system, max_length=max_ctx)
               for name, v in sets.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for name in names:  # a tokenizer of another model would otherwise end in an "index out of range" deep in torch
        V.token_ids_fit(model, encoded[name].rows, what=f"the prompts of set {name!r}", extra={"the pad token": pad})
    if refusal_tokens is not None:
        V.token_ids_fit(model, [list(refusal_tokens)], what="refusal_tokens")
    sets = {name: encoded[name].instructions for name in names}
    items = [(s, i, len(row)) for s, name in enumerate(names) for i, row in enumerate(encoded[name].rows)]
    n_post = len(encoded[names[0]].split.suffix_ids)
    position_names = ["t_inst"] + [f"eoi-{n_post - j}" for j in range(n_post)]
    def resolve_keep(spec) -> tuple[str, ...]:
        if isinstance(spec, str):
            if spec != "all":
                raise ValueError(f"keep_positions must be 'all' or a tuple of position names, got {spec!r}")
            return tuple(position_names)
        spec = tuple(spec)
        unknown = [p for p in spec if p not in position_names]
        if unknown:
            raise ValueError(f"unknown keep_positions {unknown}; choose from {position_names}")
        return spec

    if isinstance(keep_positions, dict):  # per set; sets it does not name keep t_inst and eoi-1
        extra = [k for k in keep_positions if k not in names]
        if extra:
            raise ValueError(f"keep_positions names sets {extra} that are not captured; the sets are {names}")
        keep = {name: resolve_keep(keep_positions.get(name, ("t_inst", "eoi-1"))) for name in names}
    else:
        keep = dict.fromkeys(names, resolve_keep(keep_positions))
    keep_cols = {name: [position_names.index(p) for p in ks] for name, ks in keep.items()}
    P, d, nl = len(position_names), ad.d_model, len(layers)
    G = 2 * len(names)
    sums = torch.zeros(G, nl * P, d, dtype=torch.float64, device=device)
    counts = torch.zeros(G, dtype=torch.int64, device=device)
    per_prompt = {name: {p: torch.zeros(len(sets[name]), nl, d) for p in keep[name]} for name in names}
    scores = {name: torch.zeros(len(sets[name]), dtype=torch.float64) for name in names} if refusal_tokens else {}

    items.sort(key=lambda it: it[2])
    bs = batch_size or auto_batch_size(model, items[-1][2], device)
    batches = [items[i:i + bs] for i in range(0, len(items), bs)]

    state: dict = {}
    need_final = L in layers or refusal_tokens is not None

    def gather(hidden):
        """The protocol's positions of ``hidden`` ``[B, P, d]``, on the capture's device. A model placed over
        several devices (device_map) runs a layer elsewhere: the positions go to its device (once per batch) and
        only the gathered rows come back."""
        pos = state["pos"]
        if hidden.device != pos.device:
            pos = state["pos_on"].get(hidden.device)
            if pos is None:
                pos = state["pos_on"][hidden.device] = state["pos"].to(hidden.device)
        return ops.gather_positions(hidden, pos, backend=backend).to(device)

    def grab(slot):
        def hook(mod, args, kwargs):
            state["rows"][slot] = gather(_layer_input(args, kwargs))
            if slot == nl - 1 and not need_final:
                raise _StopForward
        return hook

    def final_hook(mod, args, kwargs):
        hidden = _layer_input(args, kwargs)
        if L in layers:
            state["rows"][nl - 1] = gather(hidden)
        if refusal_tokens is None:
            raise _StopForward

    def head_hook(mod, args, out):  # final norm output: run the head on the last position only
        logits = ad.lm_head(out[:, -1, :])
        state["scores"] = refusal_scores_from_logits(logits, refusal_tokens).to(device)
        raise _StopForward

    # the template's shared prefix (BOS, system turn, user header) runs once, before the capture hooks are installed;
    # every batch continues from its KV cache (the positions captured all lie after it)
    all_rows = [row for name in names for row in encoded[name].rows]
    n_prefix = common_prefix_length(all_rows, keep=n_post + 1) if SHARED_PREFIX else 0  # t_inst and after: kept
    prefix = PrefixCache.build(model, torch.tensor([all_rows[0][:n_prefix]], device=device)) if n_prefix else None

    handles = []
    try:
        for slot, l in enumerate(layers):
            if l < L:
                handles.append(ad.layers[l].register_forward_pre_hook(grab(slot), with_kwargs=True))
        if need_final:
            handles.append(ad.final_norm.register_forward_pre_hook(final_hook, with_kwargs=True))
        if refusal_tokens is not None:
            handles.append(ad.final_norm.register_forward_hook(head_hook))
        n_tok = n_pad = 0
        with torch.no_grad():
            for batch_items in tqdm(batches, desc="capture", unit="batch", disable=not progress):
                fb = _pad_mixed(tokenizer, encoded, names, batch_items, device, n_prefix)
                state["pos"] = fb.positions
                state["pos_on"] = {}
                state["rows"] = [None] * nl
                state["scores"] = None
                B = fb.input_ids.shape[0]
                try:
                    if prefix is None:
                        forward(model, fb.input_ids, fb.attention_mask)
                    else:
                        mask = torch.cat([fb.attention_mask.new_ones(B, n_prefix), fb.attention_mask], dim=1)
                        forward(model, fb.input_ids, mask, cache=prefix.expand(B))
                except _StopForward:
                    pass
                n_tok += int(fb.attention_mask.sum()) + B * n_prefix
                n_pad += fb.input_ids.numel() + B * n_prefix
                rows = torch.stack(state["rows"], dim=1)  # [B, nl, P, d]
                if not torch.isfinite(rows).all():
                    raise FloatingPointError(
                        "NaN or infinite activations (a half-precision overflow?); load the model in float32 or bfloat16"
                    )
                set_idx = torch.tensor([it[0] for it in batch_items], device=device)
                refused = torch.zeros_like(set_idx)
                if refusal_tokens is not None:
                    refused = (state["scores"] > 0).long()
                groups = 2 * set_idx + refused
                B = rows.shape[0]
                flat = rows.reshape(B, nl * P, d)
                ident = torch.arange(nl * P, device=device).expand(B, nl * P)
                ops.gather_accumulate(flat, ident, groups, sums, counts, backend=backend)
                # one device-to-host copy per batch (of the union of kept positions), not one per prompt
                cols = sorted({c for it in batch_items for c in keep_cols[names[it[0]]]})
                kept = rows[:, :, cols].float().cpu()  # [B, nl, n_keep, d]
                batch_scores = state["scores"].cpu() if refusal_tokens is not None else None
                for b, it in enumerate(batch_items):
                    name = names[it[0]]
                    for p, c in zip(keep[name], keep_cols[name]):
                        per_prompt[name][p][it[1]] = kept[b, :, cols.index(c)]
                    if batch_scores is not None:
                        scores[name][it[1]] = batch_scores[b]
    finally:
        for h in handles:
            h.remove()
    return Capture(names, layers, position_names, sums.reshape(G, nl, P, d).cpu(), counts.cpu(), per_prompt, scores, n_tok, n_pad)
