"""pysafegeom: the safety geometry of language models.

Measures whether a model internally recognises harmful requests (the harmfulness carrier H), whether it
activates a refusal policy (the refusal carrier R), how tightly the two are coupled, and how that moves
over fine-tuning. The science is specified in docs/protocol.md.
"""

__version__ = "0.1.0"

_LAZY = {
    "load_model": ("pysafegeom.models", "load_model"),
    "ModelAdapter": ("pysafegeom.models", "ModelAdapter"),
    "format_prompts": ("pysafegeom.prompts", "format_prompts"),
    "analyze": ("pysafegeom.pipelines.analyze", "analyze"),
    "load_result": ("pysafegeom.pipelines.analyze", "load_result"),
    "drift": ("pysafegeom.pipelines.analyze", "drift"),
    "AnalysisConfig": ("pysafegeom.pipelines.analyze", "AnalysisConfig"),
    "anchor_findings": ("pysafegeom.pipelines.analyze", "anchor_findings"),
    "generate": ("pysafegeom.generation", "generate"),
    "ablate": ("pysafegeom.interventions", "ablate"),
    "add": ("pysafegeom.interventions", "add"),
    "orthogonalize": ("pysafegeom.interventions", "orthogonalize"),
    "export_orthogonalized": ("pysafegeom.interventions", "export_orthogonalized"),
    "sweep": ("pysafegeom.interventions", "sweep"),
    "reopen_attacks": ("pysafegeom.pipelines.reopen", "reopen_attacks"),
    "check_sets": ("pysafegeom.pipelines.check_sets", "check_sets"),
    "trajectory": ("pysafegeom.pipelines.trajectory", "trajectory"),
}


def __getattr__(name):  # lazy, so `import pysafegeom.ops` does not pull in transformers
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'pysafegeom' has no attribute {name!r}")


__all__ = list(_LAZY)
