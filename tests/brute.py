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


def sharp_tiny_model(arch, tok, seed=0):
    """A 2-layer, d=32 tiny model whose weight matrices are redrawn from N(0, 0.3^2) and biases (Qwen2's
    q/k/v, GPT-2's) from N(0, 0.1^2), which the default init leaves at zero; norm scales stay 1. Losses of
    different attack candidates then differ clearly (the GCG and AutoDAN tests' model)."""
    from pysafegeom.models.tiny import tiny_model

    m = tiny_model(arch, tokenizer=tok, n_layers=2, d_model=32, seed=seed)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m
