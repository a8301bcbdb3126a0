"""Behaviour: judges (refusal, partial refusal, harmfulness) and the behavioural diagnostics of PROTOCOL 5."""

from .diagnostics import (
    Rate,
    benign_utility,
    exaggerated_safety,
    harmful_usefulness,
    reference_cross_entropy,
    robust_refusal,
    usefulness_heuristic,
    wilson_interval,
)
from .judges import (
    ARDITI_PHRASES,
    CLASSIFIER_TEMPLATE,
    PHRASE_LISTS,
    R2D2_PHRASES,
    XSTEST_PHRASES,
    ZHAO_PHRASES,
    Judge,
    LogitJudge,
    ModelJudge,
    SubstringJudge,
    Verdict,
    XSTestJudge,
)

__all__ = [
    "ARDITI_PHRASES", "CLASSIFIER_TEMPLATE", "PHRASE_LISTS", "R2D2_PHRASES", "XSTEST_PHRASES", "ZHAO_PHRASES",
    "Judge", "LogitJudge", "ModelJudge", "Rate", "SubstringJudge", "Verdict", "XSTestJudge", "benign_utility",
    "exaggerated_safety", "harmful_usefulness", "reference_cross_entropy", "robust_refusal", "usefulness_heuristic",
    "wilson_interval",
]
