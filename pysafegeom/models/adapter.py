"""One adapter over decoder-only architectures: where the layers, embedding, norm, head and residual writers are.

Supported: Llama, Mistral, Qwen2, Gemma (and other ``model.model.layers`` decoders with the same names)
and GPT-2-style models (``model.transformer.h``). An architecture that lacks one of the parts gets an
error that names the part that was not found.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .placement import _EMBED, _get, execution_device


class UnsupportedArchitecture(TypeError):
    """The model lacks a part the adapter needs."""


@dataclass(frozen=True)
class ResidualWriter:
    """A weight that writes into the residual stream.

    ``residual_dim`` is the axis of ``module.weight`` that lies in the residual space: 0 for
    ``nn.Linear`` (weight ``[d_out, d_in]``), 1 for GPT-2's ``Conv1D`` and for embeddings (rows are
    residual vectors).
    """

    name: str
    module: nn.Module
    residual_dim: int


# candidate attribute paths per part, first match wins
_LAYERS = ("model.layers", "model.model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers")
_POS_EMBED = ("transformer.wpe",)
_NORM = ("model.norm", "model.model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm")
_HEAD = ("lm_head", "embed_out")
_ATTN = ("self_attn", "attn", "attention")
_MLP = ("mlp", "feed_forward")
_ATTN_OUT = ("o_proj", "c_proj", "dense", "out_proj")
_MLP_OUT = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2")
# Gemma-2/3 style "sandwich" norms: the module whose output is added to the residual is a norm after the sublayer
_POST_ATTN_NORM = "post_attention_layernorm"
_POST_MLP_NORM = "post_feedforward_layernorm"


class ModelAdapter:
    """Find the parts of a causal LM that the protocol touches.

    Attributes: ``layers`` (list of decoder blocks), ``embed``, ``pos_embed`` (or None), ``final_norm``,
    ``lm_head``, ``d_model``, ``n_layers``, ``attn_modules`` / ``mlp_modules`` (the modules whose outputs
    are added to the residual stream, one per layer), and :meth:`residual_writers` (the weights that
    write into the residual stream, for weight orthogonalisation).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        arch = type(model).__name__
        missing = []

        def find(paths, what, root=model):
            for p in paths:
                m = _get(root, p)
                if m is not None:
                    return m
            missing.append(what)
            return None

        layers = find(_LAYERS, "decoder layers (e.g. model.layers or transformer.h)")
        self.embed = find(_EMBED, "token embedding (e.g. model.embed_tokens or transformer.wte)")
        self.final_norm = find(_NORM, "final norm (e.g. model.norm or transformer.ln_f)")
        self.lm_head = find(_HEAD, "LM head (lm_head)")
        self.pos_embed = next((m for p in _POS_EMBED if (m := _get(model, p)) is not None), None)
        if missing:
            raise UnsupportedArchitecture(f"{arch}: could not find the " + "; the ".join(missing))
        self.layers = list(layers)
        if not self.layers:
            raise UnsupportedArchitecture(f"{arch}: the decoder has no layers")
        cfg = getattr(model, "config", None)
        self.d_model = int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or self.embed.weight.shape[1])
        self.n_layers = len(self.layers)
        self.arch = arch

        self.attn_modules, self.mlp_modules = [], []
        self._attn_out, self._mlp_out = [], []
        self.sandwich_norm = False
        for i, layer in enumerate(self.layers):
            attn = next((m for n in _ATTN if (m := getattr(layer, n, None)) is not None), None)
            mlp = next((m for n in _MLP if (m := getattr(layer, n, None)) is not None), None)
            if attn is None or mlp is None:
                part = "attention module (self_attn/attn)" if attn is None else "MLP module (mlp)"
                raise UnsupportedArchitecture(f"{arch}: layer {i} has no {part}")
            a_out = next((m for n in _ATTN_OUT if isinstance(m := getattr(attn, n, None), nn.Module)), None)
            m_out = next((m for n in _MLP_OUT if isinstance(m := getattr(mlp, n, None), nn.Module)), None)
            if a_out is None or m_out is None:
                part = "attention output projection (o_proj/c_proj)" if a_out is None else "MLP down projection (down_proj/c_proj)"
                raise UnsupportedArchitecture(f"{arch}: layer {i} has no {part}")
            post_a, post_m = getattr(layer, _POST_ATTN_NORM, None), getattr(layer, _POST_MLP_NORM, None)
            if post_m is not None and post_a is not None:  # Gemma-2/3: a norm sits between sublayer and residual
                self.sandwich_norm = True
                self.attn_modules.append(post_a)
                self.mlp_modules.append(post_m)
            else:
                self.attn_modules.append(attn)
                self.mlp_modules.append(mlp)
            self._attn_out.append(a_out)
            self._mlp_out.append(m_out)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the token embedding's device (its execution device when accelerate placed the model
        over several devices or offloaded it; never ``meta``; :mod:`pysafegeom.models.placement`)."""
        w = self.embed.weight
        if w.device.type != "meta" and getattr(self.embed, "_hf_hook", None) is None:
            return w.device
        return execution_device(self.model, self.embed)

    def device_of(self, module: nn.Module) -> torch.device:
        """Where ``module`` (a layer, the final norm, the head) computes (:func:`~pysafegeom.models.placement.execution_device`)."""
        return execution_device(self.model, module)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def residual_writers(self) -> list[ResidualWriter]:
        """Every weight that writes into the residual stream: embeddings, attention and MLP outputs."""
        if self.sandwich_norm:
            raise UnsupportedArchitecture(
                f"{self.arch} normalises sublayer outputs before adding them to the residual stream, so weight "
                "orthogonalisation is not equivalent to ablation; use hook-based ablation instead"
            )
        out = [ResidualWriter("embed", self.embed, 1)]
        if self.pos_embed is not None:
            out.append(ResidualWriter("pos_embed", self.pos_embed, 1))
        for i, (a, m) in enumerate(zip(self._attn_out, self._mlp_out)):
            for name, mod in ((f"layers.{i}.attn_out", a), (f"layers.{i}.mlp_out", m)):
                # nn.Linear stores [d_out, d_in] (residual on rows); GPT-2's Conv1D stores [d_in, d_out]
                rdim = 0 if isinstance(mod, nn.Linear) else 1
                out.append(ResidualWriter(name, mod, rdim))
        return out

    def describe(self) -> dict:
        return {"arch": self.arch, "n_layers": self.n_layers, "d_model": self.d_model,
                "sandwich_norm": self.sandwich_norm, "pos_embed": self.pos_embed is not None}
