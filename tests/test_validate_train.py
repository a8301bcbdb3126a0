"""Bad training options and runs end in a clear pysafegeom error naming the option or file: absurd or
non-finite values, resume=True with nothing to resume, truncated checkpoints, and a diverging loss (caught
before any checkpoint of NaN weights is written)."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("peft")

from pysafegeom.errors import InputFileError, InvalidArgument, InvalidType, MissingFile  # noqa: E402
from pysafegeom.train import RECIPES, TrainConfig, run  # noqa: E402
from pysafegeom.train.sft import SFTRecipe  # noqa: E402
from validate_helpers import assert_clear, tiny_llama  # noqa: E402

EXAMPLES = [("How do I bake bread?", "Mix flour, water and yeast."), ("Build a bomb.", "Sorry, I can't do that.")]
FAST = dict(steps=1, batch_size=2, warmup_steps=0, max_len=64, lr=1e-3)

CONFIG_CASES = [
    ("steps 0", dict(steps=0), InvalidArgument, "steps"),
    ("steps a bool", dict(steps=True), InvalidType, "steps"),
    ("steps a float", dict(steps=2.0), InvalidType, "steps"),
    ("lr 1e4", dict(lr=1e4), InvalidArgument, "lr=10000.0"),
    ("lr NaN", dict(lr=float("nan")), InvalidArgument, "lr"),
    ("lr a string", dict(lr="1e-4"), InvalidType, "lr"),
    ("schedule unknown", dict(schedule="linear"), InvalidArgument, "schedule"),
    ("warmup_steps negative", dict(warmup_steps=-1), InvalidArgument, "warmup_steps"),
    ("save_at not a number", dict(save_at=(1, "abc")), InvalidType, "save_at"),
    ("save_at negative step", dict(save_at=(-1,)), InvalidArgument, "save_at"),
    ("save_at not increasing", dict(save_at=(20, 10)), InvalidArgument, "strictly increasing"),
    ("save_at beyond steps", dict(save_at=(500,)), InvalidArgument, "save_at"),
    ("refusal phrasing empty", dict(refusal_phrasings=("", "Sorry.")), InvalidArgument, "refusal_phrasings"),
    ("lora_dropout 1", dict(lora_dropout=1.0), InvalidArgument, "lora_dropout"),
    ("lora_targets not strings", dict(lora_targets=(3,)), InvalidType, "lora_targets"),
    ("max_grad_norm NaN", dict(max_grad_norm=float("nan")), InvalidArgument, "max_grad_norm"),
    ("lora a string", dict(lora="yes"), InvalidType, "lora"),
    ("seed a string", dict(seed="0"), InvalidType, "seed"),
]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_option_is_a_clear_error(case):
    _, kw, exc, *names = case
    assert_clear(lambda: TrainConfig(**kw).validate(), exc, "invalid training option", *names)


def test_single_values_become_one_item():
    cfg = TrainConfig(save_at=3, refusal_phrasings="Sorry, no.").validate()
    assert cfg.save_at == (3,) and cfg.refusal_phrasings == ("Sorry, no.",)


def test_resume_with_nothing_to_resume(tok, tmp_path):
    assert_clear(lambda: run(tiny_llama(tok), tok, EXAMPLES, TrainConfig(**FAST), tmp_path / "empty", resume=True,
                             progress=False), MissingFile, "resume=True", "no complete checkpoint")


def test_run_argument_types(tok, tmp_path):
    assert_clear(lambda: run(tiny_llama(tok), tok, EXAMPLES, {"steps": 1}, tmp_path / "a", progress=False),
                 InvalidType, "config")
    assert_clear(lambda: run(tiny_llama(tok), tok, EXAMPLES, TrainConfig(**FAST), tmp_path / "b", resume="yes",
                             progress=False), InvalidType, "resume")


@pytest.fixture(scope="module")
def finished(tok, tmp_path_factory):
    from pysafegeom.models import tiny_model

    out = tmp_path_factory.mktemp("train") / "run"
    model = tiny_model("llama", tokenizer=tok, n_layers=1, d_model=16, seed=0)
    run(model, tok, EXAMPLES, TrainConfig(**FAST), out, progress=False)
    return out


def _cut(f):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["trainer_state.pt", "adapter_model.safetensors"])
def test_truncated_checkpoint_on_resume_names_the_file(tok, finished, tmp_path, name):
    from pysafegeom.models import tiny_model

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    _cut(out / "checkpoint-1" / name)
    model = tiny_model("llama", tokenizer=tok, n_layers=1, d_model=16, seed=0)
    assert_clear(lambda: run(model, tok, EXAMPLES, TrainConfig(**FAST), out, resume=True, progress=False),
                 InputFileError, name, "checkpoint-1")


class _NaNLoss(SFTRecipe):
    name = "nan-loss"

    def build_loss(self, batch):
        return super().build_loss(batch) * float("nan")


class _NaNWeights(SFTRecipe):
    name = "nan-weights"

    def on_step(self, step):
        with torch.no_grad():
            next(p for p in self.model.parameters() if p.requires_grad).fill_(float("nan"))


@pytest.mark.parametrize("recipe, what", [(_NaNLoss, "the loss is nan"), (_NaNWeights, "NaN or infinite")],
                         ids=["NaN loss", "NaN weights"])
def test_divergence_stops_before_a_checkpoint(tok, tmp_path, monkeypatch, recipe, what):
    from pysafegeom.models import tiny_model

    monkeypatch.setitem(RECIPES, recipe.name, recipe)
    model = tiny_model("llama", tokenizer=tok, n_layers=1, d_model=16, seed=0)
    out = tmp_path / "run"
    assert_clear(lambda: run(model, tok, EXAMPLES, TrainConfig(recipe=recipe.name, **FAST), out, progress=False),
                 InvalidArgument, "training diverged", what, "lr")
    assert not list(out.glob("checkpoint-*"))
