"""Generation for training (self-distillation, behavioural checks): re-exported from :mod:`pysafegeom.generate`."""

from ..generate import (  # noqa: F401
    REFUSAL_SUBSTRINGS,
    GenerationResult,
    generate,
    greedy_generate,
    is_refusal,
    refusal_rate,
    stop_token_ids,
)

__all__ = ["REFUSAL_SUBSTRINGS", "GenerationResult", "generate", "greedy_generate", "is_refusal", "refusal_rate",
           "stop_token_ids"]
