"""``validate.check_analyze_config``: every bad analysis option is a clear pysafegeom error naming it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pysafegeom.errors import InvalidArgument, InvalidType
from pysafegeom.pipelines.analyze import AnalysisConfig
from pysafegeom.validate import check_analyze_config
from validate_helpers import assert_clear

NAN = float("nan")

CASES = [
    ("n_val 0", dict(n_val=0), InvalidArgument, "n_val"),
    ("n_val -3", dict(n_val=-3), InvalidArgument, "n_val", "-3"),
    ("n_val a float", dict(n_val=8.5), InvalidType, "n_val"),
    ("n_behaviour 0", dict(n_behaviour=0), InvalidArgument, "n_behaviour"),
    ("batch_size 0", dict(batch_size=0), InvalidArgument, "batch_size"),
    ("selection_layer_stride 0", dict(selection_layer_stride=0), InvalidArgument, "selection_layer_stride"),
    ("n_controls 0 with interventions", dict(n_controls=0, interventions=True), InvalidArgument, "n_controls",
     "interventions"),
    ("n_controls 0 with sweeps", dict(n_controls=0, sweeps=True), InvalidArgument, "n_controls", "sweeps"),
    ("kl_threshold NaN", dict(kl_threshold=NAN), InvalidArgument, "kl_threshold"),
    ("kl_threshold negative", dict(kl_threshold=-0.1), InvalidArgument, "kl_threshold"),
    ("relaxed below kl_threshold", dict(kl_threshold=0.3, relaxed_kl_threshold=0.2), InvalidArgument,
     "relaxed_kl_threshold"),
    ("min_comply_words negative", dict(min_comply_words=-1), InvalidArgument, "min_comply_words"),
    ("max_new_tokens 0", dict(max_new_tokens=0), InvalidArgument, "max_new_tokens"),
    ("k 0", dict(k=0), InvalidArgument, "k must"),
    ("selection position unknown", dict(selection_positions=["t_post"]), InvalidArgument, "selection_positions[0]"),
    ("refusal token a string", dict(refusal_tokens=["I"]), InvalidType, "refusal_tokens[0]"),
    ("interventions a string", dict(interventions="yes"), InvalidType, "interventions"),
    ("template a number", dict(template=3), InvalidType, "template"),
]


def _cfg(**kw):
    cfg = AnalysisConfig()
    for k, v in kw.items():  # setattr, so options the config may not (yet) have (min_comply_words) are tried too
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_option_is_a_clear_error(case):
    _, kw, exc, *names = case
    assert_clear(lambda: check_analyze_config(_cfg(**kw), model_loaded=False, dtype=None, device=None), exc, *names)


LOADING = [
    ("dtype with a loaded model", True, dict(dtype="float16"), InvalidArgument, "dtype=", "ignored"),
    ("device with a loaded model", True, dict(device="cpu"), InvalidArgument, "device=", "already loaded"),
    ("dtype unknown", False, dict(dtype="int8"), InvalidArgument, "dtype", "unknown dtype"),
    ("device gpu", False, dict(device="gpu"), InvalidArgument, "device", "'cuda'"),
    ("dtype an integer dtype", False, dict(dtype=torch.int32), InvalidArgument, "dtype"),
]


@pytest.mark.parametrize("case", LOADING, ids=[c[0] for c in LOADING])
def test_bad_dtype_and_device(case):
    _, loaded, kw, exc, *names = case
    kw = {"dtype": None, "device": None, **kw}
    assert_clear(lambda: check_analyze_config(AnalysisConfig(), model_loaded=loaded, **kw), exc, *names)


def test_not_a_config():
    assert_clear(lambda: check_analyze_config({"n_val": 3}, model_loaded=False, dtype=None, device=None), InvalidType,
                 "config")


def test_good_configs_pass_and_single_strings_become_one_item():
    assert check_analyze_config(AnalysisConfig(), model_loaded=False, dtype="bf16", device="cpu") is None
    assert check_analyze_config(AnalysisConfig(), model_loaded=True, dtype=None, device=None) is None
    cfg = dataclasses.replace(AnalysisConfig(), refusal_phrases="I cannot", selection_positions="eoi-1",
                              n_controls=0)  # no controls needed without interventions or sweeps
    check_analyze_config(cfg, model_loaded=False, dtype=None, device=None)
    assert cfg.refusal_phrases == ["I cannot"] and cfg.selection_positions == ["eoi-1"]
