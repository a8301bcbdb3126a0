"""Brute-force references shared by the tests: one prompt at a time, no padding, output_hidden_states."""

from __future__ import annotations

import torch

from pysafegeom.models import ModelAdapter
from pysafegeom.prompts import format_prompts


def positions_brute_force(model, tok, prompts):
    """Per prompt: float64 residual at every block input and after the last block, at the protocol positions.

    Returns ``(rows [n, L+1, P, d], last_logits [n, V])``. Hugging Face's last hidden state is after the
    final norm; the raw residual after the last block is read with a pre-hook on that norm instead.
    """
    ad = ModelAdapter(model)
    rows, logits = [], []
    for p in prompts:
        fb = format_prompts(tok, [p])
        pre = {}
        h = ad.final_norm.register_forward_pre_hook(lambda m, a: pre.__setitem__("x", a[0]))
        out = model(input_ids=fb.input_ids, attention_mask=fb.attention_mask, output_hidden_states=True)
        h.remove()
        hs = torch.stack(list(out.hidden_states[:-1]) + [pre["x"]])[:, 0].double()  # [L+1, T, d]
        rows.append(hs[:, fb.positions[0]])
        logits.append(out.logits[0, -1].double())
    return torch.stack(rows), torch.stack(logits)
