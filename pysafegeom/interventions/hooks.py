"""Causal interventions (PROTOCOL.md section 4): directional ablation, activation addition, weight orthogonalisation.

Every intervention is a context manager that leaves the model exactly as it found it (no hooks left,
every parameter and buffer bit for bit, a tied unembedding tied again), on exceptions too.

* :func:`ablate`: ``x <- x - beta * Q Q^T x`` on every block input and on every attention and MLP
  output (what is added to the residual stream) of the chosen layers (default all). ``Q [d, k]`` is an
  orthonormal basis of the carrier's span (one direction, or a subspace). Ablating the sublayer outputs
  too is what makes the hooks equivalent to weight orthogonalisation.
* :func:`add` (ActAdd): ``x <- x + alpha * v`` on the input of one block.
* :func:`orthogonalize`: ``W <- W - Q Q^T W`` for every weight (and bias) that writes into the residual
  stream, in place, restored on exit. :func:`export_orthogonalized` writes such an edited model as a new
  Hugging Face folder.

Models placed over several devices with accelerate (``load_model(..., device_map=...)``) work with all three:
the hooks edit each activation on the device it is on (the basis, vector and position mask are copied once to
each device the model's blocks run on, never the activations to the host), and :func:`orthogonalize` edits
offloaded weights (on ``meta``, loaded per forward from the hook's ``weights_map``) in an overlay over that map.

Positions (``positions=`` of :func:`ablate` and :func:`add`):

* ``"all"`` (default): every position of every forward, generated tokens included. No masking work is
  done at all: the fast path.
* ``"prompt"``: only forwards that do not continue a KV cache (the prefill of generation, or any plain
  forward). The decode steps that feed generated tokens are left alone; they still attend to the edited
  prompt (Zhao's ``max_decode_step_while_intervene=1``).
* ``"instruction"``: only the user's instruction tokens of prompts formatted with the chat template
  (:func:`pysafegeom.prompts.format_prompts`), in the prompt forward. Needs ``tokenizer`` (and the
  ``template``/``system`` the prompts were formatted with). With left padding, row ``b``'s span is
  ``[pad_b + n_prefix, T - n_suffix)``; the template's tokens on either side are checked against the
  input ids, and input that was not formatted with this template is an error.
* a bool tensor ``[B, T]``: the positions of the prompt forward to edit (its shape is checked at forward time).

Prefill and decode steps are told apart by a forward pre-hook on the decoder (the module that holds the
layers): a forward whose KV cache (``cache=`` on transformers >= 5.24, ``past_key_values=`` before)
already holds tokens is a decode step.
"""

from __future__ import annotations

import copy
import inspect
import numbers
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .. import ops
from .. import validate as V
from ..errors import InvalidArgument, InvalidType
from ..models import ModelAdapter
from ..models.placement import WeightsOverlay, is_dispatched

POSITION_MODES = ("all", "prompt", "instruction")
MAX_DIRECTIONS = 16  # the fused kernels' limit on k


# --- validation (once, on entry) ------------------------------------------------------------------

def _basis(direction: torch.Tensor, d: int, what: str = "carrier") -> torch.Tensor:
    """Orthonormal float64 basis ``[d, k]`` (on CPU) of ``direction`` (``[d]`` or ``[d, k]``), by QR."""
    if not isinstance(direction, torch.Tensor):
        raise InvalidType(f"{what} must be a torch.Tensor of shape [d] or [d, k], got {type(direction).__name__}")
    if direction.dim() not in (1, 2):
        raise InvalidArgument(f"{what} must have shape [d] or [d, k], got {tuple(direction.shape)}")
    if not direction.is_floating_point():
        raise InvalidType(f"{what} must be a floating-point tensor, got {direction.dtype}")
    D = direction.detach().to("cpu", torch.float64)
    if D.dim() == 1:
        D = D[:, None]
    if D.shape[0] != d:
        raise InvalidArgument(f"{what} has width {D.shape[0]} but the model's residual width is {d}")
    if not 1 <= D.shape[1] <= MAX_DIRECTIONS:
        raise InvalidArgument(f"{what} must have between 1 and {MAX_DIRECTIONS} columns (directions), got {D.shape[1]}")
    if not torch.isfinite(D).all():
        raise InvalidArgument(f"{what} contains NaN or infinite values")
    norms = D.norm(dim=0)
    if (norms == 0).any():
        raise InvalidArgument(f"{what} is zero (a zero vector has no direction to ablate or add)")
    q, r = torch.linalg.qr(D / norms)
    if (r.diagonal().abs() < 1e-8).any():
        raise InvalidArgument(f"{what}'s columns are linearly dependent; pass a basis of full rank")
    return q


def control_directions(d: int, n: int, k: int = 1, *, seed: int = 0, orthogonal_to: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """``n`` random orthonormal bases ``[n, d, k]`` float64 (k = 1: Gaussian unit vectors), reproducible by ``seed``.

    Drawn on the CPU (the same on every device). With ``orthogonal_to`` (``[d, j]``), each draw is first
    projected onto the orthogonal complement of its column span.
    """
    if n < 1:
        raise ValueError(f"n_controls must be >= 1 when controls are asked for, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    G = torch.randn(n, d, k, generator=g, dtype=torch.float64)
    if orthogonal_to is not None:
        P, _ = torch.linalg.qr(orthogonal_to.to(torch.float64).cpu())
        G = G - P @ (P.T @ G)
    Q, _ = torch.linalg.qr(G)
    return Q


def _check_layer(layer, n_layers: int) -> int:
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise InvalidType(f"layer must be an int in [0, {n_layers}), got {type(layer).__name__} {layer!r}")
    layer = int(layer)
    if not 0 <= layer < n_layers:
        raise InvalidArgument(f"layer {layer} out of range [0, {n_layers}) (negative indices are not accepted)")
    return layer


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, x):
    if args:
        return (x,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = x
    return args, kwargs


# --- the edit run by the hooks --------------------------------------------------------------------

class _EditOn:
    """The constants of an :class:`_Edit` on one device (basis and vector in float64 and float32, the backend)."""

    def __init__(self, Q64: torch.Tensor | None, beta: float, av64: torch.Tensor | None, device, dtype):
        self.device, self.dtype = device, dtype
        self.beta = beta
        self.Q64 = Q64.to(device) if Q64 is not None else None
        self.Q32 = self.Q64.to(torch.float32).contiguous() if Q64 is not None else None
        self.av64 = av64.to(device) if av64 is not None else None
        self.av32 = self.av64.to(torch.float32).contiguous() if av64 is not None else None
        if self.Q32 is None:  # addition only: the backend op needs some basis; beta = 0 ignores it
            self.Q32 = (self.av32 / self.av32.norm())[:, None].contiguous()
        self.d = self.Q32.shape[0]
        self.mod = None
        if dtype in ops.FLOAT_DTYPES:
            _, self.mod = ops.select_backend("project_ablate", device, dtype)

    def __call__(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        if x.dtype == torch.float64:
            out = x
            if self.beta:
                out = out - self.beta * ((out @ self.Q64) @ self.Q64.T)
            if self.av64 is not None:
                out = out + self.av64
            if inplace:
                x.copy_(out)
                return x
            return out
        grad = x.requires_grad and torch.is_grad_enabled()
        if x.dtype != self.dtype or not x.is_contiguous() or grad:
            alpha, v = (1.0, self.av32) if self.av32 is not None else (0.0, None)
            return ops.project_ablate(x, self.Q32, self.beta, alpha, v, inplace=inplace and not grad)
        if self.beta == 0.0 and x.dtype == torch.float32:  # addition in float32: one add, as the reference does it
            if self.av32 is None:  # beta = 0 ablation: the identity
                return x
            return x.add_(self.av32) if inplace else x + self.av32
        x2 = x.view(-1, self.d)
        if self.mod is None:
            from ..ops import reference

            out, _ = reference.project_ablate(x2, self.Q32, self.beta, 1.0, self.av32, inplace, False)
        else:
            out = x2 if inplace else torch.empty_like(x2)
            self.mod.project_ablate(x2, self.Q32, self.beta, 1.0, self.av32, out, None)
        return x if inplace else out.view(x.shape)


class _Edit:
    """``x -> x - beta Q Q^T x + av`` over the last dim, validated once so that a hook call is cheap.

    The edit runs on the device of each input it is given: with a model placed over several devices
    (``device_map``) each layer's activations stay where they are, and the basis and vector are copied to each
    device once (``devices``: made on entry; another device met in a forward is added at its first call). Per
    device the backend is chosen once for the model's dtype and called directly on contiguous inputs (in place
    where the caller says it is safe). Anything unusual (another dtype, a non-contiguous tensor, autograd) goes
    through :func:`pysafegeom.ops.project_ablate`, which validates and differentiates. Float64 inputs are computed
    in float64.
    """

    def __init__(self, Q64: torch.Tensor | None, beta: float, av64: torch.Tensor | None, devices, dtype):
        self.beta, self.dtype = beta, dtype
        self._Q64, self._av64 = Q64, av64
        self._on: dict[torch.device, _EditOn] = {}
        for dev in devices:
            self.on(dev)

    def on(self, device: torch.device) -> _EditOn:
        """The edit's constants on ``device`` (made once, outside inference mode, so autograd can use them later)."""
        c = self._on.get(device)
        if c is None:
            with torch.inference_mode(False), torch.no_grad():
                c = self._on[device] = _EditOn(self._Q64, self.beta, self._av64, device, self.dtype)
        return c

    def __call__(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        return self.on(x.device)(x, inplace)


# --- positions ------------------------------------------------------------------------------------

def _decoder_root(model: nn.Module, first_layer: nn.Module) -> nn.Module:
    """The module that holds the decoder layers (``model.model``, ``model.transformer``): its forward sees the cache."""
    for m in model.modules():
        for c in m.children():
            if isinstance(c, nn.ModuleList) and len(c) and c[0] is first_layer:
                return m
    return model


def _cache_len(cache) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache:  # legacy tuple cache: ((k, v), ...) with k [B, H, S, dh]
        first = cache[0]
        k = first[0] if isinstance(first, (tuple, list)) else first
        return int(k.shape[-2]) if isinstance(k, torch.Tensor) else 0
    return 0


class _Gate:
    """Which forwards (prefill or decode) and which positions an intervention edits.

    ``active`` is None outside a forward of the decoder, True in a prompt forward, False in a decode
    step; ``mask`` is None (every position) or a bool ``[B, T, 1]`` for the current prompt forward, on the
    device of the forward's inputs; :meth:`mask_on` gives it on a layer's device (copied once per forward).
    """

    def __init__(self, positions, device, tokenizer=None, template=None, system=None):
        self.active: bool | None = None
        self.mask: torch.Tensor | None = None
        self._mask_on: dict = {}
        self.user_mask = None
        if isinstance(positions, torch.Tensor):
            if positions.dtype != torch.bool or positions.dim() != 2:
                raise InvalidArgument(f"a positions mask must be a bool tensor [B, T], got {positions.dtype} "
                                 f"{tuple(positions.shape)}")
            self.mode = "mask"
            self.user_mask = positions.to(device)
        elif isinstance(positions, str) and positions in POSITION_MODES:
            self.mode = positions
        else:
            raise InvalidArgument(f"unknown positions mode {positions!r}; use one of {', '.join(map(repr, POSITION_MODES))} "
                             "or a bool mask tensor [B, T]")
        if self.mode == "instruction":
            if tokenizer is None:
                raise InvalidArgument("positions='instruction' needs tokenizer= (and the template=/system= the prompts were "
                                 "formatted with) to locate the instruction tokens")
            from ..prompts import split_template

            split = split_template(tokenizer, template, system)
            prefix_ids = tokenizer(split.prefix, add_special_tokens=False)["input_ids"]
            self.prefix_ids = torch.tensor(prefix_ids, dtype=torch.long, device=device)
            self.suffix_ids = torch.tensor(split.suffix_ids, dtype=torch.long, device=device)
        self.every_forward = self.mode == "all"

    def mask_on(self, device: torch.device) -> torch.Tensor | None:
        """The current forward's mask on ``device`` (a model placed over several devices runs layers elsewhere)."""
        m = self.mask
        if m is None or m.device == device:
            return m
        c = self._mask_on.get(device)
        if c is None:
            c = self._mask_on[device] = m.to(device)
        return c

    def install(self, root: nn.Module) -> list:
        if self.every_forward:
            self.active = True
            return []
        names = list(inspect.signature(root.forward).parameters)
        where = {n: i for i, n in enumerate(names)}

        def get(args, kwargs, name):
            if name in kwargs:
                return kwargs[name]
            i = where.get(name)
            return args[i] if i is not None and i < len(args) else None

        def pre(mod, args, kwargs):
            cache = next((c for n in ("cache", "past_key_values", "past_key_value") if (c := get(args, kwargs, n)) is not None),
                         None)
            self._mask_on = {}
            if _cache_len(cache) > 0:
                self.active, self.mask = False, None
                return None
            self.active, self.mask = True, None
            if self.mode == "prompt":
                return None
            ids, emb = get(args, kwargs, "input_ids"), get(args, kwargs, "inputs_embeds")
            shape = tuple(ids.shape[:2]) if ids is not None else tuple(emb.shape[:2]) if emb is not None else None
            if self.mode == "mask":
                if shape != tuple(self.user_mask.shape):
                    raise ValueError(f"the positions mask has shape {tuple(self.user_mask.shape)} but the prompt forward "
                                     f"has [B, T] = {list(shape) if shape else 'unknown'}")
                self.mask = self.user_mask[:, :, None]
                if ids is not None or emb is not None:
                    self.mask = self.mask.to((ids if ids is not None else emb).device)
            else:
                if ids is None:
                    raise ValueError("positions='instruction' needs the forward to be given input_ids (it reads the "
                                     "template's tokens around the instruction)")
                self.mask = self._instruction_mask(ids, get(args, kwargs, "attention_mask"))[:, :, None]
            return None

        def post(mod, args, kwargs, out):
            self.active, self.mask, self._mask_on = None, None, {}

        return [root.register_forward_pre_hook(pre, with_kwargs=True),
                root.register_forward_hook(post, with_kwargs=True, always_call=True)]

    def _instruction_mask(self, ids: torch.Tensor, attention_mask) -> torch.Tensor:
        """Bool ``[B, T]``: the instruction tokens of left-padded formatted prompts."""
        B, T = ids.shape
        dev = ids.device
        if attention_mask is None:
            pad = torch.zeros(B, dtype=torch.long, device=dev)
        else:
            if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (B, T):
                raise ValueError("positions='instruction' needs a 2-D attention_mask [B, T] (left padding), got "
                                 f"{tuple(attention_mask.shape)}")
            pad = T - attention_mask.long().sum(1)
        P, S = self.prefix_ids.to(dev), self.suffix_ids.to(dev)
        n_p, n_s = P.shape[0], S.shape[0]
        if T < n_s + 1:
            raise ValueError(f"the prompt forward has {T} tokens, too few for a formatted prompt (the template's "
                             f"suffix alone has {n_s})")
        idx = pad[:, None] + torch.arange(n_p, device=dev)
        inside = idx < T
        match = (ids.gather(1, idx.clamp(max=T - 1)) == P) & inside
        lead = match.long().cumprod(1).sum(1)  # how many of the prefix tokens each row starts with
        suffix_ok = (ids[:, T - n_s:] == S).all(1)
        # the last prefix token may merge with the instruction's first characters (e.g. "[INST] " + "How")
        ok = suffix_ok & (lead >= n_p - 1) & (pad + lead < T - n_s)
        if not bool(ok.all()):
            bad = int((~ok).nonzero()[0, 0])
            raise ValueError(f"row {bad} of the prompt forward is not a left-padded prompt formatted with this chat "
                             "template (its tokens around the instruction differ from the template's); format the "
                             "prompts with pysafegeom.prompts.format_prompts and pass the same template=/system=")
        pos = torch.arange(T, device=dev)
        return (pos[None] >= (pad + lead)[:, None]) & (pos[None] < T - n_s)


# --- hook installation ----------------------------------------------------------------------------

def _install(model, ad: ModelAdapter, gate: _Gate, edit: _Edit, pre_layers, post_layers) -> list:
    """Pre-hooks (block inputs) on ``pre_layers`` and output hooks (attention, MLP) on ``post_layers``."""
    handles = gate.install(_decoder_root(model, ad.layers[0]))
    if gate.every_forward:
        def pre(mod, args, kwargs):
            return _with_hidden(args, kwargs, edit(_hidden(args, kwargs), False))

        def post(mod, args, out):
            x = out[0] if isinstance(out, tuple) else out
            y = edit(x, True)  # sublayer outputs are fresh tensors: edited in place where autograd allows
            if y is x:
                return None
            return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y
    else:
        def state(x):
            if gate.active is None:
                raise RuntimeError(f"positions={gate.mode!r} needs the model to be called through its decoder's forward "
                                   "(a layer ran outside it)")
            return gate.active, gate.mask_on(x.device) if gate.active else None

        def pre(mod, args, kwargs):
            x = _hidden(args, kwargs)
            active, m = state(x)
            if not active:
                return None
            y = edit(x, False)
            return _with_hidden(args, kwargs, y if m is None else torch.where(m, y, x))

        def post(mod, args, out):
            x = out[0] if isinstance(out, tuple) else out
            active, m = state(x)
            if not active:
                return None
            y = edit(x, m is None)
            if m is not None:
                y = torch.where(m, y, x)
            elif y is x:
                return None
            return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y

    for l in pre_layers:
        handles.append(ad.layers[l].register_forward_pre_hook(pre, with_kwargs=True))
    for l in post_layers:
        handles.append(ad.attn_modules[l].register_forward_hook(post))
        handles.append(ad.mlp_modules[l].register_forward_hook(post))
    return handles


def _devices(ad: ModelAdapter, layers: list[int]) -> list[torch.device]:
    """The devices the hooks on ``layers`` see activations on: the inputs' device, and each layer's execution
    device (a block's input arrives from the block before it; one device unless the model is placed over several)."""
    devs = [ad.device]
    if is_dispatched(ad.model):
        for l in layers:
            for m in {ad.layers[l - 1] if l else ad.embed, ad.layers[l]}:
                dev = ad.device_of(m)
                if dev not in devs:
                    devs.append(dev)
    return devs


def _layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [layers]
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise InvalidType(f"layers must be a list of layer indices in [0, {n_layers}) or None (all), got "
                          f"{type(layers).__name__} {V.show(layers)}")
    layers = list(layers)
    if not layers:
        raise InvalidArgument("layers is empty: nothing would be ablated; pass None for all layers")
    return sorted({_check_layer(l, n_layers) for l in layers})


@contextmanager
def ablate(model, direction: torch.Tensor, *, beta: float = 1.0, layers: list[int] | None = None,
           positions="all", tokenizer=None, template: str | None = None, system: str | None = None):
    """Directional ablation ``x <- x - beta * Q Q^T x`` while inside the block.

    ``direction``: ``[d]`` or a basis ``[d, k]`` (k <= 16), orthonormalised here (its span is ablated).
    ``beta`` in [0, 1]: 1 is full ablation, less is partial. Applied to the input of every chosen block
    and to its attention and MLP outputs; ``layers`` default all. ``positions``: see the module docstring.
    """
    V.is_model("model", model)
    ad = ModelAdapter(model)
    Q = _basis(direction, ad.d_model, "direction")
    beta = V.finite_float("beta", beta, lo=0.0, hi=1.0, hint="1 = full ablation")
    idx = _layers(layers, ad.n_layers)
    gate = _Gate(positions, ad.device, tokenizer, template, system)
    edit = _Edit(Q, beta, None, _devices(ad, idx), ad.dtype)
    handles = []
    try:
        handles = _install(model, ad, gate, edit, idx, idx)
        yield model
    finally:
        for h in handles:
            h.remove()


@contextmanager
def add(model, vector: torch.Tensor, layer: int, *, alpha: float = 1.0, positions="all", tokenizer=None,
        template: str | None = None, system: str | None = None):
    """Activation addition ``x <- x + alpha * vector`` at the input of block ``layer`` while inside the block.

    ``vector [d]`` is added as given, not normalised: with the raw difference-of-means carrier ``r`` this
    is ``x + alpha * ||r|| * r_hat``, i.e. ``alpha`` is in units of the carrier's own norm (PROTOCOL.md
    section 4; Arditi's alpha = -1 bypasses refusal, +1 induces it). ``positions``: see the module docstring.
    """
    V.is_model("model", model)
    ad = ModelAdapter(model)
    layer = _check_layer(layer, ad.n_layers)
    alpha = V.finite_float("alpha", alpha, hint="NaN and infinities are refused; alpha is in units of the carrier's norm")
    if not isinstance(vector, torch.Tensor):
        raise InvalidType(f"vector must be a torch.Tensor of shape [d], got {type(vector).__name__}")
    if not vector.is_floating_point():
        raise InvalidType(f"vector must be a floating-point tensor, got {vector.dtype}")
    if vector.shape != (ad.d_model,):
        raise InvalidArgument(f"vector has shape {tuple(vector.shape)} but the model's residual width is {ad.d_model}")
    v = vector.detach().to("cpu", torch.float64)
    if not torch.isfinite(v).all():
        raise InvalidArgument("vector contains NaN or infinite values")
    if v.norm() == 0:
        raise InvalidArgument("vector is zero: adding it would do nothing")
    gate = _Gate(positions, ad.device, tokenizer, template, system)
    edit = _Edit(None, 0.0, alpha * v, _devices(ad, [layer]), ad.dtype)
    handles = []
    try:
        handles = _install(model, ad, gate, edit, [layer], [])
        yield model
    finally:
        for h in handles:
            h.remove()


# --- weight orthogonalisation ---------------------------------------------------------------------

def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.device.type == "meta" or b.device.type == "meta":  # offloaded: no storage, every data_ptr is 0
        return False
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _tied(head: nn.Module, embed: nn.Module) -> bool:
    """Whether the head's weight is the embedding's (the same parameter, or the same storage)."""
    return _shares_storage(head.weight, embed.weight)


@torch.no_grad()
def _orthogonalize_(W: torch.Tensor, Q64: torch.Tensor, residual_dim: int) -> None:
    """``W`` with span(Q) removed from its residual side, in place (float64 weights in float64)."""
    if W.dtype == torch.float64:
        Q = Q64.to(W.device)
        W.sub_(Q @ (Q.T @ W) if residual_dim == 0 else (W @ Q) @ Q.T)
    else:
        ops.orthogonalize_weight(W, Q64.to(W.device, torch.float32), residual_dim, inplace=True)


def _check_plain_writers(writers, d: int) -> None:
    """Every residual writer is a plain weight whose residual axis has the model's width (no unmerged LoRA)."""
    for w in writers:
        mod = w.module
        if hasattr(mod, "base_layer") or hasattr(mod, "lora_A"):
            raise InvalidArgument(
                f"model: {w.name} is a LoRA layer ({type(mod).__name__}) with an unmerged adapter (a PeftModel, e.g. what "
                "pysafegeom.train.run returns); orthogonalize edits plain weights, and the adapter would keep writing "
                "the direction back. Merge it first: model = model.merge_and_unload() (pysafegeom.load_model of a "
                "checkpoint merges too), or use the hook-based ablate(), which works on the unmerged model")
        weight = getattr(mod, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[w.residual_dim] != d:
            shape = list(weight.shape) if isinstance(weight, torch.Tensor) else None
            raise InvalidArgument(f"model: {w.name} ({type(mod).__name__}, weight {shape}) has no residual axis of width "
                                  f"{d}, so it cannot be orthogonalised; is it a wrapped or quantised layer?")


@contextmanager
def orthogonalize(model, direction: torch.Tensor):
    """Weight orthogonalisation ``W <- W - Q Q^T W`` of every residual writer, in place, while inside the block.

    The writers are the token (and position) embeddings, every attention and MLP output projection, and
    their biases where they have them (:meth:`ModelAdapter.residual_writers`). Equivalent to full
    :func:`ablate` at every layer and position. The unembedding is not edited: a head tied to the token
    embedding is untied for the duration (it keeps the original weights) and tied again on exit. On exit,
    normal or by an exception, every edited tensor is restored bit for bit from an exact copy (memory: one
    copy of the writers' weights).

    A model placed with accelerate (``load_model(..., device_map=...)``) is edited where each weight lives. An
    offloaded weight (``"disk"``, or ``"cpu"`` under a GPU main device; the parameter is on ``meta``) is edited in
    the mapping its accelerate hook loads it from: the hook's ``weights_map`` is wrapped, for the duration, in a
    :class:`~pysafegeom.models.placement.WeightsOverlay` holding the edited copies (host memory: one copy of each
    offloaded writer), so every forward (and ``save_pretrained``) inside the block sees the edited weights while the
    offload store (files, host state dict) is never written; on exit the hook's own mapping is put back.
    """
    V.is_model("model", model)
    ad = ModelAdapter(model)
    Q = _basis(direction, ad.d_model, "direction")
    writers = ad.residual_writers()  # raises for architectures where the edit is not equivalent
    _check_plain_writers(writers, ad.d_model)
    offloaded = _offloaded_writers(model, ad, writers)  # raises where an offloaded weight cannot be edited
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    overlays: list[tuple[object, object]] = []  # (accelerate hook, its own weights_map)
    head, head_param = ad.lm_head, None
    try:
        with torch.no_grad():
            if _tied(head, ad.embed):
                head_param = head.weight
                head.weight = nn.Parameter(head_param.detach().clone(), requires_grad=head_param.requires_grad)
            seen = set()
            edits: dict[int, tuple[object, dict]] = {}  # id(hook) -> (hook, key -> edited tensor)
            for w in writers:
                tensors = [("weight", w.module.weight, w.residual_dim)]
                b = getattr(w.module, "bias", None)
                if isinstance(b, torch.Tensor) and w.name != "embed" and w.name != "pos_embed":
                    tensors.append(("bias", b, 1))  # a bias [d] is one residual vector
                for pname, t, rdim in tensors:
                    slot = offloaded.get((id(w.module), pname))
                    if slot is not None:  # edit a copy of what the hook loads, served by an overlay
                        hook, key = slot
                        if (id(hook), key) in seen:
                            continue
                        seen.add((id(hook), key))
                        new = hook.weights_map[key].detach().clone()
                        _orthogonalize_(new[None] if pname == "bias" else new, Q, rdim)
                        edits.setdefault(id(hook), (hook, {}))[1][key] = new
                        continue
                    t = t[None] if pname == "bias" else t
                    key = t.untyped_storage().data_ptr(), t.storage_offset()
                    if key in seen:
                        continue
                    seen.add(key)
                    saved.append((t, t.detach().clone()))
                    _orthogonalize_(t, Q, rdim)
            for hook, new in edits.values():
                overlays.append((hook, hook.weights_map))
                hook.weights_map = WeightsOverlay(hook.weights_map, new)
        yield model
    finally:
        with torch.no_grad():
            for t, orig in saved:
                t.copy_(orig)
            for hook, own in reversed(overlays):
                hook.weights_map = own
            if head_param is not None:
                head.weight = head_param


def _offloaded_writers(model, ad: ModelAdapter, writers) -> dict:
    """``(id(module), "weight" | "bias") -> (accelerate hook, key)`` for the residual writers whose tensors are
    offloaded (on ``meta``, loaded by a hook per forward); raises where such a tensor cannot be edited."""
    out = {}
    if not any(w.module.weight.device.type == "meta" for w in writers):
        return out
    from ..models.placement import _module_names, offload_slot

    names = _module_names(model)
    if _tied(ad.lm_head, ad.embed) and ad.embed.weight.device.type == "meta" \
            and offload_slot(model, ad.lm_head, "weight", names) is None:
        # the untied head must keep loading the original weights through a hook of its own
        raise InvalidArgument(
            "model: its token embedding is offloaded and tied to the LM head, and no accelerate hook of the head loads "
            "the head's weight on its own, so orthogonalize cannot edit the embedding without editing the unembedding "
            "too; place model.embed_tokens and lm_head on a device (e.g. device_map={..., 'model.embed_tokens': 0, "
            "'lm_head': 0}), or use the hook-based ablate(), which works on any placement")
    for w in writers:
        for pname in ("weight", "bias"):
            t = getattr(w.module, pname, None)
            if not isinstance(t, torch.Tensor) or t.device.type != "meta" or (pname == "bias" and w.name in ("embed", "pos_embed")):
                continue
            slot = offload_slot(model, w.module, pname, names)
            if slot is None:
                raise InvalidArgument(
                    f"model: {w.name}.{pname} is on the meta device but no accelerate offload hook loads it (a model "
                    "initialised empty, or dispatched by hand?), so there is nothing to orthogonalise; load the "
                    "weights (pysafegeom.load_model(..., device_map=...)) or use the hook-based ablate()")
            out[(id(w.module), pname)] = slot
    return out


def _untie_in_config(config) -> None:
    """Set ``tie_word_embeddings=False`` on a config (and on its text config, for multimodal configs)."""
    cfgs = [config]
    if hasattr(config, "get_text_config") and config.get_text_config() is not config:
        cfgs.append(config.get_text_config())
    for cfg in cfgs:
        cfg.tie_word_embeddings = False


def export_orthogonalized(model, tokenizer, direction: torch.Tensor, out_dir: str | os.PathLike, *,
                          overwrite: bool = False) -> Path:
    """Write ``model`` with ``direction`` orthogonalised out of its weights as a new Hugging Face folder.

    The folder (config, safetensors, tokenizer) appears atomically and loads with plain
    ``transformers.AutoModelForCausalLM.from_pretrained``; its logits equal those of :func:`ablate` hooks
    (full ablation, all layers and positions) up to float rounding. A head tied to the token embedding is
    saved as its own (unedited) weight, with ``tie_word_embeddings=False`` in the exported config. The
    in-memory model is unchanged afterwards. Returns the folder.

    An existing ``out_dir`` is replaced only if it is a model folder this package exported (or is
    empty); anything else raises :class:`~pysafegeom.errors.OutputExists` before any work, unless
    ``overwrite=True``.
    """
    from .._io import atomic_dir, check_output_path

    out_dir = check_output_path(out_dir, overwrite, "dir", content="model")
    ad = ModelAdapter(model)
    tied = _tied(ad.lm_head, ad.embed)
    config = model.config
    with orthogonalize(model, direction):
        try:
            if tied:
                model.config = copy.deepcopy(config)
                _untie_in_config(model.config)
            with atomic_dir(out_dir, content="model") as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
        finally:
            model.config = config
    return out_dir
