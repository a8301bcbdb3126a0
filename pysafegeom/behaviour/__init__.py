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
    HARMBENCH_CLS_PROMPT,
    HARMBENCH_CLS_PROMPT_CONTEXTUAL,
    JUDGE_PRESETS,
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
from .judge_spec import DEFAULT_JUDGE_SPECS, JUDGE_KINDS, JudgeSpec, judge_from_spec, judges_from_specs, parse_judge_spec

__all__ = [
    "ARDITI_PHRASES", "CLASSIFIER_TEMPLATE", "DEFAULT_JUDGE_SPECS", "HARMBENCH_CLS_PROMPT", "HARMBENCH_CLS_PROMPT_CONTEXTUAL",
    "JUDGE_KINDS", "JUDGE_PRESETS", "JudgeSpec", "judge_from_spec", "judges_from_specs", "parse_judge_spec", "PHRASE_LISTS", "R2D2_PHRASES", "XSTEST_PHRASES", "ZHAO_PHRASES",
    "Judge", "LogitJudge", "ModelJudge", "Rate", "SubstringJudge", "Verdict", "XSTestJudge", "benign_utility",
    "exaggerated_safety", "harmful_usefulness", "reference_cross_entropy", "robust_refusal", "usefulness_heuristic",
    "wilson_interval",
]
