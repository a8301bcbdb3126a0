"""Models: loading (local folder, .gguf, registered name; never a hub) and the architecture adapter."""

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
from .provenance import attach_training_prompts, training_prompts
from .tiny import tiny_model

__all__ = [
    "DEFAULT_MODEL", "REGISTRY", "ModelAdapter", "ModelNotFound", "ResidualWriter", "UnsupportedArchitecture",
    "attach_training_prompts", "cache_dir", "cached_models", "load_model", "register_model", "resolve", "tiny_model", "training_prompts",
]
