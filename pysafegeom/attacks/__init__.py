"""Attacks on a model's refusal and the test cases they leave: GCG (:mod:`pysafegeom.attacks.gcg`), AutoDAN
(:mod:`pysafegeom.attacks.autodan`), the test-case store (:mod:`pysafegeom.attacks.store`), fixed-source replay
(:mod:`pysafegeom.attacks.replay`) and transfer matrices (:mod:`pysafegeom.attacks.transfer`)."""

from .autodan import AutoDAN, AutoDANConfig, AutoDANResult
from .gcg import GCG, AttackError, GCGConfig, GCGResult, run

__all__ = ["AutoDAN", "AutoDANConfig", "AutoDANResult", "GCG", "AttackError", "GCGConfig", "GCGResult", "run"]
