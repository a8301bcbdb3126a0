"""Where the parts of a model compute when accelerate has placed them on several devices (``device_map``).

A model loaded with ``load_model(..., device_map=...)`` is dispatched by accelerate: its blocks may sit on
several GPUs, on the CPU, or be *offloaded* (``"disk"``, or ``"cpu"`` when the main device is a GPU). An
offloaded module's parameters live on the ``meta`` device; its ``AlignDevicesHook`` loads them from
``hook.weights_map`` onto ``hook.execution_device`` for each forward and drops them afterwards. So
``next(model.parameters()).device`` says nothing about where inputs belong (it may be ``meta``); these helpers do:

* :func:`execution_device`: where a module computes (its hook's execution device, else its parameters' device).
* :func:`input_device`: where input ids go (the token embedding's execution device). The model's top-level hook
  moves its outputs (logits, the cache object's tensors excepted) back to the device of its inputs, so logits
  of ``model(input_ids=...)`` come back on this device too.
* :func:`is_sharded`, :func:`is_offloaded`: whether accelerate placed the model, and whether any weight is offloaded.
* :func:`offload_slot` / :func:`module_tensor`: the mapping an offloaded weight is read from, and the tensor the
  forward actually uses (the parameter itself, or the offloaded copy).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


def _get(obj, path: str):
    """``obj.a.b.c`` for ``path`` ``"a.b.c"``, or None where a part is missing."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# where the token embedding sits (the model adapter's list too), first match wins
_EMBED = ("model.embed_tokens", "model.model.embed_tokens", "transformer.wte", "gpt_neox.embed_in")


def _hooks(module: nn.Module) -> list:
    """The accelerate hooks on ``module`` (a ``SequentialHook`` is unpacked); [] without accelerate."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _as_device(dev) -> torch.device:
    if isinstance(dev, torch.device):
        return dev
    if isinstance(dev, int):
        return torch.device("cuda", dev)
    return torch.device(dev)


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _ancestors(model: nn.Module, module: nn.Module, names: dict[int, str] | None = None):
    """``module`` and the modules that hold it, innermost first, as ``(qualified name, module)``."""
    names = names if names is not None else _module_names(model)
    name = names.get(id(module))
    if name is None:
        yield "", module
        return
    parts = name.split(".") if name else []
    for k in range(len(parts), -1, -1):
        prefix = ".".join(parts[:k])
        yield prefix, model.get_submodule(prefix) if prefix else model


def _main_device(model: nn.Module) -> torch.device | None:
    for h in _hooks(model):
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return _as_device(dev)
    return None


def execution_device(model: nn.Module, module: nn.Module | None = None) -> torch.device:
    """The device ``module`` (default: the whole model's first parameter) computes on.

    Under accelerate that is the execution device of the innermost hook on the module or a module that holds it;
    otherwise the device of its first parameter (or buffer). A module with only ``meta`` tensors and no hook
    gets the model's main execution device, else the CPU.
    """
    module = model if module is None else module
    for _, m in _ancestors(model, module):
        for h in _hooks(m):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return _as_device(dev)
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return _main_device(model) or torch.device("cpu")


def _embedding(model: nn.Module) -> nn.Module | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get = getattr(base, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if emb is None:
        emb = next((m for p in _EMBED if (m := _get(base, p)) is not None), None)
    return emb


def input_device(model: nn.Module) -> torch.device:
    """Where input ids (and masks, positions) should be put: the token embedding's execution device.

    For a model on one device this is that device (what ``next(model.parameters()).device`` gave); for a
    dispatched model it is where its first computation happens, never ``meta``.
    """
    emb = _embedding(model)
    return execution_device(model, emb if emb is not None else model)


def device_map(model: nn.Module) -> dict | None:
    """The model's accelerate device map (``hf_device_map``: module name -> device, ``"cpu"`` or ``"disk"``), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dm = getattr(model, "hf_device_map", None) or getattr(base, "hf_device_map", None)
    return dict(dm) if isinstance(dm, Mapping) and dm else None


def is_sharded(model: nn.Module) -> bool:
    """True when accelerate placed the model over more than one device or offloaded part of it."""
    dm = device_map(model)
    if dm is not None and (len({str(v) for v in dm.values()}) > 1 or "disk" in dm.values()):
        return True
    return is_offloaded(model)


def is_dispatched(model: nn.Module) -> bool:
    """True when accelerate placed ``model`` (any module carries a device hook), on one device or several."""
    return any(getattr(m, "_hf_hook", None) is not None for m in model.modules())


def is_offloaded(model: nn.Module) -> bool:
    """True when some parameter lives on ``meta`` (offloaded to the CPU or disk, loaded by its hook per forward)."""
    return any(p.device.type == "meta" for p in model.parameters())


def offload_slot(model: nn.Module, module: nn.Module, name: str, names: dict[int, str] | None = None):
    """``(hook, key)`` such that the offloaded tensor ``module.<name>`` is loaded from ``hook.weights_map[key]``.

    The hook is the innermost accelerate hook with ``offload=True`` on ``module`` or a module holding it (as
    transformers' ``load_offloaded_parameter`` finds it). ``None`` when the tensor is not offloaded.
    """
    tensor = getattr(module, name, None)
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "meta":
        return None
    names = names if names is not None else _module_names(model)
    own = names.get(id(module), "")
    for prefix, m in _ancestors(model, module, names):
        for h in _hooks(m):
            if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
                rel = own[len(prefix) + 1:] if prefix else own
                key = f"{rel}.{name}" if rel else name
                return h, key
    return None


def module_tensor(model: nn.Module, module: nn.Module, name: str = "weight", *, on_device: bool = False) -> torch.Tensor:
    """The tensor ``module.<name>`` as the forward sees it: the parameter itself, or (offloaded) the copy its
    accelerate hook loads (a host tensor, read from the offload store; editing it changes nothing). ``on_device``:
    that copy moved to the module's execution device (a loaded parameter is there already)."""
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor
    slot = offload_slot(model, module, name)
    if slot is None:
        raise RuntimeError(f"{type(module).__name__}.{name} is on the meta device but no accelerate hook loads it; "
                           "was the model dispatched with accelerate (load_model(..., device_map=...))?")
    hook, key = slot
    value = hook.weights_map[key]
    return value.to(execution_device(model, module)) if on_device else value


def parameter_value(model: nn.Module, name: str, p: torch.Tensor) -> torch.Tensor:
    """The value of ``model``'s parameter ``name`` (``p``, as ``named_parameters`` gave it): ``p`` itself when
    loaded, else the copy its offload store holds (on the host)."""
    if p.device.type != "meta":
        return p
    owner, _, leaf = name.rpartition(".")
    return module_tensor(model, model.get_submodule(owner) if owner else model, leaf)


def parameter_values(model: nn.Module):
    """``(name, tensor)`` for every parameter of ``model`` as ``named_parameters`` lists them (:func:`parameter_value`:
    an offloaded one read from its offload store, one at a time)."""
    for name, p in model.named_parameters():
        yield name, parameter_value(model, name, p)


class WeightsOverlay(Mapping):
    """A mapping that answers ``edits[key]`` where it has one and ``base[key]`` otherwise.

    Installed in place of an accelerate hook's ``weights_map`` it makes the hook load edited weights, while the
    offload store itself (files on disk, a host state dict) stays untouched; putting ``base`` back undoes it.
    """

    def __init__(self, base: Mapping, edits: dict):
        self.base, self.edits = base, edits

    def __getitem__(self, key):
        if key in self.edits:
            return self.edits[key]
        return self.base[key]

    def __contains__(self, key) -> bool:
        return key in self.edits or key in self.base

    def __iter__(self):
        yield from self.edits
        yield from (k for k in self.base if k not in self.edits)

    def __len__(self) -> int:
        return len(self.base) + sum(1 for k in self.edits if k not in self.base)


__all__ = ["WeightsOverlay", "device_map", "execution_device", "input_device", "is_dispatched", "is_offloaded", "is_sharded",
           "parameter_value", "parameter_values",
           "module_tensor", "offload_slot"]
