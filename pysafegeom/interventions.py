"""Hook-based interventions (PROTOCOL.md section 4): directional ablation and activation addition.

Both are context managers that leave the model exactly as they found it. They apply through
:func:`pysafegeom.ops.project_ablate`, so the fused kernels run where available.

* :func:`ablate`: ``x <- x - beta * Q Q^T x`` on every block input and on every attention and MLP
  output (what is added to the residual stream), at all positions, including generated ones. Ablating
  the sublayer outputs too is what makes hooks equivalent to weight orthogonalisation.
* :func:`add`: ``x <- x + alpha * v`` on the input of one block, at all positions.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from . import ops
from .models import ModelAdapter


def _basis(direction: torch.Tensor, d: int) -> torch.Tensor:
    if direction.dim() == 1:
        direction = direction[:, None]
    if direction.shape[0] != d:
        raise ValueError(f"carrier has width {direction.shape[0]} but the model's residual width is {d}")
    if not torch.isfinite(direction).all():
        raise ValueError("carrier contains NaN or infinite values")
    q, r = torch.linalg.qr(direction.to(torch.float64))
    if (r.diagonal().abs() < 1e-12).any():
        raise ValueError("carrier is zero or its columns are linearly dependent")
    return q.to(torch.float32)


def _replace_hidden(args, kwargs, fn):
    if args:
        return (fn(args[0]),) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = fn(kwargs["hidden_states"])
    return args, kwargs


@contextmanager
def ablate(model, direction: torch.Tensor, *, beta: float = 1.0, layers: list[int] | None = None):
    """Project ``direction`` (``[d]`` or a basis ``[d, k]``) out of the residual stream while inside the block."""
    ad = ModelAdapter(model)
    if not 0.0 <= float(beta) <= 1.0 or beta != beta:
        raise ValueError(f"beta must lie in [0, 1], got {beta!r}")
    Q = _basis(direction, ad.d_model).to(ad.device)
    idx = range(ad.n_layers) if layers is None else layers
    for l in idx:
        if not 0 <= l < ad.n_layers:
            raise ValueError(f"layer {l} out of range [0, {ad.n_layers})")

    def proj(x):
        return ops.project_ablate(x, Q, beta=beta)

    def pre(mod, args, kwargs):
        return _replace_hidden(args, kwargs, proj)

    def post(mod, args, out):
        if isinstance(out, tuple):
            return (proj(out[0]),) + tuple(out[1:])
        return proj(out)

    handles = []
    try:
        for l in idx:
            handles.append(ad.layers[l].register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(ad.attn_modules[l].register_forward_hook(post))
            handles.append(ad.mlp_modules[l].register_forward_hook(post))
        yield model
    finally:
        for h in handles:
            h.remove()


@contextmanager
def add(model, vector: torch.Tensor, layer: int, *, alpha: float = 1.0):
    """Add ``alpha * vector`` to the input of block ``layer`` at all positions while inside the block."""
    ad = ModelAdapter(model)
    if not 0 <= layer < ad.n_layers:
        raise ValueError(f"layer {layer} out of range [0, {ad.n_layers})")
    if alpha != alpha:
        raise ValueError("alpha is NaN")
    if vector.shape != (ad.d_model,):
        raise ValueError(f"vector has shape {tuple(vector.shape)} but the model's residual width is {ad.d_model}")
    v = vector.to(device=ad.device, dtype=torch.float32)
    norm = v.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("vector is zero, NaN or infinite")
    Q = (v / norm)[:, None]

    def pre(mod, args, kwargs):
        return _replace_hidden(args, kwargs, lambda x: ops.project_ablate(x, Q, beta=0.0, alpha=float(alpha), v=v))

    h = ad.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield model
    finally:
        h.remove()
