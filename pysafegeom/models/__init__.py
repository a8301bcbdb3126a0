"""Models: loading (local folder, .gguf, registered name; never a hub; one device or an accelerate device map),
the architecture adapter, and where a placed model's parts compute (:mod:`.placement`)."""

from .adapter import ModelAdapter, ResidualWriter, UnsupportedArchitecture
from .loading import (
    DEFAULT_MODEL,
    REGISTRY,
    ModelNotFound,
    cache_dir,
    cached_models,
    load_model,
    register_model,
    resolve,
)
from .placement import execution_device, input_device, is_offloaded, is_sharded
from .provenance import attach_training_prompts, training_prompts
from .tiny import tiny_model

__all__ = [
    "DEFAULT_MODEL", "REGISTRY", "ModelAdapter", "ModelNotFound", "ResidualWriter", "UnsupportedArchitecture",
    "attach_training_prompts", "cache_dir", "cached_models", "execution_device", "input_device", "is_offloaded",
    "is_sharded", "load_model", "register_model", "resolve", "tiny_model", "training_prompts",
]
