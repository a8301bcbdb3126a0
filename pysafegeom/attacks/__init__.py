"""Attacks on a model's refusal: GCG (:mod:`pysafegeom.attacks.gcg`) and the test-case files they write
(:mod:`pysafegeom.attacks.cases`)."""

from .gcg import GCG, AttackError, GCGConfig, GCGResult, run

__all__ = ["GCG", "AttackError", "GCGConfig", "GCGResult", "run"]
